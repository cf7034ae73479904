//! Actuators: the systems remediations act on.
//!
//! Each backend answers health checks and metric probes (for preconditions), takes a
//! snapshot of what an operation will change, executes it, verifies it and rolls it back
//! from the snapshot. Executes and rollbacks compute their result from the snapshot (scale
//! to snapshot + 2, not "add 2"), so one that is run again after a crash lands in the same
//! place instead of doing the work twice.

mod autoscaling;
mod postgres;
mod process;
mod redis;
mod webhook;

use serde_json::Value;

use super::config::{ActionSpec, Operation, TargetConfig};

pub use autoscaling::AutoScaling;
pub use postgres::Postgres;
pub use process::ProcessService;
pub use redis::RedisCache;
pub use webhook::Webhook;

/// Why an actuator call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ActError {
    /// The call failed.
    #[error("{0}")]
    Failed(String),
    /// A ceiling (instances, memory) is reached: acting again cannot help.
    #[error("ceiling reached: {0}")]
    Ceiling(String),
    /// The backend has no such check or metric.
    #[error("{0}")]
    Unknown(String),
}

/// Result of an actuator call.
pub type ActResult<T> = Result<T, ActError>;

pub(crate) fn failed(e: impl std::fmt::Display) -> ActError {
    ActError::Failed(e.to_string())
}

/// What the saga tells an actuator about the action it runs.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// The action.
    pub spec: &'a ActionSpec,
    /// The saga id (idempotency key for receivers that honour one).
    pub saga: &'a str,
    /// The incident id.
    pub incident: &'a str,
    /// The target resource.
    pub target: &'a str,
}

impl<'a> Call<'a> {
    /// The call of `spec` for `saga`.
    pub fn of(spec: &'a ActionSpec, saga: &'a crate::remedy::journal::Saga) -> Self {
        Self {
            spec,
            saga: &saga.id,
            incident: &saga.incident,
            target: &saga.target,
        }
    }
}

/// One target's backend.
#[derive(Debug)]
pub enum Backend {
    /// A local service process.
    Process(ProcessService),
    /// An EC2 Auto Scaling group.
    AutoScaling(AutoScaling),
    /// A Redis cache.
    Redis(RedisCache),
    /// A PostgreSQL primary and replica.
    Postgres(Postgres),
    /// A generic HTTP webhook.
    Webhook(Webhook),
}

macro_rules! each {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Backend::Process($b) => $e,
            Backend::AutoScaling($b) => $e,
            Backend::Redis($b) => $e,
            Backend::Postgres($b) => $e,
            Backend::Webhook($b) => $e,
        }
    };
}

impl Backend {
    /// The backend a target is configured with.
    pub async fn of(target: &TargetConfig) -> ActResult<Self> {
        if let Some(p) = &target.process {
            return Ok(Backend::Process(ProcessService::new(p.clone())));
        }
        if let Some(a) = &target.autoscaling {
            return Ok(Backend::AutoScaling(AutoScaling::new(a.clone()).await));
        }
        if let Some(r) = &target.redis {
            return Ok(Backend::Redis(RedisCache::new(r.clone())?));
        }
        if let Some(p) = &target.postgres {
            return Ok(Backend::Postgres(Postgres::new(p.clone())));
        }
        if let Some(w) = &target.webhook {
            return Ok(Backend::Webhook(Webhook::new(w.clone())));
        }
        Err(ActError::Failed(format!(
            "target `{}` has no backend",
            target.pattern
        )))
    }

    /// The backend's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Process(_) => "process",
            Backend::AutoScaling(_) => "autoscaling",
            Backend::Redis(_) => "redis",
            Backend::Postgres(_) => "postgres",
            Backend::Webhook(_) => "webhook",
        }
    }

    /// Whether this backend can carry out `op`.
    pub fn supports(&self, op: Operation) -> bool {
        use Operation::*;
        match self {
            Backend::Process(_) => matches!(op, Restart | RollbackDeploy | IncreaseMemory),
            Backend::AutoScaling(_) => op == ScaleUp,
            Backend::Redis(_) => op == ClearCache,
            Backend::Postgres(_) => op == FailoverDatabase,
            Backend::Webhook(_) => true,
        }
    }

    /// Whether running `op`'s execute again after a crash lands in the same place.
    pub fn idempotent(&self, op: Operation) -> bool {
        use Operation::*;
        match self {
            Backend::Process(_) => matches!(op, RollbackDeploy | IncreaseMemory),
            // A webhook call carries the saga's id as its idempotency key.
            Backend::AutoScaling(_) | Backend::Postgres(_) | Backend::Webhook(_) => true,
            Backend::Redis(_) => false,
        }
    }

    /// Whether undoing `call` is safe without a human, for actions whose rollback otherwise
    /// needs approval: true only for a failover whose replica was never promoted.
    pub async fn safe_to_undo(&self, call: &Call<'_>, snapshot: &Value) -> ActResult<bool> {
        let _ = (call, snapshot);
        match self {
            Backend::Postgres(p) => p.replica_in_recovery().await,
            _ => Ok(false),
        }
    }

    /// A boolean health check by name (`reachable`, `healthy`, …).
    pub async fn check(&self, name: &str) -> ActResult<bool> {
        each!(self, b => b.check(name).await)
    }

    /// A live metric reading.
    pub async fn probe(&self, metric: &str) -> ActResult<f64> {
        each!(self, b => b.probe(metric).await)
    }

    /// What `call` will change, to restore on rollback.
    pub async fn snapshot(&self, call: &Call<'_>) -> ActResult<Value> {
        each!(self, b => b.snapshot(call).await)
    }

    /// Carries out `call`; a line of what was done.
    pub async fn execute(&self, call: &Call<'_>, snapshot: &Value) -> ActResult<String> {
        each!(self, b => b.execute(call, snapshot).await)
    }

    /// Checks `call`'s effect; a line of what was seen.
    pub async fn verify(&self, call: &Call<'_>, snapshot: &Value) -> ActResult<String> {
        each!(self, b => b.verify(call, snapshot).await)
    }

    /// Restores `snapshot`; a line of what was done.
    pub async fn rollback(&self, call: &Call<'_>, snapshot: &Value) -> ActResult<String> {
        each!(self, b => b.rollback(call, snapshot).await)
    }
}

pub(crate) fn unknown_check(backend: &str, name: &str) -> ActError {
    ActError::Unknown(format!("the {backend} backend has no check `{name}`"))
}

pub(crate) fn unknown_metric(backend: &str, name: &str) -> ActError {
    ActError::Unknown(format!("the {backend} backend has no metric `{name}`"))
}

/// A GET answered with 2xx within `timeout`; the body on success.
pub(crate) async fn http_ok(url: &str, timeout: std::time::Duration) -> Result<String, String> {
    let client = crate::notify::client();
    match client.get(url).timeout(timeout).send().await {
        Ok(r) if r.status().is_success() => Ok(r.text().await.unwrap_or_default()),
        Ok(r) => Err(format!("{url}: HTTP {}", r.status().as_u16())),
        Err(e) => Err(format!("{url}: {e}")),
    }
}
