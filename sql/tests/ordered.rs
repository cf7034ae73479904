//! Window functions that keep their frame's values (`MEDIAN`, `PERCENTILE_CONT`,
//! `FIRST_VALUE`) agree with DataFusion's own evaluation of the same query, are rejected
//! where they cannot run, and carry the bundled novelty rule.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use healer_operators::unpivot::Unpivot;
use healer_operators::window::Frame;
use healer_sql::stage::StageTemplate;
use healer_sql::{CompiledRule, RuleCompiler};

mod common;
use common::{anomalies, assert_same_anomalies, cpu_batch, f64s, run, schema};

const NOVELTY: &str = include_str!("../rules/novelty.sql");
const NOVELTY_TIME_LAGS: &str = include_str!("../examples/novelty_time_lags.sql");

/// A deterministic uniform in [-0.5, 0.5).
fn noise(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64) - 0.5
    }
}

/// `resources` series of `rows` samples, one a minute, from `value(resource, t)` (`None` is
/// NULL).
fn series(
    resources: usize,
    rows: i64,
    value: impl FnMut(usize, i64) -> Option<f64>,
) -> RecordBatch {
    series_every(60_000, resources, rows, value)
}

/// [`series`] with one sample every `step_ms`.
fn series_every(
    step_ms: i64,
    resources: usize,
    rows: i64,
    mut value: impl FnMut(usize, i64) -> Option<f64>,
) -> RecordBatch {
    let (mut ts, mut res, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..rows {
        for r in 0..resources {
            ts.push(1_700_000_000_000 + t * step_ms);
            res.push(format!("host-{r}"));
            cpu.push(value(r, t));
        }
    }
    cpu_batch(ts, res, cpu)
}

fn compile(compiler: RuleCompiler, sql: &str) -> Arc<CompiledRule> {
    compiler
        .compile_str(Path::new("ordered.sql"), sql)
        .unwrap_or_else(|e| panic!("{e}"))
        .remove(0)
}

/// `query` over the `metrics` table compiled as a rule (no output contract), and DataFusion's
/// own result of it over `input`, ordered by time and resource.
fn rule_and_reference(query: &str, input: &RecordBatch) -> (Arc<CompiledRule>, RecordBatch) {
    let rule = compile(
        RuleCompiler::try_new(schema())
            .unwrap()
            .without_output_contract(),
        &format!("CREATE VIEW q AS {query}"),
    );
    let ctx = SessionContext::new();
    let table = MemTable::try_new(schema(), vec![vec![input.clone()]]).unwrap();
    ctx.register_table("metrics", Arc::new(table)).unwrap();
    let reference = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(async {
            let sql = format!("SELECT * FROM ({query}) ORDER BY ts, resource");
            ctx.sql(&sql).await.unwrap().collect().await.unwrap()
        });
    let reference = concat_batches(&reference[0].schema(), &reference).unwrap();
    (rule, reference)
}

#[test]
fn ordered_functions_agree_with_datafusion() {
    // Integers, so that the frames hold ties; NULLs, so that frames hold missing rows.
    let mut u = noise(7);
    let input = series(3, 300, |r, t| {
        let v = (u() * 20.0).round() + r as f64;
        (t % 17 != 5).then_some(v)
    });
    let query = "SELECT ts, resource, cpu_percent, \
           median(cpu_percent) OVER w AS med, \
           percentile_cont(cpu_percent, 0.9) OVER w AS p90, \
           quantile_cont(cpu_percent, 0.999) OVER w AS p999, \
           first_value(cpu_percent) OVER w AS first, \
           percentile_cont(cpu_percent, 0.25) OVER (PARTITION BY resource ORDER BY ts \
             ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS p25_short \
         FROM metrics \
         WINDOW w AS (PARTITION BY resource ORDER BY ts ROWS BETWEEN 40 PRECEDING AND CURRENT ROW)";
    let (rule, reference) = rule_and_reference(query, &input);
    // Any batching, and a restart from a checkpoint, which rebuilds the sorted values.
    for (chunk, checkpoint) in [(1, Some(450)), (7, None), (64, Some(384)), (900, None)] {
        let healer = run(&rule, &input, chunk, checkpoint);
        assert_eq!(healer.num_rows(), reference.num_rows());
        for column in ["med", "p90", "p999", "first", "p25_short"] {
            let (a, b) = (f64s(&healer, column), f64s(&reference, column));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let same = match (x, y) {
                    // DataFusion rounds the interpolation fraction to 1e-6 (its
                    // INTERPOLATION_PRECISION); healer interpolates exactly. Values span < 25.
                    (Some(x), Some(y)) => (x - y).abs() <= 25e-6,
                    (x, y) => x == y,
                };
                assert!(
                    same,
                    "{column} row {i}, batches of {chunk}, checkpoint {checkpoint:?}: {x:?} vs {y:?}"
                );
            }
        }
    }
}

