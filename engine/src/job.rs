//! A replay job: source → event-time gate → keyed rule workers → merge → incident log.
//!
//! ```text
//!  ParquetSource ──► gate + router ──┬──► worker 0 (rules, keyed state) ──┐
//!   (async task)     (thread)        ├──► worker 1                       ──┼──► merge ──► IncidentLog
//!                        │           └──► worker …                       ──┘   (thread)   (async task)
//!                        └──► DeadLetter (async task)
//! ```
//! Every edge is a bounded channel of [`Message`]s. The router partitions rows by the key the
//! rules' windows partition on (normally `resource`), so each key's state lives in exactly
//! one worker. Workers report their anomalies at each watermark; the merge step waits for a
//! watermark from every worker, then forwards the union in canonical order (ts, resource,
//! metric, rule). The output therefore does not depend on the number of partitions or on
//! batch boundaries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use healer_operators::schema::{LOG_TAGS, RESOURCE, anomaly_schema};
use healer_operators::severity::Severity;
use healer_operators::unpivot::Unpivot;
use healer_sql::rule::required_columns;
use healer_sql::{CompiledRule, RuleCompiler, RuleErrors, RuleInstance, StreamTable};
use tokio::sync::mpsc;

use crate::config::{PipelineConfig, parse_speed};
use crate::gate::EventTimeGate;
use crate::message::{MAX_WATERMARK, Message};
use crate::metrics::{MetricsSnapshot, PipelineMetrics};
use crate::sink::{DeadLetter, IncidentLog, SinkError, WrittenFile};
use crate::source::{ParquetSource, SourceError};
use crate::store::{Location, StoreError};

/// The rules bundled with healer, used when no rule path is configured.
pub const BUNDLED_RULES: [(&str, &str); 1] =
    [("zscore.sql", include_str!("../../sql/rules/zscore.sql"))];

/// Errors of a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Rules did not compile.
    #[error("{0}")]
    Rules(#[from] RuleErrors),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A sink failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A location could not be resolved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A rule failed on data.
    #[error(transparent)]
    Exec(#[from] healer_sql::error::ExecError),
    /// An Arrow kernel failed.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// A pipeline task stopped because another one failed.
    #[error("pipeline stage `{0}` stopped early")]
    Closed(&'static str),
    /// A task panicked.
    #[error("internal error: task panicked: {0}")]
    Panic(String),
}

/// Counts per rule and severity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleCounts {
    /// Rule name.
    pub rule: String,
    /// Anomalies per severity, in [`Severity::ALL`] order.
    pub by_severity: [u64; 4],
}

/// What a finished job did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Wall time.
    pub elapsed: Duration,
    /// Counters at the end.
    pub metrics: MetricsSnapshot,
    /// Metric columns per row (cells = rows × this).
    pub metric_columns: usize,
    /// Keyed workers.
    pub partitions: usize,
    /// Input files.
    pub input_files: usize,
    /// Per-rule counts.
    pub rules: Vec<RuleCounts>,
    /// Incident-log files written.
    pub files: Vec<WrittenFile>,
    /// Dead-letter files written.
    pub dead_letter_files: Vec<WrittenFile>,
    /// Where the log is.
    pub out: String,
}

