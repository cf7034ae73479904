//! `ParquetSource`: historical metrics from parquet files, replayed in event-time order.
//!
//! Inputs are files, directories (every `*.parquet` below them, recursively), `file://` or
//! `s3://` URLs, through object_store. Footers are read up front: the schema of the first
//! file is the stream's schema (see [`normalized_schema`]), and the `ts` statistics of each
//! file order the replay. Files are merged by event time, not by listing order: a file is
//! opened when the replay reaches its first timestamp, and rows of overlapping files are
//! interleaved by `ts` (ties keep file order). Within a file, rows keep their order: rows out
//! of event-time order are the event-time gate's to handle (reordered within the configured
//! bound, dead-lettered beyond), so what counts as late never depends on batch sizes.
//!
//! Only the columns the rules read are decoded (projection pushdown). A file that lacks a
//! column of the stream schema yields NULLs for it; a column of another type is cast, or the
//! file is rejected with its name.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, new_null_array};
use arrow::buffer::ScalarBuffer;
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use tokio::sync::mpsc;

use crate::config::Speed;
use crate::message::Message;
use crate::metrics::PipelineMetrics;
use crate::store::{Location, S3Config, StoreError};
use healer_operators::schema::{RESOURCE, TS, is_metric_type, is_tag_type, ts_type};

/// Errors of the parquet source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A location could not be resolved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Listing or reading failed.
    #[error("{location}: {source}")]
    ObjectStore {
        /// The file or prefix.
        location: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// A file is not valid parquet, or decoding failed.
    #[error("{location}: {source}")]
    Parquet {
        /// The file.
        location: String,
        /// The cause.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A file's schema does not fit the stream.
    #[error("{location}: {reason}")]
    Schema {
        /// The file.
        location: String,
        /// What does not fit.
        reason: String,
    },
    /// No input files were found.
    #[error("no parquet files found in {0}")]
    Empty(String),
    /// A Kinesis call failed for good.
    #[error("kinesis {operation}: {reason}")]
    Kinesis {
        /// The API operation (and shard, where there is one).
        operation: String,
        /// The error.
        reason: String,
    },
    /// The downstream pipeline stopped.
    #[error("pipeline closed")]
    Closed,
}

/// Reads a parquet file through object_store: ranged GETs, footer with a prefetch hint.
///
/// A local file is read directly instead ([`ObjectReader::with_local_file`]): mapped into
/// memory, each range handed to the decoder without a copy, or, where the file cannot be
/// mapped, read into buffers that are reused once the decoder drops them. Through
/// object_store every range is a new zeroed buffer: each page of the file is then faulted in
/// and zeroed before the read fills it; on the replay benchmark (1 GB of parquet) the reads
/// were 7 % of the CPU samples and most of the process's page faults. Reading into reused
/// buffers still copied every byte from the page cache (5 % of the samples); the mapping
/// does not.
///
/// A mapped file must not be truncated while it is replayed (the process would get
/// `SIGBUS`). Writers that replace a file by renaming a new one over it, as object_store's
/// local store and healer's own sinks do, are safe: the mapping keeps the old file.
#[derive(Debug, Clone)]
pub struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    local: Option<LocalFile>,
}

/// How a local file's ranges are read.
#[derive(Debug, Clone)]
enum LocalFile {
    /// Slices of the file mapped into memory.
    Mapped(Arc<memmap2::Mmap>),
    /// `pread` into pooled buffers.
    Read(Arc<std::fs::File>, Arc<BufferPool>),
}

/// A range of a mapped file, given to the decoder as [`Bytes`]. When the decoder drops it,
/// its pages leave the process's resident set (they stay in the page cache), so a replay's
/// memory does not grow with the size of its files.
struct MappedRange {
    map: Arc<memmap2::Mmap>,
    range: Range<usize>,
}

impl AsRef<[u8]> for MappedRange {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

impl Drop for MappedRange {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping is read-only and shared, of a file: dropping its pages loses
        // nothing, a later access (another range on the same page) reads them back from the
        // file. No Rust reference into the range outlives `self`.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            )
        };
    }
}

impl ObjectReader {
    /// A reader of the `size`-byte object at `path`.
    pub fn new(store: Arc<dyn ObjectStore>, path: Path) -> Self {
        Self {
            store,
            path,
            size: 0,
            local: None,
        }
    }

