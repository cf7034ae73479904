//! The pipeline configuration (`pipeline.toml`).
//!
//! ```toml
//! [source]
//! kind = "parquet"
//! paths = ["data/"]          # files, directories, file:// or s3:// URLs
//! speed = "max"              # or "10x": event time runs 10 times faster than wall time
//! batch_rows = 65536
//!
//! [source.s3]                # only for s3:// paths; unset keys come from AWS_* variables
//! endpoint = "http://127.0.0.1:5000"
//! region = "us-east-1"
//! allow_http = true
//!
//! [source.kinesis]          # only for kind = "kinesis" (`healer run`)
//! stream = "metrics"         # stream name or ARN
//! region = "us-east-1"       # unset: the standard AWS chain (AWS_REGION, profile, …)
//! endpoint = "http://127.0.0.1:4567"   # unset: the AWS endpoint
//! start = "trim_horizon"     # or "latest", "at_timestamp" (with start_timestamp)
//! mode = "polling"           # or "enhanced_fan_out" (consumer_name = "healer")
//! poll_interval = "200ms"    # GetRecords per shard at most this often (5/s is AWS's limit)
//! max_poll_interval = "2s"   # back-off ceiling while a shard is empty
//! idle_timeout = "5s"        # an empty shard at its tip holds the watermark at wall time
//! max_future_skew = "1h"     # samples with ts this far after their arrival: dead letter
//! batch_max_rows = 8192      # micro-batches: at most this many rows …
//! batch_max_delay = "200ms"  # … or this old
//!
//! [source.schema]            # columns of JSON records beyond ts and resource; default: the
//! cpu_percent = "double"     # canonical schema (service, region and the 16 metrics)
//!
//! [rules]
//! paths = []                 # rule files or directories; empty = the bundled rules
//! onnxruntime = "/opt/ort/libonnxruntime.so.1.32.0"  # LSTM backend; unset: HEALER_ONNXRUNTIME, else tract
//!
//! [event_time]
//! max_out_of_orderness = "0s" # rows later than this behind the newest are dead-lettered
//!
//! [engine]
//! partitions = 0              # keyed workers; 0 = one per core
//! channel_capacity = 8        # batches in flight per edge (backpressure bound)
//!
//! [sink]
//! out = "healer-out"          # directory or URL of the incident log
//! max_rows_per_file = 1000000
//! flush_interval = "1s"      # streaming: buffered anomalies are written at least this often
//!
//! [checkpoint]                # streaming (`healer run`) only
//! location = ""               # default: <sink.out>/checkpoints
//! interval = "10s"
//!
//! [lease]                     # `healer run` only: several workers share the stream
//! table = ""                  # DynamoDB lease table (KCL schema); empty = one worker, no leases
//! endpoint = ""               # unset: the AWS endpoint (region and keys as for Kinesis)
//! create_table = true         # create the table when it is missing …
//! billing_mode = "PAY_PER_REQUEST"  # … on demand, or "PROVISIONED" (read/write_capacity)
//! read_capacity = 10
//! write_capacity = 10
//! duration = "10s"            # a lease not renewed for this long may be taken
//! renew_interval = "3s"       # owned leases are renewed this often
//! sync_interval = "30s"       # new shards become leases this often (and at every shard end)
//! max_steals = 1              # leases asked from the most loaded worker per round
//! max_leases = 100            # leases one worker holds at most (one transaction per checkpoint)
//! ```
//!
//! Every section and key is optional; the defaults are the ones shown. Unknown keys are
//! errors. [`PipelineConfig::load`] reports every problem at once with file, line and key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::S3Config;

