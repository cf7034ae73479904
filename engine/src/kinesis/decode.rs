//! Records to rows: JSON samples into Arrow batches, bad records into dead-letter rows.
//!
//! A record's data is one JSON object (one sample) or an array of objects. A sample has
//! `ts` (epoch milliseconds as an integer, or an RFC 3339 string), `resource` (a string) and
//! any of the schema's columns; missing columns are NULL, unknown keys are ignored. A record
//! that is not JSON, too large, or whose sample lacks `ts`/`resource` or has a value of the
//! wrong type is not dropped: it becomes a dead-letter row with its shard, sequence number,
//! partition key, reason and raw bytes. In an array each element stands on its own, so one
//! bad sample does not reject its neighbours.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use healer_operators::schema::{RESOURCE, TS, canonical_metrics_schema, ts_type};
use serde_json::Value;

/// One record as read from a shard.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Sequence number (decimal digits).
    pub sequence: String,
    /// Partition key.
    pub partition_key: String,
    /// Approximate arrival time (ms), when the service gave one.
    pub arrival_ms: Option<i64>,
    /// The payload.
    pub data: bytes::Bytes,
}

/// The Arrow type of a `[source.schema]` type name.
pub fn column_type(name: &str) -> Option<DataType> {
    match name.to_ascii_lowercase().as_str() {
        "double" | "float" | "float64" | "real" => Some(DataType::Float64),
        "int" | "integer" | "bigint" | "int64" | "long" => Some(DataType::Int64),
        "string" | "utf8" | "text" | "varchar" => Some(DataType::Utf8),
        _ => None,
    }
}

/// The schema of decoded rows: `ts`, `resource`, then the configured columns (by name), or
/// the canonical schema's when none are configured. Every column is nullable, as in replay.
pub fn record_schema(columns: &BTreeMap<String, String>) -> SchemaRef {
    let mut fields = vec![
        Field::new(TS, ts_type(), true),
        Field::new(RESOURCE, DataType::Utf8, true),
    ];
    if columns.is_empty() {
        fields.extend(
            canonical_metrics_schema()
                .fields()
                .iter()
                .filter(|f| f.name() != TS && f.name() != RESOURCE)
                .map(|f| Field::new(f.name(), f.data_type().clone(), true)),
        );
    } else {
        fields.extend(
            columns
                .iter()
                .filter_map(|(name, ty)| Some(Field::new(name, column_type(ty)?, true))),
        );
    }
    Arc::new(Schema::new(fields))
}

/// The schema of dead-letter records.
pub fn rejected_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(TS, ts_type(), true),
        Field::new("stream", DataType::Utf8, false),
        Field::new("shard_id", DataType::Utf8, false),
        Field::new("sequence_number", DataType::Utf8, false),
        Field::new("partition_key", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("data", DataType::Binary, false),
    ]))
}

#[derive(Debug)]
enum Column {
    Ts(TimestampMillisecondBuilder),
    F64(Float64Builder),
    I64(Int64Builder),
    Str(StringBuilder),
}

/// One decoded value, held until the whole sample is known to be good.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Debug)]
struct Rejects {
    ts: TimestampMillisecondBuilder,
    stream: StringBuilder,
    shard: StringBuilder,
    seq: StringBuilder,
    key: StringBuilder,
    reason: StringBuilder,
    data: BinaryBuilder,
    rows: usize,
}

impl Default for Rejects {
    fn default() -> Self {
        Self {
            ts: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            stream: StringBuilder::new(),
            shard: StringBuilder::new(),
            seq: StringBuilder::new(),
            key: StringBuilder::new(),
            reason: StringBuilder::new(),
            data: BinaryBuilder::new(),
            rows: 0,
        }
    }
}

/// Decodes the records of one shard into row batches and dead-letter batches.
#[derive(Debug)]
pub struct Decoder {
    schema: SchemaRef,
    columns: Vec<Column>,
    /// Column index by name.
    index: BTreeMap<String, usize>,
    rows: usize,
    rejects: Rejects,
    stream: String,
    shard: String,
    max_record_bytes: usize,
    /// Samples with `ts` further than this after their record's arrival are rejected.
    max_future_skew_ms: i64,
}

