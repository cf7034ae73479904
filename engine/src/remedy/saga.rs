//! The saga's state machine (see the [module docs](super)).

use serde_json::Value;

use super::actuator::{ActError, Backend, Call};
use super::config::{ActionSpec, Precondition};
use super::journal::{Admission, JournalError, Saga, StepRow, state};
use super::{Remediator, now_ms};
use crate::notify::Escalation;

/// What became of a remediation.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Saga id (empty when no saga was made).
    pub saga: String,
    /// Incident id.
    pub incident: String,
    /// Action id.
    pub action: String,
    /// Target.
    pub target: String,
    /// Final or current state.
    pub state: String,
    /// Why.
    pub reason: String,
    /// The steps, as `step status (ms): detail` lines.
    pub steps: Vec<String>,
    /// Time from admission to the end, when it ended.
    pub duration_ms: Option<i64>,
}

impl Report {
    pub(super) fn of(saga: &Saga, steps: &[StepRow]) -> Self {
        Self {
            saga: saga.id.clone(),
            incident: saga.incident.clone(),
            action: saga.action.clone(),
            target: saga.target.clone(),
            state: saga.state.clone(),
            reason: saga.reason.clone(),
            steps: steps
                .iter()
                .map(|s| {
                    format!(
                        "{} {} ({} ms): {}",
                        s.step,
                        s.status,
                        s.ended_ms.map_or(0, |e| e - s.started_ms),
                        s.detail
                    )
                })
                .collect(),
            duration_ms: match (saga.started_ms.or(Some(saga.created_ms)), saga.ended_ms) {
                (Some(s), Some(e)) => Some(e - s),
                _ => None,
            },
        }
    }

    pub(super) fn escalation(incident: &str, reason: &str, delivered: bool) -> Self {
        Self {
            saga: String::new(),
            incident: incident.to_string(),
            action: String::new(),
            target: String::new(),
            state: state::ESCALATED.into(),
            reason: reason.to_string(),
            steps: vec![format!(
                "escalate {}: {reason}",
                if delivered { "ok" } else { "failed" }
            )],
            duration_ms: None,
        }
    }
}

