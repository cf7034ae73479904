//! Bad rules are rejected at load with file, line and reason, all at once.

use std::path::Path;

use healer_operators::schema::canonical_metrics_schema;
use healer_sql::RuleCompiler;

fn errors(sql: &str) -> Vec<String> {
    let compiler = RuleCompiler::try_new(canonical_metrics_schema()).unwrap();
    match compiler.compile_str(Path::new("rules/bad.sql"), sql) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn every_bad_statement_is_reported_with_its_location() {
    let sql = "\
-- two bad rules and a good one
CREATE VIEW grouped AS
SELECT max(ts) AS ts, resource, 'cpu' AS metric, avg(cpu_percent) AS value, 0.0 AS score
FROM metrics GROUP BY resource;

CREATE VIEW good AS SELECT ts, resource, 'cpu' AS metric, cpu_percent AS value, cpu_percent AS score FROM metrics;

CREATE VIEW typo AS
SELECT ts, resource, 'cpu' AS metric, cpu_pct AS value, 1.0 AS score FROM metrics;
";
    let e = errors(sql);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with("rules/bad.sql:2:13: rule `grouped`: GROUP BY"),
        "{}",
        e[0]
    );
    assert!(
        e[1].starts_with("rules/bad.sql:9:39: rule `typo`"),
        "{}",
        e[1]
    );
    assert!(e[1].contains("cpu_pct"), "{}", e[1]);
}

#[test]
fn unsupported_windows_say_what_is_supported() {
    let unsupported = "only frames ending at the current row are supported: ROWS BETWEEN <n> \
                       PRECEDING, RANGE BETWEEN INTERVAL";
    for (frame, reason) in [
        ("GROUPS BETWEEN 3 PRECEDING AND CURRENT ROW", unsupported),
        (
            "RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND INTERVAL '1 minute' FOLLOWING",
            unsupported,
        ),
        (
            "RANGE BETWEEN INTERVAL '1 month' PRECEDING AND CURRENT ROW",
            "must not count months or years, which have no fixed length (got 1 month(s)",
        ),
        // DataFusion reads a bare number against a timestamp as months.
        (
            "RANGE BETWEEN 3 PRECEDING AND CURRENT ROW",
            "(got 3 month(s); a bare number is read as months",
        ),
        (
            "RANGE BETWEEN INTERVAL '-1 day' PRECEDING AND CURRENT ROW",
            "must not be negative",
        ),
    ] {
        let sql = format!(
            "CREATE VIEW r AS SELECT ts, resource, 'cpu' AS metric, cpu_percent AS value, \
             AVG(cpu_percent) OVER (PARTITION BY resource ORDER BY ts {frame}) AS score FROM metrics;"
        );
        let e = errors(&sql);
        assert_eq!(e.len(), 1, "{frame}: {e:#?}");
        assert!(e[0].contains(reason), "{frame}: {}", e[0]);
    }

    let unordered = "CREATE VIEW r AS SELECT ts, resource, 'cpu' AS metric, cpu_percent AS value, \
        AVG(cpu_percent) OVER (PARTITION BY resource ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS score FROM metrics;";
    assert!(errors(unordered)[0].contains("ORDER BY ts"));

    let following = "CREATE VIEW r AS SELECT ts, resource, 'cpu' AS metric, cpu_percent AS value, \
        AVG(cpu_percent) OVER (PARTITION BY resource ORDER BY ts ROWS BETWEEN 3 PRECEDING AND 1 FOLLOWING) AS score FROM metrics;";
    assert!(errors(following)[0].contains("only frames ending at the current row"));

    let lag = "CREATE VIEW r AS SELECT ts, resource, 'cpu' AS metric, cpu_percent AS value, \
        LAG(cpu_percent) OVER (PARTITION BY resource ORDER BY ts) AS score FROM metrics;";
    assert!(
        errors(lag)[0].contains("not supported"),
        "{}",
        errors(lag)[0]
    );
}

