//! `KinesisSource`: every shard of a stream, in parent-before-child order, as one stream of
//! micro-batches with watermarks and checkpoint barriers.
//!
//! # Shards
//! The shard list (`ListShards`, paginated) is read at start, every `list_shards_interval`,
//! and whenever a shard ends. A shard is read once all of its parents have been read to
//! their end, so the records of one partition key stay in order across splits and merges.
//! A shard starts after its checkpointed sequence number; without one, a child of a shard
//! this job read starts at its trim horizon, any other shard at the configured start.
//!
//! # Watermarks
//! Each shard's records are in write order, and rows may be out of event-time order by at
//! most the configured bound. The watermark is therefore the minimum over the shards being
//! read of `(largest ts read − bound)`: a shard that is behind holds it back, so rows are
//! not called late because another shard was read faster. A shard that has been read to
//! its tip and returns nothing is *idle* and does not hold the watermark back (otherwise one
//! quiet shard would stop the job) once it has been so for `idle_timeout`; when every shard
//! is idle the watermark follows the largest ts read. A shard not read at all yet holds it
//! back until its first answer, and a child shard waiting for its parents holds it at its
//! parents' position, so the rows a reshard moves to new shards are never called late.
//!
//! # Checkpoints
//! At every checkpoint interval the source sends what it has, then `Barrier(epoch)`, and
//! reports each shard's position: the last sequence number of the rows sent before the
//! barrier. Records fetched but not yet sent are not part of the position: after a restart
//! they are read again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use aws_sdk_kinesis::Client;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::decode::record_schema;
use super::reader::{
    ReaderCounters, ReaderSettings, ShardEvent, ShardRead, StartAt, read_shard, register_consumer,
    subscribe_shard,
};
use super::{client, stream_ref};
use crate::checkpoint::{Ack, Part, ShardPosition, SourcePositions};
use crate::config::{KinesisConfig, PipelineConfig};
use crate::message::Message;
use crate::metrics::PipelineMetrics;
use crate::source::SourceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Known, waiting for its parents to end.
    Waiting,
    /// A reader is running.
    Reading,
    /// Read to its end.
    Finished,
}

#[derive(Debug, Clone)]
struct Track {
    parents: Vec<String>,
    state: State,
    /// Last sequence number handed downstream (or restored).
    sequence: Option<String>,
    max_ts: Option<i64>,
    /// Since when every read came back empty at the tip of the shard.
    idle_since: Option<Instant>,
    /// Wall-clock time (ms) of the latest read that came back empty at the tip.
    last_empty_ms: Option<i64>,
    millis_behind: Option<i64>,
}

impl Track {
    fn new(parents: Vec<String>) -> Self {
        Self {
            parents,
            state: State::Waiting,
            sequence: None,
            max_ts: None,
            idle_since: None,
            last_empty_ms: None,
            millis_behind: None,
        }
    }
}

