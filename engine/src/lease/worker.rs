//! One worker of a scaled-out `healer run`.
//!
//! ```text
//!  lease loop (every renew_interval)          runner
//!   sync shards → leases (parents first)       wait for an assignment
//!   renew held leases                          restore: each lease's healerState object,
//!   release finished ones                        only its hash range (a new child: its
//!   take / ask to reach the share                parents' objects, their ranges ∩ its own)
//!   publish the assignment ─────────────────►  run the pipeline over those shards
//!                                              restart when the assignment changes
//!  checkpoint (every interval):                release what was asked for, after the last
//!   state object → one transaction over          checkpoint
//!   all leases → publish the epoch's files
//! ```
//!
//! # Exactly-once output
//! A run writes its log files under `<out>/_staging/<run>/`. A checkpoint first writes the
//! run's state to `<checkpoints>/state/<run>/chk-<epoch>.bin`, then sets `checkpoint` and
//! `healerState` of every lease of the run in one DynamoDB transaction, conditional on each
//! counter, and only then moves the epoch's files to `<out>/` (renamed `<run>-<file>`).
//! If the worker dies after the transaction, whoever restores from that state object moves
//! them first. If the transaction fails (a lease moved), nothing of the epoch is published
//! and the run restarts from its last committed state. So each row reaches the log once:
//! from the run that committed it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client as KinesisClient;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use super::book::{LeaseBook, LeaseCounters, LeaseSettings};
use super::table::{Lease, LeaseError, LeaseTable};
use super::{AT_TIMESTAMP, HashRange, KeyRanges, SHARD_END, TRIM_HORIZON};
use crate::checkpoint::{
    Checkpoint, CheckpointError, CommitTarget, Restore, ShardPosition, SourcePositions,
    epoch_of_file,
};
use crate::config::PipelineConfig;
use crate::job::JobError;
use crate::kinesis::reader::ReaderCounters;
use crate::kinesis::source::KinesisSource;
use crate::metrics::PipelineMetrics;
use crate::store::Location;
use crate::stream::StreamJob;

/// What a worker reports while it runs (the status file of `healer run`).
#[derive(Debug, Default)]
pub struct WorkerStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    owned: Vec<String>,
    counters: LeaseCounters,
    runs: u64,
    checkpoints: u64,
    last_checkpoint: Option<Instant>,
    published_files: u64,
    current: Option<(Arc<PipelineMetrics>, Arc<ReaderCounters>)>,
}

/// A point-in-time copy of [`WorkerStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    /// Leases processed now.
    pub owned_leases: Vec<String>,
    /// Leases taken so far.
    pub lease_takes: u64,
    /// Handoffs asked of other workers.
    pub lease_steals: u64,
    /// Leases handed over or released.
    pub lease_releases: u64,
    /// Leases lost.
    pub lease_losses: u64,
    /// Pipelines started (one per change of the owned set).
    pub runs: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Seconds since the last committed checkpoint.
    pub checkpoint_age_s: Option<f64>,
    /// Log files published.
    pub published_files: u64,
    /// Milliseconds behind the tip, per shard read now.
    pub millis_behind: BTreeMap<String, i64>,
    /// Records read by the current run.
    pub records: u64,
    /// Anomalies of the current run.
    pub anomalies: u64,
}

impl WorkerStatus {
    /// The current figures.
    pub fn snapshot(&self) -> StatusSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.inner.lock().expect("not poisoned");
        let (millis_behind, records, anomalies) = match &s.current {
            Some((m, r)) => (
                m.shard_lag(),
                r.records.load(Relaxed),
                m.snapshot().anomalies,
            ),
            None => (BTreeMap::new(), 0, 0),
        };
        StatusSnapshot {
            owned_leases: s.owned.clone(),
            lease_takes: s.counters.taken,
            lease_steals: s.counters.asked,
            lease_releases: s.counters.released,
            lease_losses: s.counters.lost,
            runs: s.runs,
            checkpoints: s.checkpoints,
            checkpoint_age_s: s.last_checkpoint.map(|t| t.elapsed().as_secs_f64()),
            published_files: s.published_files,
            millis_behind,
            records,
            anomalies,
        }
    }

    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        f(&mut self.inner.lock().expect("not poisoned"));
    }
}

/// What a worker did, when it stops.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerSummary {
    /// The worker id.
    pub worker: String,
    /// The figures at the end.
    pub status: StatusSnapshot,
}

/// State shared by the lease loop, the runner and the checkpoint target.
#[derive(Debug)]
struct Shared {
    table: LeaseTable,
    book: tokio::sync::Mutex<LeaseBook>,
    origin: Instant,
    assignment: watch::Sender<BTreeMap<String, Lease>>,
    sync_now: Notify,
    status: Arc<WorkerStatus>,
    /// The shards the current run reads (guarded by the book's lock for writers).
    running: Mutex<BTreeSet<String>>,
    /// The current run's id (never collected as garbage).
    run: Mutex<Option<String>>,
    out: Location,
    checkpoints: Location,
}

impl Shared {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A worker id usable in object paths and logs: the host name and the process id.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "healer".into());
    format!("{}-{}", host.trim(), std::process::id())
}

/// One shard as `ListShards` gives it.
#[derive(Debug, Clone)]
struct ShardInfo {
    id: String,
    parents: Vec<String>,
    range: HashRange,
    closed: bool,
}

