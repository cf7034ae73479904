//! Remediation: decisions carried out as durable sagas against real systems, with safety
//! rules against healing storms, approvals and escalation.
//!
//! # The saga
//! preconditions → snapshot → execute (timeout: 1.5 × the estimate) → verify (attempts,
//! interval) → succeeded; any failure compensates from the snapshot (rolled back) and
//! escalates; a rollback that fails, or one that needs a human (a database failover),
//! escalates as failed. Every state change and step is written to the [journal]
//! before the step acts, so a healer killed at any point resumes or compensates on restart
//! ([`Remediator::recover`]): a step that was interrupted is re-run when it only reads
//! (preconditions, snapshot, verify) or restores (compensate, computed from the snapshot);
//! an interrupted execute is verified first (the effect may have landed), re-run when the
//! operation is idempotent, and compensated otherwise. The saga id hashes incident, action
//! and target, so one remediation runs at most once.
//!
//! # Safety
//! Dry run is the default mode: decisions and the planned steps are recorded, nothing is
//! touched. Admission (one transaction) applies, in order: the kill switch (`healer pause`),
//! the allow-list, idempotency, recurrence (the same fix succeeding `recurrence_count` times
//! in `recurrence_window` escalates instead), the per-(target, action) cooldown, budgets per
//! target, service and fleet, the concurrency cap, and the target's lock (fenced by a
//! token). Ceilings (instances, memory) escalate instead of acting. Healer's own actions are
//! recorded with their time windows ([`Remediator::own_activity`]) so the anomalies they
//! cause do not open new incidents.

pub mod actuator;
pub mod config;
pub mod journal;
mod saga;

use std::collections::HashMap;

use arrow::array::{
    ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use std::sync::Arc;

use crate::diagnose::Diagnosed;
use crate::notify::Escalation;
use crate::store::Location;
use config::{Radius, RemediationConfig};
use healer_operators::decision::Outcome;
use healer_operators::rca::Observation;
use journal::{Journal, JournalError, NewSaga};

pub use saga::Report;

/// A telemetry sample, for preconditions that must hold `for` a while.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Resource id.
    pub resource: String,
    /// Metric name.
    pub metric: String,
    /// Event time (ms).
    pub ts_ms: i64,
    /// Value.
    pub value: f64,
}

/// What to remediate.
#[derive(Debug, Clone)]
pub struct Request {
    /// Incident id.
    pub incident: String,
    /// Action id (or alias).
    pub action: String,
    /// Other actions that would fit, best first (the root cause's recommendations).
    pub alternatives: Vec<String>,
    /// Target resource.
    pub target: String,
    /// What an escalation says.
    pub escalation: Escalation,
    /// The decision's time (ms; default now): `for` preconditions look at the telemetry
    /// before it.
    pub as_of_ms: Option<i64>,
}

impl Request {
    /// The request for a diagnosed incident's decided action.
    pub fn of(d: &Diagnosed) -> Option<Self> {
        Some(Self {
            incident: d.id.clone(),
            action: d.decision.action.clone()?,
            alternatives: d
                .incident
                .root_cause()
                .map(|r| r.recommended_actions.clone())
                .unwrap_or_default(),
            target: d.decision.target.clone()?,
            escalation: Escalation::of(d),
            as_of_ms: Some(d.incident.end_ms),
        })
    }
}

