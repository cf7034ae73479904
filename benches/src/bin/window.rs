//! Throughput of the keyed window operator and of the key interner alone, on the shape of the
//! replay benchmark (`peer_zscore.py`): many resources sampled every tick, one metric at a
//! time, `AVG`, `STDDEV_SAMP` and `COUNT` over `ROWS BETWEEN 299 PRECEDING AND CURRENT ROW`.
//!
//! ```sh
//! window [--resources 500] [--metrics 16] [--ticks 10000] [--batch-ticks 131]
//!        [--percentile Q --preceding N] [--select K]
//! ```
//!
//! With `--select K`, the operator keeps only the rows of full windows whose |z| exceeds `K`,
//! as the z-score rule's filters pushed into the window pass do: a screen on the running
//! sums, then the test on the remaining rows' aggregates (`process_selected`).
//!
//! With `--percentile`, the operator computes `PERCENTILE_CONT(x, Q)` over
//! `ROWS BETWEEN N PRECEDING AND CURRENT ROW` instead (the bundled novelty rule's spreads:
//! `--percentile 0.999 --preceding 5999`).
//!
//! Prints ns per cell for each part, best of 3 runs. Values are a seeded AR(1) walk per
//! series, so the operator sees realistic numbers (no constant windows).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, DictionaryArray, Float64Array, Int32Array, StringArray};
use arrow::datatypes::Int32Type;
use healer_operators::keys::KeyInterner;
use healer_operators::window::{AggKind, Aggregate, Frame, Level, Screen, WindowOperator};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// A small, seeded xorshift generator: the benchmark needs numbers, not statistics.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let resources = arg(&args, "--resources", 500);
    let metrics = arg(&args, "--metrics", 16);
    let ticks = arg(&args, "--ticks", 10_000);
    let batch_ticks = arg(&args, "--batch-ticks", 131).max(1);

    // Per-metric value columns of every batch, generated up front.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut level = vec![0.0f64; resources * metrics];
    let mut batches: Vec<Vec<Float64Array>> = Vec::new();
    let mut t = 0;
    while t < ticks {
        let n = batch_ticks.min(ticks - t);
        let mut cols = vec![Vec::with_capacity(n * resources); metrics];
        for _ in 0..n {
            for r in 0..resources {
                for (m, col) in cols.iter_mut().enumerate() {
                    let l = &mut level[r * metrics + m];
                    *l = 0.9 * *l + rng.next_f64();
                    col.push(100.0 + 10.0 * m as f64 + *l);
                }
            }
        }
        batches.push(cols.into_iter().map(Float64Array::from).collect());
        t += n;
    }
    let cells = (ticks * resources * metrics) as f64;
    let names: Vec<String> = (0..resources).map(|r| format!("res-{r:05}")).collect();
    let metric_names: Vec<String> = (0..metrics).map(|m| format!("metric_{m}")).collect();

    let percentile: Option<f64> = args
        .iter()
        .position(|a| a == "--percentile")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number between 0 and 1"));
    let (aggregates, frame) = match percentile {
        Some(q) => (
            vec![Aggregate {
                kind: AggKind::Quantile(Level::new(q).expect("a level between 0 and 1")),
                arg: 0,
            }],
            Frame::Rows {
                preceding: arg(&args, "--preceding", 5_999),
            },
        ),
        None => (
            vec![
                Aggregate {
                    kind: AggKind::Avg,
                    arg: 0,
                },
                Aggregate {
                    kind: AggKind::StddevSamp,
                    arg: 0,
                },
                Aggregate {
                    kind: AggKind::Count,
                    arg: 0,
                },
            ],
            Frame::Rows {
                preceding: arg(&args, "--preceding", 299),
            },
        ),
    };

    let select: Option<f64> = args
        .iter()
        .position(|a| a == "--select")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number of standard deviations"));
    // A full window's count.
    let full = match frame {
        Frame::Rows { preceding } => (preceding + 1) as f64,
        _ => f64::NAN,
    };
    let mut selected = 0usize;

    let mut best = [f64::INFINITY; 2];
    for _ in 0..3 {
        let mut keys = KeyInterner::new(2);
        let mut op = WindowOperator::try_new(frame, 1, aggregates.clone()).expect("operator");
        let (mut intern_s, mut window_s) = (0.0, 0.0);
        for cols in &batches {
            let rows = cols[0].len();
            // The samples view's key columns: the batch's resource column, shared by every
            // metric, and per metric a one-entry dictionary over one all-zero key array.
            let resource: ArrayRef = Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| names[i % resources].as_str()),
            ));
            let dict_values = StringArray::from(metric_names.clone());
            let one_metric = DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(vec![0; rows]),
                Arc::new(dict_values.slice(0, 1)),
            )
            .expect("dictionary");
            for (m, values) in cols.iter().enumerate() {
                let metric: ArrayRef =
                    Arc::new(one_metric.with_values(Arc::new(dict_values.slice(m, 1))));
                let started = Instant::now();
                let ids = keys
                    .intern(&[Arc::clone(&resource), metric], rows)
                    .expect("intern");
                intern_s += started.elapsed().as_secs_f64();
                let started = Instant::now();
                let out = match select {
                    None => op
                        .process(&ids, std::slice::from_ref(values))
                        .expect("process"),
                    Some(k) => {
                        let screen = Screen {
                            arg: 0,
                            k,
                            sample: true,
                        };
                        let x = values.values();
                        let kept = op
                            .process_selected(
                                &ids,
                                std::slice::from_ref(values),
                                Some(screen),
                                &mut |chunk, kept| {
                                    let rows = chunk.rows.unwrap_or(&[]);
                                    let [mean, std, n] = chunk.aggregates else {
                                        return;
                                    };
                                    for (i, &r) in rows.iter().enumerate() {
                                        let z = (x[chunk.start + r as usize] - mean[i]) / std[i];
                                        if n[i] == full && z.abs() > k {
                                            kept.push(i as u32);
                                        }
                                    }
                                },
                            )
                            .expect("process_selected");
                        selected += kept.rows.len();
                        kept.outputs
                    }
                };
                window_s += started.elapsed().as_secs_f64();
                std::hint::black_box(out);
            }
        }
        best[0] = best[0].min(intern_s);
        best[1] = best[1].min(window_s);
    }
    println!(
        "{{\"resources\": {resources}, \"metrics\": {metrics}, \"ticks\": {ticks}, \
         \"batch_ticks\": {batch_ticks}, \"intern_ns_per_cell\": {:.2}, \
         \"window_ns_per_cell\": {:.2}, \"selected_rows_per_run\": {}}}",
        best[0] * 1e9 / cells,
        best[1] * 1e9 / cells,
        selected / 3
    );
}
