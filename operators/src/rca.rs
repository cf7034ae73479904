//! Root-cause analysis: anomalies correlated over the dependency graph, ranked causes.
//!
//! # Correlation
//! Anomalies are taken in event-time order. The earliest one not yet assigned opens a window
//! of [`RcaConfig::window_ms`] (default 5 minutes, both ends included, so that metrics
//! sampled every 5 minutes correlate with the next sample); the anomalous resources inside it are
//! split into incidents by linkage: two resources are linked when one reaches the other along
//! dependency edges within [`RcaConfig::max_hops`] hops, whatever the resources in between
//! (a silent intermediate resource does not break the chain). Two faults that share no
//! dependency path become two incidents. Anomalies on resources the topology does not know
//! form incidents of their own, which cannot be diagnosed.
//!
//! # Candidates and ranking
//! A candidate is an affected resource or an upstream resource within `max_hops` hops of one
//! that reaches at least [`RcaConfig::min_coverage`] (50 %) of the incident's resources,
//! itself included. Each candidate `u` gets evidence in [0, 1]:
//!
//! * impact `I` = share of the incident's resources that `u` is or reaches;
//! * precedence `T` = 1 for the earliest first anomaly among the incident's resources,
//!   0 for the latest (linear in between; 1 when they all start together), 0 when `u`
//!   shows no anomaly;
//! * strength `S` = `u`'s strongest anomaly confidence over the incident's strongest, 0 when
//!   silent;
//! * `A` = 1 when `u` is itself anomalous;
//!
//! `e(u) = 0.4·I + 0.3·T + 0.2·S + 0.1·A`. The candidates' share of the evidence is
//! `P(u) = e(u)⁴ / Σ e(v)⁴` (the fourth power sharpens it so that one clearly better
//! candidate takes most of it), and `confidence(u) = e(u) · P(u)`: high only when `u`
//! explains the incident well *and* no other candidate explains it nearly as well. A
//! resource that is anomalous, earliest and upstream of everything gets `e = 1`. No
//! candidate is an explicit "unable to determine".

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::severity::Severity;
use crate::topology::Topology;

/// One anomaly, as RCA sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Resource id.
    pub resource: String,
    /// Metric name.
    pub metric: String,
    /// Event time, ms since the epoch.
    pub ts_ms: i64,
    /// Detector confidence, 0..1.
    pub confidence: f64,
    /// Severity.
    pub severity: Severity,
}

/// RCA parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RcaConfig {
    /// Correlation window.
    pub window_ms: i64,
    /// Longest dependency path considered, in hops.
    pub max_hops: usize,
    /// Least share of the incident a candidate must reach.
    pub min_coverage: f64,
}

impl Default for RcaConfig {
    fn default() -> Self {
        Self {
            window_ms: 5 * 60 * 1000,
            max_hops: 3,
            min_coverage: 0.5,
        }
    }
}

/// Why a candidate ranks where it does.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// Share of the incident's resources the candidate is or reaches.
    pub impact: f64,
    /// Temporal precedence, 0..1.
    pub precedence: f64,
    /// Relative anomaly strength, 0..1.
    pub strength: f64,
    /// Whether the candidate is itself anomalous.
    pub anomalous: bool,
    /// First anomaly of the candidate, if any.
    pub first_seen_ms: Option<i64>,
    /// The dependency path from the candidate to every incident resource it reaches.
    pub paths: Vec<Vec<String>>,
}

/// A ranked root cause.
#[derive(Debug, Clone, PartialEq)]
pub struct RootCause {
    /// Resource id.
    pub resource: String,
    /// Resource type.
    pub kind: String,
    /// 0..1 (see the [module docs](self)).
    pub confidence: f64,
    /// Evidence score `e`.
    pub evidence_score: f64,
    /// The evidence.
    pub evidence: Evidence,
    /// Remediations that fit, best first (see [`recommended_actions`]).
    pub recommended_actions: Vec<String>,
}

