//! One task per shard: `GetShardIterator`, then `GetRecords` in a loop.
//!
//! * Polls at most once per `poll_interval` (AWS allows 5 calls per second per shard) and
//!   doubles the interval up to `max_poll_interval` while the shard returns nothing.
//! * Throttling (`ProvisionedThroughputExceeded`, …), 5xx answers, timeouts and network
//!   errors are retried with jittered exponential back-off; each is counted.
//! * An expired iterator is replaced by one `AFTER_SEQUENCE_NUMBER` the last record read (or
//!   at the original start when none was read), so nothing is skipped or read twice.
//! * Records are decoded here, in parallel across shards; the source gets Arrow batches.
//! * A closed shard is read to its end (no next iterator); the last read carries its child
//!   shards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use tokio::sync::mpsc;

use super::decode::{Decoder, RawRecord};
use aws_sdk_kinesis::error::ProvideErrorMetadata;

use super::{Failure, SequenceNumber, classify, describe, pause};
use crate::source::{SourceError, ts_values};

/// Where a shard starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record kept.
    TrimHorizon,
    /// Only records written from now on.
    Latest,
    /// The first record at or after this time (ms).
    AtTimestamp(i64),
    /// The record after this sequence number (a checkpoint).
    After(String),
}

/// Settings shared by every reader of a stream.
#[derive(Debug)]
pub struct ReaderSettings {
    /// Stream name, when given by name.
    pub stream_name: Option<String>,
    /// Stream ARN, when given by ARN.
    pub stream_arn: Option<String>,
    /// Stream label for dead-letter rows.
    pub stream: String,
    /// Shortest interval between calls.
    pub poll_min: Duration,
    /// Longest interval (empty shard).
    pub poll_max: Duration,
    /// Records per call.
    pub limit: i32,
    /// Schema of decoded rows.
    pub schema: SchemaRef,
    /// Dead-letter threshold.
    pub max_record_bytes: usize,
    /// Samples further than this (ms) after their arrival are dead-lettered.
    pub max_future_skew_ms: i64,
}

/// Counters shared by the readers.
#[derive(Debug, Default)]
pub struct ReaderCounters {
    /// GetRecords calls that succeeded.
    pub calls: AtomicU64,
    /// Throttled calls.
    pub throttled: AtomicU64,
    /// Transient failures (5xx, timeouts, network).
    pub transient: AtomicU64,
    /// Iterators that expired and were renewed.
    pub expired: AtomicU64,
    /// Records read.
    pub records: AtomicU64,
}

/// The result of one `GetRecords` call.
#[derive(Debug)]
pub struct ShardRead {
    /// The shard.
    pub shard: String,
    /// Decoded rows (possibly none).
    pub rows: RecordBatch,
    /// Records that could not be decoded.
    pub rejected: Option<RecordBatch>,
    /// Records in this read.
    pub records: usize,
    /// Sequence number of the last record of this read.
    pub last_sequence: Option<String>,
    /// Largest event time among the rows.
    pub max_ts: Option<i64>,
    /// How far behind the tip of the shard the read is.
    pub millis_behind: Option<i64>,
    /// Set on the last read of a closed shard: its children, each with its parents.
    pub ended: Option<Vec<(String, Vec<String>)>>,
}

/// What a reader tells the source.
#[derive(Debug)]
pub enum ShardEvent {
    /// A read.
    Read(ShardRead),
    /// The reader gave up.
    Failed(String, SourceError),
}

fn kinesis_error(operation: &str, shard: &str, reason: String) -> SourceError {
    SourceError::Kinesis {
        operation: format!("{operation} ({shard})"),
        reason,
    }
}

