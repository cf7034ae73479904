//! Real servers for the remediation tests, each on a free loopback port and stopped on drop:
//! redis-server, and a PostgreSQL primary with a streaming replica. `.ci/test` installs
//! both (Debian's `redis-server` and `postgresql`); `HEALER_REDIS_SERVER` and `HEALER_PG_BIN`
//! override where they are found.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A redis-server without persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Self {
        let program =
            std::env::var("HEALER_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = free_port();
        let child = Command::new(&program)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{program}` ({e}): run the suite with .ci/test, which installs redis-server"));
        wait_port(port, "redis-server");
        Self { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pg_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("HEALER_PG_BIN") {
        return Path::new(&dir).join(name);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// PostgreSQL refuses to run as root: as root, run its programs as `postgres`.
fn pg(name: &str) -> Command {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(name));
        c
    } else {
        Command::new(pg_bin(name))
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the server of data folder `dir/name` on `port` and waits for it.
fn pg_start(dir: &Path, name: &str, port: u16) {
    let mut c = pg("pg_ctl");
    c.arg("-D")
        .arg(dir.join(name))
        .args(["-o", &format!("-p {port}"), "-l"])
        .arg(dir.join(format!("{name}.log")))
        .args(["-w", "start"]);
    run(c, &format!("pg_ctl start {name}"));
    wait_port(port, &format!("postgres {name}"));
}

/// A primary and a streaming replica of it.
pub struct PgPair {
    dir: PathBuf,
    pub primary_port: u16,
    pub replica_port: u16,
}

impl PgPair {
    pub fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("healer-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let (primary, replica) = (dir.join("primary"), dir.join("replica"));
        let (pp, rp) = (free_port(), free_port());
        let mut c = pg("initdb");
        c.args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(&primary);
        run(c, "initdb");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 5\nhot_standby = on\nfsync = off\n",
            dir.display()
        );
        // Appending keeps the file's owner.
        let path = primary.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
        pg_start(&dir, "primary", pp);
        let mut c = pg("pg_basebackup");
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &pp.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-D",
        ])
        .arg(&replica);
        run(c, "pg_basebackup");
        pg_start(&dir, "replica", rp);
        // Ready once the replica streams from the primary.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(pg_bin("psql"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &rp.to_string(),
                    "-U",
                    "postgres",
                    "-tAc",
                ])
                .arg("SELECT status FROM pg_stat_wal_receiver")
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "streaming" {
                break;
            }
            assert!(Instant::now() < deadline, "the replica never streamed");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            dir,
            primary_port: pp,
            replica_port: rp,
        }
    }

    pub fn conn(port: u16) -> String {
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for d in ["primary", "replica"] {
            let mut c = pg("pg_ctl");
            c.arg("-D")
                .arg(self.dir.join(d))
                .args(["-m", "immediate", "stop"]);
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Python interpreter for the service script.
pub fn python() -> String {
    std::env::var("HEALER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The test service script.
pub fn service_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/service.py")
}
