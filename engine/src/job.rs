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
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use healer_operators::keys::KeyValue;
use healer_operators::order::canonical_order;
use healer_operators::schema::{LOG_TAGS, RESOURCE, anomaly_schema};
use healer_operators::severity::Severity;
use healer_operators::unpivot::{METRIC, Unpivot};
use healer_sql::rule::required_columns;
use healer_sql::{CompiledRule, RuleCompiler, RuleErrors, RuleInstance, StreamTable};
use tokio::sync::mpsc;

use crate::checkpoint::{Ack, Part, Restore, WorkerState};
use crate::config::{PipelineConfig, parse_speed};
use crate::gate::EventTimeGate;
use crate::lease::KeyRanges;
use crate::message::{MAX_WATERMARK, Message};
use crate::metrics::{MetricsSnapshot, PipelineMetrics};
use crate::sink::{DeadLetter, IncidentLog, SinkError, WrittenFile};
use crate::source::{ParquetSource, SourceError};
use crate::store::{Location, StoreError};

/// The rules bundled with healer, used when no rule path is configured: the novelty
/// detector (`sql/rules/novelty.sql`). The reference z-score rule, `sql/rules/zscore.sql`,
/// runs with `--rules`.
pub const BUNDLED_RULES: [(&str, &str); 1] =
    [("novelty.sql", include_str!("../../sql/rules/novelty.sql"))];

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
    /// A checkpoint could not be read, written or restored.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
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
    if let Some(lib) = &config.rules.onnxruntime {
        // Installed before any rule loads a forecaster: the process has one ONNX Runtime.
        let runtime = healer_sql::lstm::runtime(healer_sql::lstm::Backend::Native(lib.clone()))
            .map_err(|e| JobError::Config(format!("rules.onnxruntime: {e}")))?;
        if runtime.backend != healer_sql::lstm::Backend::Native(lib.clone()) {
            return Err(JobError::Config(format!(
                "rules.onnxruntime: this process already runs ONNX Runtime on {:?}",
                runtime.backend
            )));
        }
    }
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

/// Every problem [`PipelineConfig::validate`] finds, as one error.
pub fn validated(config: &PipelineConfig) -> Result<(), JobError> {
    let problems = config.validate();
    if problems.is_empty() {
        return Ok(());
    }
    let text: Vec<String> = problems
        .iter()
        .map(|(k, m)| format!("`{k}`: {m}"))
        .collect();
    Err(JobError::Config(text.join("; ")))
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
    pipeline: Pipeline,
}

impl Job {
    /// Opens the source, compiles the rules against its schema and resolves the output.
    pub async fn prepare(config: &PipelineConfig) -> Result<Self, JobError> {
        validated(config)?;
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
        let out = Location::parse(&config.sink.out, &config.sink.s3, true)?;
        let pipeline = Pipeline::new(config, Arc::clone(source.output_schema()), rules, out);
        Ok(Self { source, pipeline })
    }

    /// The compiled rules.
    pub fn rules(&self) -> &[Arc<CompiledRule>] {
        &self.pipeline.rules
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
        Arc::clone(&self.pipeline.metrics)
    }

    /// Runs to the end of the input.
    pub async fn run(self) -> Result<Summary, JobError> {
        let started = Instant::now();
        let capacity = self.pipeline.config.engine.channel_capacity.max(1);
        let input_files = self.source.file_count();
        let (source_tx, source_rx) = mpsc::channel::<Message>(capacity);
        let source = self.source;
        let m = Arc::clone(&self.pipeline.metrics);
        let source_task =
            tokio::spawn(async move { source.run(source_tx, m).await.map_err(JobError::from) });
        let output = self.pipeline.run(source_rx, None).await;
        let source = source_task
            .await
            .map_err(|e| JobError::Panic(e.to_string()))?;
        let output = first_error(output, source)?;
        Ok(output.into_summary(started, input_files))
    }
}

