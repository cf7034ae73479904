//! The saga journal: sagas, their steps, target locks, the kill switch and approval requests,
//! in one SQLite file.
//!
//! SQLite because every decision that must not race is one `BEGIN IMMEDIATE` transaction:
//! admission checks the kill switch, the allow-list, idempotency, recurrence, cooldown,
//! budgets and the concurrency cap and takes the target's lock in the same transaction, so
//! two healer processes sharing the file cannot both act on one target. WAL mode and
//! `synchronous = FULL` make every committed step durable before its effect starts.
//!
//! Locks carry a fencing token that grows with every new holder; a saga renews its lock
//! before each step that touches anything and stops when the token is no longer its own. A
//! lock's owner is a process (`pid:start-time`), so a crashed process's sagas are taken over
//! at once by the next healer on the host, without waiting for the lock to expire, and never
//! by two at a time.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::config::{RemediationConfig, Scope};

/// A saga's state. In-flight states are the step it is in; the rest are final.
pub mod state {
    /// Waiting for a human.
    pub const AWAITING_APPROVAL: &str = "awaiting_approval";
    /// Approved, not admitted yet.
    pub const APPROVED: &str = "approved";
    /// Admitted, lock held.
    pub const PLANNED: &str = "planned";
    /// Checking preconditions.
    pub const PRECONDITIONS: &str = "preconditions";
    /// Recording the state to restore.
    pub const SNAPSHOT: &str = "snapshot";
    /// Acting.
    pub const EXECUTE: &str = "execute";
    /// Checking the effect.
    pub const VERIFY: &str = "verify";
    /// Undoing.
    pub const COMPENSATE: &str = "compensate";
    /// Done and verified.
    pub const SUCCEEDED: &str = "succeeded";
    /// Failed, undone, escalated.
    pub const ROLLED_BACK: &str = "rolled_back";
    /// Failed and not undone (rollback failed, or is manual): escalated.
    pub const FAILED: &str = "failed";
    /// Stopped by a safety rule before anything was touched: escalated.
    pub const REFUSED: &str = "refused";
    /// Not acted on (a precondition, a ceiling, recurrence): escalated.
    pub const ESCALATED: &str = "escalated";
    /// Dry run: planned steps recorded, nothing touched.
    pub const DRY_RUN: &str = "dry_run";
    /// A human said no.
    pub const DENIED: &str = "denied";
    /// Nobody answered the approval request in time: escalated.
    pub const EXPIRED: &str = "expired";

    /// States a saga is acting in.
    pub const IN_FLIGHT: [&str; 6] = [
        PLANNED,
        PRECONDITIONS,
        SNAPSHOT,
        EXECUTE,
        VERIFY,
        COMPENSATE,
    ];
}

/// A failure of the journal itself.
#[derive(Debug, thiserror::Error)]
#[error("saga journal: {0}")]
pub struct JournalError(#[from] rusqlite::Error);

type Result<T> = std::result::Result<T, JournalError>;

/// One saga as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    /// Idempotency key: a hash of incident, action and target.
    pub id: String,
    /// Incident id.
    pub incident: String,
    /// Action id.
    pub action: String,
    /// Target resource.
    pub target: String,
    /// Service of the target.
    pub service: String,
    /// Recorded only.
    pub dry_run: bool,
    /// State.
    pub state: String,
    /// Why it ended as it did, or why it waits.
    pub reason: String,
    /// When it was created (ms).
    pub created_ms: i64,
    /// When it was admitted to act (ms).
    pub started_ms: Option<i64>,
    /// When it ended (ms).
    pub ended_ms: Option<i64>,
    /// Fencing token of its lock.
    pub token: Option<i64>,
    /// What execute changed, to restore (JSON).
    pub snapshot: Option<String>,
    /// Escalation context (JSON of [`crate::notify::Escalation`]).
    pub context: String,
    /// The decision's time (ms): the end of `for` windows over telemetry.
    pub as_of_ms: i64,
}

/// One journaled step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    /// Order.
    pub seq: i64,
    /// Saga id.
    pub saga: String,
    /// Step name.
    pub step: String,
    /// `started`, `ok`, `failed` or `skipped`.
    pub status: String,
    /// Start (ms).
    pub started_ms: i64,
    /// End (ms).
    pub ended_ms: Option<i64>,
    /// Details.
    pub detail: String,
}

