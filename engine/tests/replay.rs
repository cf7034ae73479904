//! End-to-end replays: parquet in, incident log out, checked through SQL.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch, TimestampMillisecondArray};
use arrow::compute::concat_batches;
use healer_datasets::{FleetConfig, generate, write_parquet};
use healer_engine::config::PipelineConfig;
use healer_engine::job::{Job, JobError, Summary};
use healer_engine::query::query;
use healer_engine::store::{Location, S3Config};

fn fleet() -> (Vec<RecordBatch>, Vec<healer_datasets::Label>) {
    generate(&FleetConfig {
        resources: 12,
        samples: 1200,
        faults: 8,
        batch_rows: 1000,
        ..FleetConfig::default()
    })
}

/// A replay of `inputs` into `out` with the reference z-score rule, whose rows these tests
/// check (|z| > 3, value outside mean ± 3σ).
fn config(inputs: Vec<String>, out: &Path) -> PipelineConfig {
    let mut c = PipelineConfig::default();
    c.source.paths = inputs;
    c.sink.out = out.display().to_string();
    c.rules.paths = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/rules/zscore.sql")];
    c
}

async fn replay(c: &PipelineConfig) -> Summary {
    Job::prepare(c).await.unwrap().run().await.unwrap()
}

async fn sql(out: &Path, q: &str) -> Vec<RecordBatch> {
    let loc = Location::parse(&out.display().to_string(), &S3Config::default(), false).unwrap();
    query(&loc, q).await.unwrap()
}

/// Every file of the log: relative path → bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

fn strings(array: &arrow::array::ArrayRef) -> Vec<String> {
    let utf8 = arrow::compute::cast(array, &arrow::datatypes::DataType::Utf8).unwrap();
    utf8.as_string::<i32>()
        .iter()
        .map(|s| s.unwrap_or_default().to_string())
        .collect()
}

