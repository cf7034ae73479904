//! Isolation forest (Liu, Ting & Zhou 2008) with flat trees, scored in batches.
//!
//! Training follows scikit-learn's `IsolationForest`: each tree is grown on `sample_size`
//! rows drawn without replacement, to a depth of at most ⌈log₂ sample_size⌉; a node splits
//! on a feature drawn at random among those not constant in the node, at a threshold drawn
//! uniformly between the feature's minimum and maximum there. The anomaly score of a row is
//! `2^(−E[h(x)] / c(ψ))` where `h` is the path length (depth of the leaf plus `c(n)` for the
//! `n` training rows left in it) and `c` the average path length of an unsuccessful search in
//! a binary search tree. Scores are in (0, 1]; higher is more anomalous, and they rank rows as
//! scikit-learn's `-score_samples` does.
//!
//! Trees are stored as flat node arrays and scored tree by tree over a whole batch, so a tree
//! stays in cache while every row of the batch walks it. Training is deterministic for a
//! seed.

use crate::{OperatorError, Result};

/// Euler–Mascheroni constant.
const EULER_GAMMA: f64 = 0.577_215_664_901_532_9;

/// Average path length of an unsuccessful search in a BST of `n` nodes.
pub fn average_path_length(n: usize) -> f64 {
    match n {
        0 | 1 => 0.0,
        2 => 1.0,
        _ => {
            let n = n as f64;
            2.0 * ((n - 1.0).ln() + EULER_GAMMA) - 2.0 * (n - 1.0) / n
        }
    }
}

/// Training parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestConfig {
    /// Number of trees.
    pub trees: usize,
    /// Rows per tree (ψ); capped by the number of training rows.
    pub sample_size: usize,
    /// Expected share of anomalies, used to derive the score threshold.
    pub contamination: f64,
    /// RNG seed.
    pub seed: u64,
}

impl Default for ForestConfig {
    fn default() -> Self {
        Self {
            trees: 100,
            sample_size: 256,
            contamination: 0.01,
            seed: 0,
        }
    }
}

/// One node of a flat tree. A leaf has `feature == LEAF` and stores its path-length
/// contribution (depth + c(n)) in `value`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    feature: u32,
    value: f64,
    left: u32,
    right: u32,
}

const LEAF: u32 = u32::MAX;

/// A trained forest.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationForest {
    features: usize,
    sample_size: usize,
    trees: Vec<Vec<Node>>,
    /// Score at the (1 − contamination) quantile of the training rows.
    threshold: f64,
}

/// SplitMix64: small, seedable and stable across releases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl IsolationForest {
    /// Trains on `rows` rows of `features` features, row-major in `data`. NaN values are not
    /// allowed (impute or drop them first).
    pub fn fit(data: &[f64], features: usize, config: &ForestConfig) -> Result<Self> {
        if features == 0 || data.is_empty() || !data.len().is_multiple_of(features) {
            return Err(OperatorError::InvalidInput(format!(
                "training data of {} values is not a non-empty multiple of {features} features",
                data.len()
            )));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(OperatorError::InvalidInput(
                "training data holds NaN or infinite values".into(),
            ));
        }
        if config.trees == 0
            || config.sample_size < 2
            || !(0.0..0.5).contains(&config.contamination)
        {
            return Err(OperatorError::InvalidInput(format!(
                "invalid forest config {config:?}"
            )));
        }
        let rows = data.len() / features;
        let psi = config.sample_size.min(rows);
        let max_depth = (psi as f64).log2().ceil() as usize;
        let mut rng = Rng(config.seed ^ 0x5eed_f0e5_7000_0001);
        let mut trees = Vec::with_capacity(config.trees);
        let mut all: Vec<u32> = (0..rows as u32).collect();
        for _ in 0..config.trees {
            // Partial Fisher–Yates: the first psi entries are a sample without replacement.
            for i in 0..psi {
                let j = i + rng.below(rows - i);
                all.swap(i, j);
            }
            let mut sample = all[..psi].to_vec();
            let mut nodes = Vec::with_capacity(2 * psi);
            grow(
                data,
                features,
                &mut sample,
                0,
                max_depth,
                &mut rng,
                &mut nodes,
            );
            trees.push(nodes);
        }
        let mut forest = Self {
            features,
            sample_size: psi,
            trees,
            threshold: 1.0,
        };
        let mut scores = vec![0.0; rows];
        forest.score_rows(data, &mut scores)?;
        scores.sort_by(f64::total_cmp);
        let k = ((1.0 - config.contamination) * rows as f64).floor() as usize;
        forest.threshold = scores[k.min(rows - 1)];
        Ok(forest)
    }

    /// Number of features.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Score above which a row is an outlier at the configured contamination.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Scores row-major `data` into `out` (one score per row).
    pub fn score_rows(&self, data: &[f64], out: &mut [f64]) -> Result<()> {
        if data.len() != out.len() * self.features {
            return Err(OperatorError::InvalidInput(format!(
                "{} values for {} rows of {} features",
                data.len(),
                out.len(),
                self.features
            )));
        }
        let columns: Vec<Vec<f64>> = (0..self.features)
            .map(|f| {
                data.iter()
                    .skip(f)
                    .step_by(self.features)
                    .copied()
                    .collect()
            })
            .collect();
        let refs: Vec<&[f64]> = columns.iter().map(Vec::as_slice).collect();
        self.score_columns(&refs, out)
    }

    /// Scores column-major input (`columns[f][row]`) into `out`. NaN features take the left
    /// branch, so a row with missing values still gets a finite score.
    pub fn score_columns(&self, columns: &[&[f64]], out: &mut [f64]) -> Result<()> {
        if columns.len() != self.features || columns.iter().any(|c| c.len() != out.len()) {
            return Err(OperatorError::InvalidInput(format!(
                "expected {} feature columns of {} rows",
                self.features,
                out.len()
            )));
        }
        out.iter_mut().for_each(|o| *o = 0.0);
        for tree in &self.trees {
            for (row, acc) in out.iter_mut().enumerate() {
                let mut node = &tree[0];
                while node.feature != LEAF {
                    let x = columns[node.feature as usize][row];
                    node = &tree[if x < node.value || x.is_nan() {
                        node.left
                    } else {
                        node.right
                    } as usize];
                }
                *acc += node.value;
            }
        }
        let norm = self.trees.len() as f64 * average_path_length(self.sample_size);
        for o in out.iter_mut() {
            *o = (-(*o) / norm).exp2();
        }
        Ok(())
    }
}

