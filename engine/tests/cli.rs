//! The `healer` binary, as a user runs it.

use std::process::Command;

fn healer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_healer"))
}

/// Stdout of a run that must have succeeded (its output in the failure message otherwise).
fn succeeded(run: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

/// A labelled data set of the shared folder beside the repository (or `HEALER_SHARED_DIR`).
fn shared_dataset(name: &str) -> std::path::PathBuf {
    let shared = std::env::var_os("HEALER_SHARED_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let path = shared.join("datasets").join(name);
    assert!(path.is_dir(), "{} is missing", path.display());
    path
}

#[test]
fn demo_then_incidents_then_validate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = healer()
        .args([
            "demo",
            "--out",
            out.to_str().unwrap(),
            "--resources",
            "12",
            "--hours",
            "3",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("replay finished"), "{stdout}");
    assert!(stdout.contains("novelty"), "{stdout}");
    assert!(stdout.contains("injected faults detected"), "{stdout}");
    assert!(stdout.contains("over the fleet's topology"), "{stdout}");

    let q = healer()
        .args([
            "incidents",
            out.join("incidents").to_str().unwrap(),
            "--sql",
            "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM anomalies",
        ])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let table = String::from_utf8_lossy(&q.stdout);
    let row = table.lines().nth(3).unwrap();
    let cells: Vec<&str> = row
        .split('|')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(cells.len(), 2, "{table}");
    assert_eq!(cells[0], cells[1], "ids unique: {table}");
    assert!(cells[0].parse::<u64>().unwrap() > 0);

    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/rules");
    let ok = healer().args(["validate", rules]).output().unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let bad = dir.path().join("pipeline.toml");
    std::fs::write(
        &bad,
        "[source]\nspeed = \"warp\"\n[sink]\nmax_rows_per_file = 0\n",
    )
    .unwrap();
    let v = healer()
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!v.status.success());
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(err.contains("pipeline.toml:2: `source.speed`"), "{err}");
    assert!(
        err.contains("pipeline.toml:4: `sink.max_rows_per_file`"),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");
}

#[test]
fn replay_flags_and_summary_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    assert!(
        healer()
            .args([
                "demo",
                "--out",
                out.to_str().unwrap(),
                "--resources",
                "6",
                "--hours",
                "2"
            ])
            .output()
            .unwrap()
            .status
            .success()
    );
    let summary = dir.path().join("summary.json");
    let run = healer()
        .args([
            "replay",
            "--input",
            out.join("input/fleet.parquet").to_str().unwrap(),
            "--out",
            dir.path().join("log").to_str().unwrap(),
            "--partitions",
            "2",
            "--speed",
            "max",
            "--summary-json",
            summary.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(json["rows"], 6 * 720);
    assert_eq!(json["cells"], 6 * 720 * 16);

    let missing = healer()
        .args(["replay", "--input", "/nonexistent/x.parquet"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("error:"));
}

/// A database spike that reaches two applications a few samples later, replayed, then
/// diagnosed over a topology: one incident, the database as root cause and, its anomaly
/// being CPU, a scale-up decided automatically; with a deploy on the database an hour
/// before, the decision needs the LLM, which is not configured, so it escalates.
#[test]
fn replay_then_diagnose() {
    use std::sync::Arc;

    use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema};

    let dir = tempfile::tempdir().unwrap();
    let (mut ts, mut res, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut state = 9u64;
    for t in 0..600i64 {
        for (k, r) in ["db", "app1", "app2"].iter().enumerate() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = (state >> 11) as f64 / (1u64 << 53) as f64;
            let spike = (k == 0 && t == 400) || (k > 0 && t == 403);
            ts.push(1_735_689_600_000 + t * 10_000);
            res.push(r.to_string());
            cpu.push(40.0 + noise + if spike { 50.0 } else { 0.0 });
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("resource", DataType::Utf8, false),
        Field::new("cpu_percent", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
            Arc::new(StringArray::from(res)),
            Arc::new(Float64Array::from(cpu)),
        ],
    )
    .unwrap();
    let input = dir.path().join("metrics.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&input).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let log = dir.path().join("log");
    // The reference z-score rule, whose anomalies this test counts.
    let zscore = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/rules/zscore.sql");
    let run = healer()
        .args([
            "replay",
            "--quiet",
            "--input",
            input.to_str().unwrap(),
            "--out",
            log.to_str().unwrap(),
            "--rules",
            zscore.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let topology = dir.path().join("topology.toml");
    std::fs::write(
        &topology,
        "[[resource]]\nid = \"db\"\ntype = \"database\"\n\
         [[resource]]\nid = \"app1\"\ntype = \"application\"\n\
         [[resource]]\nid = \"app2\"\ntype = \"application\"\n\
         [[edge]]\nfrom = \"db\"\nto = \"app1\"\n[[edge]]\nfrom = \"db\"\nto = \"app2\"\n",
    )
    .unwrap();
    let diagnose = |extra: &[&std::path::Path]| {
        let mut cmd = healer();
        cmd.arg("diagnose")
            .arg(&log)
            .arg("--topology")
            .arg(&topology);
        for path in extra {
            cmd.arg("--changes").arg(path);
        }
        cmd.output().unwrap()
    };
    let stdout = succeeded(&diagnose(&[]));
    assert!(stdout.contains("3 anomalies, 1 incident(s)"), "{stdout}");

    let q = healer()
        .args([
            "incidents",
            log.to_str().unwrap(),
            "--sql",
            "SELECT root_cause, decision, action, confidence >= 0.8 AS sure, resources FROM incidents",
        ])
        .output()
        .unwrap();
    let table = succeeded(&q);
    assert!(
        table.contains("| db         | auto_heal | scale_up | true | app1|app2|db |"),
        "{table}"
    );

    let changes = dir.path().join("changes.csv");
    std::fs::write(
        &changes,
        "resource,ts,kind,description\ndb,2025-01-01T00:05:00Z,deploy,v2.3.1\n",
    )
    .unwrap();
    let stdout = succeeded(&diagnose(&[&changes]));
    assert!(
        stdout.contains("escalate") && stdout.contains("consult failed: no LLM client configured"),
        "{stdout}"
    );
    // The same feed as parquet (epoch-millisecond times) decides the same.
    let feed_schema = Arc::new(Schema::new(vec![
        Field::new("resource", DataType::Utf8, false),
        Field::new("ts", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, false),
    ]));
    let feed = RecordBatch::try_new(
        Arc::clone(&feed_schema),
        vec![
            Arc::new(StringArray::from(vec!["db"])),
            Arc::new(arrow::array::Int64Array::from(vec![1_735_689_900_000i64])),
            Arc::new(StringArray::from(vec!["deploy"])),
        ],
    )
    .unwrap();
    let parquet_changes = dir.path().join("changes.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&parquet_changes).unwrap(),
        feed_schema,
        None,
    )
    .unwrap();
    w.write(&feed).unwrap();
    w.close().unwrap();
    let stdout = succeeded(&diagnose(&[&parquet_changes]));
    assert!(
        stdout.contains("consult failed: no LLM client configured"),
        "{stdout}"
    );

    // The escalation reaches a Slack webhook (a receiver on 127.0.0.1) with what was tried.
    let receiver = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/services/T/B/X", receiver.local_addr().unwrap());
    let received = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, _) = receiver.accept().unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length || n == 0 {
                    stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .unwrap();
                    return String::from_utf8_lossy(&buf[end + 4..]).to_string();
                }
            }
        }
    });
    let escalate_to = |webhook: &str| {
        healer()
            .arg("diagnose")
            .arg(&log)
            .arg("--topology")
            .arg(&topology)
            .arg("--changes")
            .arg(&changes)
            .args(["--slack-webhook", webhook])
            .output()
            .unwrap()
    };
    let stdout = succeeded(&escalate_to(&url));
    assert!(stdout.contains("escalated incident"), "{stdout}");
    let message: serde_json::Value = serde_json::from_str(&received.join().unwrap()).unwrap();
    assert!(
        message["text"].as_str().unwrap().contains("root cause db"),
        "{message}"
    );
    assert!(
        message.to_string().contains("LLM consult failed"),
        "{message}"
    );

    // An escalation nobody received fails the command.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let run = escalate_to(&dead);
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("not delivered"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // With a remediation config the decision is carried out: the auto-heal scale-up runs as
    // a saga against the database's webhook backend, its steps go to the log, and running
    // diagnose again does not act again (one saga per incident, action and target).
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_url = format!("http://{}/scale", hook.local_addr().unwrap());
    let calls = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, _) = hook.accept().unwrap();
        let mut buf = [0u8; 8192];
        let n = stream.read(&mut buf).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    let remediation = dir.path().join("remediation.toml");
    std::fs::write(
        &remediation,
        format!(
            "mode = \"enforce\"\njournal = \"journal.db\"\nallow = [\"db\"]\n[[targets]]\nmatch = \"db\"\n[targets.webhook]\nurl = \"{hook_url}\"\n"
        ),
    )
    .unwrap();
    let remediate = || {
        healer()
            .arg("diagnose")
            .arg(&log)
            .arg("--topology")
            .arg(&topology)
            .arg("--remediation")
            .arg(&remediation)
            .output()
            .unwrap()
    };
    let stdout = succeeded(&remediate());
    assert!(
        stdout.contains("scale_up_instances on db: succeeded"),
        "{stdout}"
    );
    let request = calls.join().unwrap();
    assert!(request.contains("\"operation\":\"scale_up\""), "{request}");
    let stdout = succeeded(&remediate());
    assert!(
        stdout.contains("scale_up_instances on db: succeeded"),
        "{stdout}"
    );
    let q = healer()
        .args([
            "incidents",
            log.to_str().unwrap(),
            "--sql",
            "SELECT count(DISTINCT saga) AS sagas, count(*) FILTER (WHERE step = 'execute') AS executes, max(saga_state) AS state FROM remediations",
        ])
        .output()
        .unwrap();
    let table = succeeded(&q);
    assert!(
        table.contains("| 1     | 1        | succeeded |"),
        "{table}"
    );

    // Diagnose ran six times over this log: each incident is in it once.
    let q = healer()
        .args([
            "incidents",
            log.to_str().unwrap(),
            "--sql",
            "SELECT count(*) = count(DISTINCT id) AS once, count(*) AS n FROM incidents",
        ])
        .output()
        .unwrap();
    let table = succeeded(&q);
    assert!(table.contains("| true | 1 |"), "{table}");

    // A topology naming an unknown resource is rejected with its location.
    std::fs::write(
        &topology,
        "[[resource]]\nid = \"db\"\ntype = \"database\"\n[[edge]]\nfrom = \"db\"\nto = \"nope\"\n",
    )
    .unwrap();
    let run = diagnose(&[]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("edge 1 (db → nope): unknown resource `nope`"),
        "{err}"
    );
}

/// `healer eval rca` over the shared PetShop data: every issue predicted and written, every
/// scenario group and metric scored next to the baseline.
#[test]
fn eval_rca_on_petshop() {
    let petshop = shared_dataset("petshop");
    let dir = tempfile::tempdir().unwrap();
    let run = healer()
        .args(["eval", "rca", "--dataset"])
        .arg(&petshop)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = succeeded(&run);
    for group in ["low_traffic", "high_traffic", "temporal_traffic"] {
        for metric in ["latency", "availability"] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(group) && l.contains(metric) && l.contains('|')),
                "{group} {metric}:\n{stdout}"
            );
        }
    }
    let csv = std::fs::read_to_string(dir.path().join("predictions.csv")).unwrap();
    let index = std::fs::read_to_string(petshop.join("issues_index.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        index.lines().count(),
        "one row per issue plus the header"
    );
    assert!(csv.starts_with("scenario,split,issue,metric,ranked\n"));
}

