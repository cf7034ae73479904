//! `healer eval smd`: detection on the Server Machine Dataset.
//!
//! For every machine with test labels: fit a [`Detector`] on `train/` only, score `test/`,
//! and report point-wise F1 at the best threshold (no point adjustment), the point-adjusted
//! F1, AUROC and AUPRC (average precision), all computed over the machine's rows; the means
//! over machines are what the published tables report. Each row's score may be averaged
//! with those of the rows before it ([`Smoother`]), which a stream can do as well.
//!
//! Culprit metrics: for each labelled segment of `interpretation_label/`, the dimensions
//! are ranked by their share of the Gaussian deviation over the segment, the mean of z² with
//! the training data's mean and standard deviation (whatever the detector, so the ranking
//! needs no model internals). A segment is a hit when one of its labelled dimensions is
//! among the top three. (Ranking by the robust deviation |x − median| / MAD instead hits
//! 0.66 of the segments on the four labelled machines, against 0.89.)

use std::path::{Path, PathBuf};

use healer_operators::iforest::ForestConfig;
use healer_operators::iforest_model::IforestModel;
use healer_operators::scoring::{auroc, average_precision, best_f1, best_point_adjusted_f1};

use crate::train::{Table, parse_csv};

/// Errors of the evaluation.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct SmdError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// What scores the test rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Detector {
    /// healer's isolation forest (the model `healer train iforest` writes, its defaults: 100
    /// trees, 256 rows per tree, seed 0) over all metrics.
    #[value(name = "iforest")]
    Forest,
    /// Gaussian deviation: Σ over metrics of z², z = (x − mean) / std with each metric's
    /// mean and population standard deviation on the training data (a metric constant there
    /// is measured in its own units); close to the "raw signal" detector of Garg et al.
    /// (2021), whose exact scoring may differ.
    Gaussian,
}

impl Detector {
    /// A one-line description, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Detector::Forest => "isolation forest (100 trees × 256 rows, seed 0)",
            Detector::Gaussian => "Gaussian deviation (Σ z² against train/'s mean and std)",
        }
    }
}

/// The default smoothing horizon in rows: ten minutes at SMD's one-minute sampling.
pub const DEFAULT_SMOOTH: usize = 10;

/// How a row's score is averaged with the scores before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Smoother {
    /// Exponentially weighted mean with time constant `smooth` rows: s ← s + (x − s) / smooth.
    /// One number of state per series, and a deviation fades out instead of dropping out of
    /// the average all at once `smooth` rows later.
    #[value(name = "exp")]
    Exponential,
    /// Plain mean of the last `smooth` rows (fewer at the start).
    Window,
}

impl Smoother {
    /// Smooths `scores` in one pass; a horizon of 1 leaves them as they are.
    fn apply(self, scores: &[f64], horizon: usize) -> Vec<f64> {
        match self {
            Smoother::Exponential => exponential_mean(scores, horizon),
            Smoother::Window => trailing_mean(scores, horizon),
        }
    }

    /// A few words for reports.
    pub fn describe(self, horizon: usize) -> String {
        match self {
            Smoother::Exponential => {
                format!("exponentially averaged, time constant {horizon} row(s)")
            }
            Smoother::Window => format!("averaged over the last {horizon} row(s)"),
        }
    }
}

/// How `healer eval smd` scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmdOptions {
    /// The detector.
    pub detector: Detector,
    /// The smoothing horizon in rows (1: no smoothing).
    pub smooth: usize,
    /// How the horizon is applied.
    pub smoother: Smoother,
}

impl Default for SmdOptions {
    fn default() -> Self {
        Self {
            detector: Detector::Gaussian,
            smooth: DEFAULT_SMOOTH,
            smoother: Smoother::Exponential,
        }
    }
}

