//! Cost of the incident log's deterministic ids: the id of each anomaly row (an FNV hash of
//! rule, resource, metric and event time, `AnomalyIds::column`) and a file's digest over its
//! ids (`StableHasher::str` per id), on the shape of the replay benchmark's anomalies.
//!
//! ```sh
//! ids [--rows 1200000] [--resources 1000]
//! ```
//!
//! Prints ns per id for each, best of 5 runs.

use std::time::Instant;

use arrow::array::StringArray;
use healer_operators::id::{AnomalyIds, StableHasher};
use healer_operators::schema::CANONICAL_METRICS;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// Best of 5 runs of `f`, in ns per row.
fn best(rows: usize, mut f: impl FnMut() -> u64) -> (f64, u64) {
    let mut best = f64::INFINITY;
    let mut check = 0;
    for _ in 0..5 {
        let t = Instant::now();
        check = std::hint::black_box(f());
        best = best.min(t.elapsed().as_nanos() as f64 / rows as f64);
    }
    (best, check)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows = arg(&args, "--rows", 1_200_000);
    let resources = arg(&args, "--resources", 1000);
    let names: Vec<String> = (0..resources).map(|r| format!("res-{r:05}")).collect();
    let resource = StringArray::from_iter_values((0..rows).map(|i| &names[(i * 7) % resources]));
    let metric = StringArray::from_iter_values(
        (0..rows).map(|i| CANONICAL_METRICS[(i * 5) % CANONICAL_METRICS.len()]),
    );
    let ts: Vec<i64> = (0..rows as i64)
        .map(|i| 1_735_689_600_000 + (i / 120) * 1000)
        .collect();
    let rule = AnomalyIds::new("zscore_300");
    let (per_id, _) = best(rows, || {
        rule.column(&resource, &metric, &ts).value_data().len() as u64
    });
    let ids = rule.column(&resource, &metric, &ts);
    let (per_digest, digest) = best(rows, || {
        let mut h = StableHasher::new();
        for id in ids.iter().flatten() {
            h.str(id);
        }
        u64::from_str_radix(&h.hex()[..16], 16).expect("hex")
    });
    println!("rows {rows}, resources {resources}");
    println!("anomaly ids        {per_id:6.1} ns per id");
    println!("digest over ids    {per_digest:6.1} ns per id   (digest {digest:016x})");
}
