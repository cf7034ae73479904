//! The canonical order of anomaly rows: by `ts`, then `resource`, `metric` and `rule`
//! (strings compared byte by byte), rows equal on all four in the order they come.
//!
//! The incident log's bytes and file names depend only on its rows because every batch the
//! sink receives is in this order, whatever the number of workers that produced it.
//!
//! Rows are sorted by fixed-width keys: each string column is replaced by the rank of its
//! value among the distinct values of the batches (distinct values are few: resources,
//! metrics, rules), so the sort compares integers, never strings, and the rows are then
//! gathered from the input batches in one pass, without concatenating them first.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::compute::interleave_record_batch;
use arrow::datatypes::TimestampMillisecondType;
use arrow::error::ArrowError;

use crate::id::fnv1a64;
use crate::schema::{RESOURCE, TS};

/// Sorts the rows of `batches` (one schema, with the incident log's `ts`, `resource`,
/// `metric` and `rule` columns) into one batch in the canonical order.
///
/// Rows equal on the four columns keep their order: batch by batch, row by row.
pub fn canonical_order(batches: &[RecordBatch]) -> Result<RecordBatch, ArrowError> {
    let first = batches
        .first()
        .ok_or_else(|| ArrowError::InvalidArgumentError("no batch to order".into()))?;
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if u32::try_from(total).is_err() {
        return Err(ArrowError::InvalidArgumentError(format!(
            "{total} rows to order at once, more than 2^32"
        )));
    }
    let column = |name: &str| -> Result<Vec<&StringArray>, ArrowError> {
        batches
            .iter()
            .map(|b| {
                b.column_by_name(name)
                    .and_then(|c| c.as_string_opt::<i32>())
                    .ok_or_else(|| ArrowError::SchemaError(format!("no string column `{name}`")))
            })
            .collect()
    };
    let resource = ranks(&column(RESOURCE)?, total);
    let metric = ranks(&column("metric")?, total);
    let rule = ranks(&column("rule")?, total);
    let mut ts: Vec<&[i64]> = Vec::with_capacity(batches.len());
    for batch in batches {
        let column = batch
            .column_by_name(TS)
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
            .ok_or_else(|| ArrowError::SchemaError(format!("no millisecond `{TS}` column")))?;
        ts.push(column.values());
    }
    let ranks = [resource, metric, rule];
    let indices = match packed_order(&ts, &ranks, total) {
        Some(indices) => indices,
        None => wide_order(&ts, &ranks, total),
    };
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    if refs.len() == 1 && indices.iter().enumerate().all(|(i, &(_, r))| i == r) {
        return Ok(first.clone());
    }
    interleave_record_batch(&refs, &indices)
}

/// The rows' `(batch, row)` positions in the canonical order, sorting one `u64` per row when
/// every field of the key fits in one: `ts` minus the smallest `ts`, the three ranks and
/// the row's position among all rows (batch by batch), each in as many bits as its largest
/// value needs. A merge step spans about a batch of event time and a few thousand distinct
/// names, so this is the usual case; `None` when the fields need more than 63 bits.
fn packed_order(ts: &[&[i64]], ranks: &[Vec<u32>; 3], total: usize) -> Option<Vec<(usize, usize)>> {
    let all = || ts.iter().flat_map(|t| t.iter().copied());
    let (lo, hi) = (all().min()?, all().max()?);
    let bits = |largest: u64| u64::BITS - largest.leading_zeros();
    let span = u64::try_from(i128::from(hi) - i128::from(lo)).ok()?;
    let largest_rank = |r: &[u32]| r.iter().copied().max().map_or(0, u64::from);
    // Widths from the lowest field up: position, rule, metric, resource, ts.
    let widths = [
        bits(total.saturating_sub(1) as u64),
        bits(largest_rank(&ranks[2])),
        bits(largest_rank(&ranks[1])),
        bits(largest_rank(&ranks[0])),
        bits(span),
    ];
    if widths.iter().sum::<u32>() > 63 {
        return None;
    }
    let shift = |field: usize| widths[..field].iter().sum::<u32>();
    let (s_rule, s_metric, s_resource, s_ts) = (shift(1), shift(2), shift(3), shift(4));
    let mut positions: Vec<(usize, usize)> = Vec::with_capacity(total);
    let mut keys: Vec<u64> = Vec::with_capacity(total);
    for (b, t) in ts.iter().enumerate() {
        for (i, &t) in t.iter().enumerate() {
            let g = positions.len();
            positions.push((b, i));
            keys.push(
                ((t.wrapping_sub(lo) as u64) << s_ts)
                    | (u64::from(ranks[0][g]) << s_resource)
                    | (u64::from(ranks[1][g]) << s_metric)
                    | (u64::from(ranks[2][g]) << s_rule)
                    | g as u64,
            );
        }
    }
    // Keys are unique (the position is part of them), so an unstable sort is exact.
    keys.sort_unstable();
    let mask = (1u64 << s_rule) - 1;
    Some(
        keys.iter()
            .map(|k| positions[(k & mask) as usize])
            .collect(),
    )
}