/// The result of the pipeline and of its source: the pipeline's first error that is not a
/// consequence of another stage stopping wins.
pub(crate) fn first_error(
    output: Result<PipelineOutput, JobError>,
    source: Result<(), JobError>,
) -> Result<PipelineOutput, JobError> {
    match (output, source) {
        (Ok(o), Ok(())) => Ok(o),
        (Err(e), Ok(())) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Err(p), Err(s)) => Err(if is_consequence(&p) { s } else { p }),
    }
}

fn is_consequence(e: &JobError) -> bool {
    matches!(
        e,
        JobError::Closed(_) | JobError::Source(SourceError::Closed)
    )
}

/// What the pipeline produced.
#[derive(Debug)]
pub(crate) struct PipelineOutput {
    pub files: Vec<WrittenFile>,
    pub dead_letter_files: Vec<WrittenFile>,
    pub counts: Vec<RuleCounts>,
    pub metric_columns: usize,
    pub partitions: usize,
    pub metrics: Arc<PipelineMetrics>,
    pub out: String,
}

impl PipelineOutput {
    pub(crate) fn into_summary(self, started: Instant, input_files: usize) -> Summary {
        Summary {
            elapsed: started.elapsed(),
            metrics: self.metrics.snapshot(),
            metric_columns: self.metric_columns,
            partitions: self.partitions,
            input_files,
            rules: self.counts,
            files: self.files,
            dead_letter_files: self.dead_letter_files,
            out: self.out,
        }
    }
}

/// Streaming settings of a pipeline: checkpoints and the state to start from.
#[derive(Debug)]
pub(crate) struct Streaming {
    /// Where stages report their checkpoint parts.
    pub acks: mpsc::Sender<Ack>,
    /// The saved state to start from (none: a fresh start).
    pub restore: Vec<Restore>,
    /// The epoch rows written now belong to.
    pub open_epoch: u64,
    /// The sinks write buffered rows at least this often.
    pub flush_interval: Duration,
}

/// The number of metric columns of `schema`.
fn metric_columns(schema: &SchemaRef) -> usize {
    schema
        .fields()
        .iter()
        .filter(|f| healer_operators::schema::is_metric_type(f.data_type()))
        .count()
}

/// The dataflow after the source: gate and router, keyed workers, merge, sinks.
#[derive(Debug)]
pub(crate) struct Pipeline {
    pub schema: SchemaRef,
    pub rules: Vec<Arc<CompiledRule>>,
    pub partitions: usize,
    pub partition_by: Option<usize>,
    /// Workers split the metric columns instead of the rows (see [`Route::Metric`]).
    pub by_metric: bool,
    pub out: Location,
    pub config: PipelineConfig,
    pub metrics: Arc<PipelineMetrics>,
}

impl Pipeline {
    /// A pipeline running `rules` over rows of `schema` into the log at `out`, keyed on the
    /// column every window partitions by (one worker when there is none).
    pub(crate) fn new(
        config: &PipelineConfig,
        schema: SchemaRef,
        rules: Vec<Arc<CompiledRule>>,
        out: Location,
    ) -> Self {
        let partition_by = partition_column(&rules, &schema).and_then(|k| schema.index_of(&k).ok());
        let partitions = if partition_by.is_some() {
            config.partitions()
        } else {
            1
        };
        // Only with a metric for every worker: with fewer, some would idle.
        let by_metric = partitions > 1
            && metric_columns(&schema) >= partitions
            && rules
                .iter()
                .all(|r| r.table == StreamTable::Samples && r.metric_separable);
        Self {
            schema,
            rules,
            partitions,
            partition_by,
            by_metric,
            out,
            config: config.clone(),
            metrics: Arc::new(PipelineMetrics::default()),
        }
    }

