//! Counters of a running pipeline, shared between its tasks and read by progress reporting.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Pipeline-wide counters. All methods are cheap and lock-free.
#[derive(Debug)]
pub struct PipelineMetrics {
    source_rows: AtomicU64,
    gate_rows: AtomicU64,
    late_rows: AtomicU64,
    invalid_rows: AtomicU64,
    anomalies: AtomicU64,
    watermark: AtomicI64,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self {
            source_rows: AtomicU64::new(0),
            gate_rows: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            invalid_rows: AtomicU64::new(0),
            anomalies: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
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

    /// Current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            source_rows: self.source_rows.load(Relaxed),
            gate_rows: self.gate_rows.load(Relaxed),
            late_rows: self.late_rows.load(Relaxed),
            invalid_rows: self.invalid_rows.load(Relaxed),
            anomalies: self.anomalies.load(Relaxed),
            watermark: self.watermark.load(Relaxed),
        }
    }
}
