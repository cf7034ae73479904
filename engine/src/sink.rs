//! The incident log and the dead-letter output: parquet through object_store.
//!
//! # Layout
//! ```text
//! <out>/anomalies/date=YYYY-MM-DD/part-HH-<chunk>-<digest>.parquet
//! <out>/dead_letter/date=YYYY-MM-DD/part-<seq>-<digest>.parquet
//! ```
//! Anomalies are grouped by the hour of their event time. An hour's file is written when the
//! watermark passes the end of the hour (or when it reaches `max_rows_per_file` rows), with
//! its rows in canonical order (ts, resource, metric, rule). The content of a file therefore
//! depends only on the input, never on batch sizes, partitions or timing, and its name ends
//! in a digest of the ids it holds: a replay or restart rewrites identical files under
//! identical names instead of adding duplicates.
//!
//! # Streaming
//! In a streaming job ([`IncidentLog::streaming`]) rows are also written when a checkpoint
//! barrier passes ([`IncidentLog::commit`]) and at the flush interval, so they are durable
//! within about a second instead of at the end of the hour. Those files carry the epoch they
//! were written in (`part-HH-e<epoch>-<n>-<digest>.parquet`): on a restart from checkpoint
//! `c`, files of epochs after `c` are deleted because the job writes their rows again (see
//! [`crate::checkpoint`]).
//!
//! # Atomicity
//! Each file is encoded in memory and stored with a single `put`: object stores make it
//! visible whole or not at all (the local store writes a temporary file and renames it), so
//! a reader never sees half a file.

use std::collections::BTreeMap;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use healer_operators::id::StableHasher;
use healer_operators::schema::TS;

use crate::store::Location;

const HOUR_MS: i64 = 3_600_000;

/// Errors writing the log.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Encoding failed.
    #[error("encoding {path}: {source}")]
    Parquet {
        /// File being written.
        path: String,
        /// Cause.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Storing failed.
    #[error("writing {path}: {source}")]
    Store {
        /// File being written.
        path: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// Concatenation failed.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
}

/// A file that was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Path inside the store.
    pub path: String,
    /// Rows in it.
    pub rows: usize,
}

fn encode(batch: &RecordBatch, path: &str) -> Result<Bytes, SinkError> {
    // Dictionary encoding pays for repeated values (resource, metric, severity, rule) and
    // only costs time on columns that hardly repeat: floats, and the ids.
    let mut props =
        WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default()));
    for field in batch.schema().fields() {
        if field.data_type().is_floating() || field.name() == "id" {
            props = props.set_column_dictionary_enabled(
                parquet::schema::types::ColumnPath::from(field.name().as_str()),
                false,
            );
        }
    }
    let props = props.build();
    let mut buffer = Vec::new();
    let err = |source| SinkError::Parquet {
        path: path.to_string(),
        source,
    };
    let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(props)).map_err(err)?;
    writer.write(batch).map_err(err)?;
    writer.close().map_err(err)?;
    Ok(Bytes::from(buffer))
}

pub(crate) async fn put(
    location: &Location,
    relative: &str,
    batch: &RecordBatch,
) -> Result<WrittenFile, SinkError> {
    let path = location.child(relative);
    let bytes = encode(batch, relative)?;
    location
        .store
        .put(&path, PutPayload::from(bytes))
        .await
        .map_err(|source| SinkError::Store {
            path: path.to_string(),
            source,
        })?;
    Ok(WrittenFile {
        path: path.to_string(),
        rows: batch.num_rows(),
    })
}

