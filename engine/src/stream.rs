//! The streaming job (`healer run`): a Kinesis stream through the same pipeline as a replay,
//! with checkpoints, until it is told to stop.
//!
//! ```text
//!  KinesisSource ──► gate + router ──► workers ──► merge ──► IncidentLog (per flush / barrier)
//!   shard readers │       │                                         │
//!                 │       └──► DeadLetter (late rows)                │
//!                 └──► DeadLetter (undecodable records)              │
//!   every stage ──── checkpoint parts at each barrier ──► Coordinator ──► checkpoints/
//! ```
//! The rules, gate, workers, merge and sinks are the replay job's ([`crate::job`]); the gate
//! takes its watermarks from the source (the minimum over shards). See
//! [`crate::checkpoint`] for what a checkpoint holds and how a restart resumes from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::checkpoint::{
    Ack, CheckpointStore, CommitTarget, Coordinator, Restore, StoreTarget, discard_after,
};
use crate::config::PipelineConfig;
use crate::job::{
    JobError, Pipeline, SinkOptions, Streaming, Summary, compile_rules, first_error,
    run_dead_letter, validated,
};
use crate::kinesis::reader::ReaderCounters;
use crate::kinesis::source::{KinesisSource, SourceOutputs};
use crate::message::Message;
use crate::metrics::PipelineMetrics;
use crate::store::Location;

/// Log folders whose files carry the epoch they were written in.
pub const EPOCH_FOLDERS: [&str; 3] = ["anomalies", "dead_letter", "dead_letter_records"];

/// What a streaming run did.
#[derive(Debug)]
pub struct StreamSummary {
    /// As for a replay.
    pub summary: Summary,
    /// The checkpoint the run started from.
    pub restored_epoch: Option<u64>,
    /// The last checkpoint completed (0: none).
    pub last_checkpoint: u64,
    /// Files of a crashed run deleted at the start (written after its last checkpoint).
    pub discarded_files: usize,
}

/// A prepared streaming job.
#[derive(Debug)]
pub struct StreamJob {
    source: KinesisSource,
    pipeline: Pipeline,
    target: Arc<dyn CommitTarget>,
    restore: Vec<Restore>,
    restored_epoch: Option<u64>,
    open_epoch: u64,
    discarded: usize,
    config: PipelineConfig,
}

impl StreamJob {
    /// Validates the configuration, restores the latest checkpoint (discarding log files
    /// written after it), connects to the stream and compiles the rules.
    pub async fn prepare(config: &PipelineConfig) -> Result<Self, JobError> {
        validated(config)?;
        if config.source.kind != "kinesis" {
            return Err(JobError::Config(format!(
                "`healer run` reads a stream: set source.kind = \"kinesis\" (it is `{}`; use \
                 `healer replay` for files)",
                config.source.kind
            )));
        }
        let out = Location::parse(&config.sink.out, &config.sink.s3, true)?;
        let checkpoints = config.checkpoint_location();
        let store = CheckpointStore::new(Location::parse(&checkpoints, &config.sink.s3, true)?);
        let restore = store.latest().await?;
        if let Some(c) = &restore
            && c.source.stream != config.source.kinesis.stream
        {
            return Err(JobError::Config(format!(
                "the checkpoint in {checkpoints} is of stream `{}`, not `{}`",
                c.source.stream, config.source.kinesis.stream
            )));
        }
        // Files of epochs after the checkpoint (or of any epoch, without one: a run that
        // died before its first checkpoint) hold rows this run writes again.
        let epoch = restore.as_ref().map_or(0, |c| c.epoch);
        let discarded = discard_after(&out, &EPOCH_FOLDERS, epoch).await?;
        if restore.is_some() || discarded > 0 {
            tracing::info!(
                epoch,
                discarded,
                "restoring from checkpoint; files written after it were removed"
            );
        }
        let source = KinesisSource::new(config, restore.as_ref().map(|c| &c.source)).await;
        let schema = Arc::clone(source.schema());
        let rules = compile_rules(config, Arc::clone(&schema))?;
        let restored_epoch = restore.as_ref().map(|c| c.epoch);
        Ok(Self {
            source,
            pipeline: Pipeline::new(config, schema, rules, out),
            target: Arc::new(StoreTarget {
                store,
                retain: config.checkpoint.retain,
            }),
            restore: restore
                .into_iter()
                .map(|checkpoint| Restore {
                    checkpoint,
                    keys: None,
                })
                .collect(),
            restored_epoch,
            open_epoch: restored_epoch.map_or(1, |e| e + 1),
            discarded,
            config: config.clone(),
        })
    }

