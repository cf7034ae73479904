//! Scores of detector output against labels.

/// Area under the ROC curve of `scores` (higher = more anomalous) against `labels`, by the
/// rank-sum (Mann–Whitney U) identity with tied scores sharing their average rank, so it
/// equals scikit-learn's `roc_auc_score`. `None` when either class is absent or a score is
/// NaN.
pub fn auroc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let rank = (i + j + 2) as f64 / 2.0;
        rank_sum += rank * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pairwise_definition() {
        let scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.2];
        let labels = [false, true, false, true, false, true];
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for (i, &si) in scores.iter().enumerate() {
            for (j, &sj) in scores.iter().enumerate() {
                if labels[i] && !labels[j] {
                    pairs += 1.0;
                    wins += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!((auroc(&scores, &labels).unwrap() - wins / pairs).abs() < 1e-12);
        assert_eq!(auroc(&[1.0, 2.0], &[true, true]), None);
        assert_eq!(auroc(&[f64::NAN, 2.0], &[true, false]), None);
        assert_eq!(auroc(&[1.0, 2.0], &[false, true]), Some(1.0));
    }
}

/// Precision, recall and F1 at one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct F1At {
    /// Rows with `score >= threshold` are detections.
    pub threshold: f64,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
}

fn f1_of(tp: f64, fp: f64, positives: f64, threshold: f64) -> F1At {
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let recall = if positives > 0.0 { tp / positives } else { 0.0 };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    F1At {
        threshold,
        precision,
        recall,
        f1,
    }
}

/// Indices of `scores` from the highest score down, with the end of each run of equal
/// scores (a threshold takes a whole run or none of it).
fn descending_runs(scores: &[f64]) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut ends = Vec::new();
    for i in 0..order.len() {
        if i + 1 == order.len() || scores[order[i + 1]] != scores[order[i]] {
            ends.push(i + 1);
        }
    }
    (order, ends)
}

/// Checks the inputs of the F1 and precision functions; the number of positives.
fn positives(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    (positives > 0.0).then_some(positives)
}

/// The best F1 over every threshold of `(score, positive, weight)` items.
fn best_weighted_f1(items: &[(f64, bool, f64)], positives: f64) -> Option<F1At> {
    let scores: Vec<f64> = items.iter().map(|x| x.0).collect();
    let (order, ends) = descending_runs(&scores);
    let (mut tp, mut fp, mut start) = (0.0, 0.0, 0);
    let mut best: Option<F1At> = None;
    for end in ends {
        for &k in &order[start..end] {
            let (_, positive, weight) = items[k];
            if positive {
                tp += weight;
            } else {
                fp += weight;
            }
        }
        start = end;
        let at = f1_of(tp, fp, positives, scores[order[end - 1]]);
        if best.is_none_or(|b| at.f1 > b.f1) {
            best = Some(at);
        }
    }
    best
}

/// The best point-wise F1 over every threshold (no point adjustment). `None` without
/// positives or with a NaN score.
pub fn best_f1(scores: &[f64], labels: &[bool]) -> Option<F1At> {
    let positives = positives(scores, labels)?;
    let items: Vec<(f64, bool, f64)> = scores
        .iter()
        .zip(labels)
        .map(|(&s, &l)| (s, l, 1.0))
        .collect();
    best_weighted_f1(&items, positives)
}

/// The best F1 with point adjustment (the common SMD protocol): once any row of a labelled
/// segment (a run of positive rows) is detected, every row of that segment counts as
/// detected. It flatters any detector (a random one scores high); report it next to
/// [`best_f1`], never alone.
pub fn best_point_adjusted_f1(scores: &[f64], labels: &[bool]) -> Option<F1At> {
    let positives = positives(scores, labels)?;
    // Each segment becomes detected, whole, at its highest score: one item per segment
    // (weight = its length) plus the negative rows.
    let mut items: Vec<(f64, bool, f64)> = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        if labels[i] {
            let start = i;
            let mut top = f64::NEG_INFINITY;
            while i < labels.len() && labels[i] {
                top = top.max(scores[i]);
                i += 1;
            }
            items.push((top, true, (i - start) as f64));
        } else {
            items.push((scores[i], false, 1.0));
            i += 1;
        }
    }
    best_weighted_f1(&items, positives)
}

/// Area under the precision-recall curve as average precision (scikit-learn's
/// `average_precision_score`: Σ (Rₙ − Rₙ₋₁) Pₙ over the thresholds, ties taken together).
pub fn average_precision(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = positives(scores, labels)?;
    let (order, ends) = descending_runs(scores);
    let (mut tp, mut fp, mut start) = (0.0, 0.0, 0);
    let (mut ap, mut last_recall) = (0.0, 0.0);
    for end in ends {
        for &k in &order[start..end] {
            if labels[k] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
        }
        start = end;
        let recall = tp / positives;
        ap += (recall - last_recall) * tp / (tp + fp);
        last_recall = recall;
    }
    Some(ap)
}

#[cfg(test)]
mod f1_tests {
    use super::*;

    #[test]
    fn best_f1_point_adjustment_and_average_precision() {
        let labels = [false, true, true, true, false, false, true, false];
        let scores = [0.1, 0.9, 0.2, 0.2, 0.3, 0.1, 0.8, 0.0];
        // 0.8 detects rows 1 and 6 (P 1, R 1/2, F1 2/3); 0.2 detects every positive and row
        // 4 (P 4/5, R 1, F1 8/9), the best.
        let f = best_f1(&scores, &labels).unwrap();
        assert!((f.f1 - 8.0 / 9.0).abs() < 1e-12, "{f:?}");
        assert_eq!(f.threshold, 0.2);
        // Point adjusted, 0.8 covers both segments whole: P = R = 1.
        let pa = best_point_adjusted_f1(&scores, &labels).unwrap();
        assert_eq!(pa.f1, 1.0);
        assert_eq!(pa.threshold, 0.8);
        // AP by hand: 0.9 (+, P 1, R .25), 0.8 (+, P 1, R .5), 0.3 (-), 0.2 ×2 (+ +: P 4/5,
        // R 1): .25 + .25 + .5 × .8 = 0.9.
        let ap = average_precision(&scores, &labels).unwrap();
        assert!((ap - 0.9).abs() < 1e-12, "{ap}");
        assert!(best_f1(&scores, &[false; 8]).is_none());
        assert!(average_precision(&[f64::NAN; 8], &labels).is_none());
    }
}
