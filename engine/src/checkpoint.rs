//! Checkpoints of the streaming job: aligned barriers, one consistent snapshot per epoch.
//!
//! # Protocol
//! The source injects `Barrier(e)` into its output at an interval and reports where each
//! shard stood at that point (the last sequence number it *sent* before the barrier). Every
//! stage saves its state when the barrier passes it and forwards the barrier: the event-time
//! gate its clocks and held rows, each keyed worker its rules' window state and tags. The
//! sinks write every row they received before the barrier (files tagged with epoch `e`) and
//! report that they did. When every part of epoch `e` has arrived, the coordinator writes
//! one checkpoint object and then points `_latest.json` at it; both are single `put`s, so a
//! reader sees the old checkpoint or the new one, never half of one.
//!
//! # Restore
//! A restarted job reads `_latest.json`, deletes log files tagged with a later epoch (they
//! hold rows written after the checkpoint, which the job is about to produce again), restores
//! every stage and resumes each shard *after* its saved sequence number. Rows are neither lost
//! nor duplicated: the log after the restart holds exactly the rows of an uninterrupted run.
//!
//! # Layout
//! ```text
//! <checkpoints>/chk-<epoch>.bin   postcard-encoded `Checkpoint`
//! <checkpoints>/_latest.json      {"epoch", "file", "created", "shards": {id: position}}
//! ```

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use healer_sql::RuleState;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::gate::GateState;
use crate::store::Location;

/// Format version of checkpoint objects. 5: `MIN`/`MAX` windows of one partition over
/// `ROWS` frames of different lengths run as one operator (its state replaces theirs). 4:
/// window operators of `MIN`s and `MAX`s keep
/// presence bits and their deques instead of a ring of values. 3: window state of `RANGE`
/// frames (event times), and of operators that keep presence bits and their quantiles'
/// candidates instead of values (2 was used by development builds with an earlier layout
/// of these).
pub const CHECKPOINT_VERSION: u32 = 5;

/// Decodes a checkpoint object read from `path`, checking its format version first so
/// that one written by another version of healer is reported as such.
pub fn decode_checkpoint(bytes: &[u8], path: &str) -> Result<Checkpoint, CheckpointError> {
    /// The leading fields of every version.
    #[derive(Deserialize)]
    struct Header {
        version: u32,
    }
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_string(),
        reason,
    };
    let header: Header = postcard::from_bytes(bytes).map_err(|e| corrupt(e.to_string()))?;
    if header.version != CHECKPOINT_VERSION {
        return Err(corrupt(format!(
            "checkpoint format version {}, this healer reads version {CHECKPOINT_VERSION}: \
             replay from the source, or start with a new checkpoint location",
            header.version
        )));
    }
    postcard::from_bytes(bytes).map_err(|e| corrupt(e.to_string()))
}

/// Errors reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store failed.
    #[error("checkpoint store: {0}")]
    Store(#[from] object_store::Error),
    /// The checkpoint was refused: a lease of it moved to another worker, or its run is
    /// over. Nothing of it was committed.
    #[error("checkpoint {epoch} not committed: {reason}")]
    Fenced {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// The lease table did not confirm the checkpoint (it may or may not have landed);
    /// trying again with the same idempotency token settles it.
    #[error("checkpoint {epoch} not confirmed: {reason}")]
    Unconfirmed {
        /// The epoch.
        epoch: u64,
        /// What the table said.
        reason: String,
    },
    /// An object could not be decoded.
    #[error("checkpoint {path}: {reason}")]
    Corrupt {
        /// The object.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where one shard stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPosition {
    /// Parent shards (after a split or merge), which are read to their end first.
    pub parents: Vec<String>,
    /// The last sequence number sent downstream; reading resumes after it.
    pub sequence: Option<String>,
    /// Whether the shard was read to its end (a closed shard after a reshard).
    pub finished: bool,
    /// The largest event time read from the shard (it holds the watermark from there).
    pub max_ts: Option<i64>,
}

/// The source's part of a checkpoint: every shard's position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePositions {
    /// The stream.
    pub stream: String,
    /// Where shards without a sequence number start (ms; `None`: the trim horizon), fixed
    /// when the job first started so that a restart reads what the first run would have.
    pub start_ms: Option<i64>,
    /// Positions by shard id.
    pub shards: BTreeMap<String, ShardPosition>,
}

/// One keyed worker's part: its rules' state and the latest tags of its resources.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Per rule.
    pub rules: Vec<RuleState>,
    /// Latest tag values per resource.
    pub tags: Vec<(String, Vec<Option<String>>)>,
}

