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
//! Trees are stored as flat node arrays in which a leaf is its own child, so every walk takes
//! exactly `max_depth` steps with no branch on the data: each step loads child
//! `[x >= threshold]`, an indexed load instead of a jump the data would mispredict.
//! Rows are scored in blocks that stay in cache while all trees walk them, several walks
//! interleaved to hide load latency, and blocks are spread over threads. Training is
//! deterministic for a seed.
//!
//! The forest is invariant to per-feature affine scaling (a split threshold is uniform
//! between the feature's minimum and maximum, which scaling maps onto each other), so no
//! scaler is applied. A missing (NaN) feature goes left at every split on it.

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

/// One node of a flat tree, in pre-order (the left child of node `i` is `i + 1`): rows with
/// `x[feature] >= threshold` go to `children[1]`, the others (and NaN) to `children[0]`. A
/// leaf has `threshold = +inf` and both children pointing to itself, so walks stay on it, and
/// its path length (depth + c(n)) is in the tree's `leaf_value`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    threshold: f64,
    feature: u32,
    children: [u32; 2],
}

impl Node {
    fn is_leaf(&self, index: usize) -> bool {
        self.children == [index as u32; 2]
    }
}

/// The `feature` of a leaf in [`ForestParts`].
pub const LEAF: u32 = u32::MAX;

/// A flat tree.
#[derive(Debug, Clone, PartialEq)]
struct Tree {
    nodes: Vec<Node>,
    /// Path length of each node when it is a leaf, 0 for inner nodes.
    leaf_value: Vec<f64>,
}

/// A trained forest.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationForest {
    features: usize,
    sample_size: usize,
    max_depth: usize,
    trees: Vec<Tree>,
    /// Score at the (1 − contamination) quantile of the training rows.
    threshold: f64,
}

impl Tree {
    /// The invariants the scorer relies on: children index the tree, features are below
    /// `features`, one leaf value per node.
    fn check(&self, features: usize) -> bool {
        !self.nodes.is_empty()
            && self.leaf_value.len() == self.nodes.len()
            && self.nodes.iter().all(|n| {
                (n.feature as usize) < features
                    && n.children.iter().all(|&c| (c as usize) < self.nodes.len())
            })
    }

    /// Depth of the deepest leaf (children always come after their parent).
    fn depth(&self) -> usize {
        let mut depth = vec![0usize; self.nodes.len()];
        let mut deepest = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.is_leaf(i) {
                deepest = deepest.max(depth[i]);
            } else {
                for c in n.children {
                    depth[c as usize] = depth[i] + 1;
                }
            }
        }
        deepest
    }
}

/// One node of [`ForestParts`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartNode {
    /// Split feature, or [`LEAF`].
    pub feature: u32,
    /// Split threshold (rows with a smaller value go left); ignored for leaves.
    pub threshold: f64,
    /// Left child (always the next node); 0 for leaves.
    pub left: u32,
    /// Right child; 0 for leaves.
    pub right: u32,
    /// Path length of a leaf (depth + c(n)); 0 for inner nodes.
    pub leaf_value: f64,
}

