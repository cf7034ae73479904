//! Helpers shared by the rule tests.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::Float64Type;
use healer_sql::CompiledRule;

/// Runs `rule` over `input` in batches of `chunk` rows; at row `checkpoint` (if any) the state
/// is saved and restored into a fresh instance, as a restart from a checkpoint does.
pub fn run(
    rule: &Arc<CompiledRule>,
    input: &RecordBatch,
    chunk: usize,
    checkpoint: Option<usize>,
) -> RecordBatch {
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
        out.push(instance.process(input.slice(offset, len)).unwrap());
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