    /// The object's size, known from listing.
    pub fn with_file_size(mut self, size: u64) -> Self {
        self.size = size;
        self
    }

    /// Reads ranges from `file` (the object's local file): from a read-only mapping of it,
    /// or into buffers of `pool` where it cannot be mapped.
    #[allow(unsafe_code)]
    pub fn with_local_file(mut self, file: std::fs::File, pool: Arc<BufferPool>) -> Self {
        // SAFETY: read-only; see the type's docs for the one hazard, a file truncated while
        // it is read.
        self.local = Some(match unsafe { memmap2::Mmap::map(&file) } {
            Ok(map) => LocalFile::Mapped(Arc::new(map)),
            Err(_) => LocalFile::Read(Arc::new(file), pool),
        });
        self
    }

    /// Reads ranges from `file` into buffers of `pool`, never mapping it (the fallback's
    /// tests).
    #[cfg(test)]
    fn with_local_reads(mut self, file: std::fs::File, pool: Arc<BufferPool>) -> Self {
        self.local = Some(LocalFile::Read(Arc::new(file), pool));
        self
    }

    fn read_mapped(
        map: &Arc<memmap2::Mmap>,
        ranges: &[Range<u64>],
    ) -> parquet::errors::Result<Vec<Bytes>> {
        ranges
            .iter()
            .map(|r| {
                let within = r.start <= r.end && r.end <= map.len() as u64;
                if !within {
                    return Err(parquet::errors::ParquetError::EOF(format!(
                        "range {}..{} of a file of {} bytes",
                        r.start,
                        r.end,
                        map.len()
                    )));
                }
                let range = r.start as usize..r.end as usize;
                if range.is_empty() {
                    return Ok(Bytes::new());
                }
                // One call maps the range's pages instead of a fault every few pages while
                // the decoder reads it (a hint: the decoder's reads fault in what it misses).
                let _ = map.advise_range(memmap2::Advice::PopulateRead, range.start, range.len());
                Ok(Bytes::from_owner(MappedRange {
                    map: Arc::clone(map),
                    range,
                }))
            })
            .collect()
    }

    /// The ranges of a local file, `None` for an object read through object_store.
    async fn read(&self, ranges: &[Range<u64>]) -> Option<parquet::errors::Result<Vec<Bytes>>> {
        Some(match self.local.as_ref()? {
            LocalFile::Mapped(map) => Self::read_mapped(map, ranges),
            LocalFile::Read(file, pool) => Self::read_local(file, pool, ranges.to_vec()).await,
        })
    }

    async fn read_local(
        file: &Arc<std::fs::File>,
        pool: &Arc<BufferPool>,
        ranges: Vec<Range<u64>>,
    ) -> parquet::errors::Result<Vec<Bytes>> {
        let (file, pool) = (Arc::clone(file), Arc::clone(pool));
        let external = |e| parquet::errors::ParquetError::External(e);
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            ranges
                .into_iter()
                .map(|r| {
                    if r.start > r.end {
                        return Err(parquet::errors::ParquetError::EOF(format!(
                            "range {}..{} runs backwards",
                            r.start, r.end
                        )));
                    }
                    let len =
                        usize::try_from(r.end - r.start).map_err(|e| external(Box::new(e)))?;
                    if len == 0 {
                        return Ok(Bytes::new());
                    }
                    let mut buf = pool.take(len);
                    file.read_exact_at(&mut buf.bytes[..len], r.start)
                        .map_err(|e| external(Box::new(e)))?;
                    Ok(Bytes::from_owner(buf))
                })
                .collect()
        })
        .await
        .map_err(|e| external(Box::new(e)))?
    }
}

/// Read buffers that go back to their pool when the last [`Bytes`] slice of them is dropped,
/// so that a replay reads its files into the same memory over and over. Holds at most
/// [`BufferPool::MAX_BYTES`] of idle buffers.
#[derive(Debug, Default)]
pub struct BufferPool {
    idle: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Idle bytes kept at most: two of the benchmark file's row groups (104 MB each).
    pub const MAX_BYTES: usize = 256 << 20;