/// A training column's mean and population standard deviation (1 when it is constant).
fn mean_std(column: &[f64]) -> (f64, f64) {
    let n = column.len().max(1) as f64;
    let mean = column.iter().sum::<f64>() / n;
    let std = (column.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    (mean, if std > 0.0 { std } else { 1.0 })
}

/// Σ z² of every test row against each column's training mean and standard deviation.
fn gaussian_scores(centre: &[(f64, f64)], test: &[&[f64]], rows: usize) -> Vec<f64> {
    let mut scores = vec![0.0; rows];
    for (&(mean, std), te) in centre.iter().zip(test) {
        for (s, x) in scores.iter_mut().zip(te.iter()) {
            let z = (x - mean) / std;
            *s += z * z;
        }
    }
    scores
}

/// Each score replaced by the mean of the last `k` (fewer at the start), in one pass.
fn trailing_mean(scores: &[f64], k: usize) -> Vec<f64> {
    let k = k.max(1);
    let mut sum = 0.0;
    scores
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            sum += x;
            if i >= k {
                sum -= scores[i - k];
            }
            sum / (i + 1).min(k) as f64
        })
        .collect()
}

/// Each score replaced by its exponentially weighted mean with time constant `k` rows,
/// starting from the first score.
fn exponential_mean(scores: &[f64], k: usize) -> Vec<f64> {
    let alpha = 1.0 / k.max(1) as f64;
    let mut mean = scores.first().copied().unwrap_or(0.0);
    scores
        .iter()
        .map(|&x| {
            mean += alpha * (x - mean);
            mean
        })
        .collect()
}

/// The scores of one machine.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineScores {
    /// Machine name.
    pub machine: String,
    /// Test rows.
    pub rows: usize,
    /// Point-wise F1 at the best threshold.
    pub f1: f64,
    /// Point-adjusted F1 at its best threshold.
    pub f1_point_adjusted: f64,
    /// Area under the ROC curve.
    pub auroc: f64,
    /// Average precision.
    pub auprc: f64,
    /// Labelled segments with a culprit among the top three, and all labelled segments.
    pub culprits: Option<(usize, usize)>,
}

fn read_table(path: &Path) -> Result<Table, SmdError> {
    let err = |reason: String| SmdError {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse_csv(&path.display().to_string(), &text).map_err(err)
}

/// `start-end:d,d,…` lines (rows and 1-based dimensions).
fn parse_interpretation(text: &str) -> Vec<(usize, usize, Vec<usize>)> {
    text.lines()
        .filter_map(|l| {
            let (range, dims) = l.trim().split_once(':')?;
            let (a, b) = range.split_once('-')?;
            let dims = dims
                .split(',')
                .filter_map(|d| d.trim().parse::<usize>().ok())
                .collect();
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?, dims))
        })
        .collect()
}

