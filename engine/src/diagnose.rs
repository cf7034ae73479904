//! `healer diagnose`: anomalies of an incident log become incidents with a ranked root
//! cause and a recorded decision, written back to the log.
//!
//! Reads `<log>/anomalies`, correlates and ranks with [`healer_operators::rca`] over a
//! topology file, decides with [`healer_operators::decision`] at each incident's event time
//! (so a replay decides as the live job would have), and writes
//! `<log>/incidents/date=YYYY-MM-DD/part-<digest>.parquet` (schema `incident/v1`, one atomic
//! put per date; the digest of the incident ids names the file, so re-running rewrites the
//! same files).
//!
//! Rule 4 (a recent change) consults Bedrock through [`crate::llm`] when a client is given;
//! without one the consult fails and the incident escalates: the engine never proceeds on a
//! consult it could not make.
//!
//! The change feed is CSV with a header: `resource,ts,kind,description`, `ts` in RFC 3339 or
//! epoch milliseconds; or parquet (a file or a folder of them) with the same columns, `ts` a
//! timestamp or epoch milliseconds, `description` optional.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType};
use healer_operators::decision::{Change, Decision, Outcome, Policy, Step, begin, conclude};
use healer_operators::id::StableHasher;
use healer_operators::rca::{Incident, Observation, RcaConfig, analyse};
use healer_operators::schema::ts_type;
use healer_operators::severity::Severity;
use healer_operators::topology::Topology;

use crate::llm::BedrockConsultant;
use crate::store::Location;

/// Name of the incident schema, in the parquet metadata `healer.schema`.
pub const INCIDENT_SCHEMA: &str = "incident/v1";

/// The `incident/v1` schema.
pub fn incident_schema() -> SchemaRef {
    let ts = || ts_type();
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Arc::new(
        Schema::new(vec![
            s("id", false),
            Field::new("start", ts(), false),
            Field::new("end", ts(), false),
            s("resources", false),
            Field::new("anomalies", DataType::Int64, false),
            s("root_cause", true),
            s("root_cause_type", true),
            Field::new("confidence", DataType::Float64, true),
            s("ranked", false),
            s("evidence", true),
            s("recommended_actions", false),
            s("decision", false),
            s("action", true),
            s("blast_radius", true),
            s("reasons", false),
            Field::new("detected_at", ts(), false),
            Field::new("diagnosed_at", ts(), false),
            Field::new("decided_at", ts(), false),
        ])
        .with_metadata([("healer.schema".to_string(), INCIDENT_SCHEMA.to_string())].into()),
    )
}

/// Parses a change feed (see the [module docs](self)).
pub fn parse_changes(file: &str, text: &str) -> Result<Vec<Change>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let header = lines.next().map(|(_, l)| l.trim().to_string());
    if header.as_deref() != Some("resource,ts,kind,description") {
        return Err(format!(
            "{file}:1: expected the header `resource,ts,kind,description`"
        ));
    }
    lines
        .map(|(i, line)| {
            let mut f = line.splitn(4, ',');
            let (Some(resource), Some(ts), Some(kind)) = (f.next(), f.next(), f.next()) else {
                return Err(format!("{file}:{}: expected 4 fields", i + 1));
            };
            let ts = ts.trim();
            let ts_ms = ts
                .parse::<i64>()
                .ok()
                .or_else(|| {
                    chrono::DateTime::parse_from_rfc3339(ts)
                        .ok()
                        .map(|d| d.timestamp_millis())
                })
                .ok_or_else(|| format!("{file}:{}: `{ts}` is not a time", i + 1))?;
            Ok(Change {
                resource: resource.trim().to_string(),
                ts_ms,
                kind: kind.trim().to_string(),
                description: f.next().unwrap_or("").trim().to_string(),
            })
        })
        .collect()
}