async fn list_shards(client: &KinesisClient, stream: &str) -> Result<Vec<ShardInfo>, JobError> {
    let shards = crate::kinesis::list_shards(client, stream).await?;
    Ok(shards
        .iter()
        .map(|s| ShardInfo {
            id: s.shard_id().to_string(),
            parents: crate::kinesis::parents_of(s),
            range: s
                .hash_key_range()
                .and_then(|r| HashRange::parse(r.starting_hash_key(), r.ending_hash_key()))
                .unwrap_or(HashRange::ALL),
            closed: s
                .sequence_number_range()
                .and_then(|r| r.ending_sequence_number())
                .is_some(),
        })
        .collect())
}

/// Creates a lease for every shard that has none, parents before children (a child with a
/// lease and no parent lease would look processable). A shard whose parents have leases
/// starts at its trim horizon; the others where the configuration says.
async fn sync_shards(
    client: &KinesisClient,
    table: &LeaseTable,
    config: &PipelineConfig,
) -> Result<usize, JobError> {
    let shards = list_shards(client, &config.source.kinesis.stream).await?;
    // Each lease's start time (ms) when it starts at one: its children start there too.
    let mut starts: BTreeMap<String, Option<i64>> = table
        .list()
        .await
        .map_err(lease_error)?
        .into_iter()
        .map(|l| (l.key, l.start_ms))
        .collect();
    let listed: BTreeSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
    let k = &config.source.kinesis;
    let start_ms = match k.start.as_str() {
        "latest" => Some(chrono::Utc::now().timestamp_millis()),
        "at_timestamp" => k
            .start_timestamp
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis()),
        _ => None,
    };
    // Topological order: a shard after its listed parents.
    let mut order: Vec<&ShardInfo> = Vec::new();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    while order.len() < shards.len() {
        let before = order.len();
        for s in &shards {
            if !placed.contains(s.id.as_str())
                && s.parents
                    .iter()
                    .all(|p| placed.contains(p.as_str()) || !listed.contains(p.as_str()))
            {
                placed.insert(&s.id);
                order.push(s);
            }
        }
        if order.len() == before {
            return Err(JobError::Config(
                "ListShards returned a parent cycle".into(),
            ));
        }
    }
    let mut created = 0;
    for s in order {
        if starts.contains_key(&s.id) {
            continue;
        }
        let parents: Vec<Option<i64>> = s
            .parents
            .iter()
            .filter_map(|p| starts.get(p).copied())
            .collect();
        let mut lease = Lease::new(&s.id, s.parents.clone(), s.range, TRIM_HORIZON);
        if parents.is_empty() {
            lease.start_ms = start_ms;
            match (k.start.as_str(), start_ms) {
                // Started at "latest": a shard closed before now has nothing new.
                ("latest", _) if s.closed => lease.checkpoint = SHARD_END.into(),
                (_, Some(_)) => lease.checkpoint = AT_TIMESTAMP.into(),
                _ => {}
            }
        } else if let Some(ms) = parents.into_iter().flatten().min() {
            // A child starts where the job starts, like its parents: the whole child if it
            // was made after that time, none of its history from before.
            lease.checkpoint = AT_TIMESTAMP.into();
            lease.start_ms = Some(ms);
        }
        starts.insert(s.id.clone(), lease.start_ms);
        if table.create(&lease).await.map_err(lease_error)? {
            tracing::info!(shard = %s.id, checkpoint = %lease.checkpoint, "lease created");
            created += 1;
        }
        for p in &s.parents {
            table.add_child(p, &s.id).await.map_err(lease_error)?;
        }
    }
    Ok(created)
}

fn lease_error(e: LeaseError) -> JobError {
    JobError::Config(e.to_string())
}

/// The checkpoint target of one run: state object, lease transaction, publication.
#[derive(Debug)]
struct LeaseCommitter {
    shared: Arc<Shared>,
    run: String,
    checkpoints: Location,
    out: Location,
    /// The `checkpoint` sentinel of each shard until it has a sequence number.
    initial: BTreeMap<String, String>,
    /// Shards whose `SHARD_END` is committed (their leases are then released).
    ended: Mutex<BTreeSet<String>>,
    /// Epochs whose state objects a finished lease points to: never pruned.
    pinned: Mutex<BTreeSet<u64>>,
    previous: Mutex<Option<u64>>,
    /// Set when a shard's end was committed: the run still holds that shard's resources
    /// (rows waiting in the gate, windows), which its children now restore, so nothing
    /// the run does later may be committed. It is restarted without the shard.
    superseded: std::sync::atomic::AtomicBool,
    /// Set by the runner when the run is over (stopped, failed or abandoned): a commit
    /// still in flight from it must not land next to the next run's.
    closed: std::sync::atomic::AtomicBool,
    /// Wakes the runner when the run is superseded.
    restart: Notify,
}

/// The object holding run `run`'s state at `epoch`, relative to the checkpoint location.
fn state_path(run: &str, epoch: u64) -> String {
    format!("state/{run}/chk-{epoch:010}.bin")
}

/// The run and epoch of a state object path.
fn parse_state_path(path: &str) -> Option<(&str, u64)> {
    let rest = path.strip_prefix("state/")?;
    let (run, file) = rest.split_once('/')?;
    let epoch = file
        .strip_prefix("chk-")?
        .strip_suffix(".bin")?
        .parse()
        .ok()?;
    Some((run, epoch))
}

