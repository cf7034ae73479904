//! `healer eval rca`: healer's detection and root-cause ranking on the PetShop data set.
//!
//! For every issue (`dataset/<scenario>/{train,test}/issue_N/`):
//!
//! * **Topology** from the scenario's `graph.csv`: row A, column B = 1 means A calls B, so a
//!   fault of B shows up on A: healer's edge is `B → A`.
//! * **Detection**: for each node, the issue's series of the target metric and statistic
//!   (e.g. latency/Average) over the alert's row and the next two, compared with the node's
//!   normal behaviour in the scenario's issue-free data (`noissue/`; scenarios without one
//!   use the issue-free data of every scenario that has it): a row's score is its harmful
//!   change (latency up, availability down) since the row before the alert, over the robust
//!   scale of same-lag changes in the normal data, counted only when the row is also beyond
//!   the normal median. Two consecutive rows above 5 make the node anomalous (see [`rank`]).
//! * **RCA** over the call graph, as the published traversal does but ranked by what each
//!   root explains: from the symptom, follow calls into anomalous services; the deepest
//!   ones are the candidates, ranked by how many of the anomalous services and the symptom
//!   they reach back, then by strength. Nothing anomalous below a quiet symptom: nothing is
//!   named.
//!
//! Scores: top-1 and top-3 recall of the labelled root cause (issues without a label are
//! predicted and written, not scored), per scenario (the two temporal ones together, as the
//! published baseline does) and target metric; specificity = share of issue-free windows (5
//! consecutive rows of `noissue/` shaped like an issue, the alert in the second row, judged
//! against the rest of `noissue/`; the symptom node and metric of the scenario's issues)
//! for which healer names no root cause.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use healer_operators::topology::{Resource, Topology};
use serde::Deserialize;

/// Robust score above which a row is anomalous.
pub const THRESHOLD: f64 = 5.0;

/// A PetShop metrics file: per (node, metric, statistic) column, its values by row.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Row timestamps (unix seconds).
    pub ts: Vec<f64>,
    /// (node, metric, statistic) → values (NaN = missing).
    pub series: HashMap<(String, String, String), Vec<f64>>,
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a metrics file (4 header rows: node, metric, statistic, `unix_timestamp`).
pub fn parse_metrics(file: &str, text: &str) -> Result<Metrics, String> {
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
    if rows.len() < 4 {
        return Err(format!("{file}: fewer than 4 header rows"));
    }
    let width = rows[0].len();
    let mut columns: Vec<(String, String, String)> = Vec::with_capacity(width);
    for c in 1..width {
        let cell = |r: usize| rows[r].get(c).copied().unwrap_or("").to_string();
        columns.push((cell(0), cell(1), cell(2)));
    }
    let mut m = Metrics::default();
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); columns.len()];
    for (i, row) in rows.iter().enumerate().skip(4) {
        if row.len() == 1 && row[0].is_empty() {
            continue;
        }
        let ts = row[0]
            .parse::<f64>()
            .map_err(|_| format!("{file}:{}: `{}` is not a timestamp", i + 1, row[0]))?;
        m.ts.push(ts);
        for (c, v) in values.iter_mut().enumerate() {
            let cell = row.get(c + 1).copied().unwrap_or("").trim();
            v.push(if cell.is_empty() {
                f64::NAN
            } else {
                cell.parse::<f64>().map_err(|_| {
                    format!(
                        "{file}:{}: column {}: `{cell}` is not a number",
                        i + 1,
                        c + 2
                    )
                })?
            });
        }
    }
    for (key, v) in columns.into_iter().zip(values) {
        m.series.insert(key, v);
    }
    Ok(m)
}

