//! The `healer` binary, as a user runs it.

use std::process::Command;

fn healer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_healer"))
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
    assert!(stdout.contains("zscore_300"), "{stdout}");
    assert!(stdout.contains("injected faults detected"), "{stdout}");

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