    /// Runs until the source ends (or suspends, when streaming).
    pub(crate) async fn run(
        self,
        source_rx: mpsc::Receiver<Message>,
        streaming: Option<Streaming>,
    ) -> Result<PipelineOutput, JobError> {
        let capacity = self.config.engine.channel_capacity.max(1);
        let schema = Arc::clone(&self.schema);
        let metric_columns = metric_columns(&schema);
        let metrics = Arc::clone(&self.metrics);
        let partitions = self.partitions;
        let acks = streaming.as_ref().map(|s| s.acks.clone());
        let restore: &[Restore] = streaming.as_ref().map_or(&[], |s| &s.restore);
        let unpivot = if self.rules.iter().any(|r| r.table == StreamTable::Samples) {
            Some(Unpivot::try_new(&schema).map_err(|e| JobError::Config(e.to_string()))?)
        } else {
            None
        };
        let (routing, route) = match (self.by_metric, &unpivot, self.partition_by) {
            (true, Some(u), _) => (Routing::Metric(u.metric_names()), Route::Metric),
            (_, _, Some(i)) => (
                Routing::Column(schema.field(i).name().clone()),
                Route::Key(i),
            ),
            _ => (Routing::All, Route::One),
        };

        let (dead_tx, dead_rx) = mpsc::channel::<Message>(capacity);
        let (merge_tx, merge_rx) = mpsc::channel::<(usize, Step)>(capacity * partitions);
        let (sink_tx, sink_rx) = mpsc::channel::<Message>(capacity);
        let mut worker_txs = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();

        for worker in 0..partitions {
            let (tx, rx) = mpsc::channel::<Message>(capacity);
            worker_txs.push(tx);
            let mut instances = self
                .rules
                .iter()
                .map(|r| r.instantiate())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| JobError::Config(e.to_string()))?;
            let mut tags = TagFiller::new(&schema);
            for part in restore {
                let owner = Owner {
                    routing: routing.clone(),
                    worker,
                    partitions,
                    keys: part.keys.clone(),
                };
                restore_worker(
                    &mut instances,
                    tags.as_mut(),
                    &part.checkpoint.workers,
                    &owner,
                )?;
            }
            let merge_tx = merge_tx.clone();
            let metrics = Arc::clone(&metrics);
            let parts = WorkerParts {
                worker,
                metric_share: (route == Route::Metric).then_some(partitions),
                rules: instances,
                unpivot: unpivot.clone(),
                tags,
                acks: acks.clone(),
            };
            tasks.spawn_blocking(move || run_worker(parts, rx, merge_tx, &metrics));
        }
        drop(merge_tx);

        let mut gate = EventTimeGate::new(Arc::clone(&schema), self.config.out_of_orderness_ms());
        if streaming.is_some() {
            gate = gate.with_external_watermarks();
        }
        let gates: Vec<_> = restore
            .iter()
            .map(|p| (&p.checkpoint.gate, p.keys.as_ref()))
            .collect();
        if !gates.is_empty() {
            gate.restore_parts(&gates)?;
        }
        let m = Arc::clone(&metrics);
        let router_acks = acks.clone();
        tasks.spawn_blocking(move || {
            run_router(source_rx, gate, route, worker_txs, dead_tx, &m, router_acks)
        });

        tasks.spawn_blocking(move || run_merge(merge_rx, partitions, sink_tx));

        let sink_options = SinkOptions {
            out: self.out.clone(),
            max_rows: self.config.sink.max_rows_per_file,
            streaming: streaming
                .as_ref()
                .map(|s| (s.open_epoch, s.flush_interval, s.acks.clone())),
        };
        let sink = tokio::spawn(run_anomaly_sink(sink_rx, sink_options.clone()));
        let dead = tokio::spawn(run_dead_letter(dead_rx, "dead_letter", sink_options));

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
        if let Some(i) = errors.iter().position(|e| !is_consequence(e)) {
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
        Ok(PipelineOutput {
            files,
            dead_letter_files,
            counts,
            metric_columns,
            partitions,
            metrics,
            out: self.out.display(),
        })
    }
}

/// Where and how the sinks write.
#[derive(Debug, Clone)]
pub(crate) struct SinkOptions {
    pub out: Location,
    pub max_rows: usize,
    /// Streaming: open epoch, flush interval, checkpoint parts.
    pub streaming: Option<(u64, Duration, mpsc::Sender<Ack>)>,
}

