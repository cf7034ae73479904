//! The simulated fleet.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::rng::Rng;

/// The 16 metrics, with (low, high) base range, load sensitivity, relative noise, AR(1) φ.
const METRICS: [(&str, f64, f64, f64, f64, f64); 16] = [
    ("cpu_percent", 15.0, 55.0, 0.5, 0.08, 0.7),
    ("memory_percent", 30.0, 75.0, 0.1, 0.01, 0.95),
    ("disk_io_read_mb", 2.0, 40.0, 0.4, 0.25, 0.3),
    ("disk_io_write_mb", 1.0, 30.0, 0.4, 0.25, 0.3),
    ("network_in_mb", 5.0, 120.0, 0.6, 0.10, 0.5),
    ("network_out_mb", 5.0, 150.0, 0.6, 0.10, 0.5),
    ("active_connections", 50.0, 800.0, 0.6, 0.05, 0.8),
    ("error_rate", 0.001, 0.02, 0.3, 0.30, 0.2),
    ("p95_latency_ms", 40.0, 250.0, 0.5, 0.08, 0.6),
    ("p99_latency_ms", 80.0, 450.0, 0.5, 0.08, 0.6),
    ("request_rate", 100.0, 5000.0, 0.8, 0.05, 0.7),
    ("cache_hit_rate", 0.80, 0.94, -0.05, 0.005, 0.8),
    ("db_connections", 10.0, 120.0, 0.5, 0.05, 0.8),
    ("queue_depth", 10.0, 80.0, 0.7, 0.20, 0.6),
    ("gc_pause_ms", 3.0, 40.0, 0.2, 0.35, 0.1),
    ("thread_count", 80.0, 400.0, 0.2, 0.03, 0.99),
];

const SERVICES: [&str; 6] = [
    "api-gateway",
    "checkout",
    "payments",
    "catalog",
    "postgres",
    "redis",
];
const REGIONS: [&str; 2] = ["us-east-1", "eu-west-1"];

/// Kinds of injected faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A few samples far off the normal range.
    Spike,
    /// The level moves and stays for a while.
    LevelShift,
    /// A linear ramp away from normal.
    Drift,
    /// Several related metrics of one resource move together.
    Incident,
}

impl FaultKind {
    /// Name in the labels file.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Spike => "spike",
            FaultKind::LevelShift => "level_shift",
            FaultKind::Drift => "drift",
            FaultKind::Incident => "incident",
        }
    }
}

/// One injected fault on one (resource, metric) series.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// Resource.
    pub resource: String,
    /// Metric.
    pub metric: String,
    /// Kind.
    pub kind: FaultKind,
    /// First affected timestamp (ms since the epoch).
    pub start_ms: i64,
    /// Last affected timestamp, inclusive.
    pub end_ms: i64,
    /// Peak size in units of the series' noise standard deviation (signed).
    pub magnitude_sigma: f64,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Seed: the data is a pure function of the config.
    pub seed: u64,
    /// Number of resources, spread over the services round-robin.
    pub resources: usize,
    /// Number of samples per resource.
    pub samples: usize,
    /// Sampling interval in milliseconds.
    pub interval_ms: i64,
    /// Timestamp of the first sample (ms since the epoch).
    pub start_ms: i64,
    /// Faults to inject, spread over resources and time.
    pub faults: usize,
    /// Rows per output batch.
    pub batch_rows: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            resources: 24,
            samples: 4 * 3600 / 10,
            interval_ms: 10_000,
            // 2025-01-01T00:00:00Z
            start_ms: 1_735_689_600_000,
            faults: 12,
            batch_rows: 8192,
        }
    }
}

/// The wide schema the generator writes.
pub fn schema() -> SchemaRef {
    let mut fields = vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("resource", DataType::Utf8, false),
        Field::new("service", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
    ];
    fields.extend(
        METRICS
            .iter()
            .map(|m| Field::new(m.0, DataType::Float64, true)),
    );
    Arc::new(Schema::new(fields))
}

struct Series {
    base: f64,
    load_sensitivity: f64,
    noise: f64,
    phi: f64,
    state: f64,
}

struct Fault {
    resource: usize,
    metrics: Vec<usize>,
    kind: FaultKind,
    start: usize,
    len: usize,
    sigma: f64,
}

fn fault_offset(f: &Fault, t: usize) -> f64 {
    if t < f.start || t >= f.start + f.len {
        return 0.0;
    }
    let k = (t - f.start) as f64;
    match f.kind {
        FaultKind::Spike | FaultKind::LevelShift | FaultKind::Incident => f.sigma,
        FaultKind::Drift => f.sigma * (k + 1.0) / f.len as f64,
    }
}