/// Source section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Source kind: `parquet` (replay) or `kinesis` (`healer run`).
    pub kind: String,
    /// Inputs: files, directories (every `*.parquet` below), `file://` or `s3://` URLs.
    pub paths: Vec<String>,
    /// Replay pace: `max` or `<factor>x`.
    pub speed: String,
    /// Rows per batch read from a file, at most: wide rows get fewer, so that a batch holds
    /// about 16 MiB of decoded columns (at least 1,024 rows). Every batch pays a fixed cost
    /// in each stage (kernel calls, allocations, a watermark), so replay wants large ones:
    /// 65,536 rows replay the benchmark (18 columns) 1.7× faster than 8,192, and 131,072 no
    /// faster.
    pub batch_rows: usize,
    /// S3 settings for `s3://` inputs.
    pub s3: S3Config,
    /// Kinesis settings, for `kind = "kinesis"`.
    pub kinesis: KinesisConfig,
    /// Columns of decoded records (name → `double`, `int` or `string`) besides `ts` and
    /// `resource`; empty means the canonical schema.
    pub schema: std::collections::BTreeMap<String, String>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: "parquet".into(),
            paths: Vec::new(),
            speed: "max".into(),
            batch_rows: 65_536,
            s3: S3Config::default(),
            kinesis: KinesisConfig::default(),
            schema: Default::default(),
        }
    }
}

/// Kinesis source settings (`[source.kinesis]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KinesisConfig {
    /// Stream name or ARN.
    pub stream: String,
    /// Region; unset means the standard AWS chain.
    pub region: Option<String>,
    /// Endpoint override (an emulator, a VPC endpoint).
    pub endpoint: Option<String>,
    /// Access key id; unset means the standard AWS credential chain.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Where shards without a checkpoint start: `trim_horizon`, `latest` or `at_timestamp`.
    pub start: String,
    /// RFC 3339 time for `start = "at_timestamp"`.
    pub start_timestamp: Option<String>,
    /// Record format: `json` (one sample object, or an array of them, per record).
    pub format: String,
    /// How shards are read: `polling` (`GetRecords`) or `enhanced_fan_out`
    /// (`SubscribeToShard` through a registered consumer, its own 2 MB/s per shard).
    /// Enhanced fan-out is verified on a backlog only: kinesis-local's subscriptions deliver
    /// the records present when they start, then only empty events, so live tailing and
    /// resharding through it are not verified.
    pub mode: String,
    /// Enhanced fan-out: the consumer's name (registered if missing).
    pub consumer_name: String,
    /// Records larger than this many bytes are dead-lettered.
    pub max_record_bytes: usize,
    /// Shortest interval between two GetRecords calls on one shard.
    pub poll_interval: String,
    /// Longest interval, reached by backing off while a shard returns nothing.
    pub max_poll_interval: String,
    /// Records asked for per GetRecords call (at most 10,000).
    pub records_per_get: i32,
    /// How often the shard list is refreshed (new shards after a reshard).
    pub list_shards_interval: String,
    /// A shard read to its tip that stays empty this long holds the watermark no longer at
    /// its last event time but at the wall-clock time of its last empty read.
    pub idle_timeout: String,
    /// Samples whose `ts` is further than this after their record's arrival time are
    /// dead-lettered (a producer writing microseconds, a broken clock), so that one bad
    /// timestamp cannot push the watermark past every later row.
    pub max_future_skew: String,
    /// A micro-batch is sent when it holds this many rows …
    pub batch_max_rows: usize,
    /// … or when its oldest row has waited this long.
    pub batch_max_delay: String,
}

impl Default for KinesisConfig {
    fn default() -> Self {
        Self {
            stream: String::new(),
            region: None,
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            start: "trim_horizon".into(),
            start_timestamp: None,
            format: "json".into(),
            mode: "polling".into(),
            consumer_name: "healer".into(),
            max_record_bytes: 1 << 20,
            poll_interval: "200ms".into(),
            max_poll_interval: "2s".into(),
            records_per_get: 10_000,
            list_shards_interval: "10s".into(),
            idle_timeout: "5s".into(),
            max_future_skew: "1h".into(),
            batch_max_rows: 8192,
            batch_max_delay: "200ms".into(),
        }
    }
}

