//! Scale-out: several `healer run` workers share a stream's shards through a lease table.
//!
//! ```text
//!   worker A ─┐   DynamoDB lease table (KCL schema)          ┌─ worker B
//!   renew ────┼──► leaseKey  leaseOwner leaseCounter checkpoint … healerState ◄──┼── take / ask
//!   commit ───┘        (every change conditional on the counter: fencing)      └── commit
//!                                    │ healerState
//!                                    ▼
//!              <checkpoints>/state/<run>/chk-<epoch>.bin (keyed state at the checkpoint)
//! ```
//!
//! * [`table`]: the lease table, DynamoDB with the Kinesis Client Library's attribute names
//!   (an operator can read it with the tools they have), or an in-memory table for tests;
//! * [`book`]: one worker's view of the leases and the protocol: renew, take expired
//!   leases, balance by asking the most loaded worker to hand one over, release;
//! * [`worker`]: the job around it: a pipeline over the owned shards, restored from their
//!   checkpointed state, restarted when the owned set changes, committing every checkpoint
//!   to all of its leases in one transaction, and publishing its output only then.
//!
//! Keyed state moves with shards because a shard holds a range of MD5 hash keys: a record's
//! partition key is its resource (as `healer produce` writes), so a resource's state
//! belongs to the shard whose range holds `md5(resource)`, before and after a reshard.

pub mod book;
pub mod table;
pub mod worker;

use std::fmt;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// The `checkpoint` of a lease read to its end.
pub const SHARD_END: &str = "SHARD_END";
/// The `checkpoint` of a lease not read yet that starts at the oldest record.
pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// The `checkpoint` of a lease not read yet that starts at `healerStartMs`.
pub const AT_TIMESTAMP: &str = "AT_TIMESTAMP";

/// The 128-bit hash key Kinesis gives a partition key: its MD5 digest, big-endian.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// An inclusive range of hash keys, as a shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HashRange {
    /// First hash key.
    pub start: u128,
    /// Last hash key (inclusive).
    pub end: u128,
}

impl HashRange {
    /// The whole hash space.
    pub const ALL: HashRange = HashRange {
        start: 0,
        end: u128::MAX,
    };

    /// Parses Kinesis' decimal `StartingHashKey` and `EndingHashKey`.
    pub fn parse(start: &str, end: &str) -> Option<Self> {
        let (start, end) = (start.parse().ok()?, end.parse().ok()?);
        (start <= end).then_some(Self { start, end })
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: u128) -> bool {
        self.start <= key && key <= self.end
    }

    /// The keys in both ranges.
    pub fn intersect(&self, other: &HashRange) -> Option<HashRange> {
        let (start, end) = (self.start.max(other.start), self.end.min(other.end));
        (start <= end).then_some(HashRange { start, end })
    }
}

impl fmt::Display for HashRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.start, self.end)
    }
}

/// A set of hash ranges: which resources' state a restore takes from one saved object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRanges(Vec<HashRange>);

impl KeyRanges {
    /// The given ranges.
    pub fn new(ranges: Vec<HashRange>) -> Self {
        Self(ranges)
    }

    /// Whether the resource `key` hashes into one of the ranges.
    pub fn contains_key(&self, key: &str) -> bool {
        let h = hash_key(key);
        self.0.iter().any(|r| r.contains(h))
    }

    /// The ranges.
    pub fn ranges(&self) -> &[HashRange] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_keys_are_kinesis_md5() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
        // md5("abc") = 900150983cd24fb0d6963f7d28e17f72
        assert_eq!(hash_key("abc"), 0x900150983cd24fb0d6963f7d28e17f72);
    }

    #[test]
    fn ranges_parse_and_intersect() {
        let all = HashRange::parse("0", "340282366920938463463374607431768211455").unwrap();
        assert_eq!(all, HashRange::ALL);
        let half = HashRange::parse("0", "170141183460469231731687303715884105727").unwrap();
        assert!(half.contains(0) && !half.contains(u128::MAX));
        assert_eq!(all.intersect(&half), Some(half));
        let upper = HashRange {
            start: half.end + 1,
            end: u128::MAX,
        };
        assert_eq!(half.intersect(&upper), None);
        assert!(HashRange::parse("5", "4").is_none());
        assert!(HashRange::parse("-1", "4").is_none());
        let keys = KeyRanges::new(vec![half]);
        assert_eq!(keys.contains_key("abc"), hash_key("abc") <= half.end);
    }
}
