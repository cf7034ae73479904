//! Pure logic of healer over Arrow [`RecordBatch`](arrow::record_batch::RecordBatch)es.
//!
//! Nothing in this crate does I/O, spawns tasks or reads a clock: every operator is a value
//! that takes batches in and returns batches or arrays out, so it can be tested in isolation
//! and driven identically by replay and by a live stream.
//!
//! * [`window`]: keyed, incremental sliding-window aggregates (the engine behind SQL
//!   `OVER (PARTITION BY … ORDER BY ts ROWS BETWEEN n PRECEDING AND CURRENT ROW)`).
//! * [`keys`]: interning of partition keys into dense group ids.
//! * [`predicate`]: conservative row pre-filters evaluated inside the window pass.
//! * [`schema`]: the canonical metrics schema and the versioned incident-log schema.
//! * [`order`]: the canonical order of anomaly rows, in which the incident log stores them.
//! * [`severity`]: the z-score severity and confidence mapping.
//! * [`unpivot`]: the long `samples` view of a wide metrics batch.
//! * [`id`]: deterministic, version-stable identifiers.
//! * [`scoring`]: detector scores against labels (AUROC).
//! * [`nab`]: Numenta Anomaly Benchmark v1.1 scoring with its corpus-wide threshold sweep.
//! * [`topology`]: the service dependency graph.
//! * [`rca`]: anomalies correlated over the graph into incidents with ranked root causes.
//! * [`decision`]: auto-heal, request approval or escalate, with the reasons.
//! * [`iforest`]: isolation forest with flat trees and batch scoring.
//! * [`iforest_model`]: versioned isolation-forest model files with feature names,
//!   training fingerprint and score calibration.

pub mod decision;
pub mod id;
pub mod iforest;
pub mod iforest_model;
pub mod keys;
pub mod nab;
pub mod order;
pub mod predicate;
pub mod rca;
pub mod schema;
pub mod scoring;
pub mod severity;
pub mod sorted;
pub mod topology;
pub mod unpivot;
pub mod window;

/// Errors raised by operators. Operators never panic on data: every unexpected input is one
/// of these.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The input does not have the shape the operator was built for.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An Arrow kernel failed.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// A model failed to evaluate.
    #[error("model: {0}")]
    Model(String),
}

/// Result alias of this crate.
pub type Result<T, E = OperatorError> = std::result::Result<T, E>;

/// Deterministic pseudo-random `u64`s for tests (Knuth's MMIX linear congruential
/// generator), so that test data needs no dependency and never changes.
#[cfg(test)]
pub(crate) fn test_randoms(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state
    }
}
