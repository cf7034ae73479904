//! The LSTM forecaster inside rules: `lstm_forecast` / `lstm_residual` give the same rows
//! whatever the batching and across a checkpoint, agree with DataFusion's own evaluation of the
//! same query, and feed fusion. Runs on the process's backend (`HEALER_ONNXRUNTIME`: native
//! under `.ci/test`, tract without it).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use healer_sql::forecast::ForecasterRegistry;
use healer_sql::models::ModelRegistry;
use healer_sql::{CompiledRule, RuleCompiler};

mod common;
use common::{anomalies, assert_same_anomalies, cpu_batch, f64s, run, schema};

fn model_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/lstm")
        .display()
        .to_string()
}

/// Three resources, 420 samples each: daily-like cycles with noise, a spike, a level shift
/// and a few NULLs.
fn data() -> RecordBatch {
    let mut state = 0x5eed_u64;
    let mut noise = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64) - 0.5
    };
    let (mut ts, mut res, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..420i64 {
        for r in 0..3 {
            ts.push(1_700_000_000_000 + t * 60_000);
            res.push(format!("host-{r}"));
            let base = 40.0 + 10.0 * r as f64 + 15.0 * (t as f64 / (12.0 + r as f64)).sin();
            let mut v = base + 2.0 * noise();
            if r == 1 && t == 350 {
                v += 60.0;
            }
            if r == 2 && t >= 380 {
                v += 80.0;
            }
            cpu.push((!(r == 0 && (100..103).contains(&t))).then_some(v));
        }
    }
    cpu_batch(ts, res, cpu)
}

fn query(frame: usize) -> String {
    let m = model_dir();
    format!(
        "SELECT ts, resource, cpu_percent, \
           lstm_forecast('{m}', cpu_percent) OVER w AS forecast, \
           lstm_residual('{m}', cpu_percent) OVER w AS residual, \
           avg(cpu_percent) OVER w AS mean \
         FROM metrics \
         WINDOW w AS (PARTITION BY resource ORDER BY ts ROWS BETWEEN {frame} PRECEDING AND CURRENT ROW)"
    )
}

fn compile(sql: &str) -> Arc<CompiledRule> {
    RuleCompiler::try_new(schema())
        .unwrap()
        .without_output_contract()
        .compile_str(Path::new("lstm.sql"), sql)
        .unwrap_or_else(|e| panic!("{e}"))
        .remove(0)
}

#[test]
fn forecasts_do_not_depend_on_batching_or_checkpoints() {
    let rule = compile(&format!("CREATE VIEW f AS {}", query(60)));
    let input = data();
    let whole = run(&rule, &input, input.num_rows(), None);
    let forecast = f64s(&whole, "forecast");
    // 3 series × (420 − 60) rows have 60 earlier rows; the 62 of host-0 whose 60 earlier
    // rows hold one of its NULLs (t = 100..=102) have no forecast: t = 101..=162.
    let present = forecast.iter().flatten().count();
    assert_eq!(present, 3 * 360 - 62, "forecasts present");
    for (chunk, checkpoint) in [(1, Some(600)), (7, None), (64, Some(384)), (333, Some(333))] {
        let got = run(&rule, &input, chunk, checkpoint);
        for column in ["forecast", "residual", "mean"] {
            assert_eq!(
                f64s(&got, column),
                f64s(&whole, column),
                "{column}, batches of {chunk}, checkpoint {checkpoint:?}"
            );
        }
    }
}

#[test]
fn healer_agrees_with_datafusions_own_evaluation() {
    let input = data();
    let rule = compile(&format!("CREATE VIEW f AS {}", query(60)));
    let healer = run(&rule, &input, 50, None);

    // The same query executed by DataFusion, frame by frame, through the registered functions.
    let ctx = SessionContext::new();
    healer_sql::functions::register_all(
        &ctx,
        &Arc::new(ModelRegistry::new()),
        &Arc::new(ForecasterRegistry::new()),
    );
    let table = MemTable::try_new(schema(), vec![vec![input.clone()]]).unwrap();
    ctx.register_table("metrics", Arc::new(table)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let batches = runtime.block_on(async {
        let sql = format!("SELECT * FROM ({}) ORDER BY ts, resource", query(60));
        ctx.sql(&sql).await.unwrap().collect().await.unwrap()
    });
    let reference = concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(reference.num_rows(), healer.num_rows());
    // healer's rows are in input order, which is (ts, resource) order here.
    for column in ["forecast", "residual"] {
        let (a, b) = (f64s(&healer, column), f64s(&reference, column));
        let mut compared = 0;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            match (x, y) {
                (Some(x), Some(y)) => {
                    // Same windows, different batch positions inside the fixed batch of 64.
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                        "{column} row {i}: {x} vs {y}"
                    );
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("{column} row {i}: {x:?} vs {y:?}"),
            }
        }
        assert!(compared > 400, "{column}: {compared} rows compared");
    }
    // The forecaster follows the cycle far better than the window mean does.
    let cpu = f64s(&healer, "cpu_percent");
    let (forecast, mean) = (f64s(&healer, "forecast"), f64s(&healer, "mean"));
    let (mut err_f, mut err_m) = (0.0, 0.0);
    for i in 0..cpu.len() {
        if let (Some(x), Some(f), Some(m)) = (cpu[i], forecast[i], mean[i]) {
            err_f += (x - f).abs();
            err_m += (x - m).abs();
        }
    }
    assert!(
        err_f < 0.5 * err_m,
        "forecast error {err_f}, window-mean error {err_m}"
    );
}

