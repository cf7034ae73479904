//! The bundled z-score rule against a two-pass reference, and the batch-size equivalence
//! property: the same rows in one batch or in batches of 1..1000 rows give identical output.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, TimestampMillisecondType};
use arrow::util::pretty::pretty_format_batches;
use healer_operators::schema::ts_type;
use healer_operators::unpivot::Unpivot;
use healer_sql::{CompiledRule, RuleCompiler, StreamTable};
use proptest::prelude::*;

const ZSCORE: &str = include_str!("../rules/zscore.sql");

fn schema(metrics: usize) -> SchemaRef {
    let mut fields = vec![
        Field::new("ts", ts_type(), false),
        Field::new("resource", DataType::Utf8, false),
    ];
    fields.extend((0..metrics).map(|m| Field::new(format!("m{m}"), DataType::Float64, true)));
    Arc::new(Schema::new(fields))
}

/// A deterministic noisy fleet with spikes, a constant stretch, NULLs and NaNs.
fn data(resources: usize, samples: usize, metrics: usize, seed: u64) -> RecordBatch {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let mut ts = Vec::new();
    let mut res = Vec::new();
    let mut cols: Vec<Vec<Option<f64>>> = vec![Vec::new(); metrics];
    for t in 0..samples {
        for r in 0..resources {
            ts.push(1_700_000_000_000 + t as i64 * 1000);
            res.push(format!("r{r}"));
            for (m, col) in cols.iter_mut().enumerate() {
                let u = next();
                let mut v = 100.0 * (m as f64 + 1.0)
                    + 10.0 * (next() - 0.5)
                    + if u > 0.995 { 80.0 } else { 0.0 };
                if r == 0 && m == 0 && (400..800).contains(&t) {
                    v = 42.0; // constant: std = 0
                }
                col.push(if u < 0.002 {
                    None
                } else if u < 0.004 {
                    Some(f64::NAN)
                } else {
                    Some(v)
                });
            }
        }
    }
    let mut columns: Vec<Arc<dyn Array>> = vec![
        Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
        Arc::new(StringArray::from(res)),
    ];
    columns.extend(
        cols.into_iter()
            .map(|c| Arc::new(Float64Array::from(c)) as Arc<dyn Array>),
    );
    RecordBatch::try_new(schema(metrics), columns).unwrap()
}

fn compile(schema: SchemaRef, sql: &str) -> Vec<Arc<CompiledRule>> {
    RuleCompiler::try_new(schema)
        .unwrap()
        .compile_str(Path::new("test.sql"), sql)
        .unwrap()
}

fn run(rule: &Arc<CompiledRule>, input: &RecordBatch, splits: &[usize]) -> Vec<RecordBatch> {
    run_as(rule, input, splits, false)
}

/// Runs `rule` over `input` cut at `splits`; `per_metric` feeds the samples view one metric
/// at a time, as the engine does for metric-separable rules.
fn run_as(
    rule: &Arc<CompiledRule>,
    input: &RecordBatch,
    splits: &[usize],
    per_metric: bool,
) -> Vec<RecordBatch> {
    let unpivot = Unpivot::try_new(&input.schema()).unwrap();
    let mut instance = rule.instantiate().unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    let mut i = 0;
    while offset < input.num_rows() {
        let len = splits[i % splits.len()]
            .max(1)
            .min(input.num_rows() - offset);
        i += 1;
        let part = input.slice(offset, len);
        let parts = match rule.table {
            StreamTable::Metrics => vec![part],
            StreamTable::Samples if per_metric => unpivot.per_metric(&part).unwrap(),
            StreamTable::Samples => vec![unpivot.apply(&part).unwrap()],
        };
        for part in parts {
            out.push(instance.anomalies(part).unwrap());
        }
        offset += len;
    }
    out
}

