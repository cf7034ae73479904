//! Counters of a running pipeline, shared between its tasks and read by progress reporting.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Pipeline-wide counters. All methods are cheap and lock-free.
#[derive(Debug)]
pub struct PipelineMetrics {
    source_rows: AtomicU64,
    gate_rows: AtomicU64,
    late_rows: AtomicU64,
    invalid_rows: AtomicU64,
    anomalies: AtomicU64,
    rejected_records: AtomicU64,
    watermark: AtomicI64,
    /// Per shard being read: milliseconds behind the tip (-1 when unknown).
    shard_lag: Mutex<BTreeMap<String, i64>>,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self {
            source_rows: AtomicU64::new(0),
            gate_rows: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            invalid_rows: AtomicU64::new(0),
            anomalies: AtomicU64::new(0),
            rejected_records: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            shard_lag: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A consistent-enough snapshot of [`PipelineMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Rows read by the source.
    pub source_rows: u64,
    /// Rows released by the event-time gate to the rules.
    pub gate_rows: u64,
    /// Rows later than the watermark (dead-lettered).
    pub late_rows: u64,
    /// Rows without a timestamp or resource (dead-lettered).
    pub invalid_rows: u64,
    /// Anomaly rows produced.
    pub anomalies: u64,
    /// Source records (or samples) that could not be decoded (dead-lettered).
    pub rejected_records: u64,
    /// Current watermark (ms), `i64::MIN` before the first.
    pub watermark: i64,
}

impl PipelineMetrics {
    pub(crate) fn add_source_rows(&self, n: u64) {
        self.source_rows.fetch_add(n, Relaxed);
    }
    pub(crate) fn add_gate_rows(&self, n: u64) {
        self.gate_rows.fetch_add(n, Relaxed);
    }
    pub(crate) fn add_late_rows(&self, n: u64) {
        self.late_rows.fetch_add(n, Relaxed);
    }
    pub(crate) fn add_invalid_rows(&self, n: u64) {
        self.invalid_rows.fetch_add(n, Relaxed);
    }
    pub(crate) fn add_anomalies(&self, n: u64) {
        self.anomalies.fetch_add(n, Relaxed);
    }
    pub(crate) fn set_watermark(&self, w: i64) {
        self.watermark.fetch_max(w, Relaxed);
    }
    pub(crate) fn add_rejected_records(&self, n: u64) {
        self.rejected_records.fetch_add(n, Relaxed);
    }
    pub(crate) fn set_shard_lag(&self, shard: &str, millis_behind: i64) {
        let mut lag = self.shard_lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.insert(shard.to_string(), millis_behind);
    }
    pub(crate) fn remove_shard(&self, shard: &str) {
        let mut lag = self.shard_lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.remove(shard);
    }

    /// Milliseconds behind the tip per shard being read (-1 when unknown).
    pub fn shard_lag(&self) -> BTreeMap<String, i64> {
        self.shard_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            source_rows: self.source_rows.load(Relaxed),
            gate_rows: self.gate_rows.load(Relaxed),
            late_rows: self.late_rows.load(Relaxed),
            invalid_rows: self.invalid_rows.load(Relaxed),
            anomalies: self.anomalies.load(Relaxed),
            rejected_records: self.rejected_records.load(Relaxed),
            watermark: self.watermark.load(Relaxed),
        }
    }
}
