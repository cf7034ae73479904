//! The EC2 Auto Scaling backend: `scale_up` adds instances to a group.
//!
//! The new desired capacity is the snapshot's plus `step` (2), capped by the smaller of the
//! group's MaxSize and healer's own `max_instances`: healer enforces its ceiling itself
//! rather than trust the API to refuse (moto, for one, accepts any desired capacity). A
//! group already at the ceiling is not touched: the saga escalates. Execute waits until as
//! many instances as desired are InService and Healthy; verify checks that again; rollback
//! sets the snapshot's desired capacity back.

use std::time::Duration;

use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::types::{AutoScalingGroup, LifecycleState};
use serde_json::{Value, json};

use super::{ActError, ActResult, Call, failed, unknown_check, unknown_metric};
use crate::remedy::config::AutoScalingConfig;

/// An Auto Scaling group.
#[derive(Debug)]
pub struct AutoScaling {
    config: AutoScalingConfig,
    client: Client,
}

impl AutoScaling {
    /// The backend of `config` (credentials and region from the usual AWS settings).
    pub async fn new(config: AutoScalingConfig) -> Self {
        let keys = match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => Some((id.as_str(), secret.as_str())),
            _ => None,
        };
        let sdk = crate::kinesis::aws_settings(
            Some(&config.region),
            config.endpoint.as_deref(),
            keys,
            aws_config::retry::RetryConfig::standard(),
            Duration::from_secs(10),
        )
        .await;
        let client = Client::new(&sdk);
        Self { config, client }
    }

    async fn group(&self) -> ActResult<AutoScalingGroup> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.config.group)
            .send()
            .await
            .map_err(|e| {
                failed(format!(
                    "DescribeAutoScalingGroups {}: {e:?}",
                    self.config.group
                ))
            })?;
        out.auto_scaling_groups()
            .first()
            .cloned()
            .ok_or_else(|| failed(format!("no Auto Scaling group `{}`", self.config.group)))
    }

    fn healthy(g: &AutoScalingGroup) -> i32 {
        g.instances()
            .iter()
            .filter(|i| {
                i.lifecycle_state() == Some(&LifecycleState::InService)
                    && i.health_status()
                        .is_some_and(|h| h.eq_ignore_ascii_case("healthy"))
            })
            .count() as i32
    }

    async fn set_desired(&self, n: i32) -> ActResult<()> {
        self.client
            .set_desired_capacity()
            .auto_scaling_group_name(&self.config.group)
            .desired_capacity(n)
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|e| failed(format!("SetDesiredCapacity {n}: {e:?}")))?;
        Ok(())
    }

    /// Waits until `n` instances are healthy, for at most `healthy_wait`.
    async fn wait_healthy(&self, n: i32, within: Duration) -> ActResult<i32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let healthy = Self::healthy(&self.group().await?);
            if healthy >= n {
                return Ok(healthy);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(failed(format!(
                    "{healthy} of {n} instances healthy after {within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub(super) async fn check(&self, name: &str) -> ActResult<bool> {
        match name {
            "reachable" => Ok(self.group().await.is_ok()),
            "healthy" => {
                let g = self.group().await?;
                Ok(Self::healthy(&g) >= g.desired_capacity().unwrap_or(0))
            }
            other => Err(unknown_check("autoscaling", other)),
        }
    }

    pub(super) async fn probe(&self, metric: &str) -> ActResult<f64> {
        let g = self.group().await?;
        match metric {
            "desired_capacity" => Ok(g.desired_capacity().unwrap_or(0) as f64),
            "healthy_instances" => Ok(Self::healthy(&g) as f64),
            "max_size" => Ok(g.max_size().unwrap_or(0) as f64),
            other => Err(unknown_metric("autoscaling", other)),
        }
    }

    pub(super) async fn snapshot(&self, _call: &Call<'_>) -> ActResult<Value> {
        let g = self.group().await?;
        Ok(json!({
            "desired": g.desired_capacity().unwrap_or(0),
            "min": g.min_size().unwrap_or(0),
            "max": g.max_size().unwrap_or(0),
            "healthy": Self::healthy(&g),
        }))
    }

    fn want(&self, call: &Call<'_>, snap: &Value) -> ActResult<(i32, i32)> {
        let desired = snap["desired"].as_i64().unwrap_or(0) as i32;
        let group_max = snap["max"].as_i64().unwrap_or(i64::from(i32::MAX)) as i32;
        let ceiling = self.config.max_instances.min(group_max);
        if desired >= ceiling {
            return Err(ActError::Ceiling(format!(
                "{} has {desired} instances desired, at the ceiling {ceiling} (max_instances {}, MaxSize {group_max})",
                self.config.group, self.config.max_instances
            )));
        }
        let step = call.spec.param("step", 2.0).max(1.0) as i32;
        Ok((desired, (desired + step).min(ceiling)))
    }

    pub(super) async fn execute(&self, call: &Call<'_>, snap: &Value) -> ActResult<String> {
        let (from, to) = self.want(call, snap)?;
        self.set_desired(to).await?;
        let wait = humantime::parse_duration(&self.config.healthy_wait)
            .unwrap_or(Duration::from_secs(300))
            .min(call.spec.timeout());
        let healthy = self.wait_healthy(to, wait).await?;
        Ok(format!(
            "{}: desired {from} -> {to}, {healthy} healthy",
            self.config.group
        ))
    }

    pub(super) async fn verify(&self, call: &Call<'_>, snap: &Value) -> ActResult<String> {
        let (_, to) = self.want(call, snap)?;
        let g = self.group().await?;
        let desired = g.desired_capacity().unwrap_or(0);
        let healthy = Self::healthy(&g);
        if desired != to || healthy < desired {
            return Err(failed(format!(
                "desired {desired} (expected {to}), {healthy} healthy"
            )));
        }
        Ok(format!("{healthy} healthy >= {desired} desired"))
    }

    pub(super) async fn rollback(&self, _call: &Call<'_>, snap: &Value) -> ActResult<String> {
        let desired = snap["desired"]
            .as_i64()
            .ok_or_else(|| failed("the snapshot has no desired capacity"))?
            as i32;
        self.set_desired(desired).await?;
        let g = self.group().await?;
        Ok(format!(
            "{}: desired back to {}",
            self.config.group,
            g.desired_capacity().unwrap_or(0)
        ))
    }
}
