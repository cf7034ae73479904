//! Filters pushed into window stages: the rules give the same rows with and without the
//! pre-filter, on data full of the values where engines differ (NULL, NaN, ±0, ±∞,
//! constant stretches), and the bundled z-score rule does get one.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::pretty::pretty_format_batches;
use healer_operators::predicate::{Cmp, RowExpr};
use healer_operators::schema::ts_type;
use healer_operators::window::Screen;
use healer_sql::stage::StageTemplate;
use healer_sql::{CompiledRule, RuleCompiler};

mod common;
use proptest::prelude::*;

const ZSCORE: &str = include_str!("../rules/zscore.sql");

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ts", ts_type(), false),
        Field::new("resource", DataType::Utf8, false),
        Field::new("m0", DataType::Float64, true),
        Field::new("m1", DataType::Float64, true),
    ]))
}

/// Rows of two resources, one tick after the other; `values` gives each cell in turn.
fn batch(values: &[Option<f64>]) -> RecordBatch {
    let rows = values.len() / 2;
    let ts: Vec<i64> = (0..rows)
        .map(|r| 1_700_000_000_000 + (r / 2) as i64 * 1000)
        .collect();
    let resources: Vec<String> = (0..rows).map(|r| format!("r{}", r % 2)).collect();
    let column = |m: usize| -> Arc<dyn Array> {
        Arc::new(Float64Array::from(
            (0..rows).map(|r| values[2 * r + m]).collect::<Vec<_>>(),
        ))
    };
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
            Arc::new(StringArray::from(resources)),
            column(0),
            column(1),
        ],
    )
    .unwrap()
}

/// A cell: mostly ordinary numbers and repeats (constant windows), often an edge value.
fn cell() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        8 => (-3i32..4).prop_map(|v| Some(f64::from(v))),
        4 => (-1000.0f64..1000.0).prop_map(Some),
        1 => Just(None),
        1 => Just(Some(f64::NAN)),
        1 => Just(Some(0.0)),
        1 => Just(Some(-0.0)),
        1 => Just(Some(f64::INFINITY)),
        1 => Just(Some(f64::NEG_INFINITY)),
        1 => Just(Some(1e300)),
    ]
}

const W: &str = "ROWS BETWEEN 4 PRECEDING AND CURRENT ROW";

/// Rules whose filters the pre-filter can read in full, in part, or not at all.
fn rules() -> Vec<String> {
    let samples = |filter: &str| {
        format!(
            "CREATE VIEW r AS WITH w AS (
               SELECT ts, resource, metric, value,
                 AVG(value) OVER x AS mean, STDDEV_SAMP(value) OVER x AS std,
                 COUNT(value) OVER x AS n, SUM(value) OVER x AS total,
                 VAR_POP(value) OVER x AS var, STDDEV_POP(value) OVER x AS sp
               FROM samples WINDOW x AS (PARTITION BY resource, metric ORDER BY ts {W}))
             SELECT ts, resource, metric, value, mean, std, n, total, var, sp,
               (value - mean) / NULLIF(std, 0) AS z
             FROM w WHERE {filter};"
        )
    };
    let mut rules: Vec<String> = [
        "n = 5 AND abs((value - mean) / NULLIF(std, 0)) > 1",
        "NOT (abs((value - mean) / NULLIF(std, 0)) <= 1.5) OR n < 3",
        "value > mean + 2 * std OR value < mean - 2 * std",
        "n >= 4 AND total > 10 AND -value <> 0",
        "var / std >= 0.5 AND std != 0",
        "CASE WHEN n = 5 THEN value ELSE 0 END > 1 AND abs(value - mean) > 0.5",
        "CAST(n AS DOUBLE) * 0.5 > 2 AND value IS NOT NULL AND value >= mean",
        "ln(abs(value) + 1) > 1 OR n = 5",
        "mean = 0 OR std = -0.0",
        "n > 9007199254740993",
        "abs((value - mean) / std) >= 1.5 AND n = 5",
        "abs((value - mean) / NULLIF(sp, 0)) > 0.5",
        "abs((value - mean) / NULLIF(sp, 0)) > 0 OR n = 4",
    ]
    .iter()
    .map(|f| samples(f))
    .collect();
    // The wide stream: one window, two arguments.
    rules.push(format!(
        "CREATE VIEW r AS WITH w AS (
           SELECT ts, resource, m0, m1,
             AVG(m0) OVER x AS a0, STDDEV_POP(m1) OVER x AS s1, COUNT(m1) OVER x AS n1
           FROM metrics WINDOW x AS (PARTITION BY resource ORDER BY ts {W}))
         SELECT * FROM w WHERE abs(m0 - a0) > 1 AND (n1 = 5 OR s1 > 100);"
    ));
    // Two arguments, one screened; and a z-score of one metric against another's frame,
    // which is not screened.
    for x in ["m1", "m0"] {
        rules.push(format!(
            "CREATE VIEW r AS WITH w AS (
               SELECT ts, resource, m0, m1,
                 AVG(m0) OVER x AS a0, AVG(m1) OVER x AS a1, STDDEV_SAMP(m1) OVER x AS s1
               FROM metrics WINDOW x AS (PARTITION BY resource ORDER BY ts {W}))
             SELECT * FROM w WHERE abs(({x} - a1) / NULLIF(s1, 0)) > 0.7 AND a0 > -100;"
        ));
    }
    // Not pushed: a MIN over the frame, and two windows.
    rules.push(format!(
        "CREATE VIEW r AS SELECT * FROM (SELECT ts, resource, metric, value,
           MIN(value) OVER (PARTITION BY resource, metric ORDER BY ts {W}) AS lo
         FROM samples) WHERE value > lo + 1;"
    ));
    rules.push(format!(
        "CREATE VIEW r AS SELECT * FROM (SELECT ts, resource, metric, value,
           AVG(value) OVER (PARTITION BY resource, metric ORDER BY ts {W}) AS a,
           AVG(value) OVER (PARTITION BY resource ORDER BY ts {W}) AS b
         FROM samples) WHERE a > b;"
    ));
    rules
}

