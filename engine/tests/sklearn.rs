//! healer's isolation forest against scikit-learn's on a real labelled SMD machine: trained
//! by `healer train iforest` from the raw file, scored through the model file, compared on
//! AUROC against the test labels and on rank correlation of the scores.
//!
//! Needs `../shared/datasets/smd` beside the clone (or `HEALER_SHARED_DIR`) and a Python with scikit-learn and scipy
//! (`.ci/test` installs it and exports `HEALER_PYTHON`).

use std::path::{Path, PathBuf};
use std::process::Command;

use healer_engine::train::parse_csv;
use healer_operators::iforest_model::IforestModel;
use healer_operators::scoring::auroc;

/// `$HEALER_SHARED_DIR/datasets/smd`, by default the `shared/` folder beside the clone.
fn smd() -> PathBuf {
    let shared = std::env::var_os("HEALER_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let dir = shared.join("datasets/smd");
    assert!(
        dir.is_dir(),
        "{} is missing: the shared datasets sit beside the clone (or set HEALER_SHARED_DIR)",
        dir.display()
    );
    dir
}

const MACHINE: &str = "machine-1-2";
const SEEDS: u64 = 3;

#[test]
fn auroc_and_ranking_match_scikit_learn() {
    let smd = smd();
    let dir = tempfile::tempdir().unwrap();
    let train = smd.join("train").join(format!("{MACHINE}.txt"));
    let test_path = smd.join("test").join(format!("{MACHINE}.txt"));
    let test = parse_csv("test", &std::fs::read_to_string(&test_path).unwrap()).unwrap();
    let labels: Vec<bool> =
        std::fs::read_to_string(smd.join("test_label").join(format!("{MACHINE}.txt")))
            .unwrap()
            .lines()
            .map(|l| l.trim() == "1")
            .collect();
    let columns = test.select(&test.names).unwrap();
    let mut aurocs = Vec::new();
    let mut seed0 = Vec::new();
    for seed in 0..SEEDS {
        let model_path = dir.path().join(format!("m{seed}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_healer"))
            .args(["train", "iforest", "--input"])
            .arg(&train)
            .arg("--out")
            .arg(&model_path)
            .args(["--seed", &seed.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("features      38"), "{text}");
        let model =
            IforestModel::from_json(&std::fs::read_to_string(&model_path).unwrap()).unwrap();
        assert_eq!(model.training.rows, 23694);
        let mut scores = vec![0.0; test.rows()];
        model
            .forest
            .score_columns_parallel(&columns, &mut scores, 2)
            .unwrap();
        aurocs.push(auroc(&scores, &labels).unwrap());
        if seed == 0 {
            seed0 = scores;
        }
    }
    let ours = aurocs.iter().sum::<f64>() / SEEDS as f64;
    let scores_file = dir.path().join("healer.txt");
    std::fs::write(
        &scores_file,
        seed0.iter().map(|s| format!("{s}\n")).collect::<String>(),
    )
    .unwrap();

    let python = std::env::var("HEALER_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import sys, numpy as np
from scipy.stats import spearmanr
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
train, test, labels, ours, seeds = sys.argv[1:6]
X = np.loadtxt(train, delimiter=","); T = np.loadtxt(test, delimiter=",")
y = np.loadtxt(labels).astype(bool); h = np.loadtxt(ours)
aucs, rhos = [], []
for seed in range(int(seeds)):
    s = -IsolationForest(n_estimators=100, max_samples=256, contamination=0.01, random_state=seed).fit(X).score_samples(T)
    aucs.append(roc_auc_score(y, s)); rhos.append(spearmanr(h, s).statistic)
print(np.mean(aucs), np.mean(rhos))
"#;
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&train)
        .arg(&test_path)
        .arg(smd.join("test_label").join(format!("{MACHINE}.txt")))
        .arg(&scores_file)
        .arg(SEEDS.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}): run the suite with .ci/test"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (theirs, rho) = (got[0], got[1]);
    eprintln!("{MACHINE}: AUROC healer {ours:.4}, scikit-learn {theirs:.4}; Spearman {rho:.3}");
    // Both are means over 3 seeds; the seed-to-seed spread of either is ~0.005 here.
    assert!(
        (ours - theirs).abs() <= 0.01,
        "AUROC healer {ours:.4} vs scikit-learn {theirs:.4}"
    );
    assert!(
        rho >= 0.85,
        "rank correlation with scikit-learn's scores: {rho:.3}"
    );
}
