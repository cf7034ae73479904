//! The pipeline configuration (`pipeline.toml`).
//!
//! ```toml
//! [source]
//! kind = "parquet"
//! paths = ["data/"]          # files, directories, file:// or s3:// URLs
//! speed = "max"              # or "10x": event time runs 10 times faster than wall time
//! batch_rows = 8192
//!
//! [source.s3]                # only for s3:// paths; unset keys come from AWS_* variables
//! endpoint = "http://127.0.0.1:5000"
//! region = "us-east-1"
//! allow_http = true
//!
//! [rules]
//! paths = []                 # rule files or directories; empty = the bundled rules
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
    /// Source kind; `parquet` is the only one in this build.
    pub kind: String,
    /// Inputs: files, directories (every `*.parquet` below), `file://` or `s3://` URLs.
    pub paths: Vec<String>,
    /// Replay pace: `max` or `<factor>x`.
    pub speed: String,
    /// Rows per batch read from a file.
    pub batch_rows: usize,
    /// S3 settings for `s3://` inputs.
    pub s3: S3Config,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: "parquet".into(),
            paths: Vec::new(),
            speed: "max".into(),
            batch_rows: 8192,
            s3: S3Config::default(),
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
}

impl Default for RulesConfig {
    /// No paths: the rules bundled with healer.
    fn default() -> Self {
        Self { paths: Vec::new() }
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
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            out: "healer-out".into(),
            max_rows_per_file: 1_000_000,
            s3: S3Config::default(),
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
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigProblem {
                file: path.to_path_buf(),
                line: 0,
                key: String::new(),
                message: e.to_string(),
            }]
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `file` is used in messages.
    pub fn parse(file: &Path, text: &str) -> Result<Self, Vec<ConfigProblem>> {
        let problem = |line: usize, key: &str, message: String| ConfigProblem {
            file: file.to_path_buf(),
            line,
            key: key.to_string(),
            message,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(0);
            vec![problem(line, "", e.message().to_string())]
        })?;
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
                other => {
                    problems.push(problem(
                        locate(text, other, ""),
                        other,
                        "unknown section (expected source, rules, event_time, engine, sink)".into(),
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
            let (section, leaf) = key.split_once('.').unwrap_or((key.as_str(), ""));
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
        if self.source.kind != "parquet" {
            problems.push((
                "source.kind".into(),
                format!(
                    "unknown source kind `{}` (this build has: parquet)",
                    self.source.kind
                ),
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