/// A complete, consistent snapshot of the streaming job at one barrier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// The barrier's epoch.
    pub epoch: u64,
    /// Wall-clock time it was completed (ms since the epoch).
    pub created_ms: i64,
    /// Shard positions.
    pub source: SourcePositions,
    /// The event-time gate.
    pub gate: GateState,
    /// The keyed workers (any number: state is restored by key, not by worker).
    pub workers: Vec<WorkerState>,
}

/// Saved state a job starts from, and which resources' state it supplies (`None`: all).
#[derive(Debug, Clone)]
pub struct Restore {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// Resources whose partition key hashes into these ranges (a shard's keys).
    pub keys: Option<crate::lease::KeyRanges>,
}

/// A part of a checkpoint, reported by a stage when a barrier passed it.
#[derive(Debug)]
pub enum Part {
    /// Shard positions at the barrier.
    Source(SourcePositions),
    /// The gate's state.
    Gate(GateState),
    /// A worker's state.
    Worker(usize, WorkerState),
    /// A sink wrote every row before the barrier.
    Committed(&'static str),
}

/// A part of epoch `.0`.
pub type Ack = (u64, Part);

#[derive(Debug, Serialize, Deserialize)]
struct Latest {
    epoch: u64,
    file: String,
    created: String,
    shards: BTreeMap<String, ShardPosition>,
}

/// Checkpoints under one location.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    location: Location,
}

impl CheckpointStore {
    /// Checkpoints under `location`.
    pub fn new(location: Location) -> Self {
        Self { location }
    }

    fn file_name(epoch: u64) -> String {
        format!("chk-{epoch:010}.bin")
    }

    /// The latest complete checkpoint, if any.
    pub async fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = self.location.child("_latest.json");
        let bytes = match self.location.store.get(&path).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: path.to_string(),
            reason,
        };
        let latest: Latest = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let file = self.location.child(&latest.file);
        let bytes = self.location.store.get(&file).await?.bytes().await?;
        let checkpoint = decode_checkpoint(&bytes, file.as_ref())?;
        if checkpoint.version != CHECKPOINT_VERSION || checkpoint.epoch != latest.epoch {
            return Err(CheckpointError::Corrupt {
                path: file.to_string(),
                reason: format!(
                    "version {} epoch {} (expected version {CHECKPOINT_VERSION} epoch {})",
                    checkpoint.version, checkpoint.epoch, latest.epoch
                ),
            });
        }
        Ok(Some(checkpoint))
    }

    /// Writes `checkpoint`, makes it the latest, and deletes all but the newest `retain`.
    pub async fn write(
        &self,
        checkpoint: &Checkpoint,
        retain: usize,
    ) -> Result<(), CheckpointError> {
        let name = Self::file_name(checkpoint.epoch);
        let bytes = postcard::to_stdvec(checkpoint).map_err(|e| CheckpointError::Corrupt {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        let store = &self.location.store;
        store
            .put(&self.location.child(&name), PutPayload::from(bytes))
            .await?;
        let latest = Latest {
            epoch: checkpoint.epoch,
            file: name,
            created: chrono::DateTime::from_timestamp_millis(checkpoint.created_ms)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
            shards: checkpoint.source.shards.clone(),
        };
        let json = serde_json::to_vec_pretty(&latest).expect("plain data");
        store
            .put(&self.location.child("_latest.json"), PutPayload::from(json))
            .await?;
        // Prune: everything older than the `retain` newest.
        let mut epochs = Vec::new();
        let mut listing = store.list(Some(&self.location.path));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if let Some(e) = meta
                .location
                .filename()
                .and_then(|f| f.strip_prefix("chk-"))
                .and_then(|f| f.strip_suffix(".bin"))
                .and_then(|f| f.parse::<u64>().ok())
            {
                epochs.push((e, meta.location));
            }
        }
        epochs.sort_by_key(|(e, _)| std::cmp::Reverse(*e));
        for (e, path) in epochs.into_iter().skip(retain.max(1)) {
            if e < checkpoint.epoch {
                store.delete(&path).await?;
            }
        }
        Ok(())
    }
}

/// The epoch in a log file name written by the streaming job (`…-e<epoch>-…`).
pub fn epoch_of_file(name: &str) -> Option<u64> {
    let start = name.find("-e")? + 2;
    let digits = &name[start..];
    let end = digits.find('-')?;
    (end == 10).then(|| digits[..end].parse().ok())?
}