#[test]
fn extremes_over_several_frames_run_as_one_operator_and_agree_with_datafusion() {
    let mut u = noise(5);
    let input = series(3, 400, |r, t| {
        let v = (u() * 50.0).round() + if r == 1 && t > 200 { 30.0 } else { 0.0 };
        (t % 23 != 7 && !(r == 2 && (100..160).contains(&t))).then_some(v)
    });
    let frame = |rows: usize| {
        format!("(PARTITION BY resource ORDER BY ts ROWS BETWEEN {rows} PRECEDING AND CURRENT ROW)")
    };
    let query = format!(
        "SELECT ts, resource, cpu_percent, \
           max(cpu_percent) OVER {} AS max1, \
           max(cpu_percent) OVER {} AS max3, \
           min(cpu_percent) OVER {} AS min5, \
           max(cpu_percent + 1) OVER {} AS max10, \
           max(cpu_percent) OVER {} AS max50, \
           min(cpu_percent) OVER {} AS min50, \
           CAST(count(cpu_percent) OVER {} AS DOUBLE) AS n10, \
           max(cpu_percent) OVER (PARTITION BY resource ORDER BY ts \
             RANGE BETWEEN INTERVAL '7 minutes' PRECEDING AND CURRENT ROW) AS max_7m \
         FROM metrics",
        frame(0),
        frame(2),
        frame(4),
        frame(9),
        frame(49),
        frame(49),
        frame(9)
    );
    let (rule, reference) = rule_and_reference(&query, &input);
    // The MIN/MAX over `ROWS` run as one operator over the longest frame, except the MAX
    // that shares its frame with the COUNT: that window keeps its own operator (the plain
    // path's running sums), as does the RANGE frame.
    let groups: Vec<(Frame, usize)> = rule
        .stages
        .iter()
        .flat_map(|stage| match stage.as_ref() {
            StageTemplate::Window { groups, .. } => groups
                .iter()
                .map(|g| (g.frame, g.aggregates.len()))
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(
        groups,
        [
            (Frame::Rows { preceding: 49 }, 5),
            (Frame::Rows { preceding: 9 }, 2),
            (
                Frame::Range {
                    preceding_ms: 420_000
                },
                1
            )
        ],
    );
    for (chunk, checkpoint) in [(1, Some(500)), (7, None), (64, Some(384)), (1_200, None)] {
        let healer = run(&rule, &input, chunk, checkpoint);
        for column in [
            "max1", "max3", "min5", "max10", "max50", "min50", "n10", "max_7m",
        ] {
            assert_eq!(
                f64s(&healer, column),
                f64s(&reference, column),
                "{column}, batches of {chunk}, checkpoint {checkpoint:?}"
            );
        }
    }
}

#[test]
fn range_frames_agree_with_datafusion() {
    // Irregular sampling (gaps of one to several minutes, different per resource), integer
    // values with ties and NULLs, so that a 5-minute frame holds 1 to 6 rows.
    let mut u = noise(11);
    let (mut ts, mut res, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..400i64 {
        for r in 0..3usize {
            if (t + r as i64) % 7 == 3 || (t * (r as i64 + 1)) % 11 == 0 {
                continue;
            }
            ts.push(1_700_000_000_000 + t * 60_000);
            res.push(format!("host-{r}"));
            let v = (u() * 20.0).round() + r as f64;
            cpu.push((t % 13 != 5).then_some(v));
        }
    }
    let input = cpu_batch(ts, res, cpu);
    let query = "SELECT ts, resource, cpu_percent, \
           avg(cpu_percent) OVER w AS avg, \
           count(cpu_percent) OVER w AS n, \
           stddev(cpu_percent) OVER w AS sd, \
           min(cpu_percent) OVER w AS lo, \
           max(cpu_percent) OVER w AS hi, \
           median(cpu_percent) OVER w AS med, \
           percentile_cont(cpu_percent, 0.9) OVER w AS p90, \
           first_value(cpu_percent) OVER w AS first, \
           sum(cpu_percent) OVER (PARTITION BY resource ORDER BY ts) AS running, \
           count(1) OVER (PARTITION BY resource ORDER BY ts \
             RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS hour_rows \
         FROM metrics \
         WINDOW w AS (PARTITION BY resource ORDER BY ts \
           RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW)";
    let (rule, reference) = rule_and_reference(query, &input);
    for (chunk, checkpoint) in [(1, Some(301)), (5, None), (64, Some(512)), (2000, None)] {
        let healer = run(&rule, &input, chunk, checkpoint);
        assert_eq!(healer.num_rows(), reference.num_rows());
        for column in [
            "avg",
            "n",
            "sd",
            "lo",
            "hi",
            "med",
            "p90",
            "first",
            "running",
            "hour_rows",
        ] {
            let (a, b) = (numbers(&healer, column), numbers(&reference, column));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let same = match (x, y) {
                    (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0) + 25e-6,
                    (x, y) => x == y,
                };
                assert!(
                    same,
                    "{column} row {i}, batches of {chunk}, checkpoint {checkpoint:?}: {x:?} vs {y:?}"
                );
            }
        }
    }
}

/// A numeric column as `f64`s (counts are integers).
fn numbers(batch: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let column = batch.column_by_name(name).unwrap();
    let column = arrow::compute::cast(column, &arrow::datatypes::DataType::Float64).unwrap();
    let column = column.as_primitive::<arrow::datatypes::Float64Type>();
    column.iter().collect()
}

/// The novelty rule over `input` (one metric, `cpu_percent`): (row of the series, confidence)
/// of every anomaly of resource `host-0`.
fn novelty(input: &RecordBatch) -> Vec<(usize, f64)> {
    novelty_scored(input)
        .into_iter()
        .map(|(row, _, confidence)| (row, confidence))
        .collect()
}

/// [`novelty`] with each anomaly's score (its ratio): (row, score, confidence).
fn novelty_scored(input: &RecordBatch) -> Vec<(usize, f64, f64)> {
    let rule = compile(RuleCompiler::try_new(schema()).unwrap(), NOVELTY);
    let mut instance = rule.instantiate().unwrap();
    let samples = Unpivot::try_new(&input.schema())
        .unwrap()
        .apply(input)
        .unwrap();
    let out = instance.anomalies(samples).unwrap();
    let start = input
        .column_by_name("ts")
        .unwrap()
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
        .value(0);
    let ts = out
        .column_by_name("ts")
        .unwrap()
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    let resource = out.column_by_name("resource").unwrap().as_string::<i32>();
    let score = f64s(&out, "score");
    let confidence = f64s(&out, "confidence");
    (0..out.num_rows())
        .filter(|&i| resource.value(i) == "host-0")
        .map(|i| {
            let row = ((ts.value(i) - start) / 60_000) as usize;
            (row, score[i].unwrap(), confidence[i].unwrap())
        })
        .collect()
}

#[test]
fn novelty_flags_a_spike_and_a_shift_at_once_and_little_else() {
    // Heavy-tailed noise (a cube of a uniform, ±5) around a daily cycle (±10); a spike at row
    // 3,000 and, at row 5,000, a level shift beyond the range of cycle and noise.
    let mut u = noise(11);
    let input = series(2, 7_000, |_, t| {
        let e = u();
        let daily = 10.0 * (t as f64 * std::f64::consts::TAU / 1_440.0).sin();
        let mut v = 50.0 + daily + 40.0 * e * e * e;
        if t == 3_000 {
            v += 30.0;
        }
        if t >= 5_000 {
            v += 25.0;
        }
        Some(v)
    });
    let flags = novelty(&input);
    assert!(flags.iter().all(|&(row, _)| row >= 299), "{flags:?}");
    let near = |at: usize| {
        flags
            .iter()
            .filter(|&&(r, _)| (at..at + 100).contains(&r))
            .count()
    };
    assert_eq!(near(3_000), 1, "{flags:?}");
    assert!(
        flags.iter().any(|&(r, c)| r == 3_000 && c > 0.8),
        "{flags:?}"
    );
    // The shift is flagged on its first row; later rows only while its ratio still grows.
    assert!((1..=3).contains(&near(5_000)), "{flags:?}");
    assert!(
        flags.iter().any(|&(r, c)| r == 5_000 && c >= 0.8),
        "{flags:?}"
    );
    // Elsewhere the rule flags about one sample in a thousand, at most one per 100 rows.
    let others = flags.len() - near(3_000) - near(5_000);
    assert!(others <= 20, "{others} other flags: {flags:?}");
}

#[test]
fn novelty_does_not_flag_a_past_spike_again_a_day_or_a_week_later() {
    // A cycle of 288 rows (the rule's day) with light noise, and one spike at row 2,500. The
    // day and week lags compare a sample with the one 288 and 2,016 rows back; at rows 2,788
    // and 4,516 that sample is the spike, while the series itself is back to normal.
    let mut u = noise(5);
    let input = series(1, 5_000, |_, t| {
        let daily = 10.0 * (t as f64 * std::f64::consts::TAU / 288.0).sin();
        let mut v = 50.0 + daily + 4.0 * u();
        if t == 2_500 {
            v += 40.0;
        }
        Some(v)
    });
    let flags = novelty(&input);
    assert!(
        flags.iter().any(|&(r, c)| r == 2_500 && c > 0.8),
        "{flags:?}"
    );
    for echo in [2_788, 4_516] {
        assert!(
            flags.iter().all(|&(r, _)| r.abs_diff(echo) > 3),
            "echo at {echo}: {flags:?}"
        );
    }
}

#[test]
fn novelty_is_more_confident_of_a_record_than_of_a_burst_s_second_peak() {
    // Light noise, then two spikes 150 rows apart: the second, half the first, is the largest
    // ratio of its last 100 rows, so it is reported, but not of its last 300.
    let mut u = noise(9);
    let input = series(1, 3_400, |_, t| {
        let mut v = 50.0 + u();
        if t == 3_000 {
            v += 20.0;
        }
        if t == 3_150 {
            v += 10.0;
        }
        Some(v)
    });
    let flags = novelty_scored(&input);
    let at = |row: usize| {
        flags
            .iter()
            .find(|&&(r, _, _)| r == row)
            .copied()
            .unwrap_or_else(|| panic!("no anomaly at row {row}: {flags:?}"))
    };
    let confidence = |surprise: f64| surprise / (surprise + 0.25);
    // The first spike is the largest ratio of the whole history: ×(1 + 0.02 ln 60).
    let (_, ratio, c) = at(3_000);
    assert!(ratio > 10.0, "{flags:?}");
    assert!(
        (c - confidence(ratio * (1.0 + 0.02 * 60f64.ln()))).abs() < 1e-6,
        "{flags:?}"
    );
    // The second is within 300 rows of a larger ratio: the confidence is the ratio's own.
    let (_, ratio, c) = at(3_150);
    assert!(ratio > 1.0, "{flags:?}");
    assert!((c - confidence(ratio)).abs() < 1e-12, "{flags:?}");
}

#[test]
fn time_lags_give_the_row_lags_rows_at_five_minute_sampling() {
    // Two series every 5 minutes, a daily cycle (288 rows), light noise, a spike, a break of
    // the cycle within its range and a level shift: the day and week lags in time are the
    // samples 288 and 2,016 rows back, so the example flags exactly what the bundled rule does.
    let mut u = noise(17);
    let input = series_every(300_000, 2, 6_000, |r, t| {
        let daily = 10.0 * (t as f64 * std::f64::consts::TAU / 288.0).sin();
        let mut v = 50.0 + daily + 2.0 * u();
        if r == 0 && t == 2_600 {
            v += 30.0;
        }
        if r == 1 && (3_500..3_560).contains(&t) {
            v -= 2.0 * daily;
        }
        if r == 1 && t >= 5_000 {
            v += 25.0;
        }
        Some(v)
    });
    let rows = anomalies(NOVELTY, &input);
    let time = anomalies(NOVELTY_TIME_LAGS, &input);
    // The break of the cycle is flagged (by a lag: it stays within the series' range).
    let ts = rows
        .column_by_name("ts")
        .unwrap()
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    let resource = rows.column_by_name("resource").unwrap().as_string::<i32>();
    let in_break = |i: usize| {
        let t = (ts.value(i) - 1_700_000_000_000) / 300_000;
        resource.value(i) == "host-1" && (3_500..3_560).contains(&t)
    };
    assert!((0..rows.num_rows()).any(in_break), "{rows:?}");
    assert_same_anomalies(
        &time,
        &rows,
        &["ts", "resource", "metric", "score", "confidence"],
    );
    // Sampled every minute, the same values put the time lags 1,440 and 10,080 rows back:
    // the two rules see different baselines and do not flag the same rows.
    let mut u = noise(17);
    let minutes = series_every(60_000, 1, 6_000, |_, t| {
        let daily = 10.0 * (t as f64 * std::f64::consts::TAU / 288.0).sin();
        Some(50.0 + daily + 2.0 * u() + if t >= 3_000 { 2.0 * daily } else { 0.0 })
    });
    assert_ne!(
        anomalies(NOVELTY, &minutes).column_by_name("ts").unwrap(),
        anomalies(NOVELTY_TIME_LAGS, &minutes)
            .column_by_name("ts")
            .unwrap(),
    );
}