/// A NAB-layout folder with one series: a daily-like wave with noise and one spike inside a
/// labelled window.
fn tiny_nab(dir: &std::path::Path) {
    let data = dir.join("data/synthetic");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    let mut csv = String::from("timestamp,value\n");
    let mut state: u64 = 7;
    for i in 0..2000 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5;
        let mut v = 10.0 + (i as f64 / 50.0).sin() + noise;
        if i == 1500 {
            v += 30.0;
        }
        let t = chrono::DateTime::from_timestamp(1_400_000_000 + i * 300, 0).unwrap();
        csv.push_str(&format!("{},{v}\n", t.format("%Y-%m-%d %H:%M:%S")));
    }
    std::fs::write(data.join("spike.csv"), csv).unwrap();
    let at = |i: i64| {
        chrono::DateTime::from_timestamp(1_400_000_000 + i * 300, 0)
            .unwrap()
            .format("%Y-%m-%d %H:%M:%S%.6f")
            .to_string()
    };
    std::fs::write(
        dir.join("labels/combined_windows.json"),
        format!(
            "{{\"synthetic/spike.csv\": [[\"{}\", \"{}\"]]}}",
            at(1450),
            at(1550)
        ),
    )
    .unwrap();
}

#[test]
fn eval_nab_scores_a_detected_window_and_writes_results() {
    let dir = tempfile::tempdir().unwrap();
    tiny_nab(dir.path());
    let out = dir.path().join("results");
    let run = healer()
        .args(["eval", "nab", "--dataset"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .arg("--files")
        .output()
        .unwrap();
    let stdout = succeeded(&run);
    let line = stdout
        .lines()
        .find(|l| l.contains("healer (this run)"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let standard: f64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    // One window, caught at its middle (scaled sigmoid ≈ 0.85), no false positive: the
    // normalised score is (0.85 + 1) / 2 ≈ 92; a miss would be 0.
    assert!(standard > 80.0, "{stdout}");
    // `--files`: the file's window detected, none missed, no detection outside it, and its
    // raw score that sigmoid weight.
    let file = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("synthetic/spike.csv"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let fields: Vec<&str> = file.split_whitespace().collect();
    assert_eq!(fields[1..4], ["1", "0", "0"], "{file}");
    let raw: f64 = fields[4].parse().unwrap();
    assert!(raw > 0.7 && raw < 1.0, "{file}");
    let written = std::fs::read_to_string(out.join("synthetic/spike.csv")).unwrap();
    assert!(written.starts_with("timestamp,value,anomaly_score,label\n"));
    assert_eq!(written.lines().count(), 2001);
    assert_eq!(
        written
            .lines()
            .skip(1)
            .filter(|l| l.ends_with(",1"))
            .count(),
        101,
        "rows 1450..=1550 are labelled"
    );

    // The written results, scored as another detector's: the same score.
    let rescored = succeeded(
        &healer()
            .args(["eval", "nab", "--dataset"])
            .arg(dir.path())
            .arg("--scores")
            .arg(&out)
            .output()
            .unwrap(),
    );
    let again = rescored
        .lines()
        .find(|l| l.contains("scores in"))
        .unwrap_or_else(|| panic!("{rescored}"));
    assert_eq!(
        again.split_whitespace().rev().take(3).collect::<Vec<_>>(),
        line.split_whitespace().rev().take(3).collect::<Vec<_>>(),
        "{rescored}"
    );
    // A result file that does not match its data file is rejected with its path.
    let truncated: String = written
        .lines()
        .take(1000)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(out.join("synthetic/spike.csv"), truncated).unwrap();
    let bad = healer()
        .args(["eval", "nab", "--dataset"])
        .arg(dir.path())
        .arg("--scores")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("spike.csv") && stderr.contains("999 scores for the data file's 2000 rows"),
        "{stderr}"
    );
}

#[test]
fn eval_nab_takes_another_labels_file() {
    let dir = tempfile::tempdir().unwrap();
    tiny_nab(dir.path());
    let at = |i: i64| {
        chrono::DateTime::from_timestamp(1_400_000_000 + i * 300, 0)
            .unwrap()
            .format("%Y-%m-%d %H:%M:%S%.6f")
            .to_string()
    };
    // Two windows instead of the dataset's one: the spike's, and one far from it that
    // nothing flags.
    let labels = dir.path().join("other_windows.json");
    std::fs::write(
        &labels,
        format!(
            "{{\"synthetic/spike.csv\": [[\"{}\", \"{}\"], [\"{}\", \"{}\"]]}}",
            at(1000),
            at(1100),
            at(1450),
            at(1550)
        ),
    )
    .unwrap();
    let eval = |labels: Option<&std::path::Path>| {
        let mut cmd = healer();
        cmd.args(["eval", "nab", "--files", "--dataset"])
            .arg(dir.path());
        if let Some(l) = labels {
            cmd.arg("--labels").arg(l);
        }
        cmd.output().unwrap()
    };
    let own = succeeded(&eval(None));
    assert!(own.contains("1 with labels here (1 windows)"), "{own}");
    let other = succeeded(&eval(Some(&labels)));
    assert!(other.contains("1 with labels here (2 windows)"), "{other}");
    let file = other
        .lines()
        .find(|l| l.trim_start().starts_with("synthetic/spike.csv"))
        .unwrap_or_else(|| panic!("{other}"));
    let fields: Vec<&str> = file.split_whitespace().collect();
    assert_eq!(
        fields[1..3],
        ["1", "1"],
        "one window detected, one missed: {file}"
    );

    // Windows out of order are rejected with the labels file and the series.
    std::fs::write(
        &labels,
        format!(
            "{{\"synthetic/spike.csv\": [[\"{}\", \"{}\"], [\"{}\", \"{}\"]]}}",
            at(1450),
            at(1550),
            at(1000),
            at(1100)
        ),
    )
    .unwrap();
    let unordered = eval(Some(&labels));
    assert!(!unordered.status.success());
    let stderr = String::from_utf8_lossy(&unordered.stderr);
    assert!(
        stderr.contains("other_windows.json")
            && stderr.contains("synthetic/spike.csv: windows must be ascending"),
        "{stderr}"
    );

    // Labels of a series the dataset does not hold are rejected, with the series named:
    // their windows would otherwise drop out of the normalisation unnoticed.
    std::fs::write(
        &labels,
        "{\"synthetic/spike.csv\": [], \"realTweets/Twitter_volume_AAPL.csv\": []}",
    )
    .unwrap();
    let bad = eval(Some(&labels));
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("other_windows.json")
            && stderr.contains("labels for 1 series not under")
            && stderr.contains("realTweets/Twitter_volume_AAPL.csv"),
        "{stderr}"
    );
}

#[test]
fn eval_nab_on_the_shared_corpus() {
    let nab = shared_dataset("nab");
    let run = healer()
        .args(["eval", "nab", "--dataset"])
        .arg(&nab)
        .output()
        .unwrap();
    let stdout = succeeded(&run);
    assert!(
        stdout.contains("35 with labels here (55 windows)"),
        "{stdout}"
    );
    assert!(stdout.contains("ARTime (published)"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("healer (this run)"))
        .unwrap();
    let scores: Vec<f64> = line
        .split_whitespace()
        .skip(3)
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(scores.len(), 3, "{line}");
    // The bundled detector keeps the quality the README reports (standard, low FP, low FN).
    assert!(
        scores[0] >= 71.0 && scores[1] >= 64.0 && scores[2] >= 75.5,
        "{line}"
    );
}

#[test]
fn eval_smd_on_the_shared_machines() {
    let smd = shared_dataset("smd");
    let run = healer()
        .args(["eval", "smd", "--dataset"])
        .arg(&smd)
        .output()
        .unwrap();
    let stdout = succeeded(&run);
    for machine in ["machine-1-2", "machine-1-7", "machine-2-1", "machine-2-2"] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(machine))
            .unwrap_or_else(|| panic!("{machine}:\n{stdout}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        let values: Vec<f64> = f[2..6].iter().map(|v| v.parse().unwrap()).collect();
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)), "{line}");
        // The forest ranks anomalies above chance on every labelled machine.
        assert!(values[2] > 0.6, "AUROC {line}");
        assert!(f[6].contains('/'), "culprits {line}");
    }
    assert!(stdout.contains("TCN AE"), "{stdout}");
    // The default detector keeps the quality the README reports: mean point-wise F1 and
    // culprit hit rate.
    let mean: Vec<&str> = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("mean"))
        .unwrap_or_else(|| panic!("{stdout}"))
        .split_whitespace()
        .collect();
    let f1: f64 = mean[1].parse().unwrap();
    let culprits: f64 = mean[5].parse().unwrap();
    assert!(f1 >= 0.52 && culprits >= 0.89, "{stdout}");
}

