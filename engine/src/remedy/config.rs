//! The remediation configuration (`remediation.toml`) and the action library.
//!
//! Every problem is reported at load with its file, line and key, and the whole file is
//! checked before anything runs: a typo in a target's backend is found when healer starts,
//! not in the middle of an incident.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigProblem;

/// What an action does, carried out by the target's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Drain, stop, start, health-check.
    Restart,
    /// Add capacity.
    ScaleUp,
    /// Redeploy the previous release.
    RollbackDeploy,
    /// Raise the memory limit and restart.
    IncreaseMemory,
    /// Flush a cache.
    ClearCache,
    /// Promote a replica.
    FailoverDatabase,
    /// Call an HTTP endpoint.
    Webhook,
}

impl Operation {
    /// The name used in configuration and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Restart => "restart",
            Operation::ScaleUp => "scale_up",
            Operation::RollbackDeploy => "rollback_deploy",
            Operation::IncreaseMemory => "increase_memory",
            Operation::ClearCache => "clear_cache",
            Operation::FailoverDatabase => "failover_database",
            Operation::Webhook => "webhook",
        }
    }
}

/// How much an action can break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Radius {
    /// One resource, reversible.
    Low,
    /// Noticeable to others for a while.
    Medium,
    /// Many resources, or hard to undo.
    High,
}

/// A comparison in a metric precondition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Op {
    /// Greater than.
    #[serde(rename = ">")]
    Gt,
    /// Greater than or equal.
    #[serde(rename = ">=")]
    Ge,
    /// Less than.
    #[serde(rename = "<")]
    Lt,
    /// Less than or equal.
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    /// Whether `value op threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }
}

/// One precondition: a metric comparison (optionally held for a while) or a health check.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Precondition {
    /// Metric name, read live from the backend (and from telemetry for `for`).
    pub metric: Option<String>,
    /// Comparison.
    pub op: Option<Op>,
    /// Threshold.
    pub threshold: Option<f64>,
    /// How long the comparison must have held, in telemetry (e.g. `"5m"`).
    #[serde(rename = "for")]
    pub for_: Option<String>,
    /// A boolean health check of the backend instead.
    pub check: Option<String>,
}

impl Precondition {
    /// The precondition in words.
    pub fn describe(&self) -> String {
        match (&self.check, &self.metric, self.op, self.threshold) {
            (Some(c), _, _, _) => format!("check {c}"),
            (None, Some(m), Some(op), Some(t)) => {
                let mut s = format!("{m} {} {t}", op.as_str());
                if let Some(f) = &self.for_ {
                    s.push_str(&format!(" for {f}"));
                }
                s
            }
            _ => "invalid precondition".into(),
        }
    }

    /// How long the metric must have held (zero: only the live reading counts).
    pub fn hold(&self) -> Duration {
        self.for_
            .as_deref()
            .and_then(|f| humantime::parse_duration(f).ok())
            .unwrap_or_default()
    }
}

/// One action of the library.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// Id, as decisions name it.
    pub id: String,
    /// Other ids decisions may use for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Short name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// What the backend does.
    pub operation: Operation,
    /// All must hold before anything is touched.
    #[serde(default)]
    pub preconditions: Vec<Precondition>,
    /// Expected duration; execute times out at 1.5 times it.
    pub estimated: String,
    /// Blast radius.
    pub blast_radius: Radius,
    /// Verify checks at most.
    #[serde(default = "default_verify_attempts")]
    pub verify_attempts: u32,
    /// Between verify checks.
    #[serde(default = "default_verify_interval")]
    pub verify_interval: String,
    /// Operation parameters (`step`, `factor`, …).
    #[serde(default)]
    pub params: toml::Table,
    /// Rolling back is left to a human, through an approval request.
    #[serde(default)]
    pub rollback_needs_approval: bool,
}

fn default_verify_attempts() -> u32 {
    3
}

fn default_verify_interval() -> String {
    "2s".into()
}

impl ActionSpec {
    /// The estimate.
    pub fn estimate(&self) -> Duration {
        humantime::parse_duration(&self.estimated).unwrap_or(Duration::from_secs(60))
    }

