//! Scale-out: several `healer run` processes share a Kinesis stream through a DynamoDB lease
//! table, on real servers on 127.0.0.1: kinesalite or kinesis-local (resharding) and moto's
//! DynamoDB behind a one-request-at-a-time wrapper (`.ci/servers/moto_serial.py`; stock moto
//! is not atomic).
//!
//! Every test compares the union of the workers' incident logs with a parquet replay of the
//! same rows: the same anomaly rows, bit for bit, none missing and none twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use healer_engine::config::LeaseConfig;
use healer_engine::lease::table::{Lease, LeaseTable};

#[path = "support/kinesis.rs"]
mod support;
use support::*;

/// Lease timing of the tests: a lease not renewed for 3 s may be taken.
const DURATION_S: u64 = 3;
const RENEW_S: u64 = 1;

fn moto_serial() -> Server {
    let python = std::env::var("HEALER_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut c = Command::new(python);
    c.arg(repo().join(".ci/servers/moto_serial.py"))
        .args(["--port", "0"]);
    Server::start(c, "moto_serial.py")
}

/// A test's servers, stream, replayed expectation and worker config.
struct Cluster {
    _kinesis: Server,
    _dynamo: Server,
    endpoint: String,
    dynamo: String,
    dir: tempfile::TempDir,
    out: PathBuf,
    config: PathBuf,
    batches: Vec<arrow::array::RecordBatch>,
    expected: Vec<String>,
    kinesis: aws_sdk_kinesis::Client,
}

impl Cluster {
    async fn new(kinesis: Server, shards: i32, batches: Vec<arrow::array::RecordBatch>) -> Self {
        let dynamo = moto_serial();
        let endpoint = kinesis.endpoint();
        let client = client(&endpoint).await;
        create_stream(&client, "metrics", shards).await;
        // HEALER_KEEP_TEST_DIR=1 keeps the logs, lease table dumps and outputs of a run.
        let dir = tempfile::Builder::new()
            .disable_cleanup(std::env::var_os("HEALER_KEEP_TEST_DIR").is_some())
            .tempdir()
            .unwrap();
        eprintln!("test directory {}", dir.path().display());
        let expected = replay(&batches, dir.path()).await;
        let out = dir.path().join("log");
        let config = dir.path().join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "[source.kinesis]\npoll_interval = \"50ms\"\nmax_poll_interval = \"200ms\"\n\
                 idle_timeout = \"1h\"\nbatch_max_delay = \"50ms\"\nbatch_max_rows = 500\n\
                 list_shards_interval = \"500ms\"\n\
                 [engine]\npartitions = 1\n[sink]\nflush_interval = \"100ms\"\n\
                 [checkpoint]\ninterval = \"1s\"\n\
                 [lease]\ntable = \"healer-leases\"\nendpoint = \"{}\"\n\
                 duration = \"{DURATION_S}s\"\nrenew_interval = \"{RENEW_S}s\"\nsync_interval = \"1s\"\n",
                dynamo.endpoint()
            ),
        )
        .unwrap();
        Self {
            dynamo: dynamo.endpoint(),
            _dynamo: dynamo,
            endpoint,
            _kinesis: kinesis,
            dir,
            out,
            config,
            batches,
            expected,
            kinesis: client,
        }
    }

    fn spawn(&self, worker: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{worker}.log"))).unwrap();
        healer()
            .args(["run", "--config"])
            .arg(&self.config)
            .args(["--stream", "metrics", "--endpoint", &self.endpoint, "--out"])
            .arg(&self.out)
            .args(["--worker-id", worker, "--status-file"])
            .arg(self.status_path(worker))
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn status_path(&self, worker: &str) -> PathBuf {
        self.dir.path().join(format!("{worker}.status.json"))
    }

    /// The leases a worker processes, from its status file.
    fn owned(&self, worker: &str) -> Vec<String> {
        status(&self.status_path(worker))
            .and_then(|v| serde_json::from_value(v["owned_leases"].clone()).ok())
            .unwrap_or_default()
    }

    fn log_tail(&self, worker: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{worker}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn leases(&self) -> Vec<Lease> {
        let config = LeaseConfig {
            table: "healer-leases".into(),
            endpoint: Some(self.dynamo.clone()),
            create_table: false,
            ..LeaseConfig::default()
        };
        let kinesis = kinesis_config(&self.endpoint, "metrics");
        LeaseTable::dynamodb(&config, &kinesis)
            .await
            .unwrap()
            .list()
            .await
            .unwrap()
    }

    /// Waits until the published log holds every expected anomaly (checking the workers
    /// stay up), then a little longer, and compares.
    async fn wait_for_log(&self, workers: &mut [(&str, Child)], limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = try_anomalies(&self.out).await.unwrap_or_default();
            if got.len() >= self.expected.len() {
                break;
            }
            for (name, child) in workers.iter_mut() {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "worker {name} exited:\n{}",
                    self.log_tail(name)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} anomalies; workers: {:?}",
                got.len(),
                self.expected.len(),
                workers
                    .iter()
                    .map(|(n, _)| (n.to_string(), self.owned(n)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Two more checkpoints: anything duplicated would be published by now.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_same(&anomalies(&self.out).await, &self.expected);
    }

    /// SIGTERM: each worker checkpoints, releases its leases and exits 0.
    fn stop(&self, workers: Vec<(&str, Child)>) {
        for (_, child) in &workers {
            let ok = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        for (name, mut child) in workers {
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "worker {name}: {status}\n{}",
                self.log_tail(name)
            );
        }
    }
}

fn status(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Waits until `done` holds, or fails with `what` and the tails of the workers' logs.
async fn wait(
    c: &Cluster,
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            let mut logs = String::new();
            for entry in std::fs::read_dir(c.dir.path()).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().to_string();
                if let Some(worker) = name.strip_suffix(".log") {
                    let text =
                        std::fs::read_to_string(c.dir.path().join(&name)).unwrap_or_default();
                    let lease_lines: Vec<&str> = text
                        .lines()
                        .filter(|l| l.contains("lease") || l.contains("run "))
                        .collect();
                    logs.push_str(&format!(
                        "--- {worker}\n{}\n",
                        lease_lines[lease_lines.len().saturating_sub(40)..].join("\n")
                    ));
                }
            }
            panic!("timed out: {what}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

fn balanced(loads: &[usize], total: usize) -> bool {
    loads.iter().sum::<usize>() == total
        && loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_eight_shards_and_match_one_replay() {
    let c = Cluster::new(Server::kinesalite(), 8, fleet(24, 500, 17)).await;
    let names = ["w1", "w2", "w3"];
    let mut workers: Vec<(&str, Child)> = names.iter().map(|n| (*n, c.spawn(n))).collect();
    wait(
        &c,
        "3 workers balance 8 leases",
        Duration::from_secs(60),
        || {
            let loads: Vec<usize> = names.iter().map(|n| c.owned(n).len()).collect();
            balanced(&loads, 8)
        },
    )
    .await;
    produce(&c.endpoint, "metrics", &c.batches, 5).await;
    produce(&c.endpoint, "metrics", &[sentinel(&c.batches)], 1).await;
    c.wait_for_log(&mut workers, Duration::from_secs(150)).await;
    let loads: Vec<usize> = names.iter().map(|n| c.owned(n).len()).collect();
    assert!(balanced(&loads, 8), "{loads:?}");
    c.stop(workers);
    // Graceful stops release every lease, each checkpointed with its state.
    let leases = c.leases().await;
    assert_eq!(leases.len(), 8);
    for l in &leases {
        assert_eq!(l.owner, None, "{l:?}");
        assert!(l.sequence().is_some() && l.state.is_some(), "{l:?}");
        assert_eq!(l.owner_switches, 0, "{l:?}");
    }
    assert_same(&anomalies(&c.out).await, &c.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_worker_takes_a_share_and_a_killed_ones_shards_move_without_loss() {
    let c = Cluster::new(Server::kinesalite(), 8, fleet(24, 600, 23)).await;
    let third = c.batches.len() / 3;
    let mut first = vec![("w1", c.spawn("w1"))];
    wait(&c, "w1 takes all 8 leases", Duration::from_secs(60), || {
        c.owned("w1").len() == 8
    })
    .await;
    produce(&c.endpoint, "metrics", &c.batches[..third], 5).await;

    // A second worker: the first hands half of its leases over.
    let second = c.spawn("w2");
    let took = wait(&c, "w2 gets its share", Duration::from_secs(60), || {
        balanced(&[c.owned("w1").len(), c.owned("w2").len()], 8)
    })
    .await;
    eprintln!("rebalanced 8 leases over 2 workers in {took:?}");
    produce(&c.endpoint, "metrics", &c.batches[third..2 * third], 5).await;
    let checkpoints =
        |w: &str| status(&c.status_path(w)).map_or(0, |v| v["checkpoints"].as_u64().unwrap_or(0));
    let before = checkpoints("w2");
    wait(&c, "w2 checkpoints", Duration::from_secs(60), || {
        checkpoints("w2") >= before + 2
    })
    .await;

    // SIGKILL: no checkpoint, no release. Its leases expire and w1 takes them.
    let mut second = second;
    second.kill().unwrap();
    second.wait().unwrap();
    let limit = Duration::from_secs(DURATION_S + RENEW_S + 2);
    let moved = wait(
        &c,
        "w1 takes the killed worker's leases",
        Duration::from_secs(30),
        || c.owned("w1").len() == 8,
    )
    .await;
    eprintln!("leases of a killed worker taken over in {moved:?}");
    assert!(
        moved <= limit,
        "took {moved:?} (lease duration + renew interval: {limit:?})"
    );

    produce(&c.endpoint, "metrics", &c.batches[2 * third..], 5).await;
    produce(&c.endpoint, "metrics", &[sentinel(&c.batches)], 1).await;
    c.wait_for_log(&mut first, Duration::from_secs(150)).await;
    c.stop(first);
    let switches: u64 = c.leases().await.iter().map(|l| l.owner_switches).sum();
    assert_eq!(
        switches, 0,
        "every lease checkpointed since its last owner change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_two_workers_run() {
    let c = Cluster::new(Server::kinesis_local(), 2, fleet(10, 600, 3)).await;
    // One worker reads both shards through the split (a parent ends while its sibling
    // goes on in the same run), then a second one joins for the merge.
    let mut workers = vec![("w1", c.spawn("w1"))];
    wait(&c, "w1 takes both leases", Duration::from_secs(60), || {
        c.owned("w1").len() == 2
    })
    .await;
    let third = c.batches.len() / 3;
    produce(&c.endpoint, "metrics", &c.batches[..third], 10).await;
    let first = split_first_shard(&c.kinesis).await;
    produce(&c.endpoint, "metrics", &c.batches[third..2 * third], 10).await;
    workers.push(("w2", c.spawn("w2")));
    wait(&c, "w2 gets a share", Duration::from_secs(60), || {
        !c.owned("w2").is_empty()
    })
    .await;
    let shards = c
        .kinesis
        .list_shards()
        .stream_name("metrics")
        .send()
        .await
        .unwrap();
    let children: Vec<String> = shards
        .shards()
        .iter()
        .filter(|s| s.parent_shard_id() == Some(first.as_str()))
        .map(|s| s.shard_id().to_string())
        .collect();
    assert_eq!(children.len(), 2, "{shards:?}");
    c.kinesis
        .merge_shards()
        .stream_name("metrics")
        .shard_to_merge(&children[0])
        .adjacent_shard_to_merge(&children[1])
        .send()
        .await
        .unwrap();
    wait_active(&c.kinesis, "metrics").await;
    produce(&c.endpoint, "metrics", &c.batches[2 * third..], 10).await;
    produce(&c.endpoint, "metrics", &[sentinel(&c.batches)], 1).await;
    c.wait_for_log(&mut workers, Duration::from_secs(180)).await;
    c.stop(workers);
    // The lease table records the lineage: closed parents at SHARD_END with their
    // children, the merged child with both parents.
    let leases: BTreeMap<String, Lease> = c
        .leases()
        .await
        .into_iter()
        .map(|l| (l.key.clone(), l))
        .collect();
    assert_eq!(leases.len(), 5, "{leases:#?}");
    assert!(leases[&first].finished());
    assert_eq!(leases[&first].children, {
        let mut c = children.clone();
        c.sort();
        c
    });
    for child in &children {
        assert!(leases[child].finished(), "{:?}", leases[child]);
    }
    let merged = leases
        .values()
        .find(|l| l.parents.len() == 2)
        .expect("a merged shard");
    assert!(!merged.finished() && merged.state.is_some(), "{merged:?}");
}