/// Checkpoint settings (`[checkpoint]`), for the streaming job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory or URL; empty means `<sink.out>/checkpoints`.
    pub location: String,
    /// Time between two checkpoints.
    pub interval: String,
    /// Completed checkpoints kept (older ones are deleted).
    pub retain: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            location: String::new(),
            interval: "10s".into(),
            retain: 3,
        }
    }
}

/// Rules section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(clippy::derivable_impls)] // the hand-written Default documents what empty means
pub struct RulesConfig {
    /// Rule files or directories of `*.sql` files; empty means the bundled rules.
    pub paths: Vec<PathBuf>,
    /// ONNX Runtime's shared library (`libonnxruntime.so.1.32.0` from the `onnxruntime`
    /// wheel) for rules that call the LSTM forecaster. Unset: `HEALER_ONNXRUNTIME`, else the
    /// built-in pure-Rust tract backend.
    pub onnxruntime: Option<PathBuf>,
}

impl Default for RulesConfig {
    /// No paths: the rules bundled with healer; the ONNX Runtime backend from the environment.
    fn default() -> Self {
        Self {
            paths: Vec::new(),
            onnxruntime: None,
        }
    }
}

/// Event-time section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventTimeConfig {
    /// Bounded out-of-orderness, e.g. `"5s"`.
    pub max_out_of_orderness: String,
}

impl Default for EventTimeConfig {
    fn default() -> Self {
        Self {
            max_out_of_orderness: "0s".into(),
        }
    }
}

/// Engine section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Keyed workers; 0 = one per core.
    pub partitions: usize,
    /// Bounded channel capacity, in messages.
    pub channel_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            partitions: 0,
            channel_capacity: 8,
        }
    }
}

/// Sink section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Directory or URL of the incident log.
    pub out: String,
    /// Rows per parquet file at most.
    pub max_rows_per_file: usize,
    /// S3 settings for an `s3://` output.
    pub s3: S3Config,
    /// Streaming: buffered anomalies are written at least this often.
    pub flush_interval: String,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            out: "healer-out".into(),
            max_rows_per_file: 1_000_000,
            s3: S3Config::default(),
            flush_interval: "1s".into(),
        }
    }
}

/// The whole pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Where metrics come from.
    pub source: SourceConfig,
    /// Detection rules.
    pub rules: RulesConfig,
    /// Event-time handling.
    pub event_time: EventTimeConfig,
    /// Parallelism and buffering.
    pub engine: EngineConfig,
    /// Incident log.
    pub sink: SinkConfig,
    /// Checkpoints of the streaming job.
    pub checkpoint: CheckpointConfig,
    /// Scale-out: the lease table shared by the workers.
    pub lease: LeaseConfig,
}

/// Lease settings (`[lease]`): several workers share the stream's shards through a
/// DynamoDB table with the Kinesis Client Library's lease schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// Table name; empty means a single worker without leases.
    pub table: String,
    /// Endpoint URL (a local DynamoDB); unset: the AWS endpoint.
    pub endpoint: Option<String>,
    /// Create the table when it does not exist.
    pub create_table: bool,
    /// `PAY_PER_REQUEST` or `PROVISIONED`.
    pub billing_mode: String,
    /// Provisioned read capacity units.
    pub read_capacity: i64,
    /// Provisioned write capacity units.
    pub write_capacity: i64,
    /// A lease whose counter has not changed for this long may be taken.
    pub duration: String,
    /// Owned leases are renewed this often (at most a third of `duration`).
    pub renew_interval: String,
    /// The shard list is turned into leases this often.
    pub sync_interval: String,
    /// Leases asked from the most loaded worker in one round.
    pub max_steals: usize,
    /// Leases one worker holds at most.
    pub max_leases: usize,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            table: String::new(),
            endpoint: None,
            create_table: true,
            billing_mode: "PAY_PER_REQUEST".into(),
            read_capacity: 10,
            write_capacity: 10,
            duration: "10s".into(),
            renew_interval: "3s".into(),
            sync_interval: "30s".into(),
            max_steals: 1,
            max_leases: 100,
        }
    }
}