/// Compiles the configured rules (or the bundled ones) against `schema`.
pub fn compile_rules(
    config: &PipelineConfig,
    schema: SchemaRef,
) -> Result<Vec<Arc<CompiledRule>>, JobError> {
    let compiler = RuleCompiler::try_new(schema).map_err(JobError::Config)?;
    if config.rules.paths.is_empty() {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        for (name, text) in BUNDLED_RULES {
            match compiler.compile_str(std::path::Path::new(&format!("<bundled>/{name}")), text) {
                Ok(mut r) => rules.append(&mut r),
                Err(RuleErrors(mut e)) => errors.append(&mut e),
            }
        }
        return if errors.is_empty() {
            Ok(rules)
        } else {
            Err(RuleErrors(errors).into())
        };
    }
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for path in &config.rules.paths {
        match compiler.compile_path(path) {
            Ok(mut r) => rules.append(&mut r),
            Err(RuleErrors(mut e)) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(RuleErrors(errors).into())
    }
}

/// The column rows are partitioned on: one that every window of every rule partitions by.
pub fn partition_column(rules: &[Arc<CompiledRule>], schema: &SchemaRef) -> Option<String> {
    let windows: Vec<&Vec<String>> = rules.iter().flat_map(|r| r.partition_keys.iter()).collect();
    if windows.is_empty() {
        return Some(RESOURCE.to_string());
    }
    let common = |c: &str| windows.iter().all(|keys| keys.iter().any(|k| k == c));
    if common(RESOURCE) {
        return Some(RESOURCE.to_string());
    }
    windows[0]
        .iter()
        .find(|k| common(k) && schema.index_of(k).is_ok())
        .cloned()
}

/// A prepared replay.
#[derive(Debug)]
pub struct Job {
    source: ParquetSource,
    rules: Vec<Arc<CompiledRule>>,
    partitions: usize,
    partition_by: Option<usize>,
    out: Location,
    config: PipelineConfig,
    metrics: Arc<PipelineMetrics>,
}

impl Job {
    /// Opens the source, compiles the rules against its schema and resolves the output.
    pub async fn prepare(config: &PipelineConfig) -> Result<Self, JobError> {
        let problems = config.validate();
        if !problems.is_empty() {
            let text: Vec<String> = problems
                .iter()
                .map(|(k, m)| format!("`{k}`: {m}"))
                .collect();
            return Err(JobError::Config(text.join("; ")));
        }
        if config.source.paths.is_empty() {
            return Err(JobError::Config(
                "no input: set source.paths or pass --input".into(),
            ));
        }
        let speed = parse_speed(&config.source.speed).map_err(JobError::Config)?;
        let mut source = ParquetSource::open(
            &config.source.paths,
            &config.source.s3,
            config.source.batch_rows,
            speed,
        )
        .await?;
        // Compile once to learn which columns the rules read, then against the projection.
        let full = Arc::clone(source.schema());
        let rules = compile_rules(config, Arc::clone(&full))?;
        let columns = required_columns(&full, &rules);
        source.project(&columns);
        let rules = compile_rules(config, Arc::clone(source.output_schema()))?;
        let key = partition_column(&rules, source.output_schema());
        let partition_by = key
            .as_ref()
            .and_then(|k| source.output_schema().index_of(k).ok());
        let partitions = if partition_by.is_some() {
            config.partitions()
        } else {
            1
        };
        let out = Location::parse(&config.sink.out, &config.sink.s3, true)?;
        Ok(Self {
            source,
            rules,
            partitions,
            partition_by,
            out,
            config: config.clone(),
            metrics: Arc::new(PipelineMetrics::default()),
        })
    }

    /// The compiled rules.
    pub fn rules(&self) -> &[Arc<CompiledRule>] {
        &self.rules
    }

    /// The columns the source decodes (projection pushdown from the rules).
    pub fn input_schema(&self) -> &SchemaRef {
        self.source.output_schema()
    }

    /// Rows the source will read.
    pub fn total_rows(&self) -> u64 {
        self.source.total_rows()
    }

    /// Live counters.
    pub fn metrics(&self) -> Arc<PipelineMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Runs to the end of the input.
    pub async fn run(self) -> Result<Summary, JobError> {
        let started = Instant::now();
        let capacity = self.config.engine.channel_capacity.max(1);
        let schema = Arc::clone(self.source.output_schema());
        let metric_columns = schema
            .fields()
            .iter()
            .filter(|f| healer_operators::schema::is_metric_type(f.data_type()))
            .count();
        let metrics = Arc::clone(&self.metrics);
        let partitions = self.partitions;
        let input_files = self.source.file_count();

        let (source_tx, source_rx) = mpsc::channel::<Message>(capacity);
        let (dead_tx, mut dead_rx) = mpsc::channel::<Message>(capacity);
        let (merge_tx, merge_rx) = mpsc::channel::<(usize, Step)>(capacity * partitions);
        let (sink_tx, mut sink_rx) = mpsc::channel::<Message>(capacity);
        let mut worker_txs = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();

        for worker in 0..partitions {
            let (tx, rx) = mpsc::channel::<Message>(capacity);
            worker_txs.push(tx);
            let instances = self
                .rules
                .iter()
                .map(|r| r.instantiate())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| JobError::Config(e.to_string()))?;
            let unpivot = if self.rules.iter().any(|r| r.table == StreamTable::Samples) {
                Some(Unpivot::try_new(&schema).map_err(|e| JobError::Config(e.to_string()))?)
            } else {
                None
            };
            let tags = TagFiller::new(&schema);
            let merge_tx = merge_tx.clone();
            let metrics = Arc::clone(&metrics);
            tasks.spawn_blocking(move || {
                run_worker(worker, rx, merge_tx, instances, unpivot, tags, &metrics)
            });
        }
        drop(merge_tx);

        let source = self.source;
        let m = Arc::clone(&metrics);
        tasks.spawn(async move { source.run(source_tx, m).await.map_err(JobError::from) });

        let gate = EventTimeGate::new(Arc::clone(&schema), self.config.out_of_orderness_ms());
        let key = self.partition_by;
        let m = Arc::clone(&metrics);
        tasks.spawn_blocking(move || run_router(source_rx, gate, key, worker_txs, dead_tx, &m));

        tasks.spawn_blocking(move || run_merge(merge_rx, partitions, sink_tx));

        let out = self.out.clone();
        let max_rows = self.config.sink.max_rows_per_file;
        let sink = tokio::spawn(async move {
            let mut log = IncidentLog::new(out, anomaly_schema(), max_rows);
            let mut counts: Vec<RuleCounts> = Vec::new();
            while let Some(msg) = sink_rx.recv().await {
                match msg {
                    Message::Data(batch) => {
                        count(&mut counts, &batch);
                        log.push(batch).await?;
                    }
                    Message::Watermark(w) => log.advance(w).await?,
                    Message::Barrier(_) => {}
                    Message::End => {
                        log.advance(MAX_WATERMARK).await?;
                        return Ok::<_, JobError>((log.written().to_vec(), counts));
                    }
                }
            }
            Err(JobError::Closed("merge"))
        });
        let out = self.out.clone();
        let dead = tokio::spawn(async move {
            let mut dl = DeadLetter::new(out, max_rows);
            while let Some(msg) = dead_rx.recv().await {
                match msg {
                    Message::Data(batch) => dl.push(batch).await?,
                    Message::End => {
                        dl.flush().await?;
                        return Ok::<_, JobError>(dl.written().to_vec());
                    }
                    _ => {}
                }
            }
            Err(JobError::Closed("router"))
        });

        let mut errors = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(JobError::Panic(e.to_string())),
            }
        }
        let sink = sink.await.map_err(|e| JobError::Panic(e.to_string()))?;
        let dead = dead.await.map_err(|e| JobError::Panic(e.to_string()))?;
        let (files, mut counts) = match sink {
            Ok(v) => v,
            Err(e) => {
                errors.push(e);
                (Vec::new(), Vec::new())
            }
        };
        let dead_letter_files = match dead {
            Ok(v) => v,
            Err(e) => {
                errors.push(e);
                Vec::new()
            }
        };
        // The root cause is the first error that is not a consequence of another.
        if let Some(i) = errors.iter().position(|e| {
            !matches!(
                e,
                JobError::Closed(_) | JobError::Source(SourceError::Closed)
            )
        }) {
            return Err(errors.swap_remove(i));
        }
        if let Some(e) = errors.pop() {
            return Err(e);
        }
        for r in &self.rules {
            if !counts.iter().any(|c| c.rule == r.name) {
                counts.push(RuleCounts {
                    rule: r.name.clone(),
                    by_severity: [0; 4],
                });
            }
        }
        counts.sort_by(|a, b| a.rule.cmp(&b.rule));
        Ok(Summary {
            elapsed: started.elapsed(),
            metrics: metrics.snapshot(),
            metric_columns,
            partitions,
            input_files,
            rules: counts,
            files,
            dead_letter_files,
            out: self.out.display(),
        })
    }
}

