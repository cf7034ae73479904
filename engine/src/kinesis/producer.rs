//! Writing metrics into a stream (`healer produce`): `PutRecords` with a rate limit.
//!
//! Rows become JSON records (see [`super::decode`]) with the resource as partition key, so
//! one resource's rows land in one shard in order. `pack` rows of one resource may share a
//! record (a JSON array). A `PutRecords` call holds at most one record per partition key
//! and the next call waits until every record of this one is in (failed entries are retried
//! with back-off), so a retried record can never overtake a later one of the same resource.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use healer_operators::schema::RESOURCE;

use super::decode::row_to_json;
use super::{Failure, classify, describe, pause, stream_ref};
use crate::source::SourceError;

/// How to produce.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Records per second at most (`None`: as fast as the stream takes them).
    pub rate: Option<f64>,
    /// Rows of one resource per record (1: one JSON object per record).
    pub pack: usize,
    /// Records per `PutRecords` call (at most 500).
    pub batch: usize,
}

impl Default for ProduceOptions {
    fn default() -> Self {
        Self {
            rate: None,
            pack: 1,
            batch: 500,
        }
    }
}

/// What a run of the producer did.
#[derive(Debug, Clone, Default)]
pub struct ProduceSummary {
    /// Records written.
    pub records: u64,
    /// Rows (samples) in them.
    pub rows: u64,
    /// `PutRecords` calls.
    pub calls: u64,
    /// Entries that failed and were retried.
    pub retried: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// A record ready to put.
#[derive(Debug)]
struct Pending {
    key: String,
    data: String,
    rows: u64,
}

/// Writes records to one stream.
#[derive(Debug)]
pub struct Producer {
    client: Client,
    stream_name: Option<String>,
    stream_arn: Option<String>,
    options: ProduceOptions,
    /// Rows of each resource not yet packed into a record.
    open: HashMap<String, (String, u64)>,
    /// Records waiting for a call, in order.
    queue: std::collections::VecDeque<Pending>,
    started: Instant,
    summary: ProduceSummary,
}

impl Producer {
    /// A producer for `stream` (name or ARN).
    pub fn new(client: Client, stream: &str, options: ProduceOptions) -> Self {
        let (stream_name, stream_arn) = stream_ref(stream);
        Self {
            client,
            stream_name,
            stream_arn,
            options: ProduceOptions {
                pack: options.pack.max(1),
                batch: options.batch.clamp(1, 500),
                ..options
            },
            open: HashMap::new(),
            queue: Default::default(),
            started: Instant::now(),
            summary: ProduceSummary::default(),
        }
    }

    /// Adds the rows of `batch` (which needs a string `resource` column).
    pub async fn push(&mut self, batch: &RecordBatch) -> Result<(), SourceError> {
        let resources = batch
            .column_by_name(RESOURCE)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| SourceError::Schema {
                location: "produce".into(),
                reason: "rows need a string `resource` column".into(),
            })?;
        for row in 0..batch.num_rows() {
            if resources.is_null(row) {
                continue;
            }
            let key = resources.value(row);
            let (buffer, rows) = self.open.entry(key.to_string()).or_default();
            if !buffer.is_empty() {
                buffer.push(',');
            }
            row_to_json(batch, row, buffer);
            *rows += 1;
            if *rows as usize >= self.options.pack {
                self.close(key);
            }
        }
        while self.queue.len() >= self.options.batch * 4 {
            self.send_one_call().await?;
        }
        Ok(())
    }

    fn close(&mut self, key: &str) {
        if let Some((buffer, rows)) = self.open.remove(key) {
            let data = if self.options.pack > 1 {
                format!("[{buffer}]")
            } else {
                buffer
            };
            self.queue.push_back(Pending {
                key: key.to_string(),
                data,
                rows,
            });
        }
    }

    /// Sends everything still buffered.
    pub async fn finish(mut self) -> Result<ProduceSummary, SourceError> {
        let mut keys: Vec<String> = self.open.keys().cloned().collect();
        keys.sort();
        for k in keys {
            self.close(&k);
        }
        while !self.queue.is_empty() {
            self.send_one_call().await?;
        }
        self.summary.elapsed = self.started.elapsed();
        Ok(self.summary)
    }

    /// One `PutRecords` call: the oldest queued records, at most one per partition key, all
    /// in before it returns.
    async fn send_one_call(&mut self) -> Result<(), SourceError> {
        let mut taken: Vec<Pending> = Vec::new();
        let mut keys = std::collections::HashSet::new();
        let mut rest = std::collections::VecDeque::new();
        while let Some(p) = self.queue.pop_front() {
            if taken.len() < self.options.batch && !keys.contains(&p.key) {
                keys.insert(p.key.clone());
                taken.push(p);
            } else if taken.len() >= self.options.batch {
                rest.push_back(p);
                break;
            } else {
                rest.push_back(p);
            }
        }
        rest.extend(self.queue.drain(..));
        self.queue = rest;
        if let Some(rate) = self.options.rate {
            let due = self.started + Duration::from_secs_f64(self.summary.records as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut attempt = 0;
        while !taken.is_empty() {
            let entries: Vec<PutRecordsRequestEntry> = taken
                .iter()
                .map(|p| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&p.key)
                        .data(Blob::new(p.data.as_bytes()))
                        .build()
                        .expect("key and data are set")
                })
                .collect();
            self.summary.calls += 1;
            let result = self
                .client
                .put_records()
                .set_stream_name(self.stream_name.clone())
                .set_stream_arn(self.stream_arn.clone())
                .set_records(Some(entries))
                .send()
                .await;
            match result {
                Ok(out) => {
                    let mut failed = Vec::new();
                    for (p, r) in taken.into_iter().zip(out.records()) {
                        if r.error_code().is_some() {
                            failed.push(p);
                        } else {
                            self.summary.records += 1;
                            self.summary.rows += p.rows;
                        }
                    }
                    self.summary.retried += failed.len() as u64;
                    taken = failed;
                    if !taken.is_empty() {
                        pause(&mut attempt, Duration::from_millis(50)).await;
                    }
                }
                Err(e) => match classify(&e) {
                    Failure::Throttled | Failure::Transient if attempt < 30 => {
                        pause(&mut attempt, Duration::from_millis(50)).await;
                    }
                    _ => {
                        return Err(SourceError::Kinesis {
                            operation: "PutRecords".into(),
                            reason: describe(&e),
                        });
                    }
                },
            }
        }
        Ok(())
    }
}
