//! Remediation sagas against real systems on 127.0.0.1: local service processes (process
//! backend), redis-server, moto's Auto Scaling, a PostgreSQL primary with a streaming
//! replica, and HTTP receivers for the webhook actuator and escalations. Crashes are real:
//! the `healer` binary aborts at a failpoint and a second one recovers.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use healer_engine::notify::Escalation;
use healer_engine::remedy::actuator::ProcessService;
use healer_engine::remedy::config::RemediationConfig;
use healer_engine::remedy::{Remediator, Report, Request};

#[path = "support/moto.rs"]
mod moto;
#[path = "support/receiver.rs"]
mod receiver;
#[path = "support/servers.rs"]
mod servers;

use receiver::{Receiver, Reply};
use servers::{PgPair, Redis, free_port, python, service_script};

fn escalation(incident: &str, target: &str) -> Escalation {
    Escalation {
        id: incident.into(),
        summary: format!("test incident on {target}"),
        resource: target.into(),
        root_cause: Some((target.into(), 0.9)),
        evidence: vec![format!("{target} latency_ms z=6.1")],
        reasons: Vec::new(),
        tried: Vec::new(),
        affected: vec![target.into()],
        start_ms: 0,
    }
}

fn request(incident: &str, action: &str, target: &str) -> Request {
    Request {
        incident: incident.into(),
        action: action.into(),
        alternatives: Vec::new(),
        target: target.into(),
        escalation: escalation(incident, target),
        as_of_ms: None,
    }
}

/// A folder with a remediation.toml.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("remediation.toml"),
            format!("journal = \"journal.db\"\n{body}"),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("remediation.toml")
    }

    fn config(&self) -> RemediationConfig {
        RemediationConfig::load(&self.path()).unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn remediator(&self) -> Remediator {
        Remediator::open(self.config()).unwrap()
    }
}

/// With `HEALER_REMEDY_TALLY` set, every saga's final state is appended to that file, for
/// the success and rollback rates the README reports.
impl Drop for Setup {
    fn drop(&mut self) {
        let Ok(tally) = std::env::var("HEALER_REMEDY_TALLY") else {
            return;
        };
        let Ok(journal) =
            healer_engine::remedy::journal::Journal::open(&self.dir.path().join("journal.db"))
        else {
            return;
        };
        let mut lines = String::new();
        for s in journal.sagas().unwrap_or_default() {
            lines.push_str(&format!("{}\t{}\t{}\n", s.action, s.state, s.dry_run));
        }
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(tally)
        {
            let _ = f.write_all(lines.as_bytes());
        }
    }
}

/// A `[[targets]]` entry for a process-backend service on `port`.
fn service_target(pattern: &str, port: u16, releases: &[&str], state: &str) -> String {
    let releases: Vec<String> = releases.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        r#"
[[targets]]
match = "{pattern}"
service = "api"
[targets.process]
command = ["{py}", "{script}", "--port", "{{port}}", "--release", "{{release}}"]
health_url = "http://127.0.0.1:{{port}}/health"
drain_url = "http://127.0.0.1:{{port}}/drain"
state_dir = "{state}"
port = {port}
releases = [{releases}]
memory_mb = 512
max_memory_mb = 1024
stop_grace = "3s"
"#,
        py = python(),
        script = service_script().display(),
        releases = releases.join(", "),
    )
}

/// The head of a config that acts (no dry run) on every target.
const ENFORCE_ALL: &str = "mode = \"enforce\"\nallow = [\"*\"]\n";

fn webhook_target(pattern: &str, url: &str) -> String {
    format!(
        "\n[[targets]]\nmatch = \"{pattern}\"\nservice = \"hooks\"\n[targets.webhook]\nurl = \"{url}\"\n"
    )
}

/// The process-backend service of the config's first target, started and healthy.
async fn start_service(setup: &Setup) -> ProcessService {
    let cfg = setup.config().targets[0].process.clone().unwrap();
    let port = cfg.port;
    let svc = ProcessService::new(cfg);
    svc.start().unwrap();
    wait_health(port).await;
    svc
}

async fn wait_health(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/health");
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(&url).await {
            return r.text().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("service on {port} never answered");
}

/// Stops the service on drop.
struct Stop<'a>(&'a ProcessService);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.0.pid() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// `action` on `target` for `incident`, through every safety rule.
async fn act(rem: &Remediator, incident: &str, action: &str, target: &str) -> Report {
    rem.remediate(request(incident, action, target))
        .await
        .unwrap()
}

/// Runs `call_webhook` on `target` for each incident, each of which must succeed.
async fn succeed(rem: &Remediator, incidents: &[&str], target: &str) {
    for incident in incidents {
        let r = act(rem, incident, "call_webhook", target).await;
        assert_eq!(r.state, "succeeded", "{incident}: {r:#?}");
    }
}

/// Whether one of `r`'s `step` lines says `text`.
fn has_step(r: &Report, step: &str, text: &str) -> bool {
    steps(r, step).iter().any(|s| s.contains(text))
}

