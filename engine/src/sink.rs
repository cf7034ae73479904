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
//! A reader never sees half a file. On the local file system, an hour's file is written to a
//! staging file beside it as its row groups are encoded (`.part-HH.parquet#N`: object_store
//! listings skip the `#N` suffix, and dataset readers such as pyarrow, Spark or Hive skip
//! hidden files) and renamed into place when complete, so its bytes reach the disk while the
//! job runs rather than all at the end. On other stores each file is encoded
//! in memory and stored with a single `put`, which they make visible whole or not at all.
//! A job that fails removes its staging files; one that is killed can leave one behind, as
//! object_store's own `put` can.

use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// Writing or renaming a local staging file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// File being written.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
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

/// Rows per row group of the incident log's files. The log encodes a row group as soon as
/// it has this many rows of an hour, so little is left to encode when the hour closes.
const ROW_GROUP_ROWS: usize = 65_536;

fn properties(schema: &SchemaRef) -> WriterProperties {
    use parquet::file::properties::EnabledStatistics;
    use parquet::schema::types::ColumnPath;
    // Dictionary encoding pays for repeated values (resource, metric, severity, rule) and
    // only costs time on columns that hardly repeat: floats, and the ids. zstd shrinks the
    // floats by under a tenth for a fifth of the encoding time, so they are stored plain;
    // min/max statistics of random ids let a reader skip nothing.
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    for field in schema.fields() {
        let column = || ColumnPath::from(field.name().as_str());
        if field.data_type().is_floating() {
            props = props
                .set_column_dictionary_enabled(column(), false)
                .set_column_compression(column(), Compression::UNCOMPRESSED);
        } else if field.name() == "id" {
            props = props
                .set_column_dictionary_enabled(column(), false)
                .set_column_statistics_enabled(column(), EnabledStatistics::None);
        }
    }
    props.build()
}

fn encode(batch: &RecordBatch, path: &str) -> Result<Bytes, SinkError> {
    let mut file = FileWriter::try_new(&batch.schema(), path, Target::Memory(Vec::new()))?;
    file.write(batch)?;
    match file.finish()? {
        Target::Memory(bytes) => Ok(Bytes::from(bytes)),
        Target::Staged(_) => unreachable!("encoded in memory"),
    }
}

/// Where the bytes of a file being encoded go.
enum Target {
    /// Memory: the file is stored with one `put` once complete.
    Memory(Vec<u8>),
    /// A staging file on the local disk, renamed once complete (see the
    /// [module docs](self)).
    Staged(Staged),
}

impl std::io::Write for Target {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Target::Memory(v) => v.write(buf),
            Target::Staged(s) => s.file.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Target::Memory(v) => v.write_all(buf),
            Target::Staged(s) => s.file.write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Target::Memory(_) => Ok(()),
            Target::Staged(s) => s.file.flush(),
        }
    }
}

/// A local staging file, removed when dropped before [`Staged::complete`].
struct Staged {
    file: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    done: bool,
}

/// Write size of a staging file.
const STAGING_BUFFER: usize = 1 << 20;

