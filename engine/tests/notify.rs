//! Webhook calls and escalation notifications against a real HTTP receiver on 127.0.0.1
//! that answers with scripted statuses, delays and `Retry-After` headers.

use std::time::{Duration, Instant};

use healer_engine::diagnose::Diagnosed;
use healer_engine::notify::{
    Delivery, Escalation, Target, WebhookError, WebhookPolicy, client, escalate, post_json,
};
use healer_operators::decision::{Decision, Outcome};
use healer_operators::rca::{Evidence, Incident, Observation, RootCause};
use healer_operators::severity::Severity;
use serde_json::json;

#[path = "support/receiver.rs"]
mod receiver;
use receiver::{Receiver, Reply};

fn policy(attempts: u32) -> WebhookPolicy {
    WebhookPolicy {
        attempts,
        timeout: Duration::from_millis(500),
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn server_errors_are_retried_until_success_with_one_idempotency_key() {
    let r = Receiver::start(&[Reply::Status(503), Reply::Status(500), Reply::Status(202)]).await;
    let body = json!({"action": "restart_service", "target": "api-1"});
    let got = post_json(
        &client(),
        &format!("{}/hook", r.url),
        &body,
        "inc-1-restart",
        &policy(5),
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        Delivery {
            status: 202,
            attempts: 3
        }
    );
    let seen = r.received();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.path, "/hook");
        assert_eq!(s.idempotency_key, "inc-1-restart");
        assert_eq!(s.body, body);
    }
}

#[tokio::test]
async fn client_errors_and_redirects_are_final() {
    for status in [400, 404, 302] {
        let r = Receiver::start(&[Reply::Status(status)]).await;
        let err = post_json(&client(), &r.url, &json!({}), "k", &policy(5))
            .await
            .unwrap_err();
        match err {
            WebhookError::Refused {
                status: s,
                attempts,
                ..
            } => {
                assert_eq!((s, attempts), (status, 1));
            }
            other => panic!("{status}: {other}"),
        }
        assert_eq!(r.received().len(), 1, "{status} is not retried");
    }
}

#[tokio::test]
async fn server_errors_are_never_success() {
    let r = Receiver::start(&[Reply::Status(502); 10]).await;
    let err = post_json(&client(), &r.url, &json!({}), "k", &policy(3))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WebhookError::Exhausted { attempts: 3, last, .. } if last.contains("502")),
        "{err}"
    );
    assert_eq!(r.received().len(), 3);
}

#[tokio::test]
async fn timeouts_are_retried_and_retry_after_is_honoured() {
    let r = Receiver::start(&[Reply::Hang(Duration::from_secs(3)), Reply::Status(200)]).await;
    let got = post_json(&client(), &r.url, &json!({}), "k", &policy(3))
        .await
        .unwrap();
    assert_eq!(got.attempts, 2, "a timed-out call is tried again");

    let r = Receiver::start(&[Reply::RetryAfter(429, 1), Reply::Status(200)]).await;
    let started = Instant::now();
    let got = post_json(&client(), &r.url, &json!({}), "k", &policy(3))
        .await
        .unwrap();
    assert_eq!(got.attempts, 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited as Retry-After asked"
    );
}

fn diagnosed() -> Diagnosed {
    let anomaly = |resource: &str, metric: &str, ts_ms: i64| Observation {
        resource: resource.into(),
        metric: metric.into(),
        ts_ms,
        confidence: 0.95,
        severity: Severity::High,
    };
    let t0 = 1_767_225_600_000;
    Diagnosed {
        id: "3f2a9c".into(),
        incident: Incident {
            start_ms: t0,
            end_ms: t0 + 60_000,
            resources: vec!["api-1".into(), "db-1".into()],
            anomalies: vec![
                anomaly("db-1", "p99_latency_ms", t0),
                anomaly("api-1", "error_rate", t0 + 30_000),
            ],
            root_causes: vec![RootCause {
                resource: "db-1".into(),
                kind: "database".into(),
                confidence: 0.72,
                evidence_score: 0.9,
                evidence: Evidence {
                    impact: 1.0,
                    precedence: 1.0,
                    strength: 0.8,
                    anomalous: true,
                    first_seen_ms: Some(t0),
                    paths: vec![vec!["db-1".into(), "api-1".into()]],
                },
                recommended_actions: vec!["failover_database".into()],
            }],
        },
        decision: Decision {
            outcome: Outcome::Escalate,
            action: Some("failover_database".into()),
            target: Some("db-1".into()),
            blast_radius: None,
            reasons: vec!["root-cause confidence 0.72 < 0.80: escalate".into()],
            consult: Some(Err("timed out".into())),
        },
        diagnosed_at_ms: t0 + 61_000,
        decided_at_ms: t0 + 61_500,
    }
}

#[tokio::test]
async fn escalations_reach_pagerduty_and_slack_in_their_formats() {
    let pd = Receiver::start(&[Reply::Status(500), Reply::Status(202)]).await;
    let slack = Receiver::start(&[]).await;
    let mut esc = Escalation::of(&diagnosed());
    esc.tried
        .push("restart_service on `api-1`: verify failed, rolled back".into());
    let targets = [
        Target::PagerDuty {
            url: format!("{}/v2/enqueue", pd.url),
            routing_key: "R0UT1NGKEY".into(),
        },
        Target::Slack {
            url: format!("{}/services/T/B/X", slack.url),
        },
    ];
    let results = escalate(&client(), &targets, &esc, &policy(3)).await;
    assert_eq!(
        results[0],
        Ok(Delivery {
            status: 202,
            attempts: 2
        })
    );
    assert_eq!(
        results[1],
        Ok(Delivery {
            status: 200,
            attempts: 1
        })
    );

    // PagerDuty Events API v2: the retry carried the same event and dedup key.
    let events = pd.received();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].body, events[1].body);
    let e = &events[1].body;
    assert_eq!(events[1].path, "/v2/enqueue");
    assert_eq!(e["routing_key"], "R0UT1NGKEY");
    assert_eq!(e["event_action"], "trigger");
    assert_eq!(e["dedup_key"], "3f2a9c");
    let p = &e["payload"];
    assert!(["critical", "error", "warning", "info"].contains(&p["severity"].as_str().unwrap()));
    assert!(p["summary"].as_str().unwrap().contains("db-1"));
    assert!(p["summary"].as_str().unwrap().len() <= 1024);
    assert_eq!(p["source"], "db-1");
    chrono::DateTime::parse_from_rfc3339(p["timestamp"].as_str().unwrap()).unwrap();
    let d = &p["custom_details"];
    assert_eq!(d["root_cause"], "db-1");
    assert_eq!(d["affected"], json!(["api-1", "db-1"]));
    assert!(
        d["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str().unwrap().contains("db-1 -> api-1"))
    );
    assert!(d["why_escalated"][0].as_str().unwrap().contains("0.72"));
    let tried: Vec<&str> = d["tried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        tried
            .iter()
            .any(|t| t.contains("LLM consult failed: timed out")),
        "{tried:?}"
    );
    assert!(tried.iter().any(|t| t.contains("rolled back")), "{tried:?}");

    // Slack incoming webhook: text plus blocks; monitored text stays in code spans.
    let m = &slack.received()[0].body;
    assert_eq!(m["text"], esc.summary);
    let blocks = m["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    let all: String = blocks
        .iter()
        .filter_map(|b| b["text"]["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("`db-1` (72% confidence)"), "{all}");
    assert!(
        all.contains("• `restart_service on 'api-1': verify failed, rolled back`"),
        "{all}"
    );
}