#[test]
fn output_contract_and_statement_kinds() {
    let missing = "CREATE VIEW m AS SELECT ts, resource, cpu_percent AS value FROM metrics;";
    let e = errors(missing);
    assert!(
        e[0].contains("`metric`") && e[0].contains("`score`"),
        "{}",
        e[0]
    );

    let extra = "CREATE VIEW x AS SELECT ts, resource, 'c' AS metric, cpu_percent AS value, 1.0 AS score, 2 AS bonus FROM metrics;";
    assert!(errors(extra)[0].contains("`bonus`"));

    let select = "SELECT 1;";
    assert!(errors(select)[0].contains("only `CREATE VIEW"));

    let syntax = "CREATE VIEW s AS\nSELECT ts FROM metrics WHERE;";
    let e = errors(syntax);
    assert!(e[0].starts_with("rules/bad.sql:2:"), "{}", e[0]);

    let join = "CREATE VIEW j AS SELECT a.ts, a.resource, 'c' AS metric, a.cpu_percent AS value, 1.0 AS score \
        FROM metrics a JOIN metrics b ON a.resource = b.resource;";
    assert!(errors(join)[0].contains("JOIN"));

    let other = "CREATE VIEW o AS SELECT ts, resource, 'c' AS metric, 1.0 AS value, 1.0 AS score FROM elsewhere;";
    assert!(
        errors(other)[0].contains("elsewhere"),
        "{}",
        errors(other)[0]
    );
}

mod fuzz {
    use proptest::prelude::*;

    use super::errors;

    const FRAGMENTS: [&str; 28] = [
        "CREATE VIEW",
        "v",
        "AS",
        "SELECT",
        "ts",
        "resource",
        "'m' AS metric",
        "cpu_percent AS value",
        "1.0 AS score",
        ",",
        "FROM",
        "metrics",
        "samples",
        "WHERE",
        "AVG(value) OVER",
        "(",
        ")",
        "PARTITION BY resource",
        "ORDER BY ts",
        "ROWS BETWEEN 3 PRECEDING AND CURRENT ROW",
        ";",
        "WITH x AS",
        "GROUP BY",
        "NULLIF(",
        "RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW",
        "RANGE BETWEEN INTERVAL '-1 day' PRECEDING AND CURRENT ROW",
        "RANGE BETWEEN 3 PRECEDING AND CURRENT ROW",
        "MEDIAN(value) OVER",
    ];

    proptest! {
        /// Arbitrary text and near-miss SQL never panic the compiler: every input is either a
        /// rule or located errors.
        #[test]
        fn compiler_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
            let _ = errors(&text);
        }

        #[test]
        fn compiler_never_panics_on_sql_shaped_text(parts in proptest::collection::vec(0usize..FRAGMENTS.len(), 0..40)) {
            let sql: Vec<&str> = parts.iter().map(|&i| FRAGMENTS[i]).collect();
            for e in errors(&sql.join(" ")) {
                prop_assert!(e.starts_with("rules/bad.sql"), "{}", e);
            }
        }
    }
}

#[test]
fn bad_levels_and_unbounded_frames_are_rejected_at_load() {
    let rule = |agg: &str, frame: &str| {
        format!(
            "CREATE VIEW q AS SELECT ts, resource, 'cpu' AS metric, cpu_percent AS value, \
             {agg} OVER (PARTITION BY resource ORDER BY ts {frame}) AS score FROM metrics"
        )
    };
    let rows = "ROWS BETWEEN 9 PRECEDING AND CURRENT ROW";
    let unbounded = "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW";
    for (agg, frame, message) in [
        (
            "percentile_cont(cpu_percent, 1.5)",
            rows,
            "the level must be a number literal between 0 and 1",
        ),
        (
            "percentile_cont(cpu_percent, cpu_percent)",
            rows,
            "the level must be a number literal",
        ),
        ("median(cpu_percent)", unbounded, "needs a bounded frame"),
        (
            "first_value(cpu_percent)",
            unbounded,
            "needs a bounded frame",
        ),
        (
            "percentile_cont(cpu_percent, 0.5)",
            unbounded,
            "needs a bounded frame",
        ),
    ] {
        let e = errors(&rule(agg, frame));
        assert_eq!(e.len(), 1, "{agg} {frame}: {e:#?}");
        assert!(
            e[0].starts_with("rules/bad.sql:1:") && e[0].contains(message),
            "{agg} {frame}: {}",
            e[0]
        );
    }
}