/// Moves the files run `run` staged for epochs up to `upto` into the log. Idempotent: a
/// file already moved is gone from the staging area.
pub async fn publish(out: &Location, run: &str, upto: u64) -> Result<usize, object_store::Error> {
    let staged = out.child(&format!("_staging/{run}"));
    let mut files = Vec::new();
    let mut listing = out.store.list(Some(&staged));
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let Some(name) = meta.location.filename() else {
            continue;
        };
        if epoch_of_file(name).is_some_and(|e| e <= upto) {
            let rel: Vec<String> = match meta.location.prefix_match(&staged) {
                Some(parts) => parts.map(|p| p.as_ref().to_string()).collect(),
                None => continue,
            };
            files.push((meta.location.clone(), rel));
        }
    }
    let mut moved = 0;
    for (from, mut rel) in files {
        let name = rel.pop().expect("a file name");
        rel.push(format!("{run}-{name}"));
        let to = out.child(&rel.join("/"));
        match out.store.copy(&from, &to).await {
            Ok(()) => {}
            // Moved by someone else meanwhile.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
        match out.store.delete(&from).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => moved += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(moved)
}

impl LeaseCommitter {
    async fn commit_inner(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let epoch = checkpoint.epoch;
        let rel = state_path(&self.run, epoch);
        let bytes = postcard::to_stdvec(checkpoint).map_err(|e| CheckpointError::Corrupt {
            path: rel.clone(),
            reason: e.to_string(),
        })?;
        self.checkpoints
            .store
            .put(&self.checkpoints.child(&rel), PutPayload::from(bytes))
            .await?;
        let ended = self.ended.lock().expect("not poisoned").clone();
        let mut updates = Vec::new();
        let mut finishing = Vec::new();
        for (id, pos) in &checkpoint.source.shards {
            if ended.contains(id) {
                continue;
            }
            let cp = if pos.finished {
                finishing.push(id.clone());
                SHARD_END.to_string()
            } else if let Some(seq) = &pos.sequence {
                seq.clone()
            } else {
                self.initial
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| TRIM_HORIZON.into())
            };
            updates.push((id.clone(), cp, rel.clone(), pos.max_ts));
        }
        let committed = {
            use std::sync::atomic::Ordering::SeqCst;
            let mut book = self.shared.book.lock().await;
            if self.closed.load(SeqCst) || self.superseded.load(SeqCst) {
                return Err(CheckpointError::Fenced {
                    epoch,
                    reason: format!("run {} is over", self.run),
                });
            }
            let now = self.shared.now();
            let token = format!("{}-{epoch}", self.run);
            let committed = book.commit(&self.shared.table, now, updates, &token).await;
            if committed.is_ok() && !finishing.is_empty() {
                self.superseded.store(true, SeqCst);
            }
            committed
        };
        match committed {
            Ok(()) => {}
            Err(LeaseError::Conflict(key)) => {
                return Err(CheckpointError::Fenced {
                    epoch,
                    reason: format!("lease {key} is no longer ours"),
                });
            }
            // The outcome is unknown: the coordinator tries again with the same token.
            Err(LeaseError::Store(reason)) => {
                return Err(CheckpointError::Unconfirmed { epoch, reason });
            }
        }
        if !finishing.is_empty() {
            tracing::info!(shards = ?finishing, epoch, "shards committed at their end; the run restarts without them");
            self.ended.lock().expect("not poisoned").extend(finishing);
            self.pinned.lock().expect("not poisoned").insert(epoch);
            self.shared.sync_now.notify_one();
            self.restart.notify_one();
        }
        // The epoch is committed: its files go into the log. A failure here loses nothing
        // (the next checkpoint, or whoever restores this state, moves them).
        let moved = match publish(&self.out, &self.run, epoch).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(epoch, error = %e, "publishing the epoch's files failed; retried later");
                0
            }
        };
        // The previous state object is not needed any more (every lease of the run points to
        // this one now), unless a finished lease points to it.
        let prune = self.previous.lock().expect("not poisoned").replace(epoch);
        if let Some(old) = prune
            && !self.pinned.lock().expect("not poisoned").contains(&old)
        {
            let path = self.checkpoints.child(&state_path(&self.run, old));
            if let Err(e) = self.checkpoints.store.delete(&path).await {
                tracing::debug!(error = %e, "pruning an old state object failed");
            }
        }
        self.shared.status.update(|s| {
            s.checkpoints += 1;
            s.last_checkpoint = Some(Instant::now());
            s.published_files += moved as u64;
        });
        Ok(())
    }
}

impl CommitTarget for LeaseCommitter {
    fn commit<'a>(
        &'a self,
        checkpoint: &'a Checkpoint,
    ) -> futures::future::BoxFuture<'a, Result<(), CheckpointError>> {
        Box::pin(self.commit_inner(checkpoint))
    }
}

