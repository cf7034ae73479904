//! `healer demo`: the embedded default, with no account and no network.
//!
//! Generates a simulated fleet with labelled faults (`healer-datasets`), writes it as
//! parquet, replays it through the bundled rules and writes the incident log.

use std::path::{Path, PathBuf};

use healer_datasets::{FleetConfig, Label, generate, write_labels_csv, write_parquet};

/// Files the demo generated.
#[derive(Debug, Clone)]
pub struct DemoInput {
    /// The metrics parquet file.
    pub metrics: PathBuf,
    /// The labels CSV.
    pub labels_csv: PathBuf,
    /// The injected faults.
    pub labels: Vec<Label>,
    /// Rows generated.
    pub rows: usize,
}

/// Generates the demo fleet under `dir/input/`.
pub fn write_input(dir: &Path, config: &FleetConfig) -> std::io::Result<DemoInput> {
    let input = dir.join("input");
    std::fs::create_dir_all(&input)?;
    let (batches, labels) = generate(config);
    let metrics = input.join("fleet.parquet");
    write_parquet(&metrics, &batches).map_err(std::io::Error::other)?;
    let labels_csv = input.join("labels.csv");
    write_labels_csv(&labels_csv, &labels)?;
    Ok(DemoInput {
        metrics,
        labels_csv,
        labels,
        rows: batches.iter().map(|b| b.num_rows()).sum(),
    })
}