/// The call graph of `graph.csv` as a fault-propagation topology (callee → caller).
pub fn parse_graph(file: &str, text: &str) -> Result<Topology, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{file}: empty"))?
        .split(',')
        .skip(1)
        .collect();
    let mut nodes: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    let mut edges = Vec::new();
    for (i, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        let caller = cells[0].to_string();
        if !nodes.contains(&caller) {
            nodes.push(caller.clone());
        }
        for (j, v) in cells.iter().skip(1).enumerate() {
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("{file}:{}: `{v}` is not a number", i + 2))?;
            if v != 0.0 && header[j] != caller {
                edges.push((header[j].to_string(), caller.clone()));
            }
        }
    }
    let resources = nodes
        .into_iter()
        .map(|id| Resource {
            id,
            kind: "service".into(),
            service: None,
        })
        .collect();
    Topology::from_parts(resources, edges)
}

/// Median and robust scale of the finite values: the larger of 1.4826 · MAD and 1.2533 · the
/// mean absolute deviation (both estimate σ for normal data; the second stands in when a
/// series is mostly constant and its MAD is tiny or 0), floored at 1e-9 · max(1, |median|).
fn robust(values: &[f64]) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.len() < 3 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    let mut dev: Vec<f64> = v.iter().map(|x| (x - median).abs()).collect();
    dev.sort_by(f64::total_cmp);
    let mad = dev[dev.len() / 2] * 1.4826;
    let mean_abs = 1.2533 * dev.iter().sum::<f64>() / dev.len() as f64;
    Some((median, mad.max(mean_abs).max(1e-9 * median.abs().max(1.0))))
}

/// Rows looked at from the last row at or before the target time: that row and the next
/// two (the fault shows in the rows after the alert's time).
pub const WINDOW_ROWS: usize = 3;

/// Consecutive rows above [`THRESHOLD`] that make a node anomalous.
pub const PERSIST: usize = 2;

/// What one issue asks about.
#[derive(Debug, Clone, Deserialize)]
pub struct Target {
    /// Symptom node.
    pub node: String,
    /// `latency` or `availability`.
    pub metric: String,
    /// Statistic (`Average`, `p90`, …).
    pub agg: String,
    /// Unix seconds.
    pub timestamp: f64,
}

#[derive(Debug, Deserialize)]
struct TargetFile {
    target: Target,
    #[serde(default)]
    root_cause: Option<RootCauseLabel>,
}

#[derive(Debug, Deserialize)]
struct RootCauseLabel {
    node: Option<String>,
}

/// The anomaly scores of `x` at rows `r0..=end`, against normal behaviour `normal` (pieces
/// of issue-free series, each contiguous). A row's score is its harmful change since the row
/// before `r0`, over the robust scale of same-lag changes in the normal data; it counts only
/// when the row is also beyond the normal median in the harmful direction. Without a value
/// before `r0`, the row's level against the normal median and scale stands in.
fn scores(
    x: &[f64],
    normal: &[&[f64]],
    r0: usize,
    end: usize,
    harmful_up: bool,
) -> Option<Vec<f64>> {
    let all: Vec<f64> = normal.iter().flat_map(|p| p.iter().copied()).collect();
    let (median, scale) = robust(&all)?;
    let sign = if harmful_up { 1.0 } else { -1.0 };
    let before = r0.checked_sub(1).map(|p| x[p]).filter(|v| v.is_finite());
    let mut out = Vec::with_capacity(end + 1 - r0);
    for (lag, &v) in x[r0..=end].iter().enumerate().map(|(i, v)| (i + 1, v)) {
        if !v.is_finite() {
            out.push(0.0);
            continue;
        }
        let level = sign * (v - median) / scale;
        let score = match before {
            Some(b) => {
                let changes: Vec<f64> = normal
                    .iter()
                    .filter(|p| p.len() > lag)
                    .flat_map(|p| p[lag..].iter().zip(*p).map(|(a, b)| a - b))
                    .collect();
                match robust(&changes) {
                    Some((_, d)) if level > 0.0 => sign * (v - b) / d,
                    Some(_) => 0.0,
                    None => 0.0,
                }
            }
            None => level,
        };
        out.push(score);
    }
    Some(out)
}