/// Where each saved object's resources go: for every lease, its own state object over its
/// range; for a lease never checkpointed, its parents' objects over the overlap of ranges
/// (recursively, for parents never checkpointed either).
fn restore_sources(
    leases: &BTreeMap<String, Lease>,
    table: &[Lease],
) -> BTreeMap<String, Vec<HashRange>> {
    let all: BTreeMap<&str, &Lease> = table.iter().map(|l| (l.key.as_str(), l)).collect();
    let mut sources: BTreeMap<String, Vec<HashRange>> = BTreeMap::new();
    fn walk<'a>(
        lease: &'a Lease,
        range: HashRange,
        all: &BTreeMap<&str, &'a Lease>,
        sources: &mut BTreeMap<String, Vec<HashRange>>,
        depth: usize,
    ) {
        if let Some(state) = &lease.state {
            if let Some(r) = lease.range.intersect(&range) {
                sources.entry(state.clone()).or_default().push(r);
            }
            return;
        }
        if depth > 16 {
            return;
        }
        for p in &lease.parents {
            if let Some(parent) = all.get(p.as_str())
                && let Some(r) = parent.range.intersect(&range)
            {
                walk(parent, r, all, sources, depth + 1);
            }
        }
    }
    for lease in leases.values() {
        walk(lease, lease.range, &all, &mut sources, 0);
    }
    sources
}

/// Runs one worker until `shutdown`; then checkpoints and releases its leases.
pub async fn run_worker(
    config: &PipelineConfig,
    worker_id: &str,
    shutdown: watch::Receiver<bool>,
    status: Arc<WorkerStatus>,
) -> Result<WorkerSummary, JobError> {
    crate::job::validated(config)?;
    // Rules that cannot move with shards are rejected before joining the table.
    let schema = crate::kinesis::decode::record_schema(&config.source.schema);
    let rules = crate::job::compile_rules(config, Arc::clone(&schema))?;
    let routing = crate::job::partition_column(&rules, &schema);
    if routing.as_deref() != Some(healer_operators::schema::RESOURCE) {
        return Err(JobError::Config(format!(
            "scale-out moves state with shards, so every window must partition by `{}` (the \
             records' partition key); these rules partition by {}",
            healer_operators::schema::RESOURCE,
            routing.map_or("nothing in common".to_string(), |r| format!("`{r}`"))
        )));
    }
    let lease_config = &config.lease;
    let table = LeaseTable::dynamodb(lease_config, &config.source.kinesis)
        .await
        .map_err(lease_error)?;
    let out = Location::parse(&config.sink.out, &config.sink.s3, true)?;
    let checkpoints = config.checkpoint_location();
    let checkpoints = Location::parse(&checkpoints, &config.sink.s3, true)?;
    let settings = LeaseSettings {
        duration: PipelineConfig::duration(&lease_config.duration),
        max_steals: lease_config.max_steals.max(1),
        max_leases: lease_config.max_leases,
        // Time to notice a lost hold and stop reading the shard before anyone may take it.
        safety: PipelineConfig::duration(&lease_config.renew_interval),
    };
    let (assignment, _) = watch::channel(BTreeMap::new());
    let shared = Arc::new(Shared {
        table,
        book: tokio::sync::Mutex::new(LeaseBook::new(worker_id, settings)),
        origin: Instant::now(),
        assignment,
        sync_now: Notify::new(),
        status: Arc::clone(&status),
        running: Mutex::default(),
        run: Mutex::default(),
        out: out.clone(),
        checkpoints: checkpoints.clone(),
    });
    let kinesis = crate::kinesis::client(&config.source.kinesis).await;
    // The first sync before anything else, so the table has leases to take.
    sync_shards(&kinesis, &shared.table, config).await?;
    tracing::info!(worker = %worker_id, table = %lease_config.table, "lease worker started");

    let (loop_stop_tx, loop_stop) = watch::channel(false);
    let lease_loop = tokio::spawn(lease_loop(
        Arc::clone(&shared),
        kinesis,
        config.clone(),
        loop_stop,
        shutdown.clone(),
    ));
    let result = runner(&shared, config, &out, &checkpoints, shutdown).await;
    loop_stop_tx.send_replace(true);
    let _ = lease_loop.await;
    // Graceful end: every lease is free at once for the others.
    {
        let mut book = shared.book.lock().await;
        let held = book.held();
        if let Err(e) = book.release(&shared.table, &held).await {
            tracing::warn!(error = %e, "releasing leases at shutdown failed; they expire");
        }
        let counters = book.counters();
        status.update(|s| {
            s.counters = counters;
            s.owned.clear();
        });
    }
    result?;
    Ok(WorkerSummary {
        worker: worker_id.to_string(),
        status: status.snapshot(),
    })
}

