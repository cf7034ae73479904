//! The PostgreSQL backend: `failover_database` promotes a streaming replica.
//!
//! The seed's steps, each safe to run again:
//! 1. set the primary read-only (`default_transaction_read_only`, reloaded) and end its
//!    client sessions, so nothing writes to it any more;
//! 2. wait until the replica has replayed the primary's last WAL position, at most
//!    `max_lag_seconds` (the precondition already checked the lag is below it);
//! 3. promote the replica (`pg_promote`);
//! 4. repoint the endpoint: the file clients read the primary's connection string from,
//!    replaced atomically.
//!
//! Verify connects through the endpoint and writes. Rolling back a failover is manual by
//! design: the library's action asks for approval, and the approved rollback only undoes a
//! failover whose replica was not promoted yet (making the old primary writable again and
//! restoring the endpoint); after a promotion the old primary must be rebuilt as a replica
//! by hand, and healer says so.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

use super::{ActError, ActResult, Call, failed, unknown_check, unknown_metric};
use crate::remedy::config::PostgresConfig;

/// A primary and its streaming replica.
#[derive(Debug)]
pub struct Postgres {
    config: PostgresConfig,
}

async fn connect(conn: &str) -> ActResult<Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&format!("{conn} connect_timeout=5"), NoTls),
    )
    .await
    .map_err(|_| failed("no connection in 5 s"))?
    .map_err(pg_failed)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A PostgreSQL error with the server's message (the driver's own text is only "db error").
fn pg_failed(e: tokio_postgres::Error) -> ActError {
    match e.as_db_error() {
        Some(db) => ActError::Failed(format!("{}: {}", db.code().code(), db.message())),
        None => ActError::Failed(e.to_string()),
    }
}

/// Writes `text` to `path` atomically.
fn replace(path: &Path, text: &str) -> ActResult<()> {
    let tmp = path.with_extension("healer-tmp");
    std::fs::write(&tmp, text).map_err(failed)?;
    std::fs::rename(&tmp, path).map_err(failed)
}

fn is_lsn(s: &str) -> bool {
    s.split_once('/').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
    })
}

impl Postgres {
    /// The backend of `config`.
    pub fn new(config: PostgresConfig) -> Self {
        Self { config }
    }

    async fn in_recovery(c: &Client) -> ActResult<bool> {
        c.query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map(|r| r.get(0))
            .map_err(pg_failed)
    }

    /// Whether the replica is still a replica (not promoted).
    pub(super) async fn replica_in_recovery(&self) -> ActResult<bool> {
        Self::in_recovery(&connect(&self.config.replica).await?).await
    }

