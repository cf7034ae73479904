//! Kinesis helpers shared by the streaming tests: emulators started from `.ci/servers`,
//! streams, a fleet with sentinels, a producer, and the anomalies of a log or a replay.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::util::display::array_value_to_string;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::StreamStatus;
use healer_datasets::{FleetConfig, generate, write_parquet};
use healer_engine::config::{KinesisConfig, PipelineConfig};
use healer_engine::job::Job;
use healer_engine::kinesis::producer::{ProduceOptions, Producer};
use healer_engine::query::query;
use healer_engine::store::{Location, S3Config};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A server started by a script that prints `listening <port>`; killed on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(mut command: Command, what: &str) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({e}): run the suite with .ci/test"));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{what} did not start: {line:?}"));
        Self { child, port }
    }

    pub fn node(script: &str) -> Self {
        let modules = std::env::var("HEALER_NODE_MODULES")
            .unwrap_or_else(|_| repo().join(".ci/node/node_modules").display().to_string());
        let mut c = Command::new("node");
        c.arg(repo().join(".ci/servers").join(script))
            .arg("0")
            .env("NODE_PATH", modules);
        Self::start(c, script)
    }

    pub fn kinesalite() -> Self {
        Self::node("kinesalite.js")
    }

    pub fn kinesis_local() -> Self {
        Self::node("kinesis-local.js")
    }

    /// The fault-injecting proxy in front of `upstream`.
    pub fn faulty_proxy(upstream: &Server, throttle_every: u32, error_every: u32) -> Self {
        let python = std::env::var("HEALER_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut c = Command::new(python);
        c.arg(repo().join(".ci/servers/faulty_proxy.py"))
            .args(["--upstream", &upstream.endpoint(), "--port", "0"])
            .args(["--throttle-every", &throttle_every.to_string()])
            .args(["--error-every", &error_every.to_string()])
            .args(["--targets", "GetRecords,GetShardIterator,ListShards"]);
        Self::start(c, "faulty_proxy.py")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn kinesis_config(endpoint: &str, stream: &str) -> KinesisConfig {
    KinesisConfig {
        stream: stream.into(),
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        poll_interval: "50ms".into(),
        max_poll_interval: "200ms".into(),
        list_shards_interval: "300ms".into(),
        // Test data's event time runs ~1000× faster than the wall clock, so no wall-clock
        // idleness bound is safe while producing: shards never count as idle here (the
        // sentinels move every shard's watermark instead).
        idle_timeout: "1h".into(),
        batch_max_delay: "50ms".into(),
        ..KinesisConfig::default()
    }
}

pub async fn client(endpoint: &str) -> Client {
    healer_engine::kinesis::client(&kinesis_config(endpoint, "")).await
}

pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    wait_active(client, name).await;
}

pub async fn wait_active(client: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .unwrap();
        if out.stream_description_summary().map(|d| d.stream_status())
            == Some(&StreamStatus::Active)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} never became ACTIVE"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small fleet in stream order, and its rows as one batch per timestamp block.
pub fn fleet(resources: usize, samples: usize, seed: u64) -> Vec<RecordBatch> {
    let (batches, _) = generate(&FleetConfig {
        seed,
        resources,
        samples,
        faults: 4,
        batch_rows: resources * 50,
        ..FleetConfig::default()
    });
    batches
}

pub fn rows(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

/// Rows that close the stream: an hour after the last real row, on resources of their own
/// whose keys land in every shard, so every shard's watermark passes every real row (no
/// shard has to go idle for that). They add no anomaly: their windows never fill.
pub const SENTINELS: usize = 64;

pub fn sentinel(batches: &[RecordBatch]) -> RecordBatch {
    let last = batches.last().unwrap();
    let ts = last
        .column_by_name("ts")
        .unwrap()
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    let end = ts.value(ts.len() - 1) + 3_600_000;
    let schema = last.schema();
    let columns = schema
        .fields()
        .iter()
        .map(|f| -> Arc<dyn Array> {
            match f.name().as_str() {
                "ts" => Arc::new(
                    TimestampMillisecondArray::from(vec![end; SENTINELS]).with_timezone("UTC"),
                ),
                "resource" => Arc::new(StringArray::from(
                    (0..SENTINELS)
                        .map(|i| format!("~sentinel-{i:02}"))
                        .collect::<Vec<_>>(),
                )),
                _ => arrow::array::new_null_array(f.data_type(), SENTINELS),
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

pub async fn produce(endpoint: &str, stream: &str, batches: &[RecordBatch], pack: usize) {
    let mut p = Producer::new(
        client(endpoint).await,
        stream,
        ProduceOptions {
            pack,
            ..ProduceOptions::default()
        },
    );
    for b in batches {
        p.push(b).await.unwrap();
    }
    let s = p.finish().await.unwrap();
    assert_eq!(s.rows, rows(batches));
}

pub fn local(dir: &Path) -> Location {
    Location::parse(&dir.display().to_string(), &S3Config::default(), false).unwrap()
}

/// Every anomaly row of a log, as text, sorted.
pub async fn anomalies(dir: &Path) -> Vec<String> {
    try_anomalies(dir).await.unwrap()
}

/// As [`anomalies`], for a log a running job may be changing: a restarted job deletes the
/// files its predecessor wrote after its last checkpoint, so a query can race with that.
pub async fn try_anomalies(dir: &Path) -> datafusion::error::Result<Vec<String>> {
    if !dir.join("anomalies").exists() {
        return Ok(Vec::new());
    }
    anomalies_at(&local(dir)).await
}

/// Every anomaly row of the log at `loc`, as text, sorted.
pub async fn anomalies_at(loc: &Location) -> datafusion::error::Result<Vec<String>> {
    let batches = query(
        loc,
        "SELECT id, ts, resource, metric, value, score, severity, confidence, rule, service \
         FROM anomalies ORDER BY id",
    )
    .await?;
    let mut out = Vec::new();
    for b in &batches {
        for i in 0..b.num_rows() {
            let cells: Vec<String> = (0..b.num_columns())
                .map(|c| array_value_to_string(b.column(c), i).unwrap())
                .collect();
            out.push(cells.join("|"));
        }
    }
    Ok(out)
}

/// Asserts two sorted row lists are equal, reporting what differs rather than both lists.
pub fn assert_same(got: &[String], expected: &[String]) {
    if got == expected {
        return;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|r| !got.contains(r))
        .take(3)
        .collect();
    let extra: Vec<&String> = got
        .iter()
        .filter(|r| !expected.contains(r))
        .take(3)
        .collect();
    let mut dup = got.to_vec();
    dup.dedup();
    panic!(
        "{} rows, expected {} ({} duplicates); missing e.g. {missing:#?}; unexpected e.g. {extra:#?}",
        got.len(),
        expected.len(),
        got.len() - dup.len()
    );
}

/// The anomalies of a parquet replay of `batches`.
pub async fn replay(batches: &[RecordBatch], dir: &Path) -> Vec<String> {
    let input = dir.join("input.parquet");
    write_parquet(&input, batches).unwrap();
    let mut config = PipelineConfig::default();
    config.source.paths = vec![input.display().to_string()];
    config.sink.out = dir.join("replay").display().to_string();
    Job::prepare(&config).await.unwrap().run().await.unwrap();
    let rows = anomalies(&dir.join("replay")).await;
    assert!(!rows.is_empty(), "the fleet has anomalies to compare");
    rows
}

/// Splits the stream's first shard at the middle of its hash range; returns its id.
pub async fn split_first_shard(kinesis: &Client) -> String {
    let shards = kinesis
        .list_shards()
        .stream_name("metrics")
        .send()
        .await
        .unwrap();
    let first = &shards.shards()[0];
    let range = first.hash_key_range().unwrap();
    let lo: u128 = range.starting_hash_key().parse().unwrap();
    let hi: u128 = range.ending_hash_key().parse().unwrap();
    kinesis
        .split_shard()
        .stream_name("metrics")
        .shard_to_split(first.shard_id())
        .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(kinesis, "metrics").await;
    first.shard_id().to_string()
}

pub fn healer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_healer"))
}
