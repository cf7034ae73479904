#!/usr/bin/env python3
"""healer replay vs its peers on the rolling z-score, timed in the same run.

Workload (../shared/peer-bench): R resources x T seconds x 16 metrics in one parquet file,
rolling z-score over the last 300 samples per (resource, metric), |z| > 3 flags.

* healer: the whole process, `healer replay` from parquet to incident-log files (the
  zscore_300 rule, SQL planned by DataFusion, healer's incremental window operators).
* peers: the kit's own `peers.py` (numpy 2 threads, Polars, DuckDB, ...), which report
  load time and compute time separately; we report both and compare healer's end-to-end
  time with the peers' compute-only time (the comparison most favourable to the peers) and
  with their load + compute.

Peak RSS: healer's from wait4(2) of its own process; the peers' as the kit measures them
(VmHWM of the peer's process).

Usage: python3 benches/peer_zscore.py --healer target/release/healer [--R 1000 --T 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The reference rolling z-score rule, which the peers compute too.
ZSCORE = HERE / ".." / "sql" / "rules" / "zscore.sql"
KIT = (HERE / ".." / ".." / "shared" / "peer-bench").resolve()


def run_healer(healer: str, data: Path, partitions: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="healer-bench-"))
    summary = out / "summary.json"
    cmd = [healer, "replay", "--input", str(data), "--out", str(out / "log"), "--quiet",
           "--rules", str(ZSCORE), "--partitions", str(partitions), "--summary-json", str(summary)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"healer failed: {stderr}\n{stdout}")
    s = json.loads(summary.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return dict(peer=f"healer (p={partitions})", wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                peak_rss_mb=usage.ru_maxrss / 1024, cells=s["cells"], flags=s["anomalies"],
                inner_s=s["elapsed_s"])


def run_peer(python: str, peer: str, data: Path) -> dict:
    cmd = [python, str(KIT / "peers.py"), peer, "--data", str(data)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=KIT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            return dict(peer=r.get("peer", peer), load_s=r["load_s"], compute_s=r["compute_s"],
                        peak_rss_mb=r.get("peak_rss_mb"), cells=r["cells"], flags=r.get("flags"))
    raise SystemExit(f"peer {peer} failed:\n{p.stdout}\n{p.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--healer", required=True, help="path to a release build of healer")
    ap.add_argument("--python", default=os.environ.get("PEER_BENCH_PYTHON", "/var/tmp/healer-peer-venv/bin/python"))
    ap.add_argument("--R", type=int, default=1000)
    ap.add_argument("--T", type=int, default=10_000)
    ap.add_argument("--data-dir", default="/var/tmp/healer-bench-data")
    ap.add_argument("--peers", default="numpy2,polars,duckdb")
    ap.add_argument("--partitions", default="2")
    ap.add_argument("--out", default=str(HERE / "results" / "peer_zscore.json"))
    args = ap.parse_args()

    data_dir = Path(args.data_dir)
    data = data_dir / f"wide_R{args.R}_T{args.T}_s42.parquet"
    if not data.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([args.python, str(KIT / "gen_data.py"), "-R", str(args.R), "-T", str(args.T),
                        "--out", str(data_dir)], check=True, cwd=KIT)
    rows = []
    for p in args.partitions.split(","):
        rows.append(run_healer(args.healer, data, int(p)))
    for peer in [p for p in args.peers.split(",") if p]:
        rows.append(run_peer(args.python, peer, data))
    base = min((r for r in rows if "wall_s" in r), key=lambda r: r["wall_s"])  # fastest healer
    print(f"\nrolling z-score, R={args.R} T={args.T} ({base['cells'] / 1e6:.0f} M cells), {os.cpu_count()} cores\n")
    print("| engine | end-to-end s | compute s | M cells/s | healer speed-up | peak RSS MB | flags |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "wall_s" in r:
            rate = r["cells"] / r["wall_s"] / 1e6
            print(f"| {r['peer']} | {r['wall_s']:.2f} | (whole process) | {rate:.1f} | - | {r['peak_rss_mb']:.0f} | {r['flags']} |")
        else:
            total = r["load_s"] + r["compute_s"]
            rate = r["cells"] / r["compute_s"] / 1e6
            print(f"| {r['peer']} | {total:.2f} | {r['compute_s']:.2f} | {rate:.1f} (compute) | "
                  f"{r['compute_s'] / base['wall_s']:.1f}x vs compute, {total / base['wall_s']:.1f}x vs total | "
                  f"{(r['peak_rss_mb'] or 0):.0f} | {r['flags']} |")
    ref = next((r for r in rows if r["peer"].startswith("numpy")), None)
    if ref is not None:
        bad = [r["peer"] for r in rows if r["flags"] != ref["flags"]]
        print(f"\nflags agree with {ref['peer']}: " + ("yes" if not bad else f"NO ({', '.join(bad)})"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(R=args.R, T=args.T, rows=rows), indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    sys.exit(main())
