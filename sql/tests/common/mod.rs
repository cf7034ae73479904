//! Helpers shared by the rule tests.

// Each test binary uses some of them.
#![allow(dead_code)]

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use healer_operators::schema::ts_type;
use healer_operators::unpivot::Unpivot;
use healer_sql::{CompiledRule, RuleCompiler, StreamTable};

/// The `metrics` stream of the tests: `ts`, `resource` and one metric, `cpu_percent`.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ts", ts_type(), false),
        Field::new("resource", DataType::Utf8, false),
        Field::new("cpu_percent", DataType::Float64, true),
    ]))
}

/// A batch of [`schema`] from its columns (`ts` in ms since the epoch).
pub fn cpu_batch(ts: Vec<i64>, res: Vec<String>, cpu: Vec<Option<f64>>) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
            Arc::new(StringArray::from(res)),
            Arc::new(Float64Array::from(cpu)),
        ],
    )
    .unwrap()
}

/// Runs `rule` over `input` (wide `metrics` rows, turned into the `samples` view when the
/// rule reads it) in batches of `chunk` rows; at row `checkpoint` (if any) the state is saved
/// and restored into a fresh instance, as a restart from a checkpoint does.
pub fn run(
    rule: &Arc<CompiledRule>,
    input: &RecordBatch,
    chunk: usize,
    checkpoint: Option<usize>,
) -> RecordBatch {
    let unpivot = Unpivot::try_new(&input.schema()).unwrap();
    let mut instance = rule.instantiate().unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < input.num_rows() {
        if checkpoint == Some(offset) {
            let state = instance.save();
            instance = rule.instantiate().unwrap();
            instance.restore(&state, &|_, _| true).unwrap();
        }
        let len = chunk.min(input.num_rows() - offset);
        let part = input.slice(offset, len);
        let part = match rule.table {
            StreamTable::Metrics => part,
            StreamTable::Samples => unpivot.apply(&part).unwrap(),
        };
        out.push(instance.process(part).unwrap());
        offset += len;
    }
    concat_batches(&out[0].schema(), &out).unwrap()
}

pub fn f64s(batch: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let a = batch
        .column_by_name(name)
        .unwrap()
        .as_primitive::<Float64Type>();
    (0..a.len())
        .map(|i| a.is_valid(i).then(|| a.value(i)))
        .collect()
}

/// The anomalies of the one rule in `sql` over `input`, given as the samples view.
pub fn anomalies(sql: &str, input: &RecordBatch) -> RecordBatch {
    let rules = RuleCompiler::try_new(schema())
        .unwrap()
        .compile_str(std::path::Path::new("rule.sql"), sql)
        .unwrap_or_else(|e| panic!("{e}"));
    let samples = Unpivot::try_new(&input.schema())
        .unwrap()
        .apply(input)
        .unwrap();
    rules[0].instantiate().unwrap().anomalies(samples).unwrap()
}

/// Asserts that anomaly batches `got` and `want` hold the same rows, compared on `columns`.
pub fn assert_same_anomalies(got: &RecordBatch, want: &RecordBatch, columns: &[&str]) {
    assert_eq!(got.num_rows(), want.num_rows());
    for column in columns {
        assert_eq!(
            got.column_by_name(column).unwrap(),
            want.column_by_name(column).unwrap(),
            "{column}"
        );
    }
}
