//! LSTM forecaster inference throughput, for `peer_lstm.py`.
//!
//! ```sh
//! lstm --model models/lstm --windows W.f64 --out P.f64 [--backend native|tract] [--lib LIB] \
//!      [--threads 1,2] [--repeat 3]
//! ```
//!
//! Reads raw windows (little-endian `f64`, 60 values each, back to back), forecasts them all
//! with healer's `Forecaster` (per-window normalisation, fixed batches of 64) on the backend
//! asked for, `--repeat` times per thread count, the windows split evenly over the threads
//! (each on its own session, as pipeline workers run). Writes the forecasts of the first run
//! to `--out` and prints one JSON object: the best sequences per second for each thread count.

use std::path::{Path, PathBuf};
use std::time::Instant;

use healer_sql::lstm::{Backend, Forecaster, runtime};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(arg(&args, "--model").unwrap_or_else(|| "models/lstm".into()));
    let windows_path = PathBuf::from(arg(&args, "--windows").expect("--windows FILE"));
    let out = PathBuf::from(arg(&args, "--out").expect("--out FILE"));
    let repeat: usize = arg(&args, "--repeat").map_or(3, |s| s.parse().expect("--repeat N"));
    let threads: Vec<usize> = arg(&args, "--threads")
        .unwrap_or_else(|| "1,2".into())
        .split(',')
        .map(|t| t.parse().expect("--threads N,M"))
        .collect();
    let backend = match arg(&args, "--backend").as_deref() {
        Some("tract") => Backend::Tract,
        Some("native") | None => Backend::Native(PathBuf::from(
            arg(&args, "--lib")
                .or_else(|| std::env::var("HEALER_ONNXRUNTIME").ok())
                .expect("--lib LIB or HEALER_ONNXRUNTIME for the native backend"),
        )),
        Some(other) => panic!("unknown backend {other}"),
    };
    let rt = runtime(backend).unwrap_or_else(|e| panic!("{e}"));
    let forecaster = Forecaster::load(Path::new(&model), rt).unwrap_or_else(|e| panic!("{e}"));
    let n = forecaster.window();
    let bytes = std::fs::read(&windows_path).expect("read --windows");
    let values: Vec<f64> = bytes
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    assert_eq!(values.len() % n, 0, "windows of {n} values");
    let windows: Vec<&[f64]> = values.chunks_exact(n).collect();

    let first = forecaster
        .predict(&windows)
        .unwrap_or_else(|e| panic!("{e}"));
    let raw: Vec<u8> = first.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&out, raw).expect("write --out");

    let mut results = Vec::new();
    for &t in &threads {
        let per = windows.len().div_ceil(t);
        let mut best = f64::INFINITY;
        for _ in 0..repeat {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for part in windows.chunks(per) {
                    let forecaster = &forecaster;
                    scope.spawn(move || forecaster.predict(part).unwrap_or_else(|e| panic!("{e}")));
                }
            });
            best = best.min(started.elapsed().as_secs_f64());
        }
        results.push(format!(
            "\"{t}\": {{\"seconds\": {best:.6}, \"sequences_per_s\": {:.1}}}",
            windows.len() as f64 / best
        ));
    }
    println!(
        "{{\"backend\": \"{}\", \"windows\": {}, \"threads\": {{{}}}}}",
        rt.backend.name(),
        windows.len(),
        results.join(", ")
    );
}
