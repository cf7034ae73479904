//! Deterministic identifiers.
//!
//! Incident ids must be identical across replays, restarts, machines and Rust releases, so
//! they cannot use `std`'s `DefaultHasher` (its algorithm is unspecified). healer uses two
//! independent 64-bit FNV-1a hashes over a length-prefixed encoding of the fields, printed as
//! 32 lower-case hex digits.

use arrow::array::{Array, StringArray};
use arrow::buffer::{Buffer, OffsetBuffer};

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const OFFSET_A: u64 = 0xcbf2_9ce4_8422_2325;
/// A second, unrelated offset basis so the two halves are independent.
const OFFSET_B: u64 = 0x6c62_272e_07bb_0142;
/// `FNV_PRIME` to the powers 0 to 8.
const PRIME_POWERS: [u64; 9] = {
    let mut p = [1u64; 9];
    let mut i = 1;
    while i < 9 {
        p[i] = p[i - 1].wrapping_mul(FNV_PRIME);
        i += 1;
    }
    p
};

/// 64-bit FNV-1a of `bytes`: stable across runs, platforms and releases (used to route keys
/// to workers).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(OFFSET_A, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// Incremental builder of a deterministic 128-bit id.
#[derive(Debug, Clone)]
pub struct StableHasher {
    a: u64,
    b: u64,
}

impl Default for StableHasher {
    fn default() -> Self {
        Self {
            a: OFFSET_A,
            b: OFFSET_B,
        }
    }
}

impl StableHasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the 8 little-endian bytes of `v`. Its high zero bytes leave the xor a no-op, so
    /// each is one multiplication by the prime, and they fold into one by a power of it:
    /// the same state as byte by byte, in fewer steps (a length prefix is 7 zero bytes
    /// out of 8).
    fn word(&mut self, v: u64) {
        let significant = (8 - v.leading_zeros() / 8) as usize;
        self.bytes(&v.to_le_bytes()[..significant]);
        let p = PRIME_POWERS[8 - significant];
        self.a = self.a.wrapping_mul(p);
        self.b = self.b.wrapping_mul(p);
    }

    /// One byte into both halves.
    #[inline(always)]
    fn byte(&mut self, byte: u8) {
        self.a = (self.a ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        self.b = (self.b ^ u64::from(byte.rotate_left(3))).wrapping_mul(FNV_PRIME);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.byte(byte);
        }
    }

    /// `self.bytes(x)` and `other.bytes(y)`, their common length in one loop: the two
    /// hashes are independent chains of multiplications, so the processor overlaps them.
    fn bytes_pair(&mut self, x: &[u8], other: &mut Self, y: &[u8]) {
        let common = x.len().min(y.len());
        for (&p, &q) in x[..common].iter().zip(&y[..common]) {
            self.byte(p);
            other.byte(q);
        }
        self.bytes(&x[common..]);
        other.bytes(&y[common..]);
    }

    /// `self.str(x)` and `other.str(y)`, interleaved (see [`StableHasher::bytes_pair`]).
    fn str_pair(&mut self, x: &str, other: &mut Self, y: &str) {
        self.word(x.len() as u64);
        other.word(y.len() as u64);
        self.bytes_pair(x.as_bytes(), other, y.as_bytes());
    }

    /// Adds a string field (length-prefixed, so `("ab","c")` and `("a","bc")` differ).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.word(s.len() as u64);
        self.bytes(s.as_bytes());
        self
    }

    /// Adds an integer field.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.word(v as u64);
        self
    }

    /// The 128-bit id as 32 hex digits.
    pub fn hex(&self) -> String {
        self.hex_digits().as_str().to_owned()
    }

    /// The 128-bit id as 32 lower-case hex digits, without an allocation.
    pub fn hex_digits(&self) -> HexId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (half, v) in [self.a, self.b].into_iter().enumerate() {
            for (i, byte) in v.to_be_bytes().into_iter().enumerate() {
                out[half * 16 + 2 * i] = HEX[usize::from(byte >> 4)];
                out[half * 16 + 2 * i + 1] = HEX[usize::from(byte & 0xf)];
            }
        }
        HexId(out)
    }
}

/// A 128-bit id as 32 lower-case hex digits, on the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HexId([u8; 32]);

impl HexId {
    /// The digits.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

/// The id of an anomaly row: a function of (rule, resource, metric, event time) only.
pub fn anomaly_id(rule: &str, resource: &str, metric: &str, ts_ms: i64) -> String {
    AnomalyIds::new(rule)
        .id(resource, metric, ts_ms)
        .as_str()
        .to_owned()
}

/// [`anomaly_id`] for many rows of one rule: the rule's part of the hash is computed once.
#[derive(Debug, Clone)]
pub struct AnomalyIds {
    /// The hasher after the version tag and the rule.
    prefix: StableHasher,
}

impl AnomalyIds {
    /// Ids of `rule`'s anomalies.
    pub fn new(rule: &str) -> Self {
        let mut prefix = StableHasher::new();
        prefix.str("anomaly/v1").str(rule);
        Self { prefix }
    }