/// An approval request.
#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    /// Id (short, for the command line).
    pub id: String,
    /// Saga.
    pub saga: String,
    /// `action` (run it?) or `rollback` (undo a failed action by hand?).
    pub kind: String,
    /// Action id.
    pub action: String,
    /// Target.
    pub target: String,
    /// Why it was asked.
    pub reason: String,
    /// Requested (ms).
    pub requested_ms: i64,
    /// Expires (ms).
    pub expires_ms: i64,
    /// `pending`, `approved`, `denied`, `expired`.
    pub status: String,
    /// Who answered.
    pub by: Option<String>,
    /// When (ms).
    pub decided_ms: Option<i64>,
}

/// The kill switch, when set.
#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    /// Why.
    pub reason: String,
    /// Who.
    pub by: String,
    /// Since (ms).
    pub since_ms: i64,
    /// Until (ms); `None`: until resumed.
    pub until_ms: Option<i64>,
}

/// What admission decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Act; the lock's fencing token.
    Act(i64),
    /// Record only (dry run).
    DryRun,
    /// This incident, action and target already has a saga (at most once).
    Exists(String),
    /// A safety rule stopped it: nothing touched, escalate.
    Refused(String),
    /// Acting again would not help (recurrence): escalate.
    Escalate(String),
}

/// A request to act.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSaga {
    /// Incident id.
    pub incident: String,
    /// Action id.
    pub action: String,
    /// Target.
    pub target: String,
    /// Service of the target.
    pub service: String,
    /// Escalation context (JSON).
    pub context: String,
    /// Recorded only: a dry run has a key of its own, so switching to enforce acts.
    pub dry_run: bool,
    /// The decision's time (ms).
    pub as_of_ms: i64,
}

impl NewSaga {
    /// The idempotency key of (incident, action, target) in this mode.
    pub fn key(&self) -> String {
        let mut h = healer_operators::id::StableHasher::new();
        h.str(if self.dry_run {
            "saga/v1/dry"
        } else {
            "saga/v1"
        })
        .str(&self.incident)
        .str(&self.action)
        .str(&self.target);
        h.hex()
    }
}

/// This process, as a lock owner: `host/pid:start-time` (the start time tells a reused pid
/// apart; the host tells whose pids they are).
pub fn this_process() -> String {
    let pid = std::process::id();
    format!("{}/{pid}:{}", host(), start_time(pid).unwrap_or(0))
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// The start time of process `pid` (clock ticks after boot), if it runs.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the process `owner` names is known to be gone. A process of another host (or
/// container) cannot be checked from here: only its lock's expiry frees its sagas.
fn owner_dead(owner: &str) -> bool {
    let Some((owner_host, rest)) = owner.split_once('/') else {
        return false;
    };
    if owner_host != host() {
        return false;
    }
    let Some((pid, start)) = rest.split_once(':') else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    start_time(pid) != Some(start)
}

/// What [`Journal::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Taken over, with a new fencing token.
    Token(i64),
    /// A live process runs it (or its lock has not expired yet): leave it.
    Busy,
    /// Another saga took the target since: its snapshot is stale, do not touch it.
    Lost,
}

/// The journal.
#[derive(Debug)]
pub struct Journal {
    conn: Mutex<Connection>,
    owner: String,
}

/// The journal's schema version (SQLite `user_version`); a later version adds migrations.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sagas (
  id TEXT PRIMARY KEY,
  incident TEXT NOT NULL,
  action TEXT NOT NULL,
  target TEXT NOT NULL,
  service TEXT NOT NULL,
  dry_run INTEGER NOT NULL,
  state TEXT NOT NULL,
  reason TEXT NOT NULL DEFAULT '',
  created_ms INTEGER NOT NULL,
  started_ms INTEGER,
  ended_ms INTEGER,
  token INTEGER,
  snapshot TEXT,
  context TEXT NOT NULL,
  as_of_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_target ON sagas (target, action, started_ms);