async fn run_anomaly_sink(
    mut rx: mpsc::Receiver<Message>,
    options: SinkOptions,
) -> Result<(Vec<WrittenFile>, Vec<RuleCounts>), JobError> {
    let mut log = IncidentLog::new(options.out, anomaly_schema(), options.max_rows);
    let mut tick = None;
    let mut acks = None;
    if let Some((epoch, every, a)) = options.streaming {
        log = log.streaming(epoch);
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick = Some(t);
        acks = Some(a);
    }
    let mut counts: Vec<RuleCounts> = Vec::new();
    loop {
        let msg = match tick.as_mut() {
            Some(t) => tokio::select! {
                m = rx.recv() => m,
                _ = t.tick() => {
                    log.flush_open().await?;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(msg) = msg else {
            return Err(JobError::Closed("merge"));
        };
        match msg {
            Message::Data(batch) => {
                count(&mut counts, &batch);
                log.push(batch).await?;
            }
            Message::Watermark(w) => log.advance(w).await?,
            Message::Barrier(epoch) => {
                if let Some(acks) = &acks {
                    log.commit(epoch).await?;
                    acks.send((epoch, Part::Committed("anomalies")))
                        .await
                        .map_err(|_| JobError::Closed("checkpoints"))?;
                }
            }
            Message::End => {
                log.advance(MAX_WATERMARK).await?;
                return Ok((log.written().to_vec(), counts));
            }
            Message::Suspend => return Ok((log.written().to_vec(), counts)),
        }
    }
}

/// The dead-letter writer task (`prefix` names its folder and its checkpoint part).
pub(crate) async fn run_dead_letter(
    mut rx: mpsc::Receiver<Message>,
    prefix: &'static str,
    options: SinkOptions,
) -> Result<Vec<WrittenFile>, JobError> {
    let mut dl = DeadLetter::with_prefix(options.out, prefix, options.max_rows);
    let mut tick = None;
    let mut acks = None;
    if let Some((epoch, every, a)) = options.streaming {
        dl = dl.streaming(epoch);
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick = Some(t);
        acks = Some(a);
    }
    loop {
        let msg = match tick.as_mut() {
            Some(t) => tokio::select! {
                m = rx.recv() => m,
                _ = t.tick() => {
                    dl.flush().await?;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(msg) = msg else {
            return Err(JobError::Closed("router"));
        };
        match msg {
            Message::Data(batch) => dl.push(batch).await?,
            Message::Barrier(epoch) => {
                if let Some(acks) = &acks {
                    dl.commit(epoch).await?;
                    acks.send((epoch, Part::Committed(prefix)))
                        .await
                        .map_err(|_| JobError::Closed("checkpoints"))?;
                }
            }
            Message::End => {
                dl.flush().await?;
                return Ok(dl.written().to_vec());
            }
            Message::Suspend => return Ok(dl.written().to_vec()),
            Message::Watermark(_) => {}
        }
    }
}

/// What decides a key's worker, as the router routes.
#[derive(Debug, Clone)]
enum Routing {
    /// One worker owns everything.
    All,
    /// The hash of this column's value ([`Route::Key`]).
    Column(String),
    /// The position of the key's metric among these, the samples view's metrics
    /// ([`Route::Metric`]).
    Metric(Vec<String>),
}

/// Which worker takes a saved key: the one the router sends its rows to, if the saved
/// state supplies the key at all (a scaled-out worker restores a shard's resources only).
#[derive(Debug, Clone)]
struct Owner {
    routing: Routing,
    worker: usize,
    partitions: usize,
    keys: Option<KeyRanges>,
}

impl Owner {
    fn owns_value(&self, value: Option<&str>) -> bool {
        let h = value.map_or(0, |v| healer_operators::id::fnv1a64(v.as_bytes()));
        (self.partitions <= 1 || (h % self.partitions as u64) as usize == self.worker)
            && self
                .keys
                .as_ref()
                .is_none_or(|k| value.is_some_and(|v| k.contains_key(v)))
    }

    fn owns(&self, key_names: &[String], key: &[KeyValue]) -> bool {
        let value = |name: &str| {
            key_names
                .iter()
                .position(|n| n == name)
                .map(|i| key[i].as_text())
        };
        match &self.routing {
            Routing::All => true,
            Routing::Column(routing) => match value(routing) {
                Some(v) => self.owns_value(v.as_deref()),
                None => self.worker == 0 && self.keys.is_none(),
            },
            Routing::Metric(metrics) => {
                // A metric not in the view (it never gets rows) stays with worker 0.
                let m = value(METRIC)
                    .flatten()
                    .and_then(|v| metrics.iter().position(|m| *m == v))
                    .unwrap_or(0);
                m % self.partitions.max(1) == self.worker
                    && self.keys.as_ref().is_none_or(|k| {
                        value(RESOURCE)
                            .flatten()
                            .is_some_and(|r| k.contains_key(&r))
                    })
            }
        }
    }
}

fn restore_worker(
    rules: &mut [RuleInstance],
    tags: Option<&mut TagFiller>,
    saved: &[WorkerState],
    owner: &Owner,
) -> Result<(), JobError> {
    let keep = |names: &[String], key: &[KeyValue]| owner.owns(names, key);
    for state in saved {
        for rule_state in &state.rules {
            let Some(rule) = rules.iter_mut().find(|r| r.rule().name == rule_state.rule) else {
                return Err(JobError::Config(format!(
                    "the checkpoint holds state of rule `{}`, which is not loaded: restore with the \
                     same rules, or start without the checkpoint",
                    rule_state.rule
                )));
            };
            rule.restore(rule_state, &keep)?;
        }
    }
    // Tags are looked up by resource, which need not be the routing column: every worker
    // gets them all (extra entries are never read), but only of the resources this saved
    // state supplies (a scaled-out worker's shards).
    if let Some(tags) = tags {
        for state in saved {
            for (resource, values) in &state.tags {
                if owner.keys.as_ref().is_none_or(|k| k.contains_key(resource)) {
                    tags.latest.insert(resource.clone(), values.clone());
                }
            }
        }
    }
    Ok(())
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

/// A worker's output at one watermark, or at a barrier.
#[derive(Debug)]
enum Step {
    At(Vec<RecordBatch>, i64),
    Barrier(Vec<RecordBatch>, u64),
    End,
    Suspend,
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

/// How the router spreads rows over the keyed workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Everything to worker 0.
    One,
    /// Each row to the worker of its key column's hash.
    Key(usize),
    /// Every batch to every worker, which takes its share of the metric columns (metric
    /// `m` of the samples view to worker `m % workers`). Used when every rule reads the
    /// samples view and never mixes metrics (each window partitions by metric), so a series
    /// is still whole in one worker; the batches go out without a copy, where routing by
    /// key copies every column of every row.
    Metric,
}

fn run_router(
    mut rx: mpsc::Receiver<Message>,
    mut gate: EventTimeGate,
    route: Route,
    workers: Vec<mpsc::Sender<Message>>,
    dead: mpsc::Sender<Message>,
    metrics: &PipelineMetrics,
    acks: Option<mpsc::Sender<Ack>>,
) -> Result<(), JobError> {
    let forward = |out: crate::gate::GateOutput| -> Result<(), JobError> {
        if let Some(rejected) = out.rejected {
            metrics.add_late_rows(out.late as u64);
            metrics.add_invalid_rows((rejected.num_rows() - out.late) as u64);
            send_blocking(&dead, Message::Data(rejected), "dead letter")?;
        }
        for batch in out.released {
            metrics.add_gate_rows(batch.num_rows() as u64);
            match route {
                Route::Key(k) if workers.len() > 1 => {
                    for (w, part) in partition(&batch, k, workers.len())?.into_iter().enumerate() {
                        if part.num_rows() > 0 {
                            send_blocking(&workers[w], Message::Data(part), "worker")?;
                        }
                    }
                }
                Route::Metric => {
                    for tx in &workers {
                        send_blocking(tx, Message::Data(batch.clone()), "worker")?;
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
            // Only a gate with external watermarks listens to the source's.
            Message::Watermark(w) => forward(gate.advance_external(w)?)?,
            Message::Barrier(epoch) => {
                if let Some(acks) = &acks {
                    acks.blocking_send((epoch, Part::Gate(gate.save()?)))
                        .map_err(|_| JobError::Closed("checkpoints"))?;
                }
                for tx in &workers {
                    send_blocking(tx, Message::Barrier(epoch), "worker")?;
                }
                send_blocking(&dead, Message::Barrier(epoch), "dead letter")?;
            }
            Message::Suspend => {
                for tx in &workers {
                    send_blocking(tx, Message::Suspend, "worker")?;
                }
                send_blocking(&dead, Message::Suspend, "dead letter")?;
                return Ok(());
            }
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

    fn save(&self) -> Vec<(String, Vec<Option<String>>)> {
        let mut tags: Vec<(String, Vec<Option<String>>)> = self
            .latest
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tags.sort();
        tags
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

/// What one keyed worker owns: its rules' state, the samples view, the tags it fills.
struct WorkerParts {
    worker: usize,
    /// [`Route::Metric`]: the number of workers sharing the metric columns.
    metric_share: Option<usize>,
    rules: Vec<RuleInstance>,
    unpivot: Option<Unpivot>,
    tags: Option<TagFiller>,
    /// Streaming: where to report the state at each barrier.
    acks: Option<mpsc::Sender<Ack>>,
}

fn run_worker(
    parts: WorkerParts,
    mut rx: mpsc::Receiver<Message>,
    tx: mpsc::Sender<(usize, Step)>,
    metrics: &PipelineMetrics,
) -> Result<(), JobError> {
    let WorkerParts {
        worker,
        metric_share,
        mut rules,
        unpivot,
        mut tags,
        acks,
    } = parts;
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
                                let mine = |m: usize| metric_share.is_none_or(|w| m % w == worker);
                                per_metric =
                                    Some(u.per_metric_where(&batch, mine).map_err(view_error)?);
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
                    let out = rule.anomalies_of(inputs)?;
                    if out.num_rows() > 0 {
                        metrics.add_anomalies(out.num_rows() as u64);
                        pending.push(match &tags {
                            Some(t) => t.fill(out)?,
                            None => out,
                        });
                    }
                }
            }
            Message::Watermark(w) => send_blocking(
                &tx,
                (worker, Step::At(std::mem::take(&mut pending), w)),
                "merge",
            )?,
            Message::Barrier(epoch) => {
                if let Some(acks) = &acks {
                    let state = WorkerState {
                        rules: rules.iter().map(RuleInstance::save).collect(),
                        tags: tags.as_ref().map(TagFiller::save).unwrap_or_default(),
                    };
                    acks.blocking_send((epoch, Part::Worker(worker, state)))
                        .map_err(|_| JobError::Closed("checkpoints"))?;
                }
                send_blocking(
                    &tx,
                    (worker, Step::Barrier(std::mem::take(&mut pending), epoch)),
                    "merge",
                )?;
            }
            Message::End => {
                send_blocking(&tx, (worker, Step::End), "merge")?;
                return Ok(());
            }
            Message::Suspend => {
                send_blocking(&tx, (worker, Step::Suspend), "merge")?;
                return Ok(());
            }
        }
    }
    Err(JobError::Closed("router"))
}

fn view_error(e: healer_operators::OperatorError) -> JobError {
    JobError::Config(e.to_string())
}

fn run_merge(
    mut rx: mpsc::Receiver<(usize, Step)>,
    workers: usize,
    tx: mpsc::Sender<Message>,
) -> Result<(), JobError> {
    // Every worker sees the same sequence of watermarks and barriers (the router sends each
    // to all), so the queues' heads are always of one kind and can be taken in lockstep.
    let mut queues: Vec<std::collections::VecDeque<Step>> =
        (0..workers).map(|_| Default::default()).collect();
    while let Some((worker, step)) = rx.blocking_recv() {
        queues[worker].push_back(step);
        while queues.iter().all(|q| !q.is_empty()) {
            let heads: Vec<Step> = queues
                .iter_mut()
                .map(|q| q.pop_front().expect("non-empty"))
                .collect();
            let mut batches = Vec::new();
            let mut watermark = None;
            let mut barrier = None;
            let (mut ends, mut suspends) = (0, 0);
            for step in heads {
                match step {
                    Step::At(mut b, w) => {
                        batches.append(&mut b);
                        watermark = Some(w);
                    }
                    Step::Barrier(mut b, e) => {
                        batches.append(&mut b);
                        barrier = Some(e);
                    }
                    Step::End => ends += 1,
                    Step::Suspend => suspends += 1,
                }
            }
            if !batches.is_empty() {
                send_blocking(&tx, Message::Data(canonical_order(&batches)?), "sink")?;
            }
            if let Some(w) = watermark {
                send_blocking(&tx, Message::Watermark(w), "sink")?;
            }
            if let Some(e) = barrier {
                send_blocking(&tx, Message::Barrier(e), "sink")?;
            }
            if ends == workers {
                send_blocking(&tx, Message::End, "sink")?;
                return Ok(());
            }
            if suspends == workers {
                send_blocking(&tx, Message::Suspend, "sink")?;
                return Ok(());
            }
        }
    }
    Err(JobError::Closed("workers"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::HashRange;

    const METRICS: [&str; 3] = ["cpu", "mem", "disk"];

    /// (resource, metric) keys as a samples rule's windows save them.
    fn saved_keys() -> Vec<(String, usize, Vec<KeyValue>)> {
        (0..40)
            .flat_map(|r| {
                METRICS.iter().enumerate().map(move |(m, metric)| {
                    let resource = format!("host-{r}");
                    let key = vec![
                        KeyValue::Str(resource.clone()),
                        KeyValue::Str(metric.to_string()),
                    ];
                    (resource, m, key)
                })
            })
            .collect()
    }

    fn owners(
        routing: &Routing,
        partitions: usize,
        keys: Option<&KeyRanges>,
        key: &[KeyValue],
    ) -> Vec<usize> {
        let names = [RESOURCE.to_string(), METRIC.to_string()];
        (0..partitions)
            .filter(|&worker| {
                Owner {
                    routing: routing.clone(),
                    worker,
                    partitions,
                    keys: keys.cloned(),
                }
                .owns(&names, key)
            })
            .collect()
    }

    #[test]
    fn a_saved_key_goes_to_the_worker_its_rows_go_to() {
        let by_metric = Routing::Metric(METRICS.iter().map(|m| m.to_string()).collect());
        let by_resource = Routing::Column(RESOURCE.to_string());
        for partitions in 1..=4 {
            for (resource, m, key) in saved_keys() {
                // The router's choices: metric `m` to worker `m % partitions`; a row to the
                // hash of its resource.
                assert_eq!(
                    owners(&by_metric, partitions, None, &key),
                    vec![m % partitions]
                );
                let h = healer_operators::id::fnv1a64(resource.as_bytes());
                assert_eq!(
                    owners(&by_resource, partitions, None, &key),
                    vec![(h % partitions as u64) as usize]
                );
            }
        }
    }

    #[test]
    fn a_shard_restores_only_its_resources_whatever_the_routing() {
        // The lower half of the hash space.
        let half = KeyRanges::new(vec![
            HashRange::parse("0", &(u128::MAX / 2).to_string()).unwrap(),
        ]);
        let by_metric = Routing::Metric(METRICS.iter().map(|m| m.to_string()).collect());
        let by_resource = Routing::Column(RESOURCE.to_string());
        let (mut inside, mut outside) = (0, 0);
        for (resource, _, key) in saved_keys() {
            let expected = usize::from(half.contains_key(&resource));
            inside += expected;
            outside += 1 - expected;
            for routing in [&by_metric, &by_resource] {
                assert_eq!(owners(routing, 3, Some(&half), &key).len(), expected);
            }
        }
        assert!(inside > 0 && outside > 0, "{inside} in, {outside} out");
    }
}