fn count(counts: &mut Vec<RuleCounts>, batch: &RecordBatch) {
    let rules = batch
        .column_by_name("rule")
        .expect("anomaly schema")
        .as_string::<i32>();
    let severities = batch
        .column_by_name("severity")
        .expect("anomaly schema")
        .as_string::<i32>();
    for i in 0..batch.num_rows() {
        let rule = rules.value(i);
        let idx = match counts.iter().position(|c| c.rule == rule) {
            Some(i) => i,
            None => {
                counts.push(RuleCounts {
                    rule: rule.to_string(),
                    by_severity: [0; 4],
                });
                counts.len() - 1
            }
        };
        let sev = Severity::parse(severities.value(i)).unwrap_or(Severity::Low);
        counts[idx].by_severity[sev as usize] += 1;
    }
}

/// A worker's output at one watermark.
#[derive(Debug)]
enum Step {
    At(Vec<RecordBatch>, i64),
    End,
}

fn send_blocking<T>(tx: &mpsc::Sender<T>, msg: T, stage: &'static str) -> Result<(), JobError> {
    tx.blocking_send(msg).map_err(|_| JobError::Closed(stage))
}

fn partition(batch: &RecordBatch, key: usize, parts: usize) -> Result<Vec<RecordBatch>, JobError> {
    let column = arrow::compute::cast(batch.column(key), &arrow::datatypes::DataType::Utf8)?;
    let keys = column.as_string::<i32>();
    let mut indices: Vec<Vec<u32>> = vec![Vec::with_capacity(batch.num_rows() / parts + 1); parts];
    for i in 0..batch.num_rows() {
        let h = if keys.is_null(i) {
            0
        } else {
            healer_operators::id::fnv1a64(keys.value(i).as_bytes())
        };
        indices[(h % parts as u64) as usize].push(i as u32);
    }
    indices
        .into_iter()
        .map(|idx| {
            let idx = UInt32Array::from(idx);
            Ok(take_record_batch(batch, &idx)?)
        })
        .collect()
}

