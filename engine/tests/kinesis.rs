//! `healer run` against real Kinesis emulators on 127.0.0.1: kinesalite (fast) and
//! kinesis-local (resharding), with a fault-injecting proxy for throttling and 5xx.
//!
//! Enhanced fan-out (`mode = "enhanced_fan_out"`) is tested on a backlog only: kinesis-local's
//! subscriptions deliver the records present when they start, then only empty events.
//!
//! Every test compares the incidents of the stream with a parquet replay of the same rows:
//! the same anomaly rows, bit for bit, none missing and none twice.
//!
//! `.ci/test` installs the emulators and exports `HEALER_NODE_MODULES` (and `HEALER_PYTHON`
//! for the proxy).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use healer_engine::config::{KinesisConfig, PipelineConfig};
use healer_engine::metrics::MetricsSnapshot;
use healer_engine::query::query;
use healer_engine::store::Location;
use healer_engine::stream::{StreamJob, StreamSummary};
use tokio::sync::watch;

#[path = "support/moto.rs"]
mod moto;
#[path = "support/receiver.rs"]
mod receiver;
#[path = "support/kinesis.rs"]
mod support;
use support::*;

fn stream_config(kinesis: KinesisConfig, out: &Path) -> PipelineConfig {
    let mut config = PipelineConfig::default();
    config.source.kind = "kinesis".into();
    config.source.kinesis = kinesis;
    config.sink.out = out.display().to_string();
    config.sink.flush_interval = "200ms".into();
    config.checkpoint.interval = "1s".into();
    config.engine.partitions = 2;
    config
}

/// Runs a streaming job until `done`, then stops it as SIGTERM would.
struct Running {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Result<StreamSummary, healer_engine::job::JobError>>,
    metrics: Arc<healer_engine::metrics::PipelineMetrics>,
}

impl Running {
    async fn start(config: &PipelineConfig) -> Self {
        let job = StreamJob::prepare(config).await.unwrap();
        let metrics = job.metrics();
        let (stop, rx) = watch::channel(false);
        let handle = tokio::spawn(job.run(rx));
        Self {
            stop,
            handle,
            metrics,
        }
    }

