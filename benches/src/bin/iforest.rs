//! Isolation-forest fit and score timings and AUROC on SMD machines, for `peer_iforest.py`.
//!
//! ```sh
//! iforest --smd ../shared/datasets/smd --out DIR [--seeds 5] [--score-rows 1000000]
//! ```
//!
//! For every machine with test labels: fits healer's forest on the train file (100 trees,
//! 256 samples, contamination 0.01) once per seed, scores the test file, and writes the
//! scores of seed 0 to `DIR/<machine>.healer.txt`. Then times scoring of the test rows tiled
//! to `--score-rows` rows on 1 and 2 threads (best of 3). Prints one JSON object per machine.

use std::path::PathBuf;
use std::time::Instant;

use healer_engine::train::parse_csv;
use healer_operators::iforest::ForestConfig;
use healer_operators::iforest_model::IforestModel;
use healer_operators::scoring::auroc;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn read(path: &PathBuf) -> healer_engine::train::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_csv(&path.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smd = PathBuf::from(arg(&args, "--smd").expect("--smd DIR"));
    let out = PathBuf::from(arg(&args, "--out").expect("--out DIR"));
    let seeds: u64 = arg(&args, "--seeds").map_or(5, |s| s.parse().expect("--seeds N"));
    let score_rows: usize =
        arg(&args, "--score-rows").map_or(1_000_000, |s| s.parse().expect("--score-rows N"));
    std::fs::create_dir_all(&out).expect("create --out");
    let machines = healer_engine::smd_eval::labelled_machines(&smd).expect("test_label/");
    for machine in machines {
        let train = read(&smd.join("train").join(format!("{machine}.txt")));
        let test = read(&smd.join("test").join(format!("{machine}.txt")));
        let labels: Vec<bool> =
            std::fs::read_to_string(smd.join("test_label").join(format!("{machine}.txt")))
                .expect("labels")
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.trim() != "0")
                .collect();
        assert_eq!(labels.len(), test.rows(), "{machine}: labels and test rows");
        let train_cols = train.select(&train.names).unwrap();
        let test_cols = test.select(&test.names).unwrap();
        let mut aurocs = Vec::new();
        let mut fit_s = f64::INFINITY;
        for seed in 0..seeds {
            let config = ForestConfig {
                seed,
                ..ForestConfig::default()
            };
            let started = Instant::now();
            let model =
                IforestModel::train(train.names.clone(), &train_cols, &config, vec![]).unwrap();
            fit_s = fit_s.min(started.elapsed().as_secs_f64());
            let mut scores = vec![0.0; test.rows()];
            model
                .forest
                .score_columns_parallel(&test_cols, &mut scores, 2)
                .unwrap();
            aurocs.push(auroc(&scores, &labels).unwrap());
            if seed == 0 {
                let text: String = scores.iter().map(|s| format!("{s}\n")).collect();
                std::fs::write(out.join(format!("{machine}.healer.txt")), text).unwrap();
            }
        }
        // Throughput on the test rows tiled to `score_rows`.
        let model = IforestModel::train(
            train.names.clone(),
            &train_cols,
            &ForestConfig::default(),
            vec![],
        )
        .unwrap();
        let tiled: Vec<Vec<f64>> = test_cols
            .iter()
            .map(|c| c.iter().copied().cycle().take(score_rows).collect())
            .collect();
        let refs: Vec<&[f64]> = tiled.iter().map(Vec::as_slice).collect();
        let mut scores = vec![0.0; score_rows];
        let mut timing = |threads: usize| {
            (0..3)
                .map(|_| {
                    let started = Instant::now();
                    model
                        .forest
                        .score_columns_parallel(&refs, &mut scores, threads)
                        .unwrap();
                    started.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let (t1, t2) = (timing(1), timing(2));
        let mean = aurocs.iter().sum::<f64>() / aurocs.len() as f64;
        println!(
            "{{\"machine\":\"{machine}\",\"features\":{},\"train_rows\":{},\"test_rows\":{},\"seeds\":{seeds},\"auroc_mean\":{mean:.6},\"aurocs\":{:?},\"fit_s\":{fit_s:.6},\"score_rows\":{score_rows},\"score_s_1\":{t1:.6},\"score_s_2\":{t2:.6}}}",
            train.names.len(),
            train.rows(),
            test.rows(),
            aurocs,
        );
    }
}
