//! Diagnosis inside the streaming job (`healer run --topology …`): incidents are diagnosed,
//! decided and, with a remediation config, remediated while the stream runs.
//!
//! Every `--diagnose-every` the log's published anomalies are read from where the last
//! round stopped, and the correlation windows that have closed are diagnosed
//! ([`healer_operators::rca::analyse_closed`]), so the incidents are the ones `healer
//! diagnose` would find over the finished log, each handled once.
//!
//! A window may only close at a watermark whose anomalies are all in the log: the gate's
//! watermark stored in the latest completed checkpoint. Every row at or before it had been
//! released ahead of that checkpoint's barrier, and a checkpoint completes only after the
//! log files of its epoch are published, so every anomaly at or before that watermark is in
//! the log. (A row that arrives later than it is late and goes to the dead letter.)
//!
//! Each incident is handled before it is written, and a round that fails is repeated from
//! the same place: an incident in the log has been handled. A stop between the two handles
//! it again on restart, which acts at most once (a saga per incident, action and target);
//! only its escalation may be sent twice (PagerDuty deduplicates on the incident id).
//! Restarts re-read the log from its start and skip the incidents already written.
//!
//! Live diagnosis has no LLM: an incident that would need the consult (a recent change)
//! escalates, as `healer diagnose` without `--llm-model` does.

use std::collections::HashSet;

use healer_operators::decision::{Change, Policy};
use healer_operators::rca::{RcaConfig, analyse_closed};
use healer_operators::topology::Topology;

use crate::checkpoint::CheckpointStore;
use crate::diagnose::{self, Diagnosed};
use crate::remedy::Remediator;
use crate::store::Location;

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Anomalies read.
    pub anomalies: usize,
    /// Anomalies dropped as side effects of healer's own remediations.
    pub own: usize,
    /// New incidents diagnosed and written.
    pub incidents: usize,
    /// Remediation outcomes (`state: reason`), one per new incident when remediating.
    pub outcomes: Vec<String>,
}

/// The diagnosis of a running job.
#[derive(Debug)]
pub struct LiveDiagnosis {
    log: Location,
    checkpoints: CheckpointStore,
    topology: Topology,
    changes: Vec<Change>,
    rca: RcaConfig,
    policy: Policy,
    remediator: Option<Remediator>,
    from_ms: Option<i64>,
    done: HashSet<String>,
}

impl LiveDiagnosis {
    /// The diagnosis of the job writing `log` and checkpointing to `checkpoints`. Incidents
    /// already in the log are not handled again.
    pub async fn new(
        log: Location,
        checkpoints: Location,
        topology: Topology,
        changes: Vec<Change>,
        rca: RcaConfig,
        policy: Policy,
        remediator: Option<Remediator>,
    ) -> Result<Self, String> {
        let done = diagnose::logged_ids(&log).await?;
        Ok(Self {
            log,
            checkpoints: CheckpointStore::new(checkpoints),
            topology,
            changes,
            rca,
            policy,
            remediator,
            from_ms: None,
            done,
        })
    }

    /// A round while the job runs: closes the windows its published log allows.
    pub async fn round(&mut self) -> Result<Round, String> {
        let watermark = match self.checkpoints.latest().await {
            Ok(Some(c)) => c.gate.watermark(),
            Ok(None) => i64::MIN,
            Err(e) => return Err(format!("reading the latest checkpoint: {e}")),
        };
        self.close(watermark).await
    }

    /// The last round, after the job drained and took its last checkpoint.
    pub async fn finish(&mut self) -> Result<Round, String> {
        self.round().await
    }

    /// Diagnoses the windows closed at `watermark_ms`.
    async fn close(&mut self, watermark_ms: i64) -> Result<Round, String> {
        let mut round = Round::default();
        if watermark_ms == i64::MIN {
            return Ok(round);
        }
        let mut anomalies = diagnose::read_anomalies_since(&self.log, self.from_ms).await?;
        round.anomalies = anomalies.len();
        if let Some(r) = &self.remediator {
            let (kept, own) = r.drop_own(anomalies).map_err(|e| e.to_string())?;
            anomalies = kept;
            round.own = own;
        }
        let (incidents, resume) =
            analyse_closed(&self.topology, &anomalies, &self.rca, watermark_ms);
        let diagnosed = diagnose::decide_incidents(
            incidents,
            &self.topology,
            &self.changes,
            &self.policy,
            None,
            false,
        )
        .await;
        let new: Vec<Diagnosed> = diagnosed
            .into_iter()
            .filter(|d| !self.done.contains(&d.id))
            .collect();
        // Handled first, then written: an incident in the log has been handled.
        let mut handled = Vec::with_capacity(new.len());
        let mut failure = None;
        for d in new {
            if let Some(r) = &self.remediator {
                match r.handle(&d).await {
                    Ok(report) => round
                        .outcomes
                        .push(format!("{} {}: {}", report.state, d.id, report.reason)),
                    Err(e) => {
                        failure = Some(format!("handling incident {}: {e}", d.id));
                        break;
                    }
                }
            }
            handled.push(d);
        }
        if !handled.is_empty() {
            diagnose::write(&self.log, &handled).await?;
            round.incidents = handled.len();
            self.done.extend(handled.into_iter().map(|d| d.id));
        }
        if let Some(r) = &self.remediator {
            r.export(&self.log).await?;
        }
        if let Some(e) = failure {
            // Read from the same place next round: the rest is retried.
            return Err(e);
        }
        if let Some(r) = resume {
            self.from_ms = Some(r);
        }
        Ok(round)
    }
}
