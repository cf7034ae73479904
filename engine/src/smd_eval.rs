//! `healer eval smd`: the isolation forest on the Server Machine Dataset.
//!
//! For every machine with test labels: fit healer's isolation forest (the model `healer
//! train iforest` writes, its defaults: 100 trees, 256 rows per tree) on `train/` only, score
//! `test/`, and report point-wise F1 at the best threshold (no point adjustment), the
//! point-adjusted F1, AUROC and AUPRC (average precision), all computed over the machine's
//! rows; the means over machines are what the published tables report.
//!
//! Culprit metrics: for each labelled segment of `interpretation_label/`, the dimensions
//! are ranked by their mean robust deviation over the segment, |x − median| / MAD with the
//! median and MAD of the training data (a per-metric score that needs no model internals).
//! A segment is a hit when one of its labelled dimensions is among the top three.

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

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
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
pub fn evaluate_machine(dataset: &Path, machine: &str) -> Result<MachineScores, SmdError> {
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
            // Robust per-dimension deviation against the training data.
            let centre: Vec<(f64, f64)> = train_columns
                .iter()
                .map(|c| {
                    let mut v: Vec<f64> = c.iter().copied().filter(|x| x.is_finite()).collect();
                    let m = median(&mut v);
                    let mut dev: Vec<f64> = v.iter().map(|x| (x - m).abs()).collect();
                    let mad = median(&mut dev);
                    (m, if mad > 1e-9 { mad } else { 1e-9 })
                })
                .collect();
            let segments = parse_interpretation(&text);
            let mut hits = 0;
            for (start, end, dims) in &segments {
                let (start, end) = (*start, (*end).min(test.rows().saturating_sub(1)));
                let mut ranked: Vec<(usize, f64)> = test_columns
                    .iter()
                    .zip(&centre)
                    .enumerate()
                    .map(|(d, (col, &(m, mad)))| {
                        let rows = &col[start.min(end)..=end];
                        let mean = rows.iter().map(|x| (x - m).abs() / mad).sum::<f64>()
                            / rows.len().max(1) as f64;
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
pub fn evaluate(dataset: &Path) -> Result<Vec<MachineScores>, SmdError> {
    labelled_machines(dataset)?
        .iter()
        .map(|m| evaluate_machine(dataset, m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpretation_lines() {
        let parsed = parse_interpretation("4629-4688:9,10,11\n5486-5491:18\n\nbad\n");
        assert_eq!(
            parsed,
            vec![(4629, 4688, vec![9, 10, 11]), (5486, 5491, vec![18])]
        );
    }
}
