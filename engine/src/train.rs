//! Training data for models: numeric columns from parquet (through object_store) or CSV.
//!
//! CSV input is comma-separated numbers, one row per line. A first line that does not parse
//! as numbers is the header (column names); without one, columns are named `c1`, `c2`, … in
//! order (1-based, as SMD's interpretation labels count dimensions). Empty fields and `NaN`
//! are missing values. Every bad field is reported with its file, line and column.

use std::sync::Arc;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Float64Type};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::ParquetRecordBatchStreamBuilder;

use crate::source::{ObjectReader, list_files};
use crate::store::{Location, S3Config};

/// Named numeric columns, all of one length.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Column names.
    pub names: Vec<String>,
    /// Column values (NaN = missing).
    pub columns: Vec<Vec<f64>>,
    /// The files read.
    pub sources: Vec<String>,
}

impl Table {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, Vec::len)
    }

    /// The columns called `names`, in that order.
    pub fn select(&self, names: &[String]) -> Result<Vec<&[f64]>, String> {
        names
            .iter()
            .map(|n| {
                self.names
                    .iter()
                    .position(|c| c == n)
                    .map(|i| self.columns[i].as_slice())
                    .ok_or_else(|| {
                        format!(
                            "no column `{n}` in the training data (columns: {})",
                            self.names.join(", ")
                        )
                    })
            })
            .collect()
    }

    fn append(&mut self, other: Table, source: &str) -> Result<(), String> {
        if self.names.is_empty() {
            *self = Table {
                sources: std::mem::take(&mut self.sources),
                ..other
            };
        } else if self.names != other.names {
            return Err(format!(
                "{source}: columns ({}) differ from the first input's ({})",
                other.names.join(", "),
                self.names.join(", ")
            ));
        } else {
            for (a, b) in self.columns.iter_mut().zip(other.columns) {
                a.extend(b);
            }
        }
        self.sources.push(source.to_string());
        Ok(())
    }
}

/// Parses CSV text (see the [module docs](self)); `file` names it in errors.
pub fn parse_csv(file: &str, text: &str) -> Result<Table, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, first)) = lines.next() else {
        return Err(format!("{file}: no rows"));
    };
    let fields: Vec<&str> = first.split(',').map(str::trim).collect();
    let numeric = |f: &str| f.is_empty() || f.parse::<f64>().is_ok();
    let has_header = !fields.iter().all(|f| numeric(f));
    let names: Vec<String> = if has_header {
        fields
            .iter()
            .map(|f| f.trim_matches('"').to_string())
            .collect()
    } else {
        (1..=fields.len()).map(|i| format!("c{i}")).collect()
    };
    let mut columns = vec![Vec::new(); names.len()];
    let mut push = |line_no: usize, line: &str| -> Result<(), String> {
        let mut count = 0;
        for (c, field) in line.split(',').enumerate() {
            count += 1;
            if c >= names.len() {
                continue;
            }
            let field = field.trim();
            let value = if field.is_empty() {
                f64::NAN
            } else {
                field.parse::<f64>().map_err(|_| {
                    format!(
                        "{file}:{}: column {} (`{}`): `{field}` is not a number",
                        line_no + 1,
                        c + 1,
                        names[c]
                    )
                })?
            };
            columns[c].push(value);
        }
        if count != names.len() {
            return Err(format!(
                "{file}:{}: {count} fields, expected {}",
                line_no + 1,
                names.len()
            ));
        }
        Ok(())
    };
    if !has_header {
        push(0, first)?;
    }
    for (i, line) in lines {
        push(i, line)?;
    }
    Ok(Table {
        names,
        columns,
        sources: Vec::new(),
    })
}

fn is_csv(input: &str) -> bool {
    let lower = input.to_ascii_lowercase();
    lower.ends_with(".csv") || lower.ends_with(".txt")
}

/// Reads the numeric columns (other than `ts`) of every input, in order.
pub async fn load(inputs: &[String], s3: &S3Config) -> Result<Table, String> {
    let mut table = Table::default();
    for input in inputs {
        let location = Location::parse(input, s3, false).map_err(|e| e.to_string())?;
        if is_csv(input) {
            let bytes = location
                .store
                .get(&location.path)
                .await
                .map_err(|e| format!("{input}: {e}"))?
                .bytes()
                .await
                .map_err(|e| format!("{input}: {e}"))?;
            let text = std::str::from_utf8(&bytes).map_err(|e| format!("{input}: {e}"))?;
            table.append(parse_csv(input, text)?, input)?;
            continue;
        }
        let files = list_files(&location).await.map_err(|e| e.to_string())?;
        if files.is_empty() {
            return Err(format!("{input}: no parquet files"));
        }
        for (path, size) in files {
            let name = format!("{input}:{path}");
            let reader = ObjectReader::new(Arc::clone(&location.store), path).with_file_size(size);
            let mut stream = ParquetRecordBatchStreamBuilder::new(reader)
                .await
                .and_then(|b| b.build())
                .map_err(|e| format!("{name}: {e}"))?;
            let mut part = Table::default();
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| format!("{name}: {e}"))?;
                let schema = batch.schema();
                let numeric: Vec<usize> = (0..batch.num_columns())
                    .filter(|&i| {
                        let f = schema.field(i);
                        f.name() != healer_operators::schema::TS && f.data_type().is_numeric()
                    })
                    .collect();
                if part.names.is_empty() {
                    part.names = numeric
                        .iter()
                        .map(|&i| schema.field(i).name().clone())
                        .collect();
                    part.columns = vec![Vec::new(); numeric.len()];
                }
                for (slot, &i) in numeric.iter().enumerate() {
                    let col = arrow::compute::cast(batch.column(i), &DataType::Float64)
                        .map_err(|e| format!("{name}: {e}"))?;
                    let col = col.as_primitive::<Float64Type>();
                    part.columns[slot].extend(col.iter().map(|v| v.unwrap_or(f64::NAN)));
                }
            }
            table.append(part, &name)?;
        }
    }
    if table.rows() == 0 {
        return Err(format!("no rows in {}", inputs.join(", ")));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_and_without_header() {
        let t = parse_csv("a.csv", "cpu,mem\n1,2\n3,\n").unwrap();
        assert_eq!(t.names, ["cpu", "mem"]);
        assert_eq!(t.columns[0], [1.0, 3.0]);
        assert!(t.columns[1][1].is_nan());
        let t = parse_csv("b.txt", "0.5,0.25\n0.1,0.2\n").unwrap();
        assert_eq!(t.names, ["c1", "c2"]);
        assert_eq!(t.rows(), 2);
        assert!(t.select(&["c2".into(), "c1".into()]).is_ok());
        let e = t.select(&["x".into()]).unwrap_err();
        assert!(e.contains("no column `x`"), "{e}");
    }

    #[test]
    fn csv_errors_have_locations() {
        let e = parse_csv("a.csv", "cpu,mem\n1,2\n3,oops\n").unwrap_err();
        assert_eq!(e, "a.csv:3: column 2 (`mem`): `oops` is not a number");
        let e = parse_csv("a.csv", "1,2\n3\n").unwrap_err();
        assert_eq!(e, "a.csv:2: 1 fields, expected 2");
        assert!(parse_csv("a.csv", "\n\n").is_err());
    }
}
