#!/usr/bin/env python3
"""Variants of the bundled `novelty` rule on NAB, prototyped outside SQL and scored by healer.

The README's table "Tried and dropped, on the rule with its surprise level" comes from this
script. It

1. derives from `sql/rules/novelty.sql` a rule that reports every row of every series
   (after the warm-up) with the ratio of one deviation, or of the combined one, as its
   score, and runs `healer eval nab --out` with it: the per-row ratios as the rule computes
   them (read back from the written confidences, so rounded to about six digits);
2. computes any extra deviation from the NAB values with pandas, the same way the rule
   calibrates its own (against its 99.9th percentile over the last 6,000 samples, nothing in
   the first 300);
3. applies the rule's report gate and surprise level (or a variant of them) and writes
   NAB-format result files;
4. scores them with `healer eval nab --scores`, healer's own scorer.

The first line it prints is the bundled rule itself through this path, which should match
`healer eval nab` up to the rounding.

    python3 benches/nab_variants.py --healer target/release/healer \\
        --dataset ../shared/datasets/nab [--labels <NAB>/labels/combined_windows.json]

Needs numpy and pandas (the peer venv of `benches/peer_zscore.py` has both). Takes a few
minutes, most of it in the shape-distance variant.
"""

import argparse
import csv
import os
import re
import subprocess
import tempfile

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

RULE = os.path.join(os.path.dirname(__file__), "..", "sql", "rules", "novelty.sql")
HISTORY = 6_000
WARM_UP = 300
GATE = 100
LEVELS = (300, 1_000, 3_000, 6_000)
DEVIATIONS = ("value", "recent", "day", "week")


def replace_once(text, old, new):
    if text.count(old) != 1:
        raise SystemExit(f"novelty.sql changed: cannot find exactly one {old[:60]!r}")
    return text.replace(old, new)


def component_rule(source, column):
    """The bundled rule, reporting `column` of its `ratios` step for every row after the
    warm-up (0 where it is NULL)."""
    sql = replace_once(
        source,
        "AS local_ratio\n",
        "AS local_ratio,\n        d_value / NULLIF(q_value, 0) AS r_value,\n"
        "        d_recent / NULLIF(q_recent, 0) AS r_recent\n",
    )
    # Carry the two local ratios through the lag steps.
    sql = re.sub(
        r"(ts, resource, metric, value, center, n, q_value, local_ratio),\n",
        r"\1, r_value, r_recent,\n",
        sql,
    )
    sql = replace_once(
        sql,
        "q_value AS spread,\n",
        "q_value AS spread, r_value, r_recent,\n"
        "        CASE WHEN coalesce(day_ago_ratio, 0) <= 1 THEN d_day / NULLIF(q_day, 0) END AS r_day,\n"
        "        CASE WHEN coalesce(week_ago_ratio, 0) <= 1 THEN d_week / NULLIF(q_week, 0) END AS r_week,\n",
    )
    sql = sql[: sql.index("held AS (")]
    sql = replace_once(sql, "CREATE VIEW novelty AS", f"CREATE VIEW novelty_{column} AS")
    return sql + (
        f"held AS (SELECT ts, resource, metric, value, n, coalesce({column}, 0) AS x FROM ratios)\n"
        "SELECT ts, resource, metric, value, x AS score, 'MEDIUM' AS severity,\n"
        "    x / (x + 1) AS confidence, value AS expected_low, value AS expected_high\n"
        f"FROM held WHERE n >= {WARM_UP};\n"
    )


def read_results(root):
    """{file: (timestamps, values, scores)} of NAB-format result files under `root`."""
    out = {}
    for category in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, category))):
            with open(os.path.join(root, category, name)) as f:
                rows = list(csv.reader(f))[1:]
            out[f"{category}/{name}"] = (
                [r[0] for r in rows],
                np.array([float(r[1]) for r in rows]),
                np.array([float(r[2]) for r in rows]),
            )
    return out


def healer_eval(args, extra):
    cmd = [args.healer, "eval", "nab", "--dataset", args.dataset, *extra]
    if args.labels:
        cmd += ["--labels", args.labels]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return run.stdout