async fn lease_loop(
    shared: Arc<Shared>,
    kinesis: KinesisClient,
    config: PipelineConfig,
    mut stop: watch::Receiver<bool>,
    draining: watch::Receiver<bool>,
) {
    let renew_every = PipelineConfig::duration(&config.lease.renew_interval);
    let sync_every = PipelineConfig::duration(&config.lease.sync_interval);
    // The table is scanned twice per renew interval: a lease's last change is seen at most
    // half an interval late and taken at most half an interval after it expired, so a dead
    // worker's leases move within `duration + renew_interval`.
    let mut tick = tokio::time::interval(renew_every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sync = Instant::now();
    let mut last_renew: Option<Instant> = None;
    let gc = tokio::spawn(gc_loop(Arc::clone(&shared), config.clone(), stop.clone()));
    loop {
        let mut sync = last_sync.elapsed() >= sync_every;
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.sync_now.notified() => sync = true,
            _ = stop.changed() => {
                gc.abort();
                return;
            }
        }
        // Renewals first, so nothing (a sync, a slow scan) delays them.
        if last_renew.is_none_or(|t| t.elapsed() + renew_every / 4 >= renew_every) {
            last_renew = Some(Instant::now());
            let mut book = shared.book.lock().await;
            if let Err(e) = book.renew(&shared.table, shared.now()).await {
                tracing::warn!(error = %e, "renewing leases failed");
            }
        }
        if sync {
            last_sync = Instant::now();
            if let Err(e) = sync_shards(&kinesis, &shared.table, &config).await {
                tracing::warn!(error = %e, "syncing shards to leases failed; trying again later");
            }
        }
        // The scan runs without the book, so checkpoints do not wait for it.
        let listed = shared.table.list().await;
        let listed_at = shared.now();
        let mut book = shared.book.lock().await;
        // Finished leases, and leases asked for that no run reads any more, go now.
        let running = shared.running.lock().expect("not poisoned").clone();
        let release: Vec<String> = book
            .to_release()
            .into_iter()
            .filter(|k| !running.contains(k))
            .collect();
        if !release.is_empty()
            && let Err(e) = book.release(&shared.table, &release).await
        {
            tracing::warn!(error = %e, "releasing leases failed; trying again next round");
        }
        // A worker that is shutting down keeps renewing what it holds until it releases it,
        // but takes and asks for nothing: a lease another worker just released at its own
        // shutdown would otherwise be taken here and released again without a checkpoint.
        let balanced = match listed {
            _ if *draining.borrow() => Ok(()),
            Ok(leases) => book.balance_listed(&shared.table, leases, listed_at).await,
            Err(e) => Err(e),
        };
        if let Err(e) = balanced {
            tracing::warn!(error = %e, "balancing leases failed");
        }
        let assignment = book.assignment();
        let counters = book.counters();
        drop(book);
        shared.status.update(|s| {
            s.counters = counters;
            s.owned = assignment.keys().cloned().collect();
        });
        shared.assignment.send_if_modified(|current| {
            let changed = current.keys().ne(assignment.keys());
            *current = assignment;
            changed
        });
    }
}

/// Collects garbage every 10 minutes (the first time after a random 1–10 minutes, so a
/// fleet started together does not collect at once), in its own task: deletes never delay
/// renewals. Objects must be older than an hour, 10 lease durations and 3 checkpoint
/// intervals, whichever is longest.
async fn gc_loop(shared: Arc<Shared>, config: PipelineConfig, mut stop: watch::Receiver<bool>) {
    let age = [
        Duration::from_secs(3600),
        PipelineConfig::duration(&config.lease.duration) * 10,
        PipelineConfig::duration(&config.checkpoint.interval) * 3,
    ]
    .into_iter()
    .max()
    .expect("three");
    let mut wait = Duration::from_secs(fastrand::u64(60..=600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        wait = Duration::from_secs(600);
        let current = shared.run.lock().expect("not poisoned").clone();
        match collect_garbage(
            &shared.out,
            &shared.checkpoints,
            &shared.table,
            current.as_deref(),
            age,
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "objects of abandoned runs deleted"),
            Err(e) => tracing::warn!(error = %e, "collecting garbage failed; trying again later"),
        }
    }
}

/// Deletes the state objects and staged files of runs that are over: no lease points to
/// any of their state objects, they are not `current`, and nothing of them is younger than
/// `age`. The lease table is read *after* the objects are listed, so a pointer written
/// meanwhile is seen; an empty or unreadable table deletes nothing. Such a run can commit nothing any more (its leases' holds ran out long ago), and
/// every file it committed was published: a lease stops pointing at a run only through a
/// commit of that run, or of a run that restored from it and published its files first.
/// Returns the number of runs deleted.
pub async fn collect_garbage(
    out: &Location,
    checkpoints: &Location,
    table: &LeaseTable,
    current: Option<&str>,
    age: Duration,
) -> Result<usize, JobError> {
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(age).unwrap_or_else(|_| chrono::Duration::hours(1));
    let mut runs: BTreeMap<String, Vec<(Location, object_store::path::Path)>> = BTreeMap::new();
    let mut young: BTreeSet<String> = BTreeSet::new();
    for (location, folder) in [(checkpoints, "state"), (out, "_staging")] {
        let root = location.child(folder);
        let mut listing = location.store.list(Some(&root));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(CheckpointError::from)?;
            let Some(run) = meta.location.prefix_match(&root).and_then(|mut p| p.next()) else {
                continue;
            };
            let run = run.as_ref().to_string();
            if meta.last_modified > cutoff {
                young.insert(run.clone());
            }
            runs.entry(run)
                .or_default()
                .push((location.clone(), meta.location));
        }
    }
    let leases = table.list().await.map_err(lease_error)?;
    if leases.is_empty() {
        return Ok(0);
    }
    let referenced: BTreeSet<&str> = leases
        .iter()
        .filter_map(|l| l.state.as_deref())
        .filter_map(parse_state_path)
        .map(|(run, _)| run)
        .collect();
    let mut deleted = 0;
    for (run, objects) in runs {
        if referenced.contains(run.as_str())
            || current == Some(run.as_str())
            || young.contains(&run)
        {
            continue;
        }
        for (location, path) in objects {
            match location.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(CheckpointError::from(e).into()),
            }
        }
        deleted += 1;
    }
    Ok(deleted)
}

/// Sleeps `d`, or less if `shutdown` turns true.
async fn nap(d: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}