CREATE INDEX IF NOT EXISTS sagas_state ON sagas (state);
CREATE TABLE IF NOT EXISTS steps (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  saga TEXT NOT NULL,
  step TEXT NOT NULL,
  status TEXT NOT NULL,
  started_ms INTEGER NOT NULL,
  ended_ms INTEGER,
  detail TEXT NOT NULL DEFAULT '',
  exported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS steps_saga ON steps (saga, seq);
CREATE TABLE IF NOT EXISTS locks (
  target TEXT PRIMARY KEY,
  holder TEXT NOT NULL,
  owner TEXT NOT NULL,
  token INTEGER NOT NULL,
  expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pauses (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  reason TEXT NOT NULL,
  by TEXT NOT NULL,
  since_ms INTEGER NOT NULL,
  until_ms INTEGER,
  resumed_ms INTEGER,
  resumed_by TEXT
);
CREATE TABLE IF NOT EXISTS approvals (
  id TEXT PRIMARY KEY,
  saga TEXT NOT NULL,
  kind TEXT NOT NULL,
  reason TEXT NOT NULL,
  requested_ms INTEGER NOT NULL,
  expires_ms INTEGER NOT NULL,
  status TEXT NOT NULL,
  by TEXT,
  decided_ms INTEGER
);
";

fn saga_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Saga> {
    Ok(Saga {
        id: r.get(0)?,
        incident: r.get(1)?,
        action: r.get(2)?,
        target: r.get(3)?,
        service: r.get(4)?,
        dry_run: r.get::<_, i64>(5)? != 0,
        state: r.get(6)?,
        reason: r.get(7)?,
        created_ms: r.get(8)?,
        started_ms: r.get(9)?,
        ended_ms: r.get(10)?,
        token: r.get(11)?,
        snapshot: r.get(12)?,
        context: r.get(13)?,
        as_of_ms: r.get(14)?,
    })
}

/// `'a', 'b'` for an SQL `IN`; only for the [`state`] names, never for outside text.
fn in_list(states: &[&str]) -> String {
    states
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn step_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StepRow> {
    Ok(StepRow {
        seq: r.get(0)?,
        saga: r.get(1)?,
        step: r.get(2)?,
        status: r.get(3)?,
        started_ms: r.get(4)?,
        ended_ms: r.get(5)?,
        detail: r.get(6)?,
    })
}

const SAGA_COLUMNS: &str = "id, incident, action, target, service, dry_run, state, reason, created_ms, started_ms, ended_ms, token, snapshot, context, as_of_ms";

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Journal {
    /// Opens (creating when missing) the journal at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        // Switching a new file to WAL can report "locked" at once, without waiting, while
        // another process does the same: try again for as long as the busy timeout.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match Self::prepare(&conn, path) {
                Err(JournalError(rusqlite::Error::SqliteFailure(e, _)))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20 + fastrand::u64(0..30)));
                }
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
            owner: this_process(),
        })
    }

    /// WAL mode, durability and the schema, created or checked.
    fn prepare(conn: &Connection, path: &Path) -> Result<()> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(JournalError(rusqlite::Error::InvalidParameterName(
                format!(
                    "{} has schema version {version}, newer than this healer's {SCHEMA_VERSION}",
                    path.display()
                ),
            )));
        }
        let created = conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ));
        if created.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        Ok(created?)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut conn)?)
    }

    /// The saga `id`.
    pub fn saga(&self, id: &str) -> Result<Option<Saga>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE id = ?1"),
                [id],
                saga_row,
            )
            .optional()
        })
    }

    /// Every saga, oldest first.
    pub fn sagas(&self) -> Result<Vec<Saga>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {SAGA_COLUMNS} FROM sagas ORDER BY created_ms, id"
            ))?;
            st.query_map([], saga_row)?.collect()
        })
    }

    /// Sagas in `states`, oldest first.
    pub fn sagas_in(&self, states: &[&str]) -> Result<Vec<Saga>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {SAGA_COLUMNS} FROM sagas WHERE state IN ({}) ORDER BY created_ms, id",
                in_list(states)
            ))?;
            st.query_map([], saga_row)?.collect()
        })
    }

    /// The steps of `saga`, in order.
    pub fn steps(&self, saga: &str) -> Result<Vec<StepRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, saga, step, status, started_ms, ended_ms, detail FROM steps WHERE saga = ?1 ORDER BY seq",
            )?;
            st.query_map([saga], step_row)?.collect()
        })
    }

    /// Steps not exported to the incident log yet, in order, with their saga.
    pub fn unexported(&self) -> Result<Vec<(StepRow, Saga)>> {
        let rows: Vec<StepRow> = self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, saga, step, status, started_ms, ended_ms, detail FROM steps WHERE exported = 0 AND (ended_ms IS NOT NULL OR status != 'started') ORDER BY seq",
            )?;
            st.query_map([], step_row)?.collect()
        })?;
        let mut sagas: std::collections::HashMap<String, Option<Saga>> = Default::default();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            if !sagas.contains_key(&row.saga) {
                sagas.insert(row.saga.clone(), self.saga(&row.saga)?);
            }
            if let Some(Some(s)) = sagas.get(&row.saga) {
                out.push((row, s.clone()));
            }
        }
        Ok(out)
    }

    /// Marks the steps `seqs` exported.
    pub fn mark_exported(&self, seqs: &[i64]) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            for s in seqs {
                tx.execute("UPDATE steps SET exported = 1 WHERE seq = ?1", [s])?;
            }
            tx.commit()
        })
    }

    /// Records the start of `step`; returns its sequence number.
    pub fn step_start(&self, saga: &str, step: &str, now_ms: i64) -> Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO steps (saga, step, status, started_ms) VALUES (?1, ?2, 'started', ?3)",
                params![saga, step, now_ms],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Records the end of step `seq`.
    pub fn step_end(&self, seq: i64, status: &str, detail: &str, now_ms: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE steps SET status = ?2, detail = ?3, ended_ms = ?4 WHERE seq = ?1",
                params![seq, status, detail, now_ms],
            )?;
            Ok(())
        })
    }

    /// Records a step that started and ended at once.
    pub fn step(
        &self,
        saga: &str,
        step: &str,
        status: &str,
        detail: &str,
        now_ms: i64,
    ) -> Result<()> {
        let seq = self.step_start(saga, step, now_ms)?;
        self.step_end(seq, status, detail, now_ms)
    }

    /// Moves `saga` to `state`.
    pub fn set_state(&self, saga: &str, state: &str, reason: &str, now_ms: i64) -> Result<()> {
        let terminal = !state::IN_FLIGHT.contains(&state)
            && state != state::AWAITING_APPROVAL
            && state != state::APPROVED;
        self.with(|c| {
            c.execute(
                "UPDATE sagas SET state = ?2, reason = ?3, ended_ms = CASE WHEN ?4 THEN ?5 ELSE ended_ms END WHERE id = ?1",
                params![saga, state, reason, terminal, now_ms],
            )?;
            Ok(())
        })
    }

    /// Stores `saga`'s snapshot.
    pub fn set_snapshot(&self, saga: &str, snapshot: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE sagas SET snapshot = ?2 WHERE id = ?1",
                params![saga, snapshot],
            )?;
            Ok(())
        })
    }

    /// The kill switch, if set at `now_ms`.
    pub fn paused(&self, now_ms: i64) -> Result<Option<Pause>> {
        self.with(|c| paused(c, now_ms))
    }

    /// Sets the kill switch.
    pub fn pause(&self, reason: &str, by: &str, now_ms: i64, until_ms: Option<i64>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO pauses (reason, by, since_ms, until_ms) VALUES (?1, ?2, ?3, ?4)",
                params![reason, by, now_ms, until_ms],
            )?;
            Ok(())
        })
    }

    /// Clears the kill switch; whether it was set.
    pub fn resume(&self, by: &str, now_ms: i64) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE pauses SET resumed_ms = ?1, resumed_by = ?2 WHERE resumed_ms IS NULL AND (until_ms IS NULL OR until_ms > ?1)",
                params![now_ms, by],
            )?;
            Ok(n > 0)
        })
    }

    /// Creates `new` and decides whether it may act, in one transaction (see the module docs).
    pub fn admit(
        &self,
        new: &NewSaga,
        config: &RemediationConfig,
        now_ms: i64,
    ) -> Result<(String, Admission)> {
        let id = new.key();
        let owner = self.owner.clone();
        let admission = self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<String> = tx
                .query_row("SELECT state FROM sagas WHERE id = ?1", [&id], |r| r.get(0))
                .optional()?;
            if let Some(state) = existing {
                return Ok(Admission::Exists(state));
            }
            insert_saga(&tx, &id, new, state::PLANNED, "", now_ms)?;
            let a = gate(&tx, &id, new, config, &owner, now_ms, new.dry_run)?;
            tx.commit()?;
            Ok(a)
        })?;
        Ok((id, admission))
    }

    /// Admits an approved saga: the same safety rules as [`Journal::admit`].
    pub fn admit_approved(
        &self,
        saga: &Saga,
        config: &RemediationConfig,
        now_ms: i64,
    ) -> Result<Admission> {
        let owner = self.owner.clone();
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let state: Option<String> = tx
                .query_row("SELECT state FROM sagas WHERE id = ?1", [&saga.id], |r| {
                    r.get(0)
                })
                .optional()?;
            if state.as_deref() != Some(state::APPROVED) {
                return Ok(Admission::Exists(state.unwrap_or_default()));
            }
            // The mode of the request: a dry-run request stays a dry run once approved.
            let dry = saga.dry_run;
            let new = NewSaga {
                incident: saga.incident.clone(),
                action: saga.action.clone(),
                target: saga.target.clone(),
                service: saga.service.clone(),
                context: saga.context.clone(),
                dry_run: dry,
                as_of_ms: saga.as_of_ms,
            };
            tx.execute(
                "UPDATE sagas SET state = ?2, dry_run = ?3 WHERE id = ?1",
                params![saga.id, state::PLANNED, dry],
            )?;
            let a = gate(&tx, &saga.id, &new, config, &owner, now_ms, dry)?;
            tx.commit()?;
            Ok(a)
        })
    }

    /// Records an approval request for `saga` (new, in `awaiting_approval`); returns its id.
    pub fn request_approval(
        &self,
        new: &NewSaga,
        reason: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<(String, Option<String>)> {
        let id = new.key();
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<String> = tx
                .query_row("SELECT state FROM sagas WHERE id = ?1", [&id], |r| r.get(0))
                .optional()?;
            if existing.is_some() {
                return Ok((id.clone(), None));
            }
            insert_saga(&tx, &id, new, state::AWAITING_APPROVAL, reason, now_ms)?;
            let approval = insert_approval(&tx, &id, "action", reason, now_ms, ttl)?;
            tx.commit()?;
            Ok((id.clone(), Some(approval)))
        })
    }

    /// Asks a human to roll back `saga` by hand (a rollback that needs approval).
    pub fn request_rollback(
        &self,
        saga: &str,
        reason: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<String> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = insert_approval(&tx, saga, "rollback", reason, now_ms, ttl)?;
            tx.commit()?;
            Ok(id)
        })
    }

    /// Approval requests, newest first; only pending ones unless `all`.
    pub fn approvals(&self, all: bool) -> Result<Vec<Approval>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT a.id, a.saga, a.kind, s.action, s.target, a.reason, a.requested_ms, a.expires_ms, a.status, a.by, a.decided_ms
                 FROM approvals a JOIN sagas s ON s.id = a.saga
                 WHERE ?1 OR a.status = 'pending' ORDER BY a.requested_ms DESC, a.id",
            )?;
            st.query_map([all], |r| {
                Ok(Approval {
                    id: r.get(0)?,
                    saga: r.get(1)?,
                    kind: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    reason: r.get(5)?,
                    requested_ms: r.get(6)?,
                    expires_ms: r.get(7)?,
                    status: r.get(8)?,
                    by: r.get(9)?,
                    decided_ms: r.get(10)?,
                })
            })?
            .collect()
        })
    }

    /// Answers a pending, unexpired approval request: the request as it now is, or why not.
    pub fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        now_ms: i64,
    ) -> Result<std::result::Result<Approval, String>> {
        let done = self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(String, String, String, i64)> = tx
                .query_row(
                    "SELECT saga, kind, status, expires_ms FROM approvals WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((saga, kind, status, expires)) = row else {
                return Ok(Err(format!("no approval request `{id}`")));
            };
            if status != "pending" {
                return Ok(Err(format!("approval request `{id}` is already {status}")));
            }
            if expires <= now_ms {
                return Ok(Err(format!("approval request `{id}` has expired")));
            }
            let status = if approve { "approved" } else { "denied" };
            tx.execute(
                "UPDATE approvals SET status = ?2, by = ?3, decided_ms = ?4 WHERE id = ?1",
                params![id, status, by, now_ms],
            )?;
            if kind == "action" {
                let (next, ended) = if approve {
                    (state::APPROVED, None)
                } else {
                    (state::DENIED, Some(now_ms))
                };
                tx.execute(
                    "UPDATE sagas SET state = ?2, reason = ?3, ended_ms = ?4 WHERE id = ?1",
                    params![saga, next, format!("{status} by {by}"), ended],
                )?;
            }
            tx.commit()?;
            Ok(Ok(()))
        })?;
        if let Err(e) = done {
            return Ok(Err(e));
        }
        let all = self.approvals(true)?;
        Ok(all
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| format!("no approval request `{id}`")))
    }

    /// Expires pending requests past their time; returns those this call expired (each to
    /// escalate).
    pub fn expire_approvals(&self, now_ms: i64) -> Result<Vec<Approval>> {
        let due: Vec<Approval> = self
            .approvals(false)?
            .into_iter()
            .filter(|a| a.expires_ms <= now_ms)
            .collect();
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut expired = Vec::new();
            for a in due {
                let n = tx.execute(
                    "UPDATE approvals SET status = 'expired', decided_ms = ?2 WHERE id = ?1 AND status = 'pending'",
                    params![a.id, now_ms],
                )?;
                if n == 0 {
                    continue;
                }
                if a.kind == "action" {
                    tx.execute(
                        "UPDATE sagas SET state = ?2, reason = 'approval request expired', ended_ms = ?3 WHERE id = ?1 AND state = ?4",
                        params![a.saga, state::EXPIRED, now_ms, state::AWAITING_APPROVAL],
                    )?;
                }
                expired.push(a);
            }
            tx.commit()?;
            Ok(expired)
        })
    }

    /// Renews `saga`'s lock on `target` if it still holds it with `token`.
    pub fn fence(
        &self,
        saga: &str,
        target: &str,
        token: i64,
        ttl: Duration,
        now_ms: i64,
    ) -> Result<bool> {
        let owner = self.owner.clone();
        self.with(|c| {
            let n = c.execute(
                "UPDATE locks SET expires_ms = ?5, owner = ?4 WHERE target = ?1 AND holder = ?2 AND token = ?3",
                params![target, saga, token, owner, now_ms + ms(ttl)],
            )?;
            Ok(n == 1)
        })
    }

    /// Releases `saga`'s lock on `target` (if it still holds it).
    pub fn release(&self, saga: &str, target: &str, token: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE locks SET holder = '', owner = '', expires_ms = 0 WHERE target = ?1 AND holder = ?2 AND token = ?3",
                params![target, saga, token],
            )?;
            Ok(())
        })
    }

    /// Takes over an in-flight saga whose process is gone, or whose lock expired.
    pub fn claim(&self, saga: &Saga, ttl: Duration, now_ms: i64) -> Result<Claim> {
        let owner = self.owner.clone();
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let lock: Option<(String, String, i64, i64)> = tx
                .query_row(
                    "SELECT holder, owner, token, expires_ms FROM locks WHERE target = ?1",
                    [&saga.target],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((holder, lock_owner, token, expires)) = lock else {
                return Ok(Claim::Lost);
            };
            if holder != saga.id {
                return Ok(Claim::Lost);
            }
            if lock_owner == owner || (expires > now_ms && !owner_dead(&lock_owner)) {
                return Ok(Claim::Busy);
            }
            let token = token + 1;
            tx.execute(
                "UPDATE locks SET owner = ?2, token = ?3, expires_ms = ?4 WHERE target = ?1",
                params![saga.target, owner, token, now_ms + ms(ttl)],
            )?;
            tx.execute(
                "UPDATE sagas SET token = ?2 WHERE id = ?1",
                params![saga.id, token],
            )?;
            tx.commit()?;
            Ok(Claim::Token(token))
        })
    }

    /// Takes `target`'s lock for `saga` if nobody holds it (a manual rollback): its token.
    pub fn lock_free(
        &self,
        saga: &str,
        target: &str,
        ttl: Duration,
        now_ms: i64,
    ) -> Result<Option<i64>> {
        let owner = self.owner.clone();
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let taken = take_free_lock(&tx, target, saga, &owner, now_ms, ttl)?;
            tx.commit()?;
            Ok(taken.ok())
        })
    }

    /// Marks an approved rollback request as being carried out; false when another process
    /// took it first.
    pub fn start_approved(&self, approval: &str) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE approvals SET status = 'running' WHERE id = ?1 AND status = 'approved'",
                [approval],
            )?;
            Ok(n == 1)
        })
    }

    /// Ends `saga` in `state` and records a pending escalation in the same transaction, so a
    /// crash before it is sent leaves it for [`Journal::pending_escalations`].
    pub fn end_escalating(
        &self,
        saga: &str,
        state: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<i64> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE sagas SET state = ?2, reason = ?3, ended_ms = COALESCE(ended_ms, ?4) WHERE id = ?1",
                params![saga, state, reason, now_ms],
            )?;
            tx.execute(
                "INSERT INTO steps (saga, step, status, started_ms, detail) VALUES (?1, 'escalate', 'started', ?2, ?3)",
                params![saga, now_ms, reason],
            )?;
            let seq = tx.last_insert_rowid();
            tx.commit()?;
            Ok(seq)
        })
    }

    /// Escalations recorded and not sent yet, of `saga` (or of every saga, when recorded
    /// before `before_ms`: older ones were left by a process that stopped): (step seq, saga,
    /// reason).
    pub fn pending_escalations(
        &self,
        saga: Option<&str>,
        before_ms: i64,
    ) -> Result<Vec<(i64, String, String)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, saga, detail FROM steps WHERE step = 'escalate' AND status = 'started'
                 AND (saga = ?1 OR (?1 IS NULL AND started_ms < ?2)) ORDER BY seq",
            )?;
            st.query_map(params![saga, before_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect()
        })
    }

    /// Sets an approval request's status (`approved` again, `done`).
    pub fn set_approval_status(&self, id: &str, status: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE approvals SET status = ?2 WHERE id = ?1",
                params![id, status],
            )?;
            Ok(())
        })
    }

    /// Time windows in which healer acted, as (target, start, end or `None` while in
    /// flight), for telling its side effects from new incidents.
    pub fn activity(&self) -> Result<Vec<(String, i64, Option<i64>)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT target, started_ms, ended_ms FROM sagas WHERE dry_run = 0 AND started_ms IS NOT NULL",
            )?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
    }
}