fn leaf(depth: usize, n: usize, nodes: &mut Vec<Node>) -> u32 {
    nodes.push(Node {
        feature: LEAF,
        value: depth as f64 + average_path_length(n),
        left: 0,
        right: 0,
    });
    (nodes.len() - 1) as u32
}

fn grow(
    data: &[f64],
    features: usize,
    rows: &mut [u32],
    depth: usize,
    max_depth: usize,
    rng: &mut Rng,
    nodes: &mut Vec<Node>,
) -> u32 {
    if depth >= max_depth || rows.len() <= 1 {
        return leaf(depth, rows.len(), nodes);
    }
    // Draw features without replacement until one is not constant in this node.
    let mut candidates: Vec<u32> = (0..features as u32).collect();
    let mut split = None;
    while !candidates.is_empty() {
        let f = candidates.swap_remove(rng.below(candidates.len())) as usize;
        let (lo, hi) = rows
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| {
                let v = data[r as usize * features + f];
                (lo.min(v), hi.max(v))
            });
        if hi > lo {
            split = Some((f, lo + rng.uniform() * (hi - lo), lo));
            break;
        }
    }
    let Some((feature, mut threshold, lo)) = split else {
        return leaf(depth, rows.len(), nodes);
    };
    if threshold <= lo {
        // uniform() can return 0: keep at least one row on the left.
        threshold = f64::from_bits(lo.to_bits() + 1);
    }
    let mut cut = 0;
    for i in 0..rows.len() {
        if data[rows[i] as usize * features + feature] < threshold {
            rows.swap(i, cut);
            cut += 1;
        }
    }
    let index = nodes.len();
    nodes.push(Node {
        feature: feature as u32,
        value: threshold,
        left: 0,
        right: 0,
    });
    let (left_rows, right_rows) = rows.split_at_mut(cut);
    let left = grow(data, features, left_rows, depth + 1, max_depth, rng, nodes);
    let right = grow(data, features, right_rows, depth + 1, max_depth, rng, nodes);
    nodes[index].left = left;
    nodes[index].right = right;
    index as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(rng: &mut Rng) -> f64 {
        let u1 = rng.uniform().max(1e-300);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * rng.uniform()).cos()
    }

    /// AUROC of scores against labels (ties count half).
    fn auroc(scores: &[f64], labels: &[bool]) -> f64 {
        let (mut pairs, mut wins) = (0.0, 0.0);
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
        wins / pairs
    }

    #[test]
    fn path_length_constants() {
        assert_eq!(average_path_length(1), 0.0);
        assert_eq!(average_path_length(2), 1.0);
        // c(256) as in the original paper and scikit-learn.
        assert!((average_path_length(256) - 10.244_770_920_116_851).abs() < 1e-9);
    }

    #[test]
    fn separates_outliers_and_is_deterministic() {
        let mut rng = Rng(7);
        let (n, d) = (2000, 4);
        let mut data = Vec::with_capacity(n * d);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let outlier = i % 100 == 0;
            for _ in 0..d {
                data.push(normal(&mut rng) + if outlier { 6.0 } else { 0.0 });
            }
            labels.push(outlier);
        }
        let config = ForestConfig {
            seed: 3,
            ..ForestConfig::default()
        };
        let forest = IsolationForest::fit(&data, d, &config).unwrap();
        assert_eq!(
            forest,
            IsolationForest::fit(&data, d, &config).unwrap(),
            "same seed, same forest"
        );
        let mut scores = vec![0.0; n];
        forest.score_rows(&data, &mut scores).unwrap();
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
        let auc = auroc(&scores, &labels);
        assert!(auc > 0.99, "AUROC {auc}");
        let flagged = scores.iter().filter(|&&s| s > forest.threshold()).count();
        assert!(
            flagged <= n / 100 + 1,
            "contamination 1%: {flagged} flagged"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let config = ForestConfig::default();
        assert!(IsolationForest::fit(&[], 2, &config).is_err());
        assert!(IsolationForest::fit(&[1.0, 2.0, 3.0], 2, &config).is_err());
        assert!(IsolationForest::fit(&[1.0, f64::NAN], 1, &config).is_err());
        let forest = IsolationForest::fit(&[1.0, 2.0, 3.0, 4.0], 1, &config).unwrap();
        assert!(forest.score_rows(&[1.0, 2.0], &mut [0.0]).is_err());
        // Constant training data: every tree is a single leaf, scores are defined.
        let flat = IsolationForest::fit(&[5.0; 64], 2, &config).unwrap();
        let mut out = [0.0; 2];
        flat.score_rows(&[5.0, 5.0, 100.0, f64::NAN], &mut out)
            .unwrap();
        assert!(out.iter().all(|s| s.is_finite()));
    }
}