/// Reads a change feed: CSV (`.csv`) or parquet (any other file, or a folder).
pub async fn read_changes(path: &std::path::Path) -> Result<Vec<Change>, String> {
    let shown = path.display().to_string();
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        return parse_changes(&shown, &text);
    }
    let batches = crate::query::query_parquet(&shown, "changes", "SELECT * FROM changes").await?;
    let mut out = Vec::new();
    for b in batches {
        let schema = b.schema();
        let column = |name: &str| -> Result<arrow::array::ArrayRef, String> {
            let i = schema
                .index_of(name)
                .map_err(|_| format!("{shown}: the change feed has no `{name}` column"))?;
            Ok(Arc::clone(b.column(i)))
        };
        let text = |name: &str| -> Result<arrow::array::ArrayRef, String> {
            arrow::compute::cast(&column(name)?, &DataType::Utf8).map_err(|e| e.to_string())
        };
        let (res, kind) = (text("resource")?, text("kind")?);
        let desc = match schema.index_of("description") {
            Ok(_) => Some(text("description")?),
            Err(_) => None,
        };
        let ts = column("ts")?;
        let ts = match ts.data_type() {
            DataType::Timestamp(..) => arrow::compute::cast(&ts, &ts_type()),
            _ => arrow::compute::cast(&ts, &DataType::Int64)
                .and_then(|t| arrow::compute::cast(&t, &ts_type())),
        }
        .map_err(|e| format!("{shown}: `ts`: {e}"))?;
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        let (res, kind) = (res.as_string::<i32>(), kind.as_string::<i32>());
        for i in 0..b.num_rows() {
            if res.is_null(i) || ts.is_null(i) {
                return Err(format!(
                    "{shown}: row {} has no resource or time",
                    out.len() + 1
                ));
            }
            out.push(Change {
                resource: res.value(i).to_string(),
                ts_ms: ts.value(i),
                kind: if kind.is_null(i) {
                    String::new()
                } else {
                    kind.value(i).to_string()
                },
                description: desc
                    .as_ref()
                    .map(|d| d.as_string::<i32>())
                    .filter(|d| !d.is_null(i))
                    .map_or(String::new(), |d| d.value(i).to_string()),
            });
        }
    }
    Ok(out)
}

/// Reads the anomalies of the log at `log`, in event-time order.
pub async fn read_anomalies(log: &Location) -> Result<Vec<Observation>, String> {
    read_anomalies_since(log, None).await
}

/// Reads the anomalies of the log at `log` at or after `since_ms` (all with `None`), in
/// event-time order.
pub async fn read_anomalies_since(
    log: &Location,
    since_ms: Option<i64>,
) -> Result<Vec<Observation>, String> {
    let filter = since_ms.map_or(String::new(), |t| {
        format!("WHERE CAST(ts AS BIGINT) >= {t}")
    });
    let batches = crate::query::query(
        log,
        &format!(
            "SELECT resource, metric, ts, confidence, severity FROM anomalies {filter} ORDER BY ts, resource, metric"
        ),
    )
    .await
    .map_err(|e| format!("cannot read the anomalies of {}: {e}", log.display()))?;
    let mut out = Vec::new();
    for b in batches {
        let text = |i: usize| arrow::compute::cast(b.column(i), &DataType::Utf8);
        let (res, met, sev) = (text(0), text(1), text(4));
        let (res, met, sev) = (
            res.map_err(|e| e.to_string())?,
            met.map_err(|e| e.to_string())?,
            sev.map_err(|e| e.to_string())?,
        );
        let ts = arrow::compute::cast(b.column(2), &ts_type()).map_err(|e| e.to_string())?;
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        let conf =
            arrow::compute::cast(b.column(3), &DataType::Float64).map_err(|e| e.to_string())?;
        let conf = conf.as_primitive::<arrow::datatypes::Float64Type>();
        let (res, met, sev) = (
            res.as_string::<i32>(),
            met.as_string::<i32>(),
            sev.as_string::<i32>(),
        );
        for i in 0..b.num_rows() {
            if res.is_null(i) || ts.is_null(i) {
                continue;
            }
            out.push(Observation {
                resource: res.value(i).to_string(),
                metric: if met.is_null(i) {
                    String::new()
                } else {
                    met.value(i).to_string()
                },
                ts_ms: ts.value(i),
                confidence: if conf.is_null(i) { 0.0 } else { conf.value(i) },
                severity: Severity::parse(if sev.is_null(i) { "" } else { sev.value(i) })
                    .unwrap_or(Severity::Low),
            });
        }
    }
    Ok(out)
}