/// The fused rule (z-score and LSTM p-values) replayed by 1 and by 2 workers in batches of
/// different sizes: the same anomaly rows. ONNX Runtime's library comes from
/// `HEALER_ONNXRUNTIME` in the first run and from `rules.onnxruntime` in the config of the
/// second; a config naming a missing library is rejected.
#[test]
fn fused_lstm_rule_replays_identically_on_any_worker_count() {
    let lib = std::env::var("HEALER_ONNXRUNTIME").expect(
        "HEALER_ONNXRUNTIME names libonnxruntime.so from the onnxruntime wheel: run the suite \
         with .ci/test, which installs it",
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    succeeded(
        &healer()
            .args(["demo", "--out", demo.to_str().unwrap()])
            .args(["--resources", "4", "--hours", "2", "--faults", "3"])
            .output()
            .unwrap(),
    );
    let config = dir.path().join("pipeline.toml");
    std::fs::write(&config, format!("[rules]\nonnxruntime = {lib:?}\n")).unwrap();
    let mut rows = Vec::new();
    for (partitions, batch) in [("1", "4096"), ("2", "97")] {
        let log = dir.path().join(format!("log-{partitions}"));
        let mut cmd = healer();
        cmd.current_dir(&root)
            .args(["replay", "--input"])
            .arg(demo.join("input/fleet.parquet"))
            .args(["--rules", "sql/examples/fused.sql", "--out"])
            .arg(&log)
            .args([
                "--partitions",
                partitions,
                "--batch-rows",
                batch,
                "--speed",
                "max",
            ]);
        if partitions == "2" {
            cmd.env_remove("HEALER_ONNXRUNTIME")
                .arg("--config")
                .arg(&config);
        }
        let run = cmd.output().unwrap();
        succeeded(&run);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains("lstm: model `models/lstm` on the native ONNX Runtime backend"),
            "{stderr}"
        );
        let query = healer()
            .args(["incidents", log.to_str().unwrap(), "--sql"])
            .arg(
                "SELECT rule, ts, resource, metric, value, round(confidence, 9) AS c \
                 FROM anomalies ORDER BY ts, resource, metric",
            )
            .output()
            .unwrap();
        rows.push(succeeded(&query));
    }
    assert_eq!(rows[0], rows[1]);
    assert!(rows[0].contains("fused"), "{}", rows[0]);

    std::fs::write(
        &config,
        "[rules]\nonnxruntime = \"/nonexistent/libonnxruntime.so\"\n",
    )
    .unwrap();
    let bad = healer().arg("validate").arg(&config).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("rules.onnxruntime") && err.contains("/nonexistent/libonnxruntime.so"),
        "{err}"
    );
}

/// A scaled-out `healer run` refuses rules whose windows do not partition by resource (their
/// state could not move with shards), before it touches the lease table or the stream.
#[test]
fn scale_out_rejects_rules_not_partitioned_by_resource() {
    let dir = tempfile::tempdir().unwrap();
    let rule = dir.path().join("by_service.sql");
    std::fs::write(
        &rule,
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/rules/zscore.sql"),
        )
        .unwrap()
        .replace("CREATE VIEW zscore_300", "CREATE VIEW zscore_service")
        .replace(
            "PARTITION BY resource, metric",
            "PARTITION BY service, metric",
        ),
    )
    .unwrap();
    let run = healer()
        .args([
            "run",
            "--stream",
            "metrics",
            "--endpoint",
            "http://127.0.0.1:9",
        ])
        .args([
            "--lease-table",
            "leases",
            "--lease-endpoint",
            "http://127.0.0.1:9",
        ])
        .arg("--rules")
        .arg(&rule)
        .arg("--out")
        .arg(dir.path().join("out"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(
            "every window must partition by `resource` (the records' partition key); these \
             rules partition by `service`"
        ),
        "{err}"
    );
}