fn steps(r: &Report, step: &str) -> Vec<String> {
    r.steps
        .iter()
        .filter(|s| s.starts_with(&format!("{step} ")))
        .cloned()
        .collect()
}

const FAST: &str = "verify_interval = \"300ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_service_dry_run_touches_nothing_then_enforced_restarts_and_verifies() {
    let port = free_port();
    let target = service_target("api-*", port, &["v1"], "svc");
    let dry = Setup::new(&format!("allow = [\"api-*\"]\n{target}"));
    let svc = start_service(&dry).await;
    let _stop = Stop(&svc);
    let before = svc.pid().unwrap();

    let r = dry
        .remediator()
        .remediate(request("inc-1", "restart_service", "api-1"))
        .await
        .unwrap();
    assert_eq!(r.state, "dry_run", "{r:#?}");
    assert_eq!(svc.pid(), Some(before), "a dry run touches nothing");
    assert!(has_step(&r, "execute", "planned"), "{r:#?}");
    assert!(has_step(&r, "preconditions", "reachable: yes"), "{r:#?}");

    std::fs::write(
        dry.path(),
        format!("journal = \"journal.db\"\nmode = \"enforce\"\nallow = [\"api-*\"]\n{target}"),
    )
    .unwrap();
    let r = dry
        .remediator()
        .remediate(request("inc-2", "restart_service", "api-1"))
        .await
        .unwrap();
    // A copy nobody tracks (its pid file lost) keeps the port: healer will not start a second.
    assert_eq!(r.state, "succeeded", "{r:#?}");
    let pid_file = dry.dir.path().join("svc/pid");
    let saved = std::fs::read_to_string(&pid_file).unwrap();
    std::fs::remove_file(&pid_file).unwrap();
    let svc2 = ProcessService::new(dry.config().targets[0].process.clone().unwrap());
    let err = svc2.start().unwrap_err();
    assert!(err.to_string().contains("does not track"), "{err}");
    std::fs::write(&pid_file, saved).unwrap();
    assert_eq!(r.state, "succeeded", "{r:#?}");
    let after = svc.pid().unwrap();
    assert_ne!(after, before);
    assert!(has_step(&r, "execute", "drained, stopped"), "{r:#?}");
    assert!(has_step(&r, "verify", "healthy 3/3"), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_deploy_verifies_and_a_bad_release_is_rolled_back_and_escalated() {
    let slack = Receiver::start(&[]).await;
    let port = free_port();
    let setup = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\ncooldown = \"0s\"\n[escalation]\nslack_webhook = \"{}/slack\"\n{}\n[[actions]]\nid = \"rollback_deploy\"\nname = \"Roll back\"\ndescription = \"d\"\noperation = \"rollback_deploy\"\nestimated = \"20s\"\nblast_radius = \"high\"\n{FAST}",
        slack.url,
        service_target("api-*", port, &["bad-1", "v1", "v2"], "svc")
    ));
    let svc = start_service(&setup).await;
    let _stop = Stop(&svc);
    assert!(wait_health(port).await.contains("v2"));
    let rem = setup.remediator();

    // v2 -> v1: healthy, verified.
    let r = act(&rem, "inc-1", "rollback_deploy", "api-1").await;
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert!(wait_health(port).await.contains("\"v1\""));
    assert_eq!(svc.deploys(), ["bad-1", "v1"]);

    // v1 -> bad-1: unhealthy, so verify fails 3 times and v1 is redeployed.
    let r = act(&rem, "inc-2", "rollback_deploy", "api-1").await;
    assert_eq!(r.state, "rolled_back", "{r:#?}");
    assert_eq!(steps(&r, "verify").len(), 3, "{r:#?}");
    assert!(has_step(&r, "compensate", "restored release v1"), "{r:#?}");
    assert!(wait_health(port).await.contains("\"v1\""));
    assert_eq!(svc.deploys(), ["bad-1", "v1"]);
    let got = slack.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let text = got[0].body.to_string();
    assert!(
        text.contains("rolled_back") && text.contains("verify failed"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rollback_escalates_as_failed() {
    let pd = Receiver::start(&[]).await;
    let port = free_port();
    let setup = Setup::new(&format!(
        "{ENFORCE_ALL}[escalation]\npagerduty_routing_key = \"rk\"\npagerduty_url = \"{}/v2/enqueue\"\n{}\n[[actions]]\nid = \"rollback_deploy\"\nname = \"Roll back\"\ndescription = \"d\"\noperation = \"rollback_deploy\"\nestimated = \"20s\"\nblast_radius = \"high\"\nverify_attempts = 1\n",
        pd.url,
        service_target("api-*", port, &["bad-1", "bad-2"], "svc")
    ));
    let svc = start_service(&setup).await;
    let _stop = Stop(&svc);
    let r = setup
        .remediator()
        .remediate(request("inc-1", "rollback_deploy", "api-1"))
        .await
        .unwrap();
    assert_eq!(r.state, "failed", "{r:#?}");
    assert!(r.reason.contains("rollback failed"), "{r:#?}");
    let got = pd.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["event_action"], "trigger");
    assert_eq!(got[0].body["routing_key"], "rk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increase_memory_raises_the_limit_until_the_ceiling_then_escalates() {
    let port = free_port();
    let setup = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\ncooldown = \"0s\"\nrecurrence_count = 0\n{}",
        service_target("api-*", port, &["v1"], "svc")
    ));
    let svc = start_service(&setup).await;
    let _stop = Stop(&svc);
    let rem = setup.remediator();
    let r = act(&rem, "inc-1", "increase_memory", "api-1").await;
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert!(has_step(&r, "verify", "under 768 MiB"), "{r:#?}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", svc.pid().unwrap())).unwrap();
    assert!(
        limits.contains(&(768u64 * 1024 * 1024).to_string()),
        "{limits}"
    );
    let r = act(&rem, "inc-2", "increase_memory", "api-1").await;
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert_eq!(svc.memory_mb(), Some(1024));
    let pid = svc.pid();
    let r = act(&rem, "inc-3", "increase_memory", "api-1").await;
    assert_eq!(r.state, "escalated", "{r:#?}");
    assert!(r.reason.contains("ceiling"), "{r:#?}");
    assert_eq!(svc.pid(), pid, "at the ceiling nothing is touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_actuator_retries_server_errors_and_never_takes_them_for_success() {
    let ok_after_503 = Receiver::start(&[Reply::Status(503), Reply::Status(200)]).await;
    let always_500 = Receiver::start(&[Reply::Status(500); 5]).await;
    let refused = Receiver::start(&[Reply::Status(400)]).await;
    let setup = Setup::new(&format!(
        "{ENFORCE_ALL}{}{}{}",
        webhook_target("a", &format!("{}/act", ok_after_503.url)),
        webhook_target("b", &format!("{}/act", always_500.url)),
        webhook_target("c", &format!("{}/act", refused.url)),
    ));
    let rem = setup.remediator();
    let r = act(&rem, "inc-1", "call_webhook", "a").await;
    assert_eq!(r.state, "succeeded", "{r:#?}");
    let got = ok_after_503.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].idempotency_key, got[1].idempotency_key);
    assert_eq!(got[0].body["target"], "a");

    let r = act(&rem, "inc-2", "call_webhook", "b").await;
    assert_eq!(r.state, "rolled_back", "{r:#?}");
    assert_eq!(always_500.received().len(), 5);
    assert!(has_step(&r, "execute", "no success after 5"), "{r:#?}");

    let r = act(&rem, "inc-3", "call_webhook", "c").await;
    assert_eq!(r.state, "rolled_back", "{r:#?}");
    assert_eq!(refused.received().len(), 1, "a 4xx is final");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_budgets_recurrence_concurrency_and_the_kill_switch() {
    let hook = Receiver::start(&[]).await;
    let url = format!("{}/act", hook.url);
    let targets = format!(
        "{}{}",
        webhook_target("t1", &url),
        webhook_target("t*", &url)
    );

    // Cooldown per (target, action).
    let s = Setup::new(&format!("{ENFORCE_ALL}{targets}"));
    let rem = s.remediator();
    succeed(&rem, &["i1"], "t1").await;
    let r = act(&rem, "i2", "call_webhook", "t1").await;
    assert_eq!(r.state, "refused");
    assert!(r.reason.contains("cooling down"), "{r:#?}");
    // The same incident, action and target again: the saga that exists, not a new one.
    let again = act(&rem, "i1", "call_webhook", "t1").await;
    assert_eq!(again.state, "succeeded");
    assert_eq!(hook.received().len(), 1, "at most once per idempotency key");

    // Budgets: at most 2 per target, 3 per service.
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\ncooldown = \"0s\"\nrecurrence_count = 0\nbudgets = [{{ scope = \"target\", max = 2, window = \"1h\" }}, {{ scope = \"service\", max = 3, window = \"1h\" }}]\n{targets}"
    ));
    let rem = s.remediator();
    succeed(&rem, &["b0", "b1"], "t1").await;
    let r = act(&rem, "b2", "call_webhook", "t1").await;
    assert!(r.reason.contains("target budget spent: 2"), "{r:#?}");
    succeed(&rem, &["b3"], "t2").await;
    let r = act(&rem, "b4", "call_webhook", "t3").await;
    assert!(r.reason.contains("service budget spent: 3"), "{r:#?}");

    // Recurrence: the same fix succeeding twice escalates the third time.
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\ncooldown = \"0s\"\nrecurrence_count = 2\n{targets}"
    ));
    let rem = s.remediator();
    succeed(&rem, &["r0", "r1"], "t1").await;
    let r = act(&rem, "r2", "call_webhook", "t1").await;
    assert_eq!(r.state, "escalated");
    assert!(r.reason.contains("does not hold"), "{r:#?}");

    // Kill switch: refuses new actions, lets the one in flight finish; expires.
    let slow = Receiver::start(&[Reply::Slow(200, Duration::from_millis(1500))]).await;
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\nconcurrency = 1\n{}{}",
        webhook_target("slow", &format!("{}/act", slow.url)),
        webhook_target("t*", &url)
    ));
    let rem = std::sync::Arc::new(s.remediator());
    let in_flight = {
        let rem = std::sync::Arc::clone(&rem);
        tokio::spawn(async move { act(&rem, "k0", "call_webhook", "slow").await })
    };
    // Wait until the slow call has arrived: its saga is in flight.
    for _ in 0..100 {
        if !slow.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Concurrency cap 1: a second target waits its turn (refused, escalated).
    let r = act(&rem, "k1", "call_webhook", "t1").await;
    assert!(r.reason.contains("in flight (at most 1)"), "{r:#?}");
    let now = healer_engine::remedy::now_ms();
    rem.journal()
        .pause("bad deploy day", "alice", now, None)
        .unwrap();
    assert_eq!(
        in_flight.await.unwrap().state,
        "succeeded",
        "in-flight actions finish"
    );
    let r = act(&rem, "k2", "call_webhook", "t2").await;
    assert_eq!(r.state, "refused");
    assert!(
        r.reason.contains("paused by alice: bad deploy day"),
        "{r:#?}"
    );
    assert!(
        rem.journal()
            .resume("bob", healer_engine::remedy::now_ms())
            .unwrap()
    );
    assert_eq!(
        act(&rem, "k3", "call_webhook", "t2").await.state,
        "succeeded"
    );
    let now = healer_engine::remedy::now_ms();
    rem.journal()
        .pause("short", "alice", now, Some(now + 200))
        .unwrap();
    assert_eq!(act(&rem, "k4", "call_webhook", "t3").await.state, "refused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        act(&rem, "k5", "call_webhook", "t4").await.state,
        "succeeded"
    );

    // Not on the allow-list: refused.
    let s = Setup::new(&format!("mode = \"enforce\"\nallow = [\"t1\"]\n{targets}"));
    let r = s
        .remediator()
        .remediate(request("a1", "call_webhook", "t2"))
        .await
        .unwrap();
    assert!(r.reason.contains("not on the allow-list"), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_run_when_approved_are_recorded_and_expire_into_escalations() {
    let hook = Receiver::start(&[]).await;
    let slack = Receiver::start(&[]).await;
    let body = format!(
        "{ENFORCE_ALL}[escalation]\nslack_webhook = \"{}/s\"\n{}",
        slack.url,
        webhook_target("t*", &format!("{}/act", hook.url))
    );
    let s = Setup::new(&body);
    let rem = s.remediator();
    let r = rem
        .ask_approval(request("i1", "call_webhook", "t1"), "high blast radius")
        .await
        .unwrap();
    assert_eq!(r.state, "awaiting_approval", "{r:#?}");
    let pending = rem.journal().approvals(false).unwrap();
    assert_eq!(pending.len(), 1);
    assert!(hook.received().is_empty(), "nothing runs before approval");
    let a = rem
        .journal()
        .decide_approval(
            &pending[0].id,
            true,
            "alice",
            healer_engine::remedy::now_ms(),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.status.as_str(), a.by.as_deref()),
        ("approved", Some("alice"))
    );
    let ran = rem.recover().await.unwrap();
    assert_eq!(ran.len(), 1);
    assert_eq!(ran[0].state, "succeeded", "{ran:#?}");
    assert_eq!(hook.received().len(), 1);
    // Answered once only.
    assert!(
        rem.journal()
            .decide_approval(
                &pending[0].id,
                false,
                "eve",
                healer_engine::remedy::now_ms()
            )
            .unwrap()
            .is_err()
    );

    rem.ask_approval(request("i2", "call_webhook", "t2"), "why")
        .await
        .unwrap();
    let id = rem.journal().approvals(false).unwrap()[0].id.clone();
    rem.journal()
        .decide_approval(&id, false, "bob", healer_engine::remedy::now_ms())
        .unwrap()
        .unwrap();
    assert!(rem.recover().await.unwrap().is_empty());
    assert_eq!(hook.received().len(), 1, "a denied request never runs");

    let s = Setup::new(&body.replacen(
        "allow = [\"*\"]\n",
        "allow = [\"*\"]\n[limits]\napproval_ttl = \"100ms\"\n",
        1,
    ));
    let rem = s.remediator();
    rem.ask_approval(request("i3", "call_webhook", "t3"), "why")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let expired = rem.recover().await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].state, "expired");
    assert!(
        slack
            .received()
            .iter()
            .any(|m| m.body.to_string().contains("expired unanswered"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_cache_flushes_a_real_redis_and_sees_memory_drop() {
    let redis = Redis::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let value = "x".repeat(1024);
    for i in 0..2000 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(&value)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let s = Setup::new(&format!(
        "mode = \"enforce\"\nallow = [\"cache-*\"]\n[[targets]]\nmatch = \"cache-*\"\n[targets.redis]\nurl = \"{}\"\n",
        redis.url()
    ));
    let r = s
        .remediator()
        .remediate(request("i1", "clear_cache", "cache-1"))
        .await
        .unwrap();
    assert_eq!(r.state, "succeeded", "{r:#?}");
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(keys, 0);
    assert!(has_step(&r, "verify", "keys 2000 -> 0"), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_on_moto_auto_scaling_respects_healers_ceiling() {
    let moto = moto::Moto::start();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(moto.endpoint())
        .credentials_provider(aws_sdk_autoscaling::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .load()
        .await;
    let asg = aws_sdk_autoscaling::Client::new(&conf);
    asg.create_launch_configuration()
        .launch_configuration_name("lc")
        .image_id("ami-12c6146b")
        .instance_type("t2.micro")
        .send()
        .await
        .unwrap();
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("web")
        .launch_configuration_name("lc")
        .min_size(1)
        .max_size(10)
        .desired_capacity(1)
        .availability_zones("us-east-1a")
        .send()
        .await
        .unwrap();
    let s = Setup::new(&format!(
        "mode = \"enforce\"\nallow = [\"web\"]\n[limits]\ncooldown = \"0s\"\nrecurrence_count = 0\n[[targets]]\nmatch = \"web\"\n[targets.autoscaling]\ngroup = \"web\"\nmax_instances = 4\nendpoint = \"{}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nhealthy_wait = \"20s\"\n",
        moto.endpoint()
    ));
    let rem = s.remediator();
    let desired = || async {
        asg.describe_auto_scaling_groups()
            .auto_scaling_group_names("web")
            .send()
            .await
            .unwrap()
            .auto_scaling_groups()[0]
            .desired_capacity()
            .unwrap()
    };
    let r = act(&rem, "i1", "scale_up", "web").await;
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert_eq!(desired().await, 3);
    let r = act(&rem, "i2", "scale_up_instances", "web").await;
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert_eq!(
        desired().await,
        4,
        "capped at max_instances, though MaxSize is 10"
    );
    let r = act(&rem, "i3", "scale_up", "web").await;
    assert_eq!(r.state, "escalated", "{r:#?}");
    assert!(r.reason.contains("ceiling"), "{r:#?}");
    assert_eq!(desired().await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_database_promotes_a_real_streaming_replica() {
    let pg = PgPair::start();
    let primary = PgPair::conn(pg.primary_port);
    let replica = PgPair::conn(pg.replica_port);
    let p = pg_client(&primary).await;
    p.batch_execute(
        "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 1000);",
    )
    .await
    .unwrap();
    let s = Setup::new(&format!(
        "mode = \"enforce\"\nallow = [\"db-*\"]\n[[targets]]\nmatch = \"db-*\"\n[targets.postgres]\nprimary = \"{primary}\"\nreplica = \"{replica}\"\nendpoint_file = \"endpoint\"\n"
    ));
    std::fs::write(s.dir.path().join("endpoint"), &primary).unwrap();
    let rem = s.remediator();
    let r = act(&rem, "i1", "failover_database", "db-1").await;
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert!(
        has_step(&r, "preconditions", "replica_lag_seconds"),
        "{r:#?}"
    );
    assert!(has_step(&r, "execute", "replica promoted"), "{r:#?}");
    assert_eq!(
        std::fs::read_to_string(s.dir.path().join("endpoint")).unwrap(),
        replica
    );
    let n = pg_client(&replica).await;
    let row = n
        .query_one(
            "SELECT pg_is_in_recovery(), (SELECT count(*) FROM orders)",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i64>(1), 1000, "no write lost");
    n.batch_execute("INSERT INTO orders VALUES (1001)")
        .await
        .unwrap();
    let p2 = pg_client(&primary).await;
    assert!(
        p2.batch_execute("INSERT INTO orders VALUES (0)")
            .await
            .is_err(),
        "the old primary is read-only"
    );
}

async fn pg_client(conn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// `healer remediation run ACTION api-1` aborted at failpoint `point`, then `healer
/// remediation recover`: whether the recovery exited 0, and what it printed.
fn crash_then_recover(s: &Setup, action: &str, point: &str) -> (bool, String) {
    let out = healer()
        .args(["remediation", "run", "--config"])
        .arg(s.path())
        .args([action, "api-1", "--incident", "inc-1"])
        .env("HEALER_FAILPOINT", point)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{point}: the process aborts");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint {point}")),
        "{point}"
    );
    let out = healer()
        .args(["remediation", "recover", "--config"])
        .arg(s.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn healer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_healer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_saga_step_is_resumed_or_compensated_and_acts_once() {
    let happy = [
        "preconditions:before",
        "preconditions:after",
        "snapshot:before",
        "snapshot:after",
        "execute:before",
        "execute:after",
        "verify:before",
        "verify:after",
    ];
    for point in happy {
        let port = free_port();
        let s = Setup::new(&format!(
            "{ENFORCE_ALL}{}",
            service_target("api-*", port, &["v1"], "svc")
        ));
        let svc = start_service(&s).await;
        let _stop = Stop(&svc);
        let (ok, text) = crash_then_recover(&s, "increase_memory", point);
        assert!(ok, "{point}: {text}");
        assert!(text.contains("succeeded"), "{point}: {text}");
        assert_eq!(svc.memory_mb(), Some(768), "{point}: raised exactly once");
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", svc.pid().unwrap())).unwrap();
        assert!(
            limits.contains(&(768u64 * 1024 * 1024).to_string()),
            "{point}"
        );
    }
    // A restart is not idempotent: after a crash in it, healer looks before acting again.
    for (point, want) in [
        ("execute:before", "rolled_back"),
        ("execute:after", "succeeded"),
    ] {
        let port = free_port();
        let s = Setup::new(&format!(
            "{ENFORCE_ALL}{}",
            service_target("api-*", port, &["v1"], "svc")
        ));
        let svc = start_service(&s).await;
        let _stop = Stop(&svc);
        let before = svc.pid();
        let (_, text) = crash_then_recover(&s, "restart_service", point);
        assert!(
            text.contains(&format!(": {want}")),
            "restart {point}: {text}"
        );
        let executes = text
            .lines()
            .filter(|l| l.trim_start().starts_with("execute "))
            .count();
        assert_eq!(executes, 1, "restart {point}: executed once: {text}");
        assert_eq!(svc.pid() != before, want == "succeeded", "restart {point}");
        wait_health(port).await;
    }
    for point in ["compensate:before", "compensate:after"] {
        let port = free_port();
        let s = Setup::new(&format!(
            "{ENFORCE_ALL}{}\n[[actions]]\nid = \"rollback_deploy\"\nname = \"r\"\ndescription = \"d\"\noperation = \"rollback_deploy\"\nestimated = \"20s\"\nblast_radius = \"high\"\nverify_attempts = 1\n",
            service_target("api-*", port, &["bad-1", "v2"], "svc")
        ));
        let svc = start_service(&s).await;
        let _stop = Stop(&svc);
        let (_, text) = crash_then_recover(&s, "rollback_deploy", point);
        assert!(text.contains("rolled_back"), "{point}: {text}");
        assert!(wait_health(port).await.contains("\"v2\""), "{point}");
        assert_eq!(svc.deploys(), ["bad-1", "v2"], "{point}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_healers_racing_for_one_target_act_once() {
    let port = free_port();
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}{}",
        service_target("api-*", port, &["v1"], "svc")
    ));
    let svc = start_service(&s).await;
    let _stop = Stop(&svc);
    let spawn = |incident: &str| {
        healer()
            .args(["remediation", "run", "--config"])
            .arg(s.path())
            .args(["restart_service", "api-1", "--incident", incident])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("inc-a"), spawn("inc-b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let outs = [
        String::from_utf8_lossy(&a.stdout).to_string(),
        String::from_utf8_lossy(&b.stdout).to_string(),
    ];
    let succeeded = outs.iter().filter(|o| o.contains(": succeeded")).count();
    let refused = outs.iter().filter(|o| o.contains(": refused")).count();
    assert_eq!((succeeded, refused), (1, 1), "{outs:#?}");
    assert!(
        outs.iter()
            .any(|o| o.contains("locked by saga") || o.contains("cooling down")),
        "{outs:#?}"
    );
    let journal = s.remediator();
    let executed = journal
        .journal()
        .sagas()
        .unwrap()
        .iter()
        .filter(|saga| {
            journal
                .journal()
                .steps(&saga.id)
                .unwrap()
                .iter()
                .any(|st| st.step == "execute")
        })
        .count();
    assert_eq!(executed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_go_to_the_incident_log_and_own_actions_are_not_incidents() {
    let hook = Receiver::start(&[]).await;
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\nsettle = \"1m\"\n{}",
        webhook_target("t*", &format!("{}/act", hook.url))
    ));
    let rem = s.remediator();
    let before = healer_engine::remedy::now_ms();
    succeed(&rem, &["i1"], "t1").await;
    assert!(rem.caused_by_healer("t1", before + 10).unwrap());
    assert!(
        rem.caused_by_healer("t1", healer_engine::remedy::now_ms() + 30_000)
            .unwrap(),
        "within settle"
    );
    assert!(!rem.caused_by_healer("t1", before - 1).unwrap());
    assert!(!rem.caused_by_healer("t2", before + 10).unwrap());

    let log_dir = s.dir.path().join("log");
    let log =
        healer_engine::store::Location::parse(log_dir.to_str().unwrap(), &Default::default(), true)
            .unwrap();
    let n = rem.export(&log).await.unwrap();
    assert!(n >= 4, "{n}");
    assert_eq!(rem.export(&log).await.unwrap(), 0, "exported once");
    let batches = healer_engine::query::query(
        &log,
        "SELECT step, status, saga_state, duration_ms FROM remediations ORDER BY seq",
    )
    .await
    .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    for want in [
        "preconditions",
        "snapshot",
        "execute",
        "verify",
        "succeeded",
    ] {
        assert!(text.contains(want), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_fails_is_undone_before_promotion_and_needs_a_human_after() {
    let pg = PgPair::start();
    let primary = PgPair::conn(pg.primary_port);
    let replica = PgPair::conn(pg.replica_port);
    let p = pg_client(&primary).await;
    let r = pg_client(&replica).await;
    p.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    // The replica stops replaying, so it cannot catch up within max_lag_seconds.
    r.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    p.batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let slack = Receiver::start(&[]).await;
    let config = |endpoint: &str| {
        format!(
            "mode = \"enforce\"\nallow = [\"db-*\"]\n[limits]\ncooldown = \"0s\"\n[escalation]\nslack_webhook = \"{}/s\"\n[[targets]]\nmatch = \"db-*\"\n[targets.postgres]\nprimary = \"{primary}\"\nreplica = \"{replica}\"\nendpoint_file = \"{endpoint}\"\nmax_lag_seconds = 1.0\n",
            slack.url
        )
    };
    let s = Setup::new(&config("endpoint"));
    std::fs::write(s.dir.path().join("endpoint"), &primary).unwrap();
    let rem = s.remediator();
    let rep = act(&rem, "i1", "failover_database", "db-1").await;
    // Not promoted: undoing is safe, so it is done at once and the primary takes writes.
    assert_eq!(rep.state, "rolled_back", "{rep:#?}");
    assert!(has_step(&rep, "execute", "bytes behind"), "{rep:#?}");
    assert!(
        has_step(&rep, "compensate", "primary writable again"),
        "{rep:#?}"
    );
    assert_eq!(slack.received().len(), 1, "escalated");
    let p2 = pg_client(&primary).await;
    p2.batch_execute("INSERT INTO t VALUES (0)").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(s.dir.path().join("endpoint")).unwrap(),
        primary
    );

    // Promoted, then the endpoint cannot be repointed: only a human can undo that.
    r.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    drop(rem);
    std::fs::write(
        s.path(),
        format!("journal = \"journal.db\"\n{}", config("missing/endpoint")),
    )
    .unwrap();
    let rem = s.remediator();
    let rep = act(&rem, "i2", "failover_database", "db-1").await;
    assert_eq!(rep.state, "failed", "{rep:#?}");
    assert!(rep.reason.contains("rollback needs approval"), "{rep:#?}");
    assert!(has_step(&rep, "execute", "No such file"), "{rep:#?}");
    let pending = rem.journal().approvals(false).unwrap();
    assert_eq!((pending.len(), pending[0].kind.as_str()), (1, "rollback"));
    rem.journal()
        .decide_approval(&pending[0].id, true, "dba", healer_engine::remedy::now_ms())
        .unwrap()
        .unwrap();
    let done = rem.run_approved_rollbacks().await.unwrap();
    assert_eq!(done.len(), 1);
    assert!(
        done[0]
            .steps
            .iter()
            .any(|s| s.contains("manual_rollback failed") && s.contains("rebuild the old primary")),
        "{done:#?}"
    );
    assert!(
        slack
            .received()
            .iter()
            .any(|m| m.body.to_string().contains("approved rollback failed"))
    );
    assert!(
        rem.run_approved_rollbacks().await.unwrap().is_empty(),
        "once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_pauses_resumes_and_answers_approvals() {
    let hook = Receiver::start(&[]).await;
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}{}",
        webhook_target("t*", &format!("{}/act", hook.url))
    ));
    let run = |args: &[&str]| {
        let out = healer()
            .args(args)
            .arg("--config")
            .arg(s.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(&["pause", "--reason", "freeze", "--by", "alice"]);
    assert!(ok && text.contains("paused"), "{text}");
    let (ok, text) = run(&[
        "remediation",
        "run",
        "call_webhook",
        "t1",
        "--incident",
        "i1",
    ]);
    assert!(
        !ok && text.contains("refused (healer is paused by alice: freeze)"),
        "{text}"
    );
    let (ok, _) = run(&["resume", "--by", "alice"]);
    assert!(ok);
    let (ok, text) = run(&[
        "remediation",
        "run",
        "call_webhook",
        "t1",
        "--incident",
        "i2",
    ]);
    assert!(ok && text.contains(": succeeded"), "{text}");
    assert_eq!(hook.received().len(), 1);

    let (ok, text) = run(&[
        "remediation",
        "run",
        "call_webhook",
        "t2",
        "--incident",
        "i3",
        "--request-approval",
        "needs a human",
    ]);
    assert!(ok && text.contains("awaiting_approval"), "{text}");
    let (_, list) = run(&["approvals", "list"]);
    let id = list.split_whitespace().next().unwrap().to_string();
    assert!(
        list.contains("needs a human") && list.contains("pending"),
        "{list}"
    );
    let (ok, text) = run(&["approvals", "approve", &id, "--by", "bob"]);
    assert!(
        ok && text.contains("approved by bob") && text.contains(": succeeded"),
        "{text}"
    );
    assert_eq!(hook.received().len(), 2);
    let (ok, text) = run(&["approvals", "deny", &id]);
    assert!(!ok && text.contains("already approved"), "{text}");
    let (_, list) = run(&["remediation", "list"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("call_webhook")).count(),
        3,
        "{list}"
    );
    let (ok, text) = run(&["remediation", "actions"]);
    assert!(
        ok && text.contains("failover_database") && text.contains("replica_lag_seconds < 10"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precondition_held_for_a_while_is_read_from_telemetry() {
    use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;

    let hook = Receiver::start(&[]).await;
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\ncooldown = \"0s\"\n{}\n[[actions]]\nid = \"page_out\"\nname = \"Page out\"\ndescription = \"d\"\noperation = \"webhook\"\nestimated = \"10s\"\nblast_radius = \"low\"\npreconditions = [{{ metric = \"memory_percent\", op = \">\", threshold = 85.0, for = \"5m\" }}]\n",
        webhook_target("*", &format!("{}/act", hook.url))
    ));
    // One sample a minute for 10 minutes; api-2 dips below 85 % three minutes before the end.
    let end = 1_764_900_000_000i64;
    let (mut ts, mut res, mut mem) = (Vec::new(), Vec::new(), Vec::new());
    for m in 0..=10i64 {
        for r in ["api-1", "api-2"] {
            ts.push(end - (10 - m) * 60_000);
            res.push(r);
            mem.push(if r == "api-2" && m == 7 {
                80.0
            } else {
                91.0 + m as f64 / 10.0
            });
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("resource", DataType::Utf8, false),
        Field::new("memory_percent", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
            Arc::new(StringArray::from(res)),
            Arc::new(Float64Array::from(mem)),
        ],
    )
    .unwrap();
    let path = s.dir.path().join("metrics.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let mut rem = s.remediator();
    let targets = vec!["api-1".to_string(), "api-2".to_string()];
    let samples = healer_engine::remedy::read_telemetry(path.to_str().unwrap(), &targets)
        .await
        .unwrap();
    assert_eq!(samples.len(), 22);
    rem.set_telemetry(samples);
    let at = |incident: &str, target: &str| Request {
        as_of_ms: Some(end),
        ..request(incident, "page_out", target)
    };
    let r = rem.remediate(at("i1", "api-1")).await.unwrap();
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert!(
        has_step(&r, "preconditions", "held in all 6 samples of the 5m"),
        "{r:#?}"
    );
    let r = rem.remediate(at("i2", "api-2")).await.unwrap();
    assert_eq!(r.state, "escalated", "{r:#?}");
    assert!(
        r.reason
            .contains("memory_percent > 85 for 5m does not hold: memory_percent was 80"),
        "{r:#?}"
    );
    // Telemetry that does not reach back far enough does not count as holding.
    let r = rem
        .remediate(Request {
            as_of_ms: Some(end + 20 * 60_000),
            ..at("i3", "api-1")
        })
        .await
        .unwrap();
    assert_eq!(r.state, "escalated", "{r:#?}");
    assert_eq!(hook.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_the_lock_keeps_it_renewed_and_a_lost_lock_stops_the_saga() {
    let slow = Receiver::start(&[
        Reply::Slow(200, Duration::from_millis(1500)),
        Reply::Slow(200, Duration::from_millis(3000)),
    ])
    .await;
    let s = Setup::new(&format!(
        "{ENFORCE_ALL}[limits]\nlock_ttl = \"300ms\"\ncooldown = \"0s\"\nconcurrency = 5\n{}",
        webhook_target("t*", &format!("{}/act", slow.url))
    ));
    let rem = std::sync::Arc::new(s.remediator());
    let first = {
        let rem = std::sync::Arc::clone(&rem);
        tokio::spawn(async move { act(&rem, "i1", "call_webhook", "t1").await })
    };
    tokio::time::sleep(Duration::from_millis(900)).await;
    // Three lock lifetimes into its execute, the saga still holds the target.
    let r = act(&rem, "i2", "call_webhook", "t1").await;
    assert!(r.reason.contains("is locked by saga"), "{r:#?}");
    assert_eq!(first.await.unwrap().state, "succeeded");

    // The lock is taken from a saga in the middle of its execute: it stops and escalates.
    let second = {
        let rem = std::sync::Arc::clone(&rem);
        tokio::spawn(async move { act(&rem, "i3", "call_webhook", "t1").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = rusqlite::Connection::open(s.dir.path().join("journal.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute(
        "UPDATE locks SET holder = 'intruder', token = token + 1 WHERE target = 't1'",
        [],
    )
    .unwrap();
    let r = second.await.unwrap();
    assert_eq!(r.state, "failed", "{r:#?}");
    assert!(r.reason.contains("lost the lock on t1"), "{r:#?}");
    assert!(
        r.duration_ms.unwrap() < 2500,
        "stopped before its call ended: {r:#?}"
    );
}