/// Evaluates one machine.
pub fn evaluate_machine(
    dataset: &Path,
    machine: &str,
    options: &SmdOptions,
) -> Result<MachineScores, SmdError> {
    let file = format!("{machine}.txt");
    let train = read_table(&dataset.join("train").join(&file))?;
    let test = read_table(&dataset.join("test").join(&file))?;
    let label_path = dataset.join("test_label").join(&file);
    let err = |path: &Path, reason: String| SmdError {
        path: path.to_path_buf(),
        reason,
    };
    let labels: Vec<bool> = std::fs::read_to_string(&label_path)
        .map_err(|e| err(&label_path, e.to_string()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim() != "0")
        .collect();
    if labels.len() != test.rows() {
        return Err(err(
            &label_path,
            format!("{} labels for {} test rows", labels.len(), test.rows()),
        ));
    }
    let train_columns = train
        .select(&train.names)
        .map_err(|e| err(&label_path, e))?;
    let test_columns = test.select(&train.names).map_err(|e| err(&label_path, e))?;
    // Each dimension's mean and standard deviation on the training data: the Gaussian
    // detector's parameters and the culprit ranking's scale.
    let centre: Vec<(f64, f64)> = train_columns.iter().map(|c| mean_std(c)).collect();
    let scores = match options.detector {
        Detector::Forest => {
            let model = IforestModel::train(
                train.names.clone(),
                &train_columns,
                &ForestConfig::default(),
                vec![],
            )
            .map_err(|e| err(&label_path, e.to_string()))?;
            let mut scores = vec![0.0; test.rows()];
            model
                .forest
                .score_columns_parallel(&test_columns, &mut scores, 2)
                .map_err(|e| err(&label_path, e.to_string()))?;
            scores
        }
        Detector::Gaussian => gaussian_scores(&centre, &test_columns, test.rows()),
    };
    let scores = options.smoother.apply(&scores, options.smooth);
    let missing = |what: &str| {
        err(
            &label_path,
            format!("{what}: no positive or no negative row"),
        )
    };
    let f1 = best_f1(&scores, &labels).ok_or_else(|| missing("F1"))?;
    let pa = best_point_adjusted_f1(&scores, &labels).ok_or_else(|| missing("F1"))?;
    let auc = auroc(&scores, &labels).ok_or_else(|| missing("AUROC"))?;
    let ap = average_precision(&scores, &labels).ok_or_else(|| missing("AUPRC"))?;

    let interpretation = dataset.join("interpretation_label").join(&file);
    let culprits = match std::fs::read_to_string(&interpretation) {
        Ok(text) => {
            let segments = parse_interpretation(&text);
            let mut hits = 0;
            for (start, end, dims) in &segments {
                let (start, end) = (*start, (*end).min(test.rows().saturating_sub(1)));
                let mut ranked: Vec<(usize, f64)> = test_columns
                    .iter()
                    .zip(&centre)
                    .enumerate()
                    .map(|(d, (col, &(m, std)))| {
                        let rows = &col[start.min(end)..=end];
                        let z2 = |x: &f64| ((x - m) / std).powi(2);
                        let mean = rows.iter().map(z2).sum::<f64>() / rows.len().max(1) as f64;
                        (d + 1, mean)
                    })
                    .collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                if ranked.iter().take(3).any(|(d, _)| dims.contains(d)) {
                    hits += 1;
                }
            }
            Some((hits, segments.len()))
        }
        Err(_) => None,
    };
    Ok(MachineScores {
        machine: machine.to_string(),
        rows: test.rows(),
        f1: f1.f1,
        f1_point_adjusted: pa.f1,
        auroc: auc,
        auprc: ap,
        culprits,
    })
}

/// The machines with test labels, in name order.
pub fn labelled_machines(dataset: &Path) -> Result<Vec<String>, SmdError> {
    let dir = dataset.join("test_label");
    let mut machines: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| SmdError {
            path: dir.clone(),
            reason: e.to_string(),
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".txt")
                .map(String::from)
        })
        .collect();
    machines.sort();
    Ok(machines)
}

/// Evaluates every machine with test labels, in name order.
pub fn evaluate(dataset: &Path, options: &SmdOptions) -> Result<Vec<MachineScores>, SmdError> {
    labelled_machines(dataset)?
        .iter()
        .map(|m| evaluate_machine(dataset, m, options))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_mean_averages_the_last_k() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(trailing_mean(&x, 1), x.to_vec());
        assert_eq!(trailing_mean(&x, 2), vec![1.0, 1.5, 2.5, 3.5, 4.5]);
        assert_eq!(trailing_mean(&x, 10), vec![1.0, 1.5, 2.0, 2.5, 3.0]);
    }

    #[test]
    fn exponential_mean_follows_with_time_constant_k() {
        let x = [4.0, 0.0, 0.0, 8.0];
        assert_eq!(exponential_mean(&x, 1), x.to_vec());
        // s ← s + (x − s) / 2 from s = 4.
        assert_eq!(exponential_mean(&x, 2), vec![4.0, 2.0, 1.0, 4.5]);
        assert_eq!(exponential_mean(&[], 10), Vec::<f64>::new());
        assert_eq!(Smoother::Window.apply(&x, 2), vec![4.0, 2.0, 0.0, 4.0]);
    }

    #[test]
    fn gaussian_scores_sum_squared_z() {
        // Training mean 2 and std 1 in the first metric; the second is constant (std 1).
        let (a, b) = ([1.0, 3.0], [5.0, 5.0]);
        let centre = [mean_std(&a), mean_std(&b)];
        assert_eq!(centre, [(2.0, 1.0), (5.0, 1.0)]);
        let (ta, tb) = ([2.0, 4.0], [5.0, 7.0]);
        let s = gaussian_scores(&centre, &[&ta, &tb], 2);
        assert_eq!(s, vec![0.0, 4.0 + 4.0]);
    }

    #[test]
    fn interpretation_lines() {
        let parsed = parse_interpretation("4629-4688:9,10,11\n5486-5491:18\n\nbad\n");
        assert_eq!(
            parsed,
            vec![(4629, 4688, vec![9, 10, 11]), (5486, 5491, vec![18])]
        );
    }
}