/// Runs pipelines over the assigned shards until `shutdown`.
async fn runner(
    shared: &Arc<Shared>,
    config: &PipelineConfig,
    out: &Location,
    checkpoints: &Location,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), JobError> {
    let mut assignment = shared.assignment.subscribe();
    let settle = PipelineConfig::duration(&config.lease.renew_interval);
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        assignment.borrow_and_update();
        // What to read, straight from the book (the published assignment may be a round
        // old), marked as running under the book's lock so the lease loop keeps it.
        let leases = {
            let book = shared.book.lock().await;
            let now = shared.now();
            let leases: BTreeMap<String, Lease> = book
                .assignment()
                .into_iter()
                .filter(|(k, _)| book.holds(k, now))
                .collect();
            *shared.running.lock().expect("not poisoned") = leases.keys().cloned().collect();
            leases
        };
        if leases.is_empty() {
            tokio::select! {
                _ = assignment.changed() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let run = format!("r{:016x}", fastrand::u64(..));
        *shared.run.lock().expect("not poisoned") = Some(run.clone());
        let committer = Arc::new(LeaseCommitter {
            shared: Arc::clone(shared),
            run: run.clone(),
            checkpoints: checkpoints.clone(),
            out: out.clone(),
            initial: leases
                .iter()
                .map(|(k, l)| {
                    let initial = if l.checkpoint == AT_TIMESTAMP {
                        AT_TIMESTAMP
                    } else {
                        TRIM_HORIZON
                    };
                    (k.clone(), initial.to_string())
                })
                .collect(),
            ended: Mutex::default(),
            pinned: Mutex::default(),
            previous: Mutex::default(),
            superseded: Default::default(),
            closed: Default::default(),
            restart: Notify::new(),
        });
        let target = Arc::clone(&committer) as Arc<dyn CommitTarget>;
        let job = match prepare_run(shared, config, out, checkpoints, &leases, &run, target).await {
            Ok(job) => job,
            Err(e) => {
                failures += 1;
                shared.running.lock().expect("not poisoned").clear();
                if failures >= 5 {
                    // Holding leases that cannot be processed would stall their shards for
                    // everyone: give up, and the leases go to the other workers.
                    return Err(e);
                }
                tracing::error!(error = %e, failures, "preparing a run failed; retrying");
                nap(
                    crate::kinesis::backoff(
                        failures,
                        Duration::from_millis(500),
                        Duration::from_secs(30),
                    ),
                    &mut shutdown,
                )
                .await;
                continue;
            }
        };
        shared.status.update(|s| {
            s.runs += 1;
            s.current = Some((job.metrics(), job.reader_counters()));
        });
        tracing::info!(%run, shards = ?leases.keys().collect::<Vec<_>>(), "run started");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(job.run(stop_rx));
        let mut finished: Option<Result<(), JobError>> = None;
        loop {
            tokio::select! {
                changed = assignment.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = assignment.borrow().clone();
                    let ended = committer.ended.lock().expect("not poisoned").clone();
                    let running: BTreeSet<&String> =
                        leases.keys().filter(|k| !ended.contains(*k)).collect();
                    let current: BTreeSet<&String> = now.keys().collect();
                    if current != running {
                        // A lease lost or handed over: stop at once. Only more leases: let
                        // the rest of the round land first, to restart once.
                        if running.is_subset(&current) {
                            tokio::time::sleep(settle).await;
                        }
                        break;
                    }
                }
                _ = committer.restart.notified() => break,
                _ = shutdown.changed() => break,
                joined = &mut task => {
                    finished = Some(match joined {
                        Ok(r) => r.map(|_| ()),
                        Err(e) => Err(JobError::Panic(e.to_string())),
                    });
                    break;
                }
            }
        }
        if finished.is_none() {
            stop_tx.send_replace(true);
            finished = Some(
                match tokio::time::timeout(Duration::from_secs(120), &mut task).await {
                    Ok(Ok(r)) => r.map(|_| ()),
                    Ok(Err(e)) => Err(JobError::Panic(e.to_string())),
                    Err(_) => {
                        task.abort();
                        Err(JobError::Closed("run did not stop"))
                    }
                },
            );
        }
        // The run is over: whatever of it is still in flight may not commit any more (the
        // lock waits for a commit that is under way to land first).
        committer
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        {
            let mut book = shared.book.lock().await;
            shared.running.lock().expect("not poisoned").clear();
            // What was asked for goes at once (its last checkpoint is in, or nothing of the
            // run after its last checkpoint was published).
            let release = book.to_release();
            if let Err(e) = book.release(&shared.table, &release).await {
                tracing::warn!(error = %e, "releasing leases failed; the lease loop retries");
            }
        }
        shared.status.update(|s| s.current = None);
        let superseded = committer
            .superseded
            .load(std::sync::atomic::Ordering::SeqCst);
        match finished.expect("set") {
            Ok(()) => {
                failures = 0;
                tracing::info!(%run, "run stopped");
            }
            // Refused after a shard's end, as it should be.
            Err(_) if superseded => {
                failures = 0;
                tracing::info!(%run, "run stopped after a shard's end");
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(%run, error = %e, "run ended with an error; restarting from the last committed checkpoint");
                nap(
                    crate::kinesis::backoff(
                        failures.min(6),
                        Duration::from_millis(200),
                        Duration::from_secs(10),
                    ),
                    &mut shutdown,
                )
                .await;
            }
        }
    }
}