/// Generates the fleet: batches in stream order and the labels of the injected faults.
pub fn generate(config: &FleetConfig) -> (Vec<RecordBatch>, Vec<Label>) {
    let r = config.resources.max(1);
    let t_len = config.samples;
    let names: Vec<String> = (0..r)
        .map(|i| format!("{}-{:02}", SERVICES[i % SERVICES.len()], i / SERVICES.len()))
        .collect();
    let mut series: Vec<Vec<Series>> = (0..r)
        .map(|i| {
            let mut rng = Rng::fork(config.seed, i as u64);
            METRICS
                .iter()
                .map(|&(_, lo, hi, load, noise, phi)| Series {
                    base: rng.range(lo, hi),
                    load_sensitivity: load,
                    noise,
                    phi,
                    state: rng.normal(),
                })
                .collect()
        })
        .collect();

    // Faults: evenly spread in time after a warm-up, on distinct resources where possible.
    let mut rng = Rng::fork(config.seed, u64::MAX);
    let warmup = (t_len / 4).max(1);
    let incident_groups: [&[usize]; 3] = [&[7, 8, 9, 13], &[0, 4, 5, 6, 10], &[1, 14, 9]];
    let mut faults = Vec::new();
    for k in 0..config.faults {
        if t_len <= warmup + 10 {
            break;
        }
        let span = t_len - warmup;
        let start = warmup
            + (k * span) / config.faults.max(1)
            + rng.below((span / config.faults.max(1)).max(1) as u64 / 2) as usize;
        let start = start.min(t_len - 5);
        let kind = [
            FaultKind::Spike,
            FaultKind::LevelShift,
            FaultKind::Drift,
            FaultKind::Incident,
        ][k % 4];
        let resource = (k * 7 + rng.below(r as u64) as usize) % r;
        let sign = if rng.uniform() < 0.8 { 1.0 } else { -1.0 };
        let (metrics, len, sigma) = match kind {
            FaultKind::Spike => (
                vec![rng.below(16) as usize],
                1 + rng.below(3) as usize,
                sign * rng.range(8.0, 14.0),
            ),
            FaultKind::LevelShift => (
                vec![rng.below(16) as usize],
                30 + rng.below(60) as usize,
                sign * rng.range(6.0, 10.0),
            ),
            FaultKind::Drift => (
                vec![rng.below(16) as usize],
                60 + rng.below(90) as usize,
                sign * rng.range(10.0, 16.0),
            ),
            FaultKind::Incident => (
                incident_groups[rng.below(3) as usize].to_vec(),
                20 + rng.below(40) as usize,
                rng.range(6.0, 10.0),
            ),
        };
        let len = len.min(t_len - start);
        faults.push(Fault {
            resource,
            metrics,
            kind,
            start,
            len,
            sigma,
        });
    }

    let schema = schema();
    let service_of = |i: usize| SERVICES[i % SERVICES.len()];
    let region_of = |i: usize| REGIONS[(i / SERVICES.len()) % REGIONS.len()];
    let mut noise_rngs: Vec<Rng> = (0..r)
        .map(|i| Rng::fork(config.seed ^ 0xabcdef, i as u64))
        .collect();
    let total = r * t_len;
    let batch_rows = config.batch_rows.max(1);
    let mut batches = Vec::with_capacity(total.div_ceil(batch_rows));
    let mut ts = Vec::with_capacity(batch_rows);
    let mut res = Vec::with_capacity(batch_rows);
    let mut svc = Vec::with_capacity(batch_rows);
    let mut reg = Vec::with_capacity(batch_rows);
    let mut cols: Vec<Vec<f64>> = (0..16).map(|_| Vec::with_capacity(batch_rows)).collect();
    let day_ms = 86_400_000.0;
    for t in 0..t_len {
        let now = config.start_ms + t as i64 * config.interval_ms;
        let phase = std::f64::consts::TAU * (now as f64 % day_ms) / day_ms;
        let hour_phase = std::f64::consts::TAU * (now as f64 % 3_600_000.0) / 3_600_000.0;
        for i in 0..r {
            let load = 1.0 + 0.3 * (phase - 1.2 + i as f64 * 0.1).sin() + 0.05 * hour_phase.sin();
            for (m, s) in series[i].iter_mut().enumerate() {
                let e = noise_rngs[i].normal();
                s.state = s.phi * s.state + (1.0 - s.phi * s.phi).sqrt() * e;
                let level = s.base * (1.0 + s.load_sensitivity * (load - 1.0));
                let sd = s.noise * level.abs().max(1e-9);
                let mut v = level + sd * s.state;
                for f in &faults {
                    if f.resource == i && f.metrics.contains(&m) {
                        v += sd * fault_offset(f, t);
                    }
                }
                // Keep bounded metrics physical.
                if METRICS[m].0.ends_with("_percent") {
                    v = v.clamp(0.0, 100.0);
                } else if METRICS[m].0 == "cache_hit_rate" {
                    v = v.clamp(0.0, 1.0);
                } else {
                    v = v.max(0.0);
                }
                cols[m].push(v);
            }
            ts.push(now);
            res.push(names[i].as_str());
            svc.push(service_of(i));
            reg.push(region_of(i));
            if ts.len() == batch_rows {
                batches.push(flush(
                    &schema, &mut ts, &mut res, &mut svc, &mut reg, &mut cols,
                ));
            }
        }
    }
    if !ts.is_empty() {
        batches.push(flush(
            &schema, &mut ts, &mut res, &mut svc, &mut reg, &mut cols,
        ));
    }
    let labels = faults
        .iter()
        .flat_map(|f| {
            f.metrics.iter().map(|&m| Label {
                resource: names[f.resource].clone(),
                metric: METRICS[m].0.to_string(),
                kind: f.kind,
                start_ms: config.start_ms + f.start as i64 * config.interval_ms,
                end_ms: config.start_ms + (f.start + f.len - 1) as i64 * config.interval_ms,
                magnitude_sigma: f.sigma,
            })
        })
        .collect();
    (batches, labels)
}