    /// A buffer of at least `len` bytes: the smallest idle one that fits, else a new one
    /// with an eighth to spare, for the next file region of about the same size (allocated
    /// zeroed, which the allocator gets from the system without writing it). A new buffer
    /// replaces the largest idle one, which no longer fits what is read.
    fn take(self: &Arc<Self>, len: usize) -> PooledBuffer {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let fit = idle
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        let bytes = match fit {
            Some(i) => idle.swap_remove(i),
            None => {
                if let Some(largest) = (0..idle.len()).max_by_key(|&i| idle[i].len()) {
                    idle.swap_remove(largest);
                }
                drop(idle);
                vec![0; len + len / 8]
            }
        };
        PooledBuffer {
            bytes,
            len,
            pool: Arc::clone(self),
        }
    }

    fn give_back(&self, bytes: Vec<u8>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = idle.iter().map(Vec::capacity).sum();
        if held + bytes.capacity() <= Self::MAX_BYTES {
            idle.push(bytes);
        }
    }
}

/// A buffer of a [`BufferPool`], `len` bytes of it read.
struct PooledBuffer {
    bytes: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.bytes));
    }
}

fn to_parquet_err(e: object_store::Error) -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::External(Box::new(e))
}

impl AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            if let Some(read) = self.read(std::slice::from_ref(&range)).await {
                return Ok(read?.pop().expect("one range read"));
            }
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(to_parquet_err)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            if let Some(read) = self.read(&ranges).await {
                return read;
            }
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(to_parquet_err)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(256 * 1024))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

#[derive(Debug, Clone)]
struct FileInfo {
    store: Arc<dyn ObjectStore>,
    path: Path,
    display: String,
    /// The file's path on this machine, for a `file://` location.
    local: Option<std::path::PathBuf>,
    size: u64,
    min_ts: i64,
    rows: u64,
}

