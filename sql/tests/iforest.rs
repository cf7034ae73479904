//! `iforest_score` and friends in rules: a model file trained here, scored by a rule,
//! checked against the forest called directly; feature checks at load; reload on change.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use healer_operators::iforest::ForestConfig;
use healer_operators::iforest_model::IforestModel;
use healer_operators::schema::ts_type;
use healer_sql::RuleCompiler;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ts", ts_type(), false),
        Field::new("resource", DataType::Utf8, false),
        Field::new("cpu_percent", DataType::Float64, true),
        Field::new("memory_percent", DataType::Float64, true),
    ]))
}

/// Correlated cpu/memory with a few rows that break the correlation.
fn batch(rows: usize, seed: u64) -> RecordBatch {
    let mut state = seed | 1;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let (mut cpu, mut mem) = (Vec::new(), Vec::new());
    for i in 0..rows {
        let c = 20.0 + 60.0 * next();
        cpu.push(Some(c));
        mem.push(if i % 97 == 50 {
            Some(95.0 - c)
        } else {
            Some(c * 0.8 + 5.0 * next())
        });
    }
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    (0..rows as i64).map(|i| i * 1000).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(
                (0..rows).map(|i| format!("r{}", i % 3)).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(cpu)),
            Arc::new(Float64Array::from(mem)),
        ],
    )
    .unwrap()
}

fn train(data: &RecordBatch, seed: u64, path: &Path) -> IforestModel {
    let cols: Vec<&[f64]> = (2..4)
        .map(|i| &data.column(i).as_primitive::<Float64Type>().values()[..])
        .collect();
    let config = ForestConfig {
        seed,
        ..ForestConfig::default()
    };
    let model = IforestModel::train(
        vec!["cpu_percent".into(), "memory_percent".into()],
        &cols,
        &config,
        vec!["test".into()],
    )
    .unwrap();
    std::fs::write(path, model.to_json()).unwrap();
    model
}

fn rule(model: &Path, features: &str) -> String {
    let m = model.display();
    format!(
        "CREATE VIEW iforest AS
         WITH scored AS (
             SELECT ts, resource, cpu_percent, iforest_score('{m}', {features}) AS score FROM metrics
         )
         SELECT ts, resource, 'vector' AS metric, cpu_percent AS value, score,
                iforest_severity('{m}', score) AS severity,
                iforest_confidence('{m}', score) AS confidence
         FROM scored
         WHERE score > iforest_threshold('{m}');"
    )
}

#[test]
fn rule_scores_match_the_forest_and_features_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vector.json");
    let data = batch(5000, 3);
    let model = train(&data, 1, &path);
    let compiler = RuleCompiler::try_new(schema()).unwrap();
    let rules = compiler
        .compile_str(
            Path::new("r.sql"),
            &rule(&path, "cpu_percent, memory_percent"),
        )
        .unwrap();
    let mut instance = rules[0].instantiate().unwrap();
    let out = instance.anomalies(data.clone()).unwrap();

    let cols: Vec<&[f64]> = (2..4)
        .map(|i| &data.column(i).as_primitive::<Float64Type>().values()[..])
        .collect();
    let mut scores = vec![0.0; data.num_rows()];
    model.forest.score_columns(&cols, &mut scores).unwrap();
    let want: Vec<f64> = scores
        .iter()
        .copied()
        .filter(|&s| s > model.threshold())
        .collect();
    let got = out
        .column_by_name("score")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert!(!want.is_empty());
    assert_eq!(
        got.values().to_vec(),
        want,
        "the rule flags exactly the forest's outliers"
    );
    let conf = out
        .column_by_name("confidence")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert!(conf.iter().all(|c| c.unwrap() >= 0.98));
    let sev = out.column_by_name("severity").unwrap().as_string::<i32>();
    assert!(
        sev.iter()
            .all(|s| matches!(s, Some("MEDIUM" | "HIGH" | "CRITICAL")))
    );

    // Wrong order, wrong count, missing file, non-literal path: rejected at load.
    let bad = |sql: String| {
        compiler
            .compile_str(Path::new("r.sql"), &sql)
            .unwrap_err()
            .to_string()
    };
    let e = bad(rule(&path, "memory_percent, cpu_percent"));
    assert!(e.contains("feature 1 is `memory_percent`"), "{e}");
    assert!(e.starts_with("r.sql:"), "{e}");
    let e = bad(rule(&path, "cpu_percent"));
    assert!(e.contains("takes 2 features"), "{e}");
    let e = bad(rule(
        &dir.path().join("nope.json"),
        "cpu_percent, memory_percent",
    ));
    assert!(e.contains("cannot read model"), "{e}");
    let e = bad(
        "CREATE VIEW r AS SELECT ts, resource, 'v' AS metric, cpu_percent AS value, \
                 iforest_score(resource, cpu_percent, memory_percent) AS score FROM metrics;"
            .into(),
    );
    assert!(e.contains("string literal"), "{e}");
}

#[test]
fn a_retrained_model_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vector.json");
    let data = batch(3000, 5);
    let first = train(&data, 1, &path);
    let compiler = RuleCompiler::try_new(schema()).unwrap();
    let sql = format!(
        "CREATE VIEW s AS SELECT ts, resource, 'v' AS metric, cpu_percent AS value, \
         iforest_score('{}', cpu_percent, memory_percent) AS score FROM metrics;",
        path.display()
    );
    let rules = compiler.compile_str(Path::new("s.sql"), &sql).unwrap();
    let mut instance = rules[0].instantiate().unwrap();
    let score = |i: &mut healer_sql::RuleInstance| {
        i.anomalies(data.slice(0, 200))
            .unwrap()
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float64Type>()
            .values()
            .to_vec()
    };
    let before = score(&mut instance);
    let mut direct = vec![0.0; 200];
    let cols: Vec<&[f64]> = (2..4)
        .map(|i| &data.column(i).as_primitive::<Float64Type>().values()[..200])
        .collect();
    first.forest.score_columns(&cols, &mut direct).unwrap();
    assert_eq!(before, direct);
    // Retrain with another seed, as `healer train` does: write aside, rename over.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = train(&data, 2, &dir.path().join("next.json"));
    std::fs::rename(dir.path().join("next.json"), &path).unwrap();
    second.forest.score_columns(&cols, &mut direct).unwrap();
    assert_ne!(before, direct);
    assert_eq!(
        score(&mut instance),
        direct,
        "scores come from the new model"
    );
}