def ratios_of(args, work):
    """Per file, each deviation's ratio and the combined one, as the rule computes them."""
    source = open(RULE).read()
    per = {}
    for column in [f"r_{d}" for d in DEVIATIONS] + ["ratio"]:
        path = os.path.join(work, f"{column}.sql")
        with open(path, "w") as f:
            f.write(component_rule(source, column))
        out = os.path.join(work, column)
        healer_eval(args, ["--rules", path, "--out", out])
        for key, (ts, values, confidence) in read_results(out).items():
            ratio = np.where(confidence < 1, confidence / np.maximum(1 - confidence, 1e-12), 1e6)
            per.setdefault(key, {"ts": ts, "values": values})[column] = ratio
    return per


def running_max(x, k):
    padded = np.concatenate([np.full(k - 1, -np.inf), x])
    return sliding_window_view(padded, k).max(axis=1)


def calibrated(d):
    """A deviation against its own 99.9th percentile over the last 6,000 samples."""
    q = pd.Series(d).rolling(HISTORY, min_periods=1).quantile(0.999, interpolation="linear").values
    with np.errstate(all="ignore"):
        r = np.where(q > 0, d / q, 0.0)
    r = np.nan_to_num(r)
    r[:WARM_UP] = 0.0
    return r


def level(x, candidates, levels=LEVELS):
    """For each candidate row, the longest of 100 .. 6,000 rows (or of `levels`) over which
    `x` is largest."""
    out = np.full(len(x), float(GATE))
    for k in levels:
        out = np.where(candidates & (x >= running_max(x, k)), k, out)
    return out


def surprise(x, factor=0.02, floor=1.0, levels_of=None, levels=LEVELS):
    """The rule's report gate and surprise over combined ratios `x`."""
    candidates = (x > floor) & (x >= running_max(x, GATE))
    lv = level(x if levels_of is None else levels_of, candidates, levels)
    return np.where(candidates, x * (1 + factor * np.log(lv / GATE)), 0.0)


def continuous_surprise(x, cap=HISTORY, factor=0.02):
    """The surprise with L the rows since the ratio last reached the candidate's (at least
    100; at most `cap`, or since the warm-up when `cap` is None) instead of one of five
    levels."""
    out = np.zeros(len(x))
    for i in np.flatnonzero((x > 1) & (x >= running_max(x, GATE))):
        lo = WARM_UP if cap is None else max(WARM_UP, i - cap)
        reached = np.flatnonzero(x[lo:i] >= x[i])
        since = i - (lo + reached[-1]) if len(reached) else i - lo + 1
        out[i] = x[i] * (1 + factor * np.log(max(since, GATE) / GATE))
    return out


def left_matrix_profile(x, w=16):
    """Euclidean distance of each window of `w` samples to its nearest earlier,
    non-overlapping window within the last 6,000 (0 where there is none)."""
    n = len(x)
    out = np.zeros(n)
    sq = np.concatenate([[0.0], np.cumsum(x * x)])
    ss = np.full(n, np.nan)
    ss[w - 1 :] = sq[w:] - sq[:-w]
    qt = np.zeros(n)  # qt[j]: dot product of the windows ending at t and at j
    for t in range(w - 1, n):
        lo = max(w - 1, t - HISTORY)
        if t > w - 1:
            a = max(w, lo)
            qt[a:t] = qt[a - 1 : t - 1] - x[t - w] * x[a - w : t - w] + x[t] * x[a:t]
            if lo == w - 1:
                qt[w - 1] = np.dot(x[t - w + 1 : t + 1], x[:w])
        qt[t] = ss[t]
        hi = t - w
        if hi >= lo:
            d2 = ss[t] + ss[lo : hi + 1] - 2 * qt[lo : hi + 1]
            out[t] = np.sqrt(max(d2.min(), 0.0))
    return out


def extra_deviations(values):
    s = pd.Series(values)
    median = s.rolling(HISTORY, min_periods=1).median().values
    dx = np.abs(np.diff(values, prepend=values[0]))
    rolling_max = s.rolling(GATE, min_periods=1).max().values
    back5 = np.concatenate([np.full(5, values[0]), values[:-5]])
    return {
        "volatility": calibrated(pd.Series(dx).rolling(50, min_periods=1).mean().values),
        "quiet": calibrated(
            np.maximum(0, pd.Series(rolling_max).rolling(HISTORY, min_periods=1).median().values - rolling_max)
        ),
        "shift20": calibrated(np.abs(s.rolling(20, min_periods=1).mean().values - median)),
        "jump": calibrated(np.abs(values - back5)),
        "shape": calibrated(left_matrix_profile(values)),
    }