impl LeaseConfig {
    /// Whether leases are on.
    pub fn enabled(&self) -> bool {
        !self.table.trim().is_empty()
    }

    fn validate(&self, problems: &mut Vec<(String, String)>) {
        if !self.enabled() {
            return;
        }
        let mut durations = Vec::new();
        for (key, value) in [
            ("lease.duration", &self.duration),
            ("lease.renew_interval", &self.renew_interval),
            ("lease.sync_interval", &self.sync_interval),
        ] {
            match parse_duration(value) {
                Ok(d) if d.is_zero() => problems.push((key.into(), "must be positive".into())),
                Ok(d) => durations.push(d),
                Err(e) => problems.push((key.into(), e)),
            }
        }
        if let [duration, renew, _] = durations[..]
            && renew * 3 > duration
        {
            problems.push((
                "lease.renew_interval".into(),
                format!(
                    "must be at most a third of lease.duration ({}): a lease is held until duration - renew_interval after a renewal, so a slow renewal would lose it",
                    self.duration
                ),
            ));
        }
        if !matches!(
            self.billing_mode.as_str(),
            "PAY_PER_REQUEST" | "PROVISIONED"
        ) {
            problems.push((
                "lease.billing_mode".into(),
                format!(
                    "`{}`: expected PAY_PER_REQUEST or PROVISIONED",
                    self.billing_mode
                ),
            ));
        }
        if self.read_capacity < 1 || self.write_capacity < 1 {
            problems.push((
                "lease.read_capacity".into(),
                "capacities must be at least 1".into(),
            ));
        }
        if !(1..=100).contains(&self.max_leases) {
            problems.push((
                "lease.max_leases".into(),
                "must be 1 to 100 (a checkpoint commits every lease in one transaction)".into(),
            ));
        }
    }
}

/// Replay pace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// As fast as possible.
    Max,
    /// Event time advances this many times faster than wall-clock time.
    Factor(f64),
}

/// Parses `max` or `<factor>x` (e.g. `10x`, `0.5x`).
pub fn parse_speed(s: &str) -> Result<Speed, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("max") {
        return Ok(Speed::Max);
    }
    let factor = s
        .strip_suffix(['x', 'X'])
        .ok_or_else(|| format!("speed `{s}` must be `max` or like `10x`"))?;
    match factor.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(Speed::Factor(f)),
        _ => Err(format!(
            "speed `{s}` must be `max` or a positive factor like `10x`"
        )),
    }
}

/// Parses a duration like `"5s"`, `"250ms"`, `"1m 30s"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("duration `{s}`: {e}"))
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// Dotted key path, e.g. `engine.partitions`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ConfigProblem {
    /// A problem of `key` at `line` of `file`.
    pub fn at(file: &Path, line: usize, key: &str, message: String) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            key: key.to_string(),
            message,
        }
    }

    /// `path` could not be read.
    pub fn unreadable(path: &Path, e: &std::io::Error) -> Self {
        Self::at(path, 0, "", e.to_string())
    }

    /// A TOML error of `text` (syntax, or a type or field serde rejected), at the line its
    /// span starts on.
    pub fn toml(file: &Path, text: &str, e: &toml::de::Error) -> Self {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(0);
        Self::at(file, line, "", e.message().to_string())
    }
}

/// The text of the configuration file `path`, or the problem reading it.
pub fn read_config(path: &Path) -> Result<String, Vec<ConfigProblem>> {
    std::fs::read_to_string(path).map_err(|e| vec![ConfigProblem::unreadable(path, &e)])
}

/// Line of `key` inside `[section]` (or at top level when `section` is empty), by scanning
/// the text. Good enough for messages; 0 when not found.
fn locate(text: &str, section: &str, key: &str) -> usize {
    let mut current = String::new();
    let mut section_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = header.trim().to_string();
            if current == section && key.is_empty() {
                return i + 1;
            }
            if current == section {
                section_line = i + 1;
            }
            continue;
        }
        if current == section
            && !key.is_empty()
            && line
                .split('=')
                .next()
                .is_some_and(|k| k.trim().trim_matches('"') == key)
        {
            return i + 1;
        }
    }
    section_line
}