    /// A job of one worker of a scaled-out stream: `source` reads the shards it leases,
    /// the pipeline starts from `restore` (the saved state of those shards' resources),
    /// writes its log under `out` and commits checkpoints to `target`. The rules must
    /// partition by resource (checked when the worker starts, before it takes leases).
    pub(crate) fn leased(
        config: &PipelineConfig,
        source: KinesisSource,
        restore: Vec<Restore>,
        out: Location,
        target: Arc<dyn CommitTarget>,
    ) -> Result<Self, JobError> {
        let schema = Arc::clone(source.schema());
        let rules = compile_rules(config, Arc::clone(&schema))?;
        let pipeline = Pipeline::new(config, schema, rules, out);
        Ok(Self {
            source,
            pipeline,
            target,
            restore,
            restored_epoch: None,
            open_epoch: 1,
            discarded: 0,
            config: config.clone(),
        })
    }

    /// Live counters.
    pub fn metrics(&self) -> Arc<PipelineMetrics> {
        Arc::clone(&self.pipeline.metrics)
    }

    /// Counters of the shard readers (calls, throttling, errors).
    pub fn reader_counters(&self) -> Arc<ReaderCounters> {
        self.source.counters()
    }

    /// Runs until `shutdown` turns true, then drains, checkpoints and returns.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<StreamSummary, JobError> {
        let started = Instant::now();
        let capacity = self.config.engine.channel_capacity.max(1);
        let partitions = self.pipeline.partitions;
        let restored_epoch = self.restored_epoch;
        let open_epoch = self.open_epoch;
        let flush_interval = PipelineConfig::duration(&self.config.sink.flush_interval);
        let checkpoint_every = PipelineConfig::duration(&self.config.checkpoint.interval);

        let (acks_tx, acks_rx) = mpsc::channel::<Ack>(4 * (partitions + 4));
        let (completed_tx, completed_rx) = watch::channel(restored_epoch.unwrap_or(0));
        // Parts: the source's, the gate's, one per worker; commits: anomalies, dead letters
        // of the gate, dead letters of the decoder.
        let coordinator = Coordinator::new(self.target, partitions, 3);
        let coordinator = tokio::spawn(coordinator.run(acks_rx, completed_tx));

        let (data_tx, data_rx) = mpsc::channel::<Message>(capacity);
        let (rejected_tx, rejected_rx) = mpsc::channel::<Message>(capacity);
        let sink_options = SinkOptions {
            out: self.pipeline.out.clone(),
            max_rows: self.config.sink.max_rows_per_file,
            streaming: Some((open_epoch, flush_interval, acks_tx.clone())),
        };
        let records_dead = tokio::spawn(run_dead_letter(
            rejected_rx,
            "dead_letter_records",
            sink_options,
        ));
        let metrics = self.pipeline.metrics.clone();
        let outputs = SourceOutputs {
            data: data_tx,
            rejected: rejected_tx,
            acks: acks_tx.clone(),
        };
        let source = self.source;
        let m = Arc::clone(&metrics);
        let source_task = tokio::spawn(async move {
            source
                .run(outputs, open_epoch, checkpoint_every, m, shutdown)
                .await
                .map_err(JobError::from)
        });
        let streaming = Streaming {
            acks: acks_tx,
            restore: self.restore,
            open_epoch,
            flush_interval,
        };
        let output = self.pipeline.run(data_rx, Some(streaming)).await;
        let source = source_task
            .await
            .map_err(|e| JobError::Panic(e.to_string()))?;
        let records_dead = records_dead
            .await
            .map_err(|e| JobError::Panic(e.to_string()))?;
        // Every sender of checkpoint parts is gone now: the coordinator finishes the last
        // epoch (the shutdown barrier's) and stops. Its error, if any, is the cause of the
        // others (stages stop when it no longer takes their parts), so it is reported first.
        let coordinated = tokio::time::timeout(Duration::from_secs(60), coordinator).await;
        match coordinated {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e.into()),
            Ok(Err(e)) => return Err(JobError::Panic(e.to_string())),
            Err(_) => return Err(JobError::Closed("checkpoints")),
        }
        let mut output = first_error(output, source)?;
        output.dead_letter_files.extend(records_dead?);
        let last_checkpoint = *completed_rx.borrow();
        Ok(StreamSummary {
            summary: output.into_summary(started, 0),
            restored_epoch,
            last_checkpoint,
            discarded_files: self.discarded,
        })
    }
}
