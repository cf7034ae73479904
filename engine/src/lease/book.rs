//! One worker's leases and the protocol that moves them.
//!
//! # Ownership
//! A worker *holds* a lease from a successful take until `duration − safety` after it last
//! sent a successful write to it (a renewal, a take or a checkpoint), measured on its own
//! clock from when it *sent* the write; `safety` leaves it time to stop reading the shard. Another worker takes a lease only when its counter has not
//! changed for `duration` on *its* clock since it first saw that counter (the clock read after
//! the listing that showed it), which is after the owner sent its last write: so the old owner's hold has ended before the new one begins
//! (clocks may be offset, not run at different rates). Every write is conditional on the
//! counter, so a worker that lost a lease without noticing cannot write to it either.
//!
//! # Balance
//! A lease is *processable* when it is not read to its end and each of its parents is
//! (or has no lease). Each round a worker aims at `ceil(processable / workers)` leases,
//! where workers are the owners of live leases plus itself. Below that it takes expired or
//! free leases; when there are none, it asks the most loaded worker (if that one holds at
//! least two more than this one) to hand over at most `max_steals` leases by writing `healerHandoffTo`.
//! The owner sees the request at its next renewal, stops processing the lease, checkpoints
//! it and releases it, and the asker takes it at once: a handoff has neither a gap of
//! `duration` nor two workers reading one shard (a KCL steal has both risks).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::table::{Lease, LeaseCheckpoint, LeaseError, LeaseTable};

/// Protocol settings.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// A lease not written for this long may be taken.
    pub duration: Duration,
    /// Leases asked from the most loaded worker per round.
    pub max_steals: usize,
    /// Leases held at most.
    pub max_leases: usize,
    /// A hold ends this long before others may take the lease (time to stop reading).
    pub safety: Duration,
}

/// Counters of one worker's lease activity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseCounters {
    /// Leases taken (free or expired).
    pub taken: u64,
    /// Handoffs asked of other workers.
    pub asked: u64,
    /// Leases handed over to another worker on request, or released at shutdown.
    pub released: u64,
    /// Leases lost: taken by another worker, or not renewed in time.
    pub lost: u64,
}

#[derive(Debug, Clone)]
struct Held {
    lease: Lease,
    /// Local time until which the hold is certain.
    until: Duration,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct LeaseBook {
    me: String,
    settings: LeaseSettings,
    held: BTreeMap<String, Held>,
    /// Per lease in the table: the counter last seen and since when (local time).
    seen: HashMap<String, (u64, Duration)>,
    /// Leases another worker asked for: not processed, released once no run reads them.
    releasing: BTreeSet<String>,
    /// Handoffs this worker asked for, and when.
    asked: HashMap<String, Duration>,
    /// The latest listing.
    table: Vec<Lease>,
    counters: LeaseCounters,
}

/// Whether `lease` may be processed given the whole table: not finished, and every parent
/// finished or gone.
pub fn processable(lease: &Lease, all: &BTreeMap<&str, &Lease>) -> bool {
    !lease.finished()
        && lease
            .parents
            .iter()
            .all(|p| all.get(p.as_str()).is_none_or(|p| p.finished()))
}

impl LeaseBook {
    /// The book of worker `me`.
    pub fn new(me: &str, settings: LeaseSettings) -> Self {
        Self {
            me: me.to_string(),
            settings,
            held: BTreeMap::new(),
            seen: HashMap::new(),
            releasing: BTreeSet::new(),
            asked: HashMap::new(),
            table: Vec::new(),
            counters: LeaseCounters::default(),
        }
    }

    /// This worker's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Activity so far.
    pub fn counters(&self) -> LeaseCounters {
        self.counters
    }

    /// The latest listing of the table.
    pub fn table(&self) -> &[Lease] {
        &self.table
    }

