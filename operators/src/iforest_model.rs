//! Isolation-forest model files: a trained [`IsolationForest`] with everything needed to use
//! it safely on live data.
//!
//! A model file is JSON (`format = "healer.iforest"`, `version = 1`) and carries
//!
//! * `features`: the names of the input columns, in order; a rule must pass exactly these;
//! * `preprocessing`: none is applied, because the forest is invariant to per-feature affine
//!   scaling; missing values go left at every split (`"missing": "left"`);
//! * `config`: trees, sample size, contamination and seed of the training run;
//! * `training`: rows used, rows dropped for holding a missing value, the sources, and a
//!   fingerprint (128-bit FNV over feature names and every training value) that identifies
//!   the training data;
//! * `threshold`: the score at the (1 − contamination) quantile of the training rows;
//! * `score_quantiles`: 1001 evenly spaced quantiles of the training scores, from which
//!   [`IforestModel::confidence`] reads the share of normal rows that score lower;
//! * `trees`: per tree, columns `feature`, `threshold`, `left`, `right`, `leaf_value`.
//!
//! Every floating-point value is written as a string in Rust's shortest round-trip form and
//! parsed back exactly, so a model read from its file scores bit-for-bit like the one that
//! was written.
//!
//! # Confidence and severity
//! `confidence(score)` is the empirical CDF of the training scores at `score`: the share of
//! training rows that score lower. A score at the threshold has confidence 1 − contamination.
//! Severity: above the highest training score `CRITICAL`, above the 99.9th percentile `HIGH`,
//! above the threshold `MEDIUM`, else `LOW`.

use serde::{Deserialize, Serialize};

use crate::id::StableHasher;
use crate::iforest::{ForestConfig, ForestParts, IsolationForest, LEAF, PartNode};
use crate::severity::Severity;
use crate::{OperatorError, Result};

/// The `format` field of a model file.
pub const FORMAT: &str = "healer.iforest";
/// The newest model-file version this build reads and writes.
pub const VERSION: u32 = 1;
const QUANTILES: usize = 1001;

/// Where the training data came from and how much of it was used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    /// Rows the forest was trained on.
    pub rows: u64,
    /// Rows left out because a feature was missing.
    pub dropped_rows: u64,
    /// Input files or other descriptions of the data.
    pub sources: Vec<String>,
    /// 128-bit FNV fingerprint (hex) of the feature names and training values.
    pub fingerprint: String,
}

/// A trained isolation forest with its feature names, training facts and score calibration.
#[derive(Debug, Clone, PartialEq)]
pub struct IforestModel {
    /// Input column names, in order.
    pub features: Vec<String>,
    /// The training parameters.
    pub config: ForestConfig,
    /// The training data's facts.
    pub training: TrainingInfo,
    /// The forest.
    pub forest: IsolationForest,
    /// Quantiles of the training scores, ascending.
    quantiles: Vec<f64>,
}

impl IforestModel {
    /// Trains on `columns` (one slice per feature, all of one length). Rows with a NaN in any
    /// feature are dropped and counted.
    pub fn train(
        features: Vec<String>,
        columns: &[&[f64]],
        config: &ForestConfig,
        sources: Vec<String>,
    ) -> Result<Self> {
        if features.is_empty() || features.len() != columns.len() {
            return Err(OperatorError::InvalidInput(format!(
                "{} feature names for {} columns",
                features.len(),
                columns.len()
            )));
        }
        let rows = columns[0].len();
        if columns.iter().any(|c| c.len() != rows) {
            return Err(OperatorError::InvalidInput(
                "feature columns differ in length".into(),
            ));
        }
        let d = columns.len();
        let mut data = Vec::with_capacity(rows * d);
        let mut dropped = 0u64;
        let mut hasher = StableHasher::new();
        hasher.str("iforest-training/v1");
        for f in &features {
            hasher.str(f);
        }
        for r in 0..rows {
            if columns.iter().any(|c| !c[r].is_finite()) {
                dropped += 1;
                continue;
            }
            for c in columns {
                data.push(c[r]);
                hasher.i64(c[r].to_bits() as i64);
            }
        }
        let kept = data.len() / d;
        if kept < 2 {
            return Err(OperatorError::InvalidInput(format!(
                "{kept} complete training rows ({dropped} dropped for missing values): need at least 2"
            )));
        }
        let forest = IsolationForest::fit(&data, d, config)?;
        let mut scores = vec![0.0; kept];
        forest.score_rows(&data, &mut scores)?;
        scores.sort_by(f64::total_cmp);
        let quantiles = (0..QUANTILES)
            .map(|q| scores[(q * (kept - 1)) / (QUANTILES - 1)])
            .collect();
        Ok(Self {
            features,
            config: config.clone(),
            training: TrainingInfo {
                rows: kept as u64,
                dropped_rows: dropped,
                sources,
                fingerprint: hasher.hex(),
            },
            forest,
            quantiles,
        })
    }

