//! Golden tests of rule semantics.
//!
//! Each `golden/*.test` file has three sections:
//!
//! ```text
//! -- input        CSV: `ts` (ms), `resource`, then Float64 columns; empty = NULL, NaN = NaN
//! -- rule         one or more CREATE VIEW statements (the output of the first is checked)
//! -- output       the rule's raw output, pretty-printed
//! ```
//!
//! Every case runs with the whole input in one batch and in batches of 1, 2, 3, 7 and 64
//! rows; all must print the same table. `HEALER_UPDATE_GOLDEN=1 cargo test -p healer-sql
//! --test golden` rewrites the `-- output` sections (review the diff before committing).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::pretty::pretty_format_batches;
use healer_operators::schema::ts_type;
use healer_sql::RuleCompiler;

mod common;

struct Case {
    input: String,
    rule: String,
    output: String,
}

fn parse_case(text: &str) -> Case {
    let mut sections = std::collections::HashMap::new();
    let mut current: Option<&str> = None;
    let mut buf = String::new();
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("-- ")
            .filter(|n| ["input", "rule", "output"].contains(&n.trim()))
        {
            if let Some(c) = current {
                sections.insert(c.to_string(), std::mem::take(&mut buf));
            }
            current = Some(name.trim());
            continue;
        }
        if current.is_some() {
            buf.push_str(line);
            buf.push('\n');
        }
    }
    if let Some(c) = current {
        sections.insert(c.to_string(), buf);
    }
    Case {
        input: sections.remove("input").expect("-- input section"),
        rule: sections.remove("rule").expect("-- rule section"),
        output: sections.remove("output").unwrap_or_default(),
    }
}

fn parse_input(csv: &str) -> RecordBatch {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .expect("header")
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(
        &header[..2],
        ["ts", "resource"],
        "input starts with ts,resource"
    );
    let rows: Vec<Vec<&str>> = lines
        .map(|l| l.split(',').map(str::trim).collect())
        .collect();
    let mut fields = vec![
        Field::new("ts", ts_type(), false),
        Field::new("resource", DataType::Utf8, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter()
                    .map(|r| r[0].parse::<i64>().unwrap())
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r[1]).collect::<Vec<_>>(),
        )),
    ];
    for (c, name) in header.iter().enumerate().skip(2) {
        fields.push(Field::new(*name, DataType::Float64, true));
        let values: Vec<Option<f64>> = rows
            .iter()
            .map(|r| match r[c] {
                "" => None,
                v => Some(
                    v.parse::<f64>()
                        .unwrap_or_else(|_| panic!("bad number {v}")),
                ),
            })
            .collect();
        columns.push(Arc::new(Float64Array::from(values)));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

fn run(case: &Case, file: &Path) -> String {
    let input = parse_input(&case.input);
    let compiler = RuleCompiler::try_new(input.schema())
        .unwrap()
        .without_output_contract();
    let rules = compiler
        .compile_str(file, &case.rule)
        .unwrap_or_else(|e| panic!("{}: rule does not compile:\n{e}", file.display()));
    let rule = &rules[0];
    let mut printed: Option<String> = None;
    for chunk in [usize::MAX, 1, 2, 3, 7, 64] {
        let out = common::run(rule, &input, chunk, None);
        let text = pretty_format_batches(&[out]).unwrap().to_string();
        match &printed {
            None => printed = Some(text),
            Some(first) => assert_eq!(
                first,
                &text,
                "{}: batches of {chunk} rows differ",
                file.display()
            ),
        }
    }
    printed.unwrap()
}

#[test]
fn golden() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("HEALER_UPDATE_GOLDEN").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "test"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let case = parse_case(&text);
        let got = run(&case, &file);
        if got.trim() != case.output.trim() {
            if update {
                let head = text.split("-- output").next().unwrap();
                std::fs::write(&file, format!("{head}-- output\n{got}\n")).unwrap();
            } else {
                failures.push(format!(
                    "{}:\n--- expected\n{}\n--- got\n{got}",
                    file.display(),
                    case.output.trim()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