/// The error of an I/O operation on the local file `path`.
fn io_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Staged {
    /// A new staging file `<dir>/.<stem>.parquet#<n>`, `n` the first number free, creating
    /// `dir` if needed.
    fn create(dir: &std::path::Path, stem: &str) -> Result<Self, SinkError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        for n in 1u32.. {
            let path = dir.join(format!(".{stem}.parquet#{n}"));
            match std::fs::File::create_new(&path) {
                Ok(file) => {
                    return Ok(Self {
                        file: std::io::BufWriter::with_capacity(STAGING_BUFFER, file),
                        path,
                        done: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        unreachable!("a free staging name below 2^32")
    }

    /// Flushes the file and renames it to `name` in its directory.
    fn complete(mut self, name: &str) -> Result<(), SinkError> {
        std::io::Write::flush(&mut self.file).map_err(io_error(&self.path))?;
        let to = self.path.with_file_name(name);
        std::fs::rename(&self.path, &to).map_err(io_error(&to))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A parquet file being encoded, row group by row group.
struct FileWriter {
    writer: ArrowWriter<Target>,
    path: String,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter")
            .field("path", &self.path)
            .field("bytes", &self.writer.bytes_written())
            .finish()
    }
}

impl FileWriter {
    fn try_new(schema: &SchemaRef, path: &str, target: Target) -> Result<Self, SinkError> {
        let writer = ArrowWriter::try_new(target, Arc::clone(schema), Some(properties(schema)))
            .map_err(|source| SinkError::Parquet {
                path: path.to_string(),
                source,
            })?;
        Ok(Self {
            writer,
            path: path.to_string(),
        })
    }

    fn err(&self, source: parquet::errors::ParquetError) -> SinkError {
        SinkError::Parquet {
            path: self.path.clone(),
            source,
        }
    }

    /// Encodes `batch`; row groups are cut every [`ROW_GROUP_ROWS`] rows of the file.
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.writer.write(batch).map_err(|e| self.err(e))
    }

    /// The whole file (`into_inner` writes the footer).
    fn finish(self) -> Result<Target, SinkError> {
        let path = self.path;
        self.writer
            .into_inner()
            .map_err(|source| SinkError::Parquet { path, source })
    }
}

pub(crate) async fn put(
    location: &Location,
    relative: &str,
    batch: &RecordBatch,
) -> Result<WrittenFile, SinkError> {
    let bytes = encode(batch, relative)?;
    put_bytes(location, relative, bytes, batch.num_rows()).await
}

async fn put_bytes(
    location: &Location,
    relative: &str,
    bytes: Bytes,
    rows: usize,
) -> Result<WrittenFile, SinkError> {
    let path = location.child(relative);
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
        rows,
    })
}

pub(crate) fn date_of(ms: i64) -> String {
    arrow::temporal_conversions::timestamp_ms_to_datetime(ms)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The digest that ends a file's name: of its ids, in order.
pub(crate) fn digest_of_ids(batch: &RecordBatch) -> String {
    let mut h = StableHasher::new();
    add_ids(&mut h, batch);
    digest_hex(&h)
}

/// Adds `batch`'s ids to a digest (a file's digest is over all its batches in order).
fn add_ids(h: &mut StableHasher, batch: &RecordBatch) {
    if let Some(ids) = batch.column_by_name("id") {
        for id in ids.as_string::<i32>().iter().flatten() {
            h.str(id);
        }
    }
}

fn digest_hex(h: &StableHasher) -> String {
    h.hex()[..16].to_string()
}

/// The rows of one hour not yet in a file, and its file being encoded.
#[derive(Debug, Default)]
struct Hour {
    /// Rows in canonical order not yet encoded: fewer than a row group.
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    /// The file being encoded.
    file: Option<OpenFile>,
    /// Files of this hour written so far.
    chunk: usize,
}

/// An hour's file being encoded: its rows so far and the digest of their ids.
#[derive(Debug)]
struct OpenFile {
    writer: FileWriter,
    rows: usize,
    digest: StableHasher,
}

/// The incident-log writer for anomaly rows. See the [module docs](self).
///
/// An hour's rows are encoded row group by row group as they arrive (always in groups of
/// 65,536 rows counted from the file's first row, so a file's bytes depend only on
/// its rows), and the file is stored whole when the hour closes.
#[derive(Debug)]
pub struct IncidentLog {
    location: Location,
    schema: SchemaRef,
    max_rows_per_file: usize,
    /// Open hours, by hour since the epoch.
    hours: BTreeMap<i64, Hour>,
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
            self.close_file(hour).await?;
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
            .values();
        let mut start = 0;
        while start < ts.len() {
            let hour = ts[start].div_euclid(HOUR_MS);
            let end = start + ts[start..].partition_point(|t| t.div_euclid(HOUR_MS) == hour);
            let entry = self.hours.entry(hour).or_default();
            entry.pending.push(batch.slice(start, end - start));
            entry.pending_rows += end - start;
            start = end;
            self.encode_full_groups(hour).await?;
        }
        Ok(())
    }

    /// Encodes the hour's pending rows while they fill a row group (or the rest of a file).
    async fn encode_full_groups(&mut self, hour: i64) -> Result<(), SinkError> {
        loop {
            let entry = self.hours.get_mut(&hour).expect("open hour");
            let in_file = entry.file.as_ref().map_or(0, |f| f.rows);
            let group = ROW_GROUP_ROWS.min(self.max_rows_per_file - in_file);
            if entry.pending_rows < group {
                return Ok(());
            }
            self.encode_pending(hour, group)?;
            if in_file + group == self.max_rows_per_file {
                self.close_file(hour).await?;
            }
        }
    }

    /// Encodes the first `rows` pending rows of `hour` into its file, opening it if needed.
    fn encode_pending(&mut self, hour: i64, rows: usize) -> Result<(), SinkError> {
        let entry = self.hours.get_mut(&hour).expect("open hour");
        let all = concat_batches(&self.schema, &entry.pending)?;
        entry.pending.clear();
        if rows < all.num_rows() {
            entry.pending.push(all.slice(rows, all.num_rows() - rows));
        }
        entry.pending_rows = all.num_rows() - rows;
        let group = all.slice(0, rows);
        let file = match &mut entry.file {
            Some(f) => f,
            None => {
                let dir = format!("anomalies/date={}", date_of(hour * HOUR_MS));
                let stem = format!("part-{:02}", hour.rem_euclid(24));
                let target = match self.location.local_file(&dir) {
                    Some(dir) => Target::Staged(Staged::create(&dir, &stem)?),
                    None => Target::Memory(Vec::new()),
                };
                entry.file.insert(OpenFile {
                    // Named for errors only: the name's digest is known once the file is
                    // full.
                    writer: FileWriter::try_new(&self.schema, &format!("{dir}/{stem}-…"), target)?,
                    rows: 0,
                    digest: StableHasher::new(),
                })
            }
        };
        file.writer.write(&group)?;
        file.rows += rows;
        add_ids(&mut file.digest, &group);
        Ok(())
    }

    /// Encodes what is pending of `hour` and stores its file, if it has rows.
    async fn close_file(&mut self, hour: i64) -> Result<(), SinkError> {
        let pending = self.hours.get(&hour).map_or(0, |h| h.pending_rows);
        if pending > 0 {
            self.encode_pending(hour, pending)?;
        }
        let Some(entry) = self.hours.get_mut(&hour) else {
            return Ok(());
        };
        let Some(OpenFile {
            writer,
            rows,
            digest,
        }) = entry.file.take()
        else {
            return Ok(());
        };
        let chunk = entry.chunk;
        entry.chunk += 1;
        let date = date_of(hour * HOUR_MS);
        let hh = hour.rem_euclid(24);
        let digest = digest_hex(&digest);
        let name = match &mut self.epoch {
            None => format!("anomalies/date={date}/part-{hh:02}-{chunk:04}-{digest}.parquet"),
            Some((epoch, n)) => {
                *n += 1;
                format!(
                    "anomalies/date={date}/part-{hh:02}-e{epoch:010}-{:04}-{digest}.parquet",
                    *n - 1
                )
            }
        };
        let written = match writer.finish()? {
            Target::Memory(bytes) => {
                put_bytes(&self.location, &name, Bytes::from(bytes), rows).await?
            }
            Target::Staged(staged) => {
                // Beside its staging file, which is in the hour's directory.
                staged.complete(name.rsplit('/').next().unwrap_or(&name))?;
                WrittenFile {
                    path: self.location.child(&name).to_string(),
                    rows,
                }
            }
        };
        self.written.push(written);
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
            self.close_file(hour).await?;
            self.hours.remove(&hour);
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Float64Array, StringArray, TimestampMillisecondArray};
    use futures::TryStreamExt;
    use healer_operators::schema::anomaly_schema;
    use object_store::path::Path;

    /// `rows` anomaly rows from `t0` ms, one per 10 ms, in canonical order.
    fn anomalies(t0: i64, rows: usize) -> RecordBatch {
        let schema = anomaly_schema();
        let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values((0..rows).map(f)))
        };
        let float = |f: &dyn Fn(usize) -> f64| -> ArrayRef {
            Arc::new(Float64Array::from_iter_values((0..rows).map(f)))
        };
        let columns: Vec<ArrayRef> = vec![
            text(&|i| format!("{:032x}", t0 as usize + i)),
            Arc::new(
                TimestampMillisecondArray::from_iter_values((0..rows).map(|i| t0 + 10 * i as i64))
                    .with_timezone("UTC"),
            ),
            text(&|i| format!("host-{}", i % 7)),
            text(&|_| "cpu_percent".into()),
            float(&|i| i as f64),
            float(&|i| 3.0 + (i % 5) as f64),
            text(&|_| "MEDIUM".into()),
            float(&|_| 0.4),
            float(&|_| 0.0),
            float(&|_| 1.0),
            text(&|_| "zscore_300".into()),
            text(&|_| "api".into()),
            text(&|_| "eu".into()),
        ];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut out: Vec<String> = walkdir(dir)
            .into_iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        out.sort();
        out
    }

    fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walkdir(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    /// A temporary directory and its location.
    fn local_dir() -> (tempfile::TempDir, Location) {
        let dir = tempfile::tempdir().unwrap();
        let local =
            Location::parse(dir.path().to_str().unwrap(), &Default::default(), false).unwrap();
        (dir, local)
    }

    /// A local log streams an open hour's row groups to a staging file that listings
    /// skip, renames it into place when the hour closes, and writes the same bytes as a
    /// log kept in memory for another store.
    #[tokio::test]
    async fn local_files_are_staged_then_renamed_with_the_bytes_of_a_put() {
        let (dir, local) = local_dir();
        let memory = Location::from_store(
            Arc::new(object_store::memory::InMemory::new()),
            Path::from("log"),
            url::Url::parse("memory:///").unwrap(),
        );
        let mut staged = IncidentLog::new(local.clone(), anomaly_schema(), usize::MAX);
        let mut kept = IncidentLog::new(memory.clone(), anomaly_schema(), usize::MAX);
        // More than a row group of hour 0, and a few rows of hour 1.
        let rows = ROW_GROUP_ROWS + 1000;
        for batch in [anomalies(0, rows), anomalies(HOUR_MS, 10)] {
            staged.push(batch.clone()).await.unwrap();
            kept.push(batch).await.unwrap();
        }
        // Hour 0 has a row group on disk, under a name listings skip; hour 1 has less than
        // a row group, not encoded yet.
        let open = files(dir.path());
        assert_eq!(open, ["anomalies/date=1970-01-01/.part-00.parquet#1"]);
        let staging = dir.path().join(&open[0]);
        assert!(std::fs::metadata(&staging).unwrap().len() > 0);
        let listed: Vec<_> = local
            .store
            .list(Some(&local.path))
            .try_collect()
            .await
            .unwrap();
        assert!(listed.is_empty(), "{listed:?}");

        staged.advance(i64::MAX).await.unwrap();
        kept.advance(i64::MAX).await.unwrap();
        let done = files(dir.path());
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|f| f.ends_with(".parquet")), "{done:?}");
        for (name, rows_in) in done.iter().zip([rows, 10]) {
            let on_disk = std::fs::read(dir.path().join(name)).unwrap();
            let put = memory
                .store
                .get(&memory.child(name))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(on_disk, put.to_vec(), "{name}");
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                Bytes::from(on_disk),
            )
            .unwrap();
            assert_eq!(
                reader.metadata().file_metadata().num_rows() as usize,
                rows_in
            );
        }
    }

    /// A log dropped with an hour open (a failed job) leaves no staging file behind.
    #[tokio::test]
    async fn staging_files_are_removed_when_the_log_is_dropped() {
        let (dir, local) = local_dir();
        let mut log = IncidentLog::new(local, anomaly_schema(), usize::MAX);
        log.push(anomalies(0, ROW_GROUP_ROWS + 1)).await.unwrap();
        assert_eq!(files(dir.path()).len(), 1);
        drop(log);
        assert!(files(dir.path()).is_empty());
    }
}