#[test]
fn fused_rule_flags_the_injected_faults() {
    let sql =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fused.sql"))
            .unwrap()
            .replace("'models/lstm'", &format!("'{}'", model_dir()));
    let out = anomalies(&sql, &data());
    let confidence = f64s(&out, "confidence");
    let flagged = flagged(&out);
    assert!(
        confidence.iter().all(|c| c.is_some_and(|c| c >= 0.8)),
        "{confidence:?}"
    );
    // The spike and the level shift, and nothing in the quiet series.
    assert!(flagged.contains(&("host-1".into(), 350)), "{flagged:?}");
    assert!(flagged.contains(&("host-2".into(), 380)), "{flagged:?}");
    assert!(!flagged.iter().any(|(r, _)| r == "host-0"), "{flagged:?}");
}

/// The flagged (resource, minute) pairs of anomaly rows over [`data`].
fn flagged(out: &RecordBatch) -> Vec<(String, i64)> {
    let ts = out
        .column_by_name("ts")
        .unwrap()
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    let resource = out.column_by_name("resource").unwrap().as_string::<i32>();
    (0..out.num_rows())
        .map(|i| {
            let minute = (ts.value(i) - 1_700_000_000_000) / 60_000;
            (resource.value(i).to_string(), minute)
        })
        .collect()
}

#[test]
fn novelty_lstm_example_is_the_bundled_rule_plus_one_deviation() {
    // The example is a copy of `rules/novelty.sql` with the LSTM's residual added as a fifth
    // deviation. With that residual replaced by zero its ratio is NULL (a zero percentile),
    // which `greatest` skips, so the copy must give exactly the bundled rule's rows: any other
    // step of the bundled rule changed without the example fails here.
    let bundled = include_str!("../rules/novelty.sql");
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/novelty_lstm.sql"),
    )
    .unwrap();
    let residual = "lstm_residual('models/lstm', value) OVER f";
    assert_eq!(
        example.matches(residual).count(),
        1,
        "the example's residual"
    );
    let input = data();
    let without = anomalies(&example.replace(residual, "CAST(0 AS DOUBLE)"), &input);
    let reference = anomalies(bundled, &input);
    assert!(reference.num_rows() > 0);
    assert_same_anomalies(
        &without,
        &reference,
        &[
            "ts",
            "resource",
            "metric",
            "score",
            "severity",
            "confidence",
        ],
    );
    // With its model, the example runs and still flags the spike and the level shift.
    let with = anomalies(
        &example.replace("'models/lstm'", &format!("'{}'", model_dir())),
        &input,
    );
    let with = flagged(&with);
    assert!(with.contains(&("host-1".into(), 350)), "{with:?}");
    assert!(with.contains(&("host-2".into(), 380)), "{with:?}");
}

#[test]
fn frames_and_models_are_checked_at_load() {
    let compiler = RuleCompiler::try_new(schema())
        .unwrap()
        .without_output_contract();
    let err = compiler
        .compile_str(
            Path::new("r.sql"),
            &format!("CREATE VIEW f AS {}", query(59)),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ROWS BETWEEN 60 PRECEDING AND CURRENT ROW"),
        "{err}"
    );
    let missing = query(60).replace(&model_dir(), "/nonexistent/model");
    let err = compiler
        .compile_str(Path::new("r.sql"), &format!("CREATE VIEW f AS {missing}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/model"), "{err}");
    let err = compiler
        .compile_str(
            Path::new("r.sql"),
            "CREATE VIEW f AS SELECT ts, resource, lstm_forecast(cpu_percent, cpu_percent) \
             OVER (PARTITION BY resource ORDER BY ts ROWS BETWEEN 60 PRECEDING AND CURRENT ROW) \
             AS f FROM metrics",
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("string literal"), "{err}");
}

#[test]
fn a_changed_model_is_reloaded() {
    // A copy of the model in a scratch directory; the rule reads it there.
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/lstm");
    for f in ["manifest.json", "forecaster.onnx"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let m = dir.path().display().to_string();
    let sql = query(60).replace(&model_dir(), &m);
    let rule = compile(&format!("CREATE VIEW f AS {sql}"));
    let input = data();
    let mut instance = rule.instantiate().unwrap();
    let before = f64s(&instance.process(input.clone()).unwrap(), "forecast");

    // "Retrain": the same network with another scale floor, written and renamed over.
    let manifest = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    let changed = manifest.replace("\"eps_rel\": 0.001", "\"eps_rel\": 0.5");
    assert_ne!(changed, manifest);
    std::fs::write(dir.path().join("manifest.new"), changed).unwrap();
    std::fs::rename(
        dir.path().join("manifest.new"),
        dir.path().join("manifest.json"),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // A fresh instance of the same compiled rule now forecasts with the new floor, exactly as
    // a rule compiled against the new files does.
    let mut again = rule.instantiate().unwrap();
    let after = f64s(&again.process(input.clone()).unwrap(), "forecast");
    let fresh = compile(&format!("CREATE VIEW f AS {sql}"));
    let expected = f64s(
        &fresh.instantiate().unwrap().process(input).unwrap(),
        "forecast",
    );
    assert_ne!(after, before, "the reloaded model forecasts differently");
    assert_eq!(after, expected);
}
