//! The process backend: a service healer starts and stops itself.
//!
//! The service runs in its own process group, detached from healer (it outlives a healer
//! restart). Its pid, deploy history (one release a line, the last running) and memory
//! limit live in `state_dir`, so any healer process on the host can act on it. The memory
//! limit is applied with `prlimit --as` (address space), which the verify step reads back
//! from `/proc/<pid>/limits`.
//!
//! Restart follows the seed's steps: drain (optional endpoint), stop (SIGTERM, SIGKILL after
//! the grace period), start, then three health checks in a row.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::{ActError, ActResult, Call, failed, http_ok, unknown_check, unknown_metric};
use crate::remedy::config::{Operation, ProcessConfig};
use crate::remedy::journal::start_time;

const MIB: u64 = 1024 * 1024;

/// How long a started service gets to answer its health endpoint at all.
const STARTUP: Duration = Duration::from_secs(30);

/// A service run by the process backend.
#[derive(Debug)]
pub struct ProcessService {
    config: ProcessConfig,
}

impl ProcessService {
    /// The backend of `config`.
    pub fn new(config: ProcessConfig) -> Self {
        Self { config }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.config.state_dir.join(name)
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name)).ok()
    }

    /// Writes `name` atomically (temporary file, then rename).
    fn write(&self, name: &str, text: &str) -> ActResult<()> {
        std::fs::create_dir_all(&self.config.state_dir).map_err(failed)?;
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).map_err(failed)?;
        std::fs::rename(&tmp, self.path(name)).map_err(failed)
    }

    /// The deploy history, oldest first; the configured releases when none was written.
    pub fn deploys(&self) -> Vec<String> {
        match self.read("deploys") {
            Some(t) => t
                .lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            None => self.config.releases.clone(),
        }
    }

    /// The memory limit in MiB, if any.
    pub fn memory_mb(&self) -> Option<u64> {
        self.read("memory_mb")
            .and_then(|t| t.trim().parse().ok())
            .or(self.config.memory_mb)
    }

    /// The running pid, if the process is alive. The pid file holds the pid and its start
    /// time, so a pid reused by another process is not taken for the service.
    pub fn pid(&self) -> Option<u32> {
        let text = self.read("pid")?;
        let mut parts = text.split_whitespace();
        let pid: u32 = parts.next()?.parse().ok()?;
        let started: u64 = parts.next()?.parse().ok()?;
        (alive(pid) && start_time(pid) == Some(started)).then_some(pid)
    }

    fn port_str(&self, s: &str) -> String {
        s.replace("{port}", &self.config.port.to_string())
    }

    /// Starts the service with the current release and memory limit.
    pub fn start(&self) -> ActResult<u32> {
        if let Some(pid) = self.pid() {
            return Ok(pid);
        }
        // Something healer does not track already listens on the service's port (a copy
        // started by hand, or one whose pid file was lost): starting another would leave two.
        if self.config.port != 0
            && std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], self.config.port)),
                Duration::from_millis(500),
            )
            .is_ok()
        {
            return Err(failed(format!(
                "port {} is in use by a process healer does not track: not starting another",
                self.config.port
            )));
        }
        let release = self.deploys().last().cloned().unwrap_or_default();
        let memory = self.memory_mb();
        let args: Vec<String> = self
            .config
            .command
            .iter()
            .map(|a| {
                self.port_str(a).replace("{release}", &release).replace(
                    "{memory_mb}",
                    &memory.map_or(String::new(), |m| m.to_string()),
                )
            })
            .collect();
        let mut cmd = match memory {
            Some(m) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--as={}", m * MIB)).arg("--").args(&args);
                c
            }
            None => {
                let mut c = Command::new(&args[0]);
                c.args(&args[1..]);
                c
            }
        };
        std::fs::create_dir_all(&self.config.state_dir).map_err(failed)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("service.log"))
            .map_err(failed)?;
        let err = log.try_clone().map_err(failed)?;
        use std::os::unix::process::CommandExt;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| failed(format!("cannot start {:?}: {e}", args)))?;
        let pid = child.id();
        // Detached: reaped by whoever waits for it; healer tracks it by pid file.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let started = start_time(pid).unwrap_or(0);
        self.write("pid", &format!("{pid} {started}\n"))?;
        Ok(pid)
    }

    /// Stops the service: SIGTERM to its group, SIGKILL after the grace period.
    pub async fn stop(&self) -> ActResult<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        signal(pid, "TERM");
        let grace =
            humantime::parse_duration(&self.config.stop_grace).unwrap_or(Duration::from_secs(10));
        let deadline = tokio::time::Instant::now() + grace;
        while alive(pid) {
            if tokio::time::Instant::now() >= deadline {
                signal(pid, "KILL");
                tokio::time::sleep(Duration::from_millis(100)).await;
                if alive(pid) {
                    return Err(failed(format!("pid {pid} survives SIGKILL")));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(self.path("pid"));
        Ok(())
    }

    /// Waits until the health endpoint answers at all (any status: a started process takes
    /// a moment to listen), for at most `within`.
    async fn wait_up(&self, within: Duration) -> ActResult<()> {
        let url = self.port_str(&self.config.health_url);
        let deadline = tokio::time::Instant::now() + within;
        let client = crate::notify::client();
        loop {
            if client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok()
            {
                return Ok(());
            }
            if self.pid().is_none() {
                return Err(failed("the service exited right after it started"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(failed(format!("{url} did not answer within {within:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn healthy(&self) -> Result<String, String> {
        http_ok(
            &self.port_str(&self.config.health_url),
            Duration::from_secs(2),
        )
        .await
    }

    /// Three health checks in a row, 300 ms apart, and the running process's release and
    /// memory limit as expected.
    async fn healthy_thrice(&self) -> ActResult<String> {
        let mut body = String::new();
        for i in 0..3 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            body = self.healthy().await.map_err(ActError::Failed)?;
        }
        Ok(body)
    }

    async fn restart(&self) -> ActResult<String> {
        let mut steps = Vec::new();
        if let Some(url) = &self.config.drain_url {
            let url = self.port_str(url);
            let r = crate::notify::client()
                .post(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            steps.push(match r {
                Ok(r) if r.status().is_success() => "drained".to_string(),
                Ok(r) => format!("drain answered HTTP {} (went on)", r.status().as_u16()),
                Err(e) => format!("drain failed: {e} (went on)"),
            });
        }
        let old = self.pid();
        self.stop().await?;
        steps.push(format!(
            "stopped {}",
            old.map_or("nothing".into(), |p| format!("pid {p}"))
        ));
        let pid = self.start()?;
        self.wait_up(STARTUP).await?;
        steps.push(format!("started pid {pid}"));
        Ok(steps.join(", "))
    }

    pub(super) async fn check(&self, name: &str) -> ActResult<bool> {
        match name {
            // Read-only, so a dry run touches nothing: the state folder is there.
            "reachable" => Ok(self.config.state_dir.is_dir()),
            "healthy" => Ok(self.healthy().await.is_ok()),
            "running" => Ok(self.pid().is_some()),
            "has_previous_release" => Ok(self.deploys().len() >= 2),
            other => Err(unknown_check("process", other)),
        }
    }

    pub(super) async fn probe(&self, metric: &str) -> ActResult<f64> {
        match metric {
            "memory_limit_mb" => Ok(self.memory_mb().unwrap_or(0) as f64),
            "rss_mb" => {
                let pid = self.pid().ok_or_else(|| failed("not running"))?;
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(failed)?;
                let kb: f64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .ok_or_else(|| failed("no VmRSS"))?;
                Ok(kb / 1024.0)
            }
            "healthy" => Ok(self.healthy().await.is_ok() as u8 as f64),
            other => Err(unknown_metric("process", other)),
        }
    }

    pub(super) async fn snapshot(&self, _call: &Call<'_>) -> ActResult<Value> {
        Ok(json!({
            "deploys": self.deploys(),
            "memory_mb": self.memory_mb(),
            "pid": self.pid(),
        }))
    }

    /// The limit before and after `increase_memory`, from the snapshot.
    fn next_memory(&self, call: &Call<'_>, snap: &Value) -> ActResult<(u64, u64)> {
        let now = snap["memory_mb"]
            .as_u64()
            .ok_or_else(|| failed("the service has no memory limit to raise"))?;
        let max = self.config.max_memory_mb.unwrap_or(u64::MAX);
        if now >= max {
            return Err(ActError::Ceiling(format!(
                "memory limit {now} MiB is at max_memory_mb {max}"
            )));
        }
        let factor = call.spec.param("factor", 1.5).max(1.0);
        Ok((now, ((now as f64 * factor).ceil() as u64).min(max)))
    }

    pub(super) async fn execute(&self, call: &Call<'_>, snap: &Value) -> ActResult<String> {
        match call.spec.operation {
            Operation::Restart => self.restart().await,
            Operation::RollbackDeploy => {
                let deploys = snapshot_deploys(snap);
                if deploys.len() < 2 {
                    return Err(failed("no previous release to roll back to"));
                }
                let target = &deploys[..deploys.len() - 1];
                self.write("deploys", &(target.join("\n") + "\n"))?;
                let done = self.restart().await?;
                Ok(format!(
                    "{} -> {}; {done}",
                    deploys[deploys.len() - 1],
                    target[target.len() - 1]
                ))
            }
            Operation::IncreaseMemory => {
                let (now, next) = self.next_memory(call, snap)?;
                self.write("memory_mb", &next.to_string())?;
                let done = self.restart().await?;
                Ok(format!("memory {now} -> {next} MiB; {done}"))
            }
            other => Err(failed(format!(
                "the process backend cannot {}",
                other.as_str()
            ))),
        }
    }

    pub(super) async fn verify(&self, call: &Call<'_>, snap: &Value) -> ActResult<String> {
        let pid = self
            .pid()
            .ok_or_else(|| failed("the service is not running"))?;
        let body = self.healthy_thrice().await?;
        match call.spec.operation {
            Operation::RollbackDeploy => {
                let deploys = snapshot_deploys(snap);
                let want = deploys
                    .get(deploys.len().wrapping_sub(2))
                    .cloned()
                    .unwrap_or_default();
                let running = self.deploys().last().cloned().unwrap_or_default();
                if running != want {
                    return Err(failed(format!("running {running}, expected {want}")));
                }
                if !body.is_empty() && !body.contains(&want) {
                    return Err(failed(format!(
                        "health answer does not name {want}: {body}"
                    )));
                }
                Ok(format!("pid {pid} healthy 3/3 on {want}"))
            }
            Operation::IncreaseMemory => {
                let (_, next) = self.next_memory(call, snap)?;
                let configured = self.memory_mb().unwrap_or(0);
                if configured != next {
                    return Err(failed(format!(
                        "memory limit is {configured} MiB, expected {next}"
                    )));
                }
                let got = address_space_limit(pid)
                    .ok_or_else(|| failed("cannot read the process's limits"))?;
                if got != next * MIB {
                    return Err(failed(format!(
                        "pid {pid} runs under {got} bytes, expected {}",
                        next * MIB
                    )));
                }
                Ok(format!("pid {pid} healthy 3/3 under {next} MiB"))
            }
            Operation::Restart => {
                if snap["pid"].as_u64() == Some(u64::from(pid)) {
                    return Err(failed(format!(
                        "pid {pid} is the process from before: not restarted"
                    )));
                }
                Ok(format!("new pid {pid} healthy 3/3"))
            }
            _ => Ok(format!("pid {pid} healthy 3/3")),
        }
    }

    pub(super) async fn rollback(&self, call: &Call<'_>, snap: &Value) -> ActResult<String> {
        let deploys = snapshot_deploys(snap);
        let mut restore = Vec::new();
        if call.spec.operation == Operation::RollbackDeploy && !deploys.is_empty() {
            self.write("deploys", &(deploys.join("\n") + "\n"))?;
            restore.push(format!("release {}", deploys[deploys.len() - 1]));
        }
        if call.spec.operation == Operation::IncreaseMemory
            && let Some(m) = snap["memory_mb"].as_u64()
        {
            self.write("memory_mb", &m.to_string())?;
            restore.push(format!("memory {m} MiB"));
        }
        let done = if restore.is_empty() && self.pid().is_some() {
            "still running".to_string()
        } else {
            self.stop().await?;
            let pid = self.start()?;
            self.wait_up(STARTUP).await?;
            format!("started pid {pid}")
        };
        if self.healthy_thrice().await.is_err() {
            return Err(failed(format!(
                "restored {} but the service is not healthy",
                if restore.is_empty() {
                    "nothing".into()
                } else {
                    restore.join(", ")
                }
            )));
        }
        Ok(format!(
            "restored {}; {done}; healthy",
            if restore.is_empty() {
                "running state".into()
            } else {
                restore.join(", ")
            }
        ))
    }
}

fn snapshot_deploys(snap: &Value) -> Vec<String> {
    snap["deploys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| {
                stat[i + 1..]
                    .split_whitespace()
                    .next()
                    .map(|s| s != "Z" && s != "X")
            })
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: &str) {
    // The whole group: the service and anything it started.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stderr(Stdio::null())
        .status();
}

fn address_space_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    line["Max address space".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
