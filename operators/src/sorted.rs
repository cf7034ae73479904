//! Ordered state for windowed quantiles: [`SortedBlocks`], every value of a window in order,
//! and [`TopK`], just the candidates for a window's `k` largest values.
//!
//! [`SortedBlocks`] keeps its values in sorted blocks of at most `2 × BLOCK` values, the layout of Python's
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
        let Some((lo, fraction)) = rank(q, self.len) else {
            return f64::NAN;
        };
        let a = self.get(lo).unwrap_or(f64::NAN);
        interpolate(a, || self.get(lo + 1).unwrap_or(f64::NAN), fraction)
    }

    /// All values, ascending.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        self.blocks.iter().flatten().copied()
    }
}

/// The candidates for the `k` largest values of a sliding window, for quantiles near 1.
///
/// A value stays a candidate until `k` larger values have arrived after it: from then on
/// those `k` values share every window that holds it, so it can never again be among the
/// `k` largest. What remains depends only on the window's contents (rebuilding from them
/// gives the same set), and is about `k · (1 + ln(n / k))` values for noise, `k` for a rising
/// series and at worst all `n` for a falling one. Each value costs one pass over the
/// candidates (and over those that dropped out since the last compaction, at most as many),
/// against a search and a move in a [`SortedBlocks`] of the whole window.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopK {
    /// Candidates, oldest first, from `start` on: sequence numbers, values, and how many
    /// later values are larger. The counts are `f64` (exact far beyond any window) so that
    /// the pass of [`TopK::push`] is compares, masks and adds of one width, which the
    /// compiler vectorises even for the baseline x86-64 target.
    seqs: Vec<u64>,
    values: Vec<f64>,
    beaten: Vec<f64>,
    start: usize,
    /// Candidates from `start` on beaten `k` times or more: no longer candidates, left in
    /// place until they are half of the vector (removing each at once cost a compaction
    /// pass for almost every value).
    dead: usize,
    /// The `k` of the pushes.
    k: u32,
    /// The largest candidates, descending, at most `k` of them; `None` after one of them
    /// left the window, until the next query rebuilds it.
    largest: Option<Vec<(f64, u64)>>,
}

impl TopK {
    /// A copy without the values that are no longer candidates, for saving.
    pub fn live(&self) -> TopK {
        let mut live = self.clone();
        live.compact();
        live.seqs.drain(..live.start);
        live.values.drain(..live.start);
        live.beaten.drain(..live.start);
        live.start = 0;
        live
    }

    /// The `k` of the pushes (0 before the first).
    pub fn k(&self) -> usize {
        self.k as usize
    }

    /// Whether the state holds together (equal lengths, `start` and `dead` within them): a
    /// check for state read back from a checkpoint.
    pub fn is_consistent(&self) -> bool {
        let n = self.seqs.len();
        n == self.values.len()
            && n == self.beaten.len()
            && self.start <= n
            && self.dead == (self.start..n).filter(|&i| self.is_dead(i)).count()
            && self.seqs[self.start..].is_sorted()
    }

    /// Whether the candidate at `i` has been beaten `k` times.
    fn is_dead(&self, i: usize) -> bool {
        self.beaten[i] >= f64::from(self.k)
    }

    /// Drops the candidates older than sequence number `first`.
    pub fn evict_before(&mut self, first: u64) {
        while self.start < self.seqs.len() && self.seqs[self.start] < first {
            if self.is_dead(self.start) {
                self.dead -= 1;
            }
            self.start += 1;
        }
        if self
            .largest
            .as_ref()
            .is_some_and(|l| l.iter().any(|&(_, seq)| seq < first))
        {
            self.largest = None;
        }
        if self.start > 64 && self.start * 2 > self.seqs.len() {
            self.seqs.drain(..self.start);
            self.values.drain(..self.start);
            self.beaten.drain(..self.start);
            self.start = 0;
        }
    }

    /// Removes the values beaten `k` times from the vectors.
    fn compact(&mut self) {
        if self.dead == 0 {
            return;
        }
        let mut keep = self.start;
        for i in self.start..self.seqs.len() {
            if !self.is_dead(i) {
                self.seqs[keep] = self.seqs[i];
                self.values[keep] = self.values[i];
                self.beaten[keep] = self.beaten[i];
                keep += 1;
            }
        }
        self.seqs.truncate(keep);
        self.values.truncate(keep);
        self.beaten.truncate(keep);
        self.dead = 0;
    }

    /// Adds the newest value `x` (not NaN) with sequence number `seq`; `k` must be the same
    /// in every call.
    pub fn push(&mut self, seq: u64, x: f64, k: usize) {
        let k = u32::try_from(k).unwrap_or(u32::MAX);
        debug_assert!(self.seqs.len() == self.start || self.k == k, "k changed");
        self.k = k;
        let kf = f64::from(k);
        // One pass: every candidate smaller than `x` is beaten once more; count those that
        // reach `k` now. (`<`: candidates are never NaN, and -0 and +0 are equal values.)
        // The count is an integer sum (a floating-point one would be a chain of dependent
        // adds, which keeps the loop scalar).
        let reached = beat(
            &self.values[self.start..],
            &mut self.beaten[self.start..],
            x,
            kf,
        );
        self.dead += reached as usize;
        if self.dead * 2 > self.seqs.len() - self.start {
            self.compact();
        }
        self.seqs.push(seq);
        self.values.push(x);
        self.beaten.push(0.0);
        if let Some(largest) = &mut self.largest {
            let at = largest.partition_point(|&(v, _)| v.total_cmp(&x).is_ge());
            if at < k as usize {
                largest.insert(at, (x, seq));
                largest.truncate(k as usize);
            }
        }
    }