    /// Execute's deadline: 1.5 times the estimate.
    pub fn timeout(&self) -> Duration {
        self.estimate().mul_f64(1.5)
    }

    /// Between verify checks.
    pub fn verify_every(&self) -> Duration {
        humantime::parse_duration(&self.verify_interval).unwrap_or(Duration::from_secs(2))
    }

    /// A numeric parameter, or `default`.
    pub fn param(&self, name: &str, default: f64) -> f64 {
        match self.params.get(name) {
            Some(toml::Value::Integer(i)) => *i as f64,
            Some(toml::Value::Float(f)) => *f,
            _ => default,
        }
    }

    fn answers_to(&self, id: &str) -> bool {
        self.id == id || self.aliases.iter().any(|a| a == id)
    }
}

/// The actions healer knows: the built-in ones, replaced or extended by declared ones.
#[derive(Debug, Clone)]
pub struct Library {
    actions: Vec<ActionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionsFile {
    actions: Vec<ActionSpec>,
}

const BUILT_IN: &str = include_str!("actions.toml");

impl Library {
    /// The built-in actions.
    pub fn built_in() -> Self {
        let file: ActionsFile = toml::from_str(BUILT_IN).expect("the built-in actions parse");
        Self {
            actions: file.actions,
        }
    }

    /// The built-in actions with `declared` ones replacing those of the same id.
    pub fn with(declared: &[ActionSpec]) -> Self {
        let mut lib = Self::built_in();
        for d in declared {
            match lib.actions.iter_mut().find(|a| a.id == d.id) {
                Some(a) => *a = d.clone(),
                None => lib.actions.push(d.clone()),
            }
        }
        lib
    }

    /// The action called `id` (or one of its aliases).
    pub fn get(&self, id: &str) -> Option<&ActionSpec> {
        self.actions.iter().find(|a| a.answers_to(id))
    }

    /// Every action.
    pub fn all(&self) -> &[ActionSpec] {
        &self.actions
    }

    /// The actions among `ids` that `supported` allows, lowest blast radius first, then
    /// shortest estimate, then the order of `ids`.
    pub fn matching(
        &self,
        ids: &[String],
        supported: impl Fn(Operation) -> bool,
    ) -> Vec<&ActionSpec> {
        let mut out: Vec<(usize, &ActionSpec)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if let Some(a) = self.get(id)
                && supported(a.operation)
                && !out.iter().any(|(_, b)| b.id == a.id)
            {
                out.push((i, a));
            }
        }
        out.sort_by_key(|(i, a)| (a.blast_radius, a.estimate(), *i));
        out.into_iter().map(|(_, a)| a).collect()
    }
}

/// Limits against healing storms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Remediations in flight at once, over every target.
    pub concurrency: u32,
    /// Least time between two runs of one action on one target.
    pub cooldown: String,
    /// At most `max` actions per `window` per scope.
    pub budgets: Vec<Budget>,
    /// The same action succeeding on the same target `count` times in `window` escalates
    /// instead of acting again.
    pub recurrence_count: u32,
    /// Window of `recurrence_count`.
    pub recurrence_window: String,
    /// How long a target lock lasts without being renewed (a crashed holder's lock expires).
    pub lock_ttl: String,
    /// How long an approval request waits before it expires and escalates.
    pub approval_ttl: String,
    /// After an action ends, how long its target's anomalies are taken as its side effects.
    pub settle: String,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            concurrency: 2,
            cooldown: "15m".into(),
            budgets: vec![
                Budget {
                    scope: Scope::Target,
                    max: 3,
                    window: "1h".into(),
                },
                Budget {
                    scope: Scope::Service,
                    max: 5,
                    window: "1h".into(),
                },
                Budget {
                    scope: Scope::Fleet,
                    max: 20,
                    window: "1h".into(),
                },
            ],
            recurrence_count: 3,
            recurrence_window: "6h".into(),
            lock_ttl: "10m".into(),
            approval_ttl: "30m".into(),
            settle: "5m".into(),
        }
    }
}

fn dur(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_default()
}

