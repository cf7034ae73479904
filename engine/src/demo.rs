//! `healer demo`: the embedded default, with no account and no network.
//!
//! Generates a simulated fleet with labelled faults (`healer-datasets`), writes it as
//! parquet with the fleet's dependency topology, replays it through the bundled rules,
//! writes the incident log, then diagnoses and decides as `healer diagnose` does.

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
    /// The fleet's topology file (TOML).
    pub topology: PathBuf,
}

/// Which services' faults show on which (a fault of the first shows on the second), and
/// each service's resource type.
const DEPENDS: [(&str, &str); 7] = [
    ("postgres", "payments"),
    ("postgres", "checkout"),
    ("postgres", "catalog"),
    ("redis", "checkout"),
    ("redis", "catalog"),
    ("payments", "checkout"),
    ("checkout", "api-gateway"),
];

fn kind_of(service: &str) -> &'static str {
    match service {
        "postgres" => "database",
        "redis" => "cache",
        _ => "application",
    }
}

/// The topology of a fleet whose resources belong to `services` (resource, service): every
/// resource of a service depends on every resource of the services it calls.
pub fn topology_toml(services: &[(String, String)]) -> String {
    let mut out =
        String::from("# The demo fleet's dependencies: a fault of `from` shows on `to`.\n");
    for (resource, service) in services {
        out.push_str(&format!(
            "\n[[resource]]\nid = \"{resource}\"\ntype = \"{}\"\nservice = \"{service}\"\n",
            kind_of(service)
        ));
    }
    for (from, to) in DEPENDS {
        for (a, sa) in services {
            for (b, sb) in services {
                if sa == from && sb == to {
                    out.push_str(&format!("\n[[edge]]\nfrom = \"{a}\"\nto = \"{b}\"\n"));
                }
            }
        }
    }
    out
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
    let mut services: Vec<(String, String)> = Vec::new();
    for b in &batches {
        let column = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).ok())
        };
        let (Some(r), Some(s)) = (column("resource"), column("service")) else {
            continue;
        };
        let (r, s) = (
            arrow::array::AsArray::as_string::<i32>(&r),
            arrow::array::AsArray::as_string::<i32>(&s),
        );
        for (r, s) in r.iter().zip(s.iter()) {
            if let (Some(r), Some(s)) = (r, s)
                && !services.iter().any(|(x, _)| x == r)
            {
                services.push((r.to_string(), s.to_string()));
            }
        }
    }
    services.sort();
    let topology = dir.join("topology.toml");
    std::fs::write(&topology, topology_toml(&services))?;
    Ok(DemoInput {
        metrics,
        labels_csv,
        labels,
        rows: batches.iter().map(|b| b.num_rows()).sum(),
        topology,
    })
}
