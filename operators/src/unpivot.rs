//! The long `samples` view of a wide metrics batch.
//!
//! A wide batch has one row per (ts, resource) and one column per metric. Rules that treat
//! every metric alike read the long view instead: one row per (ts, resource, metric) with
//! columns `ts`, `resource`, the tags, `metric` and `value` (`Float64`). Rows come in
//! row-major order (all metrics of wide row 0, in column order, then wide row 1, …), so the
//! event-time order of the wide batch is kept.
//!
//! `resource`, the tags and `metric` are dictionary-encoded (`Dictionary(Int32, Utf8)`): the
//! view shares the wide batch's strings instead of copying them once per metric.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, DictionaryArray, Float64Array, Int32Array, RecordBatch, StringArray,
};
use arrow::buffer::{BooleanBuffer, NullBuffer};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float64Type, Int32Type, Schema, SchemaRef};

use crate::schema::{RESOURCE, TS, is_metric_type, is_tag_type};
use crate::{OperatorError, Result};

/// Name of the metric-name column of the long view.
pub const METRIC: &str = "metric";
/// Name of the value column of the long view.
pub const VALUE: &str = "value";

fn dict_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Converts wide metrics batches of one schema into the long `samples` view.
#[derive(Debug, Clone)]
pub struct Unpivot {
    ts: usize,
    /// Key and tag columns of the wide schema, in order, `resource` first.
    keys: Vec<usize>,
    metrics: Vec<usize>,
    metric_names: ArrayRef,
    schema: SchemaRef,
}