def score(args, work, per, name, scores):
    out = os.path.join(work, "variant")
    for key, s in scores.items():
        ts, values = per[key]["ts"], per[key]["values"]
        path = os.path.join(out, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("timestamp,value,anomaly_score,label\n")
            for t, v, x in zip(ts, values, s):
                f.write(f"{t},{v!r},{x / (x + 0.25):.9f},0\n")
    stdout = healer_eval(args, ["--scores", out])
    line = next(l for l in stdout.splitlines() if "scores in" in l)
    print(f"{name:<72} {' / '.join(line.split()[-3:])}", flush=True)


def variants(per):
    """(name, {file: report scores}) for every variant in the README's table."""
    combined = {k: p["ratio"] for k, p in per.items()}
    extra = {k: extra_deviations(p["values"]) for k, p in per.items()}
    yield "bundled rule (this path)", {k: surprise(x) for k, x in combined.items()}
    for name, label in [
        ("volatility", "fifth deviation: volatility, mean |dx| over 50 rows"),
        ("quiet", "fifth deviation: the 100-row maximum's fall below its median"),
        ("shift20", "fifth deviation: |mean of 20 - median|"),
        ("shape", "fifth deviation: left matrix profile, 16 samples"),
        ("jump", "fifth deviation: |x - the sample 5 rows back|"),
    ]:
        yield label, {k: surprise(np.maximum(x, extra[k][name])) for k, x in combined.items()}
    yield "day and week ratios weighted 0.9", {
        k: surprise(np.maximum.reduce([p["r_value"], p["r_recent"], 0.9 * p["r_day"], 0.9 * p["r_week"]]))
        for k, p in per.items()
    }
    own = {}
    for k, p in per.items():
        x = p["ratio"]
        candidates = (x > 1) & (x >= running_max(x, GATE))
        best = np.zeros(len(x))
        for d in DEVIATIONS:
            r = p[f"r_{d}"]
            best = np.maximum(best, np.where(candidates, r * (1 + 0.02 * np.log(level(r, candidates) / GATE)), 0))
        own[k] = best
    yield "each deviation's own surprise level, the largest taken", own
    penalised = {}
    for k, x in combined.items():
        above = (x > 1).astype(float)
        c = np.concatenate([[0.0], np.cumsum(above)])
        i = np.arange(len(x)) + 1
        count = c[i] - c[np.maximum(0, i - 300)] - above
        penalised[k] = surprise(x) * (1 - 0.002 * np.minimum(count, 50))
    yield "surprise x (1 - 0.002 x ratios above 1 in the last 300 rows)", penalised
    yield "candidates from a ratio of 0.9, surprise 1 + 0.05 ln(L/100)", {
        k: surprise(x, factor=0.05, floor=0.9) for k, x in combined.items()
    }
    agreeing = {}
    for k, p in per.items():
        above = sum((np.nan_to_num(p[f"r_{d}"]) > 1).astype(float) for d in DEVIATIONS)
        agreeing[k] = surprise(p["ratio"]) * (1 + 0.02 * np.maximum(above - 1, 0))
    yield "surprise x (1 + 0.02 x (deviations above 1, less one))", agreeing
    yield "surprise levels up to 12,000 rows", {
        k: surprise(x, levels=LEVELS + (12_000,)) for k, x in combined.items()
    }
    yield "surprise L: rows since the ratio last reached it, at most 6,000", {
        k: continuous_surprise(x) for k, x in combined.items()
    }
    yield "surprise L: rows since the ratio last reached it, since the warm-up", {
        k: continuous_surprise(x, cap=None) for k, x in combined.items()
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--healer", required=True, help="the healer binary (a release build)")
    parser.add_argument("--dataset", required=True, help="NAB's layout: data/, labels/")
    parser.add_argument("--labels", help="another labels file in NAB's format (e.g. NAB's own, all 58 files)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        per = ratios_of(args, work)
        print(f"{'variant':<72} standard / low FP / low FN")
        for name, scores in variants(per):
            score(args, work, per, name, scores)