fn compile(sql: &str, pushdown: bool) -> Arc<CompiledRule> {
    let mut compiler = RuleCompiler::try_new(schema())
        .unwrap()
        .without_output_contract();
    if !pushdown {
        compiler = compiler.without_pushdown();
    }
    compiler
        .compile_str(Path::new("test.sql"), sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .remove(0)
}

fn run(rule: &Arc<CompiledRule>, input: &RecordBatch, split: usize) -> String {
    pretty_format_batches(&[common::run(rule, input, split, None)])
        .unwrap()
        .to_string()
}

fn prefilters(rule: &CompiledRule) -> Vec<Option<RowExpr>> {
    rule.stages
        .iter()
        .filter_map(|s| match s.as_ref() {
            StageTemplate::Window { prefilter, .. } => {
                Some(prefilter.as_ref().map(|p| p.predicate.expr().clone()))
            }
            _ => None,
        })
        .collect()
}

/// The screen of the rule's last window stage.
fn screen(rule: &CompiledRule) -> Option<Screen> {
    rule.stages.iter().rev().find_map(|s| match s.as_ref() {
        StageTemplate::Window { prefilter, .. } => prefilter.as_ref().and_then(|p| p.screen),
        _ => None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn rules_give_the_same_rows_with_and_without_the_prefilter(
        values in proptest::collection::vec(cell(), 8..400),
        split in 1usize..60,
    ) {
        let input = batch(&values);
        for sql in rules() {
            let pushed = run(&compile(&sql, true), &input, split);
            let plain = run(&compile(&sql, false), &input, split);
            prop_assert_eq!(pushed, plain, "{}", sql);
        }
    }
}

#[test]
fn bundled_zscore_rule_is_prefiltered_on_both_of_its_filters() {
    let rule = RuleCompiler::try_new(schema())
        .unwrap()
        .compile_str(Path::new("zscore.sql"), ZSCORE)
        .unwrap()
        .remove(0);
    let filters = prefilters(&rule);
    let [Some(expr)] = filters.as_slice() else {
        panic!("one window stage with a pre-filter expected: {filters:?}");
    };
    // Both conditions, whichever order the optimiser leaves them in.
    let mut conjuncts = Vec::new();
    let mut stack = vec![expr];
    while let Some(e) = stack.pop() {
        match e {
            RowExpr::And(a, b) => stack.extend([a.as_ref(), b.as_ref()]),
            other => conjuncts.push(other),
        }
    }
    assert_eq!(conjuncts.len(), 2, "{expr:?}");
    assert!(conjuncts.iter().any(|c| matches!(
        c,
        RowExpr::Compare(Cmp::Eq, _, b) if **b == RowExpr::Literal(300.0)
    )));
    assert!(conjuncts.iter().any(|c| matches!(
        c,
        RowExpr::Compare(Cmp::Gt, a, b)
            if matches!(**a, RowExpr::Abs(_)) && **b == RowExpr::Literal(3.0)
    )));
    // Which rules of the property test are pre-filtered at all (a filter that is an OR with
    // an unknown side, or compares beyond exact integers, is not).
    let pushed: Vec<Vec<bool>> = rules()
        .iter()
        .map(|sql| {
            prefilters(&compile(sql, true))
                .iter()
                .map(Option::is_some)
                .collect()
        })
        .collect();
    // One letter a rule: pre-filtered (p) or not (-); the last rule has two windows.
    let mut expected: Vec<Vec<bool>> = "ppppppp-p-pppppp-"
        .chars()
        .map(|c| vec![c == 'p'])
        .collect();
    expected.push(vec![false, true]);
    assert_eq!(pushed, expected);
    // Which are screened on the running sums: the z-score conjuncts of the argument's own
    // value (sample or population), not a z-score under an OR or of another column.
    let screens: Vec<Option<Screen>> = rules()
        .iter()
        .map(|sql| screen(&compile(sql, true)))
        .collect();
    let z = |arg, k, sample| Some(Screen { arg, k, sample });
    let mut expected = vec![None; 18];
    expected[0] = z(0, 1.0, true);
    expected[10] = z(0, 1.5, true);
    expected[11] = z(0, 0.5, false);
    expected[14] = z(1, 0.7, true);
    assert_eq!(screens, expected);
    assert_eq!(
        screen(&rule),
        Some(Screen {
            arg: 0,
            k: 3.0,
            sample: true
        })
    );
    assert!(compile(&rules()[0], false).stages.iter().all(|s| !matches!(
        s.as_ref(),
        StageTemplate::Window {
            prefilter: Some(_),
            ..
        }
    )));
}