/// Correlated anomalies and their ranked causes.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    /// First anomaly.
    pub start_ms: i64,
    /// Last anomaly.
    pub end_ms: i64,
    /// Affected resources, sorted.
    pub resources: Vec<String>,
    /// The anomalies, in event-time order.
    pub anomalies: Vec<Observation>,
    /// Candidates, best first; empty means "unable to determine".
    pub root_causes: Vec<RootCause>,
}

impl Incident {
    /// The best candidate, if any.
    pub fn root_cause(&self) -> Option<&RootCause> {
        self.root_causes.first()
    }
}

/// Remediations for a resource of `kind` whose anomalous metrics are `metrics`, best first.
/// The kind decides what can be done; the metrics decide the order (memory pressure first
/// asks for memory, saturation for capacity, a cache miss storm for a cache flush).
pub fn recommended_actions(kind: &str, metrics: &[&str]) -> Vec<String> {
    let base: &[&str] = match kind {
        "database" | "db" => &["failover_database", "restart_service", "scale_up"],
        "application" | "service" | "app" => &[
            "restart_service",
            "rollback_deploy",
            "scale_up",
            "increase_memory",
        ],
        "cache" => &["clear_cache", "restart_service", "scale_up"],
        "vm" | "host" | "container" | "pod" => &["restart_service", "increase_memory", "scale_up"],
        _ => &[],
    };
    let hint = |m: &str| -> Option<&'static str> {
        if m.contains("memory") {
            Some("increase_memory")
        } else if m.contains("cache") {
            Some("clear_cache")
        } else if m.contains("cpu") || m.contains("latency") || m.contains("request") {
            Some("scale_up")
        } else if m.contains("error") {
            Some("rollback_deploy")
        } else {
            None
        }
    };
    let mut out: Vec<String> = Vec::new();
    for m in metrics {
        if let Some(h) = hint(m)
            && base.contains(&h)
            && !out.iter().any(|a| a == h)
        {
            out.push(h.to_string());
        }
    }
    for b in base {
        if !out.iter().any(|a| a == b) {
            out.push(b.to_string());
        }
    }
    out
}

/// Correlates `anomalies` into incidents and ranks their root causes.
pub fn analyse(
    topology: &Topology,
    anomalies: &[Observation],
    config: &RcaConfig,
) -> Vec<Incident> {
    let mut sorted: Vec<&Observation> = anomalies.iter().collect();
    sorted
        .sort_by(|a, b| (a.ts_ms, &a.resource, &a.metric).cmp(&(b.ts_ms, &b.resource, &b.metric)));
    let mut incidents = Vec::new();
    let mut start = 0;
    while start < sorted.len() {
        let open = sorted[start].ts_ms;
        let end = sorted[start..]
            .iter()
            .position(|o| o.ts_ms > open + config.window_ms)
            .map_or(sorted.len(), |p| start + p);
        incidents.extend(window(topology, &sorted[start..end], config));
        start = end;
    }
    incidents
}

/// [`analyse`] on a stream: only the correlation windows that closed before `watermark_ms`
/// (opened at least `window_ms` earlier, so no later anomaly can join them). Returns their
/// incidents and where the first open window starts (the time to read from next time);
/// with every window closed, just after the last one.
pub fn analyse_closed(
    topology: &Topology,
    anomalies: &[Observation],
    config: &RcaConfig,
    watermark_ms: i64,
) -> (Vec<Incident>, Option<i64>) {
    let mut sorted: Vec<&Observation> = anomalies.iter().collect();
    sorted
        .sort_by(|a, b| (a.ts_ms, &a.resource, &a.metric).cmp(&(b.ts_ms, &b.resource, &b.metric)));
    let mut incidents = Vec::new();
    let mut start = 0;
    let mut resume = None;
    while start < sorted.len() {
        let open = sorted[start].ts_ms;
        if open.saturating_add(config.window_ms) >= watermark_ms {
            return (incidents, Some(open));
        }
        let end = sorted[start..]
            .iter()
            .position(|o| o.ts_ms > open + config.window_ms)
            .map_or(sorted.len(), |p| start + p);
        incidents.extend(window(topology, &sorted[start..end], config));
        resume = Some(open + config.window_ms + 1);
        start = end;
    }
    (incidents, resume)
}

