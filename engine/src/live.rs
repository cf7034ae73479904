//! Diagnosis inside the streaming job (`healer run --topology …`): incidents are diagnosed,
//! decided and, with a remediation config, remediated while the stream runs.
//!
//! Every `--diagnose-every` the log's published anomalies are read from where the last
//! round stopped, and the correlation windows that have closed are diagnosed
//! ([`healer_operators::rca::analyse_closed`]), so the incidents are the ones `healer
//! diagnose` would find over the finished log, each handled once.
//!
//! A window may only close at a watermark whose anomalies are all in the log. The job
//! publishes log files at checkpoints, so a job watermark sampled while checkpoint `e` was
//! the latest is trusted once checkpoint `e + 2` completed: checkpoints run one at a time,
//! so the barrier of `e + 2` entered the stream after that sample, behind every row the
//! sampled watermark had released. At the end of the job, after its last checkpoint, the
//! final watermark is used.
//!
//! Restarts re-read the log from its start and skip the incidents already written.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use healer_operators::decision::{Change, Policy};
use healer_operators::rca::{RcaConfig, analyse_closed};
use healer_operators::topology::Topology;

use crate::checkpoint::CheckpointStore;
use crate::diagnose::{self, Diagnosed};
use crate::llm::BedrockConsultant;
use crate::metrics::PipelineMetrics;
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
    llm: Option<BedrockConsultant>,
    remediator: Option<Remediator>,
    metrics: Arc<PipelineMetrics>,
    from_ms: Option<i64>,
    done: HashSet<String>,
    samples: VecDeque<(u64, i64)>,
}

impl LiveDiagnosis {
    /// The diagnosis of the job writing `log` and checkpointing to `checkpoints`, whose
    /// watermark `metrics` reports. Incidents already in the log are not handled again.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        log: Location,
        checkpoints: Location,
        topology: Topology,
        changes: Vec<Change>,
        rca: RcaConfig,
        policy: Policy,
        llm: Option<BedrockConsultant>,
        remediator: Option<Remediator>,
        metrics: Arc<PipelineMetrics>,
    ) -> Result<Self, String> {
        let mut done = HashSet::new();
        if let Ok(batches) = crate::query::query(&log, "SELECT id FROM incidents").await {
            for b in batches {
                let ids = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)
                    .map_err(|e| e.to_string())?;
                let ids = arrow::array::AsArray::as_string::<i32>(&ids);
                done.extend(ids.iter().flatten().map(String::from));
            }
        }
        Ok(Self {
            log,
            checkpoints: CheckpointStore::new(checkpoints),
            topology,
            changes,
            rca,
            policy,
            llm,
            remediator,
            metrics,
            from_ms: None,
            done,
            samples: VecDeque::new(),
        })
    }

    /// A round while the job runs: closes the windows its published log allows.
    pub async fn round(&mut self) -> Result<Round, String> {
        let epoch = match self.checkpoints.latest().await {
            Ok(Some(c)) => c.epoch,
            Ok(None) => 0,
            Err(e) => return Err(format!("reading the latest checkpoint: {e}")),
        };
        let now = self.metrics.snapshot().watermark;
        // The latest sample of each epoch: any taken while `epoch` was the latest is trusted
        // once `epoch + 2` completes.
        match self.samples.back_mut() {
            Some((e, w)) if *e == epoch => *w = (*w).max(now),
            _ => self.samples.push_back((epoch, now)),
        }
        let mut safe = i64::MIN;
        while let Some((e, w)) = self.samples.front().copied() {
            if e + 2 > epoch {
                break;
            }
            safe = safe.max(w);
            self.samples.pop_front();
        }
        // Keep the newest trusted sample for the next round.
        if safe > i64::MIN {
            self.samples.push_front((0, safe));
        }
        self.close(safe).await
    }

    /// The last round, after the job stopped: its final watermark.
    pub async fn finish(&mut self) -> Result<Round, String> {
        let w = self.metrics.snapshot().watermark;
        self.close(w).await
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
            let mut kept = Vec::with_capacity(anomalies.len());
            for a in anomalies {
                if r.caused_by_healer(&a.resource, a.ts_ms)
                    .map_err(|e| e.to_string())?
                {
                    round.own += 1;
                } else {
                    kept.push(a);
                }
            }
            anomalies = kept;
        }
        let (incidents, resume) =
            analyse_closed(&self.topology, &anomalies, &self.rca, watermark_ms);
        if let Some(r) = resume {
            self.from_ms = Some(r);
        }
        let diagnosed = diagnose::decide_incidents(
            incidents,
            &self.topology,
            &self.changes,
            &self.policy,
            self.llm.as_ref(),
            false,
        )
        .await;
        let new: Vec<Diagnosed> = diagnosed
            .into_iter()
            .filter(|d| !self.done.contains(&d.id))
            .collect();
        if new.is_empty() {
            return Ok(round);
        }
        diagnose::write(&self.log, &new).await?;
        round.incidents = new.len();
        if let Some(r) = &self.remediator {
            for d in &new {
                let report = r.handle(d).await.map_err(|e| e.to_string())?;
                round
                    .outcomes
                    .push(format!("{} {}: {}", report.state, d.id, report.reason));
            }
            r.export(&self.log).await?;
        }
        self.done.extend(new.into_iter().map(|d| d.id));
        Ok(round)
    }
}