impl Limits {
    /// `cooldown` as a duration.
    pub fn cooldown(&self) -> Duration {
        dur(&self.cooldown)
    }
    /// `recurrence_window` as a duration.
    pub fn recurrence_window(&self) -> Duration {
        dur(&self.recurrence_window)
    }
    /// `lock_ttl` as a duration.
    pub fn lock_ttl(&self) -> Duration {
        dur(&self.lock_ttl)
    }
    /// `approval_ttl` as a duration.
    pub fn approval_ttl(&self) -> Duration {
        dur(&self.approval_ttl)
    }
    /// `settle` as a duration.
    pub fn settle(&self) -> Duration {
        dur(&self.settle)
    }
}

/// What a budget counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One target.
    Target,
    /// Every target of one service.
    Service,
    /// Everything.
    Fleet,
}

impl Scope {
    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Target => "target",
            Scope::Service => "service",
            Scope::Fleet => "fleet",
        }
    }
}

/// At most `max` actions per `window` over `scope`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// What is counted over.
    pub scope: Scope,
    /// Actions at most.
    pub max: u32,
    /// Window.
    pub window: String,
}

impl Budget {
    /// `window` as a duration.
    pub fn window(&self) -> Duration {
        dur(&self.window)
    }
}

/// Where escalations go.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationConfig {
    /// PagerDuty Events API v2 routing key.
    pub pagerduty_routing_key: Option<String>,
    /// PagerDuty endpoint (default: PagerDuty's).
    pub pagerduty_url: Option<String>,
    /// Slack incoming webhook.
    pub slack_webhook: Option<String>,
}

/// A process backend: a service healer starts and stops itself, by pid file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Command and arguments; `{release}`, `{memory_mb}` and `{port}` are replaced.
    pub command: Vec<String>,
    /// Health endpoint (HTTP GET, 2xx is healthy); `{port}` is replaced.
    pub health_url: String,
    /// Optional drain endpoint (HTTP POST) called before stopping.
    pub drain_url: Option<String>,
    /// Folder of the pid file and the deploy history.
    pub state_dir: PathBuf,
    /// Port the service listens on.
    #[serde(default)]
    pub port: u16,
    /// Releases in deploy order; the last is deployed first.
    #[serde(default)]
    pub releases: Vec<String>,
    /// Memory limit (address space, through `prlimit`), MiB.
    pub memory_mb: Option<u64>,
    /// Ceiling for `increase_memory`, MiB.
    pub max_memory_mb: Option<u64>,
    /// Time a stopping process gets before SIGKILL.
    #[serde(default = "default_grace")]
    pub stop_grace: String,
}

fn default_grace() -> String {
    "10s".into()
}

/// An EC2 Auto Scaling group.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoScalingConfig {
    /// Group name.
    pub group: String,
    /// healer's own ceiling of the desired capacity (the API's MaxSize is not trusted alone).
    pub max_instances: i32,
    /// Region.
    #[serde(default = "default_region")]
    pub region: String,
    /// Endpoint override.
    pub endpoint: Option<String>,
    /// Static credentials (default: the usual AWS credential chain).
    pub access_key_id: Option<String>,
    /// Secret of `access_key_id`.
    pub secret_access_key: Option<String>,
    /// How long to wait for new instances to be healthy.
    #[serde(default = "default_healthy_wait")]
    pub healthy_wait: String,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_healthy_wait() -> String {
    "5m".into()
}

/// A Redis cache.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Flush only this logical database (default) or every database.
    #[serde(default)]
    pub flush_all: bool,
}

/// A PostgreSQL primary with a streaming replica.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Primary connection string (`host=… port=… user=… dbname=…`).
    pub primary: String,
    /// Replica connection string.
    pub replica: String,
    /// The endpoint clients read: a file holding the current primary's connection string,
    /// rewritten atomically on failover.
    pub endpoint_file: PathBuf,
    /// Most replica lag accepted, seconds.
    #[serde(default = "default_max_lag")]
    pub max_lag_seconds: f64,
}

fn default_max_lag() -> f64 {
    10.0
}

/// A generic HTTP webhook.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// URL to POST the remediation to.
    pub url: String,
    /// Optional health URL checked by verify.
    pub health_url: Option<String>,
    /// Optional URL to POST the rollback to.
    pub rollback_url: Option<String>,
}

