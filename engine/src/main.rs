//! The `healer` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use healer_datasets::FleetConfig;
use healer_engine::config::PipelineConfig;
use healer_engine::job::{Job, JobError, Summary, compile_rules};
use healer_engine::store::{Location, S3Config};
use healer_operators::schema::canonical_metrics_schema;
use healer_operators::severity::Severity;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[path = "cli/remedy.rs"]
mod remedy_cli;

#[derive(Debug, Parser)]
#[command(
    name = "healer",
    version,
    about = "Self-healing infrastructure engine: stream anomaly detection on columnar dataflow"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay historical metrics (parquet) through the detection rules into the incident log.
    Replay(ReplayArgs),
    /// Run the detection rules on a Kinesis stream until SIGINT/SIGTERM, with checkpoints.
    Run(RunArgs),
    /// Write metrics (parquet files or the fleet generator) into a Kinesis stream.
    Produce(ProduceArgs),
    /// Generate a sample fleet, replay it through the bundled rules and show what was found.
    Demo(DemoArgs),
    /// Query an incident log with SQL.
    Incidents(IncidentsArgs),
    /// Check pipeline configs and rule files; prints every problem with file, line and key.
    Validate(ValidateArgs),
    /// Train a model on historical metrics.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Measure detection and root-cause quality on labelled data.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Correlate the log's anomalies into incidents, rank root causes over a topology and
    /// decide; writes `incidents/` into the log.
    Diagnose(DiagnoseArgs),
    /// Remediation sagas: run an action, recover, list, show, the action library.
    #[command(subcommand)]
    Remediation(remedy_cli::RemediationCommand),
    /// Kill switch: refuse new remediations (in-flight ones finish).
    Pause(remedy_cli::PauseArgs),
    /// Lift the kill switch.
    Resume(remedy_cli::ResumeArgs),
    /// Approval requests: list, approve, deny.
    #[command(subcommand)]
    Approvals(remedy_cli::ApprovalsCommand),
}

#[derive(Debug, Subcommand)]
enum EvalCommand {
    /// Root-cause ranking on the PetShop data set, next to the published baseline.
    Rca(EvalRcaArgs),
    /// Detection on the Numenta Anomaly Benchmark with NAB's scoring, next to the published
    /// scoreboard.
    Nab(EvalNabArgs),
    /// The isolation forest on the Server Machine Dataset: trained on train/, scored on
    /// test/, next to the published scores.
    Smd(EvalSmdArgs),
}

#[derive(Debug, Args)]
struct EvalSmdArgs {
    /// The SMD folder (`train/`, `test/`, `test_label/`, `interpretation_label/`).
    #[arg(long)]
    dataset: PathBuf,
    /// `gaussian` (Σ z² against the training data's mean and std) or `iforest`.
    #[arg(long, value_enum, default_value_t = healer_engine::smd_eval::Detector::Gaussian)]
    detector: healer_engine::smd_eval::Detector,
    /// Average each row's score with the rows before it over this horizon in rows (1: none).
    #[arg(
        long,
        default_value_t = healer_engine::smd_eval::DEFAULT_SMOOTH as u32,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    smooth: u32,
    /// `exp` (exponentially weighted, time constant `--smooth`) or `window` (the last
    /// `--smooth` rows).
    #[arg(long, value_enum, default_value_t = healer_engine::smd_eval::Smoother::Exponential)]
    smoother: healer_engine::smd_eval::Smoother,
}

#[derive(Debug, Args)]
struct EvalNabArgs {
    /// The NAB folder (`data/`, `labels/`, `results/`).
    #[arg(long)]
    dataset: PathBuf,
    /// The label windows (NAB's `combined_windows.json` format) instead of the dataset's
    /// own `labels/combined_windows.json`: for example NAB's full labels for a copy that
    /// ships only some of them.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Rule files or directories (default: the bundled rules).
    #[arg(long, num_args = 1.., conflicts_with = "scores")]
    rules: Vec<PathBuf>,
    /// Write NAB-format result CSVs (`<out>/<category>/<file>.csv`) for every data file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Score another detector instead of running healer's rules: NAB-format result CSVs
    /// (`<dir>/<category>/<file>.csv` with an `anomaly_score` column, one row per data row).
    #[arg(long)]
    scores: Option<PathBuf>,
    /// Also print each labelled file's windows detected and missed, detections outside
    /// windows and raw score, at the `standard` profile's threshold.
    #[arg(long)]
    files: bool,
}

#[derive(Debug, Args)]
struct EvalRcaArgs {
    /// The PetShop folder (holding `dataset/` and the baseline table).
    #[arg(long)]
    dataset: PathBuf,
    /// Where to write `predictions.csv`.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DiagnoseArgs {
    /// Incident-log directory or URL.
    log: String,
    /// Topology file (TOML or JSON).
    #[arg(long)]
    topology: PathBuf,
    /// Change feed: CSV (resource,ts,kind,description) or parquet with those columns.
    #[arg(long)]
    changes: Option<PathBuf>,
    /// Correlation window.
    #[arg(long, default_value = "5m")]
    window: String,
    /// Least root-cause confidence to act on.
    #[arg(long, default_value_t = 0.8)]
    min_confidence: f64,
    /// Bedrock model id for the consult of rule 4 (a recent change); without it such
    /// incidents escalate.
    #[arg(long)]
    llm_model: Option<String>,
    /// Bedrock endpoint override.
    #[arg(long)]
    llm_endpoint: Option<String>,
    /// Bedrock region.
    #[arg(long, default_value = "us-east-1")]
    llm_region: String,
    /// Before acting, have the LLM check that the root cause is plausible; a root cause it
    /// does not confirm escalates (needs --llm-model).
    #[arg(long, requires = "llm_model")]
    llm_verify: bool,
    /// Deadline of one consult attempt.
    #[arg(long, default_value = "10s")]
    llm_timeout: String,
    /// S3 endpoint for s3:// logs.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// PagerDuty Events API v2 URL (default: `https://events.pagerduty.com/v2/enqueue`).
    #[arg(long, requires = "pagerduty_routing_key")]
    pagerduty_url: Option<String>,
    /// Escalations go to PagerDuty with this integration routing key.
    #[arg(long)]
    pagerduty_routing_key: Option<String>,
    /// Escalations go to this Slack incoming webhook.
    #[arg(long)]
    slack_webhook: Option<String>,
    /// Carry out the decisions under this remediation config (sagas, approvals,
    /// escalations through its `[escalation]`); anomalies that healer's own actions caused
    /// do not open incidents.
    #[arg(long, conflicts_with_all = ["pagerduty_routing_key", "slack_webhook"])]
    remediation: Option<PathBuf>,
    /// Metrics parquet (file or folder) for preconditions that must hold `for` a while.
    #[arg(long, requires = "remediation")]
    telemetry: Option<String>,
}