impl Decoder {
    /// A decoder producing rows of `schema` (see [`record_schema`]) for one shard.
    pub fn new(schema: SchemaRef, stream: &str, shard: &str, max_record_bytes: usize) -> Self {
        let columns = Self::builders(&schema);
        let index = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name().clone(), i))
            .collect();
        Self {
            schema,
            columns,
            index,
            rows: 0,
            rejects: Rejects::default(),
            stream: stream.to_string(),
            shard: shard.to_string(),
            max_record_bytes,
            max_future_skew_ms: i64::MAX,
        }
    }

    /// Rejects samples whose `ts` is more than `skew_ms` after their record's arrival time.
    pub fn with_max_future_skew(mut self, skew_ms: i64) -> Self {
        self.max_future_skew_ms = skew_ms;
        self
    }

    fn builders(schema: &SchemaRef) -> Vec<Column> {
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(_, _) => {
                    Column::Ts(TimestampMillisecondBuilder::new().with_timezone("UTC"))
                }
                DataType::Float64 => Column::F64(Float64Builder::new()),
                DataType::Int64 => Column::I64(Int64Builder::new()),
                _ => Column::Str(StringBuilder::new()),
            })
            .collect()
    }

    /// Rows decoded and not yet taken.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Dead-letter rows not yet taken.
    pub fn rejected(&self) -> usize {
        self.rejects.rows
    }

    /// Decodes one record.
    pub fn push(&mut self, record: &RawRecord) {
        if record.data.len() > self.max_record_bytes {
            let reason = format!(
                "oversized: {} bytes (limit {})",
                record.data.len(),
                self.max_record_bytes
            );
            return self.reject(record, &reason);
        }
        let value: Value = match serde_json::from_slice(&record.data) {
            Ok(v) => v,
            Err(e) => return self.reject(record, &format!("not JSON: {e}")),
        };
        match value {
            Value::Object(_) => {
                if let Err(reason) = self.sample(&value, record.arrival_ms) {
                    self.reject(record, &reason);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Err(reason) = self.sample(item, record.arrival_ms) {
                        self.reject(record, &format!("element {i}: {reason}"));
                    }
                }
            }
            other => self.reject(
                record,
                &format!(
                    "expected a JSON object or array of objects, found {}",
                    kind(&other)
                ),
            ),
        }
    }

    fn sample(&mut self, value: &Value, arrival_ms: Option<i64>) -> Result<(), String> {
        let Value::Object(map) = value else {
            return Err(format!("expected an object, found {}", kind(value)));
        };
        let mut cells = vec![Cell::Null; self.columns.len()];
        for (key, v) in map {
            let Some(&i) = self.index.get(key.as_str()) else {
                continue;
            };
            cells[i] = match (&self.columns[i], v) {
                (_, Value::Null) => Cell::Null,
                (Column::Ts(_), Value::Number(n)) => Cell::Int(
                    n.as_i64()
                        .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                        .ok_or_else(|| format!("`{key}`: {n} is not epoch milliseconds"))?,
                ),
                (Column::Ts(_), Value::String(s)) => Cell::Int(
                    chrono::DateTime::parse_from_rfc3339(s)
                        .map_err(|e| format!("`{key}`: `{s}` is not an RFC 3339 time ({e})"))?
                        .timestamp_millis(),
                ),
                (Column::F64(_), Value::Number(n)) => Cell::Float(
                    n.as_f64()
                        .ok_or_else(|| format!("`{key}`: {n} is not a number"))?,
                ),
                (Column::I64(_), Value::Number(n)) => Cell::Int(
                    n.as_i64()
                        .ok_or_else(|| format!("`{key}`: {n} is not a 64-bit integer"))?,
                ),
                (Column::Str(_), Value::String(s)) => Cell::Str(s.clone()),
                (column, other) => {
                    let want = match column {
                        Column::Ts(_) => "epoch milliseconds or an RFC 3339 string",
                        Column::F64(_) => "a number",
                        Column::I64(_) => "an integer",
                        Column::Str(_) => "a string",
                    };
                    return Err(format!("`{key}`: expected {want}, found {}", kind(other)));
                }
            };
        }
        for required in [TS, RESOURCE] {
            if cells[self.index[required]] == Cell::Null {
                return Err(format!("missing `{required}`"));
            }
        }
        if let (Cell::Int(ts), Some(arrival)) = (&cells[self.index[TS]], arrival_ms)
            && ts.saturating_sub(arrival) > self.max_future_skew_ms
        {
            return Err(format!(
                "`ts` is {} s after the record's arrival (max_future_skew)",
                ts.saturating_sub(arrival) / 1000
            ));
        }
        for (column, cell) in self.columns.iter_mut().zip(cells) {
            match (column, cell) {
                (Column::Ts(b), Cell::Int(v)) => b.append_value(v),
                (Column::Ts(b), _) => b.append_null(),
                (Column::F64(b), Cell::Float(v)) => b.append_value(v),
                (Column::F64(b), _) => b.append_null(),
                (Column::I64(b), Cell::Int(v)) => b.append_value(v),
                (Column::I64(b), _) => b.append_null(),
                (Column::Str(b), Cell::Str(v)) => b.append_value(v),
                (Column::Str(b), _) => b.append_null(),
            }
        }
        self.rows += 1;
        Ok(())
    }

    fn reject(&mut self, record: &RawRecord, reason: &str) {
        let r = &mut self.rejects;
        r.ts.append_option(record.arrival_ms);
        r.stream.append_value(&self.stream);
        r.shard.append_value(&self.shard);
        r.seq.append_value(&record.sequence);
        r.key.append_value(&record.partition_key);
        r.reason.append_value(reason);
        r.data.append_value(&record.data);
        r.rows += 1;
    }

    /// The rows decoded since the last call.
    pub fn take_rows(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|c| -> ArrayRef {
                match c {
                    Column::Ts(b) => Arc::new(b.finish()),
                    Column::F64(b) => Arc::new(b.finish()),
                    Column::I64(b) => Arc::new(b.finish()),
                    Column::Str(b) => Arc::new(b.finish()),
                }
            })
            .collect();
        self.rows = 0;
        RecordBatch::try_new(Arc::clone(&self.schema), columns).expect("builders match schema")
    }

    /// The dead-letter rows since the last call, if any.
    pub fn take_rejected(&mut self) -> Option<RecordBatch> {
        if self.rejects.rows == 0 {
            return None;
        }
        let r = std::mem::take(&mut self.rejects);
        let mut r = r;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(r.ts.finish()),
            Arc::new(r.stream.finish()),
            Arc::new(r.shard.finish()),
            Arc::new(r.seq.finish()),
            Arc::new(r.key.finish()),
            Arc::new(r.reason.finish()),
            Arc::new(r.data.finish()),
        ];
        Some(RecordBatch::try_new(rejected_schema(), columns).expect("builders match schema"))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A sample as a JSON object (the inverse of decoding), for `healer produce`.
