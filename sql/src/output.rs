//! Conversion of a rule's result rows into incident-log anomaly rows.
//!
//! A rule's `SELECT` must name these columns (any order, extra columns rejected):
//!
//! | column | required | type | default |
//! |---|---|---|---|
//! | `ts` | yes | timestamp | |
//! | `resource` | yes | string | |
//! | `metric` | yes | string | |
//! | `value` | yes | numeric | |
//! | `score` | yes | numeric | |
//! | `severity` | no | string | `zscore_severity(score)` |
//! | `confidence` | no | numeric | `zscore_confidence(score)`, clamped to \[0, 1\] |
//! | `expected_low`, `expected_high` | no | numeric | NULL |
//! | `service`, `region` | no | string | NULL |
//!
//! A severity other than the four names (case-insensitive) is replaced by the score's.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Schema, TimestampMillisecondType};
use arrow::error::ArrowError;
use healer_operators::id::AnomalyIds;
use healer_operators::schema::{anomaly_schema, ts_type};
use healer_operators::severity::{Severity, zscore_confidence};

const REQUIRED: [&str; 5] = ["ts", "resource", "metric", "value", "score"];
const OPTIONAL: [&str; 6] = [
    "severity",
    "confidence",
    "expected_low",
    "expected_high",
    "service",
    "region",
];

/// Positions of the anomaly columns in a rule's output schema.
#[derive(Debug, Clone)]
pub struct OutputMapping {
    required: [usize; 5],
    optional: [Option<usize>; 6],
}

fn is_string(t: &DataType) -> bool {
    healer_operators::schema::is_tag_type(t)
}

impl OutputMapping {
    /// Checks a rule's output schema.
    pub fn try_new(schema: &Schema) -> Result<Self, String> {
        let mut problems = Vec::new();
        for f in schema.fields() {
            if !REQUIRED.contains(&f.name().as_str()) && !OPTIONAL.contains(&f.name().as_str()) {
                problems.push(format!(
                    "output column `{}` is not an anomaly column (allowed: {}, {})",
                    f.name(),
                    REQUIRED.join(", "),
                    OPTIONAL.join(", ")
                ));
            }
        }
        let find = |name: &str| schema.index_of(name).ok();
        let mut required = [0; 5];
        for (i, name) in REQUIRED.iter().enumerate() {
            match find(name) {
                Some(p) => required[i] = p,
                None => problems.push(format!("output must have a `{name}` column")),
            }
        }
        let optional = OPTIONAL.map(find);
        let check =
            |name: &str, ok: fn(&DataType) -> bool, want: &str, problems: &mut Vec<String>| {
                if let Some(p) = find(name) {
                    let t = schema.field(p).data_type();
                    if !ok(t) {
                        problems.push(format!("output column `{name}` is {t}, expected {want}"));
                    }
                }
            };
        check(
            "ts",
            |t| matches!(t, DataType::Timestamp(_, _)),
            "a timestamp",
            &mut problems,
        );
        for name in ["resource", "metric", "severity", "service", "region"] {
            check(name, is_string, "a string", &mut problems);
        }
        for name in [
            "value",
            "score",
            "confidence",
            "expected_low",
            "expected_high",
        ] {
            check(
                name,
                |t| t.is_numeric() || t == &DataType::Null,
                "a number",
                &mut problems,
            );
        }
        if problems.is_empty() {
            Ok(Self { required, optional })
        } else {
            Err(problems.join("; "))
        }
    }

    /// The anomaly rows of a rule's output batch. Rows with a NULL `ts`, `resource` or
    /// `metric` are dropped (a rule cannot attribute them).
    pub fn to_anomalies(&self, rule: &str, out: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        let schema = anomaly_schema();
        if out.num_rows() == 0 {
            return Ok(RecordBatch::new_empty(schema));
        }
        let utf8 = |i: usize| cast(out.column(i), &DataType::Utf8);
        let f64col = |i: usize| cast(out.column(i), &DataType::Float64);
        let ts = cast(out.column(self.required[0]), &ts_type())?;
        let resource = utf8(self.required[1])?;
        let metric = utf8(self.required[2])?;
        // Usually every row is attributed, and nothing needs filtering.
        let keep: Option<arrow::array::BooleanArray> =
            (ts.null_count() + resource.null_count() + metric.null_count() > 0).then(|| {
                (0..out.num_rows())
                    .map(|i| Some(ts.is_valid(i) && resource.is_valid(i) && metric.is_valid(i)))
                    .collect()
            });
        let filtered = |a: ArrayRef| match &keep {
            Some(keep) => arrow::compute::filter(&a, keep),
            None => Ok(a),
        };
        let ts = filtered(ts)?;
        let resource = filtered(resource)?;
        let metric = filtered(metric)?;
        let value = filtered(f64col(self.required[3])?)?;
        let score = filtered(f64col(self.required[4])?)?;
        let opt = |k: usize, t: &DataType| -> Result<Option<ArrayRef>, ArrowError> {
            self.optional[k]
                .map(|i| cast(out.column(i), t).and_then(filtered))
                .transpose()
        };
        let n = ts.len();
        let null_f64 = || Arc::new(Float64Array::new_null(n)) as ArrayRef;
        let null_str = || Arc::new(StringArray::new_null(n)) as ArrayRef;
        let scores = score.as_primitive::<Float64Type>();
        let score_at = |i: usize| {
            if scores.is_null(i) {
                f64::NAN
            } else {
                scores.value(i)
            }
        };

        let severity_in = opt(0, &DataType::Utf8)?;
        let mut severity = StringBuilder::with_capacity(n, n * 6);
        for i in 0..n {
            let given = severity_in
                .as_ref()
                .and_then(|s| {
                    s.as_string::<i32>()
                        .is_valid(i)
                        .then(|| s.as_string::<i32>().value(i))
                })
                .and_then(Severity::parse);
            severity.append_value(
                given
                    .unwrap_or_else(|| Severity::from_zscore(score_at(i)))
                    .as_str(),
            );
        }
        let confidence_in = opt(1, &DataType::Float64)?;
        let confidence: Float64Array = (0..n)
            .map(|i| {
                let c = confidence_in
                    .as_ref()
                    .map(|c| c.as_primitive::<Float64Type>())
                    .filter(|c| c.is_valid(i))
                    .map(|c| c.value(i));
                Some(match c {
                    Some(c) if c.is_nan() => 0.0,
                    Some(c) => c.clamp(0.0, 1.0),
                    None => zscore_confidence(score_at(i)),
                })
            })
            .collect();
        let tsv = ts.as_primitive::<TimestampMillisecondType>();
        let res = resource.as_string::<i32>();
        let met = metric.as_string::<i32>();
        let ids = AnomalyIds::new(rule).column(res, met, tsv.values());
        let rules = StringArray::from_iter_values(std::iter::repeat_n(rule, n));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(ids),
            ts,
            resource,
            metric,
            value,
            score,
            Arc::new(severity.finish()),
            Arc::new(confidence),
            opt(2, &DataType::Float64)?.unwrap_or_else(null_f64),
            opt(3, &DataType::Float64)?.unwrap_or_else(null_f64),
            Arc::new(rules),
            opt(4, &DataType::Utf8)?.unwrap_or_else(null_str),
            opt(5, &DataType::Utf8)?.unwrap_or_else(null_str),
        ];
        RecordBatch::try_new(schema, columns)
    }
}