    async fn until(
        self,
        done: impl Fn(&MetricsSnapshot) -> bool,
        limit: Duration,
    ) -> StreamSummary {
        let deadline = Instant::now() + limit;
        while !done(&self.metrics.snapshot()) {
            assert!(
                !self.handle.is_finished(),
                "the job stopped early: {:?}",
                self.handle.await
            );
            assert!(
                Instant::now() < deadline,
                "timed out: {:?}",
                self.metrics.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.send(true).unwrap();
        self.handle.await.unwrap().unwrap()
    }
}

/// An emulator with a fresh `metrics` stream, a fleet, and the anomalies a parquet replay
/// of that fleet writes (what every streaming test must reproduce).
struct Setup {
    /// Kept alive for the test.
    _server: Server,
    endpoint: String,
    kinesis: Client,
    dir: tempfile::TempDir,
    batches: Vec<RecordBatch>,
    expected: Vec<String>,
}

impl Setup {
    async fn new(server: Server, shards: i32, batches: Vec<RecordBatch>) -> Self {
        let endpoint = server.endpoint();
        let kinesis = client(&endpoint).await;
        create_stream(&kinesis, "metrics", shards).await;
        let dir = tempfile::tempdir().unwrap();
        let expected = replay(&batches, dir.path()).await;
        Self {
            _server: server,
            endpoint,
            kinesis,
            dir,
            batches,
            expected,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_shard_stream_matches_replay_and_dead_letters_bad_records() {
    let Setup {
        _server,
        endpoint,
        kinesis,
        dir,
        batches,
        expected,
    } = Setup::new(Server::kinesalite(), 4, fleet(12, 700, 7)).await;

    produce(&endpoint, "metrics", &batches, 1).await;
    // Bad records: not JSON, a value of the wrong type, too large, no resource.
    let bad = [
        "{\"ts\": 1, \"resource\": ".to_string(),
        "{\"ts\": 1700000000000, \"resource\": \"web-0\", \"cpu_percent\": \"high\"}".to_string(),
        format!("{{\"ts\": 1, \"resource\": \"{}\"}}", "x".repeat(5000)),
        "{\"ts\": 1700000000000}".to_string(),
    ];
    for (i, data) in bad.iter().enumerate() {
        kinesis
            .put_record()
            .stream_name("metrics")
            .partition_key(format!("bad-{i}"))
            .data(Blob::new(data.as_bytes()))
            .send()
            .await
            .unwrap();
    }
    produce(&endpoint, "metrics", &[sentinel(&batches)], 1).await;

    let out = dir.path().join("stream");
    let mut k = kinesis_config(&endpoint, "metrics");
    k.max_record_bytes = 4096;
    let config = stream_config(k, &out);
    let total = rows(&batches);
    let summary = Running::start(&config)
        .await
        .until(
            |m| m.gate_rows >= total && m.rejected_records >= 4,
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(summary.summary.metrics.late_rows, 0);
    assert_eq!(
        summary.summary.metrics.source_rows,
        total + SENTINELS as u64
    );
    assert!(summary.last_checkpoint >= 1);
    assert_same(&anomalies(&out).await, &expected);

    let reasons = query(
        &local(&out),
        "SELECT reason, shard_id, sequence_number FROM dead_letter_records ORDER BY reason",
    )
    .await
    .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&reasons)
        .unwrap()
        .to_string();
    for want in [
        "missing `resource`",
        "`cpu_percent`: expected a number, found a string",
        "oversized: 5",
        "not JSON",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_slow_the_job_but_lose_nothing() {
    let server = Server::kinesalite();
    let proxy = Server::faulty_proxy(&server, 3, 5);
    let kinesis = client(&server.endpoint()).await;
    create_stream(&kinesis, "metrics", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let batches = fleet(8, 600, 11);
    let expected = replay(&batches, dir.path()).await;
    produce(&server.endpoint(), "metrics", &batches, 5).await;
    produce(&server.endpoint(), "metrics", &[sentinel(&batches)], 1).await;

    let out = dir.path().join("stream");
    let config = stream_config(kinesis_config(&proxy.endpoint(), "metrics"), &out);
    let job = Running::start(&config).await;
    let total = rows(&batches);
    let summary = job
        .until(|m| m.gate_rows >= total, Duration::from_secs(120))
        .await;
    assert_eq!(summary.summary.metrics.late_rows, 0);
    assert_same(&anomalies(&out).await, &expected);

    // The proxy really did get in the way.
    let faults: serde_json::Value = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        write!(
            s,
            "GET /__faults HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    assert!(faults["throttled"].as_u64().unwrap() > 0, "{faults}");
    assert!(faults["errors"].as_u64().unwrap() > 0, "{faults}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_producing_keeps_every_record_in_order() {
    let Setup {
        _server,
        endpoint,
        kinesis,
        dir,
        batches,
        expected,
    } = Setup::new(Server::kinesis_local(), 2, fleet(10, 600, 3)).await;
    let out = dir.path().join("stream");
    let config = stream_config(kinesis_config(&endpoint, "metrics"), &out);
    let job = Running::start(&config).await;

    let third = batches.len() / 3;
    produce(&endpoint, "metrics", &batches[..third], 10).await;
    let first = split_first_shard(&kinesis).await;
    produce(&endpoint, "metrics", &batches[third..2 * third], 10).await;
    // Merge the two children again.
    let shards = kinesis
        .list_shards()
        .stream_name("metrics")
        .send()
        .await
        .unwrap();
    let children: Vec<&str> = shards
        .shards()
        .iter()
        .filter(|s| s.parent_shard_id() == Some(first.as_str()))
        .map(|s| s.shard_id())
        .collect();
    assert_eq!(children.len(), 2, "{shards:?}");
    kinesis
        .merge_shards()
        .stream_name("metrics")
        .shard_to_merge(children[0])
        .adjacent_shard_to_merge(children[1])
        .send()
        .await
        .unwrap();
    wait_active(&kinesis, "metrics").await;
    produce(&endpoint, "metrics", &batches[2 * third..], 10).await;
    produce(&endpoint, "metrics", &[sentinel(&batches)], 1).await;

    let total = rows(&batches);
    let summary = job
        .until(|m| m.gate_rows >= total, Duration::from_secs(180))
        .await;
    // Parents were read to their end before their children: no row of a resource came
    // after a later one, so none was late.
    assert_eq!(summary.summary.metrics.late_rows, 0);
    assert_eq!(
        summary.summary.metrics.source_rows,
        total + SENTINELS as u64
    );
    assert_same(&anomalies(&out).await, &expected);
}

/// A pipeline config for `healer run` that polls and checkpoints fast.
fn fast_pipeline(dir: &Path, checkpoint_interval: &str) -> std::path::PathBuf {
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[source.kinesis]\npoll_interval = \"50ms\"\nmax_poll_interval = \"200ms\"\n\
             idle_timeout = \"1h\"\nbatch_max_delay = \"50ms\"\nbatch_max_rows = 500\n\
             [engine]\npartitions = 2\n[sink]\nflush_interval = \"100ms\"\n\
             [checkpoint]\ninterval = \"{checkpoint_interval}\"\n"
        ),
    )
    .unwrap();
    config
}

/// `healer run` of stream `metrics` at `endpoint` into `out`, output discarded.
fn run_command(endpoint: &str, out: &Path, config: &Path) -> Command {
    let mut c = healer();
    c.args(["run", "--config"])
        .arg(config)
        .args(["--stream", "metrics", "--endpoint", endpoint, "--out"])
        .arg(out)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn spawn_run(endpoint: &str, out: &Path, config: &Path) -> Child {
    run_command(endpoint, out, config).spawn().unwrap()
}

/// Anomaly files of epochs after the latest checkpoint.
fn stale_files(out: &Path) -> usize {
    let latest = latest_epoch(out);
    let Ok(dates) = std::fs::read_dir(out.join("anomalies")) else {
        return 0;
    };
    dates
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .filter(|f| {
            let name = f
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .to_string();
            healer_engine::checkpoint::epoch_of_file(&name).is_some_and(|e| e > latest)
        })
        .count()
}

fn latest_epoch(out: &Path) -> u64 {
    std::fs::read(out.join("checkpoints/_latest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["epoch"].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_checkpoints_resumes_without_loss_or_duplicates() {
    let Setup {
        _server,
        endpoint,
        kinesis: _,
        dir,
        batches,
        expected,
    } = Setup::new(Server::kinesalite(), 2, fleet(10, 900, 5)).await;
    let out = dir.path().join("stream");
    let config = fast_pipeline(dir.path(), "1500ms");

    let half = batches.len() / 2;
    produce(&endpoint, "metrics", &batches[..half], 1).await;
    let mut first = spawn_run(&endpoint, &out, &config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while latest_epoch(&out) < 2 {
        assert!(Instant::now() < deadline, "no checkpoint written");
        assert!(first.try_wait().unwrap().is_none(), "healer run exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // More rows while it runs, then SIGKILL (no drain, no final checkpoint) as soon as it
    // has written log files after its latest checkpoint: the restart must replace them.
    produce(&endpoint, "metrics", &batches[half..half + half / 2], 1).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stale_files(&out) == 0 {
        assert!(
            Instant::now() < deadline,
            "no file written after a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let killed_at = latest_epoch(&out);
    let stale = stale_files(&out);
    assert!(stale > 0, "files written after checkpoint {killed_at}");
    eprintln!("killed after checkpoint {killed_at} with {stale} file(s) written since");

    produce(&endpoint, "metrics", &batches[half + half / 2..], 1).await;
    produce(&endpoint, "metrics", &[sentinel(&batches)], 1).await;
    let mut second = spawn_run(&endpoint, &out, &config);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = try_anomalies(&out).await.unwrap_or_default();
        if got.len() >= expected.len() && latest_epoch(&out) > killed_at + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} anomalies",
            got.len(),
            expected.len()
        );
        assert!(second.try_wait().unwrap().is_none(), "healer run exited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        second.wait().unwrap().success(),
        "drains and exits 0 on SIGTERM"
    );
    assert_same(&anomalies(&out).await, &expected);
}

/// Enhanced fan-out over a backlog: the consumer is registered, every shard is subscribed
/// and the incidents equal a replay's. (Only a backlog: kinesis-local's subscriptions keep
/// sending empty events after their first records, so records written later, and a
/// parent's end, never arrive through them; live tailing and resharding in this mode are
/// not verified.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_fan_out_reads_a_backlog_like_replay() {
    let Setup {
        _server,
        endpoint,
        kinesis,
        dir,
        batches,
        expected,
    } = Setup::new(Server::kinesis_local(), 2, fleet(8, 600, 13)).await;
    produce(&endpoint, "metrics", &batches, 10).await;
    produce(&endpoint, "metrics", &[sentinel(&batches)], 1).await;
    let out = dir.path().join("stream");
    let mut k = kinesis_config(&endpoint, "metrics");
    k.mode = "enhanced_fan_out".into();
    let total = rows(&batches);
    let summary = Running::start(&stream_config(k, &out))
        .await
        .until(|m| m.gate_rows >= total, Duration::from_secs(120))
        .await;
    assert_eq!(summary.summary.metrics.late_rows, 0);
    assert_eq!(
        summary.summary.metrics.source_rows,
        total + SENTINELS as u64
    );
    assert_same(&anomalies(&out).await, &expected);
    let stream_arn = kinesis
        .describe_stream_summary()
        .stream_name("metrics")
        .send()
        .await
        .unwrap()
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_string();
    let consumers = kinesis
        .list_stream_consumers()
        .stream_arn(stream_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(consumers.consumers()[0].consumer_name(), "healer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_command_writes_every_generated_row() {
    let server = Server::kinesalite();
    let endpoint = server.endpoint();
    let kinesis = client(&endpoint).await;
    create_stream(&kinesis, "metrics", 2).await;
    let run = healer()
        .args(["produce", "--stream", "metrics", "--endpoint", &endpoint])
        .args([
            "--input",
            "generator",
            "--resources",
            "6",
            "--hours",
            "1",
            "--pack",
            "7",
        ])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.starts_with("wrote 2,160 rows"), "{stdout}");
    // Read every shard back: 6 resources × 360 samples, packed 7 to a record, per-resource
    // order kept.
    let shards = kinesis
        .list_shards()
        .stream_name("metrics")
        .send()
        .await
        .unwrap();
    let mut per_resource: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for shard in shards.shards() {
        let mut it = kinesis
            .get_shard_iterator()
            .stream_name("metrics")
            .shard_id(shard.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator
            .unwrap();
        loop {
            let out = kinesis
                .get_records()
                .shard_iterator(&it)
                .send()
                .await
                .unwrap();
            for r in out.records() {
                let samples: Vec<serde_json::Value> =
                    serde_json::from_slice(r.data().as_ref()).unwrap();
                assert!(samples.len() <= 7);
                for s in samples {
                    per_resource
                        .entry(s["resource"].as_str().unwrap().to_string())
                        .or_default()
                        .push(s["ts"].as_i64().unwrap());
                }
            }
            if out.records().is_empty() {
                break;
            }
            it = out.next_shard_iterator().unwrap().to_string();
        }
    }
    assert_eq!(per_resource.len(), 6);
    for (resource, ts) in &per_resource {
        assert_eq!(ts.len(), 360, "{resource}");
        assert!(ts.windows(2).all(|w| w[0] < w[1]), "{resource} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_and_checkpoints_on_s3_survive_a_restart() {
    let server = Server::kinesalite();
    let moto = moto::Moto::start();
    moto.create_bucket("healer");
    let endpoint = server.endpoint();
    let kinesis = client(&endpoint).await;
    create_stream(&kinesis, "metrics", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let batches = fleet(8, 600, 17);
    let expected = replay(&batches, dir.path()).await;
    produce(&endpoint, "metrics", &batches, 5).await;
    produce(&endpoint, "metrics", &[sentinel(&batches)], 1).await;

    let mut config = stream_config(kinesis_config(&endpoint, "metrics"), dir.path());
    config.sink.out = "s3://healer/log".into();
    config.sink.s3 = moto.s3();
    let total = rows(&batches);
    let first = Running::start(&config)
        .await
        .until(|m| m.gate_rows >= total, Duration::from_secs(120))
        .await;
    assert!(first.last_checkpoint >= 1);
    let log = Location::parse("s3://healer/log", &moto.s3(), false).unwrap();
    assert_same(&anomalies_at(&log).await.unwrap(), &expected);

    // A restart restores the checkpoint from S3, finds nothing new and changes nothing.
    let second = Running::start(&config)
        .await
        .until(|_| true, Duration::from_secs(60))
        .await;
    assert_eq!(second.restored_epoch, Some(first.last_checkpoint));
    assert_eq!(second.summary.metrics.source_rows, 0);
    assert_same(&anomalies_at(&log).await.unwrap(), &expected);
}

/// `healer run --topology --remediation`: incidents are diagnosed and handled while the
/// stream runs, and they are exactly the incidents `healer diagnose` finds in the final log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_diagnoses_and_remediates_while_streaming_as_diagnose_would() {
    let Setup {
        _server,
        endpoint,
        kinesis: _,
        dir,
        batches,
        expected: _,
    } = Setup::new(Server::kinesalite(), 2, fleet(10, 900, 5)).await;
    let out = dir.path().join("stream");
    let mut resources = std::collections::BTreeSet::new();
    for b in &batches {
        let r = b.column_by_name("resource").unwrap();
        let r = arrow::compute::cast(r, &arrow::datatypes::DataType::Utf8).unwrap();
        resources.extend(
            arrow::array::AsArray::as_string::<i32>(&r)
                .iter()
                .flatten()
                .map(String::from),
        );
    }
    let topology = dir.path().join("topology.toml");
    std::fs::write(
        &topology,
        resources
            .iter()
            .map(|r| format!("[[resource]]\nid = \"{r}\"\ntype = \"application\"\n"))
            .collect::<String>(),
    )
    .unwrap();
    let hook = receiver::Receiver::start(&[]).await;
    let remediation = dir.path().join("remediation.toml");
    std::fs::write(
        &remediation,
        format!(
            "mode = \"enforce\"\njournal = \"journal.db\"\nallow = [\"*\"]\n\
             [escalation]\nslack_webhook = \"{0}/slack\"\n\
             [[targets]]\nmatch = \"*\"\n[targets.webhook]\nurl = \"{0}/act\"\n",
            hook.url
        ),
    )
    .unwrap();
    let config = fast_pipeline(dir.path(), "1s");
    produce(&endpoint, "metrics", &batches, 5).await;
    produce(&endpoint, "metrics", &[sentinel(&batches)], 1).await;
    let mut run = run_command(&endpoint, &out, &config);
    run.arg("--topology")
        .arg(&topology)
        .arg("--remediation")
        .arg(&remediation)
        .args(["--diagnose-every", "300ms"]);
    let mut child = run.spawn().unwrap();
    // Handled while the job runs, not only at its end.
    let deadline = Instant::now() + Duration::from_secs(120);
    while hook.received().is_empty() {
        assert!(Instant::now() < deadline, "nothing handled while running");
        assert!(child.try_wait().unwrap().is_none(), "healer run exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop = |mut child: Child| {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        assert!(child.wait().unwrap().success(), "drains and exits 0");
    };
    stop(child);
    // A restart reads the log again and handles nothing twice.
    let handled_before = hook.received().len();
    let again = run.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop(again);
    assert_eq!(
        hook.received().len(),
        handled_before,
        "nothing handled twice"
    );

    let log = local(&out);
    let anomalies = healer_engine::diagnose::read_anomalies(&log).await.unwrap();
    let batch = healer_engine::diagnose::run(
        &healer_operators::topology::Topology::parse(
            "t",
            &std::fs::read_to_string(&topology).unwrap(),
        )
        .unwrap(),
        &anomalies,
        &[],
        &healer_operators::rca::RcaConfig::default(),
        &healer_operators::decision::Policy::default(),
        None,
        false,
    )
    .await;
    // Each incident as (id, decision, root cause, anomaly count, end).
    let mut want: Vec<String> = batch
        .iter()
        .map(|d| {
            format!(
                "{} {} {} {} {}",
                d.id,
                d.decision.outcome.as_str(),
                d.incident.root_cause().map_or("-", |r| r.resource.as_str()),
                d.incident.anomalies.len(),
                d.incident.end_ms
            )
        })
        .collect();
    want.sort();
    let got_batches = query(
        &log,
        "SELECT id, decision, coalesce(root_cause, '-'), CAST(anomalies AS VARCHAR), \
         CAST(CAST(\"end\" AS BIGINT) AS VARCHAR) FROM incidents ORDER BY id",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for b in &got_batches {
        let cols: Vec<_> = (0..5)
            .map(|i| arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).unwrap())
            .collect();
        let cols: Vec<_> = cols
            .iter()
            .map(arrow::array::AsArray::as_string::<i32>)
            .collect();
        for i in 0..b.num_rows() {
            got.push(
                cols.iter()
                    .map(|c| c.value(i))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    assert!(!want.is_empty());
    assert_eq!(got, want, "each incident once, as diagnose finds it");
    // Every incident was handled: an action called, or an escalation sent (approvals wait).
    let handled = hook.received().len();
    let waiting = want
        .iter()
        .filter(|w| w.contains(" request_approval "))
        .count();
    assert_eq!(
        handled + waiting,
        want.len(),
        "{:?}",
        hook.received()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
}