/// The parts of a forest, for (de)serialisation: per tree, its nodes in pre-order.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestParts {
    /// Number of features.
    pub features: usize,
    /// Rows per tree the forest was grown on (ψ).
    pub sample_size: usize,
    /// Score threshold.
    pub threshold: f64,
    /// The trees.
    pub trees: Vec<Vec<PartNode>>,
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
            let mut tree = Tree {
                nodes: Vec::with_capacity(2 * psi),
                leaf_value: Vec::with_capacity(2 * psi),
            };
            grow(
                data,
                features,
                &mut sample,
                0,
                max_depth,
                &mut rng,
                &mut tree,
            );
            trees.push(tree);
        }
        // Walks take as many steps as the deepest leaf of any tree.
        let max_depth = trees.iter().map(Tree::depth).max().unwrap_or(0);
        let mut forest = Self {
            features,
            sample_size: psi,
            max_depth,
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

    /// Scores column-major input (`columns[f][row]`) into `out` on the calling thread. NaN
    /// features take the left branch, so a row with missing values still gets a finite score.
    pub fn score_columns(&self, columns: &[&[f64]], out: &mut [f64]) -> Result<()> {
        self.check_columns(columns, out.len())?;
        self.score_range(columns, 0, out);
        Ok(())
    }

    /// As [`IsolationForest::score_columns`], with the rows spread over `threads` threads.
    pub fn score_columns_parallel(
        &self,
        columns: &[&[f64]],
        out: &mut [f64],
        threads: usize,
    ) -> Result<()> {
        self.check_columns(columns, out.len())?;
        let threads = threads.clamp(1, out.len().div_ceil(BLOCK).max(1));
        if threads == 1 {
            self.score_range(columns, 0, out);
            return Ok(());
        }
        let per = out.len().div_ceil(threads).next_multiple_of(BLOCK);
        std::thread::scope(|scope| {
            for (i, chunk) in out.chunks_mut(per).enumerate() {
                scope.spawn(move || self.score_range(columns, i * per, chunk));
            }
        });
        Ok(())
    }

    fn check_columns(&self, columns: &[&[f64]], rows: usize) -> Result<()> {
        if columns.len() != self.features || columns.iter().any(|c| c.len() != rows) {
            return Err(OperatorError::InvalidInput(format!(
                "expected {} feature columns of {rows} rows",
                self.features,
            )));
        }
        Ok(())
    }

    /// Scores rows `first..first + out.len()`.
    ///
    /// The walks index nodes, leaf values and the block's rows without bounds checks: measured
    /// 1.45× faster than checked indexing on SMD (1.02 → 1.48 M rows/s on one thread), the
    /// checks' compares and branches being a large share of a step's few instructions.
    /// That is sound because of invariants every constructor establishes: [`IsolationForest::fit`]
    /// grows trees whose children are indices of the tree and whose features are below
    /// `features`, [`IsolationForest::from_parts`] rejects any other tree, `leaf_value` is as
    /// long as `nodes`, and [`IsolationForest::check_columns`] has checked the input's shape;
    /// [`Tree::check`] asserts them again in debug builds.
    #[allow(unsafe_code)]
    fn score_range(&self, columns: &[&[f64]], first: usize, out: &mut [f64]) {
        let norm = self.trees.len() as f64 * average_path_length(self.sample_size);
        let f = self.features;
        debug_assert!(self.trees.iter().all(|t| t.check(f)));
        // The block's rows, row-major: a walk reads `rows[row * f + feature]`, one address
        // computation from values that stay in L1/L2 while every tree walks the block.
        let mut rows = vec![0.0; BLOCK * f];
        for (b, block) in out.chunks_mut(BLOCK).enumerate() {
            let start = first + b * BLOCK;
            let n = block.len();
            for (c, column) in columns.iter().enumerate() {
                for (r, &x) in column[start..start + n].iter().enumerate() {
                    rows[r * f + c] = x;
                }
            }
            block.iter_mut().for_each(|o| *o = 0.0);
            for tree in &self.trees {
                let nodes = tree.nodes.as_slice();
                let leaf_value = tree.leaf_value.as_slice();
                // SAFETY (every `get_unchecked` below): node indices start at 0 and only ever
                // become a node's child, which is an index of `nodes` (and so of
                // `leaf_value`, as long); `feature < f` for every node, and the row offsets
                // are those of rows `< n <= BLOCK` of `rows`, which holds `BLOCK * f` values.
                let node_at = |i: u32| unsafe { nodes.get_unchecked(i as usize) };
                let value_at = |i: usize| unsafe { *rows.get_unchecked(i) };
                let mut lanes = block.chunks_exact_mut(LANES);
                let mut base = 0;
                for acc in lanes.by_ref() {
                    // LANES independent walks in lockstep: their loads overlap.
                    let mut at = [0u32; LANES];
                    for _ in 0..self.max_depth {
                        for (k, node) in at.iter_mut().enumerate() {
                            let n = node_at(*node);
                            let x = value_at((base + k) * f + n.feature as usize);
                            *node = step(n, x);
                        }
                    }
                    for (a, node) in acc.iter_mut().zip(at) {
                        *a += unsafe { *leaf_value.get_unchecked(node as usize) };
                    }
                    base += LANES;
                }
                for a in lanes.into_remainder() {
                    let mut node = 0u32;
                    for _ in 0..self.max_depth {
                        let n = node_at(node);
                        let x = value_at(base * f + n.feature as usize);
                        node = step(n, x);
                    }
                    *a += unsafe { *leaf_value.get_unchecked(node as usize) };
                    base += 1;
                }
            }
            for o in block.iter_mut() {
                *o = (-(*o) / norm).exp2();
            }
        }
    }

    /// The forest's parts, for writing a model file.
    pub fn to_parts(&self) -> ForestParts {
        ForestParts {
            features: self.features,
            sample_size: self.sample_size,
            threshold: self.threshold,
            trees: self
                .trees
                .iter()
                .map(|t| {
                    t.nodes
                        .iter()
                        .zip(&t.leaf_value)
                        .enumerate()
                        .map(|(i, (n, &v))| {
                            if n.is_leaf(i) {
                                PartNode {
                                    feature: LEAF,
                                    threshold: f64::INFINITY,
                                    left: 0,
                                    right: 0,
                                    leaf_value: v,
                                }
                            } else {
                                PartNode {
                                    feature: n.feature,
                                    threshold: n.threshold,
                                    left: n.children[0],
                                    right: n.children[1],
                                    leaf_value: 0.0,
                                }
                            }
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// A forest from its parts, checked: every child index in range and pointing forward,
    /// features in range, finite values.
    pub fn from_parts(parts: ForestParts) -> Result<Self> {
        let bad = |m: String| Err(OperatorError::InvalidInput(m));
        if parts.features == 0 || parts.sample_size < 2 || parts.trees.is_empty() {
            return bad(format!(
                "a forest needs features, a sample size of at least 2 and trees \
                 (got {} features, sample size {}, {} trees)",
                parts.features,
                parts.sample_size,
                parts.trees.len()
            ));
        }
        if !parts.threshold.is_finite() {
            return bad("the score threshold is not a finite number".into());
        }
        let mut max_depth = 0;
        let mut trees = Vec::with_capacity(parts.trees.len());
        for (t, nodes) in parts.trees.iter().enumerate() {
            if nodes.is_empty() {
                return bad(format!("tree {t} has no nodes"));
            }
            let mut tree = Tree {
                nodes: Vec::with_capacity(nodes.len()),
                leaf_value: Vec::with_capacity(nodes.len()),
            };
            let mut depth = vec![0usize; nodes.len()];
            for (i, node) in nodes.iter().enumerate() {
                let PartNode {
                    feature,
                    threshold,
                    left,
                    right,
                    leaf_value: value,
                } = *node;
                if feature == LEAF {
                    if !value.is_finite() || value < 0.0 {
                        return bad(format!("tree {t} node {i}: leaf value {value}"));
                    }
                    tree.nodes.push(Node {
                        threshold: f64::INFINITY,
                        feature: 0,
                        children: [i as u32; 2],
                    });
                    tree.leaf_value.push(value);
                    max_depth = max_depth.max(depth[i]);
                    continue;
                }
                // Pre-order: the left subtree starts right after its parent.
                if feature as usize >= parts.features
                    || !threshold.is_finite()
                    || left as usize != i + 1
                    || (right as usize) <= i + 1
                    || (right as usize) >= nodes.len()
                {
                    return bad(format!(
                        "tree {t} node {i}: split ({feature}, {threshold}, {left}, {right}) is out of range"
                    ));
                }
                depth[left as usize] = depth[i] + 1;
                depth[right as usize] = depth[i] + 1;
                tree.nodes.push(Node {
                    threshold,
                    feature,
                    children: [left, right],
                });
                tree.leaf_value.push(0.0);
            }
            // One tree in pre-order: walking from the root reaches every node exactly once,
            // in index order (so a right child starts right after its parent's left subtree,
            // no node has two parents and none is unreachable).
            let mut stack = vec![0u32];
            let mut next = 0usize;
            while let Some(i) = stack.pop() {
                if i as usize != next {
                    return bad(format!(
                        "tree {t}: node {i} is reached where node {next} should be: the nodes \
                         are not one tree in pre-order"
                    ));
                }
                next += 1;
                let node = &nodes[next - 1];
                if node.feature != LEAF {
                    stack.push(node.right);
                    stack.push(node.left);
                }
            }
            if next != nodes.len() {
                return bad(format!(
                    "tree {t}: {} of {} nodes are not reachable from the root",
                    nodes.len() - next,
                    nodes.len()
                ));
            }
            trees.push(tree);
        }
        Ok(Self {
            features: parts.features,
            sample_size: parts.sample_size,
            max_depth,
            trees,
            threshold: parts.threshold,
        })
    }
}

/// The child of `node` for value `x`, by indexing with the comparison: a load, never a jump
/// (measured: a conditional move or a jump here is 1.3–1.9× slower).
#[inline(always)]
fn step(node: &Node, x: f64) -> u32 {
    node.children[usize::from(x >= node.threshold)]
}

/// Rows scored together by all trees (256 rows × 38 features × 8 bytes = 76 KiB stays in L2).
const BLOCK: usize = 256;
/// Walks interleaved per tree.
const LANES: usize = 16;

fn leaf(depth: usize, n: usize, tree: &mut Tree) -> u32 {
    let index = tree.nodes.len() as u32;
    tree.nodes.push(Node {
        threshold: f64::INFINITY,
        feature: 0,
        children: [index; 2],
    });
    tree.leaf_value.push(depth as f64 + average_path_length(n));
    index
}

fn grow(
    data: &[f64],
    features: usize,
    rows: &mut [u32],
    depth: usize,
    max_depth: usize,
    rng: &mut Rng,
    tree: &mut Tree,
) -> u32 {
    if depth >= max_depth || rows.len() <= 1 {
        return leaf(depth, rows.len(), tree);
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
        return leaf(depth, rows.len(), tree);
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
    let index = tree.nodes.len();
    tree.nodes.push(Node {
        threshold,
        feature: feature as u32,
        children: [0, 0],
    });
    tree.leaf_value.push(0.0);
    let (left_rows, right_rows) = rows.split_at_mut(cut);
    let left = grow(data, features, left_rows, depth + 1, max_depth, rng, tree);
    debug_assert_eq!(left as usize, index + 1, "pre-order");
    let right = grow(data, features, right_rows, depth + 1, max_depth, rng, tree);
    tree.nodes[index].children = [left, right];
    index as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(rng: &mut Rng) -> f64 {
        let u1 = rng.uniform().max(1e-300);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * rng.uniform()).cos()
    }

    fn auroc(scores: &[f64], labels: &[bool]) -> f64 {
        crate::scoring::auroc(scores, labels).unwrap()
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
    fn parts_round_trip_and_threads_agree() {
        let mut rng = Rng(11);
        let (n, d) = (5000, 3);
        let data: Vec<f64> = (0..n * d).map(|_| normal(&mut rng)).collect();
        let forest = IsolationForest::fit(&data, d, &ForestConfig::default()).unwrap();
        let back = IsolationForest::from_parts(forest.to_parts()).unwrap();
        assert_eq!(back, forest);
        let mut one = vec![0.0; n];
        let mut two = vec![0.0; n];
        forest.score_rows(&data, &mut one).unwrap();
        let columns: Vec<Vec<f64>> = (0..d)
            .map(|f| data.iter().skip(f).step_by(d).copied().collect())
            .collect();
        let refs: Vec<&[f64]> = columns.iter().map(Vec::as_slice).collect();
        back.score_columns_parallel(&refs, &mut two, 3).unwrap();
        assert_eq!(one, two);
        // A corrupted child index is refused, not followed.
        let mut parts = forest.to_parts();
        let inner = parts.trees[0]
            .iter()
            .position(|n| n.feature != LEAF)
            .unwrap();
        parts.trees[0][inner].left = 0;
        assert!(IsolationForest::from_parts(parts).is_err());
        // In range but not a tree: the root's right child moved into its left subtree (the
        // nodes between become unreachable, one node gets two parents).
        let mut parts = forest.to_parts();
        let root = parts.trees[0][0];
        assert_ne!(root.feature, LEAF);
        assert!(root.right > 2, "the left subtree has more than one node");
        parts.trees[0][0].right = root.right - 1;
        let err = IsolationForest::from_parts(parts).unwrap_err().to_string();
        assert!(err.contains("not one tree in pre-order"), "{err}");
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