fn run_router(
    mut rx: mpsc::Receiver<Message>,
    mut gate: EventTimeGate,
    key: Option<usize>,
    workers: Vec<mpsc::Sender<Message>>,
    dead: mpsc::Sender<Message>,
    metrics: &PipelineMetrics,
) -> Result<(), JobError> {
    let forward = |out: crate::gate::GateOutput| -> Result<(), JobError> {
        if let Some(rejected) = out.rejected {
            metrics.add_late_rows(out.late as u64);
            metrics.add_invalid_rows((rejected.num_rows() - out.late) as u64);
            send_blocking(&dead, Message::Data(rejected), "dead letter")?;
        }
        for batch in out.released {
            metrics.add_gate_rows(batch.num_rows() as u64);
            match key {
                Some(k) if workers.len() > 1 => {
                    for (w, part) in partition(&batch, k, workers.len())?.into_iter().enumerate() {
                        if part.num_rows() > 0 {
                            send_blocking(&workers[w], Message::Data(part), "worker")?;
                        }
                    }
                }
                _ => send_blocking(&workers[0], Message::Data(batch), "worker")?,
            }
        }
        if let Some(w) = out.watermark {
            metrics.set_watermark(w);
            for tx in &workers {
                send_blocking(tx, Message::Watermark(w), "worker")?;
            }
        }
        Ok(())
    };
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Message::Data(batch) => forward(gate.push(batch)?)?,
            Message::Watermark(_) | Message::Barrier(_) => {}
            Message::End => {
                let out = gate.finish()?;
                forward(out)?;
                for tx in &workers {
                    send_blocking(tx, Message::End, "worker")?;
                }
                send_blocking(&dead, Message::End, "dead letter")?;
                return Ok(());
            }
        }
    }
    Err(JobError::Closed("source"))
}

/// Fills the `service` / `region` of anomalies from the latest tags seen for the resource.
#[derive(Debug)]
struct TagFiller {
    resource: usize,
    tags: Vec<(usize, usize)>,
    latest: std::collections::HashMap<String, Vec<Option<String>>>,
}

impl TagFiller {
    fn new(schema: &SchemaRef) -> Option<Self> {
        let resource = schema.index_of(RESOURCE).ok()?;
        let tags: Vec<(usize, usize)> = LOG_TAGS
            .iter()
            .filter_map(|t| {
                let src = schema.index_of(t).ok()?;
                let dst = anomaly_schema().index_of(t).ok()?;
                Some((src, dst))
            })
            .collect();
        (!tags.is_empty()).then(|| Self {
            resource,
            tags,
            latest: Default::default(),
        })
    }

    fn observe(&mut self, batch: &RecordBatch) {
        let resources = batch.column(self.resource).as_string::<i32>();
        let tag_columns: Vec<&StringArray> = self
            .tags
            .iter()
            .map(|&(s, _)| batch.column(s).as_string::<i32>())
            .collect();
        for i in 0..batch.num_rows() {
            if resources.is_null(i) {
                continue;
            }
            let r = resources.value(i);
            let current: Vec<Option<&str>> = tag_columns
                .iter()
                .map(|c| c.is_valid(i).then(|| c.value(i)))
                .collect();
            let same = self
                .latest
                .get(r)
                .is_some_and(|v| v.iter().map(|t| t.as_deref()).eq(current.iter().copied()));
            if !same {
                self.latest.insert(
                    r.to_string(),
                    current.iter().map(|t| t.map(str::to_owned)).collect(),
                );
            }
        }
    }

    fn fill(&self, anomalies: RecordBatch) -> Result<RecordBatch, JobError> {
        let resources = anomalies
            .column_by_name(RESOURCE)
            .expect("anomaly schema")
            .as_string::<i32>()
            .clone();
        let mut columns: Vec<ArrayRef> = anomalies.columns().to_vec();
        for (t, &(_, dst)) in self.tags.iter().enumerate() {
            let given = anomalies.column(dst).as_string::<i32>();
            let filled: StringArray = (0..anomalies.num_rows())
                .map(|i| {
                    if given.is_valid(i) {
                        Some(given.value(i).to_string())
                    } else {
                        self.latest
                            .get(resources.value(i))
                            .and_then(|v| v[t].clone())
                    }
                })
                .collect();
            columns[dst] = Arc::new(filled);
        }
        Ok(RecordBatch::try_new(anomalies.schema(), columns)?)
    }
}

