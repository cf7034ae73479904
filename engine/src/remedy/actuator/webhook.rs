//! The generic webhook backend: any system with an HTTP endpoint for the action.
//!
//! Calls go through [`crate::notify::post_json`]: 5xx, 408, 429 and timeouts are tried
//! again, other 4xx are final, a 5xx is never success, and every attempt carries the saga id
//! as `Idempotency-Key`.

use std::time::Duration;

use serde_json::{Value, json};

use super::{ActError, ActResult, Call, failed, http_ok, unknown_check, unknown_metric};
use crate::notify::{WebhookPolicy, post_json};
use crate::remedy::config::WebhookConfig;

/// A webhook target.
#[derive(Debug)]
pub struct Webhook {
    config: WebhookConfig,
    client: reqwest::Client,
}

impl Webhook {
    /// The backend of `config`.
    pub fn new(config: WebhookConfig) -> Self {
        Self {
            config,
            client: crate::notify::client(),
        }
    }

    fn body(call: &Call<'_>, phase: &str) -> Value {
        json!({
            "phase": phase,
            "action": call.spec.id,
            "operation": call.spec.operation.as_str(),
            "target": call.target,
            "incident": call.incident,
            "saga": call.saga,
        })
    }

    async fn post(&self, url: &str, call: &Call<'_>, phase: &str) -> ActResult<String> {
        let policy = WebhookPolicy {
            timeout: call.spec.timeout().min(Duration::from_secs(30)),
            ..WebhookPolicy::default()
        };
        let key = format!("{}-{phase}", call.saga);
        post_json(&self.client, url, &Self::body(call, phase), &key, &policy)
            .await
            .map(|d| format!("{url}: HTTP {} after {} call(s)", d.status, d.attempts))
            .map_err(failed)
    }

    pub(super) async fn check(&self, name: &str) -> ActResult<bool> {
        match name {
            "reachable" | "healthy" => match &self.config.health_url {
                Some(u) => Ok(http_ok(u, Duration::from_secs(5)).await.is_ok()),
                None => Ok(true),
            },
            other => Err(unknown_check("webhook", other)),
        }
    }

    pub(super) async fn probe(&self, metric: &str) -> ActResult<f64> {
        Err(unknown_metric("webhook", metric))
    }

    pub(super) async fn snapshot(&self, _call: &Call<'_>) -> ActResult<Value> {
        Ok(json!({}))
    }

    pub(super) async fn execute(&self, call: &Call<'_>, _snap: &Value) -> ActResult<String> {
        self.post(&self.config.url, call, "execute").await
    }

    pub(super) async fn verify(&self, _call: &Call<'_>, _snap: &Value) -> ActResult<String> {
        match &self.config.health_url {
            Some(u) => http_ok(u, Duration::from_secs(5))
                .await
                .map(|_| format!("{u} healthy"))
                .map_err(ActError::Failed),
            None => Ok("delivered (no health_url to check)".into()),
        }
    }

    pub(super) async fn rollback(&self, call: &Call<'_>, _snap: &Value) -> ActResult<String> {
        match &self.config.rollback_url {
            Some(u) => self.post(u, call, "rollback").await,
            None => Ok("nothing to undo (no rollback_url)".into()),
        }
    }
}
