#!/usr/bin/env python3
"""NAB's own windowed Gaussian detector, re-run here, so that its score on the files labelled
in this copy of NAB can be set beside its published score over all 58 files.

The detector, as NAB's `windowedGaussian` describes it: each value is scored against the mean
and population standard deviation of a window of past values (growing to 6,400; once full, it
slides forward 100 values at a time), as 1 - P(|X - mean| >= |x - mean|) one-sided,
i.e. 1 - Q(|z|). The first value scores 0.

Writes NAB-format result files for every data file; score them with healer's scorer:

    python3 benches/nab_windowed_gaussian.py --dataset ../shared/datasets/nab --out /tmp/wg
    healer eval nab --dataset ../shared/datasets/nab --scores /tmp/wg

Needs only the Python standard library.
"""

import argparse
import csv
import math
import os

WINDOW = 6400
STEP = 100


def scores(values):
    window, pending = [], []
    mean, std = 0.0, 1.0
    out = []

    def refresh():
        nonlocal mean, std
        mean = sum(window) / len(window)
        std = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window)) or 1e-6

    for x in values:
        if window:
            z = abs(x - mean) / std
            out.append(1.0 - 0.5 * math.erfc(z / math.sqrt(2.0)))
        else:
            out.append(0.0)
        if len(window) < WINDOW:
            window.append(x)
            refresh()
        else:
            pending.append(x)
            if len(pending) == STEP:
                window = window[STEP:] + pending
                pending = []
                refresh()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="the NAB folder (data/, labels/)")
    ap.add_argument("--out", required=True, help="where to write <category>/<file>.csv")
    args = ap.parse_args()
    data = os.path.join(args.dataset, "data")
    for category in sorted(os.listdir(data)):
        folder = os.path.join(data, category)
        if not os.path.isdir(folder):
            continue
        for name in sorted(f for f in os.listdir(folder) if f.endswith(".csv")):
            with open(os.path.join(folder, name), newline="") as f:
                rows = list(csv.DictReader(f))
            values = [float(r["value"]) for r in rows]
            target = os.path.join(args.out, category, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["timestamp", "value", "anomaly_score"])
                for r, s in zip(rows, scores(values)):
                    w.writerow([r["timestamp"], r["value"], repr(s)])


if __name__ == "__main__":
    main()
