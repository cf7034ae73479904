//! Sample data for healer: a seeded generator of a simulated fleet, with labelled faults.
//!
//! [`generate`] produces the canonical wide metrics schema
//! (the canonical schema of `healer-operators`: `ts`, `resource`, `service`, `region`, 16 metrics) in
//! stream order (all resources of one timestamp, then the next), plus a [`Label`] per
//! injected fault. The output depends only on the [`FleetConfig`]: the same seed gives the
//! same bytes on every machine.

pub mod fleet;
pub mod rng;

pub use fleet::{FaultKind, FleetConfig, Label, generate, write_labels_csv, write_parquet};