/// Crash injection for tests of recovery: `HEALER_FAILPOINT=<step>:<before|after>` aborts
/// the process there (before: the step is journaled as started, nothing done; after: done,
/// not journaled as done).
fn failpoint(name: &str) {
    if std::env::var("HEALER_FAILPOINT").is_ok_and(|f| f == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

enum Next {
    Go(&'static str),
    End(&'static str, String),
}

impl Remediator {
    pub(super) async fn after_admission(
        &self,
        id: &str,
        admission: Admission,
        backend: &Backend,
    ) -> Result<Report, JournalError> {
        match admission {
            Admission::Act(token) => self.run(id, token, backend).await,
            Admission::DryRun => {
                self.plan(id, backend).await?;
                self.report(id)
            }
            Admission::Exists(_) => self.report(id),
            Admission::Refused(_) | Admission::Escalate(_) => {
                // Admission recorded the escalation as pending: send it.
                self.flush_escalations(Some(id)).await?;
                self.report(id)
            }
        }
    }

    fn spec_of(&self, saga: &Saga) -> Option<&ActionSpec> {
        self.library.get(&saga.action)
    }

    /// Dry run: the steps that would run, with live read-only checks; nothing touched.
    async fn plan(&self, id: &str, backend: &Backend) -> Result<(), JournalError> {
        let saga = self.journal.saga(id)?.expect("admitted sagas exist");
        let Some(spec) = self.spec_of(&saga) else {
            return Ok(());
        };
        let call = Call::of(spec, &saga);
        let pre = self
            .preconditions(spec, &saga.target, saga.as_of_ms, backend)
            .await;
        let (status, detail) = match &pre {
            Ok(d) => ("planned", d.clone()),
            Err(e) => ("failed", e.clone()),
        };
        self.journal
            .step(id, "preconditions", status, &detail, now_ms())?;
        let snap = backend.snapshot(&call).await;
        self.journal.step(
            id,
            "snapshot",
            if snap.is_ok() { "planned" } else { "failed" },
            &match &snap {
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            },
            now_ms(),
        )?;
        self.journal.step(
            id,
            "execute",
            "planned",
            &format!(
                "would {} {} on the {} backend ({}; timeout {:?})",
                spec.operation.as_str(),
                saga.target,
                backend.kind(),
                spec.description,
                spec.timeout()
            ),
            now_ms(),
        )?;
        self.journal.step(
            id,
            "verify",
            "planned",
            &format!(
                "{} attempt(s), {} apart",
                spec.verify_attempts, spec.verify_interval
            ),
            now_ms(),
        )?;
        Ok(())
    }

    /// Checks `spec`'s preconditions on `target`: a line of what held, or what did not.
    async fn preconditions(
        &self,
        spec: &ActionSpec,
        target: &str,
        as_of_ms: i64,
        backend: &Backend,
    ) -> Result<String, String> {
        let mut held = Vec::new();
        for p in &spec.preconditions {
            match self.precondition(p, target, as_of_ms, backend).await {
                Ok(line) => held.push(line),
                Err(e) => return Err(format!("{} does not hold: {e}", p.describe())),
            }
        }
        Ok(if held.is_empty() {
            "none".into()
        } else {
            held.join("; ")
        })
    }

    async fn precondition(
        &self,
        p: &Precondition,
        target: &str,
        as_of_ms: i64,
        backend: &Backend,
    ) -> Result<String, String> {
        if let Some(check) = &p.check {
            return match backend.check(check).await {
                Ok(true) => Ok(format!("{check}: yes")),
                Ok(false) => Err(format!("{check}: no")),
                Err(e) => Err(e.to_string()),
            };
        }
        let (Some(metric), Some(op), Some(threshold)) = (&p.metric, p.op, p.threshold) else {
            return Err("incomplete".into());
        };
        let hold = p.hold();
        // A metric the backend does not read live is taken from telemetry alone.
        let live = match backend.probe(metric).await {
            Ok(v) => Some(v),
            Err(ActError::Unknown(_)) if !hold.is_zero() => None,
            Err(e) => return Err(e.to_string()),
        };
        if let Some(live) = live
            && !op.holds(live, threshold)
        {
            return Err(format!("{metric} is {live}"));
        }
        let now = live.map_or(String::new(), |v| format!("{metric} = {v}"));
        if hold.is_zero() {
            return Ok(now);
        }
        held_for(
            &self.telemetry,
            target,
            metric,
            hold.as_millis() as i64,
            as_of_ms,
            |v| op.holds(v, threshold),
        )
        .map(|n| {
            format!(
                "{now}{}held in all {n} samples of the {} before the decision",
                if now.is_empty() { "" } else { ", " },
                p.for_.as_deref().unwrap_or("")
            )
        })
    }

    /// Ends saga `id` in `state` (or records why again, for one already ended) and escalates,
    /// the escalation journaled as pending first so a crash cannot lose it.
    pub(super) async fn end(&self, id: &str, state: &str, why: &str) -> Result<(), JournalError> {
        let seq = self.journal.end_escalating(id, state, why, now_ms())?;
        self.send_escalation(seq, id, why).await
    }

    /// Sends the pending escalations of `saga`, or, with `None`, those a stopped process left
    /// (recorded over a minute ago).
    pub(super) async fn flush_escalations(&self, saga: Option<&str>) -> Result<(), JournalError> {
        for (seq, id, why) in self.journal.pending_escalations(saga, now_ms() - 60_000)? {
            self.send_escalation(seq, &id, &why).await?;
        }
        Ok(())
    }

    /// Escalates `saga`, which is in its final state already.
    pub(super) async fn escalate(&self, saga: &Saga, why: &str) -> Result<(), JournalError> {
        self.end(&saga.id, &saga.state, why).await
    }

    /// Sends the pending escalation `seq` of saga `id`, with what was tried; journals the
    /// outcome.
    pub(super) async fn send_escalation(
        &self,
        seq: i64,
        id: &str,
        why: &str,
    ) -> Result<(), JournalError> {
        let Some(saga) = self.journal.saga(id)? else {
            return Ok(());
        };
        let mut e: Escalation =
            serde_json::from_str(&saga.context).unwrap_or_else(|_| Escalation {
                id: saga.incident.clone(),
                summary: format!("{} on {}", saga.action, saga.target),
                resource: saga.target.clone(),
                root_cause: None,
                evidence: Vec::new(),
                reasons: Vec::new(),
                tried: Vec::new(),
                affected: vec![saga.target.clone()],
                start_ms: saga.created_ms,
            });
        e.summary = format!("{} {} on {}: {why}", saga.action, saga.state, saga.target);
        e.reasons.push(why.to_string());
        for s in self.journal.steps(&saga.id)? {
            if s.seq != seq {
                e.tried
                    .push(format!("{} {}: {}", s.step, s.status, s.detail));
            }
        }
        let delivered = self.notify(&e).await;
        self.journal
            .step_end(seq, if delivered { "ok" } else { "failed" }, why, now_ms())
    }

    /// Runs `step` while renewing the lock every third of its time to live; `None` when the
    /// lock is lost (the step is then stopped where it is).
    async fn guarded<T>(
        &self,
        id: &str,
        target: &str,
        token: i64,
        step: impl std::future::Future<Output = T>,
    ) -> Result<Option<T>, JournalError> {
        let ttl = self.config.limits.lock_ttl();
        let renew = async {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match self.journal.fence(id, target, token, ttl, now_ms()) {
                    Ok(true) => continue,
                    Ok(false) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        };
        tokio::select! {
            out = step => Ok(Some(out)),
            lost = renew => lost.map(|()| None),
        }
    }

    /// Runs saga `id` from the state the journal holds, with lock `token`.
    pub(super) async fn run(
        &self,
        id: &str,
        token: i64,
        backend: &Backend,
    ) -> Result<Report, JournalError> {
        let ttl = self.config.limits.lock_ttl();
        loop {
            let saga = self.journal.saga(id)?.expect("admitted sagas exist");
            if !state::IN_FLIGHT.contains(&saga.state.as_str()) {
                self.journal.release(id, &saga.target, token)?;
                return self.report(id);
            }
            let Some(spec) = self.spec_of(&saga) else {
                let why = format!("action `{}` is no longer in the library", saga.action);
                self.end(id, state::FAILED, &why).await?;
                continue;
            };
            let lost = || {
                format!(
                    "lost the lock on {} (token {token}) in {}: another remediation may act on it; its state is unknown",
                    saga.target, saga.state
                )
            };
            if !self.journal.fence(id, &saga.target, token, ttl, now_ms())? {
                self.end(id, state::FAILED, &lost()).await?;
                return self.report(id);
            }
            let call = Call::of(spec, &saga);
            let interrupted = self.interrupted(id, &saga.state)?;
            let step = async {
                match saga.state.as_str() {
                    state::PLANNED => Ok(Next::Go(state::PRECONDITIONS)),
                    state::PRECONDITIONS => self.step_preconditions(&saga, spec, backend).await,
                    state::SNAPSHOT => self.step_snapshot(&saga, &call, backend).await,
                    state::EXECUTE => self.step_execute(&saga, &call, backend, interrupted).await,
                    state::VERIFY => self.step_verify(&saga, &call, backend).await,
                    state::COMPENSATE => self.step_compensate(&saga, &call, backend).await,
                    _ => unreachable!("in-flight states are handled"),
                }
            };
            let next = match self.guarded(id, &saga.target, token, step).await? {
                Some(next) => next?,
                None => {
                    self.end(id, state::FAILED, &lost()).await?;
                    return self.report(id);
                }
            };
            match next {
                Next::Go(s) => self.journal.set_state(id, s, "", now_ms())?,
                Next::End(s, why) if s == state::SUCCEEDED => {
                    self.journal.set_state(id, s, &why, now_ms())?
                }
                Next::End(s, why) => self.end(id, s, &why).await?,
            }
        }
    }

    /// Whether `state`'s step was started and never ended (a crash); marks it interrupted.
    fn interrupted(&self, id: &str, step: &str) -> Result<bool, JournalError> {
        let open: Vec<StepRow> = self
            .journal
            .steps(id)?
            .into_iter()
            .filter(|s| s.step == step && s.status == "started")
            .collect();
        for s in &open {
            self.journal.step_end(
                s.seq,
                "interrupted",
                "the process stopped in this step",
                now_ms(),
            )?;
        }
        Ok(!open.is_empty())
    }

    async fn step_preconditions(
        &self,
        saga: &Saga,
        spec: &ActionSpec,
        backend: &Backend,
    ) -> Result<Next, JournalError> {
        let seq = self
            .journal
            .step_start(&saga.id, "preconditions", now_ms())?;
        failpoint("preconditions:before");
        let r = self
            .preconditions(spec, &saga.target, saga.as_of_ms, backend)
            .await;
        failpoint("preconditions:after");
        Ok(match r {
            Ok(d) => {
                self.journal.step_end(seq, "ok", &d, now_ms())?;
                Next::Go(state::SNAPSHOT)
            }
            Err(e) => {
                self.journal.step_end(seq, "failed", &e, now_ms())?;
                Next::End(
                    state::ESCALATED,
                    format!("precondition failed, nothing touched: {e}"),
                )
            }
        })
    }

    async fn step_snapshot(
        &self,
        saga: &Saga,
        call: &Call<'_>,
        backend: &Backend,
    ) -> Result<Next, JournalError> {
        let seq = self.journal.step_start(&saga.id, "snapshot", now_ms())?;
        failpoint("snapshot:before");
        let r = backend.snapshot(call).await;
        failpoint("snapshot:after");
        Ok(match r {
            Ok(v) => {
                let text = v.to_string();
                self.journal.set_snapshot(&saga.id, &text)?;
                self.journal.step_end(seq, "ok", &text, now_ms())?;
                Next::Go(state::EXECUTE)
            }
            Err(e) => {
                self.journal
                    .step_end(seq, "failed", &e.to_string(), now_ms())?;
                Next::End(
                    state::ESCALATED,
                    format!("snapshot failed, nothing touched: {e}"),
                )
            }
        })
    }

    async fn step_execute(
        &self,
        saga: &Saga,
        call: &Call<'_>,
        backend: &Backend,
        interrupted: bool,
    ) -> Result<Next, JournalError> {
        let snap = snapshot_of(saga);
        // An execute that was started before (interrupted, or ended without its state change
        // reaching the journal) may have taken effect. An idempotent one is run again: it
        // lands in the same place. Any other is looked at first.
        let attempted = interrupted
            || self
                .journal
                .steps(&saga.id)?
                .iter()
                .any(|s| s.step == "execute");
        if attempted && !backend.idempotent(call.spec.operation) {
            let seq = self.journal.step_start(&saga.id, "verify", now_ms())?;
            match backend.verify(call, &snap).await {
                Ok(d) => {
                    self.journal.step_end(
                        seq,
                        "ok",
                        &format!("after an interrupted execute: {d}"),
                        now_ms(),
                    )?;
                    return Ok(Next::End(
                        state::SUCCEEDED,
                        "recovered: the interrupted execute had taken effect".into(),
                    ));
                }
                Err(e) => {
                    self.journal
                        .step_end(seq, "failed", &e.to_string(), now_ms())?;
                    return Ok(Next::Go(state::COMPENSATE));
                }
            }
        }
        let seq = self.journal.step_start(&saga.id, "execute", now_ms())?;
        failpoint("execute:before");
        let timeout = call.spec.timeout();
        let r = tokio::time::timeout(timeout, backend.execute(call, &snap)).await;
        failpoint("execute:after");
        Ok(match r {
            Ok(Ok(d)) => {
                self.journal.step_end(seq, "ok", &d, now_ms())?;
                Next::Go(state::VERIFY)
            }
            Ok(Err(ActError::Ceiling(e))) => {
                self.journal
                    .step_end(seq, "failed", &format!("ceiling: {e}"), now_ms())?;
                Next::End(
                    state::ESCALATED,
                    format!("ceiling reached, nothing touched: {e}"),
                )
            }
            Ok(Err(e)) => {
                self.journal
                    .step_end(seq, "failed", &e.to_string(), now_ms())?;
                Next::Go(state::COMPENSATE)
            }
            Err(_) => {
                self.journal.step_end(
                    seq,
                    "failed",
                    &format!("timed out after {timeout:?}"),
                    now_ms(),
                )?;
                Next::Go(state::COMPENSATE)
            }
        })
    }

    async fn step_verify(
        &self,
        saga: &Saga,
        call: &Call<'_>,
        backend: &Backend,
    ) -> Result<Next, JournalError> {
        let snap = snapshot_of(saga);
        let attempts = call.spec.verify_attempts.max(1);
        for attempt in 1..=attempts {
            let seq = self.journal.step_start(&saga.id, "verify", now_ms())?;
            failpoint("verify:before");
            let r = backend.verify(call, &snap).await;
            failpoint("verify:after");
            match r {
                Ok(d) => {
                    self.journal.step_end(
                        seq,
                        "ok",
                        &format!("attempt {attempt}/{attempts}: {d}"),
                        now_ms(),
                    )?;
                    return Ok(Next::End(state::SUCCEEDED, "verified".into()));
                }
                Err(e) => {
                    self.journal.step_end(
                        seq,
                        "failed",
                        &format!("attempt {attempt}/{attempts}: {e}"),
                        now_ms(),
                    )?;
                    if attempt < attempts {
                        tokio::time::sleep(call.spec.verify_every()).await;
                    }
                }
            }
        }
        Ok(Next::Go(state::COMPENSATE))
    }

    async fn step_compensate(
        &self,
        saga: &Saga,
        call: &Call<'_>,
        backend: &Backend,
    ) -> Result<Next, JournalError> {
        let snap = snapshot_of(saga);
        // A rollback left to a human is still run at once when the backend says undoing is
        // safe (a failover that never promoted: the old primary takes writes again).
        if call.spec.rollback_needs_approval
            && !backend.safe_to_undo(call, &snap).await.unwrap_or(false)
        {
            let approval = self.journal.request_rollback(
                &saga.id,
                &format!(
                    "{} on {} failed; its rollback is manual",
                    saga.action, saga.target
                ),
                now_ms(),
                self.config.limits.approval_ttl(),
            )?;
            self.journal.step(
                &saga.id,
                "compensate",
                "skipped",
                &format!("rollback needs approval: request {approval}"),
                now_ms(),
            )?;
            return Ok(Next::End(
                state::FAILED,
                format!("failed; rollback needs approval (request {approval})"),
            ));
        }
        let seq = self.journal.step_start(&saga.id, "compensate", now_ms())?;
        failpoint("compensate:before");
        let r = tokio::time::timeout(call.spec.timeout(), backend.rollback(call, &snap)).await;
        failpoint("compensate:after");
        Ok(match r {
            Ok(Ok(d)) => {
                self.journal.step_end(seq, "ok", &d, now_ms())?;
                Next::End(
                    state::ROLLED_BACK,
                    format!("{} failed and was rolled back", saga.action),
                )
            }
            Ok(Err(e)) => {
                self.journal
                    .step_end(seq, "failed", &e.to_string(), now_ms())?;
                Next::End(
                    state::FAILED,
                    format!("{} failed and its rollback failed: {e}", saga.action),
                )
            }
            Err(_) => {
                self.journal
                    .step_end(seq, "failed", "timed out", now_ms())?;
                Next::End(
                    state::FAILED,
                    format!("{} failed and its rollback timed out", saga.action),
                )
            }
        })
    }

    /// Runs the approved manual rollback of `saga`, which ended `failed`.
    pub(super) async fn manual_rollback(
        &self,
        saga: &Saga,
        backend: &Backend,
        by: &str,
    ) -> Result<Report, JournalError> {
        let Some(spec) = self.spec_of(saga) else {
            return self.report(&saga.id);
        };
        let call = Call::of(spec, saga);
        let seq = self
            .journal
            .step_start(&saga.id, "manual_rollback", now_ms())?;
        match backend.rollback(&call, &snapshot_of(saga)).await {
            Ok(d) => {
                self.journal
                    .step_end(seq, "ok", &format!("approved by {by}: {d}"), now_ms())?;
                self.journal.set_state(
                    &saga.id,
                    state::ROLLED_BACK,
                    &format!("rolled back by hand, approved by {by}"),
                    now_ms(),
                )?;
            }
            Err(e) => {
                self.journal
                    .step_end(seq, "failed", &e.to_string(), now_ms())?;
                self.escalate(saga, &format!("approved rollback failed: {e}"))
                    .await?;
            }
        }
        self.report(&saga.id)
    }
}

fn snapshot_of(saga: &Saga) -> Value {
    saga.snapshot
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null)
}

/// Whether every telemetry sample of (`resource`, `metric`) in the last `hold_ms` before
/// `now_ms` satisfies `ok`, and the samples span the period: how many there were, or why
/// not.
pub(super) fn held_for(
    samples: &[super::Sample],
    resource: &str,
    metric: &str,
    hold_ms: i64,
    now_ms: i64,
    ok: impl Fn(f64) -> bool,
) -> Result<usize, String> {
    let from = now_ms - hold_ms;
    let mut window: Vec<&super::Sample> = samples
        .iter()
        .filter(|s| s.resource == resource && s.metric == metric && s.ts_ms <= now_ms)
        .collect();
    window.sort_by_key(|s| s.ts_ms);
    // The sample at or before the start tells the state at the start.
    let start = window.iter().rposition(|s| s.ts_ms <= from);
    let Some(start) = start else {
        return Err(format!(
            "telemetry of {metric} does not reach back {} s",
            hold_ms / 1000
        ));
    };
    let span = &window[start..];
    if span.len() < 2 {
        return Err(format!(
            "no telemetry of {metric} in the {} s before the decision",
            hold_ms / 1000
        ));
    }
    match span.iter().find(|s| !ok(s.value)) {
        Some(bad) => Err(format!("{metric} was {} at {}", bad.value, bad.ts_ms)),
        None => Ok(span.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remedy::Sample;

    fn s(ts: i64, v: f64) -> Sample {
        Sample {
            resource: "a".into(),
            metric: "m".into(),
            ts_ms: ts,
            value: v,
        }
    }

    #[test]
    fn held_for_needs_the_whole_period() {
        let samples = vec![
            s(0, 90.0),
            s(60_000, 91.0),
            s(120_000, 95.0),
            s(180_000, 99.0),
        ];
        assert_eq!(
            held_for(&samples, "a", "m", 120_000, 180_000, |v| v > 85.0),
            Ok(3)
        );
        // one sample below inside the window
        let mut dip = samples.clone();
        dip[2].value = 80.0;
        assert!(held_for(&dip, "a", "m", 120_000, 180_000, |v| v > 85.0).is_err());
        // a dip before the window does not count
        let mut early = samples.clone();
        early[0].value = 10.0;
        assert_eq!(
            held_for(&early, "a", "m", 120_000, 180_000, |v| v > 85.0),
            Ok(3)
        );
        // telemetry that does not reach back far enough, or stopped before the end
        assert!(held_for(&samples, "a", "m", 600_000, 180_000, |v| v > 85.0).is_err());
        assert!(held_for(&samples, "a", "m", 60_000, 900_000, |v| v > 85.0).is_err());
        assert!(held_for(&samples, "b", "m", 60_000, 180_000, |_| true).is_err());
    }
}
