//! The Redis backend: `clear_cache` flushes the cache and checks that its memory dropped.
//!
//! A flushed cache cannot be put back; it refills from its source of truth, so the rollback
//! records that and does nothing. The snapshot keeps the memory and key count before the
//! flush, for the verify step and the incident log.

use std::time::Duration;

use serde_json::{Value, json};

use super::{ActError, ActResult, Call, failed, unknown_check, unknown_metric};
use crate::remedy::config::RedisConfig;

/// A Redis cache.
#[derive(Debug)]
pub struct RedisCache {
    config: RedisConfig,
    client: redis::Client,
}

/// Memory and keys of a Redis server.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Usage {
    used_memory: u64,
    maxmemory: u64,
    keys: u64,
}

impl RedisCache {
    /// The backend of `config`.
    pub fn new(config: RedisConfig) -> ActResult<Self> {
        let client = redis::Client::open(config.url.as_str()).map_err(failed)?;
        Ok(Self { config, client })
    }

    async fn conn(&self) -> ActResult<redis::aio::MultiplexedConnection> {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| failed(format!("{}: no connection in 5 s", self.config.url)))?
        .map_err(failed)
    }

    async fn usage(&self) -> ActResult<Usage> {
        let mut c = self.conn().await?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut c)
            .await
            .map_err(failed)?;
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let keys: u64 = redis::cmd("DBSIZE")
            .query_async(&mut c)
            .await
            .map_err(failed)?;
        Ok(Usage {
            used_memory: field("used_memory"),
            maxmemory: field("maxmemory"),
            keys,
        })
    }

    pub(super) async fn check(&self, name: &str) -> ActResult<bool> {
        match name {
            "reachable" | "healthy" => {
                let Ok(mut c) = self.conn().await else {
                    return Ok(false);
                };
                let pong: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
                Ok(pong.is_ok_and(|p| p == "PONG"))
            }
            other => Err(unknown_check("redis", other)),
        }
    }

    pub(super) async fn probe(&self, metric: &str) -> ActResult<f64> {
        let u = self.usage().await?;
        match metric {
            "used_memory_bytes" => Ok(u.used_memory as f64),
            "keys" => Ok(u.keys as f64),
            "memory_percent" if u.maxmemory > 0 => {
                Ok(100.0 * u.used_memory as f64 / u.maxmemory as f64)
            }
            "memory_percent" => Err(failed("maxmemory is not set")),
            other => Err(unknown_metric("redis", other)),
        }
    }

    pub(super) async fn snapshot(&self, _call: &Call<'_>) -> ActResult<Value> {
        let u = self.usage().await?;
        Ok(json!({ "used_memory": u.used_memory, "keys": u.keys }))
    }

    pub(super) async fn execute(&self, _call: &Call<'_>, _snap: &Value) -> ActResult<String> {
        let mut c = self.conn().await?;
        let command = if self.config.flush_all {
            "FLUSHALL"
        } else {
            "FLUSHDB"
        };
        let _: String = redis::cmd(command)
            .query_async(&mut c)
            .await
            .map_err(failed)?;
        Ok(command.to_string())
    }

    pub(super) async fn verify(&self, _call: &Call<'_>, snap: &Value) -> ActResult<String> {
        let before = snap["used_memory"].as_u64().unwrap_or(0);
        let keys_before = snap["keys"].as_u64().unwrap_or(0);
        let now = self.usage().await?;
        if keys_before > 0 && now.used_memory >= before {
            return Err(ActError::Failed(format!(
                "memory did not drop: {before} -> {} bytes",
                now.used_memory
            )));
        }
        Ok(format!(
            "memory {before} -> {} bytes, keys {keys_before} -> {}",
            now.used_memory, now.keys
        ))
    }

    pub(super) async fn rollback(&self, _call: &Call<'_>, _snap: &Value) -> ActResult<String> {
        Ok("a flushed cache refills from its source: nothing to restore".into())
    }
}