impl Unpivot {
    /// A converter for wide batches of `wide`. Numeric columns other than `ts` are metrics,
    /// string columns are `resource` and tags.
    pub fn try_new(wide: &Schema) -> Result<Self> {
        let ts = wide.index_of(TS).map_err(|_| {
            OperatorError::InvalidInput(format!("metrics schema has no `{TS}` column"))
        })?;
        let resource = wide.index_of(RESOURCE).map_err(|_| {
            OperatorError::InvalidInput(format!("metrics schema has no `{RESOURCE}` column"))
        })?;
        let mut keys = vec![resource];
        let mut metrics = Vec::new();
        for (i, field) in wide.fields().iter().enumerate() {
            if i == ts || i == resource {
                continue;
            }
            if field.name() == METRIC || field.name() == VALUE {
                return Err(OperatorError::InvalidInput(format!(
                    "metrics schema has a column named `{}`, reserved by the samples view",
                    field.name()
                )));
            }
            if is_metric_type(field.data_type()) {
                metrics.push(i);
            } else if is_tag_type(field.data_type()) {
                keys.push(i);
            }
        }
        let mut fields = vec![wide.field(ts).clone()];
        fields.extend(keys.iter().map(|&k| {
            Field::new(
                wide.field(k).name(),
                dict_type(),
                wide.field(k).is_nullable() || k != resource,
            )
        }));
        fields.push(Field::new(METRIC, dict_type(), false));
        fields.push(Field::new(VALUE, DataType::Float64, true));
        let names: Vec<&str> = metrics
            .iter()
            .map(|&m| wide.field(m).name().as_str())
            .collect();
        Ok(Self {
            ts,
            keys,
            metrics,
            metric_names: Arc::new(StringArray::from(names)),
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// Schema of the long view.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// Names of the metric columns, in view order.
    pub fn metric_names(&self) -> Vec<String> {
        let names = self.metric_names.as_string::<i32>();
        names.iter().flatten().map(str::to_owned).collect()
    }

    /// The long view of `wide`.
    pub fn apply(&self, wide: &RecordBatch) -> Result<RecordBatch> {
        let n = wide.num_rows();
        let m = self.metrics.len();
        let total = n
            .checked_mul(m)
            .filter(|t| *t < i32::MAX as usize)
            .ok_or_else(|| {
                OperatorError::InvalidInput(format!("batch of {n} rows × {m} metrics is too large"))
            })?;
        let row_of: Vec<u32> = (0..n as u32)
            .flat_map(|i| std::iter::repeat_n(i, m))
            .collect();
        let row_index = arrow::array::UInt32Array::from(row_of);
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.keys.len() + 3);
        columns.push(arrow::compute::take(
            wide.column(self.ts),
            &row_index,
            None,
        )?);
        let keys = Int32Array::from_iter_values(row_index.values().iter().map(|&r| r as i32));
        for &k in &self.keys {
            let values = match wide.column(k).data_type() {
                DataType::Utf8 => Arc::clone(wide.column(k)),
                _ => cast(wide.column(k), &DataType::Utf8)?,
            };
            columns.push(Arc::new(DictionaryArray::<Int32Type>::try_new(
                keys.clone(),
                values,
            )?));
        }
        let metric_keys = Int32Array::from_iter_values((0..total).map(|j| (j % m.max(1)) as i32));
        columns.push(Arc::new(DictionaryArray::<Int32Type>::try_new(
            metric_keys,
            Arc::clone(&self.metric_names),
        )?));
        let metric_columns: Vec<ArrayRef> = self
            .metrics
            .iter()
            .map(|&c| match wide.column(c).data_type() {
                DataType::Float64 => Ok(Arc::clone(wide.column(c))),
                _ => cast(wide.column(c), &DataType::Float64),
            })
            .collect::<Result<_, _>>()?;
        let floats: Vec<&Float64Array> = metric_columns
            .iter()
            .map(|c| c.as_primitive::<Float64Type>())
            .collect();
        let mut values = Vec::with_capacity(total);
        for i in 0..n {
            for f in &floats {
                values.push(f.values()[i]);
            }
        }
        let nulls = if floats.iter().any(|f| f.null_count() > 0) {
            let mut valid = Vec::with_capacity(total);
            for i in 0..n {
                for f in &floats {
                    valid.push(f.is_valid(i));
                }
            }
            Some(NullBuffer::new(BooleanBuffer::from(valid)))
        } else {
            None
        };
        columns.push(Arc::new(Float64Array::new(values.into(), nulls)));
        Ok(RecordBatch::try_new(self.schema(), columns)?)
    }
}

impl Unpivot {
    /// The long view of `wide` as one batch per metric column, in column order: batch `m`
    /// holds metric `m` of every wide row, in row order.
    ///
    /// Together the batches hold exactly the rows of [`Unpivot::apply`], and the rows of any
    /// one metric keep their order, so a computation that never mixes metrics (every window
    /// partitioned by `metric`) gives the same rows from either. This form copies no values:
    /// `ts`, the key dictionaries and, for `Float64` metrics, `value` share the wide batch's
    /// buffers.
    pub fn per_metric(&self, wide: &RecordBatch) -> Result<Vec<RecordBatch>> {
        self.per_metric_where(wide, |_| true)
    }

    /// [`Unpivot::per_metric`]'s batches of the metrics `m` (positions in column order) for
    /// which `keep(m)` holds, in column order; the others are not built.
    pub fn per_metric_where(
        &self,
        wide: &RecordBatch,
        keep: impl Fn(usize) -> bool,
    ) -> Result<Vec<RecordBatch>> {
        let n = wide.num_rows();
        if n >= i32::MAX as usize {
            return Err(OperatorError::InvalidInput(format!(
                "batch of {n} rows is too large"
            )));
        }
        let rows = Int32Array::from_iter_values(0..n as i32);
        let mut shared: Vec<ArrayRef> = Vec::with_capacity(self.keys.len() + 1);
        shared.push(Arc::clone(wide.column(self.ts)));
        for &k in &self.keys {
            let values = match wide.column(k).data_type() {
                DataType::Utf8 => Arc::clone(wide.column(k)),
                _ => cast(wide.column(k), &DataType::Utf8)?,
            };
            shared.push(Arc::new(DictionaryArray::<Int32Type>::try_new(
                rows.clone(),
                values,
            )?));
        }
        if self.metrics.is_empty() {
            return Ok(Vec::new());
        }
        // Every row of batch `m` is metric `m`: one all-zero key buffer, checked once, serves
        // every metric, each with its own one-entry dictionary.
        let one_metric = DictionaryArray::<Int32Type>::try_new(
            Int32Array::from(vec![0; n]),
            self.metric_names.slice(0, 1),
        )?;
        self.metrics
            .iter()
            .enumerate()
            .filter(|&(m, _)| keep(m))
            .map(|(m, &c)| {
                let mut columns = shared.clone();
                columns.push(Arc::new(
                    one_metric.with_values(self.metric_names.slice(m, 1)),
                ));
                columns.push(match wide.column(c).data_type() {
                    DataType::Float64 => Arc::clone(wide.column(c)),
                    _ => cast(wide.column(c), &DataType::Float64)?,
                });
                Ok(RecordBatch::try_new(self.schema(), columns)?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::TimestampMillisecondArray;
    use arrow::util::pretty::pretty_format_batches;

    #[test]
    fn long_view_is_row_major() {
        let wide = Schema::new(vec![
            Field::new(TS, crate::schema::ts_type(), false),
            Field::new(RESOURCE, DataType::Utf8, false),
            Field::new("cpu", DataType::Float64, true),
            Field::new("conns", DataType::Int64, true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(wide.clone()),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![0, 1000]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
                Arc::new(arrow::array::Int64Array::from(vec![3, 4])),
            ],
        )
        .unwrap();
        let u = Unpivot::try_new(&wide).unwrap();
        let long = u.apply(&batch).unwrap();
        let text = pretty_format_batches(&[long]).unwrap().to_string();
        let expected = "\
+----------------------+----------+--------+-------+
| ts                   | resource | metric | value |
+----------------------+----------+--------+-------+
| 1970-01-01T00:00:00Z | a        | cpu    | 1.5   |
| 1970-01-01T00:00:00Z | a        | conns  | 3.0   |
| 1970-01-01T00:00:01Z | b        | cpu    |       |
| 1970-01-01T00:00:01Z | b        | conns  | 4.0   |
+----------------------+----------+--------+-------+";
        assert_eq!(text, expected);
        assert_eq!(u.metric_names(), vec!["cpu", "conns"]);
    }

    #[test]
    fn per_metric_batches_hold_the_same_rows() {
        let wide = Schema::new(vec![
            Field::new(TS, crate::schema::ts_type(), false),
            Field::new(RESOURCE, DataType::Utf8, false),
            Field::new("service", DataType::Utf8, true),
            Field::new("cpu", DataType::Float64, true),
            Field::new("conns", DataType::Int64, true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(wide.clone()),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![0, 1000, 2000]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["a", "b", "a"])),
                Arc::new(StringArray::from(vec![Some("web"), None, Some("web")])),
                Arc::new(Float64Array::from(vec![Some(1.5), None, Some(2.5)])),
                Arc::new(arrow::array::Int64Array::from(vec![3, 4, 5])),
            ],
        )
        .unwrap();
        let u = Unpivot::try_new(&wide).unwrap();
        let parts = u.per_metric(&batch).unwrap();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.schema() == u.schema()));
        // Row-major order of `apply` is metric-major order of `per_metric`, transposed.
        let long = u.apply(&batch).unwrap();
        let stacked = arrow::compute::concat_batches(&u.schema(), &parts).unwrap();
        let order: Vec<u32> = (0..2)
            .flat_map(|m| (0..3).map(move |r| r * 2 + m))
            .collect();
        let transposed =
            arrow::compute::take_record_batch(&long, &arrow::array::UInt32Array::from(order))
                .unwrap();
        assert_eq!(
            pretty_format_batches(&[stacked]).unwrap().to_string(),
            pretty_format_batches(&[transposed]).unwrap().to_string()
        );
        // A share of the metrics is those batches, and only those.
        let second = u.per_metric_where(&batch, |m| m == 1).unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(
            pretty_format_batches(&second).unwrap().to_string(),
            pretty_format_batches(&parts[1..]).unwrap().to_string()
        );
    }

    #[test]
    fn reserved_names_are_rejected() {
        let wide = Schema::new(vec![
            Field::new(TS, crate::schema::ts_type(), false),
            Field::new(RESOURCE, DataType::Utf8, false),
            Field::new(VALUE, DataType::Float64, true),
        ]);
        assert!(Unpivot::try_new(&wide).is_err());
    }
}