/// healer's ranking for the issue of `target` in `metrics`, with issue-free `normal` data.
///
/// 1. **Rows**: `r0`, the last row at or before the target time, and the next
///    [`WINDOW_ROWS`] − 1 rows.
/// 2. **Detection**: a node is anomalous when its scores (harmful change since the row before the alert, over the normal same-lag changes) exceed [`THRESHOLD`] in
///    [`PERSIST`] consecutive rows; its strength is its largest score there.
/// 3. **Candidates**: the symptom and the anomalous nodes it reaches along call edges
///    (caller → callee) through anomalous nodes. Only the symptom, itself not anomalous:
///    nothing is named.
/// 4. **Roots**: candidates none of whose callees is a candidate (the deepest anomalous
///    services the symptom depends on); the symptom when there are none.
/// 5. **Ranking**: by coverage (how many of the anomalous nodes and the symptom a root
///    reaches along callee → caller edges through them: what it explains), then strength,
///    then name.
pub fn rank(
    topology: &Topology,
    metrics: &Metrics,
    normal: &[&Metrics],
    target: &Target,
) -> Vec<String> {
    let Some(r0) = metrics
        .ts
        .iter()
        .rposition(|&t| t <= target.timestamp + 1e-6)
    else {
        return Vec::new();
    };
    let end = (r0 + WINDOW_ROWS - 1).min(metrics.ts.len() - 1);
    let harmful_up = target.metric != "availability";
    let mut anomalous: BTreeMap<String, f64> = BTreeMap::new();
    for ((node, metric, stat), values) in &metrics.series {
        if metric != &target.metric || stat != &target.agg || topology.resource(node).is_none() {
            continue;
        }
        let key = (node.clone(), metric.clone(), stat.clone());
        let pieces: Vec<&[f64]> = normal
            .iter()
            .filter_map(|m| m.series.get(&key).map(Vec::as_slice))
            .collect();
        let Some(s) = scores(values, &pieces, r0, end, harmful_up) else {
            continue;
        };
        let mut run = 0;
        let mut hit = false;
        for &v in &s {
            run = if v > THRESHOLD { run + 1 } else { 0 };
            hit |= run >= PERSIST;
        }
        if hit {
            anomalous.insert(node.clone(), s.iter().copied().fold(f64::MIN, f64::max));
        }
    }
    let symptom = target.node.as_str();
    // Callees are upstream (a callee's fault shows on its callers); callers downstream.
    let callees = |n: &str| topology.upstream(n, 1);
    let callers = |n: &str| -> Vec<String> {
        topology
            .downstream(n, 1)
            .into_iter()
            .map(|(id, _, _)| id)
            .collect()
    };
    let mut candidates: BTreeSet<String> = BTreeSet::from([symptom.to_string()]);
    let mut stack = vec![symptom.to_string()];
    while let Some(n) = stack.pop() {
        for m in callees(&n) {
            if anomalous.contains_key(&m) && candidates.insert(m.clone()) {
                stack.push(m);
            }
        }
    }
    if candidates.len() == 1 && !anomalous.contains_key(symptom) {
        return Vec::new();
    }
    let mut roots: Vec<String> = candidates
        .iter()
        .filter(|n| !callees(n).iter().any(|m| candidates.contains(m)))
        .cloned()
        .collect();
    if roots.is_empty() {
        roots.push(symptom.to_string());
    }
    let coverage = |root: &str| -> usize {
        let mut seen = BTreeSet::from([root.to_string()]);
        let mut stack = vec![root.to_string()];
        while let Some(n) = stack.pop() {
            for m in callers(&n) {
                if (anomalous.contains_key(&m) || m == symptom) && seen.insert(m.clone()) {
                    stack.push(m);
                }
            }
        }
        seen.len() - 1
    };
    let mut keyed: Vec<(usize, f64, String)> = roots
        .into_iter()
        .map(|r| (coverage(&r), anomalous.get(&r).copied().unwrap_or(0.0), r))
        .collect();
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2)));
    keyed.into_iter().map(|(_, _, r)| r).collect()
}