/// The key named in a serde error message ("unknown field `x`", "missing field `x`", "invalid type … for key `x`").
fn key_in_message(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(&message[start..end])
}

impl PipelineConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, Vec<ConfigProblem>> {
        Self::parse(path, &read_config(path)?)
    }

    /// Parses and validates configuration text; `file` is used in messages.
    pub fn parse(file: &Path, text: &str) -> Result<Self, Vec<ConfigProblem>> {
        let problem =
            |line: usize, key: &str, message: String| ConfigProblem::at(file, line, key, message);
        let table: toml::Table =
            toml::from_str(text).map_err(|e| vec![ConfigProblem::toml(file, text, &e)])?;
        let mut problems = Vec::new();
        let mut config = PipelineConfig::default();
        // Each section on its own, so one bad section does not hide the others' problems.
        for (section, value) in &table {
            let result = match section.as_str() {
                "source" => value.clone().try_into().map(|v| config.source = v),
                "rules" => value.clone().try_into().map(|v| config.rules = v),
                "event_time" => value.clone().try_into().map(|v| config.event_time = v),
                "engine" => value.clone().try_into().map(|v| config.engine = v),
                "sink" => value.clone().try_into().map(|v| config.sink = v),
                "checkpoint" => value.clone().try_into().map(|v| config.checkpoint = v),
                "lease" => value.clone().try_into().map(|v| config.lease = v),
                other => {
                    problems.push(problem(
                        locate(text, other, ""),
                        other,
                        "unknown section (expected source, rules, event_time, engine, sink, checkpoint, lease)"
                            .into(),
                    ));
                    continue;
                }
            };
            if let Err(e) = result {
                let message = e.message().to_string();
                let key = key_in_message(&message).unwrap_or("");
                let line = locate(text, section, key);
                let path = if key.is_empty() {
                    section.clone()
                } else {
                    format!("{section}.{key}")
                };
                problems.push(problem(line, &path, message));
            }
        }
        for (key, message) in config.validate() {
            let (section, leaf) = key.rsplit_once('.').unwrap_or((key.as_str(), ""));
            problems.push(problem(locate(text, section, leaf), &key, message));
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            problems.sort_by_key(|p| p.line);
            Err(problems)
        }
    }

    /// Semantic checks; every problem as (key path, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        match self.source.kind.as_str() {
            "parquet" => {}
            "kinesis" => self.validate_kinesis(&mut problems),
            other => problems.push((
                "source.kind".into(),
                format!("unknown source kind `{other}` (this build has: parquet, kinesis)"),
            )),
        }
        for (name, ty) in &self.source.schema {
            if crate::kinesis::decode::column_type(ty).is_none() {
                problems.push((
                    "source.schema".into(),
                    format!("column `{name}`: unknown type `{ty}` (double, int or string)"),
                ));
            }
            if name == "ts" || name == "resource" {
                problems.push((
                    "source.schema".into(),
                    format!("`{name}` is always present and cannot be redeclared"),
                ));
            }
        }
        for (key, value) in [
            ("sink.flush_interval", &self.sink.flush_interval),
            ("checkpoint.interval", &self.checkpoint.interval),
        ] {
            match parse_duration(value) {
                Ok(d) if d.is_zero() => problems.push((key.into(), "must be positive".into())),
                Ok(_) => {}
                Err(e) => problems.push((key.into(), e)),
            }
        }
        self.lease.validate(&mut problems);
        if self.checkpoint.retain == 0 {
            problems.push(("checkpoint.retain".into(), "must be at least 1".into()));
        }
        if let Some(lib) = &self.rules.onnxruntime
            && !lib.is_file()
        {
            problems.push((
                "rules.onnxruntime".into(),
                format!("no such file: {}", lib.display()),
            ));
        }
        if let Err(e) = parse_speed(&self.source.speed) {
            problems.push(("source.speed".into(), e));
        }
        if self.source.batch_rows == 0 {
            problems.push(("source.batch_rows".into(), "must be at least 1".into()));
        }
        if let Err(e) = parse_duration(&self.event_time.max_out_of_orderness) {
            problems.push(("event_time.max_out_of_orderness".into(), e));
        }
        if self.engine.channel_capacity == 0 {
            problems.push((
                "engine.channel_capacity".into(),
                "must be at least 1".into(),
            ));
        }
        if self.engine.partitions > 1024 {
            problems.push(("engine.partitions".into(), "at most 1024".into()));
        }
        if self.sink.max_rows_per_file == 0 {
            problems.push(("sink.max_rows_per_file".into(), "must be at least 1".into()));
        }
        if self.sink.out.trim().is_empty() {
            problems.push(("sink.out".into(), "must name a directory or URL".into()));
        }
        problems
    }

    fn validate_kinesis(&self, problems: &mut Vec<(String, String)>) {
        let k = &self.source.kinesis;
        let mut bad = |key: &str, message: String| {
            problems.push((format!("source.kinesis.{key}"), message));
        };
        if k.stream.trim().is_empty() {
            bad("stream", "name the stream (its name or ARN)".into());
        }
        match k.start.as_str() {
            "trim_horizon" | "latest" => {}
            "at_timestamp" => match &k.start_timestamp {
                Some(t) if chrono::DateTime::parse_from_rfc3339(t).is_ok() => {}
                Some(t) => bad("start_timestamp", format!("`{t}` is not an RFC 3339 time")),
                None => bad(
                    "start_timestamp",
                    "required with start = \"at_timestamp\"".into(),
                ),
            },
            other => bad(
                "start",
                format!("`{other}`: expected trim_horizon, latest or at_timestamp"),
            ),
        }
        if k.mode != "polling" && k.mode != "enhanced_fan_out" {
            bad(
                "mode",
                format!("`{}`: expected polling or enhanced_fan_out", k.mode),
            );
        }
        if k.mode == "enhanced_fan_out" && k.consumer_name.trim().is_empty() {
            bad("consumer_name", "name the enhanced fan-out consumer".into());
        }
        if k.format != "json" {
            bad("format", format!("`{}`: this build decodes json", k.format));
        }
        if !(1..=10_000).contains(&k.records_per_get) {
            bad("records_per_get", "between 1 and 10000".into());
        }
        if k.batch_max_rows == 0 {
            bad("batch_max_rows", "must be at least 1".into());
        }
        if k.max_record_bytes == 0 {
            bad("max_record_bytes", "must be at least 1".into());
        }
        for (key, value, zero_ok) in [
            ("poll_interval", &k.poll_interval, false),
            ("max_poll_interval", &k.max_poll_interval, false),
            ("list_shards_interval", &k.list_shards_interval, false),
            ("idle_timeout", &k.idle_timeout, true),
            ("batch_max_delay", &k.batch_max_delay, false),
            ("max_future_skew", &k.max_future_skew, false),
        ] {
            match parse_duration(value) {
                Ok(d) if d.is_zero() && !zero_ok => bad(key, "must be positive".into()),
                Ok(_) => {}
                Err(e) => bad(key, e),
            }
        }
    }

    /// A duration setting that [`PipelineConfig::validate`] accepted.
    pub fn duration(value: &str) -> Duration {
        parse_duration(value).unwrap_or(Duration::from_secs(1))
    }

    /// Where checkpoints go: `checkpoint.location`, or `<sink.out>/checkpoints`.
    pub fn checkpoint_location(&self) -> String {
        if self.checkpoint.location.trim().is_empty() {
            format!("{}/checkpoints", self.sink.out.trim_end_matches('/'))
        } else {
            self.checkpoint.location.clone()
        }
    }

    /// The out-of-orderness bound in milliseconds.
    pub fn out_of_orderness_ms(&self) -> i64 {
        parse_duration(&self.event_time.max_out_of_orderness)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    /// The number of keyed workers to run.
    pub fn partitions(&self) -> usize {
        match self.engine.partitions {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        let c = PipelineConfig::parse(Path::new("p.toml"), "").unwrap();
        assert_eq!(c, PipelineConfig::default());
        let text = "[source]\npaths = [\"a.parquet\"]\nspeed = \"10x\"\n[engine]\npartitions = 2\n";
        let c = PipelineConfig::parse(Path::new("p.toml"), text).unwrap();
        assert_eq!(parse_speed(&c.source.speed), Ok(Speed::Factor(10.0)));
        assert_eq!(c.partitions(), 2);
    }

    #[test]
    fn every_problem_is_reported_with_line_and_key() {
        let text = "\
[source]
speed = \"fast\"

[engine]
partitions = 2
bogus = 1

[sink]
max_rows_per_file = 0

[nonsense]
x = 1
";
        let problems = PipelineConfig::parse(Path::new("p.toml"), text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 4, "{shown:#?}");
        assert!(
            shown[0].starts_with("p.toml:2: `source.speed`"),
            "{}",
            shown[0]
        );
        assert!(
            shown[1].starts_with("p.toml:6: `engine.bogus`: unknown field"),
            "{}",
            shown[1]
        );
        assert!(
            shown[2].starts_with("p.toml:9: `sink.max_rows_per_file`"),
            "{}",
            shown[2]
        );
        assert!(
            shown[3].starts_with("p.toml:11: `nonsense`"),
            "{}",
            shown[3]
        );
    }

    #[test]
    fn lease_settings_are_checked_where_they_are() {
        let text = "\
[source.kinesis]
stream = \"metrics\"

[lease]
table = \"healer-leases\"
duration = \"10s\"
renew_interval = \"8s\"
billing_mode = \"ON_DEMAND\"
max_leases = 500
";
        let problems = PipelineConfig::parse(Path::new("w.toml"), text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{shown:#?}");
        assert!(
            shown[0].starts_with("w.toml:7: `lease.renew_interval`"),
            "{}",
            shown[0]
        );
        assert!(
            shown[1].starts_with("w.toml:8: `lease.billing_mode`"),
            "{}",
            shown[1]
        );
        assert!(
            shown[2].starts_with("w.toml:9: `lease.max_leases`"),
            "{}",
            shown[2]
        );
        // Without a table, leases are off and their settings are not checked.
        let off = PipelineConfig::parse(Path::new("w.toml"), "[lease]\nrenew_interval = \"1h\"\n");
        assert!(!off.unwrap().lease.enabled());
    }

    #[test]
    fn syntax_errors_have_lines() {
        let problems =
            PipelineConfig::parse(Path::new("p.toml"), "[source]\npaths = [\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].line >= 2, "{:?}", problems[0]);
    }

    proptest::proptest! {
        /// Arbitrary text never panics the config parser.
        #[test]
        fn parser_never_panics(text in "\\PC{0,300}") {
            let _ = PipelineConfig::parse(Path::new("p.toml"), &text);
        }

        #[test]
        fn parser_never_panics_on_toml_shaped_text(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("[source]".to_string()),
                    proptest::strategy::Just("[engine]".to_string()),
                    proptest::strategy::Just("[sink]".to_string()),
                    "[a-z_]{1,12} = (\\d{1,4}|\"[a-z0-9 ]{0,8}\"|\\[\\]|true)",
                ],
                0..12,
            )
        ) {
            let _ = PipelineConfig::parse(Path::new("p.toml"), &lines.join("\n"));
        }
    }

    #[test]
    fn speeds_and_durations() {
        assert_eq!(parse_speed("MAX"), Ok(Speed::Max));
        assert_eq!(parse_speed("0.5x"), Ok(Speed::Factor(0.5)));
        assert!(parse_speed("-1x").is_err());
        assert!(parse_speed("10").is_err());
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
    }
}