async fn iterator(
    client: &Client,
    settings: &ReaderSettings,
    shard: &str,
    start: &StartAt,
    counters: &ReaderCounters,
) -> Result<String, SourceError> {
    let mut attempt = 0;
    loop {
        let mut call = client
            .get_shard_iterator()
            .set_stream_name(settings.stream_name.clone())
            .set_stream_arn(settings.stream_arn.clone())
            .shard_id(shard);
        call = match start {
            StartAt::TrimHorizon => call.shard_iterator_type(ShardIteratorType::TrimHorizon),
            StartAt::Latest => call.shard_iterator_type(ShardIteratorType::Latest),
            StartAt::AtTimestamp(ms) => call
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(*ms)),
            StartAt::After(seq) => call
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
        };
        match call.send().await {
            Ok(out) => {
                return out.shard_iterator.ok_or_else(|| {
                    kinesis_error("GetShardIterator", shard, "no iterator returned".into())
                });
            }
            Err(e) => match classify(&e) {
                Failure::Throttled | Failure::Transient => {
                    let counter = if classify(&e) == Failure::Throttled {
                        &counters.throttled
                    } else {
                        &counters.transient
                    };
                    counter.fetch_add(1, Relaxed);
                    pause(&mut attempt, Duration::from_millis(100)).await;
                }
                _ => return Err(kinesis_error("GetShardIterator", shard, describe(&e))),
            },
        }
    }
}

/// Child shards with their parents, as a closed shard's last answer names them.
fn children(shards: &[aws_sdk_kinesis::types::ChildShard]) -> Vec<(String, Vec<String>)> {
    shards
        .iter()
        .map(|c| (c.shard_id().to_string(), c.parent_shards().to_vec()))
        .collect()
}

/// A shard's decoder, and the sequence number reading starts after (if any).
fn decoder_at(
    settings: &ReaderSettings,
    shard: &str,
    start: &StartAt,
) -> (Decoder, Option<SequenceNumber>) {
    let decoder = Decoder::new(
        Arc::clone(&settings.schema),
        &settings.stream,
        shard,
        settings.max_record_bytes,
    )
    .with_max_future_skew(settings.max_future_skew_ms);
    let last = match start {
        StartAt::After(s) => SequenceNumber::parse(s),
        _ => None,
    };
    (decoder, last)
}

/// Decodes the records of one answer (`GetRecords` or a `SubscribeToShard` event), skipping
/// any at or before `last`, which moves to the last record taken.
fn decode_read(
    shard: &str,
    records: &[aws_sdk_kinesis::types::Record],
    decoder: &mut Decoder,
    last: &mut Option<SequenceNumber>,
    millis_behind: Option<i64>,
    ended: Option<Vec<(String, Vec<String>)>>,
) -> ShardRead {
    let mut taken = 0;
    for r in records {
        let seq = SequenceNumber::parse(r.sequence_number());
        // Never hand on a record at or before the position already read (a resumed iterator
        // or subscription that overlaps, or an emulator that repeats itself).
        if let (Some(s), Some(l)) = (&seq, &*last)
            && s <= l
        {
            continue;
        }
        decoder.push(&RawRecord {
            sequence: r.sequence_number().to_string(),
            partition_key: r.partition_key().unwrap_or_default().to_string(),
            arrival_ms: r
                .approximate_arrival_timestamp()
                .and_then(|t| t.to_millis().ok()),
            data: bytes::Bytes::copy_from_slice(r.data().as_ref()),
        });
        taken += 1;
        if seq.is_some() {
            *last = seq;
        }
    }
    let rows = decoder.take_rows();
    let max_ts = ts_values(&rows)
        .iter()
        .copied()
        .filter(|&t| t != i64::MIN)
        .max();
    ShardRead {
        shard: shard.to_string(),
        rows,
        rejected: decoder.take_rejected(),
        records: taken,
        last_sequence: last.as_ref().map(|s| s.as_str().to_string()),
        max_ts,
        millis_behind,
        ended,
    }
}