    /// Candidates in the window.
    pub fn len(&self) -> usize {
        self.seqs.len() - self.start - self.dead
    }

    /// Whether there is no candidate.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `q` quantile of a window of `n` present values whose candidates these are (for
    /// `k` = [`top_k_for`]`(q, n)` or more), interpolated linearly between ranks; NaN for an
    /// empty window or a rank the candidates do not reach.
    pub fn quantile(&mut self, q: f64, n: usize, k: usize) -> f64 {
        let Some((lo, fraction)) = rank(q, n) else {
            return f64::NAN;
        };
        let from_top = n - 1 - lo;
        let kf = f64::from(self.k);
        let largest = self.largest.get_or_insert_with(|| {
            let mut all: Vec<(f64, u64)> = (self.start..self.seqs.len())
                .filter(|&i| self.beaten[i] < kf)
                .map(|i| (self.values[i], self.seqs[i]))
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            all.truncate(k);
            all
        });
        let Some(&(a, _)) = largest.get(from_top) else {
            return f64::NAN;
        };
        interpolate(a, || largest[from_top - 1].0, fraction)
    }
}

/// The pass of [`TopK::push`]: every candidate of `values` smaller than `x` is beaten once
/// more (`beaten`); returns how many reach `k` now. Compiled for AVX2 too (four lanes instead
/// of two), chosen at run time; the counts are exact either way.
#[inline]
fn beat(values: &[f64], beaten: &mut [f64], x: f64, k: f64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::window::avx2() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2, as just checked.
        return unsafe { beat_avx2(values, beaten, x, k) };
    }
    beat_body(values, beaten, x, k)
}

/// [`beat`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn beat_avx2(values: &[f64], beaten: &mut [f64], x: f64, k: f64) -> u64 {
    beat_body(values, beaten, x, k)
}

#[inline(always)]
fn beat_body(values: &[f64], beaten: &mut [f64], x: f64, k: f64) -> u64 {
    let mut reached = 0u64;
    for (v, b) in values.iter().zip(beaten) {
        let smaller = *v < x;
        *b += if smaller { 1.0 } else { 0.0 };
        reached += u64::from(smaller & (*b == k));
    }
    reached
}

/// Where the `q` quantile of `n` ascending values falls, as `PERCENTILE_CONT` places it:
/// the 0-based rank at or below it and the fraction of the way to the next rank (0 at the
/// top rank). `None` when `n` is 0.
fn rank(q: f64, n: usize) -> Option<(usize, f64)> {
    let last = n.checked_sub(1)?;
    let h = q * last as f64;
    let lo = (h.floor() as usize).min(last);
    Some((lo, if lo == last { 0.0 } else { h - lo as f64 }))
}

/// `a + fraction · (b − a)`, reading `b` only when the fraction is not 0.
fn interpolate(a: f64, b: impl FnOnce() -> f64, fraction: f64) -> f64 {
    if fraction == 0.0 {
        a
    } else {
        a + fraction * (b() - a)
    }
}

/// The `k` a [`TopK`] needs for the `q` quantile of windows of up to `n` values:
/// `n − ⌊q(n − 1)⌋` ranks from the top, at most `⌈(1 − q)(n − 1)⌉ + 1`, plus one for the
/// interpolation.
pub fn top_k_for(q: f64, n: usize) -> usize {
    ((1.0 - q) * n.saturating_sub(1) as f64).ceil() as usize + 2
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

    proptest! {
        /// Over a sliding window, a `TopK` gives the same high quantiles as a sort of the
        /// window, bit for bit, with ties and missing values (NaN is skipped by the caller),
        /// in the AVX2 and the baseline build of its pass.
        #[test]
        fn top_k_matches_a_sort_of_the_window(
            xs in proptest::collection::vec(
                proptest::option::weighted(0.9, (-30i32..30).prop_map(f64::from)),
                1..600,
            ),
            window in 1usize..200,
            q in prop_oneof![Just(1.0), Just(0.999), Just(0.99), Just(0.95), Just(0.9)],
            baseline in any::<bool>(),
        ) {
            crate::window::tests::BASELINE.with(|b| b.set(baseline));
            let k = top_k_for(q, window);
            let mut top = TopK::default();
            let mut most = 0;
            for (t, x) in xs.iter().enumerate() {
                let first = (t + 1).saturating_sub(window);
                top.evict_before(first as u64);
                if let Some(x) = x {
                    top.push(t as u64, *x, k);
                }
                most = most.max(top.len());
                let frame: Vec<f64> = xs[first..=t].iter().flatten().copied().collect();
                let expected = SortedBlocks::from_values(frame.clone()).quantile(q);
                let got = top.quantile(q, frame.len(), k);
                prop_assert_eq!(got.to_bits(), expected.to_bits(), "row {} of {:?}", t, frame);
            }
            prop_assert!(most <= window);
            crate::window::tests::BASELINE.with(|b| b.set(false));
        }
    }

    #[test]
    fn top_k_keeps_few_candidates_for_noise_and_a_rising_series() {
        let mut top = TopK::default();
        let mut random = crate::test_randoms(1);
        for t in 0..20_000u64 {
            top.evict_before(t.saturating_sub(5_999));
            top.push(t, (random() >> 11) as f64, top_k_for(0.999, 6_000));
        }
        assert!(top.len() < 120, "{} candidates", top.len());
        let mut rising = TopK::default();
        for t in 0..10_000u64 {
            rising.push(t, t as f64, 8);
        }
        assert_eq!(rising.len(), 8);
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