/// Deletes the files under `prefixes` of `location` that were written after epoch `epoch`.
pub async fn discard_after(
    location: &Location,
    prefixes: &[&str],
    epoch: u64,
) -> Result<usize, CheckpointError> {
    let mut removed = 0;
    for prefix in prefixes {
        let path = location.child(prefix);
        let mut doomed = Vec::new();
        let mut listing = location.store.list(Some(&path));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if meta
                .location
                .filename()
                .and_then(epoch_of_file)
                .is_some_and(|e| e > epoch)
            {
                doomed.push(meta.location);
            }
        }
        for p in doomed {
            location.store.delete(&p).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Where a completed checkpoint goes.
pub trait CommitTarget: Send + Sync + std::fmt::Debug {
    /// Makes `checkpoint` durable; a later restore resumes from it.
    fn commit<'a>(
        &'a self,
        checkpoint: &'a Checkpoint,
    ) -> futures::future::BoxFuture<'a, Result<(), CheckpointError>>;
}

/// The single-worker target: [`CheckpointStore::write`], keeping the newest `retain`.
#[derive(Debug, Clone)]
pub struct StoreTarget {
    /// The store.
    pub store: CheckpointStore,
    /// Checkpoints kept.
    pub retain: usize,
}

impl CommitTarget for StoreTarget {
    fn commit<'a>(
        &'a self,
        checkpoint: &'a Checkpoint,
    ) -> futures::future::BoxFuture<'a, Result<(), CheckpointError>> {
        Box::pin(self.store.write(checkpoint, self.retain))
    }
}

/// Collects the parts of each epoch and commits the checkpoint once all have arrived.
#[derive(Debug)]
pub struct Coordinator {
    target: std::sync::Arc<dyn CommitTarget>,
    workers: usize,
    sinks: usize,
}

#[derive(Debug, Default)]
struct Partial {
    source: Option<SourcePositions>,
    gate: Option<GateState>,
    workers: BTreeMap<usize, WorkerState>,
    committed: usize,
}

impl Coordinator {
    /// A coordinator expecting `workers` worker parts and `sinks` commits per epoch.
    pub fn new(target: std::sync::Arc<dyn CommitTarget>, workers: usize, sinks: usize) -> Self {
        Self {
            target,
            workers,
            sinks,
        }
    }

    /// Runs until every sender of `parts` is gone; publishes each completed epoch on
    /// `completed`.
    pub async fn run(
        self,
        mut parts: mpsc::Receiver<Ack>,
        completed: watch::Sender<u64>,
    ) -> Result<(), CheckpointError> {
        let mut partial: HashMap<u64, Partial> = HashMap::new();
        while let Some((epoch, part)) = parts.recv().await {
            let p = partial.entry(epoch).or_default();
            match part {
                Part::Source(s) => p.source = Some(s),
                Part::Gate(g) => p.gate = Some(g),
                Part::Worker(w, s) => {
                    p.workers.insert(w, s);
                }
                Part::Committed(_) => p.committed += 1,
            }
            let done = p.source.is_some()
                && p.gate.is_some()
                && p.workers.len() == self.workers
                && p.committed == self.sinks;
            if !done {
                continue;
            }
            let p = partial.remove(&epoch).expect("present");
            let checkpoint = Checkpoint {
                version: CHECKPOINT_VERSION,
                epoch,
                created_ms: chrono::Utc::now().timestamp_millis(),
                source: p.source.expect("checked"),
                gate: p.gate.expect("checked"),
                workers: p.workers.into_values().collect(),
            };
            let started = std::time::Instant::now();
            // A store error may pass (a throttled or briefly unreachable S3): try a few times
            // before giving up, which stops the job (its data is safe: a restart resumes
            // from the previous checkpoint).
            let mut attempt = 0;
            loop {
                match self.target.commit(&checkpoint).await {
                    Ok(()) => break,
                    // Another worker owns a lease now: retrying cannot help.
                    Err(e @ CheckpointError::Fenced { .. }) => return Err(e),
                    Err(e) if attempt < 4 => {
                        tracing::warn!(epoch, error = %e, "checkpoint write failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            tracing::info!(
                epoch,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "checkpoint written"
            );
            // Barriers pass the stages in order, so epochs complete in order.
            completed.send_replace(epoch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_in_file_names() {
        assert_eq!(
            epoch_of_file("part-13-e0000000042-0001-abcdef.parquet"),
            Some(42)
        );
        assert_eq!(epoch_of_file("part-13-0001-abcdef.parquet"), None);
        assert_eq!(epoch_of_file("part-e12-x.parquet"), None);
        assert_eq!(epoch_of_file("part-e0000000007-00003-ff.parquet"), Some(7));
    }

    #[test]
    fn another_format_version_is_named_not_misread() {
        // Version 1 (a varint), then fields this version would misread.
        let old = postcard::to_stdvec(&(1u32, 7u64, 0i64, vec![3u8; 40])).unwrap();
        let e = decode_checkpoint(&old, "chk-7.bin")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("chk-7.bin")
                && e.contains("checkpoint format version 1, this healer reads version 5"),
            "{e}"
        );
        assert!(decode_checkpoint(&[], "empty").is_err());
    }
}
