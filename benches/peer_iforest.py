#!/usr/bin/env python3
"""healer's isolation forest against scikit-learn on SMD, timed in the same run.

    python3 benches/peer_iforest.py --bench "$CARGO_TARGET_DIR/release/iforest" \
        --smd ../shared/datasets/smd [--seeds 5] [--score-rows 1000000]

Both fit 100 trees × 256 samples (contamination 0.01) on each labelled machine's train file
and score its test file, once per seed; AUROC is against the test labels (averaged over
seeds). Scoring throughput is timed on the test rows tiled to --score-rows rows, best of 3,
with 1 and 2 threads (scikit-learn: n_jobs=1 and 2). The script also reports the Spearman
rank correlation of healer's and scikit-learn's test scores (seed 0) and writes
results/peer_iforest.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from scipy.stats import spearmanr
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="healer's release `iforest` bench binary")
    ap.add_argument("--smd", required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--score-rows", type=int, default=1_000_000)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "peer_iforest.json"))
    args = ap.parse_args()

    out = tempfile.mkdtemp(prefix="healer-iforest-")
    run = subprocess.run(
        [args.bench, "--smd", args.smd, "--out", out, "--seeds", str(args.seeds),
         "--score-rows", str(args.score_rows)],
        check=True, capture_output=True, text=True)
    healer = [json.loads(l) for l in run.stdout.splitlines() if l.startswith("{")]

    rows = []
    for h in healer:
        m = h["machine"]
        train = np.loadtxt(os.path.join(args.smd, "train", m + ".txt"), delimiter=",")
        test = np.loadtxt(os.path.join(args.smd, "test", m + ".txt"), delimiter=",")
        labels = np.loadtxt(os.path.join(args.smd, "test_label", m + ".txt")).astype(bool)
        aurocs, fit_s = [], float("inf")
        for seed in range(args.seeds):
            f = IsolationForest(n_estimators=100, max_samples=256, contamination=0.01,
                                random_state=seed, n_jobs=1)
            t = time.perf_counter()
            f.fit(train)
            fit_s = min(fit_s, time.perf_counter() - t)
            s = -f.score_samples(test)
            aurocs.append(roc_auc_score(labels, s))
            if seed == 0:
                sk0 = s
        hs = np.loadtxt(os.path.join(out, m + ".healer.txt"))
        rho = spearmanr(hs, sk0).statistic
        f = IsolationForest(n_estimators=100, max_samples=256, contamination=0.01,
                            random_state=0).fit(train)
        tiled = np.resize(test, (args.score_rows, test.shape[1]))
        f.set_params(n_jobs=1)
        sk1 = best_of(3, lambda: f.score_samples(tiled))
        f.set_params(n_jobs=2)
        sk2 = best_of(3, lambda: f.score_samples(tiled))
        rows.append({
            "machine": m,
            "features": h["features"],
            "healer_auroc": h["auroc_mean"],
            "sklearn_auroc": float(np.mean(aurocs)),
            # Seed-to-seed spread of scikit-learn's AUROC, and the standard error of the
            # difference of two means over this many seeds (healer's spread is alike).
            "sklearn_auroc_sd": float(np.std(aurocs, ddof=1)) if len(aurocs) > 1 else 0.0,
            "diff_standard_error": float(np.std(aurocs, ddof=1) * np.sqrt(2 / len(aurocs)))
            if len(aurocs) > 1 else 0.0,
            "auroc_diff": h["auroc_mean"] - float(np.mean(aurocs)),
            "spearman_seed0": float(rho),
            "healer_fit_s": h["fit_s"],
            "sklearn_fit_s": fit_s,
            "healer_rows_per_s_1": args.score_rows / h["score_s_1"],
            "healer_rows_per_s_2": args.score_rows / h["score_s_2"],
            "sklearn_rows_per_s_1": args.score_rows / sk1,
            "sklearn_rows_per_s_2": args.score_rows / sk2,
        })

    print(f"{'machine':12} {'AUROC healer':>12} {'sklearn':>8} {'diff':>7} {'rho':>6} "
          f"{'fit h/sk (ms)':>14} {'score M rows/s h1 h2 | sk1 sk2':>34} {'ratio 2v2':>9}")
    for r in rows:
        print(f"{r['machine']:12} {r['healer_auroc']:12.4f} {r['sklearn_auroc']:8.4f} "
              f"{r['auroc_diff']:+7.4f} {r['spearman_seed0']:6.3f} "
              f"{1e3*r['healer_fit_s']:6.1f}/{1e3*r['sklearn_fit_s']:6.1f} "
              f"{r['healer_rows_per_s_1']/1e6:9.2f} {r['healer_rows_per_s_2']/1e6:6.2f} | "
              f"{r['sklearn_rows_per_s_1']/1e6:6.2f} {r['sklearn_rows_per_s_2']/1e6:6.2f} "
              f"{r['healer_rows_per_s_2']/r['sklearn_rows_per_s_2']:9.1f}x")
    mean = lambda k: float(np.mean([r[k] for r in rows]))
    summary = {
        "healer_auroc_mean": mean("healer_auroc"),
        "sklearn_auroc_mean": mean("sklearn_auroc"),
        "auroc_diff_mean": mean("auroc_diff"),
        "auroc_diff_max_abs": float(max(abs(r["auroc_diff"]) for r in rows)),
        "score_ratio_2_threads": mean("healer_rows_per_s_2") / mean("sklearn_rows_per_s_2"),
        "fit_ratio": mean("sklearn_fit_s") / mean("healer_fit_s"),
    }
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"machines": rows, "summary": summary, "seeds": args.seeds,
                   "score_rows": args.score_rows, "cpus": os.cpu_count()}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