    async fn lag_seconds(&self) -> ActResult<f64> {
        let r = connect(&self.config.replica).await?;
        let row = r
            .query_one(
                "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0
                             WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
                             ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)
                        END::float8",
                &[],
            )
            .await
            .map_err(pg_failed)?;
        Ok(row.get(0))
    }

    pub(super) async fn check(&self, name: &str) -> ActResult<bool> {
        match name {
            "reachable" => Ok(connect(&self.config.replica).await.is_ok()),
            "replica_streaming" => {
                let Ok(r) = connect(&self.config.replica).await else {
                    return Ok(false);
                };
                let status: Option<String> = r
                    .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
                    .await
                    .map_err(pg_failed)?
                    .map(|row| row.get(0));
                Ok(Self::in_recovery(&r).await? && status.as_deref() == Some("streaming"))
            }
            "primary_writable" => {
                let Ok(p) = connect(&self.config.primary).await else {
                    return Ok(false);
                };
                let ro: String = p
                    .query_one("SHOW default_transaction_read_only", &[])
                    .await
                    .map_err(pg_failed)?
                    .get(0);
                Ok(ro == "off" && !Self::in_recovery(&p).await?)
            }
            other => Err(unknown_check("postgres", other)),
        }
    }

    pub(super) async fn probe(&self, metric: &str) -> ActResult<f64> {
        match metric {
            "replica_lag_seconds" => self.lag_seconds().await,
            other => Err(unknown_metric("postgres", other)),
        }
    }

    pub(super) async fn snapshot(&self, _call: &Call<'_>) -> ActResult<Value> {
        let endpoint = std::fs::read_to_string(&self.config.endpoint_file).ok();
        Ok(json!({ "endpoint": endpoint }))
    }

    pub(super) async fn execute(&self, _call: &Call<'_>, _snap: &Value) -> ActResult<String> {
        let mut done = Vec::new();
        let replica = connect(&self.config.replica).await?;
        if Self::in_recovery(&replica).await? {
            // 1. The primary stops taking writes.
            let primary = connect(&self.config.primary).await.map_err(|e| {
                failed(format!(
                    "primary unreachable ({e}): cannot make it read-only first"
                ))
            })?;
            // ALTER SYSTEM cannot run in a transaction: one statement a call.
            for sql in [
                "ALTER SYSTEM SET default_transaction_read_only = on",
                "SELECT pg_reload_conf()",
            ] {
                primary.batch_execute(sql).await.map_err(pg_failed)?;
            }
            let ended: i64 = primary
                .query_one(
                    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
                     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(pg_failed)?
                .get(0);
            done.push(format!("primary read-only, {ended} session(s) ended"));
            // 2. The replica catches up with the primary's last position.
            let lsn: String = primary
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(pg_failed)?
                .get(0);
            if !is_lsn(&lsn) {
                return Err(failed(format!("unexpected WAL position `{lsn}`")));
            }
            let deadline = tokio::time::Instant::now()
                + Duration::from_secs_f64(self.config.max_lag_seconds.max(0.1));
            loop {
                let behind: f64 = replica
                    .query_one(
                        &format!(
                            "SELECT pg_wal_lsn_diff('{lsn}', pg_last_wal_replay_lsn())::float8"
                        ),
                        &[],
                    )
                    .await
                    .map_err(pg_failed)?
                    .get(0);
                if behind <= 0.0 {
                    done.push(format!("replica replayed {lsn}"));
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(failed(format!(
                        "replica still {behind} bytes behind {lsn} after {} s",
                        self.config.max_lag_seconds
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // 3. Promote.
            let promoted: bool = replica
                .query_one("SELECT pg_promote(true, 60)", &[])
                .await
                .map_err(pg_failed)?
                .get(0);
            if !promoted {
                return Err(failed("pg_promote did not finish in 60 s"));
            }
            done.push("replica promoted".into());
        } else {
            done.push("replica already promoted".into());
        }
        // 4. Repoint.
        replace(&self.config.endpoint_file, &self.config.replica)?;
        done.push(format!("endpoint -> {}", self.config.replica));
        Ok(done.join(", "))
    }

    pub(super) async fn verify(&self, _call: &Call<'_>, _snap: &Value) -> ActResult<String> {
        let endpoint = std::fs::read_to_string(&self.config.endpoint_file).map_err(failed)?;
        if endpoint.trim() != self.config.replica.trim() {
            return Err(failed("the endpoint does not name the replica yet"));
        }
        let c = connect(endpoint.trim()).await?;
        if Self::in_recovery(&c).await? {
            return Err(failed("the endpoint's server is still a replica"));
        }
        c.batch_execute(
            "CREATE TEMP TABLE healer_verify (x int); INSERT INTO healer_verify VALUES (1); DROP TABLE healer_verify;",
        )
        .await
        .map_err(|e| ActError::Failed(format!("the endpoint's server refuses writes: {e}")))?;
        Ok("endpoint's server is a primary and takes writes".into())
    }

    pub(super) async fn rollback(&self, _call: &Call<'_>, snap: &Value) -> ActResult<String> {
        let replica = connect(&self.config.replica).await?;
        if !Self::in_recovery(&replica).await? {
            return Err(failed(
                "the replica was promoted: rebuild the old primary as a replica of it (pg_rewind or a new base backup) by hand",
            ));
        }
        let primary = connect(&self.config.primary).await?;
        for sql in [
            "ALTER SYSTEM RESET default_transaction_read_only",
            "SELECT pg_reload_conf()",
        ] {
            primary.batch_execute(sql).await.map_err(pg_failed)?;
        }
        if let Some(e) = snap["endpoint"].as_str() {
            replace(&self.config.endpoint_file, e)?;
        }
        Ok("primary writable again, endpoint restored".into())
    }
}