/// pandas-style reference: rolling(300) mean and sample std, full windows of present values.
fn reference(input: &RecordBatch) -> Vec<(i64, String, String, f64)> {
    let ts = input.column(0).as_primitive::<TimestampMillisecondType>();
    let res = input.column(1).as_string::<i32>();
    let schema = input.schema();
    let mut series: std::collections::HashMap<(String, usize), Vec<f64>> = Default::default();
    let mut out = Vec::new();
    for i in 0..input.num_rows() {
        for m in 2..input.num_columns() {
            let col = input.column(m).as_primitive::<Float64Type>();
            let v = if col.is_null(i) {
                f64::NAN
            } else {
                col.value(i)
            };
            let s = series.entry((res.value(i).to_string(), m)).or_default();
            s.push(v);
            if s.len() < 300 {
                continue;
            }
            let w = &s[s.len() - 300..];
            if w.iter().any(|x| x.is_nan()) {
                continue;
            }
            let mean = w.iter().sum::<f64>() / 300.0;
            let var = w.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 299.0;
            let std = var.sqrt();
            if std == 0.0 {
                continue;
            }
            let z = (v - mean) / std;
            if z.abs() > 3.0 {
                out.push((
                    ts.value(i),
                    res.value(i).to_string(),
                    schema.field(m).name().clone(),
                    z,
                ));
            }
        }
    }
    out
}

#[test]
fn bundled_zscore_matches_two_pass_reference() {
    let input = data(3, 1500, 3, 7);
    let rules = compile(input.schema(), ZSCORE);
    let out = run(&rules[0], &input, &[997]);
    let mut got = Vec::new();
    for b in &out {
        let ts = b
            .column_by_name("ts")
            .unwrap()
            .as_primitive::<TimestampMillisecondType>();
        let res = b.column_by_name("resource").unwrap().as_string::<i32>();
        let met = b.column_by_name("metric").unwrap().as_string::<i32>();
        let score = b
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float64Type>();
        let sev = b.column_by_name("severity").unwrap().as_string::<i32>();
        let conf = b
            .column_by_name("confidence")
            .unwrap()
            .as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let z = score.value(i);
            assert_eq!(
                sev.value(i),
                healer_operators::severity::Severity::from_zscore(z).as_str()
            );
            assert!((conf.value(i) - (z.abs() / 10.0).min(1.0)).abs() < 1e-12);
            got.push((
                ts.value(i),
                res.value(i).to_string(),
                met.value(i).to_string(),
                z,
            ));
        }
    }
    let want = reference(&input);
    assert!(
        want.len() > 20,
        "the fixture must flag something: {}",
        want.len()
    );
    assert_eq!(got.len(), want.len(), "same rows flagged");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((g.0, &g.1, &g.2), (w.0, &w.1, &w.2));
        assert!(
            (g.3 - w.3).abs() <= 1e-9 * w.3.abs().max(1.0),
            "{g:?} vs {w:?}"
        );
    }
}

#[test]
fn several_rules_over_both_streams() {
    let input = data(2, 400, 2, 3);
    let sql = format!(
        "{ZSCORE}\nCREATE VIEW hot AS SELECT ts, resource, 'm0' AS metric, m0 AS value, m0 AS score FROM metrics WHERE m0 > 170;"
    );
    let rules = compile(input.schema(), &sql);
    assert_eq!(
        rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["zscore_300", "hot"]
    );
    assert_eq!(rules[1].table, StreamTable::Metrics);
    let hot = run(&rules[1], &input, &[50]);
    let n: usize = hot.iter().map(|b| b.num_rows()).sum();
    assert!(n > 0);
    assert!(hot.iter().all(|b| {
        b.column_by_name("rule")
            .unwrap()
            .as_string::<i32>()
            .iter()
            .all(|r| r == Some("hot"))
    }));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn batch_boundaries_do_not_change_output(
        splits in proptest::collection::vec(1usize..1000, 1..8),
        seed in 0u64..1000,
    ) {
        let input = data(3, 700, 2, seed);
        let rules = compile(input.schema(), ZSCORE);
        let whole = pretty_format_batches(&run(&rules[0], &input, &[usize::MAX])).unwrap().to_string();
        let split = pretty_format_batches(&run(&rules[0], &input, &splits)).unwrap().to_string();
        prop_assert_eq!(whole, split);
    }
}

