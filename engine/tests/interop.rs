//! The incident log through real peers: S3 (a moto server on 127.0.0.1) for input and
//! output, and pyarrow, DuckDB and Polars reading the log.
//!
//! `.ci/test` installs the tools and exports `HEALER_MOTO_SERVER` and `HEALER_PYTHON`; run
//! outside it, the tests look for `moto_server` and a `python3` with the packages on `PATH`.

use std::path::Path;
use std::process::Command;

use healer_datasets::{FleetConfig, generate, write_parquet};
use healer_engine::config::PipelineConfig;
use healer_engine::job::Job;
use healer_engine::query::query;
use healer_engine::store::{Location, S3Config};

#[path = "support/moto.rs"]
mod moto;
use moto::Moto;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

fn fleet_file(dir: &Path) -> std::path::PathBuf {
    let (batches, _) = generate(&FleetConfig {
        resources: 8,
        samples: 900,
        faults: 6,
        ..FleetConfig::default()
    });
    let path = dir.join("fleet.parquet");
    write_parquet(&path, &batches).unwrap();
    path
}

async fn list(location: &Location, prefix: &str) -> Vec<(String, Vec<u8>)> {
    use futures::StreamExt;
    let root = location.child(prefix);
    let mut out = Vec::new();
    let mut listing = location.store.list(Some(&root));
    while let Some(meta) = listing.next().await {
        let meta = meta.unwrap();
        let bytes = location
            .store
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let relative = meta
            .location
            .as_ref()
            .strip_prefix(location.path.as_ref())
            .unwrap()
            .trim_start_matches('/')
            .to_string();
        out.push((relative, bytes.to_vec()));
    }
    out.sort();
    out
}

/// The anomaly rows of a log, counted by `healer incidents`' query engine.
async fn count(log: &Location) -> u64 {
    let batches = query(log, "SELECT count(*) AS n FROM anomalies")
        .await
        .unwrap();
    let n = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    n as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_and_to_s3_matches_local() {
    let moto = Moto::start();
    moto.create_bucket("healer");
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(dir.path());

    let input =
        Location::parse("s3://healer/history/2025/fleet.parquet", &moto.s3(), false).unwrap();
    input
        .store
        .put(&input.path, PutPayload::from(std::fs::read(&file).unwrap()))
        .await
        .unwrap();

    let mut remote = PipelineConfig::default();
    remote.source.paths = vec!["s3://healer/history/".into()];
    remote.source.s3 = moto.s3();
    remote.sink.out = "s3://healer/log".into();
    remote.sink.s3 = moto.s3();
    let s3_summary = Job::prepare(&remote).await.unwrap().run().await.unwrap();

    let mut local = PipelineConfig::default();
    local.source.paths = vec![file.display().to_string()];
    local.sink.out = dir.path().join("log").display().to_string();
    let local_summary = Job::prepare(&local).await.unwrap().run().await.unwrap();

    assert_eq!(s3_summary.metrics.source_rows, 8 * 900);
    assert!(s3_summary.metrics.anomalies > 0);
    assert_eq!(
        s3_summary.metrics.anomalies,
        local_summary.metrics.anomalies
    );
    let remote_log = Location::parse("s3://healer/log", &moto.s3(), false).unwrap();
    let local_log = Location::parse(&local.sink.out, &S3Config::default(), false).unwrap();
    let remote_files = list(&remote_log, "anomalies").await;
    assert!(!remote_files.is_empty());
    assert_eq!(
        remote_files,
        list(&local_log, "anomalies").await,
        "same files, same bytes"
    );

    assert_eq!(count(&remote_log).await, s3_summary.metrics.anomalies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_log_is_readable_by_pyarrow_duckdb_and_polars() {
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(dir.path());
    let mut c = PipelineConfig::default();
    c.source.paths = vec![file.display().to_string()];
    let log = dir.path().join("log");
    c.sink.out = log.display().to_string();
    let summary = Job::prepare(&c).await.unwrap().run().await.unwrap();
    assert!(summary.metrics.anomalies > 0);
    // A staging file as a running job has it: the first bytes of an hour's file. Every
    // reader below must skip it.
    let written = std::fs::read_dir(log.join("anomalies"))
        .unwrap()
        .map(|d| d.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let part = std::fs::read_dir(&written)
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .unwrap();
    let head = std::fs::read(&part).unwrap();
    std::fs::write(written.join(".part-23.parquet#1"), &head[..head.len() / 2]).unwrap();
    let location = Location::parse(&c.sink.out, &S3Config::default(), false).unwrap();
    assert_eq!(
        count(&location).await,
        summary.metrics.anomalies,
        "healer incidents"
    );

    let python = std::env::var("HEALER_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import sys, duckdb, polars as pl, pyarrow.dataset as ds
root = sys.argv[1] + "/anomalies"
t = ds.dataset(root, format="parquet", partitioning="hive").to_table()
assert t.schema.metadata[b"healer.schema"] == b"anomaly/v1", t.schema.metadata
d = duckdb.sql(f"SELECT count(*), count(DISTINCT id) FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true)").fetchall()[0]
p = pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True).select(pl.len()).collect().item()
print(t.num_rows, d[0], d[1], p)
"#;
    let out = Command::new(&python)
        .args(["-c", script, log.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}): run the suite with .ci/test"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        counts,
        vec![summary.metrics.anomalies; 4],
        "pyarrow, DuckDB (rows, distinct ids) and Polars agree"
    );
}