fn flush(
    schema: &SchemaRef,
    ts: &mut Vec<i64>,
    res: &mut Vec<&str>,
    svc: &mut Vec<&str>,
    reg: &mut Vec<&str>,
    cols: &mut [Vec<f64>],
) -> RecordBatch {
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMillisecondArray::from(std::mem::take(ts)).with_timezone("UTC")),
        Arc::new(StringArray::from(std::mem::take(res))),
        Arc::new(StringArray::from(std::mem::take(svc))),
        Arc::new(StringArray::from(std::mem::take(reg))),
    ];
    columns.extend(
        cols.iter_mut()
            .map(|c| Arc::new(Float64Array::from(std::mem::take(c))) as ArrayRef),
    );
    RecordBatch::try_new(Arc::clone(schema), columns).expect("generator schema matches its columns")
}

/// Writes batches as one zstd parquet file.
pub fn write_parquet(
    path: &Path,
    batches: &[RecordBatch],
) -> Result<(), parquet::errors::ParquetError> {
    let Some(first) = batches.first() else {
        return Err(parquet::errors::ParquetError::General(
            "no batches to write".into(),
        ));
    };
    let file = std::fs::File::create(path)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .build();
    let mut writer = ArrowWriter::try_new(file, first.schema(), Some(props))?;
    for b in batches {
        writer.write(b)?;
    }
    writer.close()?;
    Ok(())
}

/// Writes the labels as CSV: `resource,metric,kind,start_ts,end_ts,magnitude_sigma` (ISO 8601).
pub fn write_labels_csv(path: &Path, labels: &[Label]) -> std::io::Result<()> {
    let mut out = String::from("resource,metric,kind,start_ts,end_ts,magnitude_sigma\n");
    for l in labels {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.3}",
            l.resource,
            l.metric,
            l.kind.as_str(),
            iso(l.start_ms),
            iso(l.end_ms),
            l.magnitude_sigma
        );
    }
    std::fs::File::create(path)?.write_all(out.as_bytes())
}

fn iso(ms: i64) -> String {
    arrow::temporal_conversions::timestamp_ms_to_datetime(ms)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_stream_order_with_labels() {
        let config = FleetConfig {
            resources: 6,
            samples: 400,
            faults: 4,
            batch_rows: 500,
            ..Default::default()
        };
        let (a, la) = generate(&config);
        let (b, lb) = generate(&config);
        assert_eq!(a, b);
        assert_eq!(la, lb);
        assert_eq!(a.iter().map(|b| b.num_rows()).sum::<usize>(), 6 * 400);
        assert!(!la.is_empty());
        let ts: Vec<i64> = a
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]), "stream order");
        assert!(
            la.iter()
                .all(|l| l.start_ms <= l.end_ms && l.magnitude_sigma.abs() >= 6.0)
        );
    }
}