/// The rows of `batches` sorted by (ts, resource, metric), pretty-printed.
fn sorted(batches: &[RecordBatch]) -> String {
    let all = arrow::compute::concat_batches(&batches[0].schema(), batches).unwrap();
    let keys: Vec<arrow::compute::SortColumn> = ["ts", "resource", "metric"]
        .iter()
        .map(|c| arrow::compute::SortColumn {
            values: Arc::clone(all.column_by_name(c).unwrap()),
            options: None,
        })
        .collect();
    let idx = arrow::compute::lexsort_to_indices(&keys, None).unwrap();
    let all = arrow::compute::take_record_batch(&all, &idx).unwrap();
    pretty_format_batches(&[all]).unwrap().to_string()
}

#[test]
fn metric_separable_rules_give_the_same_rows_one_metric_at_a_time() {
    let input = data(4, 900, 3, 11);
    let rules = compile(input.schema(), ZSCORE);
    assert!(rules[0].metric_separable);
    let row_major = run_as(&rules[0], &input, &[333], false);
    let per_metric = run_as(&rules[0], &input, &[333], true);
    let n: usize = row_major.iter().map(|b| b.num_rows()).sum();
    assert!(n > 20, "the fixture must flag something: {n}");
    assert_eq!(sorted(&row_major), sorted(&per_metric));
}

/// `anomalies_of` over a wide batch's per-metric batches gives, in order, the rows that
/// `anomalies` gives batch by batch: the stages after the window run once over all of them.
#[test]
fn batches_at_once_give_the_rows_of_each_in_turn() {
    let input = data(8, 1500, 4, 11);
    let rules = compile(input.schema(), ZSCORE);
    let unpivot = Unpivot::try_new(&input.schema()).unwrap();
    let (mut one_by_one, mut at_once) = (
        rules[0].instantiate().unwrap(),
        rules[0].instantiate().unwrap(),
    );
    let (mut expected, mut got) = (Vec::new(), Vec::new());
    let mut flagged = 0;
    for (k, offset) in (0..input.num_rows()).step_by(257).enumerate() {
        let part = input.slice(offset, 257.min(input.num_rows() - offset));
        let mut parts = unpivot.per_metric(&part).unwrap();
        if k % 3 == 2 {
            // Some calls with one batch, or none.
            parts.truncate(k % 2);
        }
        for p in &parts {
            expected.push(one_by_one.anomalies(p.clone()).unwrap());
        }
        let out = at_once.anomalies_of(parts).unwrap();
        flagged += out.num_rows();
        got.push(out);
    }
    assert!(flagged > 20, "the fixture must flag something: {flagged}");
    let schema = healer_operators::schema::anomaly_schema();
    assert_eq!(
        arrow::compute::concat_batches(&schema, &got).unwrap(),
        arrow::compute::concat_batches(&schema, &expected).unwrap()
    );
}

#[test]
fn rules_that_mix_metrics_are_not_separable() {
    let input = data(1, 10, 2, 1);
    let window = |partition: &str, metric: &str| {
        format!(
            "CREATE VIEW r AS SELECT ts, resource, {metric} AS metric, value, \
             AVG(value) OVER (PARTITION BY {partition} ORDER BY ts ROWS BETWEEN 9 PRECEDING AND CURRENT ROW) AS score \
             FROM samples;"
        )
    };
    let separable = |sql: &str| compile(input.schema(), sql)[0].metric_separable;
    assert!(separable(&window("resource, metric", "metric")));
    // One window over every metric of a resource.
    assert!(!separable(&window("resource", "metric")));
    // A derived column that merely has the name.
    let derived = "CREATE VIEW r AS WITH x AS (SELECT ts, resource, CASE WHEN metric = 'm0' THEN 'a' ELSE 'b' END AS metric, value FROM samples) \
        SELECT ts, resource, metric, value, \
        AVG(value) OVER (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 9 PRECEDING AND CURRENT ROW) AS score FROM x;";
    assert!(!separable(derived));
    // The wide stream.
    let wide = "CREATE VIEW r AS SELECT ts, resource, 'm0' AS metric, m0 AS value, m0 AS score FROM metrics;";
    assert!(!separable(wide));
}