/// The stream schema for a file schema: `ts` becomes `Timestamp(ms, UTC)`, string-like
/// columns `Utf8`, numeric columns stay as they are, other columns are dropped.
pub fn normalized_schema(file: &Schema) -> Result<SchemaRef, String> {
    let ts = file
        .field_with_name(TS)
        .map_err(|_| format!("no `{TS}` column (event time)"))?;
    if !matches!(
        ts.data_type(),
        DataType::Timestamp(_, _) | DataType::Int64 | DataType::Date64
    ) {
        return Err(format!(
            "`{TS}` is {}, expected a timestamp or epoch milliseconds",
            ts.data_type()
        ));
    }
    let resource = file
        .field_with_name(RESOURCE)
        .map_err(|_| format!("no `{RESOURCE}` column"))?;
    if !is_tag_type(resource.data_type()) {
        return Err(format!(
            "`{RESOURCE}` is {}, expected a string",
            resource.data_type()
        ));
    }
    let mut fields = Vec::new();
    for f in file.fields() {
        if f.name() == TS {
            fields.push(Field::new(TS, ts_type(), true));
        } else if is_tag_type(f.data_type()) {
            fields.push(Field::new(f.name(), DataType::Utf8, true));
        } else if is_metric_type(f.data_type()) {
            fields.push(Field::new(f.name(), f.data_type().clone(), true));
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// An event-time column (any timestamp, or epoch milliseconds as Int64) as
/// `Timestamp(ms, UTC)`.
fn ts_to_ms(array: &ArrayRef) -> Result<ArrayRef, arrow::error::ArrowError> {
    match array.data_type() {
        DataType::Int64 => cast(
            &cast(
                array,
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
            )?,
            &ts_type(),
        ),
        _ => cast(array, &ts_type()),
    }
}

/// Casts and reorders `batch` to `target`; missing columns become NULLs.
pub fn conform(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, String> {
    let columns = target
        .fields()
        .iter()
        .map(|f| match batch.schema().index_of(f.name()) {
            Ok(i) => {
                let c = batch.column(i);
                if c.data_type() == f.data_type() {
                    Ok(Arc::clone(c))
                } else if f.name() == TS {
                    ts_to_ms(c).map_err(|e| format!("column `{TS}` ({}): {e}", c.data_type()))
                } else {
                    cast(c, f.data_type())
                        .map_err(|e| format!("column `{}` ({}): {e}", f.name(), c.data_type()))
                }
            }
            Err(_) => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<ArrayRef>, String>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(Arc::clone(target), columns, &options)
        .map_err(|e| e.to_string())
}

/// Timestamps (ms) of a conformed batch's `ts` column; NULL reads as `i64::MIN`. Without
/// NULLs this shares the column's buffer (no copy).
pub fn ts_values(batch: &RecordBatch) -> ScalarBuffer<i64> {
    let ts = batch
        .column_by_name(TS)
        .expect("conformed batches have a ts column")
        .as_primitive::<TimestampMillisecondType>();
    if ts.null_count() == 0 {
        ts.values().clone()
    } else {
        (0..ts.len())
            .map(|i| if ts.is_null(i) { i64::MIN } else { ts.value(i) })
            .collect()
    }
}

/// Stable sort of `batch` by `ts`, when it is not sorted already.
pub fn sort_by_ts(batch: RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let ts = ts_values(&batch);
    if ts.windows(2).all(|w| w[0] <= w[1]) {
        return Ok(batch);
    }
    let mut idx: Vec<u32> = (0..ts.len() as u32).collect();
    idx.sort_by_key(|&i| ts[i as usize]);
    let idx = arrow::array::UInt32Array::from(idx);
    arrow::compute::take_record_batch(&batch, &idx)
}

/// The rows of a file not emitted yet.
struct Head {
    batch: RecordBatch,
    ts: ScalarBuffer<i64>,
    max: i64,
    sorted: bool,
}

impl Head {
    fn new(batch: RecordBatch) -> Self {
        let ts = ts_values(&batch);
        let max = ts.iter().copied().max().unwrap_or(i64::MIN);
        let sorted = ts.windows(2).all(|w| w[0] <= w[1]);
        Self {
            batch,
            ts,
            max,
            sorted,
        }
    }

    /// The rows with `ts <= bound` (in file order) and the rest.
    fn split(
        self,
        bound: i64,
    ) -> Result<(Option<RecordBatch>, Option<Head>), arrow::error::ArrowError> {
        if self.max <= bound {
            return Ok((Some(self.batch), None));
        }
        let n = self.batch.num_rows();
        if self.sorted {
            let cut = self.ts.partition_point(|&t| t <= bound);
            let ready = (cut > 0).then(|| self.batch.slice(0, cut));
            let rest = Head {
                batch: self.batch.slice(cut, n - cut),
                ts: self.ts.slice(cut, n - cut),
                max: self.max,
                sorted: true,
            };
            return Ok((ready, Some(rest)));
        }
        let mask: arrow::array::BooleanArray = self.ts.iter().map(|&t| Some(t <= bound)).collect();
        let ready = arrow::compute::filter_record_batch(&self.batch, &mask)?;
        let rest = arrow::compute::filter_record_batch(&self.batch, &arrow::compute::not(&mask)?)?;
        Ok((
            (ready.num_rows() > 0).then_some(ready),
            Some(Head::new(rest)),
        ))
    }
}

/// Decoded bytes a batch holds at most (see [`ParquetSource::batch_rows`]).
pub const BATCH_BYTES: usize = 16 << 20;

/// `configured` rows, fewer when rows of `schema` are so wide that they would hold more than
/// [`BATCH_BYTES`], never fewer than 1,024.
fn capped_batch_rows(configured: usize, schema: &Schema) -> usize {
    let row_bytes: usize = schema
        .fields()
        .iter()
        .map(|f| estimated_bytes(f.data_type()))
        .sum();
    let cap = (BATCH_BYTES / row_bytes.max(1)).max(1024);
    configured.min(cap)
}

/// Decoded bytes of one value of `data_type`: the width of fixed-size types, the offset and
/// a typical tag (24 bytes) for strings and other variable-size ones.
fn estimated_bytes(data_type: &DataType) -> usize {
    match data_type {
        DataType::Dictionary(key, _) => estimated_bytes(key),
        t => t.primitive_width().unwrap_or(match t {
            DataType::Boolean => 1,
            _ => 32,
        }),
    }
}

/// Replays parquet files in event-time order. See the [module docs](self).
#[derive(Debug)]
pub struct ParquetSource {
    files: Vec<FileInfo>,
    schema: SchemaRef,
    projection: SchemaRef,
    batch_rows: usize,
    speed: Speed,
    /// Read buffers of the local files, shared by every file of the replay.
    buffers: Arc<BufferPool>,
}

/// The parquet objects at `location` (one object, or every `.parquet` below a prefix).
pub(crate) async fn list_files(location: &Location) -> Result<Vec<(Path, u64)>, SourceError> {
    let store = &location.store;
    // A single object?
    if let Ok(meta) = store.head(&location.path).await {
        return Ok(vec![(meta.location, meta.size)]);
    }
    let mut files = Vec::new();
    let mut listing = store.list(Some(&location.path));
    while let Some(item) = listing.next().await {
        let meta = item.map_err(|source| SourceError::ObjectStore {
            location: location.display(),
            source,
        })?;
        if meta.location.extension() == Some("parquet") {
            files.push((meta.location, meta.size));
        }
    }
    files.sort();
    Ok(files)
}

impl ParquetSource {
    /// Finds the input files and reads their footers.
    pub async fn open(
        inputs: &[String],
        s3: &S3Config,
        batch_rows: usize,
        speed: Speed,
    ) -> Result<Self, SourceError> {
        let mut files = Vec::new();
        let mut schema: Option<SchemaRef> = None;
        for input in inputs {
            let location = Location::parse(input, s3, false)?;
            let found = list_files(&location).await?;
            if found.is_empty() {
                return Err(SourceError::Empty(input.clone()));
            }
            for (path, size) in found {
                let display = if location.url.scheme() == "file" {
                    format!("/{path}")
                } else {
                    format!("{}{path}", location.url)
                };
                let reader = ObjectReader::new(Arc::clone(&location.store), path.clone())
                    .with_file_size(size);
                let builder =
                    ParquetRecordBatchStreamBuilder::new(reader)
                        .await
                        .map_err(|source| SourceError::Parquet {
                            location: display.clone(),
                            source,
                        })?;
                let file_schema = builder.schema();
                let normalized =
                    normalized_schema(file_schema).map_err(|reason| SourceError::Schema {
                        location: display.clone(),
                        reason,
                    })?;
                if schema.is_none() {
                    schema = Some(normalized);
                }
                let metadata = builder.metadata();
                let rows = metadata.file_metadata().num_rows().max(0) as u64;
                let min_ts =
                    StatisticsConverter::try_new(TS, file_schema, builder.parquet_schema())
                        .and_then(|c| c.row_group_mins(metadata.row_groups().iter()))
                        .ok()
                        .and_then(|mins| {
                            let mins = ts_to_ms(&mins).ok()?;
                            let mins = mins.as_primitive::<TimestampMillisecondType>();
                            (0..mins.len())
                                .filter(|&i| mins.is_valid(i))
                                .map(|i| mins.value(i))
                                .min()
                        })
                        // Without statistics the file must be opened first.
                        .unwrap_or(i64::MIN);
                if rows > 0 {
                    files.push(FileInfo {
                        store: Arc::clone(&location.store),
                        local: location.local_path(&path),
                        path,
                        display,
                        size,
                        min_ts,
                        rows,
                    });
                }
            }
        }
        let schema = schema.ok_or_else(|| SourceError::Empty(inputs.join(", ")))?;
        // Stable: equal first timestamps keep listing order.
        files.sort_by_key(|f| f.min_ts);
        Ok(Self {
            files,
            projection: Arc::clone(&schema),
            schema,
            batch_rows: batch_rows.max(1),
            speed,
            buffers: Arc::default(),
        })
    }

    /// The stream schema (see [`normalized_schema`]).
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows in all input files, from their footers.
    pub fn total_rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }

    /// Number of input files.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Decode only these columns of the stream schema (by index).
    pub fn project(&mut self, columns: &[usize]) {
        let fields: Vec<Field> = columns
            .iter()
            .map(|&i| self.schema.field(i).clone())
            .collect();
        self.projection = Arc::new(Schema::new(fields));
    }

    /// The schema of the batches this source emits.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.projection
    }

    async fn open_stream(
        &self,
        file: &FileInfo,
    ) -> Result<ParquetRecordBatchStream<ObjectReader>, SourceError> {
        let parquet_err = |source| SourceError::Parquet {
            location: file.display.clone(),
            source,
        };
        let mut reader =
            ObjectReader::new(Arc::clone(&file.store), file.path.clone()).with_file_size(file.size);
        if let Some(local) = &file.local {
            let opened = std::fs::File::open(local).map_err(|e| SourceError::Parquet {
                location: file.display.clone(),
                source: parquet::errors::ParquetError::External(Box::new(e)),
            })?;
            reader = reader.with_local_file(opened, Arc::clone(&self.buffers));
        }
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(parquet_err)?;
        let file_schema = Arc::clone(builder.schema());
        let roots: Vec<usize> = self
            .projection
            .fields()
            .iter()
            .filter_map(|f| file_schema.index_of(f.name()).ok())
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        builder
            .with_projection(mask)
            .with_batch_size(self.batch_rows())
            .build()
            .map_err(parquet_err)
    }

    /// Rows per decoded batch: the configured number, fewer for wide rows so that a batch
    /// holds about [`BATCH_BYTES`] of decoded columns (at least 1,024 rows). Memory in flight
    /// is then bounded by the channel capacities, whatever the number of columns.
    pub fn batch_rows(&self) -> usize {
        capped_batch_rows(self.batch_rows, &self.projection)
    }

    /// Replays every file into `tx` and ends with [`Message::End`].
    pub async fn run(
        self,
        tx: mpsc::Sender<Message>,
        metrics: Arc<PipelineMetrics>,
    ) -> Result<(), SourceError> {
        struct Active {
            file: usize,
            stream: ParquetRecordBatchStream<ObjectReader>,
            head: Option<Head>,
            done: bool,
        }
        let mut active: Vec<Active> = Vec::new();
        let mut next = 0usize;
        let mut pace: Option<(Instant, i64)> = None;
        loop {
            for a in active.iter_mut() {
                while a.head.is_none() && !a.done {
                    match a.stream.next().await {
                        None => a.done = true,
                        Some(Err(source)) => {
                            return Err(SourceError::Parquet {
                                location: self.files[a.file].display.clone(),
                                source,
                            });
                        }
                        Some(Ok(batch)) if batch.num_rows() == 0 => {}
                        Some(Ok(batch)) => {
                            let batch = conform(&batch, &self.projection).map_err(|reason| {
                                SourceError::Schema {
                                    location: self.files[a.file].display.clone(),
                                    reason,
                                }
                            })?;
                            a.head = Some(Head::new(batch));
                        }
                    }
                }
            }
            active.retain(|a| a.head.is_some());
            let bound = active
                .iter()
                .filter_map(|a| a.head.as_ref().map(|h| h.max))
                .min();
            if let Some(file) = self.files.get(next)
                && bound.is_none_or(|b| file.min_ts <= b)
            {
                let stream = self.open_stream(file).await?;
                active.push(Active {
                    file: next,
                    stream,
                    head: None,
                    done: false,
                });
                next += 1;
                continue;
            }
            let Some(bound) = bound else { break };
            // Every row at or before `bound` is now known: emit it.
            let mut parts: Vec<RecordBatch> = Vec::new();
            for a in active.iter_mut() {
                let Some(head) = a.head.take() else { continue };
                let (ready, rest) = head.split(bound).map_err(|e| SourceError::Schema {
                    location: self.files[a.file].display.clone(),
                    reason: e.to_string(),
                })?;
                parts.extend(ready);
                a.head = rest;
            }
            let out = match parts.len() {
                0 => continue,
                1 => parts.pop().expect("one part"),
                _ => {
                    let merged = concat_batches(&self.projection, &parts).map_err(|e| {
                        SourceError::Schema {
                            location: "merge".into(),
                            reason: e.to_string(),
                        }
                    })?;
                    sort_by_ts(merged).map_err(|e| SourceError::Schema {
                        location: "merge".into(),
                        reason: e.to_string(),
                    })?
                }
            };
            let first_ts = ts_values(&out).first().copied().unwrap_or(bound);
            if let Speed::Factor(factor) = self.speed {
                let (start, ts0) = *pace.get_or_insert((Instant::now(), first_ts));
                let due = start
                    + Duration::from_secs_f64(((first_ts - ts0).max(0) as f64 / 1000.0) / factor);
                tokio::time::sleep_until(due.into()).await;
            }
            metrics.add_source_rows(out.num_rows() as u64);
            tx.send(Message::Data(out))
                .await
                .map_err(|_| SourceError::Closed)?;
        }
        tx.send(Message::End)
            .await
            .map_err(|_| SourceError::Closed)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(metrics: usize) -> Schema {
        let mut fields = vec![
            Field::new(TS, healer_operators::schema::ts_type(), false),
            Field::new("resource", DataType::Utf8, false),
        ];
        fields.extend((0..metrics).map(|m| Field::new(format!("m{m}"), DataType::Float64, true)));
        Schema::new(fields)
    }

    /// A local file of `len` patterned bytes, opened, and a reader of its size.
    fn local_file(len: u32) -> (tempfile::TempDir, Vec<u8>, std::fs::File, ObjectReader) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
        let reader =
            ObjectReader::new(store, Path::from("unused")).with_file_size(content.len() as u64);
        let file = std::fs::File::open(&path).unwrap();
        (dir, content, file, reader)
    }

    #[tokio::test]
    async fn local_reads_reuse_their_buffers() {
        let (_dir, content, file, reader) = local_file(100_000);
        let pool = Arc::new(BufferPool::default());
        let mut reader = reader.with_local_reads(file, Arc::clone(&pool));
        let idle = |pool: &BufferPool| pool.idle.lock().unwrap().len();

        let read = reader
            .get_byte_ranges(vec![0..10, 5..60_000, 99_990..100_000])
            .await
            .unwrap();
        assert_eq!(read[0], content[0..10]);
        assert_eq!(read[1], content[5..60_000]);
        assert_eq!(read[2], content[99_990..100_000]);
        // A slice keeps its buffer out of the pool until it is dropped.
        let kept = read[1].slice(100..200);
        drop(read);
        assert_eq!(idle(&pool), 2);
        assert_eq!(kept, content[105..205]);
        drop(kept);
        assert_eq!(idle(&pool), 3);

        // The next reads take the idle buffers (the smallest that fits) instead of new ones.
        let again = reader.get_bytes(1_000..50_000).await.unwrap();
        assert_eq!(again, content[1_000..50_000]);
        assert_eq!(idle(&pool), 2);
        let small = reader.get_bytes(50..58).await.unwrap();
        assert_eq!(small, content[50..58]);
        assert_eq!(idle(&pool), 1);
        drop((again, small));
        assert_eq!(idle(&pool), 3);

        // An empty range takes no buffer; a range past the end is an error, not short data.
        assert!(reader.get_bytes(10..10).await.unwrap().is_empty());
        assert_eq!(idle(&pool), 3);
        assert!(reader.get_bytes(99_000..100_001).await.is_err());
    }

    #[tokio::test]
    async fn mapped_reads_give_the_file_bytes() {
        // Several pages, so ranges share pages and end inside them.
        let (_dir, content, file, reader) = local_file(300_000);
        let mut reader = reader.with_local_file(file, Arc::new(BufferPool::default()));
        assert!(matches!(reader.local, Some(LocalFile::Mapped(_))));
        let ranges = vec![0..10, 5..160_000, 150_000..150_001, 299_990..300_000];
        let read = reader.get_byte_ranges(ranges.clone()).await.unwrap();
        for (r, bytes) in ranges.iter().zip(&read) {
            assert_eq!(bytes[..], content[r.start as usize..r.end as usize]);
        }
        // Dropping a range releases its pages; slices of others on the same pages still
        // read the file's bytes.
        let kept = read[1].slice(140_000..150_000);
        drop(read);
        assert_eq!(kept[..], content[140_005..150_005]);
        let again = reader.get_bytes(149_000..151_000).await.unwrap();
        drop(kept);
        assert_eq!(again[..], content[149_000..151_000]);

        assert!(reader.get_bytes(10..10).await.unwrap().is_empty());
        assert!(reader.get_bytes(299_000..300_001).await.is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 20..10;
        assert!(reader.get_bytes(backwards).await.is_err());
    }

    #[test]
    fn wide_rows_get_smaller_batches() {
        // The benchmark's 18 columns (168 estimated bytes a row) keep the configured size.
        assert_eq!(capped_batch_rows(65_536, &schema(16)), 65_536);
        // 200 metrics: 1,640 bytes a row, 16 MiB / 1,640.
        assert_eq!(capped_batch_rows(65_536, &schema(200)), (16 << 20) / 1640);
        // Never below 1,024 rows, never above what is configured.
        assert_eq!(capped_batch_rows(65_536, &schema(100_000)), 1024);
        assert_eq!(capped_batch_rows(500, &schema(200)), 500);
    }
}