/// Where the source's output goes.
#[derive(Debug)]
pub struct SourceOutputs {
    /// Rows, watermarks, barriers.
    pub data: mpsc::Sender<Message>,
    /// Records that could not be decoded, and barriers.
    pub rejected: mpsc::Sender<Message>,
    /// Checkpoint parts.
    pub acks: mpsc::Sender<Ack>,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct KinesisSource {
    client: Client,
    settings: Arc<ReaderSettings>,
    start: StartAt,
    start_ms: Option<i64>,
    delay_ms: i64,
    batch_max_rows: usize,
    batch_max_delay: Duration,
    list_every: Duration,
    idle_timeout: Duration,
    /// Enhanced fan-out: the consumer's name, and its ARN once registered.
    consumer: Option<(String, Option<String>)>,
    shards: BTreeMap<String, Track>,
    counters: Arc<ReaderCounters>,
    /// Leased mode: the only shards read, each with where it starts without a sequence
    /// number (`None`: its trim horizon). Their children are left to the lease table.
    only: Option<BTreeMap<String, Option<i64>>>,
}

impl KinesisSource {
    /// A source for `config.source.kinesis`, resuming from `restored` positions if given.
    pub async fn new(config: &PipelineConfig, restored: Option<&SourcePositions>) -> Self {
        let k: &KinesisConfig = &config.source.kinesis;
        let (stream_name, stream_arn) = stream_ref(&k.stream);
        // Where shards without a sequence number start, fixed once: `latest` becomes "at the
        // time the job first started", so that a restart (which may find a shard that had
        // no record yet) reads what the first run would have read, not what is newest then.
        let start_ms = match restored {
            Some(r) => r.start_ms,
            None => match k.start.as_str() {
                "latest" => Some(chrono::Utc::now().timestamp_millis()),
                "at_timestamp" => Some(
                    k.start_timestamp
                        .as_deref()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map_or(0, |t| t.timestamp_millis()),
                ),
                _ => None,
            },
        };
        let start = start_ms.map_or(StartAt::TrimHorizon, StartAt::AtTimestamp);
        let shards = restored
            .map(|r| {
                r.shards
                    .iter()
                    .map(|(id, p)| {
                        let mut track = Track::new(p.parents.clone());
                        track.sequence = p.sequence.clone();
                        track.max_ts = p.max_ts;
                        if p.finished {
                            track.state = State::Finished;
                        }
                        (id.clone(), track)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            client: client(k).await,
            settings: Arc::new(ReaderSettings {
                stream_name,
                stream_arn,
                stream: k.stream.clone(),
                poll_min: PipelineConfig::duration(&k.poll_interval),
                poll_max: PipelineConfig::duration(&k.max_poll_interval),
                limit: k.records_per_get,
                schema: record_schema(&config.source.schema),
                max_record_bytes: k.max_record_bytes,
                max_future_skew_ms: PipelineConfig::duration(&k.max_future_skew).as_millis() as i64,
            }),
            start,
            start_ms,
            delay_ms: config.out_of_orderness_ms(),
            batch_max_rows: k.batch_max_rows,
            batch_max_delay: PipelineConfig::duration(&k.batch_max_delay),
            list_every: PipelineConfig::duration(&k.list_shards_interval),
            idle_timeout: PipelineConfig::duration(&k.idle_timeout),
            consumer: (k.mode == "enhanced_fan_out").then(|| (k.consumer_name.clone(), None)),
            shards,
            counters: Arc::new(ReaderCounters::default()),
            only: None,
        }
    }

    /// The same source restricted to `shards` (leased mode): each starts after its
    /// restored sequence number, else at its given start (ms; `None`: the trim horizon).
    /// Other shards, and the children of these, are not read.
    pub fn only(mut self, shards: BTreeMap<String, Option<i64>>) -> Self {
        self.shards.retain(|id, _| shards.contains_key(id));
        for (id, track) in &mut self.shards {
            // Parents were read by whoever held them: nothing to wait for here.
            track.parents.clear();
            if track.state == State::Finished {
                tracing::warn!(shard = %id, "leased shard already finished");
            }
        }
        self.only = Some(shards);
        self
    }

    /// The schema of the rows this source produces.
    pub fn schema(&self) -> &SchemaRef {
        &self.settings.schema
    }

    /// Counters of the shard readers.
    pub fn counters(&self) -> Arc<ReaderCounters> {
        Arc::clone(&self.counters)
    }

    /// Every shard of the stream, with its parents (`ListShards`, all pages).
    async fn list(&self) -> Result<Vec<(String, Vec<String>)>, SourceError> {
        let shards = super::list_shards(&self.client, &self.settings.stream).await?;
        Ok(shards
            .iter()
            .map(|s| (s.shard_id().to_string(), super::parents_of(s)))
            .collect())
    }

    /// Learns new shards and starts the readers whose parents have ended.
    async fn discover(
        &mut self,
        readers: &mut JoinSet<()>,
        events: &mpsc::Sender<ShardEvent>,
    ) -> Result<(), SourceError> {
        let mut listed = self.list().await?;
        if let Some(only) = &self.only {
            listed.retain(|(id, _)| only.contains_key(id));
            for (_, parents) in &mut listed {
                parents.clear();
            }
        }
        for (id, parents) in &listed {
            let track = self
                .shards
                .entry(id.clone())
                .or_insert_with(|| Track::new(parents.clone()));
            // A child first learnt from its parent's end knows one parent; the list knows
            // both of a merge.
            for p in parents {
                if !track.parents.contains(p) {
                    track.parents.push(p.clone());
                }
            }
        }
        let ready: Vec<String> = self
            .shards
            .iter()
            .filter(|(_, t)| t.state == State::Waiting)
            .filter(|(_, t)| {
                t.parents.iter().all(|p| {
                    self.shards
                        .get(p)
                        .is_none_or(|parent| parent.state == State::Finished)
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            let track = self.shards.get_mut(&id).expect("listed");
            // Children too start at the job's start: with `trim_horizon` they are read whole,
            // with a time only from that time on (a parent closed before it adds nothing).
            let start = match (&track.sequence, &self.only) {
                (Some(seq), _) => StartAt::After(seq.clone()),
                (None, Some(only)) => only
                    .get(&id)
                    .copied()
                    .flatten()
                    .map_or(StartAt::TrimHorizon, StartAt::AtTimestamp),
                (None, None) => self.start.clone(),
            };
            track.state = State::Reading;
            tracing::info!(shard = %id, ?start, "reading shard");
            let (client, settings, events, counters) = (
                self.client.clone(),
                Arc::clone(&self.settings),
                events.clone(),
                Arc::clone(&self.counters),
            );
            match &self.consumer {
                Some((_, Some(arn))) => readers.spawn(subscribe_shard(
                    client,
                    settings,
                    arn.clone(),
                    id,
                    start,
                    events,
                    counters,
                )),
                _ => readers.spawn(read_shard(client, settings, id, start, events, counters)),
            };
        }
        Ok(())
    }

    /// [`Self::discover`] after the start: a failure (ListShards throttled for a while) is
    /// logged and tried again at the next tick instead of stopping the job.
    async fn rediscover(&mut self, readers: &mut JoinSet<()>, events: &mpsc::Sender<ShardEvent>) {
        if let Err(e) = self.discover(readers, events).await {
            tracing::warn!(error = %e, "listing shards failed; trying again later");
        }
    }

    /// The watermark the shards allow now (see the [module docs](self)).
    fn watermark(&self, now: Instant) -> Option<i64> {
        // Per shard that holds the watermark back: the largest ts it has given, `None` when
        // it has not answered yet.
        let mut holds: Vec<Option<i64>> = Vec::new();
        for t in self.shards.values() {
            match t.state {
                State::Reading => {
                    let idle = t
                        .idle_since
                        .is_some_and(|s| now.duration_since(s) >= self.idle_timeout);
                    if idle {
                        // Read to its tip and quiet: its next record was written after its
                        // last empty read, so (with event time close to wall time) it holds
                        // the watermark there rather than at its last, old row.
                        holds.push(t.last_empty_ms.max(t.max_ts));
                    } else {
                        holds.push(t.max_ts);
                    }
                }
                State::Waiting => {
                    // A child waits for its parents: its first rows follow theirs.
                    let parents: Vec<&Track> = t
                        .parents
                        .iter()
                        .filter_map(|p| self.shards.get(p))
                        .collect();
                    if !parents.is_empty() {
                        holds.push(parents.iter().filter_map(|p| p.max_ts).min());
                    }
                }
                State::Finished => {}
            }
        }
        if holds.is_empty() {
            let newest = self.shards.values().filter_map(|t| t.max_ts).max()?;
            return Some(newest.saturating_sub(self.delay_ms));
        }
        holds
            .into_iter()
            .collect::<Option<Vec<i64>>>()?
            .into_iter()
            .min()
            .map(|m| m.saturating_sub(self.delay_ms))
    }

    fn positions(&self) -> SourcePositions {
        SourcePositions {
            stream: self.settings.stream.clone(),
            start_ms: self.start_ms,
            shards: self
                .shards
                .iter()
                .map(|(id, t)| {
                    (
                        id.clone(),
                        ShardPosition {
                            parents: t.parents.clone(),
                            sequence: t.sequence.clone(),
                            finished: t.state == State::Finished,
                            max_ts: t.max_ts,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Runs until `shutdown` turns true (then sends a last barrier and
    /// [`Message::Suspend`]) or a shard fails for good.
    pub async fn run(
        mut self,
        out: SourceOutputs,
        first_epoch: u64,
        checkpoint_every: Duration,
        metrics: Arc<PipelineMetrics>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let (events_tx, mut events) = mpsc::channel::<ShardEvent>(64);
        let mut readers = JoinSet::new();
        if let Some((name, arn)) = &mut self.consumer {
            let registered = register_consumer(&self.client, &self.settings, name).await?;
            tracing::info!(consumer = %registered, "enhanced fan-out consumer active");
            *arn = Some(registered);
        }
        self.discover(&mut readers, &events_tx).await?;

        let mut pending = Batcher::new(Arc::clone(&self.settings.schema));
        let mut epoch = first_epoch;
        let mut last_watermark = i64::MIN;
        let mut flush_tick =
            tokio::time::interval(self.batch_max_delay.max(Duration::from_millis(1)));
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let start = tokio::time::Instant::now();
        let mut checkpoint_tick =
            tokio::time::interval_at(start + checkpoint_every, checkpoint_every);
        checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut list_tick = tokio::time::interval_at(start + self.list_every, self.list_every);
        list_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health_tick =
            tokio::time::interval_at(start + Duration::from_secs(10), Duration::from_secs(10));
        let mut health = Health::default();

        loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        self.flush(&mut pending, &out, &mut last_watermark, &metrics).await?;
                        self.barrier(epoch, &out).await?;
                        for tx in [&out.data, &out.rejected] {
                            tx.send(Message::Suspend).await.map_err(|_| SourceError::Closed)?;
                        }
                        readers.abort_all();
                        return Ok(());
                    }
                }
                _ = checkpoint_tick.tick() => {
                    self.flush(&mut pending, &out, &mut last_watermark, &metrics).await?;
                    self.barrier(epoch, &out).await?;
                    epoch += 1;
                }
                _ = list_tick.tick() => self.rediscover(&mut readers, &events_tx).await,
                Some(joined) = readers.join_next(), if !readers.is_empty() => {
                    if let Err(e) = joined
                        && e.is_panic()
                    {
                        return Err(SourceError::Kinesis {
                            operation: "shard reader".into(),
                            reason: format!("panicked: {e}"),
                        });
                    }
                }
                _ = health_tick.tick() => health.report(&self, &metrics),
                _ = flush_tick.tick() => {
                    if pending.age().is_some_and(|a| a >= self.batch_max_delay) || pending.rows == 0 {
                        self.flush(&mut pending, &out, &mut last_watermark, &metrics).await?;
                    }
                }
                event = events.recv() => {
                    let Some(event) = event else { return Err(SourceError::Closed) };
                    match event {
                        ShardEvent::Failed(shard, e) => {
                            tracing::error!(%shard, error = %e, "shard reader failed");
                            return Err(e);
                        }
                        ShardEvent::Read(read) => {
                            let ended = self.accept(read, &mut pending);
                            if pending.rows >= self.batch_max_rows {
                                self.flush(&mut pending, &out, &mut last_watermark, &metrics).await?;
                            }
                            if ended {
                                self.rediscover(&mut readers, &events_tx).await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Takes a read into the pending batch; true when its shard ended.
    fn accept(&mut self, read: ShardRead, pending: &mut Batcher) -> bool {
        let ShardRead {
            shard,
            rows,
            rejected,
            records: _,
            last_sequence,
            max_ts,
            millis_behind,
            ended,
        } = read;
        let decoded = rows.num_rows();
        pending.push(rows, rejected);
        let Some(track) = self.shards.get_mut(&shard) else {
            return false;
        };
        if last_sequence.is_some() {
            track.sequence = last_sequence;
        }
        if let Some(m) = max_ts {
            track.max_ts = Some(track.max_ts.map_or(m, |t| t.max(m)));
        }
        track.millis_behind = millis_behind;
        // Idle: at the tip and nothing to give (records that all went to the dead letter
        // count as nothing, or a shard of garbage would hold the watermark forever).
        if decoded == 0 && millis_behind.is_none_or(|m| m == 0) {
            track.idle_since.get_or_insert_with(Instant::now);
            track.last_empty_ms = Some(chrono::Utc::now().timestamp_millis());
        } else {
            track.idle_since = None;
        }
        if let Some(children) = ended {
            tracing::info!(%shard, ?children, "shard read to its end");
            track.state = State::Finished;
            if self.only.is_some() {
                // Leased: the children become leases; whoever takes them reads them.
                return true;
            }
            for (child, parents) in children {
                let parents = if parents.is_empty() {
                    vec![shard.clone()]
                } else {
                    parents
                };
                self.shards
                    .entry(child)
                    .or_insert_with(|| Track::new(parents));
            }
            return true;
        }
        false
    }

    /// Reports the shard positions for `epoch`, then sends its barrier on both outputs.
    async fn barrier(&self, epoch: u64, out: &SourceOutputs) -> Result<(), SourceError> {
        out.acks
            .send((epoch, Part::Source(self.positions())))
            .await
            .map_err(|_| SourceError::Closed)?;
        for tx in [&out.data, &out.rejected] {
            tx.send(Message::Barrier(epoch))
                .await
                .map_err(|_| SourceError::Closed)?;
        }
        Ok(())
    }

    /// Sends the pending rows and dead letters, then the watermark if it moved.
    async fn flush(
        &self,
        pending: &mut Batcher,
        out: &SourceOutputs,
        last_watermark: &mut i64,
        metrics: &PipelineMetrics,
    ) -> Result<(), SourceError> {
        let (rows, rejected) = pending.take();
        if let Some(rows) = rows {
            metrics.add_source_rows(rows.num_rows() as u64);
            out.data
                .send(Message::Data(rows))
                .await
                .map_err(|_| SourceError::Closed)?;
        }
        if let Some(rejected) = rejected {
            metrics.add_rejected_records(rejected.num_rows() as u64);
            out.rejected
                .send(Message::Data(rejected))
                .await
                .map_err(|_| SourceError::Closed)?;
        }
        if let Some(w) = self.watermark(Instant::now())
            && w > *last_watermark
        {
            *last_watermark = w;
            out.data
                .send(Message::Watermark(w))
                .await
                .map_err(|_| SourceError::Closed)?;
        }
        Ok(())
    }
}

/// Rows and dead letters gathered since the last flush.
#[derive(Debug)]
struct Batcher {
    schema: SchemaRef,
    rows_batches: Vec<RecordBatch>,
    rejected: Vec<RecordBatch>,
    rows: usize,
    since: Option<Instant>,
}

impl Batcher {
    fn new(schema: SchemaRef) -> Self {
        Self {
            schema,
            rows_batches: Vec::new(),
            rejected: Vec::new(),
            rows: 0,
            since: None,
        }
    }

    fn push(&mut self, rows: RecordBatch, rejected: Option<RecordBatch>) {
        if rows.num_rows() > 0 {
            self.rows += rows.num_rows();
            self.rows_batches.push(rows);
            self.since.get_or_insert_with(Instant::now);
        }
        if let Some(r) = rejected {
            self.rejected.push(r);
            self.since.get_or_insert_with(Instant::now);
        }
    }

    fn age(&self) -> Option<Duration> {
        self.since.map(|s| s.elapsed())
    }

    fn take(&mut self) -> (Option<RecordBatch>, Option<RecordBatch>) {
        self.since = None;
        self.rows = 0;
        let rows = match self.rows_batches.len() {
            0 => None,
            1 => self.rows_batches.pop(),
            _ => Some(
                concat_batches(&self.schema, &std::mem::take(&mut self.rows_batches))
                    .expect("one schema"),
            ),
        };
        let rejected = match self.rejected.len() {
            0 => None,
            _ => {
                let schema = self.rejected[0].schema();
                Some(
                    concat_batches(&schema, &std::mem::take(&mut self.rejected))
                        .expect("one schema"),
                )
            }
        };
        (rows, rejected)
    }
}

/// Per-shard lag into the metrics every second; a health line (records/s, shards, lag,
/// throttling) every 10 seconds.
#[derive(Debug, Default)]
struct Health {
    last: Option<(Instant, u64)>,
}

impl Health {
    fn report(&mut self, source: &KinesisSource, metrics: &PipelineMetrics) {
        use std::sync::atomic::Ordering::Relaxed;
        for (id, t) in &source.shards {
            if t.state == State::Reading {
                metrics.set_shard_lag(id, t.millis_behind.unwrap_or(-1));
            } else {
                metrics.remove_shard(id);
            }
        }
        let records = source.counters.records.load(Relaxed);
        let now = Instant::now();
        if self
            .last
            .is_some_and(|(t, _)| now.duration_since(t) < Duration::from_secs(10))
        {
            return;
        }
        let rate = self.last.map_or(0.0, |(t, r)| {
            (records - r) as f64 / now.duration_since(t).as_secs_f64().max(1e-3)
        });
        self.last = Some((now, records));
        let reading = source
            .shards
            .values()
            .filter(|t| t.state == State::Reading)
            .count();
        let lag = source
            .shards
            .values()
            .filter(|t| t.state == State::Reading)
            .filter_map(|t| t.millis_behind)
            .max();
        tracing::info!(
            records_per_s = rate as u64,
            shards = reading,
            max_millis_behind = lag.unwrap_or(-1),
            throttled = source.counters.throttled.load(Relaxed),
            transient_errors = source.counters.transient.load(Relaxed),
            "kinesis source health"
        );
    }
}
