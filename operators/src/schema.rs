//! The canonical metrics schema and the versioned incident-log schema.
//!
//! # Metrics
//! A metrics batch has an event-time column `ts` (`Timestamp(Millisecond, "UTC")` after the
//! source normalises it), a `resource` key (`Utf8`), optional string tags (`service`, `region`,
//! or any other string column) and numeric metric columns. The 16 [`CANONICAL_METRICS`] are the
//! default; any other numeric column read from a parquet footer is a metric too.
//!
//! # Anomalies (incident log, schema `anomaly/v1`)
//! | column | type | meaning |
//! |---|---|---|
//! | `id` | Utf8 | deterministic id of (rule, resource, metric, ts), see [`crate::id`] |
//! | `ts` | Timestamp(ms, UTC) | event time of the anomalous sample |
//! | `resource` | Utf8 | resource key |
//! | `metric` | Utf8 | metric name |
//! | `value` | Float64 | observed value |
//! | `score` | Float64 | the rule's score (a z-score for the bundled rule) |
//! | `severity` | Utf8 | `LOW`, `MEDIUM`, `HIGH` or `CRITICAL` |
//! | `confidence` | Float64 | in \[0, 1\] |
//! | `expected_low`, `expected_high` | Float64, nullable | the rule's expected range |
//! | `rule` | Utf8 | name of the rule that fired |
//! | `service`, `region` | Utf8, nullable | tags of the resource, when the source has them |
//!
//! The parquet files carry the key-value metadata `healer.schema = anomaly/v1`. Columns are
//! only ever added (nullable) within a major version.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// The 16 metrics of the reference fleet, in their canonical order.
pub const CANONICAL_METRICS: [&str; 16] = [
    "cpu_percent",
    "memory_percent",
    "disk_io_read_mb",
    "disk_io_write_mb",
    "network_in_mb",
    "network_out_mb",
    "active_connections",
    "error_rate",
    "p95_latency_ms",
    "p99_latency_ms",
    "request_rate",
    "cache_hit_rate",
    "db_connections",
    "queue_depth",
    "gc_pause_ms",
    "thread_count",
];

/// Name of the event-time column.
pub const TS: &str = "ts";
/// Name of the resource key column.
pub const RESOURCE: &str = "resource";
/// Tags the incident log carries when the source has them.
pub const LOG_TAGS: [&str; 2] = ["service", "region"];

/// Key-value metadata key naming the schema of a healer parquet file.
pub const SCHEMA_KEY: &str = "healer.schema";
/// Current anomaly schema version.
pub const ANOMALY_SCHEMA_VERSION: &str = "anomaly/v1";

/// The event-time type every source normalises to.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The canonical wide metrics schema: `ts`, `resource`, `service`, `region`, 16 metrics.
pub fn canonical_metrics_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new(TS, ts_type(), false),
        Field::new(RESOURCE, DataType::Utf8, false),
        Field::new("service", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
    ];
    fields.extend(
        CANONICAL_METRICS
            .iter()
            .map(|m| Field::new(*m, DataType::Float64, true)),
    );
    Arc::new(Schema::new(fields))
}

/// The incident-log schema for anomaly rows (`anomaly/v1`).
pub fn anomaly_schema() -> SchemaRef {
    // Built once: every batch of anomalies shares it (a batch per rule and input batch).
    static SCHEMA: std::sync::LazyLock<SchemaRef> = std::sync::LazyLock::new(|| {
        let fields = vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(TS, ts_type(), false),
            Field::new(RESOURCE, DataType::Utf8, false),
            Field::new("metric", DataType::Utf8, false),
            Field::new("value", DataType::Float64, true),
            Field::new("score", DataType::Float64, true),
            Field::new("severity", DataType::Utf8, false),
            Field::new("confidence", DataType::Float64, false),
            Field::new("expected_low", DataType::Float64, true),
            Field::new("expected_high", DataType::Float64, true),
            Field::new("rule", DataType::Utf8, false),
            Field::new("service", DataType::Utf8, true),
            Field::new("region", DataType::Utf8, true),
        ];
        let metadata = [(SCHEMA_KEY.to_string(), ANOMALY_SCHEMA_VERSION.to_string())]
            .into_iter()
            .collect();
        Arc::new(Schema::new_with_metadata(fields, metadata))
    });
    Arc::clone(&SCHEMA)
}

/// Whether a column of this type is treated as a metric (numeric, not the time column).
pub fn is_metric_type(data_type: &DataType) -> bool {
    data_type.is_numeric()
}

/// Whether a column of this type is treated as a tag (string-like).
pub fn is_tag_type(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(_, _)
    )
}