/// One diagnosed incident and what was decided, with wall-clock timings.
#[derive(Debug, Clone)]
pub struct Diagnosed {
    /// The incident.
    pub incident: Incident,
    /// The decision.
    pub decision: Decision,
    /// Deterministic id: hash of the first anomaly time and the resources.
    pub id: String,
    /// When RCA finished (wall clock, ms).
    pub diagnosed_at_ms: i64,
    /// When the decision was made (wall clock, ms).
    pub decided_at_ms: i64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Diagnoses and decides every incident of `anomalies`, consulting `llm` under rule 4 (no
/// client: the consult fails, which escalates). With `verify`, a decision to act (auto-heal
/// or request approval) is first checked by `llm`: a root cause it does not find plausible
/// at `policy.min_confidence` or more, or any failure of the check, escalates.
pub async fn run(
    topology: &Topology,
    anomalies: &[Observation],
    changes: &[Change],
    config: &RcaConfig,
    policy: &Policy,
    llm: Option<&BedrockConsultant>,
    verify: bool,
) -> Vec<Diagnosed> {
    let incidents = analyse(topology, anomalies, config);
    decide_incidents(incidents, topology, changes, policy, llm, verify).await
}

/// Decides about `incidents` as [`run`] does.
pub async fn decide_incidents(
    incidents: Vec<Incident>,
    topology: &Topology,
    changes: &[Change],
    policy: &Policy,
    llm: Option<&BedrockConsultant>,
    verify: bool,
) -> Vec<Diagnosed> {
    let diagnosed_at = now_ms();
    let mut out = Vec::with_capacity(incidents.len());
    for incident in incidents {
        let decision = match begin(&incident, topology, changes, incident.end_ms, policy) {
            Step::Done(d) => d,
            Step::Consult { request, pending } => {
                let answer = match llm {
                    Some(client) => client.consult(&request).await,
                    None => Err("no LLM client configured".into()),
                };
                conclude(pending, policy, answer)
            }
        };
        let decision = if verify && decision.outcome != Outcome::Escalate {
            let check = match llm {
                Some(client) => client.verify_root_cause(&incident).await,
                None => Err("no LLM client configured".into()),
            };
            checked(decision, policy, check)
        } else {
            decision
        };
        let mut h = StableHasher::new();
        h.str("incident/v1").i64(incident.start_ms);
        for r in &incident.resources {
            h.str(r);
        }
        out.push(Diagnosed {
            id: h.hex(),
            incident,
            decision,
            diagnosed_at_ms: diagnosed_at,
            decided_at_ms: now_ms(),
        });
    }
    out
}

/// A decision after the LLM's root-cause check: kept only on a plausible answer at
/// `policy.min_confidence` or more.
pub fn checked(
    mut decision: Decision,
    policy: &Policy,
    check: Result<crate::llm::RootCauseCheck, String>,
) -> Decision {
    match check {
        Ok(c) if c.plausible && c.confidence >= policy.min_confidence => {
            decision.reasons.push(format!(
                "LLM check: root cause plausible at {:.2}",
                c.confidence
            ));
        }
        Ok(c) => {
            decision.outcome = Outcome::Escalate;
            decision.reasons.push(format!(
                "LLM check: root cause not confirmed (plausible = {}, confidence {:.2}): {}",
                c.plausible, c.confidence, c.reasoning
            ));
        }
        Err(e) => {
            decision.outcome = Outcome::Escalate;
            decision.reasons.push(format!("LLM check failed: {e}"));
        }
    }
    decision
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The `incident/v1` rows of `diagnosed`.
pub fn to_batch(diagnosed: &[Diagnosed]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let ts = |f: &dyn Fn(&Diagnosed) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from(diagnosed.iter().map(f).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    };
    let text = |f: &dyn Fn(&Diagnosed) -> Option<String>| -> ArrayRef {
        Arc::new(diagnosed.iter().map(f).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        text(&|d| Some(d.id.clone())),
        ts(&|d| d.incident.start_ms),
        ts(&|d| d.incident.end_ms),
        text(&|d| Some(d.incident.resources.join("|"))),
        Arc::new(Int64Array::from(
            diagnosed
                .iter()
                .map(|d| d.incident.anomalies.len() as i64)
                .collect::<Vec<_>>(),
        )),
        text(&|d| d.incident.root_cause().map(|r| r.resource.clone())),
        text(&|d| d.incident.root_cause().map(|r| r.kind.clone())),
        Arc::new(
            diagnosed
                .iter()
                .map(|d| d.incident.root_cause().map(|r| r.confidence))
                .collect::<Float64Array>(),
        ),
        text(&|d| {
            Some(
                d.incident
                    .root_causes
                    .iter()
                    .map(|r| r.resource.as_str())
                    .collect::<Vec<_>>()
                    .join("|"),
            )
        }),
        text(&|d| {
            d.incident.root_cause().map(|r| {
                let paths: Vec<String> = r
                    .evidence
                    .paths
                    .iter()
                    .map(|p| json_str(&p.join(" → ")))
                    .collect();
                format!(
                    "{{\"impact\":{},\"precedence\":{},\"strength\":{},\"anomalous\":{},\"first_seen_ms\":{},\"paths\":[{}]}}",
                    r.evidence.impact,
                    r.evidence.precedence,
                    r.evidence.strength,
                    r.evidence.anomalous,
                    r.evidence.first_seen_ms.map_or("null".into(), |t| t.to_string()),
                    paths.join(",")
                )
            })
        }),
        text(&|d| {
            Some(
                d.incident
                    .root_cause()
                    .map(|r| r.recommended_actions.join("|"))
                    .unwrap_or_default(),
            )
        }),
        text(&|d| Some(d.decision.outcome.as_str().to_string())),
        text(&|d| d.decision.action.clone()),
        text(&|d| {
            d.decision
                .blast_radius
                .map(|b| format!("{b:?}").to_lowercase())
        }),
        text(&|d| {
            Some(format!(
                "[{}]",
                d.decision
                    .reasons
                    .iter()
                    .map(|r| json_str(r))
                    .collect::<Vec<_>>()
                    .join(",")
            ))
        }),
        ts(&|d| d.incident.start_ms),
        ts(&|d| d.diagnosed_at_ms),
        ts(&|d| d.decided_at_ms),
    ];
    RecordBatch::try_new(incident_schema(), columns)
}

/// The ids of the incidents in the log (none when it has no `incidents/` yet).
pub async fn logged_ids(log: &Location) -> Result<std::collections::HashSet<String>, String> {
    let batches = match crate::query::query(log, "SELECT id FROM incidents").await {
        Ok(b) => b,
        Err(e) if e.to_string().contains("not found") => Vec::new(),
        Err(e) => return Err(format!("reading the incidents of {}: {e}", log.display())),
    };
    let mut ids = std::collections::HashSet::new();
    for b in batches {
        let col = arrow::compute::cast(b.column(0), &DataType::Utf8).map_err(|e| e.to_string())?;
        ids.extend(col.as_string::<i32>().iter().flatten().map(String::from));
    }
    Ok(ids)
}

/// Writes the incidents of `diagnosed` the log does not hold yet under `<log>/incidents/`,
/// one file per event date; returns the paths. The log keeps the first decision recorded
/// for an incident: running diagnose again adds new incidents and never duplicates one.
pub async fn write(log: &Location, diagnosed: &[Diagnosed]) -> Result<Vec<String>, String> {
    let logged = logged_ids(log).await?;
    let mut by_date: std::collections::BTreeMap<String, Vec<Diagnosed>> = Default::default();
    for d in diagnosed.iter().filter(|d| !logged.contains(&d.id)) {
        by_date
            .entry(crate::sink::date_of(d.incident.start_ms))
            .or_default()
            .push(d.clone());
    }
    let mut paths = Vec::new();
    for (date, group) in by_date {
        let batch = to_batch(&group).map_err(|e| e.to_string())?;
        let digest = crate::sink::digest_of_ids(&batch);
        let relative = format!("incidents/date={date}/part-{digest}.parquet");
        let written = crate::sink::put(log, &relative, &batch)
            .await
            .map_err(|e| e.to_string())?;
        paths.push(written.path);
    }
    Ok(paths)
}