/// The saved state `leases` start from (see [`restore_sources`]), each object restricted
/// to the hash ranges it supplies. A committed epoch's files are published before its state
/// is used: a worker that died between its commit and its publication left them staged.
async fn load_restore(
    out: &Location,
    checkpoints: &Location,
    leases: &BTreeMap<String, Lease>,
    table: &[Lease],
) -> Result<Vec<Restore>, CheckpointError> {
    let mut restore = Vec::new();
    for (path, ranges) in restore_sources(leases, table) {
        if let Some((prev_run, epoch)) = parse_state_path(&path) {
            let moved = publish(out, prev_run, epoch).await?;
            if moved > 0 {
                tracing::info!(
                    run = prev_run,
                    epoch,
                    moved,
                    "published files of a committed epoch"
                );
            }
        }
        let bytes = checkpoints
            .store
            .get(&checkpoints.child(&path))
            .await?
            .bytes()
            .await?;
        let checkpoint = crate::checkpoint::decode_checkpoint(&bytes, &path)?;
        restore.push(Restore {
            checkpoint,
            keys: Some(KeyRanges::new(ranges)),
        });
    }
    Ok(restore)
}

/// Restores the state of `leases` and builds the run's job.
async fn prepare_run(
    shared: &Arc<Shared>,
    config: &PipelineConfig,
    out: &Location,
    checkpoints: &Location,
    leases: &BTreeMap<String, Lease>,
    run: &str,
    target: Arc<dyn CommitTarget>,
) -> Result<StreamJob, JobError> {
    // The leases as the table has them now: they must still be ours, at the counter the
    // book holds (so their state pointers are the latest).
    let table = shared.table.list().await.map_err(lease_error)?;
    let me = shared.book.lock().await.me().to_string();
    let mut fresh = BTreeMap::new();
    for l in &table {
        if let Some(held) = leases.get(&l.key) {
            if l.owner.as_deref() != Some(me.as_str()) || l.counter < held.counter {
                return Err(JobError::Config(format!(
                    "lease {} moved to {:?} before the run started",
                    l.key, l.owner
                )));
            }
            fresh.insert(l.key.clone(), l.clone());
        }
    }
    let leases = &fresh;
    let restore = load_restore(out, checkpoints, leases, &table).await?;
    let positions = SourcePositions {
        stream: config.source.kinesis.stream.clone(),
        start_ms: None,
        shards: leases
            .iter()
            .map(|(k, l)| {
                (
                    k.clone(),
                    ShardPosition {
                        parents: Vec::new(),
                        sequence: l.sequence().map(str::to_string),
                        finished: false,
                        max_ts: l.max_ts,
                    },
                )
            })
            .collect(),
    };
    let starts = leases
        .iter()
        .map(|(k, l)| {
            let at = (l.checkpoint == AT_TIMESTAMP)
                .then_some(l.start_ms)
                .flatten();
            (k.clone(), at)
        })
        .collect();
    let source = KinesisSource::new(config, Some(&positions))
        .await
        .only(starts);
    let staging = out.sub(&format!("_staging/{run}"));
    StreamJob::leased(config, source, restore, staging, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, parents: &[&str], range: (u128, u128), state: Option<&str>) -> Lease {
        let mut l = Lease::new(
            key,
            parents.iter().map(|p| p.to_string()).collect(),
            HashRange {
                start: range.0,
                end: range.1,
            },
            TRIM_HORIZON,
        );
        l.state = state.map(str::to_string);
        l
    }

    #[tokio::test]
    async fn publish_moves_committed_epochs_once() {
        let (dir, out) = local_root();
        let staged = |name: &str| dir.path().join("_staging/r1").join(name);
        for name in [
            "anomalies/date=2026-01-01/part-03-e0000000001-0000-aa.parquet",
            "anomalies/date=2026-01-01/part-03-e0000000002-0000-bb.parquet",
            "dead_letter/date=2026-01-01/part-e0000000003-00000-cc.parquet",
        ] {
            std::fs::create_dir_all(staged(name).parent().unwrap()).unwrap();
            std::fs::write(staged(name), name).unwrap();
        }
        assert_eq!(publish(&out, "r1", 2).await.unwrap(), 2);
        let published = dir
            .path()
            .join("anomalies/date=2026-01-01/r1-part-03-e0000000002-0000-bb.parquet");
        assert!(published.exists());
        assert_eq!(
            epoch_of_file("r1-part-03-e0000000002-0000-bb.parquet"),
            Some(2),
            "the run prefix keeps the epoch readable"
        );
        // Epoch 3 is not committed: it stays staged. Publishing again moves nothing.
        assert!(staged("dead_letter/date=2026-01-01/part-e0000000003-00000-cc.parquet").exists());
        assert!(!dir.path().join("dead_letter").exists());
        assert_eq!(publish(&out, "r1", 2).await.unwrap(), 0);
        assert_eq!(publish(&out, "r1", 3).await.unwrap(), 1);
        assert!(
            dir.path()
                .join("dead_letter/date=2026-01-01/r1-part-e0000000003-00000-cc.parquet")
                .exists()
        );
    }

    #[tokio::test]
    async fn garbage_is_only_what_no_lease_needs() {
        let (dir, loc) = local_root();
        let old = std::time::SystemTime::now() - Duration::from_secs(7200);
        let write = |rel: &str, aged: bool| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
            if aged {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        };
        // rA: referenced by a lease. rB: abandoned, old. rC: abandoned but has a young file.
        // rD: the current run (old files, nothing committed yet).
        write("checkpoints/state/rA/chk-0000000003.bin", true);
        write("checkpoints/state/rB/chk-0000000009.bin", true);
        write(
            "_staging/rB/anomalies/date=x/part-00-e0000000010-0000-aa.parquet",
            true,
        );
        write("checkpoints/state/rC/chk-0000000001.bin", true);
        write(
            "_staging/rC/anomalies/date=x/part-00-e0000000002-0000-bb.parquet",
            false,
        );
        write(
            "_staging/rD/anomalies/date=x/part-00-e0000000001-0000-cc.parquet",
            true,
        );
        let table = LeaseTable::memory();
        let checkpoints = loc.sub("checkpoints");
        let collect = || {
            collect_garbage(
                &loc,
                &checkpoints,
                &table,
                Some("rD"),
                Duration::from_secs(3600),
            )
        };
        // No lease is known yet: nothing is deleted.
        assert_eq!(collect().await.unwrap(), 0);
        let mut lease = Lease::new("s", Vec::new(), HashRange::ALL, TRIM_HORIZON);
        lease.state = Some(state_path("rA", 3));
        table.create(&lease).await.unwrap();
        let n = collect().await.unwrap();
        assert_eq!(n, 1);
        assert!(
            !dir.path()
                .join("checkpoints/state/rB/chk-0000000009.bin")
                .exists()
        );
        assert!(
            !dir.path()
                .join("_staging/rB/anomalies/date=x/part-00-e0000000010-0000-aa.parquet")
                .exists()
        );
        for kept in [
            "checkpoints/state/rA/chk-0000000003.bin",
            "checkpoints/state/rC/chk-0000000001.bin",
            "_staging/rD/anomalies/date=x/part-00-e0000000001-0000-cc.parquet",
        ] {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
    }

    #[tokio::test]
    async fn a_new_owner_publishes_what_a_dead_one_committed() {
        // A worker committed epoch 2 of run rX (its lease points there) and died before
        // moving the files; epoch 3 was written but never committed.
        let (dir, out) = local_root();
        let checkpoints = out.sub("checkpoints");
        for e in 1..=3u64 {
            let rel = format!("_staging/rX/anomalies/date=x/part-00-e{e:010}-0000-f{e}.parquet");
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"rows").unwrap();
        }
        let saved = Checkpoint {
            version: crate::checkpoint::CHECKPOINT_VERSION,
            epoch: 2,
            created_ms: 0,
            source: SourcePositions::default(),
            gate: crate::gate::EventTimeGate::new(
                crate::kinesis::decode::record_schema(&Default::default()),
                0,
            )
            .save()
            .unwrap(),
            workers: Vec::new(),
        };
        checkpoints
            .store
            .put(
                &checkpoints.child(&state_path("rX", 2)),
                PutPayload::from(postcard::to_stdvec(&saved).unwrap()),
            )
            .await
            .unwrap();
        let lease = lease("s", &[], (0, 99), Some(&state_path("rX", 2)));
        let leases = BTreeMap::from([("s".to_string(), lease.clone())]);
        let restore = load_restore(&out, &checkpoints, &leases, &[lease])
            .await
            .unwrap();
        assert_eq!(restore.len(), 1);
        assert_eq!(restore[0].checkpoint, saved);
        assert_eq!(
            restore[0].keys.as_ref().unwrap().ranges(),
            &[HashRange { start: 0, end: 99 }]
        );
        let published = |e: u64| {
            dir.path()
                .join(format!(
                    "anomalies/date=x/rX-part-00-e{e:010}-0000-f{e}.parquet"
                ))
                .exists()
        };
        assert!(
            published(1) && published(2),
            "committed epochs are published"
        );
        assert!(!published(3), "an uncommitted epoch is not");
    }

    /// A temporary folder and its location.
    fn local_root() -> (tempfile::TempDir, Location) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        let loc = Location::parse(&path, &crate::store::S3Config::default(), true).unwrap();
        (dir, loc)
    }

    #[test]
    fn state_paths_round_trip() {
        let p = state_path("r00ff", 42);
        assert_eq!(parse_state_path(&p), Some(("r00ff", 42)));
        assert_eq!(parse_state_path("state/x/other.bin"), None);
    }

    #[test]
    fn children_restore_from_their_parents_ranges() {
        // A split: p (0..=99) into a (0..=49) and b (50..=99); then a merge of b and c.
        let table = vec![
            lease("p", &[], (0, 99), Some("state/r1/chk-0000000003.bin")),
            lease("a", &["p"], (0, 49), Some("state/r2/chk-0000000007.bin")),
            lease("b", &["p"], (50, 99), None),
            lease("c", &[], (100, 199), Some("state/r3/chk-0000000001.bin")),
            lease("m", &["b", "c"], (50, 199), None),
        ];
        let wanted: BTreeMap<String, Lease> = ["a", "m"]
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    table.iter().find(|l| l.key == *k).unwrap().clone(),
                )
            })
            .collect();
        let sources = restore_sources(&wanted, &table);
        let r = |a, b| HashRange { start: a, end: b };
        assert_eq!(sources["state/r2/chk-0000000007.bin"], vec![r(0, 49)]);
        // m's keys 50..=99 come from p through b (never checkpointed), 100..=199 from c.
        assert_eq!(sources["state/r1/chk-0000000003.bin"], vec![r(50, 99)]);
        assert_eq!(sources["state/r3/chk-0000000001.bin"], vec![r(100, 199)]);
        assert_eq!(sources.len(), 3);
    }
}