pub fn row_to_json(batch: &RecordBatch, row: usize, out: &mut String) {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType};
    use std::fmt::Write;
    out.push('{');
    let mut first = true;
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if column.is_null(row) {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&serde_json::to_string(field.name()).expect("string"));
        out.push(':');
        match column.data_type() {
            DataType::Timestamp(_, _) => {
                let v = column.as_primitive::<TimestampMillisecondType>().value(row);
                let _ = write!(out, "{v}");
            }
            DataType::Float64 => {
                let v = column.as_primitive::<Float64Type>().value(row);
                if v.is_finite() {
                    // Shortest round-trip form: decoding gives the same f64 back.
                    let _ = write!(out, "{v:?}");
                } else {
                    out.push_str("null");
                }
            }
            DataType::Int64 => {
                let v = column.as_primitive::<Int64Type>().value(row);
                let _ = write!(out, "{v}");
            }
            _ => {
                let s = column.as_string::<i32>().value(row);
                out.push_str(&serde_json::to_string(s).expect("string"));
            }
        }
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use proptest::prelude::*;

    fn record(data: &str) -> RawRecord {
        RawRecord {
            sequence: "49590338271490256608559692538361571095921575989136588898".into(),
            partition_key: "web-1".into(),
            arrival_ms: Some(1_700_000_000_000),
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
        }
    }

    fn decoder() -> Decoder {
        let columns = [
            ("cpu_percent", "double"),
            ("service", "string"),
            ("threads", "int"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        Decoder::new(
            record_schema(&columns),
            "metrics",
            "shardId-000000000000",
            1024,
        )
    }

    #[test]
    fn objects_arrays_and_types() {
        let mut d = decoder();
        d.push(&record(
            r#"{"ts": 1000, "resource": "web-1", "cpu_percent": 12.5, "service": "web", "extra": [1]}"#,
        ));
        d.push(&record(
            r#"[{"ts": "1970-01-01T00:00:02Z", "resource": "web-2", "threads": 7},
                {"ts": 3000, "resource": "web-3", "cpu_percent": "high"},
                {"resource": "web-4"}, 5]"#,
        ));
        assert_eq!(d.rows(), 2);
        assert_eq!(d.rejected(), 3);
        let rows = d.take_rows();
        assert_eq!(rows.num_rows(), 2);
        let ts = rows
            .column(0)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        assert_eq!(ts.values().to_vec(), vec![1000, 2000]);
        let cpu = rows.column_by_name("cpu_percent").unwrap();
        assert!(cpu.is_valid(0) && cpu.is_null(1));
        let rejected = d.take_rejected().unwrap();
        let reasons: Vec<&str> = rejected
            .column_by_name("reason")
            .unwrap()
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        assert_eq!(
            reasons,
            vec![
                "element 1: `cpu_percent`: expected a number, found a string",
                "element 2: missing `ts`",
                "element 3: expected an object, found a number",
            ]
        );
        assert!(d.take_rejected().is_none());
    }

    #[test]
    fn malformed_and_oversized_records() {
        let mut d = decoder();
        d.push(&record("{not json"));
        d.push(&record("\"a string\""));
        d.push(&record(&format!(
            r#"{{"ts": 1, "resource": "{}"}}"#,
            "x".repeat(2000)
        )));
        d.push(&record(r#"{"ts": 1, "resource": 5}"#));
        d.push(&record(r#"{"ts": 1, "resource": "a", "threads": 1.5}"#));
        assert_eq!(d.rows(), 0);
        let rejected = d.take_rejected().unwrap();
        assert_eq!(rejected.num_rows(), 5);
        let reasons = rejected
            .column_by_name("reason")
            .unwrap()
            .as_string::<i32>();
        assert!(reasons.value(0).starts_with("not JSON"));
        assert!(reasons.value(2).starts_with("oversized: 2"));
        assert_eq!(
            reasons.value(3),
            "`resource`: expected a string, found a number"
        );
        let seq = rejected
            .column_by_name("sequence_number")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(seq.value(0).len(), 56, "sequence numbers kept whole");
    }

    #[test]
    fn timestamps_far_after_arrival_are_rejected() {
        let mut d = decoder().with_max_future_skew(3_600_000);
        // arrival 1_700_000_000_000; microseconds instead of milliseconds is far ahead.
        d.push(&record(r#"{"ts": 1700000000000000, "resource": "a"}"#));
        d.push(&record(r#"{"ts": 1700000001000, "resource": "a"}"#));
        assert_eq!(d.rows(), 1);
        let r = d.take_rejected().unwrap();
        let reason = r
            .column_by_name("reason")
            .unwrap()
            .as_string::<i32>()
            .value(0)
            .to_string();
        assert!(reason.contains("after the record's arrival"), "{reason}");
    }

    #[test]
    fn json_round_trip_of_canonical_rows() {
        let schema = record_schema(&BTreeMap::new());
        let mut d = Decoder::new(Arc::clone(&schema), "s", "shard", 1 << 20);
        d.push(&record(
            r#"{"ts": 5, "resource": "db-1", "region": "eu", "cpu_percent": 0.1, "p99_latency_ms": 1e300}"#,
        ));
        let rows = d.take_rows();
        let mut json = String::new();
        row_to_json(&rows, 0, &mut json);
        let mut again = Decoder::new(schema, "s", "shard", 1 << 20);
        again.push(&record(&json));
        assert_eq!(again.take_rows(), rows);
    }

    proptest! {
        /// Any bytes: never a panic, and every record ends as rows or as dead letters.
        #[test]
        fn decoder_never_panics_and_loses_nothing(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut d = decoder();
            let mut r = record("");
            r.data = bytes::Bytes::from(data);
            d.push(&r);
            prop_assert!(d.rows() + d.rejected() >= 1 || r.data.starts_with(b"[") || r.data.trim_ascii_start().starts_with(b"["));
        }

        /// JSON-shaped text.
        #[test]
        fn decoder_never_panics_on_json_shapes(
            text in r#"\[?\{("(ts|resource|cpu_percent|threads|service)": ?(-?[0-9]{1,20}(\.[0-9]+)?|"[^"\\]{0,10}"|null|true|\[\]|\{\}),? ?){0,5}\}\]?"#
        ) {
            let mut d = decoder();
            d.push(&record(&text));
            let _ = d.take_rows();
            let _ = d.take_rejected();
        }
    }
}
