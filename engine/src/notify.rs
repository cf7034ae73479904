//! Webhooks: a generic HTTP call with status-aware retries (the webhook actuator), and
//! escalation notifications in PagerDuty Events API v2 and Slack incoming-webhook formats.
//!
//! # Retries
//! A 2xx answer is success. 5xx, 408, 429 and transport failures (no connection, a timeout,
//! a dropped answer) are tried again with jittered exponential back-off, up to `attempts`
//! calls. A `Retry-After` (seconds or an HTTP date) lengthens the wait; one beyond
//! `max_backoff` ends the attempts at once, reporting how long the receiver asked to wait,
//! rather than calling again before it allowed. Any other status (4xx, and
//! 3xx: redirects are not followed) is final: the receiver refused the request and sending it
//! again would not change that. A 5xx is never success, however many times it comes back.
//! Every attempt carries the same `Idempotency-Key` (and a PagerDuty event the same
//! `dedup_key`), so a retried call that did land is not acted on twice by a receiver that
//! honours it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::diagnose::Diagnosed;

/// How a webhook is called.
#[derive(Debug, Clone, Copy)]
pub struct WebhookPolicy {
    /// Calls at most (the first included).
    pub attempts: u32,
    /// Timeout of one call.
    pub timeout: Duration,
    /// First back-off.
    pub backoff: Duration,
    /// Longest back-off (and longest `Retry-After` honoured).
    pub max_backoff: Duration,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            timeout: Duration::from_secs(10),
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// A call that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The 2xx status.
    pub status: u16,
    /// Calls made.
    pub attempts: u32,
}

/// A call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The receiver refused it (a final status): not retried.
    #[error("{url}: refused with HTTP {status} after {attempts} call(s): {body}")]
    Refused {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The start of the answer's body.
        body: String,
        /// Calls made.
        attempts: u32,
    },
    /// Every attempt failed with a retryable status or a transport error.
    #[error("{url}: no success after {attempts} call(s); last: {last}")]
    Exhausted {
        /// The URL.
        url: String,
        /// The last failure.
        last: String,
        /// Calls made.
        attempts: u32,
    },
}

/// An HTTP client for webhooks: no redirects followed, one timeout per call.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client without custom TLS settings builds")
}

/// POSTs `body` as JSON to `url` under `policy` (see the [module docs](self)).
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    idempotency_key: &str,
    policy: &WebhookPolicy,
) -> Result<Delivery, WebhookError> {
    let bytes = serde_json::to_vec(body).expect("JSON values serialise");
    let attempts = policy.attempts.max(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let sent = client
            .post(url)
            .header("content-type", "application/json")
            .header("idempotency-key", idempotency_key)
            .timeout(policy.timeout)
            .body(bytes.clone())
            .send()
            .await;
        let mut wait = crate::kinesis::backoff(attempt - 1, policy.backoff, policy.max_backoff);
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                if response.status().is_success() {
                    return Ok(Delivery {
                        status,
                        attempts: attempt,
                    });
                }
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(retry_after);
                let text = response.text().await.unwrap_or_default();
                let text: String = text.chars().take(300).collect();
                if !(status >= 500 || status == 408 || status == 429) {
                    return Err(WebhookError::Refused {
                        url: url.to_string(),
                        status,
                        body: text,
                        attempts: attempt,
                    });
                }
                last = format!("HTTP {status}: {text}");
                if let Some(r) = retry_after {
                    if r > policy.max_backoff {
                        return Err(WebhookError::Exhausted {
                            url: url.to_string(),
                            last: format!("{last} (asked to retry after {} s)", r.as_secs()),
                            attempts: attempt,
                        });
                    }
                    wait = wait.max(r);
                }
            }
            Err(e) => {
                last = if e.is_timeout() {
                    format!("timed out after {:?}", policy.timeout)
                } else {
                    format!("{e}")
                };
            }
        }
        if attempt < attempts {
            tracing::debug!(url, attempt, error = %last, "webhook call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }
    Err(WebhookError::Exhausted {
        url: url.to_string(),
        last,
        attempts,
    })
}

/// A `Retry-After` value: delay seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(s) = value.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let ms = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// Slack's limit on a section's text, with room for the "… and N more" line.
const SLACK_SECTION: usize = 2900;

/// Text for Slack mrkdwn: `&`, `<` and `>` escaped (Slack reads `<…>` as mentions and
/// links), backticks and line breaks replaced so a code span cannot be closed early.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('`', "'")
        .replace(['\n', '\r'], " ")
}

