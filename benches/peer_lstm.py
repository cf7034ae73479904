#!/usr/bin/env python3
"""healer's LSTM forecaster against onnxruntime's Python API, timed in the same run.

    python3 benches/peer_lstm.py --bench "$CARGO_TARGET_DIR/release/lstm" \
        --smd ../shared/datasets/smd [--windows 16384] [--lib LIBONNXRUNTIME]

The workload: --windows windows of 60 consecutive values drawn (seeded) from the SMD test
files (every machine, every column), the same for everyone. Each side normalises every
window as models/lstm/manifest.json says (mean, floored population std, in float64), runs
forecaster.onnx in fixed batches of 64 (padding the last), and de-normalises the output.

* Python: onnxruntime's InferenceSession with numpy doing the normalisation, 1 intra-op
  thread, and the default (all cores); best of 3.
* healer: the `lstm` bench binary on the native backend (the same libonnxruntime the Python
  wheel ships, loaded by dlopen) and on the pure-Rust tract backend, on 1 and 2 threads (the
  windows split over threads, one single-threaded session each, as pipeline workers run);
  best of 3.

The script checks that every healer forecast equals Python's to 1e-6 of the window's scale,
prints a table of sequences/s with ratios, and writes results/peer_lstm.json.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import best_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="healer's release `lstm` bench binary")
    ap.add_argument("--smd", required=True)
    ap.add_argument("--model", default=os.path.join(HERE, "..", "models", "lstm"))
    ap.add_argument("--windows", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--lib", default=os.path.join(os.path.dirname(ort.__file__), "capi",
                                                 "libonnxruntime.so." + ort.__version__))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "peer_lstm.json"))
    args = ap.parse_args()

    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    n, batch = manifest["window"], manifest["input"]["shape"][0]
    eps_rel = manifest["normalisation"]["eps_rel"]

    rng = np.random.default_rng(args.seed)
    series = [c for f in sorted(glob.glob(os.path.join(args.smd, "test", "machine-*.txt")))
              for c in np.loadtxt(f, delimiter=",").T]
    windows = np.empty((args.windows, n))
    for k in range(args.windows):
        s = series[rng.integers(len(series))]
        o = rng.integers(len(s) - n)
        windows[k] = s[o:o + n]

    def python_forecast(sess):
        mean = windows.mean(axis=1)
        std = np.sqrt(((windows - mean[:, None]) ** 2).mean(axis=1))
        scale = np.maximum(std, eps_rel * np.maximum(np.abs(mean), 1.0))
        z = ((windows - mean[:, None]) / scale[:, None]).astype(np.float32)[..., None]
        out = np.empty(len(z), dtype=np.float32)
        for i in range(0, len(z), batch):
            chunk = z[i:i + batch]
            m = len(chunk)
            if m < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - m, n, 1), np.float32)])
            out[i:i + m] = sess.run(["output"], {"input": chunk})[0][:m, 0]
        return mean + scale * out.astype(np.float64), scale

    onnx_file = os.path.join(args.model, manifest["file"])
    py = {}
    for threads in (1, 0):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(onnx_file, so, providers=["CPUExecutionProvider"])
        expected, scale = python_forecast(sess)
        secs = best_of(3, lambda: python_forecast(sess))
        py["1" if threads == 1 else "default"] = {"seconds": secs,
                                                 "sequences_per_s": args.windows / secs}

    tmp = tempfile.mkdtemp(prefix="healer-lstm-")
    wpath = os.path.join(tmp, "windows.f64")
    windows.astype("<f8").tofile(wpath)
    healer = {}
    for backend in ("native", "tract"):
        opath = os.path.join(tmp, f"{backend}.f64")
        run = subprocess.run([args.bench, "--model", args.model, "--windows", wpath,
                              "--out", opath, "--backend", backend, "--lib", args.lib,
                              "--threads", "1,2"], check=True, capture_output=True, text=True)
        res = json.loads(run.stdout.strip().splitlines()[-1])
        got = np.fromfile(opath, dtype="<f8")
        res["max_error_of_scale"] = float(np.max(np.abs(got - expected) / scale))
        if res["max_error_of_scale"] > 1e-6:
            raise SystemExit(f"{backend}: forecasts differ from Python's by "
                             f"{res['max_error_of_scale']:.2e} of the window scale")
        healer[backend] = res

    base1, base_default = py["1"]["sequences_per_s"], py["default"]["sequences_per_s"]
    print(f"{args.windows} windows of {n} from SMD test files, batches of {batch}\n")
    print(f"{'runner':<40} {'threads':>8} {'seq/s':>10} {'vs Python 1 thread':>19}")
    print(f"{'onnxruntime Python API':<40} {'1':>8} {base1:>10.0f} {1.0:>18.2f}x")
    print(f"{'onnxruntime Python API':<40} {'default':>8} {base_default:>10.0f} "
          f"{base_default / base1:>18.2f}x")
    for backend, res in healer.items():
        for t, r in res["threads"].items():
            print(f"{'healer, ' + backend:<40} {t:>8} {r['sequences_per_s']:>10.0f} "
                  f"{r['sequences_per_s'] / base1:>18.2f}x")
    result = {
        "windows": args.windows, "window": n, "batch": batch, "cpus": os.cpu_count(),
        "onnxruntime_version": ort.__version__, "python": py, "healer": healer,
        "ratios": {
            "healer_native_1_vs_python_1": healer["native"]["threads"]["1"]["sequences_per_s"] / base1,
            "healer_native_2_vs_python_default":
                healer["native"]["threads"]["2"]["sequences_per_s"] / base_default,
            "healer_tract_2_vs_python_default":
                healer["tract"]["threads"]["2"]["sequences_per_s"] / base_default,
        },
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