/// How healer reaches one target, and which service it belongs to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Resource id, or a pattern with `*`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Service, for the service budget (default: the resource id).
    pub service: Option<String>,
    /// Process backend.
    pub process: Option<ProcessConfig>,
    /// Auto Scaling backend.
    pub autoscaling: Option<AutoScalingConfig>,
    /// Redis backend.
    pub redis: Option<RedisConfig>,
    /// PostgreSQL backend.
    pub postgres: Option<PostgresConfig>,
    /// Webhook backend.
    pub webhook: Option<WebhookConfig>,
}

impl TargetConfig {
    fn backends(&self) -> usize {
        [
            self.process.is_some(),
            self.autoscaling.is_some(),
            self.redis.is_some(),
            self.postgres.is_some(),
            self.webhook.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
    }
}

/// Whether healer acts or only records what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Decisions and planned steps are recorded; nothing is touched (the default).
    #[default]
    DryRun,
    /// Act.
    Enforce,
}

/// `remediation.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemediationConfig {
    /// Dry run (default) or enforce.
    #[serde(default)]
    pub mode: Mode,
    /// The saga journal (SQLite), relative to the file.
    pub journal: PathBuf,
    /// Targets healer may touch: resource ids or patterns with `*`. Empty: none.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Storm limits.
    #[serde(default)]
    pub limits: Limits,
    /// Escalation webhooks.
    #[serde(default)]
    pub escalation: EscalationConfig,
    /// Targets and their backends.
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Declared actions (replace built-in ones of the same id).
    #[serde(default)]
    pub actions: Vec<ActionSpec>,
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl RemediationConfig {
    /// Reads and checks `path`; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, Vec<ConfigProblem>> {
        let mut config = Self::parse(path, &crate::config::read_config(path)?)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.journal = base.join(&config.journal);
        for t in &mut config.targets {
            if let Some(p) = &mut t.process {
                p.state_dir = base.join(&p.state_dir);
            }
            if let Some(p) = &mut t.postgres {
                p.endpoint_file = base.join(&p.endpoint_file);
            }
        }
        Ok(config)
    }

    /// Parses and checks configuration text; `file` is named in problems.
    pub fn parse(file: &Path, text: &str) -> Result<Self, Vec<ConfigProblem>> {
        let config: Self =
            toml::from_str(text).map_err(|e| vec![ConfigProblem::toml(file, text, &e)])?;
        let mut problems = Vec::new();
        for (key, message) in config.validate() {
            problems.push(ConfigProblem::at(file, locate(text, &key), &key, message));
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Semantic checks, as (key path, message); array entries are `targets[2].redis`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let durations = [
            ("limits.cooldown", &self.limits.cooldown),
            ("limits.recurrence_window", &self.limits.recurrence_window),
            ("limits.lock_ttl", &self.limits.lock_ttl),
            ("limits.approval_ttl", &self.limits.approval_ttl),
            ("limits.settle", &self.limits.settle),
        ];
        for (key, value) in durations {
            if let Err(e) = humantime::parse_duration(value) {
                out.push((key.to_string(), format!("duration `{value}`: {e}")));
            }
        }
        if self.limits.concurrency == 0 {
            out.push(("limits.concurrency".into(), "must be at least 1".into()));
        }
        if self.limits.lock_ttl().is_zero() {
            out.push(("limits.lock_ttl".into(), "must be longer than zero".into()));
        }
        for (i, b) in self.limits.budgets.iter().enumerate() {
            if let Err(e) = humantime::parse_duration(&b.window) {
                out.push((format!("limits.budgets[{i}].window"), e.to_string()));
            }
            if b.max == 0 {
                out.push((
                    format!("limits.budgets[{i}].max"),
                    "must be at least 1 (use `allow = []` or `healer pause` to stop actions)"
                        .into(),
                ));
            }
        }
        for (i, t) in self.targets.iter().enumerate() {
            let key = format!("targets[{i}]");
            match t.backends() {
                1 => {}
                0 => out.push((
                    key.clone(),
                    "no backend (one of process, autoscaling, redis, postgres, webhook)".into(),
                )),
                _ => out.push((key.clone(), "more than one backend".into())),
            }
            if let Some(p) = &t.process {
                if p.command.is_empty() {
                    out.push((format!("{key}.process.command"), "is empty".into()));
                }
                if let Err(e) = humantime::parse_duration(&p.stop_grace) {
                    out.push((format!("{key}.process.stop_grace"), e.to_string()));
                }
                if let (Some(m), Some(x)) = (p.memory_mb, p.max_memory_mb)
                    && m > x
                {
                    out.push((
                        format!("{key}.process.memory_mb"),
                        format!("{m} is above max_memory_mb {x}"),
                    ));
                }
            }
            if let Some(a) = &t.autoscaling {
                if a.max_instances < 1 {
                    out.push((
                        format!("{key}.autoscaling.max_instances"),
                        "must be at least 1".into(),
                    ));
                }
                if let Err(e) = humantime::parse_duration(&a.healthy_wait) {
                    out.push((format!("{key}.autoscaling.healthy_wait"), e.to_string()));
                }
            }
            if let Some(r) = &t.redis
                && !r.url.starts_with("redis://")
            {
                out.push((
                    format!("{key}.redis.url"),
                    format!("`{}` is not a redis:// URL", r.url),
                ));
            }
            for (name, url) in [
                ("webhook.url", t.webhook.as_ref().map(|w| &w.url)),
                (
                    "webhook.health_url",
                    t.webhook.as_ref().and_then(|w| w.health_url.as_ref()),
                ),
            ] {
                if let Some(u) = url
                    && url::Url::parse(u).is_err()
                {
                    out.push((format!("{key}.{name}"), format!("`{u}` is not a URL")));
                }
            }
        }
        let mut ids = BTreeMap::new();
        for (i, a) in self.actions.iter().enumerate() {
            let key = format!("actions[{i}]");
            if ids.insert(a.id.clone(), i).is_some() {
                out.push((format!("{key}.id"), format!("`{}` declared twice", a.id)));
            }
            for (field, value) in [
                ("estimated", &a.estimated),
                ("verify_interval", &a.verify_interval),
            ] {
                if let Err(e) = humantime::parse_duration(value) {
                    out.push((format!("{key}.{field}"), format!("duration `{value}`: {e}")));
                }
            }
            if a.verify_attempts == 0 {
                out.push((
                    format!("{key}.verify_attempts"),
                    "must be at least 1".into(),
                ));
            }
            for (j, p) in a.preconditions.iter().enumerate() {
                let pkey = format!("{key}.preconditions[{j}]");
                let metric = p.metric.is_some() && p.op.is_some() && p.threshold.is_some();
                let partial = p.metric.is_some() || p.op.is_some() || p.threshold.is_some();
                match (&p.check, metric, partial) {
                    (Some(_), _, false) | (None, true, _) => {}
                    (Some(_), _, true) => out.push((
                        pkey.clone(),
                        "either `check` or `metric`/`op`/`threshold`, not both".into(),
                    )),
                    (None, false, _) => out.push((
                        pkey.clone(),
                        "needs `check`, or all of `metric`, `op` and `threshold`".into(),
                    )),
                }
                if let Some(f) = &p.for_
                    && let Err(e) = humantime::parse_duration(f)
                {
                    out.push((format!("{pkey}.for"), format!("duration `{f}`: {e}")));
                }
            }
        }
        out
    }

    /// The library: built-in actions and this file's.
    pub fn library(&self) -> Library {
        Library::with(&self.actions)
    }

    /// The first target entry matching `resource`.
    pub fn target(&self, resource: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| glob(&t.pattern, resource))
    }

    /// Whether `resource` is on the allow-list.
    pub fn allowed(&self, resource: &str) -> bool {
        self.allow.iter().any(|p| glob(p, resource))
    }
}