/// The incident of a known symptom: only anomalies on `symptom` or on resources that can
/// reach it within `max_hops` are correlated (anything else cannot explain it), and the
/// incident that holds `symptom` is returned, `None` when the symptom shows no anomaly.
pub fn explain(
    topology: &Topology,
    anomalies: &[Observation],
    symptom: &str,
    config: &RcaConfig,
) -> Option<Incident> {
    let ancestors: BTreeSet<String> = topology
        .upstream(symptom, config.max_hops)
        .into_iter()
        .collect();
    let relevant: Vec<Observation> = anomalies
        .iter()
        .filter(|o| o.resource == symptom || ancestors.contains(&o.resource))
        .cloned()
        .collect();
    analyse(topology, &relevant, config)
        .into_iter()
        .find(|i| i.resources.iter().any(|r| r == symptom))
}

/// The incidents of one correlation window.
fn window(topology: &Topology, obs: &[&Observation], config: &RcaConfig) -> Vec<Incident> {
    let resources: BTreeSet<&str> = obs.iter().map(|o| o.resource.as_str()).collect();
    let ids: Vec<&str> = resources.into_iter().collect();
    // Union-find over the window's resources by dependency linkage.
    let mut parent: Vec<usize> = (0..ids.len()).collect();
    fn find(p: &mut [usize], i: usize) -> usize {
        let mut r = i;
        while p[r] != r {
            r = p[r];
        }
        let mut i = i;
        while p[i] != r {
            let next = p[i];
            p[i] = r;
            i = next;
        }
        r
    }
    let position: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for (i, id) in ids.iter().enumerate() {
        for (down, _, _) in topology.downstream(id, config.max_hops) {
            if let Some(&j) = position.get(down.as_str()) {
                let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                parent[a] = b;
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for i in 0..ids.len() {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().push(ids[i]);
    }
    let mut incidents: Vec<Incident> = groups
        .into_values()
        .map(|members| {
            let set: BTreeSet<&str> = members.iter().copied().collect();
            let anomalies: Vec<Observation> = obs
                .iter()
                .filter(|o| set.contains(o.resource.as_str()))
                .map(|o| (*o).clone())
                .collect();
            let root_causes = rank(topology, &members, &anomalies, config);
            Incident {
                start_ms: anomalies.first().map_or(0, |o| o.ts_ms),
                end_ms: anomalies.last().map_or(0, |o| o.ts_ms),
                resources: members.iter().map(|s| s.to_string()).collect(),
                anomalies,
                root_causes,
            }
        })
        .collect();
    incidents.sort_by(|a, b| (a.start_ms, &a.resources).cmp(&(b.start_ms, &b.resources)));
    incidents
}

fn rank(
    topology: &Topology,
    members: &[&str],
    anomalies: &[Observation],
    config: &RcaConfig,
) -> Vec<RootCause> {
    let known: Vec<&str> = members
        .iter()
        .copied()
        .filter(|m| topology.resource(m).is_some())
        .collect();
    if known.is_empty() {
        return Vec::new();
    }
    let mut first: HashMap<&str, i64> = HashMap::new();
    let mut strongest: HashMap<&str, f64> = HashMap::new();
    let mut metrics: HashMap<&str, Vec<&str>> = HashMap::new();
    for o in anomalies {
        let r = o.resource.as_str();
        first
            .entry(r)
            .and_modify(|t| *t = (*t).min(o.ts_ms))
            .or_insert(o.ts_ms);
        let s = strongest.entry(r).or_insert(0.0);
        *s = s.max(o.confidence);
        let ms = metrics.entry(r).or_default();
        if !ms.contains(&o.metric.as_str()) {
            ms.push(o.metric.as_str());
        }
    }
    let t_min = known
        .iter()
        .filter_map(|r| first.get(r))
        .min()
        .copied()
        .unwrap_or(0);
    let t_max = known
        .iter()
        .filter_map(|r| first.get(r))
        .max()
        .copied()
        .unwrap_or(0);
    let s_max = known
        .iter()
        .filter_map(|r| strongest.get(r))
        .fold(0.0f64, |a, &b| a.max(b));
    let affected: BTreeSet<&str> = known.iter().copied().collect();
    let mut candidates: BTreeSet<String> = affected.iter().map(|s| s.to_string()).collect();
    for r in &known {
        candidates.extend(topology.upstream(r, config.max_hops));
    }
    let mut scored = Vec::new();
    for c in candidates {
        let mut paths = Vec::new();
        let mut covered = 0usize;
        if affected.contains(c.as_str()) {
            covered += 1;
            paths.push(vec![c.clone()]);
        }
        for (down, _, path) in topology.downstream(&c, config.max_hops) {
            if affected.contains(down.as_str()) {
                covered += 1;
                paths.push(path);
            }
        }
        let impact = covered as f64 / affected.len() as f64;
        if impact < config.min_coverage {
            continue;
        }
        let seen = first.get(c.as_str()).copied();
        let anomalous = seen.is_some();
        let precedence = match seen {
            None => 0.0,
            Some(_) if t_max == t_min => 1.0,
            Some(t) => (t_max - t) as f64 / (t_max - t_min) as f64,
        };
        let strength = match strongest.get(c.as_str()) {
            Some(&s) if s_max > 0.0 => s / s_max,
            _ => 0.0,
        };
        let e =
            0.4 * impact + 0.3 * precedence + 0.2 * strength + if anomalous { 0.1 } else { 0.0 };
        let kind = topology
            .resource(&c)
            .map(|r| r.kind.clone())
            .unwrap_or_default();
        let recommended =
            recommended_actions(&kind, metrics.get(c.as_str()).map_or(&[][..], |v| v));
        scored.push(RootCause {
            resource: c,
            kind,
            confidence: 0.0,
            evidence_score: e,
            evidence: Evidence {
                impact,
                precedence,
                strength,
                anomalous,
                first_seen_ms: seen,
                paths,
            },
            recommended_actions: recommended,
        });
    }
    let total: f64 = scored.iter().map(|r| r.evidence_score.powi(4)).sum();
    for r in &mut scored {
        let share = if total > 0.0 {
            r.evidence_score.powi(4) / total
        } else {
            0.0
        };
        r.confidence = r.evidence_score * share;
    }
    scored.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then_with(|| a.resource.cmp(&b.resource))
    });
    scored
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Resource;

    fn topo(resources: &[(&str, &str)], edges: &[(&str, &str)]) -> Topology {
        Topology::from_parts(
            resources
                .iter()
                .map(|(id, kind)| Resource {
                    id: id.to_string(),
                    kind: kind.to_string(),
                    service: None,
                })
                .collect(),
            edges.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
        .unwrap()
    }

    fn obs(resource: &str, metric: &str, s: i64, confidence: f64) -> Observation {
        Observation {
            resource: resource.into(),
            metric: metric.into(),
            ts_ms: 1_700_000_000_000 + s * 1000,
            confidence,
            severity: Severity::High,
        }
    }

    /// vm → db → app1..app4, a shared network upstream of everything, a cache beside.
    fn fleet() -> Topology {
        topo(
            &[
                ("net", "network"),
                ("vm", "vm"),
                ("db", "database"),
                ("app1", "application"),
                ("app2", "application"),
                ("app3", "application"),
                ("app4", "application"),
                ("cache", "cache"),
            ],
            &[
                ("net", "*"),
                ("vm", "db"),
                ("db", "app1"),
                ("db", "app2"),
                ("db", "app3"),
                ("db", "app4"),
                ("cache", "app4"),
            ],
        )
    }

    #[test]
    fn database_fault_fanning_out_to_applications() {
        let t = fleet();
        let a = vec![
            obs("db", "db_connections", 0, 0.9),
            obs("app1", "response_time_ms", 30, 0.6),
            obs("app2", "response_time_ms", 40, 0.5),
            obs("app3", "error_rate", 45, 0.7),
        ];
        let incidents = analyse(&t, &a, &RcaConfig::default());
        assert_eq!(incidents.len(), 1);
        let rc = incidents[0].root_cause().unwrap();
        assert_eq!(rc.resource, "db");
        assert!(rc.confidence >= 0.8, "{rc:?}");
        assert!((rc.evidence_score - 1.0).abs() < 1e-12);
        assert_eq!(rc.recommended_actions[0], "failover_database");
        assert_eq!(rc.evidence.paths.len(), 4);
        // The silent VM and network reach everything too but show nothing: ranked below.
        let others: Vec<&str> = incidents[0].root_causes[1..]
            .iter()
            .map(|r| r.resource.as_str())
            .collect();
        assert!(
            others.contains(&"vm") && others.contains(&"net"),
            "{others:?}"
        );
        assert!(incidents[0].root_causes[1].confidence < 0.1);
    }

    #[test]
    fn network_fault() {
        let t = fleet();
        let a = vec![
            obs("net", "network_in_mb", 0, 0.8),
            obs("cache", "cache_hit_rate", 10, 0.6),
            obs("app1", "response_time_ms", 12, 0.6),
            obs("app4", "response_time_ms", 15, 0.6),
        ];
        let incidents = analyse(&t, &a, &RcaConfig::default());
        assert_eq!(incidents.len(), 1);
        let rc = incidents[0].root_cause().unwrap();
        assert_eq!(rc.resource, "net");
        assert!(rc.confidence >= 0.8, "{rc:?}");
        // No remediation is defined for a network: the decision escalates.
        assert!(rc.recommended_actions.is_empty());
    }

    #[test]
    fn two_simultaneous_faults_are_two_incidents() {
        let t = topo(
            &[
                ("db1", "database"),
                ("db2", "database"),
                ("a", "application"),
                ("b", "application"),
                ("c", "application"),
                ("d", "application"),
            ],
            &[("db1", "a"), ("db1", "b"), ("db2", "c"), ("db2", "d")],
        );
        let a = vec![
            obs("db1", "cpu_percent", 0, 0.9),
            obs("db2", "memory_percent", 5, 0.9),
            obs("a", "response_time_ms", 20, 0.5),
            obs("c", "response_time_ms", 25, 0.5),
            obs("b", "response_time_ms", 30, 0.5),
            obs("d", "response_time_ms", 35, 0.5),
        ];
        let incidents = analyse(&t, &a, &RcaConfig::default());
        let causes: Vec<&str> = incidents
            .iter()
            .map(|i| i.root_cause().unwrap().resource.as_str())
            .collect();
        assert_eq!(causes, ["db1", "db2"]);
        assert!(
            incidents
                .iter()
                .all(|i| i.root_cause().unwrap().confidence >= 0.8)
        );
        assert_eq!(incidents[1].resources, ["c", "d", "db2"]);
    }

    #[test]
    fn a_silent_middle_node_does_not_break_the_chain() {
        let t = topo(
            &[
                ("disk", "disk"),
                ("db", "database"),
                ("api", "application"),
                ("web", "application"),
            ],
            &[("disk", "db"), ("db", "api"), ("api", "web")],
        );
        // db and web are anomalous, api (between them) shows nothing.
        let a = vec![
            obs("db", "disk_io_write_mb", 0, 0.9),
            obs("web", "response_time_ms", 20, 0.7),
        ];
        let incidents = analyse(&t, &a, &RcaConfig::default());
        assert_eq!(incidents.len(), 1, "linked through the silent api");
        let rc = incidents[0].root_cause().unwrap();
        assert_eq!(rc.resource, "db");
        assert_eq!(rc.evidence.paths[1], ["db", "api", "web"]);
    }

    #[test]
    fn explaining_a_symptom_ignores_what_cannot_reach_it() {
        let t = fleet();
        // The cache (upstream of app4 only) misbehaves too; app1's symptom is the db's.
        let a = vec![
            obs("cache", "cache_hit_rate", 0, 0.9),
            obs("db", "db_connections", 5, 0.8),
            obs("app1", "response_time_ms", 20, 0.6),
            obs("app4", "response_time_ms", 25, 0.6),
        ];
        let i = explain(&t, &a, "app1", &RcaConfig::default()).unwrap();
        assert_eq!(i.resources, ["app1", "db"]);
        assert_eq!(i.root_cause().unwrap().resource, "db");
        assert!(
            explain(&t, &a, "app2", &RcaConfig::default()).is_none(),
            "app2 shows nothing"
        );
    }

    #[test]
    fn unknown_resources_and_windows() {
        let t = fleet();
        let a = vec![obs("ghost", "cpu_percent", 0, 0.9)];
        let incidents = analyse(&t, &a, &RcaConfig::default());
        assert_eq!(incidents.len(), 1);
        assert!(incidents[0].root_cause().is_none(), "unable to determine");
        // Anomalies 10 minutes apart fall in different windows.
        let a = vec![
            obs("db", "cpu_percent", 0, 0.9),
            obs("app1", "cpu_percent", 600, 0.9),
        ];
        assert_eq!(analyse(&t, &a, &RcaConfig::default()).len(), 2);
    }

    #[test]
    fn closed_windows_match_the_batch_analysis() {
        let topology = Topology::from_parts(
            ["db", "app"]
                .iter()
                .map(|id| Resource {
                    id: id.to_string(),
                    kind: if *id == "db" {
                        "database"
                    } else {
                        "application"
                    }
                    .into(),
                    service: None,
                })
                .collect(),
            [("db".to_string(), "app".to_string())],
        )
        .unwrap();
        let obs = |r: &str, t: i64| Observation {
            resource: r.into(),
            metric: "latency_ms".into(),
            ts_ms: t,
            confidence: 0.9,
            severity: Severity::High,
        };
        let config = RcaConfig::default();
        let w = config.window_ms;
        let all = vec![
            obs("db", 0),
            obs("app", 60_000),
            obs("app", w + 10_000),
            obs("db", 3 * w),
            obs("app", 3 * w + 1),
        ];
        let batch = analyse(&topology, &all, &config);
        // Fed as a stream: each call reads from where the last one stopped.
        let mut got = Vec::new();
        let mut from = i64::MIN;
        for watermark in [w, w + 20_000, 2 * w + 10_001, 3 * w + 2, 10 * w] {
            let seen: Vec<Observation> = all
                .iter()
                .filter(|o| o.ts_ms >= from && o.ts_ms <= watermark)
                .cloned()
                .collect();
            let (closed, next) = analyse_closed(&topology, &seen, &config, watermark);
            got.extend(closed);
            if let Some(n) = next {
                from = n;
            }
        }
        assert_eq!(got, batch);
    }

    #[test]
    fn actions_follow_kind_then_metrics() {
        assert_eq!(
            recommended_actions("application", &["memory_percent"]),
            [
                "increase_memory",
                "restart_service",
                "rollback_deploy",
                "scale_up"
            ]
        );
        assert_eq!(recommended_actions("cache", &[])[0], "clear_cache");
        assert!(recommended_actions("network", &["cpu_percent"]).is_empty());
    }
}