/// Carries out decisions: see the [module docs](self).
#[derive(Debug)]
pub struct Remediator {
    config: RemediationConfig,
    library: config::Library,
    journal: Journal,
    http: reqwest::Client,
    telemetry: Vec<Sample>,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Remediator {
    /// Opens the journal of `config`.
    pub fn open(config: RemediationConfig) -> Result<Self, JournalError> {
        let journal = Journal::open(&config.journal)?;
        Ok(Self {
            library: config.library(),
            config,
            journal,
            http: crate::notify::client(),
            telemetry: Vec::new(),
        })
    }

    /// Telemetry for `for` preconditions (see [`read_telemetry`]).
    pub fn set_telemetry(&mut self, samples: Vec<Sample>) {
        self.telemetry = samples;
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The configuration.
    pub fn config(&self) -> &RemediationConfig {
        &self.config
    }

    /// Carries out `d`'s decision: a saga for auto-heal, an approval request, or an
    /// escalation.
    pub async fn handle(&self, d: &Diagnosed) -> Result<Report, JournalError> {
        let request = Request::of(d);
        match (d.decision.outcome, request) {
            (Outcome::AutoHeal, Some(r)) => self.remediate(r).await,
            (Outcome::RequestApproval, Some(r)) => {
                let why = d.decision.reasons.join("; ");
                self.ask_approval(r, &why).await
            }
            _ => {
                let e = Escalation::of(d);
                let delivered = self.notify(&e).await;
                Ok(Report::escalation(
                    &d.id,
                    &d.decision.reasons.join("; "),
                    delivered,
                ))
            }
        }
    }

    fn service_of(&self, target: &str) -> String {
        self.config
            .target(target)
            .and_then(|t| t.service.clone())
            .unwrap_or_else(|| target.to_string())
    }

    /// Chooses the action for `r` that the target's backend can run: the decided one, or
    /// else the best alternative of no larger blast radius.
    async fn resolve(&self, r: &Request) -> Result<(String, actuator::Backend), String> {
        let target = self
            .config
            .target(&r.target)
            .ok_or_else(|| format!("no backend configured for {}", r.target))?;
        let backend = actuator::Backend::of(target)
            .await
            .map_err(|e| e.to_string())?;
        let decided = self
            .library
            .get(&r.action)
            .ok_or_else(|| format!("no action `{}` in the library", r.action))?;
        if backend.supports(decided.operation) {
            return Ok((decided.id.clone(), backend));
        }
        let radius = decided.blast_radius;
        let pick = self
            .library
            .matching(&r.alternatives, |op| backend.supports(op))
            .into_iter()
            .find(|a| a.blast_radius <= radius)
            .map(|a| a.id.clone());
        match pick {
            Some(id) => Ok((id, backend)),
            None => Err(format!(
                "the {} backend of {} cannot {} and no alternative of blast radius {} or less fits",
                backend.kind(),
                r.target,
                decided.operation.as_str(),
                radius_name(radius)
            )),
        }
    }

    /// [`Remediator::resolve`], or the escalation of why nothing fits.
    async fn resolve_or_escalate(
        &self,
        r: &Request,
    ) -> Result<(String, actuator::Backend), Report> {
        match self.resolve(r).await {
            Ok(x) => Ok(x),
            Err(why) => {
                let delivered = self.notify(&r.escalation).await;
                Err(Report::escalation(&r.incident, &why, delivered))
            }
        }
    }

    fn new_saga(&self, r: &Request, action: &str) -> NewSaga {
        NewSaga {
            incident: r.incident.clone(),
            action: action.to_string(),
            target: r.target.clone(),
            service: self.service_of(&r.target),
            context: serde_json::to_string(&r.escalation).expect("escalations serialise"),
            dry_run: self.config.mode == config::Mode::DryRun,
            as_of_ms: r.as_of_ms.unwrap_or_else(now_ms),
        }
    }

    /// Runs `r` as a saga through the safety rules.
    pub async fn remediate(&self, r: Request) -> Result<Report, JournalError> {
        let (action, backend) = match self.resolve_or_escalate(&r).await {
            Ok(x) => x,
            Err(report) => return Ok(report),
        };
        let new = self.new_saga(&r, &action);
        let (id, admission) = self.journal.admit(&new, &self.config, now_ms())?;
        self.after_admission(&id, admission, &backend).await
    }

    /// Records an approval request for `r`; `healer approvals approve` lets it run.
    pub async fn ask_approval(&self, r: Request, why: &str) -> Result<Report, JournalError> {
        let (action, _) = match self.resolve_or_escalate(&r).await {
            Ok(x) => x,
            Err(report) => return Ok(report),
        };
        let new = self.new_saga(&r, &action);
        let (id, approval) = self.journal.request_approval(
            &new,
            why,
            now_ms(),
            self.config.limits.approval_ttl(),
        )?;
        if let Some(a) = &approval {
            self.journal.step(
                &id,
                "request_approval",
                "ok",
                &format!("approval {a} requested: {why}"),
                now_ms(),
            )?;
        }
        self.report(&id)
    }

    /// The journal's view of saga `id`.
    pub fn report(&self, id: &str) -> Result<Report, JournalError> {
        let saga = self.journal.saga(id)?.expect("a saga that was written");
        let steps = self.journal.steps(id)?;
        Ok(Report::of(&saga, &steps))
    }

    /// Takes over sagas left in flight by a process that is gone, sends the escalations it
    /// left, expires approval requests (escalating them) and runs approved sagas. Call at
    /// start and now and then.
    ///
    /// A saga in flight is resumed even while healer is paused (the kill switch lets
    /// in-flight actions finish); its lock must still be its own, or it ends failed and
    /// escalates, since another remediation may have acted on the target since.
    pub async fn recover(&self) -> Result<Vec<Report>, JournalError> {
        let mut out = Vec::new();
        self.flush_escalations(None).await?;
        for a in self.journal.expire_approvals(now_ms())? {
            if let Some(saga) = self.journal.saga(&a.saga)? {
                self.escalate(
                    &saga,
                    &format!("approval request {} expired unanswered", a.id),
                )
                .await?;
                out.push(self.report(&saga.id)?);
            }
        }
        let ttl = self.config.limits.lock_ttl();
        for saga in self.journal.sagas_in(&journal::state::IN_FLIGHT)? {
            if saga.dry_run {
                continue;
            }
            let token = match self.journal.claim(&saga, ttl, now_ms())? {
                journal::Claim::Token(t) => t,
                journal::Claim::Busy => continue,
                journal::Claim::Lost => {
                    let why = format!(
                        "stopped in {} and its lock on {} was taken since: another remediation may have acted; state unknown",
                        saga.state, saga.target
                    );
                    self.end(&saga.id, journal::state::FAILED, &why).await?;
                    out.push(self.report(&saga.id)?);
                    continue;
                }
            };
            let backend = match self.backend_of(&saga.target).await {
                Ok(b) => b,
                Err(e) => {
                    self.end(&saga.id, journal::state::FAILED, &e).await?;
                    self.journal.release(&saga.id, &saga.target, token)?;
                    out.push(self.report(&saga.id)?);
                    continue;
                }
            };
            self.journal.step(
                &saga.id,
                "recover",
                "ok",
                &format!("taken over in {} with token {token}", saga.state),
                now_ms(),
            )?;
            out.push(self.run(&saga.id, token, &backend).await?);
        }
        for saga in self.journal.sagas_in(&[journal::state::APPROVED])? {
            let backend = match self.backend_of(&saga.target).await {
                Ok(b) => b,
                Err(e) => {
                    self.end(&saga.id, journal::state::FAILED, &e).await?;
                    out.push(self.report(&saga.id)?);
                    continue;
                }
            };
            let admission = self.journal.admit_approved(&saga, &self.config, now_ms())?;
            out.push(self.after_admission(&saga.id, admission, &backend).await?);
        }
        Ok(out)
    }

    /// Runs the approved manual rollbacks: the backend's rollback from the saga's snapshot,
    /// under the target's lock, once, and not while healer is paused.
    pub async fn run_approved_rollbacks(&self) -> Result<Vec<Report>, JournalError> {
        let mut out = Vec::new();
        let ttl = self.config.limits.lock_ttl();
        for a in self.journal.approvals(true)? {
            if a.kind != "rollback" || a.status != "approved" {
                continue;
            }
            if self.journal.paused(now_ms())?.is_some() {
                break;
            }
            let Some(saga) = self.journal.saga(&a.saga)? else {
                continue;
            };
            if saga.state != journal::state::FAILED || !self.journal.start_approved(&a.id)? {
                continue;
            }
            let Some(token) = self
                .journal
                .lock_free(&saga.id, &saga.target, ttl, now_ms())?
            else {
                // The target is busy: try again on the next call.
                self.journal.set_approval_status(&a.id, "approved")?;
                continue;
            };
            let report = match self.backend_of(&saga.target).await {
                Ok(backend) => {
                    self.manual_rollback(&saga, &backend, a.by.as_deref().unwrap_or("?"))
                        .await
                }
                Err(e) => self
                    .escalate(&saga, &e)
                    .await
                    .and_then(|()| self.report(&saga.id)),
            };
            self.journal.release(&saga.id, &saga.target, token)?;
            self.journal.set_approval_status(&a.id, "done")?;
            out.push(report?);
        }
        Ok(out)
    }

    async fn backend_of(&self, target: &str) -> Result<actuator::Backend, String> {
        let t = self
            .config
            .target(target)
            .ok_or_else(|| format!("no backend configured for {target}"))?;
        actuator::Backend::of(t).await.map_err(|e| e.to_string())
    }

    /// Sends `e` to the configured escalation targets; whether every one took it (no target:
    /// false).
    async fn notify(&self, e: &Escalation) -> bool {
        let targets = self.escalation_targets();
        if targets.is_empty() {
            tracing::warn!(incident = %e.id, "escalation: no escalation target configured: {}", e.summary);
            return false;
        }
        let results = crate::notify::escalate(
            &self.http,
            &targets,
            e,
            &crate::notify::WebhookPolicy::default(),
        )
        .await;
        results.iter().all(|r| r.is_ok())
    }

    fn escalation_targets(&self) -> Vec<crate::notify::Target> {
        let esc = &self.config.escalation;
        crate::notify::targets(
            esc.pagerduty_routing_key.as_deref(),
            esc.pagerduty_url.as_deref(),
            esc.slack_webhook.as_deref(),
        )
    }

    /// Per target, the time windows (start, end) in which healer acted on it, each widened
    /// by `limits.settle` after its end (open-ended while in flight).
    pub fn own_activity(&self) -> Result<HashMap<String, Vec<(i64, i64)>>, JournalError> {
        let settle = self.config.limits.settle().as_millis() as i64;
        let mut out: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
        for (target, start, end) in self.journal.activity()? {
            let end = end.map_or(i64::MAX, |e| e.saturating_add(settle));
            out.entry(target).or_default().push((start, end));
        }
        Ok(out)
    }

    /// Whether an anomaly of `resource` at `ts_ms` falls in one of healer's own actions.
    pub fn caused_by_healer(&self, resource: &str, ts_ms: i64) -> Result<bool, JournalError> {
        Ok(caused(&self.own_activity()?, resource, ts_ms))
    }

    /// `anomalies` without those that fall in healer's own actions, and how many those were.
    pub fn drop_own(
        &self,
        anomalies: Vec<Observation>,
    ) -> Result<(Vec<Observation>, usize), JournalError> {
        let own = self.own_activity()?;
        let before = anomalies.len();
        let kept: Vec<Observation> = anomalies
            .into_iter()
            .filter(|a| !caused(&own, &a.resource, a.ts_ms))
            .collect();
        let dropped = before - kept.len();
        Ok((kept, dropped))
    }

    /// Writes the journal's steps not exported yet to `<log>/remediations/`; returns how
    /// many rows. `saga_state` is the saga's state at export.
    pub async fn export(&self, log: &Location) -> Result<usize, String> {
        let rows = self.journal.unexported().map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Ok(0);
        }
        let batch = steps_batch(&rows).map_err(|e| e.to_string())?;
        // Named after its first step: a repeat after a crash starts at the same step and
        // overwrites the file (with any steps that ended since) instead of adding one.
        let first = rows[0].0.seq;
        let date = crate::sink::date_of(rows[0].0.started_ms);
        let relative = format!("remediations/date={date}/part-{first:012}.parquet");
        crate::sink::put(log, &relative, &batch)
            .await
            .map_err(|e| e.to_string())?;
        let seqs: Vec<i64> = rows.iter().map(|(s, _)| s.seq).collect();
        self.journal
            .mark_exported(&seqs)
            .map_err(|e| e.to_string())?;
        Ok(rows.len())
    }
}

/// Reads telemetry for `for` preconditions from metrics parquet (a file or a folder of
/// them; any layout with `ts`, `resource` and numeric metric columns, like the canonical
/// wide schema): every non-null value of `resources` as a sample.
pub async fn read_telemetry(path: &str, resources: &[String]) -> Result<Vec<Sample>, String> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMillisecondType};
    if resources.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = resources
        .iter()
        .map(|r| format!("'{}'", r.replace('\'', "''")))
        .collect();
    let sql = format!(
        "SELECT * FROM metrics WHERE resource IN ({})",
        list.join(", ")
    );
    let batches = crate::query::query_parquet(path, "metrics", &sql)
        .await
        .map_err(|e| format!("telemetry {e}"))?;
    let ts_type = DataType::Timestamp(TimeUnit::Millisecond, None);
    let mut out = Vec::new();
    for b in batches {
        let schema = b.schema();
        let (Ok(ts_i), Ok(res_i)) = (schema.index_of("ts"), schema.index_of("resource")) else {
            return Err(format!(
                "telemetry {path}: needs `ts` and `resource` columns"
            ));
        };
        let ts = arrow::compute::cast(b.column(ts_i), &ts_type).map_err(|e| e.to_string())?;
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        let res =
            arrow::compute::cast(b.column(res_i), &DataType::Utf8).map_err(|e| e.to_string())?;
        let res = res.as_string::<i32>();
        for (i, field) in schema.fields().iter().enumerate() {
            if i == ts_i || i == res_i || !field.data_type().is_numeric() {
                continue;
            }
            let values =
                arrow::compute::cast(b.column(i), &DataType::Float64).map_err(|e| e.to_string())?;
            let values = values.as_primitive::<Float64Type>();
            for row in 0..b.num_rows() {
                if values.is_null(row) || ts.is_null(row) || res.is_null(row) {
                    continue;
                }
                out.push(Sample {
                    resource: res.value(row).to_string(),
                    metric: field.name().clone(),
                    ts_ms: ts.value(row),
                    value: values.value(row),
                });
            }
        }
    }
    Ok(out)
}