#[derive(Debug, Subcommand)]
enum TrainCommand {
    /// An isolation forest over a metric vector, for `iforest_score(...)` in rules.
    Iforest(IforestArgs),
}

#[derive(Debug, Args)]
struct IforestArgs {
    /// Parquet files or directories (local, file://, s3://) or CSV files (.csv, .txt).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<String>,
    /// Feature columns, comma-separated, in the order rules pass them (default: every
    /// numeric column but `ts`).
    #[arg(long, value_delimiter = ',')]
    features: Vec<String>,
    /// Model file to write.
    #[arg(long)]
    out: PathBuf,
    /// Trees.
    #[arg(long, default_value_t = 100)]
    trees: usize,
    /// Rows per tree.
    #[arg(long, default_value_t = 256)]
    sample_size: usize,
    /// Expected share of anomalies in the training data (sets the threshold).
    #[arg(long, default_value_t = 0.01)]
    contamination: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// S3 endpoint for s3:// inputs.
    #[arg(long)]
    s3_endpoint: Option<String>,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Pipeline config (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Parquet files, directories, file:// or s3:// URLs.
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    #[command(flatten)]
    pipeline: PipelineFlags,
    /// Replay pace: `max` or e.g. `10x`.
    #[arg(long)]
    speed: Option<String>,
    /// Rows per batch read from parquet.
    #[arg(long)]
    batch_rows: Option<usize>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

/// Flags of `replay` and `run` that override the pipeline config.
#[derive(Debug, Args)]
struct PipelineFlags {
    /// Rule files or directories (default: the bundled rules).
    #[arg(long, num_args = 1..)]
    rules: Vec<PathBuf>,
    /// Incident-log directory or URL.
    #[arg(long)]
    out: Option<String>,
    /// Keyed workers (0 = one per core).
    #[arg(long)]
    partitions: Option<usize>,
    /// Bounded out-of-orderness, e.g. `5s`.
    #[arg(long)]
    max_out_of_orderness: Option<String>,
}

impl PipelineFlags {
    fn apply(&self, config: &mut PipelineConfig) {
        if !self.rules.is_empty() {
            config.rules.paths = self.rules.clone();
        }
        if let Some(out) = &self.out {
            config.sink.out = out.clone();
        }
        if let Some(p) = self.partitions {
            config.engine.partitions = p;
        }
        if let Some(d) = &self.max_out_of_orderness {
            config.event_time.max_out_of_orderness = d.clone();
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Pipeline config (TOML) with `source.kind = "kinesis"`; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Stream name or ARN.
    #[arg(long)]
    stream: Option<String>,
    /// Kinesis endpoint override (an emulator).
    #[arg(long)]
    endpoint: Option<String>,
    /// Region.
    #[arg(long)]
    region: Option<String>,
    /// Where shards without a checkpoint start: trim_horizon, latest, at_timestamp.
    #[arg(long)]
    start: Option<String>,
    #[command(flatten)]
    pipeline: PipelineFlags,
    /// Time between checkpoints, e.g. `10s`.
    #[arg(long)]
    checkpoint_interval: Option<String>,
    /// Scale-out: this worker's id in the lease table (`[lease] table` set); default: host
    /// name and process id.
    #[arg(long)]
    worker_id: Option<String>,
    /// Scale-out: the lease table (overrides `[lease] table`).
    #[arg(long)]
    lease_table: Option<String>,
    /// Scale-out: the lease table's endpoint (a local DynamoDB).
    #[arg(long)]
    lease_endpoint: Option<String>,
    /// Also write the summary as JSON to this file when stopping.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Write live counters (rows, anomalies, watermark, per-shard lag, throttling) as JSON to
    /// this file every second (replaced atomically).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Diagnose incidents while running, over this topology (TOML or JSON); written to the
    /// log's `incidents/` as `healer diagnose` would.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Change feed for the decisions (CSV or parquet).
    #[arg(long, requires = "topology")]
    changes: Option<PathBuf>,
    /// Carry out the decisions under this remediation config.
    #[arg(long, requires = "topology")]
    remediation: Option<PathBuf>,
    /// How often to diagnose.
    #[arg(long, default_value = "30s", requires = "topology")]
    diagnose_every: String,
}

#[derive(Debug, Args)]
struct ProduceArgs {
    /// Stream name or ARN.
    #[arg(long)]
    stream: String,
    /// Kinesis endpoint override (an emulator).
    #[arg(long)]
    endpoint: Option<String>,
    /// Region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Parquet files or directories (local, file://, s3://), or `generator` for a seeded
    /// simulated fleet.
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<String>,
    /// Records per second at most (default: as fast as the stream takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Rows of one resource per record (a JSON array when more than 1).
    #[arg(long, default_value_t = 1)]
    pack: usize,
    /// Generator: resources.
    #[arg(long, default_value_t = 24)]
    resources: usize,
    /// Generator: hours of 10-second samples.
    #[arg(long, default_value_t = 1)]
    hours: usize,
    /// Generator: faults to inject.
    #[arg(long, default_value_t = 4)]
    faults: usize,
    /// Generator: seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// S3 endpoint for s3:// inputs.
    #[arg(long)]
    s3_endpoint: Option<String>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Where to write the generated data and the incident log.
    #[arg(long, default_value = "healer-demo")]
    out: PathBuf,
    /// Resources in the simulated fleet.
    #[arg(long, default_value_t = 24)]
    resources: usize,
    /// Hours of 10-second samples.
    #[arg(long, default_value_t = 4)]
    hours: usize,
    /// Faults to inject.
    #[arg(long, default_value_t = 12)]
    faults: usize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Debug, Args)]
struct IncidentsArgs {
    /// Incident-log directory or URL.
    log: String,
    /// SQL over the tables `anomalies` and `dead_letter`.
    #[arg(long)]
    sql: Option<String>,
    /// S3 endpoint for s3:// logs.
    #[arg(long)]
    s3_endpoint: Option<String>,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Pipeline configs (.toml), rule files (.sql) or rule directories.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Replay(args) => replay(args).await,
            Command::Run(args) => run(args).await,
            Command::Produce(args) => produce(args).await,
            Command::Demo(args) => demo(args).await,
            Command::Incidents(args) => incidents(args).await,
            Command::Validate(args) => validate(args),
            Command::Train(TrainCommand::Iforest(args)) => train_iforest(args).await,
            Command::Diagnose(args) => diagnose(args).await,
            Command::Remediation(cmd) => remedy_cli::remediation(cmd).await,
            Command::Pause(args) => remedy_cli::pause(args),
            Command::Resume(args) => remedy_cli::resume(args),
            Command::Approvals(cmd) => remedy_cli::approvals(cmd).await,
            Command::Eval(EvalCommand::Rca(args)) => eval_rca(args),
            Command::Eval(EvalCommand::Nab(args)) => eval_nab(args).await,
            Command::Eval(EvalCommand::Smd(args)) => eval_smd(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every problem of a configuration file, one a line.
fn problems_error(problems: Vec<healer_engine::config::ConfigProblem>) -> anyhow::Error {
    anyhow::anyhow!(
        problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    )
}

fn load_config(path: Option<&PathBuf>) -> Result<PipelineConfig> {
    Ok(match path {
        Some(path) => PipelineConfig::load(path).map_err(problems_error)?,
        None => PipelineConfig::default(),
    })
}

fn replay_config(args: &ReplayArgs) -> Result<PipelineConfig> {
    let mut config = load_config(args.config.as_ref())?;
    if !args.input.is_empty() {
        config.source.paths = args.input.clone();
    }
    args.pipeline.apply(&mut config);
    if let Some(s) = &args.speed {
        config.source.speed = s.clone();
    }
    if let Some(b) = args.batch_rows {
        config.source.batch_rows = b;
    }
    Ok(config)
}

/// S3 settings from the environment, with `--s3-endpoint` (plain HTTP allowed for an
/// `http://` endpoint) when given.
fn s3_with_endpoint(endpoint: Option<&str>) -> S3Config {
    S3Config {
        endpoint: endpoint.map(str::to_owned),
        allow_http: endpoint.is_some_and(|e| e.starts_with("http://")),
        ..S3Config::default()
    }
}

fn fmt_int(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ts(ms: i64) -> String {
    arrow::temporal_conversions::timestamp_ms_to_datetime(ms)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

async fn run_job(config: &PipelineConfig, quiet: bool) -> Result<Summary> {
    let job = match Job::prepare(config).await {
        Ok(job) => job,
        Err(JobError::Rules(errors)) => bail!("rules rejected:\n{errors}"),
        Err(e) => return Err(e.into()),
    };
    let metrics = job.metrics();
    let bar = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(job.total_rows()), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  event time {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let ticker = {
        let bar = bar.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                let s = metrics.snapshot();
                bar.set_position(s.source_rows);
                bar.set_message(fmt_ts(s.watermark));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let result = job.run().await;
    ticker.abort();
    bar.finish_and_clear();
    Ok(result?)
}

fn print_summary(s: &Summary) {
    let m = &s.metrics;
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let cells = m.gate_rows * s.metric_columns as u64;
    println!("replay finished in {:.2} s", secs);
    println!(
        "  input        {} rows ({} cells) from {} file(s), {} partition(s)",
        fmt_int(m.source_rows),
        fmt_int(cells),
        s.input_files,
        s.partitions
    );
    println!(
        "  throughput   {:.2} M rows/s, {:.1} M cells/s",
        m.gate_rows as f64 / secs / 1e6,
        cells as f64 / secs / 1e6
    );
    println!(
        "  dead letter  {} late, {} invalid rows ({} file(s))",
        fmt_int(m.late_rows),
        fmt_int(m.invalid_rows),
        s.dead_letter_files.len()
    );
    println!();
    println!(
        "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "rule", "LOW", "MEDIUM", "HIGH", "CRITICAL", "total"
    );
    for r in &s.rules {
        let total: u64 = r.by_severity.iter().sum();
        println!(
            "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>10}",
            r.rule,
            fmt_int(r.by_severity[0]),
            fmt_int(r.by_severity[1]),
            fmt_int(r.by_severity[2]),
            fmt_int(r.by_severity[3]),
            fmt_int(total)
        );
    }
    println!();
    let rows: usize = s.files.iter().map(|f| f.rows).sum();
    println!(
        "  incident log {} ({} file(s), {} anomaly rows)",
        s.out,
        s.files.len(),
        fmt_int(rows as u64)
    );
}

fn summary_json(s: &Summary) -> serde_json::Value {
    serde_json::json!({
        "elapsed_s": s.elapsed.as_secs_f64(),
        "source_rows": s.metrics.source_rows,
        "rows": s.metrics.gate_rows,
        "cells": s.metrics.gate_rows * s.metric_columns as u64,
        "late_rows": s.metrics.late_rows,
        "invalid_rows": s.metrics.invalid_rows,
        "anomalies": s.metrics.anomalies,
        "partitions": s.partitions,
        "files": s.files.len(),
        "rules": s.rules.iter().map(|r| serde_json::json!({
            "rule": r.rule,
            "by_severity": Severity::ALL
                .iter()
                .zip(r.by_severity)
                .map(|(k, v)| (k.as_str().to_string(), serde_json::Value::from(v)))
                .collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}

async fn replay(args: ReplayArgs) -> Result<ExitCode> {
    let config = replay_config(&args)?;
    let summary = run_job(&config, args.quiet).await?;
    print_summary(&summary);
    if let Some(path) = &args.summary_json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary_json(&summary))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_config(args: &RunArgs) -> Result<PipelineConfig> {
    let mut config = load_config(args.config.as_ref())?;
    config.source.kind = "kinesis".into();
    let k = &mut config.source.kinesis;
    if let Some(s) = &args.stream {
        k.stream = s.clone();
    }
    if let Some(e) = &args.endpoint {
        k.endpoint = Some(e.clone());
    }
    if let Some(r) = &args.region {
        k.region = Some(r.clone());
    }
    if let Some(s) = &args.start {
        k.start = s.clone();
    }
    args.pipeline.apply(&mut config);
    if let Some(d) = &args.checkpoint_interval {
        config.checkpoint.interval = d.clone();
    }
    if let Some(t) = &args.lease_table {
        config.lease.table = t.clone();
    }
    if let Some(e) = &args.lease_endpoint {
        config.lease.endpoint = Some(e.clone());
    }
    let problems = config.validate();
    if !problems.is_empty() {
        let lines: Vec<String> = problems
            .iter()
            .map(|(k, m)| format!("  {k}: {m}"))
            .collect();
        bail!("invalid configuration:\n{}", lines.join("\n"));
    }
    Ok(config)
}

/// A watch that turns true on SIGINT or SIGTERM.
fn shutdown_signal() -> Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => eprintln!("SIGTERM: draining and checkpointing"),
            _ = int.recv() => eprintln!("SIGINT: draining and checkpointing"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    // A long-running job logs: checkpoints, shards starting and ending, health every 10 s.
    let level = match std::env::var("HEALER_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = run_config(&args)?;
    let shutdown = shutdown_signal()?;
    if config.lease.enabled() {
        if args.topology.is_some() {
            bail!(
                "--topology diagnoses the whole log: run it in one process (a single `healer run`), \
                 not in every lease worker"
            );
        }
        return run_leased(&args, &config, shutdown).await;
    }
    let job = match healer_engine::stream::StreamJob::prepare(&config).await {
        Ok(job) => job,
        Err(JobError::Rules(errors)) => bail!("rules rejected:\n{errors}"),
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "reading stream `{}`; incident log {}; SIGINT or SIGTERM to stop",
        config.source.kinesis.stream, config.sink.out
    );
    let status = args.status_file.clone().map(|path| {
        let metrics = job.metrics();
        let readers = job.reader_counters();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let json = status_json(&metrics, &readers, started.elapsed());
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, json.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        })
    });
    let live = match &args.topology {
        Some(path) => Some(live_diagnosis(&args, &config, path).await?),
        None => None,
    };
    let (stop_live, live_task) = match live {
        Some((mut diagnosis, every)) => {
            let (tx, mut rx) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = rx.changed() => return diagnosis,
                    }
                    match diagnosis.round().await {
                        Ok(r) => report_round(&r),
                        Err(e) => {
                            tracing::warn!(error = %e, "diagnosis round failed; trying again")
                        }
                    }
                }
            });
            (Some(tx), Some(task))
        }
        None => (None, None),
    };
    let s = job.run(shutdown).await;
    if let Some(task) = status {
        task.abort();
    }
    if let (Some(tx), Some(task)) = (stop_live, live_task) {
        tx.send_replace(true);
        let mut diagnosis = task.await?;
        // Only after a clean drain: its last checkpoint covers everything read.
        if s.is_ok() {
            match diagnosis.finish().await {
                Ok(r) => report_round(&r),
                Err(e) => eprintln!("error: last diagnosis round: {e}"),
            }
        }
    }
    let s = s?;
    print_summary(&s.summary);
    println!(
        "  checkpoints  restored from {}, last completed {}, {} file(s) of an interrupted run replaced",
        s.restored_epoch
            .map_or("none".to_string(), |e| e.to_string()),
        s.last_checkpoint,
        s.discarded_files
    );
    println!(
        "  records      {} could not be decoded (dead_letter_records/)",
        fmt_int(s.summary.metrics.rejected_records)
    );
    if let Some(path) = &args.summary_json {
        let mut json = summary_json(&s.summary);
        json["rejected_records"] = s.summary.metrics.rejected_records.into();
        json["last_checkpoint"] = s.last_checkpoint.into();
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A topology file and an optional change feed, each checked at load.
async fn topology_and_changes(
    topology: &std::path::Path,
    changes: Option<&std::path::Path>,
) -> Result<(
    healer_operators::topology::Topology,
    Vec<healer_operators::decision::Change>,
)> {
    let text = std::fs::read_to_string(topology)
        .with_context(|| format!("cannot read {}", topology.display()))?;
    let topology =
        healer_operators::topology::Topology::parse(&topology.display().to_string(), &text)
            .map_err(|e| anyhow::anyhow!("topology rejected:\n{e}"))?;
    let changes = match changes {
        Some(path) => healer_engine::diagnose::read_changes(path)
            .await
            .map_err(|e| anyhow::anyhow!(e))?,
        None => Vec::new(),
    };
    Ok((topology, changes))
}

/// The live diagnosis of `healer run --topology`, and how often it runs.
async fn live_diagnosis(
    args: &RunArgs,
    config: &PipelineConfig,
    topology: &std::path::Path,
) -> Result<(healer_engine::live::LiveDiagnosis, Duration)> {
    use healer_operators::decision::Policy;
    use healer_operators::rca::RcaConfig;
    let (topology, changes) = topology_and_changes(topology, args.changes.as_deref()).await?;
    let remediator = match &args.remediation {
        Some(path) => {
            let r = remedy_cli::open(path)?;
            for rep in r.recover().await? {
                remedy_cli::print_report(&rep);
            }
            Some(r)
        }
        None => None,
    };
    let every = humantime::parse_duration(&args.diagnose_every)
        .with_context(|| format!("--diagnose-every `{}`", args.diagnose_every))?;
    let log = Location::parse(&config.sink.out, &config.sink.s3, true)?;
    let checkpoints = config.checkpoint_location();
    let checkpoints = Location::parse(&checkpoints, &config.sink.s3, true)?;
    let diagnosis = healer_engine::live::LiveDiagnosis::new(
        log,
        checkpoints,
        topology,
        changes,
        RcaConfig::default(),
        Policy::default(),
        remediator,
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok((diagnosis, every))
}

fn report_round(r: &healer_engine::live::Round) {
    if r.incidents > 0 || r.own > 0 {
        tracing::info!(
            anomalies = r.anomalies,
            own = r.own,
            incidents = r.incidents,
            "diagnosed"
        );
    }
    for o in &r.outcomes {
        tracing::info!("remediation {o}");
    }
}

/// `healer run` as one worker of many, sharing the stream through the lease table.
async fn run_leased(
    args: &RunArgs,
    config: &PipelineConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<ExitCode> {
    use healer_engine::lease::worker::{WorkerStatus, default_worker_id, run_worker};
    let worker = args.worker_id.clone().unwrap_or_else(default_worker_id);
    eprintln!(
        "worker `{worker}` reading stream `{}` through lease table `{}`; incident log {}; \
         SIGINT or SIGTERM to hand its shards over and stop",
        config.source.kinesis.stream, config.lease.table, config.sink.out
    );
    let status = Arc::new(WorkerStatus::default());
    let writer = args.status_file.clone().map(|path| {
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let json = serde_json::to_string(&status.snapshot()).unwrap_or_default();
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, json).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        })
    });
    let summary = run_worker(config, &worker, shutdown, Arc::clone(&status)).await;
    if let Some(w) = writer {
        w.abort();
    }
    let summary = match summary {
        Ok(s) => s,
        Err(JobError::Rules(errors)) => bail!("rules rejected:\n{errors}"),
        Err(e) => return Err(e.into()),
    };
    let s = &summary.status;
    println!(
        "worker {}: {} runs, {} checkpoints, {} files published; leases taken {}, asked {}, released {}, lost {}",
        summary.worker,
        s.runs,
        s.checkpoints,
        s.published_files,
        s.lease_takes,
        s.lease_steals,
        s.lease_releases,
        s.lease_losses
    );
    if let Some(path) = &args.summary_json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(
    metrics: &healer_engine::metrics::PipelineMetrics,
    readers: &healer_engine::kinesis::reader::ReaderCounters,
    elapsed: Duration,
) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let m = metrics.snapshot();
    serde_json::json!({
        "elapsed_s": elapsed.as_secs_f64(),
        "records": readers.records.load(Relaxed),
        "source_rows": m.source_rows,
        "rows": m.gate_rows,
        "late_rows": m.late_rows,
        "rejected_records": m.rejected_records,
        "anomalies": m.anomalies,
        "watermark_ms": m.watermark,
        "get_records_calls": readers.calls.load(Relaxed),
        "throttled": readers.throttled.load(Relaxed),
        "transient_errors": readers.transient.load(Relaxed),
        "expired_iterators": readers.expired.load(Relaxed),
        "millis_behind": metrics.shard_lag(),
    })
}

async fn produce(args: ProduceArgs) -> Result<ExitCode> {
    use healer_engine::kinesis::producer::{ProduceOptions, Producer};
    let kinesis = healer_engine::config::KinesisConfig {
        stream: args.stream.clone(),
        region: Some(args.region.clone()),
        endpoint: args.endpoint.clone(),
        ..Default::default()
    };
    let client = healer_engine::kinesis::client(&kinesis).await;
    let mut producer = Producer::new(
        client,
        &args.stream,
        ProduceOptions {
            rate: args.rate,
            pack: args.pack,
            ..ProduceOptions::default()
        },
    );
    if args.input == ["generator"] {
        let fleet = FleetConfig {
            seed: args.seed,
            resources: args.resources,
            samples: args.hours * 360,
            faults: args.faults,
            ..FleetConfig::default()
        };
        let (batches, _) = healer_datasets::generate(&fleet);
        for b in &batches {
            producer.push(b).await?;
        }
    } else {
        let s3 = s3_with_endpoint(args.s3_endpoint.as_deref());
        let source = healer_engine::source::ParquetSource::open(
            &args.input,
            &s3,
            8192,
            healer_engine::config::Speed::Max,
        )
        .await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let metrics = std::sync::Arc::new(healer_engine::metrics::PipelineMetrics::default());
        let reading = tokio::spawn(source.run(tx, metrics));
        while let Some(msg) = rx.recv().await {
            if let healer_engine::message::Message::Data(b) = msg {
                producer.push(&b).await?;
            }
        }
        reading.await??;
    }
    let s = producer.finish().await?;
    println!(
        "wrote {} rows in {} records to `{}` in {:.2} s ({:.0} records/s, {} PutRecords calls, {} entries retried)",
        fmt_int(s.rows),
        fmt_int(s.records),
        args.stream,
        s.elapsed.as_secs_f64(),
        s.records as f64 / s.elapsed.as_secs_f64().max(1e-9),
        s.calls,
        s.retried
    );
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: DemoArgs) -> Result<ExitCode> {
    let fleet = FleetConfig {
        seed: args.seed,
        resources: args.resources,
        samples: args.hours * 360,
        faults: args.faults,
        ..FleetConfig::default()
    };
    let input =
        healer_engine::demo::write_input(&args.out, &fleet).context("writing the demo fleet")?;
    println!(
        "generated {} rows: {} resources × {} h of 10 s samples, {} injected faults ({})",
        fmt_int(input.rows as u64),
        args.resources,
        args.hours,
        args.faults,
        input.labels_csv.display()
    );
    let log = args.out.join("incidents");
    let mut config = PipelineConfig::default();
    config.source.paths = vec![input.metrics.display().to_string()];
    config.sink.out = log.display().to_string();
    let summary = run_job(&config, false).await?;
    print_summary(&summary);

    let location = Location::parse(&config.sink.out, &S3Config::default(), false)?;
    let mut detected = 0;
    for label in &input.labels {
        let sql = format!(
            "SELECT count(*) AS n FROM anomalies WHERE resource = '{}' AND metric = '{}' \
             AND ts BETWEEN to_timestamp_millis({}) AND to_timestamp_millis({})",
            label.resource,
            label.metric,
            label.start_ms,
            label.end_ms + 300_000
        );
        let hits = if summary.files.is_empty() {
            0
        } else {
            let batches = healer_engine::query::query(&location, &sql).await?;
            batches
                .first()
                .and_then(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .map(|a| a.value(0))
                })
                .unwrap_or(0)
        };
        if hits > 0 {
            detected += 1;
        }
    }
    println!();
    println!(
        "injected faults detected: {detected} of {} (resource, metric) series, within 5 min of the fault",
        input.labels.len()
    );
    if !summary.files.is_empty() {
        println!();
        println!("strongest anomalies:");
        let batches =
            healer_engine::query::query(&location, healer_engine::query::DEFAULT_QUERY).await?;
        println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
    }
    if !summary.files.is_empty() {
        demo_diagnosis(&location, &input.topology).await?;
    }
    println!();
    println!(
        "query the log:  healer incidents {} --sql \"SELECT severity, count(*) FROM anomalies GROUP BY severity\"",
        log.display()
    );
    println!(
        "diagnose again:  healer diagnose {} --topology {}",
        log.display(),
        input.topology.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The demo's last step: the log's anomalies diagnosed and decided over the fleet's
/// topology, written to `incidents/`, and a summary printed.
async fn demo_diagnosis(log: &Location, topology: &std::path::Path) -> Result<()> {
    use healer_engine::diagnose;
    use healer_operators::decision::Policy;
    use healer_operators::rca::RcaConfig;
    let (topology, _) = topology_and_changes(topology, None).await?;
    // HIGH and CRITICAL only: at |z| > 3 a fleet of 24 × 16 series raises a few MEDIUM
    // anomalies every minute by chance, which would merge every window into one incident.
    let anomalies: Vec<_> = diagnose::read_anomalies(log)
        .await
        .map_err(|e| anyhow::anyhow!(e))?
        .into_iter()
        .filter(|a| a.severity >= healer_operators::severity::Severity::High)
        .collect();
    let diagnosed = diagnose::run(
        &topology,
        &anomalies,
        &[],
        &RcaConfig::default(),
        &Policy::default(),
        None,
        false,
    )
    .await;
    diagnose::write(log, &diagnosed)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let count = |o: healer_operators::decision::Outcome| {
        diagnosed.iter().filter(|d| d.decision.outcome == o).count()
    };
    use healer_operators::decision::Outcome;
    println!();
    println!(
        "diagnosed {} incident(s) over the fleet's topology: {} auto-heal, {} request approval, {} escalate (written to incidents/)",
        diagnosed.len(),
        count(Outcome::AutoHeal),
        count(Outcome::RequestApproval),
        count(Outcome::Escalate)
    );
    for d in diagnosed.iter().take(8) {
        let rc = d.incident.root_cause();
        println!(
            "  {}  {:>2} resource(s)  root cause {:<16} {:>5}  {:<16} {}",
            fmt_ts(d.incident.start_ms),
            d.incident.resources.len(),
            rc.map_or("(unable)".to_string(), |r| r.resource.clone()),
            rc.map_or("-".to_string(), |r| format!("{:.2}", r.confidence)),
            d.decision.outcome.as_str(),
            d.decision.action.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

async fn incidents(args: IncidentsArgs) -> Result<ExitCode> {
    let s3 = s3_with_endpoint(args.s3_endpoint.as_deref());
    let location = Location::parse(&args.log, &s3, false)?;
    let sql = args
        .sql
        .as_deref()
        .unwrap_or(healer_engine::query::DEFAULT_QUERY);
    let batches = healer_engine::query::query(&location, sql)
        .await
        .with_context(|| format!("query over {}", location.display()))?;
    println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
    Ok(ExitCode::SUCCESS)
}

fn validate(args: ValidateArgs) -> Result<ExitCode> {
    let mut problems: Vec<String> = Vec::new();
    let mut checked = 0;
    for path in &args.paths {
        checked += 1;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let config = if is_toml {
            match PipelineConfig::load(path) {
                // Rule paths in a config are relative to the working directory.
                Ok(c) => c,
                Err(p) => {
                    problems.extend(p.iter().map(|p| p.to_string()));
                    continue;
                }
            }
        } else {
            let mut c = PipelineConfig::default();
            c.rules.paths = vec![path.clone()];
            c
        };
        if let Err(e) = compile_rules(&config, canonical_metrics_schema()) {
            match e {
                JobError::Rules(errors) => problems.extend(errors.0.iter().map(|e| e.to_string())),
                other => problems.push(format!("{}: {other}", path.display())),
            }
        }
    }
    if problems.is_empty() {
        println!("ok: {checked} path(s) valid");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s)", problems.len());
        Ok(ExitCode::FAILURE)
    }
}

async fn train_iforest(args: IforestArgs) -> Result<ExitCode> {
    use healer_operators::iforest::ForestConfig;
    use healer_operators::iforest_model::IforestModel;
    let s3 = s3_with_endpoint(args.s3_endpoint.as_deref());
    let table = healer_engine::train::load(&args.input, &s3)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let features = if args.features.is_empty() {
        table.names.clone()
    } else {
        args.features.clone()
    };
    let columns = table.select(&features).map_err(|e| anyhow::anyhow!(e))?;
    let config = ForestConfig {
        trees: args.trees,
        sample_size: args.sample_size,
        contamination: args.contamination,
        seed: args.seed,
    };
    let started = std::time::Instant::now();
    let model = IforestModel::train(features, &columns, &config, table.sources.clone())
        .context("training failed")?;
    let took = started.elapsed();
    // Write next to the target and rename: a rule reloading the model never reads half a file.
    let tmp = args.out.with_extension("json.tmp");
    std::fs::write(&tmp, model.to_json())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("isolation forest written to {}", args.out.display());
    println!(
        "  training rows {} ({} dropped for missing values) from {} source(s)",
        fmt_int(model.training.rows),
        fmt_int(model.training.dropped_rows),
        model.training.sources.len()
    );
    println!(
        "  features      {} ({})",
        model.features.len(),
        model.features.join(", ")
    );
    println!(
        "  trees         {} × {} samples, contamination {}, seed {}",
        config.trees, config.sample_size, config.contamination, config.seed
    );
    println!("  threshold     {:.6}", model.threshold());
    println!("  fingerprint   {}", model.training.fingerprint);
    println!("  fit time      {:.3} s", took.as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

async fn diagnose(args: DiagnoseArgs) -> Result<ExitCode> {
    use healer_engine::diagnose;
    use healer_operators::decision::Policy;
    use healer_operators::rca::RcaConfig;
    let (topology, changes) = topology_and_changes(&args.topology, args.changes.as_deref()).await?;
    let window = humantime::parse_duration(&args.window)
        .with_context(|| format!("--window `{}`", args.window))?;
    let s3 = s3_with_endpoint(args.s3_endpoint.as_deref());
    let log = Location::parse(&args.log, &s3, false)?;
    let mut anomalies = diagnose::read_anomalies(&log)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut remediator = match &args.remediation {
        Some(path) => Some(remedy_cli::open(path)?),
        None => None,
    };
    if let Some(r) = &remediator {
        for rep in r.recover().await? {
            remedy_cli::print_report(&rep);
        }
        let (kept, own) = r.drop_own(anomalies)?;
        anomalies = kept;
        if own > 0 {
            println!("{own} anomal(ies) fall in healer's own remediations: not incidents");
        }
    }
    let config = RcaConfig {
        window_ms: window.as_millis() as i64,
        ..RcaConfig::default()
    };
    let policy = Policy {
        min_confidence: args.min_confidence,
        ..Policy::default()
    };
    let llm = match &args.llm_model {
        Some(model) => Some(
            healer_engine::llm::BedrockConsultant::new(healer_engine::llm::LlmConfig {
                model_id: model.clone(),
                region: args.llm_region.clone(),
                endpoint: args.llm_endpoint.clone(),
                timeout: humantime::parse_duration(&args.llm_timeout)
                    .with_context(|| format!("--llm-timeout `{}`", args.llm_timeout))?,
                ..healer_engine::llm::LlmConfig::default()
            })
            .await,
        ),
        None => None,
    };
    let diagnosed = diagnose::run(
        &topology,
        &anomalies,
        &changes,
        &config,
        &policy,
        llm.as_ref(),
        args.llm_verify,
    )
    .await;
    let paths = diagnose::write(&log, &diagnosed)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "{} anomalies, {} incident(s) over {} resources; written to {} file(s) under {}/incidents",
        fmt_int(anomalies.len() as u64),
        diagnosed.len(),
        topology.len(),
        paths.len(),
        log.display()
    );
    println!(
        "{:<19}  {:>9}  {:<24} {:>5}  {:<16} {:<18} reason",
        "start", "resources", "root cause", "conf", "decision", "action"
    );
    for d in &diagnosed {
        let rc = d.incident.root_cause();
        println!(
            "{:<19}  {:>9}  {:<24} {:>5}  {:<16} {:<18} {}",
            fmt_ts(d.incident.start_ms),
            d.incident.resources.len(),
            rc.map_or("(unable to determine)".to_string(), |r| r.resource.clone()),
            rc.map_or("-".to_string(), |r| format!("{:.2}", r.confidence)),
            d.decision.outcome.as_str(),
            d.decision.action.as_deref().unwrap_or("-"),
            d.decision.reasons.last().map_or("", String::as_str)
        );
    }
    if let Some(r) = &mut remediator
        && let Some(path) = &args.telemetry
    {
        let targets: Vec<String> = diagnosed
            .iter()
            .filter_map(|d| d.decision.target.clone())
            .collect();
        let samples = healer_engine::remedy::read_telemetry(path, &targets)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        r.set_telemetry(samples);
    }
    if let Some(r) = &remediator {
        let mut failed = 0;
        for d in &diagnosed {
            let report = r.handle(d).await?;
            remedy_cli::print_report(&report);
            // Handled means done, or in a human's hands: a failed saga or an escalation
            // nobody received is a failure the caller must see.
            if report.state == "failed"
                || report
                    .steps
                    .iter()
                    .any(|s| s.starts_with("escalate failed"))
            {
                failed += 1;
            }
        }
        remedy_cli::export(r, Some(&args.log)).await?;
        return Ok(if failed > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let targets = healer_engine::notify::targets(
        args.pagerduty_routing_key.as_deref(),
        args.pagerduty_url.as_deref(),
        args.slack_webhook.as_deref(),
    );
    let mut undelivered = 0;
    if !targets.is_empty() {
        use healer_operators::decision::Outcome;
        let client = healer_engine::notify::client();
        let policy = healer_engine::notify::WebhookPolicy::default();
        for d in diagnosed
            .iter()
            .filter(|d| d.decision.outcome == Outcome::Escalate)
        {
            let escalation = healer_engine::notify::Escalation::of(d);
            for result in
                healer_engine::notify::escalate(&client, &targets, &escalation, &policy).await
            {
                match result {
                    Ok(delivery) => println!(
                        "  escalated incident {} (HTTP {}, {} call(s))",
                        d.id, delivery.status, delivery.attempts
                    ),
                    Err(e) => {
                        undelivered += 1;
                        eprintln!("  escalation of incident {} not delivered: {e}", d.id);
                    }
                }
            }
        }
    }
    // An escalation nobody received is a failure the caller must see.
    Ok(if undelivered > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn eval_nab(args: EvalNabArgs) -> Result<ExitCode> {
    use healer_engine::nab_eval;
    let series = nab_eval::load(&args.dataset, args.labels.as_deref())?;
    let (scores, detector) = match &args.scores {
        Some(dir) => (
            nab_eval::read_results(dir, &series)?,
            format!("scores in {}", dir.display()),
        ),
        None => {
            let work = tempfile_dir()?;
            let scores = nab_eval::detect(&series, &args.rules, work.path()).await?;
            (scores, "healer (this run)".to_string())
        }
    };
    if let Some(out) = &args.out {
        nab_eval::write_results(out, &series, &scores)
            .with_context(|| format!("writing results under {}", out.display()))?;
    }
    let report = nab_eval::score(&series, &scores)?;
    println!(
        "NAB: {} series, {} with labels here ({} windows); one threshold per profile for all files",
        series.len(),
        report.files,
        report.windows
    );
    println!();
    println!(
        "  {:<28} {:>9} {:>14} {:>14}",
        "detector", "standard", "reward_low_FP", "reward_low_FN"
    );
    let by_name = |name: &str| {
        report
            .scores
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(f64::NAN, |s| s.1)
    };
    println!(
        "  {:<28} {:>9.1} {:>14.1} {:>14.1}",
        detector,
        by_name("standard"),
        by_name("reward_low_FP_rate"),
        by_name("reward_low_FN_rate")
    );
    let published = args.dataset.join("results/final_results.json");
    if let Ok(bytes) = std::fs::read(&published) {
        let table: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>> =
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", published.display()))?;
        let mut rows: Vec<_> = table.into_iter().collect();
        rows.sort_by(|a, b| {
            let s = |r: &std::collections::BTreeMap<String, f64>| {
                r.get("standard").copied().unwrap_or(0.0)
            };
            s(&b.1).total_cmp(&s(&a.1))
        });
        for (name, r) in rows {
            let g = |k: &str| r.get(k).copied().unwrap_or(f64::NAN);
            println!(
                "  {:<28} {:>9.1} {:>14.1} {:>14.1}",
                format!("{name} (published)"),
                g("standard"),
                g("reward_low_FP_rate"),
                g("reward_low_FN_rate")
            );
        }
    }
    println!();
    println!(
        "  thresholds: {}",
        report
            .scores
            .iter()
            .map(|(n, _, t)| format!("{n} {t:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  published scores cover all 58 files with NAB's full labels; healer's cover the {} labelled here",
        report.files
    );
    if args.files {
        println!();
        println!("  per file, standard profile (tp 1, fp 0.11, fn 1) at its threshold:");
        println!(
            "  {:<58} {:>8} {:>6} {:>10} {:>8}",
            "file", "detected", "missed", "fp rows", "raw"
        );
        for (key, f) in &report.files_standard {
            println!(
                "  {:<58} {:>8} {:>6} {:>10} {:>8.3}",
                key, f.windows_detected, f.windows_missed, f.counts.false_positives, f.raw
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_smd(args: EvalSmdArgs) -> Result<ExitCode> {
    let options = healer_engine::smd_eval::SmdOptions {
        detector: args.detector,
        smooth: args.smooth as usize,
        smoother: args.smoother,
    };
    let machines = healer_engine::smd_eval::evaluate(&args.dataset, &options)?;
    println!(
        "SMD, {} fitted on train/, scored on test/, each score {}",
        options.detector.describe(),
        options.smoother.describe(options.smooth)
    );
    println!();
    println!(
        "  {:<12} {:>7} {:>9} {:>9} {:>7} {:>7} {:>10}",
        "machine", "rows", "F1", "F1 (PA)", "AUROC", "AUPRC", "culprits"
    );
    let n = machines.len().max(1) as f64;
    let mut sums = [0.0; 4];
    let (mut hits, mut segments) = (0, 0);
    for m in &machines {
        let culprits = m.culprits.map_or("-".to_string(), |(h, t)| {
            hits += h;
            segments += t;
            format!("{h}/{t}")
        });
        println!(
            "  {:<12} {:>7} {:>9.4} {:>9.4} {:>7.4} {:>7.4} {:>10}",
            m.machine, m.rows, m.f1, m.f1_point_adjusted, m.auroc, m.auprc, culprits
        );
        for (s, v) in sums
            .iter_mut()
            .zip([m.f1, m.f1_point_adjusted, m.auroc, m.auprc])
        {
            *s += v;
        }
    }
    println!(
        "  {:<12} {:>7} {:>9.4} {:>9.4} {:>7.4} {:>7.4} {:>10}",
        "mean",
        "",
        sums[0] / n,
        sums[1] / n,
        sums[2] / n,
        sums[3] / n,
        if segments > 0 {
            format!("{:.3}", hits as f64 / segments as f64)
        } else {
            "-".into()
        }
    );
    let published = args.dataset.join("published_scores/garg2021_tnnls_smd.csv");
    if let Ok(text) = std::fs::read_to_string(&published) {
        println!();
        println!(
            "  published (Garg et al. 2021, all 28 machines): point-wise F1, AUROC, AUPRC, RC-Top3"
        );
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("algorithm"))
        {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() >= 7 {
                println!(
                    "  {:<24} {:>7} {:>7} {:>7} {:>7}",
                    f[0], f[1], f[4], f[5], f[6]
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A temporary directory removed on drop.
fn tempfile_dir() -> Result<TempDir> {
    let path = std::env::temp_dir().join(format!("healer-eval-{}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(TempDir(path))
}

#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn eval_rca(args: EvalRcaArgs) -> Result<ExitCode> {
    use healer_engine::petshop;
    let scenarios = if args.dataset.join("dataset").is_dir() {
        args.dataset.join("dataset")
    } else {
        args.dataset.clone()
    };
    let eval = petshop::evaluate(&scenarios).map_err(|e| anyhow::anyhow!(e))?;
    // The published traversal baseline, when the folder has it.
    let mut baseline = std::collections::HashMap::new();
    if let Ok(text) =
        std::fs::read_to_string(args.dataset.join("baseline_anomaly_traversal_notebook.csv"))
    {
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("scenario"))
        {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() >= 7 {
                baseline.insert(
                    (f[0].to_string(), f[1].to_string()),
                    (f[4].to_string(), f[5].to_string(), f[6].to_string()),
                );
            }
        }
    }
    for p in &eval.predictions {
        println!(
            "{:<18} {:<5} {:<9} {:<12} truth={:<28} ranked={}",
            p.scenario,
            p.split,
            p.issue,
            p.metric,
            p.truth.as_deref().unwrap_or("-"),
            p.ranked
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    println!();
    println!(
        "{:<17} {:<12} {:>8} {:>6} {:>6} {:>6} {:>11} | baseline top1 top3 specificity",
        "scenario", "metric", "labelled", "empty", "top1", "top3", "specificity"
    );
    let ratio = |a: usize, b: usize| {
        if b == 0 {
            "-".to_string()
        } else {
            format!("{:.3}", a as f64 / b as f64)
        }
    };
    for ((scenario, metric), s) in &eval.scores {
        let (b1, b3, bs) = baseline
            .get(&(scenario.clone(), metric.clone()))
            .cloned()
            .unwrap_or_else(|| ("-".into(), "-".into(), "-".into()));
        println!(
            "{:<17} {:<12} {:>8} {:>6} {:>6} {:>6} {:>11} | {:>13} {:>4} {:>11}",
            scenario,
            metric,
            s.labelled,
            s.empty,
            ratio(s.top1, s.labelled),
            ratio(s.top3, s.labelled),
            ratio(s.quiet_windows, s.windows),
            b1,
            b3,
            bs
        );
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let path = out.join("predictions.csv");
        std::fs::write(&path, petshop::predictions_csv(&eval))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("predictions written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