/// [`packed_order`] for any keys: a struct per row, compared field by field.
fn wide_order(ts: &[&[i64]], ranks: &[Vec<u32>; 3], total: usize) -> Vec<(usize, usize)> {
    let mut keys: Vec<Key> = Vec::with_capacity(total);
    for (b, t) in ts.iter().enumerate() {
        for (i, &t) in t.iter().enumerate() {
            let g = keys.len();
            keys.push(Key {
                ts: t,
                ranks: [ranks[0][g], ranks[1][g], ranks[2][g]],
                batch: b as u32,
                row: i as u32,
            });
        }
    }
    // Keys are unique (batch and row are part of them), so an unstable sort is exact.
    keys.sort_unstable();
    keys.iter()
        .map(|k| (k.batch as usize, k.row as usize))
        .collect()
}

/// A row's sort key; the derived order compares the fields in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    ts: i64,
    ranks: [u32; 3],
    batch: u32,
    row: u32,
}

/// FNV-1a for the distinct values: short strings, a hash per row.
#[derive(Debug, Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = self.0.rotate_left(5) ^ fnv1a64(bytes);
    }
}

/// The rank of each row's value among the distinct values of `columns`, rows in batch
/// order. NULLs rank first (the incident log never has them in these columns).
fn ranks(columns: &[&StringArray], total: usize) -> Vec<u32> {
    let mut ids: HashMap<&str, u32, BuildHasherDefault<Fnv>> = HashMap::default();
    let mut distinct: Vec<Option<&str>> = vec![None];
    let mut out: Vec<u32> = Vec::with_capacity(total);
    for column in columns {
        // Runs of one value (a rule's batch, one metric's rows) are common: the previous
        // row's id is reused without a lookup.
        let mut last: Option<(&str, u32)> = None;
        for i in 0..column.len() {
            if column.is_null(i) {
                out.push(0);
                continue;
            }
            let v = column.value(i);
            let id = match last {
                Some((l, id)) if l == v => id,
                _ => {
                    let next = distinct.len() as u32;
                    let id = *ids.entry(v).or_insert_with(|| {
                        distinct.push(Some(v));
                        next
                    });
                    last = Some((v, id));
                    id
                }
            };
            out.push(id);
        }
    }
    let mut by_value: Vec<u32> = (0..distinct.len() as u32).collect();
    by_value.sort_unstable_by_key(|&id| distinct[id as usize]);
    let mut rank = vec![0u32; distinct.len()];
    for (r, &id) in by_value.iter().enumerate() {
        rank[id as usize] = r as u32;
    }
    for id in &mut out {
        *id = rank[*id as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float64Array, TimestampMillisecondArray};
    use arrow::compute::{concat_batches, take_record_batch};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use arrow::row::{RowConverter, SortField};
    use proptest::prelude::*;

    use super::*;

    fn batch(rows: &[(i64, Option<&str>, &str, &str, f64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(TS, DataType::Timestamp(TimeUnit::Millisecond, None), false),
            Field::new(RESOURCE, DataType::Utf8, true),
            Field::new("metric", DataType::Utf8, false),
            Field::new("rule", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| r.0),
            )),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.4))),
        ];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    /// The reference: concatenate, then a stable sort in arrow's row format.
    fn reference(batches: &[RecordBatch]) -> RecordBatch {
        let all = concat_batches(&batches[0].schema(), batches).unwrap();
        let columns: Vec<ArrayRef> = [TS, RESOURCE, "metric", "rule"]
            .iter()
            .map(|c| Arc::clone(all.column_by_name(c).unwrap()))
            .collect();
        let converter = RowConverter::new(
            columns
                .iter()
                .map(|c| SortField::new(c.data_type().clone()))
                .collect(),
        )
        .unwrap();
        let rows = converter.convert_columns(&columns).unwrap();
        let mut idx: Vec<u32> = (0..all.num_rows() as u32).collect();
        idx.sort_by(|&a, &b| rows.row(a as usize).cmp(&rows.row(b as usize)));
        take_record_batch(&all, &arrow::array::UInt32Array::from(idx)).unwrap()
    }

    #[test]
    fn orders_by_ts_then_the_strings_bytewise_and_keeps_ties_in_arrival_order() {
        let a = batch(&[
            (2, Some("web-10"), "cpu", "z", 1.0),
            (1, Some("web-9"), "mem", "z", 2.0),
            (1, Some("web-9"), "cpu", "z", 3.0),
        ]);
        let b = batch(&[
            (1, Some("web-10"), "cpu", "z", 4.0),
            (1, Some("web-9"), "cpu", "z", 5.0),
            (1, None, "cpu", "a", 6.0),
            (-5, Some("Web-9"), "cpu", "z", 7.0),
        ]);
        let out = canonical_order(&[a, b]).unwrap();
        let values: Vec<f64> = out
            .column(4)
            .as_primitive::<arrow::datatypes::Float64Type>()
            .values()
            .to_vec();
        // -5 first; at ts 1: NULL resource, then "web-10" < "web-9" (bytes), then the two
        // equal rows (web-9, cpu, z) in arrival order, then mem; ts 2 last.
        assert_eq!(values, vec![7.0, 6.0, 4.0, 3.0, 5.0, 2.0, 1.0]);
    }

    #[test]
    fn one_sorted_batch_comes_back_as_is_and_no_batch_is_an_error() {
        let a = batch(&[(1, Some("a"), "m", "r", 1.0), (2, Some("a"), "m", "r", 2.0)]);
        assert_eq!(canonical_order(std::slice::from_ref(&a)).unwrap(), a);
        assert!(canonical_order(&[]).is_err());
    }

    #[test]
    fn a_batch_without_the_columns_is_an_error() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let b = RecordBatch::try_new(
            schema,
            vec![Arc::new(arrow::array::Int32Array::from(vec![1])) as ArrayRef],
        )
        .unwrap();
        let err = canonical_order(&[b]).unwrap_err().to_string();
        assert!(err.contains("resource"), "{err}");
    }

    proptest! {
        #[test]
        fn matches_a_stable_sort_of_the_concatenation(
            pieces in prop::collection::vec(
                prop::collection::vec(
                    // Extreme times give keys too wide for one u64 (the struct path).
                    (
                        prop_oneof![8 => 0i64..4, 1 => Just(i64::MIN), 1 => Just(i64::MAX)],
                        prop::option::weighted(0.9, "[ab]{0,3}"),
                        "[xy]{1,2}",
                        "[rs]",
                        -1e3f64..1e3,
                    ),
                    0..20,
                ),
                1..5,
            ),
        ) {
            let batches: Vec<RecordBatch> = pieces
                .iter()
                .map(|rows| {
                    let rows: Vec<(i64, Option<&str>, &str, &str, f64)> = rows
                        .iter()
                        .map(|(t, r, m, u, v)| (*t, r.as_deref(), m.as_str(), u.as_str(), *v))
                        .collect();
                    batch(&rows)
                })
                .collect();
            prop_assert_eq!(canonical_order(&batches).unwrap(), reference(&batches));
        }
    }

    #[test]
    fn packed_keys_are_used_when_they_fit_and_not_otherwise() {
        let ranks = [vec![3, 0, 1], vec![0, 0, 1], vec![0, 0, 0]];
        let order = |ts: &[i64]| packed_order(&[ts], &ranks, 3);
        assert_eq!(order(&[7, 5, 7]), Some(vec![(0, 1), (0, 2), (0, 0)]));
        assert_eq!(order(&[i64::MIN, 0, i64::MAX]), None);
        assert_eq!(
            wide_order(&[&[i64::MIN, 0, i64::MAX]], &ranks, 3),
            vec![(0, 0), (0, 1), (0, 2)]
        );
    }
}