pub(crate) fn date_of(ms: i64) -> String {
    arrow::temporal_conversions::timestamp_ms_to_datetime(ms)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn digest_of_ids(batch: &RecordBatch) -> String {
    let mut h = StableHasher::new();
    if let Some(ids) = batch.column_by_name("id") {
        for id in ids.as_string::<i32>().iter().flatten() {
            h.str(id);
        }
    }
    h.hex()[..16].to_string()
}

/// The incident-log writer for anomaly rows. See the [module docs](self).
#[derive(Debug)]
pub struct IncidentLog {
    location: Location,
    schema: SchemaRef,
    max_rows_per_file: usize,
    /// Buffered rows per hour bucket, in canonical order, and chunks already written.
    hours: BTreeMap<i64, (Vec<RecordBatch>, usize, usize)>,
    written: Vec<WrittenFile>,
    /// Streaming: the open epoch and the files written in it so far.
    epoch: Option<(u64, usize)>,
}

impl IncidentLog {
    /// A writer under `<location>/anomalies/`.
    pub fn new(location: Location, schema: SchemaRef, max_rows_per_file: usize) -> Self {
        Self {
            location,
            schema,
            max_rows_per_file: max_rows_per_file.max(1),
            hours: BTreeMap::new(),
            written: Vec::new(),
            epoch: None,
        }
    }

    /// The same writer in streaming mode, writing into epoch `open_epoch` (see the
    /// [module docs](self)).
    pub fn streaming(mut self, open_epoch: u64) -> Self {
        self.epoch = Some((open_epoch, 0));
        self
    }

    /// Writes every buffered row now (streaming), into the open epoch.
    pub async fn flush_open(&mut self) -> Result<(), SinkError> {
        let hours: Vec<i64> = self.hours.keys().copied().collect();
        for hour in hours {
            let rows = self.hours[&hour].1;
            if rows > 0 {
                self.flush_chunk(hour, rows).await?;
            }
        }
        Ok(())
    }

    /// Streaming: writes every row received before barrier `epoch`, then opens the next
    /// epoch.
    pub async fn commit(&mut self, epoch: u64) -> Result<(), SinkError> {
        self.epoch = Some((
            epoch,
            self.epoch
                .map_or(0, |(e, n)| if e == epoch { n } else { 0 }),
        ));
        self.flush_open().await?;
        self.epoch = Some((epoch + 1, 0));
        Ok(())
    }

    /// Adds canonically ordered anomaly rows (ts non-decreasing across calls).
    pub async fn push(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let ts = batch
            .column_by_name(TS)
            .expect("anomaly schema has ts")
            .as_primitive::<TimestampMillisecondType>()
            .values()
            .to_vec();
        let mut start = 0;
        while start < ts.len() {
            let hour = ts[start].div_euclid(HOUR_MS);
            let end = start + ts[start..].partition_point(|t| t.div_euclid(HOUR_MS) == hour);
            let entry = self.hours.entry(hour).or_insert_with(|| (Vec::new(), 0, 0));
            entry.0.push(batch.slice(start, end - start));
            entry.1 += end - start;
            start = end;
            while self.hours[&hour].1 >= self.max_rows_per_file {
                self.flush_chunk(hour, self.max_rows_per_file).await?;
            }
        }
        Ok(())
    }

    async fn flush_chunk(&mut self, hour: i64, rows: usize) -> Result<(), SinkError> {
        let Some((batches, buffered, chunk)) = self.hours.remove(&hour) else {
            return Ok(());
        };
        let all = concat_batches(&self.schema, &batches)?;
        let rows = rows.min(buffered);
        let file = all.slice(0, rows);
        let name = match &mut self.epoch {
            None => format!(
                "anomalies/date={}/part-{:02}-{:04}-{}.parquet",
                date_of(hour * HOUR_MS),
                hour.rem_euclid(24),
                chunk,
                digest_of_ids(&file)
            ),
            Some((epoch, n)) => {
                *n += 1;
                format!(
                    "anomalies/date={}/part-{:02}-e{:010}-{:04}-{}.parquet",
                    date_of(hour * HOUR_MS),
                    hour.rem_euclid(24),
                    epoch,
                    *n - 1,
                    digest_of_ids(&file)
                )
            }
        };
        self.written.push(put(&self.location, &name, &file).await?);
        if rows < buffered {
            self.hours.insert(
                hour,
                (
                    vec![all.slice(rows, buffered - rows)],
                    buffered - rows,
                    chunk + 1,
                ),
            );
        }
        Ok(())
    }

    /// Writes every hour that ends at or before `watermark`.
    pub async fn advance(&mut self, watermark: i64) -> Result<(), SinkError> {
        let closed: Vec<i64> = self
            .hours
            .keys()
            .copied()
            .take_while(|h| watermark == i64::MAX || (h + 1).saturating_mul(HOUR_MS) <= watermark)
            .collect();
        for hour in closed {
            let rows = self.hours[&hour].1;
            self.flush_chunk(hour, rows).await?;
        }
        Ok(())
    }

    /// Files written so far.
    pub fn written(&self) -> &[WrittenFile] {
        &self.written
    }
}

/// The dead-letter writer: rejected rows with their reasons.
#[derive(Debug)]
pub struct DeadLetter {
    location: Location,
    prefix: &'static str,
    /// Streaming: the open epoch.
    epoch: Option<u64>,
    buffered: Vec<RecordBatch>,
    rows: usize,
    max_rows_per_file: usize,
    seq: usize,
    written: Vec<WrittenFile>,
    total: usize,
}

impl DeadLetter {
    /// A writer under `<location>/dead_letter/`.
    pub fn new(location: Location, max_rows_per_file: usize) -> Self {
        Self::with_prefix(location, "dead_letter", max_rows_per_file)
    }

    /// A writer under `<location>/<prefix>/`.
    pub fn with_prefix(location: Location, prefix: &'static str, max_rows_per_file: usize) -> Self {
        Self {
            location,
            prefix,
            epoch: None,
            buffered: Vec::new(),
            rows: 0,
            max_rows_per_file: max_rows_per_file.max(1),
            seq: 0,
            written: Vec::new(),
            total: 0,
        }
    }

    /// Adds rejected rows; writes a file when enough are buffered.
    pub async fn push(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        self.rows += batch.num_rows();
        self.total += batch.num_rows();
        self.buffered.push(batch);
        if self.rows >= self.max_rows_per_file {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes what is buffered.
    pub async fn flush(&mut self) -> Result<(), SinkError> {
        let Some(first) = self.buffered.first() else {
            return Ok(());
        };
        let all = concat_batches(&first.schema(), &self.buffered)?;
        self.buffered.clear();
        self.rows = 0;
        let ts = all
            .column_by_name(TS)
            .map(|c| c.as_primitive::<TimestampMillisecondType>().clone());
        let first_ts = ts.as_ref().and_then(|t| t.iter().flatten().next());
        let mut h = StableHasher::new();
        h.i64(all.num_rows() as i64);
        if let Some(t) = &ts {
            for v in t.iter() {
                h.i64(v.unwrap_or(i64::MIN));
            }
        }
        let epoch = self.epoch.map(|e| format!("e{e:010}-")).unwrap_or_default();
        let name = format!(
            "{}/date={}/part-{epoch}{:05}-{}.parquet",
            self.prefix,
            first_ts.map_or_else(|| "unknown".to_string(), date_of),
            self.seq,
            &h.hex()[..16]
        );
        self.seq += 1;
        self.written.push(put(&self.location, &name, &all).await?);
        Ok(())
    }

    /// The same writer in streaming mode, writing into epoch `open_epoch`.
    pub fn streaming(mut self, open_epoch: u64) -> Self {
        self.epoch = Some(open_epoch);
        self
    }

    /// Streaming: writes every row received before barrier `epoch`, then opens the next.
    pub async fn commit(&mut self, epoch: u64) -> Result<(), SinkError> {
        self.epoch = Some(epoch);
        self.flush().await?;
        self.epoch = Some(epoch + 1);
        Ok(())
    }

    /// Rows received in total.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Files written so far.
    pub fn written(&self) -> &[WrittenFile] {
        &self.written
    }
}