    /// Score above which a row is an outlier at the training contamination.
    pub fn threshold(&self) -> f64 {
        self.forest.threshold()
    }

    /// Share of training rows scoring below `score` (0 for NaN).
    pub fn confidence(&self, score: f64) -> f64 {
        if score.is_nan() {
            return 0.0;
        }
        let q = &self.quantiles;
        let below = q.partition_point(|&v| v < score);
        if below == 0 {
            return 0.0;
        }
        if below == q.len() {
            return 1.0;
        }
        // Interpolate inside the quantile step that holds `score`.
        let (lo, hi) = (q[below - 1], q[below]);
        let within = if hi > lo {
            (score - lo) / (hi - lo)
        } else {
            0.0
        };
        ((below - 1) as f64 + within) / (q.len() - 1) as f64
    }

    /// The probability that a normal row scores at least `score`: `1 − confidence` up to the
    /// 99.9th percentile of the training scores; above it, log-linear from 10⁻³ there to
    /// `1 / (rows + 1)` at the highest training score, and on with that slope beyond it (an
    /// exponential tail), floored at 10⁻¹²; with fewer than 999 training rows it stays at 10⁻³
    /// above the 99.9th percentile. NaN for NaN.
    pub fn pvalue(&self, score: f64) -> f64 {
        if score.is_nan() {
            return f64::NAN;
        }
        let q = &self.quantiles;
        let (p999, top) = (q[(QUANTILES - 1) * 999 / 1000], q[q.len() - 1]);
        if score <= p999 {
            return 1.0 - self.confidence(score);
        }
        // With fewer than ~1000 training rows there is nothing to measure beyond the 99.9th
        // percentile: the tail stops at 10⁻³ rather than being extrapolated from nothing.
        let floor = 1.0 / (self.training.rows as f64 + 1.0);
        if top <= p999 || floor >= 1e-3 {
            return floor.min(1e-3);
        }
        let (lo, hi) = (1e-3f64.log10(), floor.log10());
        let log = lo + (score - p999) / (top - p999) * (hi - lo);
        10f64.powf(log).clamp(1e-12, 1e-3)
    }

    /// The severity of `score` (see the [module docs](self)).
    pub fn severity(&self, score: f64) -> Severity {
        let top = self.quantiles.last().copied().unwrap_or(f64::INFINITY);
        let p999 = self.quantiles[(QUANTILES - 1) * 999 / 1000];
        if score.is_nan() || score <= self.threshold() {
            Severity::Low
        } else if score > top {
            Severity::Critical
        } else if score > p999 {
            Severity::High
        } else {
            Severity::Medium
        }
    }