    /// The id of the anomaly at (`resource`, `metric`, `ts_ms`).
    pub fn id(&self, resource: &str, metric: &str, ts_ms: i64) -> HexId {
        let mut h = self.prefix.clone();
        h.str(resource).str(metric).i64(ts_ms);
        h.hex_digits()
    }

    /// The ids of rows (`resources[i]`, `metrics[i]`, `ts_ms[i]`) as a string column, the
    /// same as [`AnomalyIds::id`] row by row, written straight into the column's buffer.
    /// NULL names hash as empty strings (callers drop such rows first).
    ///
    /// # Panics
    /// If the three columns differ in length.
    pub fn column(
        &self,
        resources: &StringArray,
        metrics: &StringArray,
        ts_ms: &[i64],
    ) -> StringArray {
        let n = ts_ms.len();
        assert!(
            resources.len() == n && metrics.len() == n,
            "columns of one batch"
        );
        let mut digits = Vec::with_capacity(32 * n);
        // Two rows at a time, their hashes interleaved.
        let mut i = 0;
        while i + 1 < n {
            let (mut h, mut g) = (self.prefix.clone(), self.prefix.clone());
            h.str_pair(resources.value(i), &mut g, resources.value(i + 1));
            h.str_pair(metrics.value(i), &mut g, metrics.value(i + 1));
            h.i64(ts_ms[i]);
            g.i64(ts_ms[i + 1]);
            digits.extend_from_slice(&h.hex_digits().0);
            digits.extend_from_slice(&g.hex_digits().0);
            i += 2;
        }
        if i < n {
            digits.extend_from_slice(&self.id(resources.value(i), metrics.value(i), ts_ms[i]).0);
        }
        StringArray::try_new(
            OffsetBuffer::from_lengths(std::iter::repeat_n(32, n)),
            Buffer::from_vec(digits),
            None,
        )
        .expect("hex digits are ASCII")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_column_matches_row_by_row_ids() {
        // Pairs of rows of equal and of unequal lengths, and an odd row at the end.
        let resources = StringArray::from(vec!["a", "ab", "a", "", "b", "a", "res-1"]);
        let metrics = StringArray::from(vec!["bc", "c", "bc", "x", "cpu", "cpu", "mem"]);
        let ts = [5, 5, 6, -1, i64::MAX, 5, 7];
        let column = AnomalyIds::new("rule").column(&resources, &metrics, &ts);
        let expected: Vec<String> = (0..ts.len())
            .map(|i| anomaly_id("rule", resources.value(i), metrics.value(i), ts[i]))
            .collect();
        assert_eq!(column.iter().flatten().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn ids_are_stable_and_field_separated() {
        assert_eq!(
            anomaly_id("zscore_300", "res-1", "cpu_percent", 1_735_689_600_000),
            anomaly_id("zscore_300", "res-1", "cpu_percent", 1_735_689_600_000)
        );
        assert_ne!(
            anomaly_id("ab", "c", "m", 0),
            anomaly_id("a", "bc", "m", 0),
            "fields must be length-prefixed"
        );
        let id = anomaly_id("r", "x", "m", 1);
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn ids_keep_their_published_values() {
        // Ids already written to incident logs must not change: the value below is what
        // the `format!("{:016x}{:016x}")` implementation this one replaced gave.
        assert_eq!(
            anomaly_id("zscore_300", "res-00001", "cpu_percent", 1_735_689_600_000),
            "93d6e6d7707000772c86e658ee385088"
        );
        let mut h = StableHasher::new();
        h.str("x").i64(-5);
        assert_eq!(h.hex(), format!("{:016x}{:016x}", h.a, h.b));
    }

    #[test]
    fn words_hash_as_their_bytes() {
        let bytewise = |v: u64| {
            let mut h = StableHasher::new();
            h.str("x").bytes(&v.to_le_bytes());
            (h.a, h.b)
        };
        let mut values = vec![0, 1, 0xff, 0x100, u64::MAX, 1 << 63, 1_735_689_600_000];
        values.extend((0..64).map(|k| 1u64 << k));
        values.extend((0..64).map(|k| (1u64 << k) - 1));
        values.extend((-3i64..3).map(|v| v as u64));
        for v in values {
            let mut h = StableHasher::new();
            h.str("x").word(v);
            assert_eq!((h.a, h.b), bytewise(v), "{v:#x}");
        }
    }

    #[test]
    fn pinned_value() {
        assert_eq!(
            StableHasher::new().hex(),
            "cbf29ce4842223256c62272e07bb0142"
        );
        let h = StableHasher::new().str("a").hex();
        assert_eq!(h.len(), 32);
        assert_ne!(h, StableHasher::new().hex());
    }
}