/// Line of a key path like `targets[2].redis.url` or `limits.cooldown`: the `n`-th header of
/// the array (or the section), then the leaf key after it. 0 when not found.
fn locate(text: &str, path: &str) -> usize {
    let mut parts = path.split('.');
    let head = parts.next().unwrap_or("");
    let (name, index) = match head.split_once('[') {
        Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (head, None),
    };
    let leaf = path.rsplit('.').next().unwrap_or("");
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    let mut seen = 0usize;
    let mut start = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let is_header = match index {
            Some(_) => line == format!("[[{name}]]"),
            None => line == format!("[{name}]"),
        };
        if is_header {
            if index.is_none_or(|n| n == seen) {
                start = Some(i);
                break;
            }
            seen += 1;
        }
    }
    let Some(start) = start else {
        return 0;
    };
    for (i, raw) in text.lines().enumerate().skip(start + 1) {
        let line = raw.trim();
        if line.starts_with("[[") && !line.starts_with(&format!("[[{name}.")) {
            break;
        }
        if line.split('=').next().is_some_and(|k| k.trim() == leaf) {
            return i + 1;
        }
    }
    start + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_library_has_the_seed_actions() {
        let lib = Library::built_in();
        for id in [
            "restart_service",
            "scale_up_instances",
            "scale_up",
            "rollback_deploy",
            "increase_memory",
            "clear_cache",
            "failover_database",
            "call_webhook",
        ] {
            assert!(lib.get(id).is_some(), "{id}");
        }
        assert!(
            lib.get("failover_database")
                .unwrap()
                .rollback_needs_approval
        );
        assert_eq!(lib.get("scale_up").unwrap().param("step", 0.0), 2.0);
        assert_eq!(
            lib.get("increase_memory").unwrap().timeout(),
            Duration::from_millis(67_500)
        );
    }

    #[test]
    fn matching_orders_by_blast_radius_then_duration() {
        let lib = Library::built_in();
        let ids: Vec<String> = [
            "rollback_deploy",
            "clear_cache",
            "scale_up",
            "restart_service",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got: Vec<&str> = lib
            .matching(&ids, |_| true)
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        // low (30 s restart before 2 min scale-up), medium, high
        assert_eq!(
            got,
            [
                "restart_service",
                "scale_up_instances",
                "clear_cache",
                "rollback_deploy"
            ]
        );
        let only_scale: Vec<&str> = lib
            .matching(&ids, |op| op == Operation::ScaleUp)
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        assert_eq!(only_scale, ["scale_up_instances"]);
    }

    #[test]
    fn glob_matches_stars() {
        assert!(glob("checkout-*", "checkout-1"));
        assert!(glob("*", "x"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXcYb"));
        assert!(!glob("checkout", "checkout-1"));
        assert!(glob("checkout", "checkout"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn problems_name_file_line_and_key() {
        let text = r#"
journal = "j.db"
[limits]
cooldown = "soon"

[[targets]]
match = "a"

[[targets]]
match = "b"
[targets.redis]
url = "http://x"

[[actions]]
id = "x"
name = "X"
description = "d"
operation = "restart"
estimated = "1m"
blast_radius = "low"
preconditions = [{ metric = "cpu" }]
"#;
        let problems = RemediationConfig::parse(Path::new("r.toml"), text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            shown.contains(
                &"r.toml:4: `limits.cooldown`: duration `soon`: expected number at 0".to_string()
            ),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("r.toml:6: `targets[0]`: no backend")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("r.toml:12: `targets[1].redis.url`")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("r.toml:21: `actions[0].preconditions[0]`")),
            "{shown:#?}"
        );
        let bad =
            RemediationConfig::parse(Path::new("r.toml"), "journal = \"j\"\nmode = \"yolo\"\n")
                .unwrap_err();
        assert_eq!(bad[0].line, 2, "{bad:?}");
        let unknown = RemediationConfig::parse(
            Path::new("r.toml"),
            "journal = \"j\"\n\n[limits]\ncooldwn = \"1m\"\n",
        )
        .unwrap_err();
        assert_eq!(unknown[0].line, 4, "{unknown:?}");
    }

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/remediation.toml");
        let config = RemediationConfig::load(&path).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(config.mode, Mode::DryRun);
        assert_eq!(config.targets.len(), 4);
        assert!(config.allowed("checkout-7") && !config.allowed("payments-1"));
        assert!(config.target("cache-2").unwrap().redis.is_some());
        assert_eq!(
            config.library().get("restart_service").unwrap().estimated,
            "45s"
        );
    }
}
