//! Severity and confidence of a z-score, the reference fleet's mapping.
//!
//! | \|z\| | severity |
//! |---|---|
//! | > 5 | `CRITICAL` |
//! | > 4 | `HIGH` |
//! | > 3 | `MEDIUM` |
//! | otherwise | `LOW` |
//!
//! confidence = min(\|z\| / 10, 1). A NaN score is `LOW` with confidence 0: it never raises an
//! alert by itself.

use std::fmt;

/// Severity of an anomaly, ordered from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Below every alerting threshold.
    Low,
    /// |z| > 3.
    Medium,
    /// |z| > 4.
    High,
    /// |z| > 5.
    Critical,
}

impl Severity {
    /// All severities, least severe first.
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    /// The upper-case name stored in the incident log.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "LOW",
            Severity::Medium => "MEDIUM",
            Severity::High => "HIGH",
            Severity::Critical => "CRITICAL",
        }
    }

    /// Parses a stored name (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|sev| sev.as_str().eq_ignore_ascii_case(s))
    }

    /// Severity of a z-score.
    pub fn from_zscore(z: f64) -> Self {
        let a = z.abs();
        if a > 5.0 {
            Severity::Critical
        } else if a > 4.0 {
            Severity::High
        } else if a > 3.0 {
            Severity::Medium
        } else {
            // Also NaN: every comparison above is false.
            Severity::Low
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Confidence of a z-score: min(|z| / 10, 1), 0 for NaN.
pub fn zscore_confidence(z: f64) -> f64 {
    if z.is_nan() {
        0.0
    } else {
        (z.abs() / 10.0).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_strict() {
        assert_eq!(Severity::from_zscore(3.0), Severity::Low);
        assert_eq!(Severity::from_zscore(3.0001), Severity::Medium);
        assert_eq!(Severity::from_zscore(-4.5), Severity::High);
        assert_eq!(Severity::from_zscore(5.0), Severity::High);
        assert_eq!(Severity::from_zscore(f64::INFINITY), Severity::Critical);
        assert_eq!(Severity::from_zscore(f64::NAN), Severity::Low);
        assert_eq!(Severity::parse("critical"), Some(Severity::Critical));
        assert_eq!(Severity::parse("nope"), None);
    }

    #[test]
    fn confidence_is_clamped() {
        assert_eq!(zscore_confidence(-3.5), 0.35);
        assert_eq!(zscore_confidence(12.0), 1.0);
        assert_eq!(zscore_confidence(f64::NAN), 0.0);
    }
}
