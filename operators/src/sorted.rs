//! A multiset of `f64` in [`f64::total_cmp`] order, for windowed quantiles.
//!
//! Values are kept in sorted blocks of at most `2 × BLOCK` values, the layout of Python's
//! `sortedcontainers`: an insert or a removal finds its block by a binary search over the
//! blocks' last values and moves at most one block's values, instead of half the whole set as
//! a single sorted vector does (the `memmove` that dominated a 6,000-value window). The `k`-th
//! smallest value walks the block lengths: O(n / BLOCK).

/// Values per block after a split; blocks hold between `BLOCK / 4` and `2 × BLOCK` values
/// (fewer only when there is a single block).
const BLOCK: usize = 128;

/// A sorted multiset of `f64`. NaN is a value like any other here (callers keep it out).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SortedBlocks {
    blocks: Vec<Vec<f64>>,
    len: usize,
}

impl SortedBlocks {
    /// From values in any order.
    pub fn from_values(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let len = values.len();
        let blocks = values.chunks(BLOCK).map(<[f64]>::to_vec).collect();
        Self { blocks, len }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every value.
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.len = 0;
    }

    /// Index of the first block whose last value is not below `x` (`blocks.len()` if none).
    fn block_of(&self, x: f64) -> usize {
        self.blocks
            .partition_point(|b| b.last().is_some_and(|v| v.total_cmp(&x).is_lt()))
    }

    /// Adds `x`.
    pub fn insert(&mut self, x: f64) {
        self.len += 1;
        if self.blocks.is_empty() {
            self.blocks.push(vec![x]);
            return;
        }
        let b = self.block_of(x).min(self.blocks.len() - 1);
        let block = &mut self.blocks[b];
        let at = block.partition_point(|v| v.total_cmp(&x).is_lt());
        block.insert(at, x);
        if block.len() > 2 * BLOCK {
            let tail = block.split_off(BLOCK);
            self.blocks.insert(b + 1, tail);
        }
    }

    /// Removes one value equal to `x` (bit for bit under [`f64::total_cmp`]); false if there
    /// is none.
    pub fn remove(&mut self, x: f64) -> bool {
        let b = self.block_of(x);
        let Some(block) = self.blocks.get_mut(b) else {
            return false;
        };
        let at = block.partition_point(|v| v.total_cmp(&x).is_lt());
        if block.get(at).is_none_or(|v| v.total_cmp(&x).is_ne()) {
            return false;
        }
        block.remove(at);
        let remaining = block.len();
        self.len -= 1;
        if remaining < BLOCK / 4 && self.blocks.len() > 1 {
            // Merge into a neighbour, so that blocks stay few; split again if too large.
            let (into, from) = if b + 1 < self.blocks.len() {
                (b, b + 1)
            } else {
                (b - 1, b)
            };
            let moved = self.blocks.remove(from);
            let target = &mut self.blocks[into];
            target.extend(moved);
            if target.len() > 2 * BLOCK {
                let tail = target.split_off(target.len() / 2);
                self.blocks.insert(into + 1, tail);
            }
        } else if remaining == 0 {
            self.blocks.remove(b);
        }
        true
    }

    /// The `k`-th smallest value (0-based), `None` if `k >= len`.
    pub fn get(&self, mut k: usize) -> Option<f64> {
        for block in &self.blocks {
            if k < block.len() {
                return Some(block[k]);
            }
            k -= block.len();
        }
        None
    }

    /// The `q` quantile, interpolated linearly between the two nearest ranks as
    /// `PERCENTILE_CONT` does; NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        let Some(last) = self.len.checked_sub(1) else {
            return f64::NAN;
        };
        let h = q * last as f64;
        let lo = (h.floor() as usize).min(last);
        let fraction = h - lo as f64;
        let a = self.get(lo).unwrap_or(f64::NAN);
        if fraction == 0.0 {
            return a;
        }
        let b = self.get((lo + 1).min(last)).unwrap_or(f64::NAN);
        a + fraction * (b - a)
    }

    /// All values, ascending.
    pub fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        self.blocks.iter().flatten().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any sequence of inserts and removals keeps the same values, in order, as a sorted
        /// vector does; blocks stay within their bounds.
        #[test]
        fn matches_a_sorted_vector(
            ops in proptest::collection::vec((any::<bool>(), -50i32..50), 0..3_000),
        ) {
            let mut set = SortedBlocks::default();
            let mut reference: Vec<f64> = Vec::new();
            for (insert, v) in ops {
                let x = f64::from(v) / 4.0;
                if insert || reference.is_empty() {
                    set.insert(x);
                    let at = reference.partition_point(|r| r.total_cmp(&x).is_lt());
                    reference.insert(at, x);
                } else {
                    let present = reference.iter().position(|r| r.total_cmp(&x).is_eq());
                    prop_assert_eq!(set.remove(x), present.is_some());
                    if let Some(at) = present {
                        reference.remove(at);
                    }
                }
                prop_assert_eq!(set.len(), reference.len());
            }
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), reference.clone());
            for (k, v) in reference.iter().enumerate() {
                prop_assert_eq!(set.get(k), Some(*v));
            }
            prop_assert_eq!(set.get(reference.len()), None);
            if set.blocks.len() > 1 {
                prop_assert!(set.blocks.iter().all(|b| (1..=2 * BLOCK).contains(&b.len())));
            }
        }
    }

    #[test]
    fn quantiles_interpolate_and_handle_infinities() {
        let set = SortedBlocks::from_values(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(set.quantile(0.0), 1.0);
        assert_eq!(set.quantile(0.5), 2.5);
        assert_eq!(set.quantile(1.0), 4.0);
        let inf = SortedBlocks::from_values(vec![1.0, f64::INFINITY]);
        assert_eq!(inf.quantile(1.0), f64::INFINITY);
        let ninf = SortedBlocks::from_values(vec![f64::NEG_INFINITY, 1.0]);
        assert_eq!(ninf.quantile(0.0), f64::NEG_INFINITY);
        assert!(SortedBlocks::default().quantile(0.5).is_nan());
        // Duplicates across block boundaries are removed one at a time.
        let mut many = SortedBlocks::from_values(vec![7.0; 3 * BLOCK]);
        for left in (0..3 * BLOCK).rev() {
            assert!(many.remove(7.0));
            assert_eq!(many.len(), left);
        }
        assert!(!many.remove(7.0));
        assert!(many.is_empty());
    }
}