fn paused(c: &Connection, now_ms: i64) -> rusqlite::Result<Option<Pause>> {
    c.query_row(
        "SELECT reason, by, since_ms, until_ms FROM pauses WHERE resumed_ms IS NULL AND since_ms <= ?1 AND (until_ms IS NULL OR until_ms > ?1) ORDER BY seq DESC LIMIT 1",
        [now_ms],
        |r| {
            Ok(Pause {
                reason: r.get(0)?,
                by: r.get(1)?,
                since_ms: r.get(2)?,
                until_ms: r.get(3)?,
            })
        },
    )
    .optional()
}

/// Inserts the saga `id` of `new` in `state`.
fn insert_saga(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    new: &NewSaga,
    state: &str,
    reason: &str,
    now_ms: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO sagas ({SAGA_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, NULL, NULL, NULL, ?10, ?11)"
        ),
        params![
            id,
            new.incident,
            new.action,
            new.target,
            new.service,
            new.dry_run,
            state,
            reason,
            now_ms,
            new.context,
            new.as_of_ms
        ],
    )?;
    Ok(())
}

/// Takes `target`'s lock for `holder` when nobody holds it (or the holder's time is up):
/// the new fencing token, or the current holder.
fn take_free_lock(
    tx: &rusqlite::Transaction<'_>,
    target: &str,
    holder: &str,
    owner: &str,
    now_ms: i64,
    ttl: Duration,
) -> rusqlite::Result<std::result::Result<i64, String>> {
    let lock: Option<(String, i64, i64)> = tx
        .query_row(
            "SELECT holder, token, expires_ms FROM locks WHERE target = ?1",
            [target],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let token = match lock {
        Some((current, _, expires)) if !current.is_empty() && expires > now_ms => {
            return Ok(Err(current));
        }
        Some((_, token, _)) => token + 1,
        None => 1,
    };
    tx.execute(
        "INSERT INTO locks (target, holder, owner, token, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (target) DO UPDATE SET holder = ?2, owner = ?3, token = ?4, expires_ms = ?5",
        params![target, holder, owner, token, now_ms + ms(ttl)],
    )?;
    Ok(Ok(token))
}

fn insert_approval(
    tx: &rusqlite::Transaction<'_>,
    saga: &str,
    kind: &str,
    reason: &str,
    now_ms: i64,
    ttl: Duration,
) -> rusqlite::Result<String> {
    let n: i64 = tx.query_row("SELECT COUNT(*) FROM approvals", [], |r| r.get(0))?;
    let mut h = healer_operators::id::StableHasher::new();
    h.str("approval/v1").str(saga).str(kind).i64(n);
    let id = h.hex()[..8].to_string();
    tx.execute(
        "INSERT INTO approvals (id, saga, kind, reason, requested_ms, expires_ms, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending')",
        params![id, saga, kind, reason, now_ms, now_ms + ms(ttl)],
    )?;
    Ok(id)
}

/// The safety rules, in order, inside the admission transaction; the saga row exists in
/// `planned`. Ends it (`refused`, `escalated`, `dry_run`) or takes the lock.
fn gate(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    new: &NewSaga,
    config: &RemediationConfig,
    owner: &str,
    now_ms: i64,
    dry: bool,
) -> rusqlite::Result<Admission> {
    // Refusals and escalations are final here, with their escalation pending in the same
    // transaction (sent by the caller, or by a later recovery if the process stops first).
    let end = |state: &str, reason: &str| -> rusqlite::Result<()> {
        tx.execute(
            "UPDATE sagas SET state = ?2, reason = ?3, ended_ms = ?4 WHERE id = ?1",
            params![id, state, reason, now_ms],
        )?;
        if state != state::DRY_RUN {
            tx.execute(
                "INSERT INTO steps (saga, step, status, started_ms, detail) VALUES (?1, 'escalate', 'started', ?2, ?3)",
                params![id, now_ms, reason],
            )?;
        }
        Ok(())
    };
    if let Some(p) = paused(tx, now_ms)? {
        let reason = format!("healer is paused by {}: {}", p.by, p.reason);
        end(state::REFUSED, &reason)?;
        return Ok(Admission::Refused(reason));
    }
    if !config.allowed(&new.target) {
        let reason = format!("{} is not on the allow-list", new.target);
        end(state::REFUSED, &reason)?;
        return Ok(Admission::Refused(reason));
    }
    let limits = &config.limits;
    let acted = "dry_run = 0 AND started_ms IS NOT NULL";
    let recurrences: i64 = tx.query_row(
        &format!(
            "SELECT COUNT(*) FROM sagas WHERE {acted} AND target = ?1 AND action = ?2 AND state = 'succeeded' AND started_ms > ?3"
        ),
        params![new.target, new.action, now_ms - ms(limits.recurrence_window())],
        |r| r.get(0),
    )?;
    if limits.recurrence_count > 0 && recurrences >= limits.recurrence_count as i64 {
        let reason = format!(
            "{} on {} already succeeded {recurrences} time(s) in {}: it does not hold, a human should look",
            new.action, new.target, limits.recurrence_window
        );
        end(state::ESCALATED, &reason)?;
        return Ok(Admission::Escalate(reason));
    }
    if dry {
        end(state::DRY_RUN, "dry run: nothing touched")?;
        return Ok(Admission::DryRun);
    }
    let last: Option<i64> = tx.query_row(
        &format!("SELECT MAX(started_ms) FROM sagas WHERE {acted} AND target = ?1 AND action = ?2"),
        params![new.target, new.action],
        |r| r.get(0),
    )?;
    if let Some(last) = last
        && now_ms - last < ms(limits.cooldown())
    {
        let reason = format!(
            "{} on {} is cooling down ({} s of {} left)",
            new.action,
            new.target,
            (ms(limits.cooldown()) - (now_ms - last)) / 1000,
            limits.cooldown
        );
        end(state::REFUSED, &reason)?;
        return Ok(Admission::Refused(reason));
    }
    for b in &limits.budgets {
        let since = now_ms - ms(b.window());
        let (clause, arg) = match b.scope {
            Scope::Target => ("AND target = ?2", new.target.as_str()),
            Scope::Service => ("AND service = ?2", new.service.as_str()),
            Scope::Fleet => ("AND ?2 = ?2", ""),
        };
        let used: i64 = tx.query_row(
            &format!("SELECT COUNT(*) FROM sagas WHERE {acted} AND started_ms > ?1 {clause}"),
            params![since, arg],
            |r| r.get(0),
        )?;
        if used >= b.max as i64 {
            let reason = format!(
                "{} budget spent: {used} action(s) in {} (at most {})",
                b.scope.as_str(),
                b.window,
                b.max
            );
            end(state::REFUSED, &reason)?;
            return Ok(Admission::Refused(reason));
        }
    }
    let in_flight: i64 = tx.query_row(
        &format!(
            "SELECT COUNT(*) FROM sagas WHERE dry_run = 0 AND state IN ({}) AND id != ?1",
            in_list(&state::IN_FLIGHT)
        ),
        [id],
        |r| r.get(0),
    )?;
    if in_flight >= limits.concurrency as i64 {
        let reason = format!(
            "{in_flight} remediation(s) in flight (at most {})",
            limits.concurrency
        );
        end(state::REFUSED, &reason)?;
        return Ok(Admission::Refused(reason));
    }
    let token = match take_free_lock(tx, &new.target, id, owner, now_ms, limits.lock_ttl())? {
        Ok(token) => token,
        Err(holder) => {
            let reason = format!("{} is locked by saga {holder}", new.target);
            end(state::REFUSED, &reason)?;
            return Ok(Admission::Refused(reason));
        }
    };
    tx.execute(
        "UPDATE sagas SET started_ms = ?2, token = ?3 WHERE id = ?1",
        params![id, now_ms, token],
    )?;
    Ok(Admission::Act(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_opening_a_new_journal_at_once_all_succeed() {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("j{round}.db"));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || Journal::open(&path).map(|_| ()))
                })
                .collect();
            for h in handles {
                h.join().unwrap().unwrap();
            }
        }
    }
}