    /// Checks that `names` are the model's features, in order.
    pub fn check_features(&self, names: &[&str]) -> Result<()> {
        if names.len() != self.features.len() {
            return Err(OperatorError::InvalidInput(format!(
                "the model takes {} features ({}), got {}",
                self.features.len(),
                self.features.join(", "),
                names.len()
            )));
        }
        for (i, (got, want)) in names.iter().zip(&self.features).enumerate() {
            if got != want {
                return Err(OperatorError::InvalidInput(format!(
                    "feature {} is `{got}`, the model was trained on `{want}` (features: {})",
                    i + 1,
                    self.features.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The model file's text.
    pub fn to_json(&self) -> String {
        let parts = self.forest.to_parts();
        let file = ModelFile {
            format: FORMAT.into(),
            version: VERSION,
            features: self.features.clone(),
            preprocessing: Preprocessing {
                scaling: "none".into(),
                missing: "left".into(),
            },
            config: ConfigFile {
                trees: self.config.trees,
                sample_size: self.config.sample_size,
                contamination: exact(self.config.contamination),
                seed: self.config.seed,
            },
            training: self.training.clone(),
            sample_size: parts.sample_size,
            threshold: exact(parts.threshold),
            score_quantiles: self.quantiles.iter().copied().map(exact).collect(),
            trees: parts
                .trees
                .iter()
                .map(|nodes| TreeFile {
                    feature: nodes.iter().map(|n| n.feature).collect(),
                    threshold: nodes.iter().map(|n| exact(n.threshold)).collect(),
                    left: nodes.iter().map(|n| n.left).collect(),
                    right: nodes.iter().map(|n| n.right).collect(),
                    leaf_value: nodes.iter().map(|n| exact(n.leaf_value)).collect(),
                })
                .collect(),
        };
        serde_json::to_string(&file).expect("a model file serialises")
    }

    /// Reads a model file's text, checking its format, version, shape and every number.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |m: String| OperatorError::InvalidInput(m);
        let file: ModelFile =
            serde_json::from_str(text).map_err(|e| bad(format!("not a model file: {e}")))?;
        if file.format != FORMAT {
            return Err(bad(format!(
                "format is `{}`, expected `{FORMAT}`",
                file.format
            )));
        }
        if file.version == 0 || file.version > VERSION {
            return Err(bad(format!(
                "model-file version {} is not supported (this build reads 1..={VERSION})",
                file.version
            )));
        }
        if file.preprocessing.scaling != "none" || file.preprocessing.missing != "left" {
            return Err(bad(format!(
                "unsupported preprocessing {:?}",
                file.preprocessing
            )));
        }
        let num = |what: &str, s: &str| {
            s.parse::<f64>()
                .map_err(|_| bad(format!("{what}: `{s}` is not a number")))
        };
        let mut trees = Vec::with_capacity(file.trees.len());
        for (t, tree) in file.trees.iter().enumerate() {
            let n = tree.feature.len();
            if [
                tree.threshold.len(),
                tree.left.len(),
                tree.right.len(),
                tree.leaf_value.len(),
            ]
            .iter()
            .any(|&l| l != n)
            {
                return Err(bad(format!("tree {t}: columns differ in length")));
            }
            let mut nodes = Vec::with_capacity(n);
            for i in 0..n {
                nodes.push(PartNode {
                    feature: tree.feature[i],
                    threshold: num("threshold", &tree.threshold[i])?,
                    left: tree.left[i],
                    right: tree.right[i],
                    leaf_value: num("leaf_value", &tree.leaf_value[i])?,
                });
            }
            trees.push(nodes);
        }
        let forest = IsolationForest::from_parts(ForestParts {
            features: file.features.len(),
            sample_size: file.sample_size,
            threshold: num("threshold", &file.threshold)?,
            trees,
        })?;
        let quantiles = file
            .score_quantiles
            .iter()
            .map(|q| num("score_quantiles", q))
            .collect::<Result<Vec<_>>>()?;
        if quantiles.len() != QUANTILES || quantiles.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad(format!(
                "score_quantiles must be {QUANTILES} ascending numbers"
            )));
        }
        Ok(Self {
            features: file.features,
            config: ForestConfig {
                trees: file.config.trees,
                sample_size: file.config.sample_size,
                contamination: num("contamination", &file.config.contamination)?,
                seed: file.config.seed,
            },
            training: file.training,
            forest,
            quantiles,
        })
    }
}

/// `v` as the shortest decimal string that parses back to exactly `v`.
fn exact(v: f64) -> String {
    format!("{v:?}")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    format: String,
    version: u32,
    features: Vec<String>,
    preprocessing: Preprocessing,
    config: ConfigFile,
    training: TrainingInfo,
    sample_size: usize,
    threshold: String,
    score_quantiles: Vec<String>,
    trees: Vec<TreeFile>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Preprocessing {
    scaling: String,
    missing: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    trees: usize,
    sample_size: usize,
    contamination: String,
    seed: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeFile {
    feature: Vec<u32>,
    threshold: Vec<String>,
    left: Vec<u32>,
    right: Vec<u32>,
    leaf_value: Vec<String>,
}

// A leaf's `feature` in the file is `LEAF`; keep the two in step.
const _: () = assert!(LEAF == u32::MAX);

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> (IforestModel, Vec<Vec<f64>>) {
        // Two correlated features and a third independent one, a few NaNs.
        let n = 3000;
        let mut state = 17u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut cols: Vec<Vec<f64>> = (0..3).map(|_| Vec::with_capacity(n)).collect();
        for i in 0..n {
            let a = next();
            cols[0].push(if i % 500 == 7 { f64::NAN } else { a });
            cols[1].push(a + 0.1 * next());
            cols[2].push(next() * 100.0);
        }
        let refs: Vec<&[f64]> = cols.iter().map(Vec::as_slice).collect();
        let names = vec!["cpu".to_string(), "load".into(), "conns".into()];
        let m =
            IforestModel::train(names, &refs, &ForestConfig::default(), vec!["t".into()]).unwrap();
        (m, cols)
    }

    #[test]
    fn file_round_trip_is_exact() {
        let (m, cols) = model();
        assert_eq!(m.training.dropped_rows, 6);
        assert_eq!(m.training.rows, 2994);
        let back = IforestModel::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let refs: Vec<&[f64]> = cols.iter().map(Vec::as_slice).collect();
        let (mut a, mut b) = (vec![0.0; 3000], vec![0.0; 3000]);
        m.forest.score_columns(&refs, &mut a).unwrap();
        back.forest.score_columns(&refs, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn confidence_is_the_training_cdf() {
        let (m, _) = model();
        let t = m.threshold();
        assert!(
            (m.confidence(t) - 0.99).abs() < 0.002,
            "{}",
            m.confidence(t)
        );
        assert_eq!(m.confidence(0.0), 0.0);
        assert_eq!(m.confidence(1.0), 1.0);
        assert_eq!(m.confidence(f64::NAN), 0.0);
        assert_eq!(m.severity(t), Severity::Low);
        assert_eq!(m.severity(1.0), Severity::Critical);
        let mut last = 0.0;
        for i in 0..=100 {
            let c = m.confidence(i as f64 / 100.0);
            assert!(c >= last && (0.0..=1.0).contains(&c));
            last = c;
        }
    }

    #[test]
    fn pvalue_is_the_training_tail_and_never_rises() {
        let (m, cols) = model();
        let t = m.threshold();
        // At the threshold 1 % of training rows score at least as high.
        assert!((m.pvalue(t) - 0.01).abs() < 0.002, "{}", m.pvalue(t));
        assert_eq!(m.pvalue(0.0), 1.0);
        assert!(m.pvalue(f64::NAN).is_nan());
        // Non-increasing in the score over [0, 1], never below `floor`.
        let falls = |m: &IforestModel, floor: f64| {
            let mut last = 1.0;
            for i in 0..=1000 {
                let score = i as f64 / 1000.0;
                let p = m.pvalue(score);
                assert!(p <= last && p >= floor, "score {score}: {p} after {last}");
                last = p;
            }
        };
        falls(&m, 1e-12);
        // Past the top training score the tail is below 1 / (rows + 1).
        assert!(m.pvalue(1.0) < 1.0 / 2995.0, "{}", m.pvalue(1.0));

        // With fewer than 999 rows the tail stops at 1e-3 instead of rising.
        let small: Vec<&[f64]> = cols.iter().map(|c| &c[..200]).collect();
        let names = vec!["cpu".to_string(), "load".into(), "conns".into()];
        let s = IforestModel::train(names, &small, &ForestConfig::default(), vec![]).unwrap();
        falls(&s, 1e-3);
    }

    #[test]
    fn mismatches_and_bad_files_are_explained() {
        let (m, _) = model();
        assert!(m.check_features(&["cpu", "load", "conns"]).is_ok());
        let e = m.check_features(&["cpu", "conns", "load"]).unwrap_err();
        assert!(e.to_string().contains("feature 2 is `conns`"), "{e}");
        let e = m.check_features(&["cpu"]).unwrap_err();
        assert!(e.to_string().contains("takes 3 features"), "{e}");
        let json = m.to_json();
        let e =
            IforestModel::from_json(&json.replace("\"version\":1", "\"version\":9")).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let e = IforestModel::from_json(&json.replace("healer.iforest", "other")).unwrap_err();
        assert!(e.to_string().contains("format"), "{e}");
        assert!(IforestModel::from_json("{").is_err());
        assert!(IforestModel::from_json(&json.replace("\"seed\"", "\"sede\"")).is_err());
    }
}