/// One issue's prediction.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Scenario directory name.
    pub scenario: String,
    /// `train` or `test`.
    pub split: String,
    /// `issue_N`.
    pub issue: String,
    /// Target metric.
    pub metric: String,
    /// The labelled root cause, when the data names it.
    pub truth: Option<String>,
    /// healer's candidates, best first.
    pub ranked: Vec<String>,
}

/// Scores of one scenario group and metric.
#[derive(Debug, Clone, Default)]
pub struct Score {
    /// Labelled issues.
    pub labelled: usize,
    /// Issues with an empty ranking.
    pub empty: usize,
    /// Labelled issues whose root cause is ranked first.
    pub top1: usize,
    /// … among the first three.
    pub top3: usize,
    /// Issue-free windows.
    pub windows: usize,
    /// … for which no root cause was named.
    pub quiet_windows: usize,
}

/// Results of a run.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Every issue's prediction.
    pub predictions: Vec<Prediction>,
    /// By (scenario group, metric).
    pub scores: BTreeMap<(String, String), Score>,
}

fn group(scenario: &str) -> String {
    if scenario.starts_with("temporal_traffic") {
        "temporal_traffic".into()
    } else {
        scenario.to_string()
    }
}

/// Evaluates every scenario under `dataset` (the folder holding `low_traffic/`, …).
pub fn evaluate(dataset: &Path) -> Result<Evaluation, String> {
    let mut scenarios: Vec<PathBuf> = std::fs::read_dir(dataset)
        .map_err(|e| format!("{}: {e}", dataset.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("graph.csv").is_file())
        .collect();
    scenarios.sort();
    let mut normals: BTreeMap<String, Metrics> = BTreeMap::new();
    for s in &scenarios {
        let p = s.join("noissue/metrics.csv");
        if p.is_file() {
            let name = s.file_name().unwrap().to_string_lossy().to_string();
            normals.insert(name, parse_metrics(&p.display().to_string(), &read(&p)?)?);
        }
    }
    let mut eval = Evaluation::default();
    for s in &scenarios {
        let name = s.file_name().unwrap().to_string_lossy().to_string();
        let graph = s.join("graph.csv");
        let topology = parse_graph(&graph.display().to_string(), &read(&graph)?)?;
        let normal: Vec<&Metrics> = match normals.get(&name) {
            Some(m) => vec![m],
            None => normals.values().collect(),
        };
        let mut symptoms: Vec<Target> = Vec::new();
        for split in ["train", "test"] {
            let dir = s.join(split);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut issues: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            issues.sort_by_key(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("issue_"))
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(u32::MAX)
            });
            for issue in issues {
                let tf = issue.join("target.json");
                let target: TargetFile = serde_json::from_str(&read(&tf)?)
                    .map_err(|e| format!("{}: {e}", tf.display()))?;
                let mp = issue.join("metrics.csv");
                let metrics = parse_metrics(&mp.display().to_string(), &read(&mp)?)?;
                let ranked = rank(&topology, &metrics, &normal, &target.target);
                let truth = target.root_cause.and_then(|r| r.node);
                let score = eval
                    .scores
                    .entry((group(&name), target.target.metric.clone()))
                    .or_default();
                if ranked.is_empty() {
                    score.empty += 1;
                }
                if let Some(t) = &truth {
                    score.labelled += 1;
                    score.top1 += usize::from(ranked.first() == Some(t));
                    score.top3 += usize::from(ranked.iter().take(3).any(|r| r == t));
                }
                symptoms.push(target.target.clone());
                eval.predictions.push(Prediction {
                    scenario: name.clone(),
                    split: split.into(),
                    issue: issue.file_name().unwrap().to_string_lossy().to_string(),
                    metric: target.target.metric.clone(),
                    truth,
                    ranked,
                });
            }
        }
        // Specificity on the issue-free data, with the scenario's own symptoms.
        if let Some(normal_data) = normals.get(&name) {
            let mut asked: Vec<(String, String, String)> = symptoms
                .iter()
                .map(|t| (t.node.clone(), t.metric.clone(), t.agg.clone()))
                .collect();
            asked.sort();
            asked.dedup();
            for (node, metric, agg) in asked {
                for start in (0..normal_data.ts.len().saturating_sub(4)).step_by(5) {
                    // Shaped like an issue: 5 rows, the alert in the second; the normal
                    // behaviour it is judged against leaves the window out.
                    let slice = |range: std::ops::Range<usize>| Metrics {
                        ts: normal_data.ts[range.clone()].to_vec(),
                        series: normal_data
                            .series
                            .iter()
                            .map(|(k, v)| (k.clone(), v[range.clone()].to_vec()))
                            .collect(),
                    };
                    let window = slice(start..start + 5);
                    let before = slice(0..start);
                    let after = slice(start + 5..normal_data.ts.len());
                    let target = Target {
                        node: node.clone(),
                        metric: metric.clone(),
                        agg: agg.clone(),
                        timestamp: window.ts[1],
                    };
                    let quiet = rank(&topology, &window, &[&before, &after], &target).is_empty();
                    let score = eval
                        .scores
                        .entry((group(&name), metric.clone()))
                        .or_default();
                    score.windows += 1;
                    score.quiet_windows += usize::from(quiet);
                }
            }
        }
    }
    Ok(eval)
}