fn count(batches: &[RecordBatch]) -> i64 {
    batches[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_replay_writes_a_queryable_incident_log() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, labels) = fleet();
    let input = dir.path().join("fleet.parquet");
    write_parquet(&input, &batches).unwrap();
    let out = dir.path().join("log");
    let summary = replay(&config(vec![input.display().to_string()], &out)).await;

    assert_eq!(summary.metrics.source_rows, 12 * 1200);
    assert_eq!(summary.metrics.gate_rows, 12 * 1200);
    assert_eq!(summary.metrics.late_rows + summary.metrics.invalid_rows, 0);
    assert!(summary.dead_letter_files.is_empty());
    assert!(!summary.files.is_empty());
    let written: usize = summary.files.iter().map(|f| f.rows).sum();
    assert_eq!(written as u64, summary.metrics.anomalies);
    assert!(
        summary
            .files
            .iter()
            .all(|f| f.path.contains("/anomalies/date=2025-01-01/part-"))
    );

    let total = count(&sql(&out, "SELECT count(*) FROM anomalies").await);
    assert_eq!(total as usize, written);
    let distinct = count(&sql(&out, "SELECT count(DISTINCT id) FROM anomalies").await);
    assert_eq!(distinct, total, "ids are unique");
    let bad = count(&sql(&out, "SELECT count(*) FROM anomalies WHERE abs(score) <= 3 OR confidence < 0 OR confidence > 1 \
        OR NOT (value < expected_low OR value > expected_high) OR service IS NULL OR region IS NULL").await);
    assert_eq!(
        bad, 0,
        "every row is a flagged z-score with its range and tags"
    );

    // Most injected faults are found, within 5 minutes of their start.
    let mut found = 0;
    for l in &labels {
        let q = format!(
            "SELECT count(*) FROM anomalies WHERE resource = '{}' AND metric = '{}' AND ts BETWEEN to_timestamp_millis({}) AND to_timestamp_millis({})",
            l.resource,
            l.metric,
            l.start_ms,
            l.start_ms + 300_000
        );
        if count(&sql(&out, &q).await) > 0 {
            found += 1;
        }
    }
    assert!(
        found * 3 >= labels.len() * 2,
        "found {found} of {} labelled faults",
        labels.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_batch_sizes_and_reruns_give_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, _) = fleet();
    let input = dir.path().join("fleet.parquet");
    write_parquet(&input, &batches).unwrap();
    let inputs = vec![input.display().to_string()];

    let a = dir.path().join("a");
    let mut ca = config(inputs.clone(), &a);
    ca.engine.partitions = 1;
    replay(&ca).await;

    let b = dir.path().join("b");
    let mut cb = config(inputs.clone(), &b);
    cb.engine.partitions = 3;
    cb.source.batch_rows = 777;
    replay(&cb).await;

    let fa = files(&a);
    assert!(!fa.is_empty());
    assert_eq!(
        fa,
        files(&b),
        "partitions and batch sizes do not change the log"
    );

    // A second replay into the same log rewrites the same files: nothing is duplicated.
    replay(&ca).await;
    assert_eq!(fa, files(&a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_split_by_metric_or_by_resource_find_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, _) = fleet();
    let input = dir.path().join("fleet.parquet");
    write_parquet(&input, &batches).unwrap();
    let inputs = vec![input.display().to_string()];
    let zscore_rows = "SELECT ts, resource, metric, value, score FROM anomalies \
                       WHERE rule = 'zscore_300' ORDER BY ts, resource, metric";

    // One worker; then three that split the 16 metrics (every rule reads the samples view).
    let mut rows = Vec::new();
    for partitions in [1, 3] {
        let out = dir.path().join(format!("samples-{partitions}"));
        let mut c = config(inputs.clone(), &out);
        c.engine.partitions = partitions;
        replay(&c).await;
        rows.push(sql(&out, zscore_rows).await);
    }
    // Three that split the rows by resource: a rule over the wide `metrics` table rules
    // out the split by metric.
    let wide = dir.path().join("wide.sql");
    std::fs::write(
        &wide,
        "CREATE VIEW busy AS SELECT ts, resource, 'cpu_percent' AS metric, cpu_percent AS value, \
         AVG(cpu_percent) OVER (PARTITION BY resource ORDER BY ts ROWS BETWEEN 9 PRECEDING AND CURRENT ROW) AS score \
         FROM metrics;\n",
    )
    .unwrap();
    let out = dir.path().join("by-resource");
    let mut c = config(inputs.clone(), &out);
    c.rules.paths.push(wide);
    c.engine.partitions = 3;
    replay(&c).await;
    rows.push(sql(&out, zscore_rows).await);

    let text = |b: &[RecordBatch]| {
        arrow::util::pretty::pretty_format_batches(b)
            .unwrap()
            .to_string()
    };
    assert!(rows[0].iter().map(RecordBatch::num_rows).sum::<usize>() > 0);
    assert_eq!(text(&rows[0]), text(&rows[1]), "split by metric");
    assert_eq!(text(&rows[0]), text(&rows[2]), "split by resource");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_merged_by_event_time_not_listing_order() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, _) = fleet();
    let all = concat_batches(&batches[0].schema(), &batches).unwrap();
    let whole = dir.path().join("whole.parquet");
    write_parquet(&whole, std::slice::from_ref(&all)).unwrap();

    // Late hours listed first, and two files that overlap in time (split by resource).
    let parts = dir.path().join("parts");
    std::fs::create_dir(&parts).unwrap();
    let n = all.num_rows();
    let third = n / 3 / 12 * 12;
    write_parquet(
        &parts.join("a-late.parquet"),
        &[all.slice(2 * third, n - 2 * third)],
    )
    .unwrap();
    let early = all.slice(0, 2 * third);
    let res = early
        .column_by_name("resource")
        .unwrap()
        .as_string::<i32>()
        .clone();
    let even: arrow::array::BooleanArray = (0..early.num_rows())
        .map(|i| Some(res.value(i).ends_with(['0', '2', '4', '6', '8'])))
        .collect();
    let odd = arrow::compute::not(&even).unwrap();
    write_parquet(
        &parts.join("b-early-even.parquet"),
        &[arrow::compute::filter_record_batch(&early, &even).unwrap()],
    )
    .unwrap();
    write_parquet(
        &parts.join("c-early-odd.parquet"),
        &[arrow::compute::filter_record_batch(&early, &odd).unwrap()],
    )
    .unwrap();

    let out_whole = dir.path().join("log-whole");
    let out_parts = dir.path().join("log-parts");
    let s1 = replay(&config(vec![whole.display().to_string()], &out_whole)).await;
    let mut c = config(vec![parts.display().to_string()], &out_parts);
    c.source.batch_rows = 500;
    let s2 = replay(&c).await;
    assert_eq!(s2.input_files, 3);
    assert_eq!(
        s2.metrics.late_rows, 0,
        "no row is late when files are merged by time"
    );
    assert_eq!(s1.metrics.anomalies, s2.metrics.anomalies);
    assert_eq!(files(&out_whole), files(&out_parts));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_and_invalid_rows_are_dead_lettered_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, _) = fleet();
    let all = concat_batches(&batches[0].schema(), &batches).unwrap();
    // Delay some rows by 3 s (within the 5 s bound) and others by 60 s (beyond it).
    let ts = all
        .column(0)
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    let mut order: Vec<(i64, usize)> = (0..all.num_rows()).map(|i| (ts.value(i), i)).collect();
    for (k, o) in order.iter_mut().enumerate() {
        if k % 97 == 5 {
            o.0 += 3_000;
        } else if k % 1009 == 7 {
            o.0 += 60_000;
        }
    }
    order.sort();
    let idx =
        arrow::array::UInt32Array::from(order.iter().map(|&(_, i)| i as u32).collect::<Vec<_>>());
    let columns: Vec<_> = all
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &idx, None).unwrap())
        .collect();
    let shuffled = RecordBatch::try_new(all.schema(), columns).unwrap();
    let input = dir.path().join("late.parquet");
    write_parquet(&input, &[shuffled]).unwrap();
    let out = dir.path().join("log");
    let mut c = config(vec![input.display().to_string()], &out);
    c.event_time.max_out_of_orderness = "5s".into();
    let s = replay(&c).await;
    let expected_late = (0..all.num_rows())
        .filter(|k| k % 1009 == 7 && k % 97 != 5)
        .count() as u64;
    assert_eq!(s.metrics.late_rows, expected_late);
    assert_eq!(
        s.metrics.gate_rows + s.metrics.late_rows,
        all.num_rows() as u64
    );
    assert_eq!(s.dead_letter_files.len(), 1);
    let dl = sql(
        &out,
        "SELECT reason, count(*) FROM dead_letter GROUP BY reason",
    )
    .await;
    assert_eq!(dl[0].num_rows(), 1);
    assert_eq!(
        strings(dl[0].column(0)),
        ["late: ts is before the watermark"]
    );
    assert_eq!(
        dl[0]
            .column(1)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0) as u64,
        expected_late
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_resource_or_ts_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("ts", healer_operators::schema::ts_type(), true),
        arrow::datatypes::Field::new("resource", arrow::datatypes::DataType::Utf8, true),
        arrow::datatypes::Field::new("cpu_percent", arrow::datatypes::DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(
                TimestampMillisecondArray::from(vec![Some(1000), None, Some(2000), Some(3000)])
                    .with_timezone("UTC"),
            ),
            Arc::new(arrow::array::StringArray::from(vec![
                Some("a"),
                Some("a"),
                None,
                Some("a"),
            ])),
            Arc::new(arrow::array::Float64Array::from(vec![1.0, 2.0, 3.0, 4.0])),
        ],
    )
    .unwrap();
    let input = dir.path().join("bad.parquet");
    write_parquet(&input, &[batch]).unwrap();
    let out = dir.path().join("log");
    let s = replay(&config(vec![input.display().to_string()], &out)).await;
    assert_eq!(s.metrics.invalid_rows, 2);
    assert_eq!(s.metrics.gate_rows, 2);
    let dl = sql(&out, "SELECT reason FROM dead_letter ORDER BY reason").await;
    let reasons = strings(dl[0].column(0));
    assert_eq!(reasons, ["missing resource", "missing ts"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_and_inputs_fail_at_prepare_with_locations() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, _) = fleet();
    let input = dir.path().join("fleet.parquet");
    write_parquet(&input, &batches[..1]).unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("bad.sql"),
        "CREATE VIEW bad AS\nSELECT ts, resource FROM metrics ORDER BY ts;\n",
    )
    .unwrap();
    let mut c = config(vec![input.display().to_string()], &dir.path().join("log"));
    c.rules.paths = vec![rules.clone()];
    match Job::prepare(&c).await {
        Err(JobError::Rules(e)) => {
            let text = e.to_string();
            assert!(text.contains("bad.sql:1:13: rule `bad`"), "{text}");
        }
        other => panic!("expected rule errors, got {other:?}"),
    }
    let c = config(
        vec![dir.path().join("missing").display().to_string()],
        &dir.path().join("log"),
    );
    assert!(Job::prepare(&c).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_columns_rules_read_are_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, _) = fleet();
    let input = dir.path().join("fleet.parquet");
    write_parquet(&input, &batches[..2]).unwrap();
    let rules = dir.path().join("cpu.sql");
    std::fs::write(&rules, "CREATE VIEW hot_cpu AS SELECT ts, resource, 'cpu_percent' AS metric, cpu_percent AS value, \
        cpu_percent / 10 AS score FROM metrics WHERE cpu_percent > 90;\n").unwrap();
    let mut c = config(vec![input.display().to_string()], &dir.path().join("log"));
    c.rules.paths = vec![rules];
    let job = Job::prepare(&c).await.unwrap();
    let names: Vec<&str> = job
        .input_schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(
        names,
        ["ts", "resource", "service", "region", "cpu_percent"]
    );
    let s = job.run().await.unwrap();
    assert_eq!(s.metric_columns, 1);
    assert_eq!(s.metrics.gate_rows, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_replay_follows_event_time() {
    let dir = tempfile::tempdir().unwrap();
    // 30 samples 1 s apart, 2 per batch: the last batch starts 28 s into event time, so at
    // 20x the replay takes at least 1.4 s.
    let (batches, _) = generate(&FleetConfig {
        resources: 4,
        samples: 30,
        faults: 0,
        interval_ms: 1000,
        batch_rows: 8,
        ..FleetConfig::default()
    });
    let input = dir.path().join("fleet.parquet");
    write_parquet(&input, &batches).unwrap();
    let mut c = config(vec![input.display().to_string()], &dir.path().join("log"));
    c.source.speed = "20x".into();
    c.source.batch_rows = 8;
    let s = replay(&c).await;
    assert_eq!(s.metrics.gate_rows, 120);
    assert!(
        s.elapsed >= std::time::Duration::from_millis(1400),
        "{:?}",
        s.elapsed
    );
}