    /// Whether this worker holds `key` at local time `now`.
    pub fn holds(&self, key: &str, now: Duration) -> bool {
        self.held.get(key).is_some_and(|h| now < h.until)
    }

    /// The leases to process now: held, not finished, not being handed over.
    pub fn assignment(&self) -> BTreeMap<String, Lease> {
        self.held
            .iter()
            .filter(|(k, h)| !self.releasing.contains(*k) && !h.lease.finished())
            .map(|(k, h)| (k.clone(), h.lease.clone()))
            .collect()
    }

    /// Held leases that should be released: asked for by another worker, or finished.
    pub fn to_release(&self) -> Vec<String> {
        self.held
            .iter()
            .filter(|(k, h)| self.releasing.contains(*k) || h.lease.finished())
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn lose(&mut self, key: &str, why: &str) {
        if self.held.remove(key).is_some() {
            self.counters.lost += 1;
            self.releasing.remove(key);
            tracing::warn!(lease = key, worker = %self.me, why, "lease lost");
        }
    }

    /// Renews every held lease. A lease that changed under us is lost; one that cannot be
    /// renewed (the table unreachable) is dropped once its hold has run out.
    pub async fn renew(&mut self, table: &LeaseTable, now: Duration) -> Result<(), LeaseError> {
        let keys: Vec<(String, u64)> = self
            .held
            .iter()
            .map(|(k, h)| (k.clone(), h.lease.counter))
            .collect();
        // All at once: one slow write must not make the others late.
        let results = futures::future::join_all(
            keys.iter()
                .map(|(key, counter)| table.renew(key, &self.me, *counter)),
        )
        .await;
        let mut failure = None;
        for ((key, _), result) in keys.into_iter().zip(results) {
            match result {
                Ok(lease) => {
                    if lease.handoff_to.as_ref().is_some_and(|w| *w != self.me)
                        && self.releasing.insert(key.clone())
                    {
                        tracing::info!(lease = %key, to = ?lease.handoff_to, "handing lease over");
                    }
                    let until = self.hold_from(now);
                    self.held.insert(key, Held { lease, until });
                }
                Err(LeaseError::Conflict(_)) => self.lose(&key, "changed by another worker"),
                Err(e) => {
                    if self.held.get(&key).is_some_and(|h| now >= h.until) {
                        self.lose(&key, "not renewed in time");
                    }
                    failure = Some(e);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// The end of a hold confirmed by a write sent at `sent`.
    fn hold_from(&self, sent: Duration) -> Duration {
        sent + self.settings.duration.saturating_sub(self.settings.safety)
    }

    /// Lists the table, then takes leases or asks for them to reach this worker's share.
    /// `clock` is the local time, read after the listing arrives (a write the listing missed
    /// was sent before that).
    pub async fn balance(
        &mut self,
        table: &LeaseTable,
        clock: &(dyn Fn() -> Duration + Sync),
    ) -> Result<(), LeaseError> {
        let leases = table.list().await?;
        self.balance_listed(table, leases, clock()).await
    }

    /// [`Self::balance`] with a listing made by the caller (who need not hold the book while
    /// the table is scanned); `now` is the local time read after the listing arrived. A
    /// write the listing missed is harmless: every take and ask is conditional on the
    /// counter listed.
    pub async fn balance_listed(
        &mut self,
        table: &LeaseTable,
        leases: Vec<Lease>,
        now: Duration,
    ) -> Result<(), LeaseError> {
        for l in &leases {
            let entry = self.seen.entry(l.key.clone()).or_insert((l.counter, now));
            if entry.0 != l.counter {
                *entry = (l.counter, now);
            }
        }
        self.seen.retain(|k, _| leases.iter().any(|l| &l.key == k));
        // A held lease the table shows with another owner was taken.
        let gone: Vec<String> = self
            .held
            .keys()
            .filter(|k| {
                leases
                    .iter()
                    .find(|l| &l.key == *k)
                    .is_none_or(|l| l.owner.as_deref() != Some(self.me.as_str()))
            })
            .cloned()
            .collect();
        for k in gone {
            self.lose(&k, "owned by another worker");
        }
        self.table = leases;
        let leases = self.table.clone();
        let all: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        let duration = self.settings.duration;
        let stale: BTreeSet<String> = leases
            .iter()
            .filter(|l| {
                l.owner.is_none()
                    || self
                        .seen
                        .get(&l.key)
                        .is_some_and(|(_, since)| now >= *since + duration)
            })
            .map(|l| l.key.clone())
            .collect();
        let expired = |l: &Lease| stale.contains(&l.key);
        let free_long: BTreeSet<String> = leases
            .iter()
            .filter(|l| {
                self.seen
                    .get(&l.key)
                    .is_some_and(|(_, since)| now >= *since + duration)
            })
            .map(|l| l.key.clone())
            .collect();
        let me = self.me.clone();
        let live: Vec<&Lease> = leases.iter().filter(|l| processable(l, &all)).collect();
        if live.is_empty() {
            return Ok(());
        }
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        load.insert(&me, 0);
        // A lease being handed over counts for the worker it goes to, so that two workers
        // do not both ask the same one for its "extra" leases.
        for l in &live {
            let counted = match (&l.handoff_to, &l.owner) {
                (Some(to), Some(_)) if !expired(l) => Some(to),
                // Free and meant for `to`: only until it could be taken by anyone (the asker
                // may have died before taking it).
                (Some(to), None) if !free_long.contains(&l.key) => Some(to),
                // Owned by this id but not held: left by an earlier run of this worker.
                (None, Some(o)) if *o == me => self.held.contains_key(&l.key).then_some(o),
                (None, Some(o)) if !expired(l) => Some(o),
                _ => None,
            };
            if let Some(w) = counted {
                *load.entry(w.as_str()).or_default() += 1;
            }
        }
        let mine = load[me.as_str()];
        let held_now = self.held.len() - self.releasing.len();
        let target = live
            .len()
            .div_ceil(load.len())
            .min(self.settings.max_leases);
        // Leases handed over to this worker are taken whatever the count: they are its share.
        let handed: Vec<&Lease> = live
            .iter()
            .copied()
            .filter(|l| l.owner.is_none() && l.handoff_to.as_deref() == Some(me.as_str()))
            .collect();
        let mut room = self.settings.max_leases.saturating_sub(held_now);
        for l in handed {
            if room == 0 {
                break;
            }
            if self.try_take(table, l, now).await? {
                room -= 1;
            }
        }
        if mine >= target {
            return Ok(());
        }
        // Free or expired leases; first those handed over to us, and not those handed to
        // another worker who should get them first (unless free for a whole duration).
        let mut candidates: Vec<&Lease> = live
            .iter()
            .copied()
            .filter(|l| !self.held.contains_key(&l.key) && expired(l))
            .filter(|l| match &l.handoff_to {
                Some(w) if *w != me => free_long.contains(&l.key),
                _ => true,
            })
            .collect();
        candidates.sort_by_key(|l| (l.handoff_to.as_deref() != Some(me.as_str()), &l.key));
        let mut wanted = (target - mine).min(room);
        for l in candidates {
            if wanted == 0 {
                break;
            }
            if self.held.contains_key(&l.key) {
                continue;
            }
            if self.try_take(table, l, now).await? {
                wanted -= 1;
            }
        }
        if wanted == 0 {
            return Ok(());
        }
        // Nothing free: ask the most loaded worker, once per lease and duration.
        self.asked
            .retain(|_, at| now < *at + self.settings.duration * 2);
        if !self.asked.is_empty() {
            return Ok(());
        }
        let Some((victim, &most)) = load
            .iter()
            .filter(|(w, _)| **w != me)
            .max_by_key(|(w, n)| (**n, std::cmp::Reverse(**w)))
        else {
            return Ok(());
        };
        // Only from a worker with at least two more: with 5 leases on 4 workers, 2-1-1-1 is
        // balanced although the share rounds up to 2.
        if most < mine + 2 {
            return Ok(());
        }
        let victim = victim.to_string();
        let asks: Vec<&Lease> = live
            .iter()
            .copied()
            .filter(|l| l.owner.as_deref() == Some(victim.as_str()) && l.handoff_to.is_none())
            .take(self.settings.max_steals.min(wanted).min((most - mine) / 2))
            .collect();
        for l in asks {
            match table.ask(&l.key, &victim, l.counter, &self.me).await {
                Ok(()) => {
                    tracing::info!(lease = %l.key, from = %victim, worker = %self.me, "asked for lease");
                    self.asked.insert(l.key.clone(), now);
                    self.counters.asked += 1;
                }
                Err(LeaseError::Conflict(_)) => {}
                Err(e) => tracing::warn!(lease = %l.key, error = %e, "asking for a lease failed"),
            }
        }
        Ok(())
    }

    /// Takes `l` as listed; false when another worker changed it first.
    async fn try_take(
        &mut self,
        table: &LeaseTable,
        l: &Lease,
        now: Duration,
    ) -> Result<bool, LeaseError> {
        match table.take(&l.key, &self.me, l.counter).await {
            Ok(lease) => {
                tracing::info!(lease = %lease.key, worker = %self.me, from = ?l.owner, "lease taken");
                self.asked.remove(&lease.key);
                self.seen.insert(lease.key.clone(), (lease.counter, now));
                let until = self.hold_from(now);
                self.held.insert(lease.key.clone(), Held { lease, until });
                self.counters.taken += 1;
                Ok(true)
            }
            Err(LeaseError::Conflict(_)) => Ok(false),
            // One lease the table will not take now does not stop the others.
            Err(e) => {
                tracing::warn!(lease = %l.key, error = %e, "taking a lease failed");
                Ok(false)
            }
        }
    }

    /// Writes a checkpoint to every lease in `updates` in one transaction. Every key must be
    /// held; on a conflict nothing is written and the lease is lost. A store error is tried
    /// again (with the same idempotency `token`, so a commit that went through is not
    /// mistaken for a conflict); if it persists, the outcome is unknown and the caller must
    /// not publish.
    pub async fn commit(
        &mut self,
        table: &LeaseTable,
        now: Duration,
        updates: Vec<(String, String, String, Option<i64>)>,
        token: &str,
    ) -> Result<(), LeaseError> {
        let mut writes = Vec::with_capacity(updates.len());
        for (key, checkpoint, state, max_ts) in updates {
            let Some(held) = self.held.get(&key).filter(|h| now < h.until) else {
                self.lose(&key, "hold ran out before the checkpoint");
                return Err(LeaseError::Conflict(key));
            };
            writes.push(LeaseCheckpoint {
                counter: held.lease.counter,
                key,
                checkpoint,
                state,
                max_ts,
            });
        }
        let mut attempt = 0;
        let result = loop {
            match table.commit(&self.me, &writes, token).await {
                Err(LeaseError::Store(e)) if attempt < 3 => {
                    tracing::warn!(error = %e, "lease commit failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                other => break other,
            }
        };
        match result {
            Ok(()) => {
                for w in writes {
                    let h = self.held.get_mut(&w.key).expect("checked");
                    h.lease.counter += 1;
                    h.lease.checkpoint = w.checkpoint;
                    h.lease.state = Some(w.state);
                    h.lease.max_ts = w.max_ts;
                    h.lease.owner_switches = 0;
                    h.until = now + self.settings.duration.saturating_sub(self.settings.safety);
                }
                Ok(())
            }
            Err(LeaseError::Conflict(key)) => {
                self.lose(&key, "checkpoint refused");
                Err(LeaseError::Conflict(key))
            }
            Err(e) => Err(e),
        }
    }

    /// Releases held leases (once no run reads them): a free lease is taken at once by
    /// whoever needs it.
    pub async fn release(&mut self, table: &LeaseTable, keys: &[String]) -> Result<(), LeaseError> {
        for key in keys {
            let Some(held) = self.held.get(key) else {
                continue;
            };
            match table.release(key, &self.me, held.lease.counter).await {
                Ok(_) | Err(LeaseError::Conflict(_)) => {
                    self.held.remove(key);
                    self.releasing.remove(key);
                    self.counters.released += 1;
                    tracing::info!(lease = %key, worker = %self.me, "lease released");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Held leases read to their end (and committed so): free to release.
    pub fn finished_held(&self) -> Vec<String> {
        self.held
            .iter()
            .filter(|(_, h)| h.lease.finished())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Held leases.
    pub fn held(&self) -> Vec<String> {
        self.held.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    //! A model check of the protocol on the in-memory table: random interleavings of
    //! rounds, checkpoints, releases, crashes (with a restart or for good) and time never give
    //! two workers a hold on one lease, a checkpoint is only ever written by the lease's
    //! holder, and once the chaos stops every processable lease ends up held by a live
    //! worker, balanced among the live ones.
    use super::*;
    use crate::lease::HashRange;
    use proptest::prelude::*;

    const DURATION: Duration = Duration::from_secs(10);

    #[derive(Debug, Clone)]
    enum Op {
        /// Worker renews, then balances.
        Round(usize),
        /// Worker checkpoints everything it processes (the lease at index finishes).
        Checkpoint(usize, Option<usize>),
        /// Worker stops processing what was asked of it or finished, and releases it.
        Release(usize),
        /// Worker dies (its book is gone) and comes back with an empty one.
        Crash(usize),
        /// Worker dies for good (it takes no further part).
        Die(usize),
        /// Time passes.
        Sleep(u64),
    }

    fn op(workers: usize, leases: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..workers).prop_map(Op::Round),
            2 => (0..workers, proptest::option::weighted(0.2, 0..leases))
                .prop_map(|(w, f)| Op::Checkpoint(w, f)),
            2 => (0..workers).prop_map(Op::Release),
            1 => (0..workers).prop_map(Op::Crash),
            1 => (0..workers).prop_map(Op::Die),
            3 => (0u64..6000).prop_map(Op::Sleep),
        ]
    }

    fn settings() -> LeaseSettings {
        LeaseSettings {
            duration: DURATION,
            max_steals: 1,
            max_leases: 100,
            safety: Duration::from_secs(1),
        }
    }

    /// Every worker's local clock: the same rate, different offsets.
    fn local(now: Duration, worker: usize) -> Duration {
        now + Duration::from_secs(1000 * worker as u64 + 7)
    }

    fn table_with(leases: usize) -> LeaseTable {
        let table = LeaseTable::memory();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..leases {
                // Shards 0..n/2 are open; each later one is a child of an earlier one.
                let parents = if i >= leases.div_ceil(2) {
                    vec![format!("shard-{:02}", i - leases.div_ceil(2))]
                } else {
                    Vec::new()
                };
                let lease = Lease::new(
                    &format!("shard-{i:02}"),
                    parents,
                    HashRange::ALL,
                    "TRIM_HORIZON",
                );
                assert!(table.create(&lease).await.unwrap());
            }
        });
        table
    }

    fn check_single_holder(books: &[LeaseBook], now: Duration, keys: &[String]) {
        for key in keys {
            let holders: Vec<&str> = books
                .iter()
                .enumerate()
                .filter(|(w, b)| b.holds(key, local(now, *w)))
                .map(|(_, b)| b.me())
                .collect();
            assert!(holders.len() <= 1, "{key} held by {holders:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn never_two_holders_and_every_lease_ends_owned(
            workers in 2usize..5,
            leases in 2usize..10,
            ops in proptest::collection::vec(op(4, 10), 1..120),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let table = table_with(leases);
            let keys: Vec<String> = (0..leases).map(|i| format!("shard-{i:02}")).collect();
            let mut books: Vec<LeaseBook> =
                (0..workers).map(|w| LeaseBook::new(&format!("w{w}"), settings())).collect();
            let mut now = Duration::ZERO;
            // Dead workers take no further part; worker 0 never dies.
            let mut dead = vec![false; workers];
            rt.block_on(async {
                for op in ops {
                    let alive = |w: usize| w < workers && !dead[w];
                    match op {
                        Op::Round(w) if alive(w) => {
                            let t = local(now, w);
                            books[w].renew(&table, t).await.unwrap();
                            books[w].balance(&table, &|| t).await.unwrap();
                        }
                        Op::Checkpoint(w, finish) if alive(w) => {
                            let t = local(now, w);
                            let updates: Vec<_> = books[w]
                                .assignment()
                                .keys()
                                .map(|k| {
                                    let end = finish.is_some_and(|f| keys.get(f) == Some(k));
                                    let cp = if end { "SHARD_END" } else { "42" };
                                    (k.clone(), cp.to_string(), format!("state/{w}"), None)
                                })
                                .collect();
                            let before = table.list().await.unwrap();
                            let ok = books[w].commit(&table, t, updates.clone(), "t").await.is_ok();
                            if ok {
                                // Only the holder wrote, and only leases it owned.
                                for (k, _, _, _) in &updates {
                                    let l = before.iter().find(|l| &l.key == k).unwrap();
                                    prop_assert_eq!(l.owner.as_deref(), Some(books[w].me()));
                                }
                            }
                        }
                        Op::Release(w) if alive(w) => {
                            let keys = books[w].to_release();
                            books[w].release(&table, &keys).await.unwrap();
                        }
                        Op::Crash(w) if alive(w) => {
                            books[w] = LeaseBook::new(&format!("w{w}"), settings());
                        }
                        Op::Die(w) if w > 0 && alive(w) => {
                            dead[w] = true;
                            books[w] = LeaseBook::new(&format!("w{w}"), settings());
                        }
                        Op::Sleep(ms) => now += Duration::from_millis(ms),
                        _ => {}
                    }
                    check_single_holder(&books, now, &keys);
                }
                // Calm: every worker runs its loop (renew, release what it must, balance)
                // every 3 s for a while.
                for _ in 0..60 {
                    for (w, book) in books.iter_mut().enumerate() {
                        if dead[w] {
                            continue;
                        }
                        let t = local(now, w);
                        book.renew(&table, t).await.unwrap();
                        let release = book.to_release();
                        book.release(&table, &release).await.unwrap();
                        book.balance(&table, &|| t).await.unwrap();
                    }
                    check_single_holder(&books, now, &keys);
                    now += Duration::from_secs(3);
                }
                let all = table.list().await.unwrap();
                let index: BTreeMap<&str, &Lease> = all.iter().map(|l| (l.key.as_str(), l)).collect();
                let live: Vec<&Lease> = all.iter().filter(|l| processable(l, &index)).collect();
                let mut loads = vec![0usize; workers];
                for l in &live {
                    let owner = books.iter().enumerate().position(|(w, b)| {
                        l.owner.as_deref() == Some(b.me()) && b.holds(&l.key, local(now, w))
                    });
                    prop_assert!(owner.is_some(), "{} not held: {:?}", l.key, l);
                    loads[owner.unwrap()] += 1;
                }
                let live_loads: Vec<usize> =
                    (0..workers).filter(|w| !dead[*w]).map(|w| loads[w]).collect();
                let (lo, hi) = (live_loads.iter().min().unwrap(), live_loads.iter().max().unwrap());
                prop_assert!(hi - lo <= 1, "unbalanced {loads:?}");
                Ok(())
            })?;
        }
    }
}