/// The predictions as CSV: `scenario,split,issue,metric,ranked` (`|`-separated, best first).
pub fn predictions_csv(eval: &Evaluation) -> String {
    let mut out = String::from("scenario,split,issue,metric,ranked\n");
    for p in &eval.predictions {
        out.push_str(&format!(
            "{},{},{},{},{}\n",
            p.scenario,
            p.split,
            p.issue,
            p.metric,
            p.ranked.join("|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_edges_run_from_callee_to_caller() {
        let t = parse_graph("g.csv", ",web,api,db\nweb,0,1,0\napi,0,0,1\ndb,0,0,0\n").unwrap();
        assert_eq!(t.upstream("web", 3), ["api", "db"]);
        assert_eq!(t.downstream_count("db"), 2);
    }

    #[test]
    fn detection_and_ranking_on_a_small_case() {
        let t = parse_graph("g.csv", ",web,api,db\nweb,0,1,0\napi,0,0,1\ndb,0,0,0\n").unwrap();
        let normal_text = "microservice,web,api,db\nmetric,latency,latency,latency\nstatistic,Average,Average,Average\nunix_timestamp,,,\n\
            0,1.0,0.5,0.1\n300,1.1,0.52,0.11\n600,0.9,0.49,0.09\n900,1.0,0.51,0.1\n1200,1.05,0.5,0.1\n\
            1500,0.95,0.5,0.1\n1800,1.0,0.48,0.11\n2100,1.02,0.51,0.1\n";
        let normal = parse_metrics("n.csv", normal_text).unwrap();
        // The alert at 5300: db slows there, api and web follow and stay slow.
        let issue_text = "microservice,web,api,db\nmetric,latency,latency,latency\nstatistic,Average,Average,Average\nunix_timestamp,,,\n\
            5000,1.0,0.5,0.1\n5300,1.0,0.5,0.9\n5600,3.0,1.5,0.9\n5900,3.0,1.5,0.9\n";
        let issue = parse_metrics("i.csv", issue_text).unwrap();
        let target = Target {
            node: "web".into(),
            metric: "latency".into(),
            agg: "Average".into(),
            timestamp: 5400.0,
        };
        let ranked = rank(&t, &issue, &[&normal], &target);
        assert_eq!(ranked, ["db"]);
        // An alert at 5000: within its three rows only db is anomalous for two of them, and
        // web reaches it through no anomalous service: nothing is named.
        let early = Target {
            timestamp: 5000.0,
            ..target.clone()
        };
        assert!(rank(&t, &issue, &[&normal], &early).is_empty());
        // Nothing abnormal: nothing named.
        assert!(
            rank(
                &t,
                &normal,
                &[&normal],
                &Target {
                    timestamp: 300.0,
                    ..target
                }
            )
            .is_empty()
        );
        assert!(parse_metrics("x.csv", "a\nb\n").is_err());
    }
}