/// Items as code spans, one per line, cut to fit a Slack section.
fn slack_list(items: &[String]) -> String {
    if items.is_empty() {
        return "none".to_string();
    }
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let mut item = slack_escape(item);
        if item.chars().count() > 500 {
            item = item.chars().take(500).collect::<String>() + "…";
        }
        let line = format!("• `{item}`\n");
        if out.len() + line.len() > SLACK_SECTION {
            out.push_str(&format!("… and {} more", items.len() - i));
            return out;
        }
        out.push_str(&line);
    }
    out.trim_end().to_string()
}

/// What an escalation tells a human.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Escalation {
    /// The incident id (also the PagerDuty `dedup_key`).
    pub id: String,
    /// One line.
    pub summary: String,
    /// The resource the incident is about (the root cause, or the first affected).
    pub resource: String,
    /// The ranked root cause and its confidence, if one was found.
    pub root_cause: Option<(String, f64)>,
    /// Why healer believes it: anomalies and edges, in words.
    pub evidence: Vec<String>,
    /// Why it escalates: the decision rules that fired.
    pub reasons: Vec<String>,
    /// What was tried already (remediation steps, consults).
    pub tried: Vec<String>,
    /// Affected resources.
    pub affected: Vec<String>,
    /// When the incident started (ms since the epoch).
    pub start_ms: i64,
}

impl Escalation {
    /// The escalation of a diagnosed incident.
    pub fn of(d: &Diagnosed) -> Self {
        let cause = d.incident.root_cause();
        let root_cause = cause.map(|c| (c.resource.clone(), c.confidence));
        let resource = root_cause
            .as_ref()
            .map(|(r, _)| r.clone())
            .or_else(|| d.incident.resources.first().cloned())
            .unwrap_or_else(|| "unknown".into());
        let summary = match &root_cause {
            Some((r, c)) => format!(
                "healer: incident on {} resource(s), probable root cause {r} ({:.0}% confidence)",
                d.incident.resources.len(),
                c * 100.0
            ),
            None => format!(
                "healer: incident on {} resource(s), root cause undetermined",
                d.incident.resources.len()
            ),
        };
        let mut evidence = Vec::new();
        if let Some(c) = cause {
            let e = &c.evidence;
            evidence.push(format!(
                "impact {:.2} (share of affected resources it is or reaches), precedence {:.2}, \
                 strength {:.2}, itself anomalous: {}",
                e.impact, e.precedence, e.strength, e.anomalous
            ));
            for path in &e.paths {
                evidence.push(format!("path: {}", path.join(" -> ")));
            }
        }
        for a in d.incident.anomalies.iter().take(10) {
            let at = chrono::DateTime::from_timestamp_millis(a.ts_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            evidence.push(format!(
                "anomaly: {} {} at {at} (confidence {:.2}, {:?})",
                a.resource, a.metric, a.confidence, a.severity
            ));
        }
        let tried = match &d.decision.consult {
            Some(Ok(v)) => vec![format!(
                "LLM consult: proceed={} confidence={:.2}: {}",
                v.should_proceed, v.confidence, v.reasoning
            )],
            Some(Err(e)) => vec![format!("LLM consult failed: {e}")],
            None => Vec::new(),
        };
        Self {
            id: d.id.clone(),
            summary,
            resource,
            root_cause,
            evidence,
            reasons: d.decision.reasons.clone(),
            tried,
            affected: d.incident.resources.clone(),
            start_ms: d.incident.start_ms,
        }
    }

    fn timestamp(&self) -> String {
        chrono::DateTime::from_timestamp_millis(self.start_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// A PagerDuty Events API v2 `trigger` event for `routing_key`.
    pub fn pagerduty_event(&self, routing_key: &str) -> Value {
        // PagerDuty truncates summaries at 1024 characters; cut at a character boundary.
        let summary: String = self.summary.chars().take(1024).collect();
        // The whole event may be 512 KB: long lists are cut.
        let cut = |items: &[String]| -> Vec<String> {
            items
                .iter()
                .take(50)
                .map(|i| i.chars().take(2000).collect())
                .collect()
        };
        json!({
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": self.id,
            "payload": {
                "summary": summary,
                "source": self.resource,
                "severity": if self.root_cause.is_some() { "error" } else { "critical" },
                "timestamp": self.timestamp(),
                "component": self.resource,
                "class": "healer.escalation",
                "custom_details": {
                    "incident": self.id,
                    "root_cause": self.root_cause.as_ref().map(|(r, _)| r),
                    "confidence": self.root_cause.as_ref().map(|(_, c)| c),
                    "affected": cut(&self.affected),
                    "evidence": cut(&self.evidence),
                    "why_escalated": cut(&self.reasons),
                    "tried": cut(&self.tried),
                },
            },
        })
    }

    /// A Slack incoming-webhook message (`text` for notifications, blocks for the body).
    /// Text from monitored systems is escaped and shown in code spans, never as markup or
    /// mentions, and each section is cut to Slack's limit.
    pub fn slack_message(&self) -> Value {
        let list = slack_list;
        let cause = match &self.root_cause {
            Some((r, c)) => format!("`{}` ({:.0}% confidence)", slack_escape(r), c * 100.0),
            None => "undetermined".to_string(),
        };
        json!({
            "text": slack_escape(&self.summary),
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "healer escalation"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": format!(
                    "*Incident* `{}` since {}\n*Root cause* {cause}\n*Affected* {}",
                    slack_escape(&self.id), self.timestamp(), self.affected.len())}},
                {"type": "section", "text": {"type": "mrkdwn", "text": format!(
                    "*Why escalated*\n{}", list(&self.reasons))}},
                {"type": "section", "text": {"type": "mrkdwn", "text": format!(
                    "*Evidence*\n{}", list(&self.evidence))}},
                {"type": "section", "text": {"type": "mrkdwn", "text": format!(
                    "*Tried*\n{}", list(&self.tried))}},
            ],
        })
    }
}