fn caused(own: &HashMap<String, Vec<(i64, i64)>>, resource: &str, ts_ms: i64) -> bool {
    own.get(resource)
        .is_some_and(|w| w.iter().any(|(s, e)| *s <= ts_ms && ts_ms <= *e))
}

fn radius_name(r: Radius) -> &'static str {
    match r {
        Radius::Low => "low",
        Radius::Medium => "medium",
        Radius::High => "high",
    }
}

/// Schema of `remediations/` in the incident log: one row per saga step.
pub fn remediation_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("saga", DataType::Utf8, false),
        Field::new("incident", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("dry_run", DataType::Boolean, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("step", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("started", ts(), false),
        Field::new("ended", ts(), true),
        Field::new("duration_ms", DataType::Int64, true),
        Field::new("detail", DataType::Utf8, false),
        Field::new("saga_state", DataType::Utf8, false),
        Field::new("saga_started", ts(), true),
        Field::new("saga_ended", ts(), true),
    ]))
}

fn steps_batch(
    rows: &[(journal::StepRow, journal::Saga)],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let text = |f: &dyn Fn(&(journal::StepRow, journal::Saga)) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let ts = |f: &dyn Fn(&(journal::StepRow, journal::Saga)) -> Option<i64>| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from(rows.iter().map(f).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        text(&|(_, s)| s.id.clone()),
        text(&|(_, s)| s.incident.clone()),
        text(&|(_, s)| s.action.clone()),
        text(&|(_, s)| s.target.clone()),
        Arc::new(BooleanArray::from(
            rows.iter().map(|(_, s)| s.dry_run).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|(r, _)| r.seq).collect::<Vec<_>>(),
        )),
        text(&|(r, _)| r.step.clone()),
        text(&|(r, _)| r.status.clone()),
        ts(&|(r, _)| Some(r.started_ms)),
        ts(&|(r, _)| r.ended_ms),
        Arc::new(Int64Array::from(
            rows.iter()
                .map(|(r, _)| r.ended_ms.map(|e| e - r.started_ms))
                .collect::<Vec<_>>(),
        )),
        text(&|(r, _)| r.detail.clone()),
        text(&|(_, s)| s.state.clone()),
        ts(&|(_, s)| s.started_ms),
        ts(&|(_, s)| s.ended_ms),
    ];
    RecordBatch::try_new(remediation_schema(), columns)
}