/// Registers (or finds) the enhanced fan-out consumer `name` of the stream and waits until
/// it is active; returns its ARN.
pub async fn register_consumer(
    client: &Client,
    settings: &ReaderSettings,
    name: &str,
) -> Result<String, SourceError> {
    let fail = |operation: &str, reason: String| SourceError::Kinesis {
        operation: operation.into(),
        reason,
    };
    let stream_arn = match &settings.stream_arn {
        Some(arn) => arn.clone(),
        None => client
            .describe_stream_summary()
            .set_stream_name(settings.stream_name.clone())
            .send()
            .await
            .map_err(|e| fail("DescribeStreamSummary", describe(&e)))?
            .stream_description_summary()
            .map(|d| d.stream_arn().to_string())
            .ok_or_else(|| fail("DescribeStreamSummary", "no stream description".into()))?,
    };
    match client
        .register_stream_consumer()
        .stream_arn(&stream_arn)
        .consumer_name(name)
        .send()
        .await
    {
        Ok(_) => {}
        // Registered before (by an earlier run): use it.
        Err(e) if e.code() == Some("ResourceInUseException") => {}
        Err(e) => return Err(fail("RegisterStreamConsumer", describe(&e))),
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = client
            .describe_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await
            .map_err(|e| fail("DescribeStreamConsumer", describe(&e)))?;
        if let Some(c) = out.consumer_description()
            && c.consumer_status() == &aws_sdk_kinesis::types::ConsumerStatus::Active
        {
            return Ok(c.consumer_arn().to_string());
        }
        if Instant::now() > deadline {
            return Err(fail(
                "DescribeStreamConsumer",
                format!("consumer `{name}` did not become active"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `shard` through enhanced fan-out: `SubscribeToShard` pushes records; a
/// subscription ends after at most five minutes and is renewed after the last record
/// received (or at the original start if none was). Otherwise as [`read_shard`].
pub async fn subscribe_shard(
    client: Client,
    settings: Arc<ReaderSettings>,
    consumer_arn: String,
    shard: String,
    start: StartAt,
    events: mpsc::Sender<ShardEvent>,
    counters: Arc<ReaderCounters>,
) {
    let result = subscribe(
        &client,
        &settings,
        &consumer_arn,
        &shard,
        start,
        &events,
        &counters,
    )
    .await;
    if let Err(e) = result {
        let _ = events.send(ShardEvent::Failed(shard, e)).await;
    }
}

async fn subscribe(
    client: &Client,
    settings: &ReaderSettings,
    consumer_arn: &str,
    shard: &str,
    start: StartAt,
    events: &mpsc::Sender<ShardEvent>,
    counters: &ReaderCounters,
) -> Result<(), SourceError> {
    use aws_sdk_kinesis::types::{StartingPosition, SubscribeToShardEventStream};
    let (mut decoder, mut last) = decoder_at(settings, shard, &start);
    let mut attempt = 0;
    loop {
        let from = match &last {
            Some(seq) => StartAt::After(seq.as_str().to_string()),
            None => start.clone(),
        };
        let position = match &from {
            StartAt::TrimHorizon => {
                StartingPosition::builder().r#type(ShardIteratorType::TrimHorizon)
            }
            StartAt::Latest => StartingPosition::builder().r#type(ShardIteratorType::Latest),
            StartAt::AtTimestamp(ms) => StartingPosition::builder()
                .r#type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(*ms)),
            StartAt::After(seq) => StartingPosition::builder()
                .r#type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
        }
        .build()
        .map_err(|e| kinesis_error("SubscribeToShard", shard, e.to_string()))?;
        let subscribed = client
            .subscribe_to_shard()
            .consumer_arn(consumer_arn)
            .shard_id(shard)
            .starting_position(position)
            .send()
            .await;
        let mut out = match subscribed {
            Ok(out) => out,
            Err(e) => {
                match classify(&e) {
                    Failure::Throttled => counters.throttled.fetch_add(1, Relaxed),
                    // A subscription still open from before (ResourceInUse) clears itself.
                    Failure::Transient => counters.transient.fetch_add(1, Relaxed),
                    _ if e.code() == Some("ResourceInUseException") => {
                        counters.throttled.fetch_add(1, Relaxed)
                    }
                    _ => return Err(kinesis_error("SubscribeToShard", shard, describe(&e))),
                };
                pause(&mut attempt, Duration::from_millis(200)).await;
                continue;
            }
        };
        attempt = 0;
        loop {
            match out.event_stream.recv().await {
                Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(ev))) => {
                    counters.calls.fetch_add(1, Relaxed);
                    tracing::debug!(
                        %shard,
                        records = ev.records().len(),
                        continuation = ev.continuation_sequence_number(),
                        children = ev.child_shards().len(),
                        millis_behind = ev.millis_behind_latest(),
                        "subscription event"
                    );
                    let ended =
                        (!ev.child_shards().is_empty()).then(|| children(ev.child_shards()));
                    let done = ended.is_some();
                    let read = decode_read(
                        shard,
                        ev.records(),
                        &mut decoder,
                        &mut last,
                        Some(ev.millis_behind_latest()),
                        ended,
                    );
                    counters.records.fetch_add(read.records as u64, Relaxed);
                    if events.send(ShardEvent::Read(read)).await.is_err() || done {
                        return Ok(());
                    }
                }
                Ok(Some(_)) => {}
                // The subscription's time is up: subscribe again.
                Ok(None) => {
                    tracing::debug!(%shard, "subscription ended");
                    break;
                }
                Err(e) => {
                    counters.transient.fetch_add(1, Relaxed);
                    tracing::warn!(%shard, error = %e, "subscription broke; subscribing again");
                    pause(&mut attempt, Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// Reads `shard` from `start` until it ends or `events` closes. Failures that retrying
/// cannot fix are sent as [`ShardEvent::Failed`].
pub async fn read_shard(
    client: Client,
    settings: Arc<ReaderSettings>,
    shard: String,
    start: StartAt,
    events: mpsc::Sender<ShardEvent>,
    counters: Arc<ReaderCounters>,
) {
    if let Err(e) = read(&client, &settings, &shard, start, &events, &counters).await {
        let _ = events.send(ShardEvent::Failed(shard, e)).await;
    }
}

async fn read(
    client: &Client,
    settings: &ReaderSettings,
    shard: &str,
    start: StartAt,
    events: &mpsc::Sender<ShardEvent>,
    counters: &ReaderCounters,
) -> Result<(), SourceError> {
    let (mut decoder, mut last) = decoder_at(settings, shard, &start);
    let mut it = iterator(client, settings, shard, &start, counters).await?;
    let mut interval = settings.poll_min;
    let mut attempt = 0;
    loop {
        let called = Instant::now();
        let result = client
            .get_records()
            .shard_iterator(&it)
            .limit(settings.limit)
            .set_stream_arn(settings.stream_arn.clone())
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                match classify(&e) {
                    Failure::Throttled => {
                        counters.throttled.fetch_add(1, Relaxed);
                    }
                    Failure::Transient => {
                        counters.transient.fetch_add(1, Relaxed);
                    }
                    Failure::ExpiredIterator => {
                        counters.expired.fetch_add(1, Relaxed);
                        let from = match &last {
                            Some(seq) => StartAt::After(seq.as_str().to_string()),
                            None => start.clone(),
                        };
                        it = iterator(client, settings, shard, &from, counters).await?;
                        continue;
                    }
                    Failure::Fatal => {
                        return Err(kinesis_error("GetRecords", shard, describe(&e)));
                    }
                }
                pause(
                    &mut attempt,
                    settings.poll_min.max(Duration::from_millis(50)),
                )
                .await;
                continue;
            }
        };
        attempt = 0;
        counters.calls.fetch_add(1, Relaxed);
        let next = out.next_shard_iterator().map(str::to_string);
        let ended = next.is_none().then(|| children(out.child_shards()));
        let read = decode_read(
            shard,
            out.records(),
            &mut decoder,
            &mut last,
            out.millis_behind_latest(),
            ended,
        );
        let records = read.records;
        counters.records.fetch_add(records as u64, Relaxed);
        if events.send(ShardEvent::Read(read)).await.is_err() {
            return Ok(());
        }
        let Some(next) = next else { return Ok(()) };
        it = next;
        interval = if records == 0 {
            (interval * 2).min(settings.poll_max)
        } else {
            settings.poll_min
        };
        tokio::time::sleep_until((called + interval).into()).await;
    }
}