/// PagerDuty's Events API v2 endpoint.
pub const PAGERDUTY_EVENTS: &str = "https://events.pagerduty.com/v2/enqueue";

/// Where escalations go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// PagerDuty Events API v2 ([`PAGERDUTY_EVENTS`] unless another URL is given).
    PagerDuty {
        /// The enqueue URL.
        url: String,
        /// The integration's routing key.
        routing_key: String,
    },
    /// A Slack incoming webhook.
    Slack {
        /// The webhook URL.
        url: String,
    },
}

/// The escalation targets of a PagerDuty routing key (with its endpoint, PagerDuty's by
/// default) and a Slack incoming webhook, each when given.
pub fn targets(
    pagerduty_routing_key: Option<&str>,
    pagerduty_url: Option<&str>,
    slack_webhook: Option<&str>,
) -> Vec<Target> {
    let mut targets = Vec::new();
    if let Some(key) = pagerduty_routing_key {
        targets.push(Target::PagerDuty {
            url: pagerduty_url.unwrap_or(PAGERDUTY_EVENTS).to_string(),
            routing_key: key.to_string(),
        });
    }
    if let Some(url) = slack_webhook {
        targets.push(Target::Slack {
            url: url.to_string(),
        });
    }
    targets
}

/// Sends `escalation` to every target; one result per target, in order.
pub async fn escalate(
    client: &reqwest::Client,
    targets: &[Target],
    escalation: &Escalation,
    policy: &WebhookPolicy,
) -> Vec<Result<Delivery, WebhookError>> {
    let mut results = Vec::with_capacity(targets.len());
    for t in targets {
        let (url, body) = match t {
            Target::PagerDuty { url, routing_key } => {
                (url, escalation.pagerduty_event(routing_key))
            }
            Target::Slack { url } => (url, escalation.slack_message()),
        };
        let key = format!(
            "{}-{}",
            escalation.id,
            matches!(t, Target::Slack { .. }) as u8
        );
        results.push(post_json(client, url, &body, &key, policy).await);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        let d = retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(110) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn slack_text_cannot_mention_link_or_break_out() {
        let e = slack_escape("<!channel> & <https://evil|runbook>\n*bold* `x`");
        assert_eq!(
            e,
            "&lt;!channel&gt; &amp; &lt;https://evil|runbook&gt; *bold* 'x'"
        );
        let many: Vec<String> = (0..500).map(|i| format!("path {i}: a -> b -> c")).collect();
        let list = slack_list(&many);
        assert!(list.len() <= SLACK_SECTION + 20, "{}", list.len());
        assert!(list.ends_with("more"), "{list}");
    }
}