fn run_worker(
    worker: usize,
    mut rx: mpsc::Receiver<Message>,
    tx: mpsc::Sender<(usize, Step)>,
    mut rules: Vec<RuleInstance>,
    unpivot: Option<Unpivot>,
    mut tags: Option<TagFiller>,
    metrics: &PipelineMetrics,
) -> Result<(), JobError> {
    let mut pending: Vec<RecordBatch> = Vec::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Message::Data(batch) => {
                if let Some(t) = tags.as_mut() {
                    t.observe(&batch);
                }
                // The samples view in the form each rule can take, built at most once:
                // one batch per metric (no copy) for rules that never mix metrics, the
                // row-major view for the others.
                let mut row_major: Option<RecordBatch> = None;
                let mut per_metric: Option<Vec<RecordBatch>> = None;
                for rule in &mut rules {
                    let inputs = match (rule.rule().table, unpivot.as_ref()) {
                        (StreamTable::Metrics, _) => vec![batch.clone()],
                        (StreamTable::Samples, Some(u)) if rule.rule().metric_separable => {
                            if per_metric.is_none() {
                                per_metric = Some(u.per_metric(&batch).map_err(view_error)?);
                            }
                            per_metric.clone().unwrap_or_default()
                        }
                        (StreamTable::Samples, Some(u)) => {
                            if row_major.is_none() {
                                row_major = Some(u.apply(&batch).map_err(view_error)?);
                            }
                            row_major.iter().cloned().collect()
                        }
                        (StreamTable::Samples, None) => {
                            unreachable!("samples view built when a rule reads it")
                        }
                    };
                    for input in inputs {
                        let out = rule.anomalies(input)?;
                        if out.num_rows() > 0 {
                            metrics.add_anomalies(out.num_rows() as u64);
                            pending.push(match &tags {
                                Some(t) => t.fill(out)?,
                                None => out,
                            });
                        }
                    }
                }
            }
            Message::Watermark(w) => send_blocking(
                &tx,
                (worker, Step::At(std::mem::take(&mut pending), w)),
                "merge",
            )?,
            Message::Barrier(_) => {}
            Message::End => {
                send_blocking(&tx, (worker, Step::End), "merge")?;
                return Ok(());
            }
        }
    }
    Err(JobError::Closed("router"))
}

fn view_error(e: healer_operators::OperatorError) -> JobError {
    JobError::Config(e.to_string())
}

/// Sorts anomaly rows by (ts, resource, metric, rule).
pub fn canonical_order(batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    if batch.num_rows() <= 1 {
        return Ok(batch.clone());
    }
    let columns: Vec<SortColumn> = ["ts", "resource", "metric", "rule"]
        .iter()
        .map(|c| SortColumn {
            values: Arc::clone(batch.column_by_name(c).expect("anomaly schema")),
            options: None,
        })
        .collect();
    let idx = lexsort_to_indices(&columns, None)?;
    take_record_batch(batch, &idx)
}

fn run_merge(
    mut rx: mpsc::Receiver<(usize, Step)>,
    workers: usize,
    tx: mpsc::Sender<Message>,
) -> Result<(), JobError> {
    let mut queues: Vec<std::collections::VecDeque<(Vec<RecordBatch>, i64)>> =
        (0..workers).map(|_| Default::default()).collect();
    let mut ended = 0;
    let schema = anomaly_schema();
    while let Some((worker, step)) = rx.blocking_recv() {
        match step {
            Step::At(batches, w) => queues[worker].push_back((batches, w)),
            Step::End => ended += 1,
        }
        while queues.iter().all(|q| !q.is_empty()) {
            let mut batches = Vec::new();
            let mut watermark = i64::MIN;
            for q in queues.iter_mut() {
                let (mut b, w) = q.pop_front().expect("non-empty");
                batches.append(&mut b);
                watermark = w;
            }
            if !batches.is_empty() {
                let merged = concat_batches(&schema, &batches)?;
                send_blocking(&tx, Message::Data(canonical_order(&merged)?), "sink")?;
            }
            send_blocking(&tx, Message::Watermark(watermark), "sink")?;
        }
        if ended == workers {
            send_blocking(&tx, Message::End, "sink")?;
            return Ok(());
        }
    }
    Err(JobError::Closed("workers"))
}
