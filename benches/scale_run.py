#!/usr/bin/env python3
"""Scale-out of `healer run`: throughput with 1, 2 and 4 workers sharing a stream through the
DynamoDB lease table, time to take over a killed worker's shards, and checkpoint overhead.

One kinesalite server and one moto DynamoDB (behind `.ci/servers/moto_serial.py`, which
serialises requests as DynamoDB is atomic) on 127.0.0.1, all in one run:

1. A backlog of N records (one JSON sample each, canonical schema) is put into a stream of S
   shards; the largest sequence number of every shard is kept.
2. Baseline: one `healer run` without leases reads the backlog (its `--status-file` shows
   the records read); its time is from process start to the last record read.
3. For W = 1, 2, 4: W `healer run --worker-id` processes with a fresh lease table start at
   once, each capped at its share of leases (`max_leases`), so the first one up does not
   read everything before the others join. Its rate is over the time from their start to
   the last record read (the sum of their status files), as for the baseline; the time
   until every lease in the table holds its shard's last sequence number as checkpoint
   (the work made durable, one checkpoint interval later at most) is reported too.
4. Takeover: with 2 workers idle at the tip, one is killed with SIGKILL; the time is until
   the lease table shows every lease owned by the survivor (polled every 20 ms). Repeated
   `--kills` times (the killed worker is started again and the leases rebalance first).
5. Checkpoint cost: the `checkpoint written … elapsed_ms` lines of every worker's log
   (state object + one lease transaction + publishing the epoch's files, or the single
   worker's checkpoint file), as median and p95.

The machine has 2 cores: more workers than cores share them, so throughput cannot grow
past 2 workers here; what the run shows is that sharing costs little and that work moves.

Usage:
  python3 benches/scale_run.py --healer <target>/release/healer [--records 120000]
      [--shards 8] [--workers 1,2,4] [--kills 3] [--out benches/results/scale_run.json]

Needs node with kinesalite (`.ci/test` installs it; set HEALER_NODE_MODULES), and a Python
with moto and boto3 (the test venv; `.ci/test` builds it).
"""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import boto3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kinesis_run import REPO, ZSCORE, Kinesis, read_status, sample, start_kinesalite  # noqa: E402


def start_dynamo():
    p = subprocess.Popen([sys.executable, os.path.join(REPO, ".ci/servers/moto_serial.py"),
                          "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("listening "):
        raise RuntimeError(f"moto did not start: {line!r}")
    return p, int(line.split()[1])


def put_backlog(k, stream, args):
    """Puts the backlog; returns the largest sequence number per shard."""
    k.create(stream, args.shards)
    rng = random.Random(1)
    resources = [f"svc{r % 10}-{r:03d}" for r in range(args.resources)]
    t0 = 1_767_225_600_000
    last = {}
    batch = []
    for i in range(args.records):
        r = resources[i % len(resources)]
        batch.append((r, sample(r, t0 + (i // len(resources)) * 1000, rng)))
        if len(batch) == len(resources) or i == args.records - 1:
            for rec in k.put(stream, batch):
                seq = int(rec["SequenceNumber"])
                last[rec["ShardId"]] = max(last.get(rec["ShardId"], 0), seq)
            batch = []
    return last


def write_config(path, table, dynamo_port, interval, max_leases=100):
    with open(path, "w") as f:
        f.write(f"""[source.kinesis]
poll_interval = "200ms"
max_poll_interval = "1s"
batch_max_delay = "200ms"
idle_timeout = "5s"
[engine]
partitions = 1
[sink]
flush_interval = "1s"
[checkpoint]
interval = "{interval}"
""")
        if table:
            f.write(f"""[lease]
table = "{table}"
endpoint = "http://127.0.0.1:{dynamo_port}"
duration = "10s"
renew_interval = "3s"
sync_interval = "10s"
max_leases = {max_leases}
""")


def spawn(args, kport, stream, out, config, status, log, worker=None):
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_REGION="us-east-1", HEALER_LOG="info")
    cmd = [args.healer, "run", "--config", config, "--stream", stream, "--endpoint",
           f"http://127.0.0.1:{kport}", "--out", out, "--status-file", status,
           "--rules", str(ZSCORE)]
    if worker:
        cmd += ["--worker-id", worker]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def leases(ddb, table):
    items = []
    kwargs = {"TableName": table, "ConsistentRead": True}
    while True:
        try:
            out = ddb.scan(**kwargs)
        except ddb.exceptions.ResourceNotFoundException:
            return []
        items += out["Items"]
        if "LastEvaluatedKey" not in out:
            return items
        kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]


def caught_up(items, last):
    if len(items) < len(last):
        return False
    for it in items:
        cp = it.get("checkpoint", {}).get("S", "")
        shard = it["leaseKey"]["S"]
        if not cp.isdigit() or int(cp) < last.get(shard, 0):
            return False
    return True


def checkpoint_ms(logs):
    ms = []
    for path in logs:
        with open(path) as f:
            for line in f:
                m = re.search(r"checkpoint written.*elapsed_ms=(\d+)", line)
                if m:
                    ms.append(int(m.group(1)))
    return ms


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()


def summary(xs):
    if not xs:
        return None
    xs = sorted(xs)
    return {"n": len(xs), "median": statistics.median(xs),
            "p95": xs[min(len(xs) - 1, int(0.95 * len(xs)))], "max": xs[-1]}


class _kept:
    def __enter__(self):
        path = tempfile.mkdtemp(prefix="scale-run-")
        print(f"logs in {path}", flush=True)
        return path

    def __exit__(self, *exc):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--healer", required=True)
    ap.add_argument("--records", type=int, default=120_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--resources", type=int, default=200)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--interval", default="2s", help="checkpoint interval")
    ap.add_argument("--out")
    ap.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    args = ap.parse_args()
    kin, kport = start_kinesalite()
    dyn, dport = start_dynamo()
    ddb = boto3.client("dynamodb", endpoint_url=f"http://127.0.0.1:{dport}",
                       region_name="us-east-1", aws_access_key_id="bench",
                       aws_secret_access_key="bench")
    result = {"records": args.records, "shards": args.shards, "resources": args.resources,
              "checkpoint_interval": args.interval, "cores": os.cpu_count()}
    try:
        with (tempfile.TemporaryDirectory() if not args.keep else _kept()) as tmp:
            k = Kinesis(kport)
            started = time.perf_counter()
            last = put_backlog(k, "backlog", args)
            result["put_s"] = time.perf_counter() - started

            # Baseline: one worker, no leases.
            config = os.path.join(tmp, "single.toml")
            write_config(config, None, dport, args.interval)
            status = os.path.join(tmp, "single.json")
            log = os.path.join(tmp, "single.log")
            started = time.perf_counter()
            p = spawn(args, kport, "backlog", os.path.join(tmp, "single"), config, status, log)
            while True:
                st = read_status(status)
                if st and st["records"] >= args.records:
                    break
                if time.perf_counter() - started > 900:
                    raise RuntimeError(f"single worker did not finish: {st}")
                time.sleep(0.02)
            single_s = time.perf_counter() - started
            time.sleep(float(args.interval.rstrip("s")) + 0.5)
            stop([p])
            result["single"] = {"seconds": single_s, "records_per_s": args.records / single_s,
                                "checkpoint_ms": summary(checkpoint_ms([log]))}
            print(f"single worker, no leases: {args.records / single_s:,.0f} records/s",
                  flush=True)

            runs = []
            for w in [int(x) for x in args.workers.split(",")]:
                table = f"leases-{w}"
                config = os.path.join(tmp, f"w{w}.toml")
                # Each worker takes at most its share, so that the first one up does not
                # read the whole backlog before the others have joined.
                write_config(config, table, dport, args.interval, -(-args.shards // w))
                out = os.path.join(tmp, f"out{w}")
                logs = [os.path.join(tmp, f"w{w}-{i}.log") for i in range(w)]
                started = time.perf_counter()
                procs = [spawn(args, kport, "backlog", out, config,
                               os.path.join(tmp, f"w{w}-{i}.json"), logs[i], f"w{i}")
                         for i in range(w)]
                statuses = [os.path.join(tmp, f"w{w}-{i}.json") for i in range(w)]
                read_s = None
                while not caught_up(leases(ddb, table), last):
                    if read_s is None and sum((read_status(p) or {}).get("records", 0)
                                              for p in statuses) >= args.records:
                        read_s = time.perf_counter() - started
                    if time.perf_counter() - started > 900:
                        raise RuntimeError(f"{w} workers did not finish")
                    for p in procs:
                        if p.poll() is not None:
                            raise RuntimeError(f"a worker exited: {open(logs[0]).read()[-2000:]}")
                    time.sleep(0.05)
                secs = time.perf_counter() - started
                owners = {}
                for it in leases(ddb, table):
                    o = it.get("leaseOwner", {}).get("S")
                    owners[o] = owners.get(o, 0) + 1
                read_s = read_s or secs
                run = {"workers": w, "read_s": read_s, "records_per_s": args.records / read_s,
                       "vs_single": (args.records / read_s) / result["single"]["records_per_s"],
                       "durable_s": secs,
                       "leases_per_worker": sorted(owners.values()),
                       "checkpoint_ms": summary(checkpoint_ms(logs))}
                print(f"{w} worker(s): {run['records_per_s']:,.0f} records/s "
                      f"({run['vs_single']:.2f}x single), all checkpointed in the lease table "
                      f"after {secs:.1f} s, leases {run['leases_per_worker']}, "
                      f"checkpoint {run['checkpoint_ms']}", flush=True)
                stop(procs)
                runs.append(run)
            result["leased"] = runs

            if args.kills:
                # Takeover: 2 workers without a cap, idle at the tip of the stream.
                w, table = 2, "leases-takeover"
                config = os.path.join(tmp, "takeover.toml")
                write_config(config, table, dport, args.interval)
                out = os.path.join(tmp, "takeover")
                procs = [spawn(args, kport, "backlog", out, config,
                               os.path.join(tmp, f"t-{i}.json"), os.path.join(tmp, f"t-{i}.log"),
                               f"w{i}") for i in range(w)]
                run = {}
                takeovers = []
                for kill in range(args.kills):
                    # Wait for balance, then SIGKILL the first worker.
                    deadline = time.perf_counter() + 120
                    while True:
                        items = leases(ddb, table)
                        counts = {}
                        for it in items:
                            o = it.get("leaseOwner", {}).get("S")
                            counts[o] = counts.get(o, 0) + 1
                        if counts.get("w0") and counts.get("w1") and \
                                abs(counts["w0"] - counts["w1"]) <= 1:
                            break
                        if time.perf_counter() > deadline:
                            raise RuntimeError(f"no balance before kill {kill}: {counts}")
                        time.sleep(0.1)
                    procs[0].kill()
                    procs[0].wait()
                    t = time.perf_counter()
                    while not all(it.get("leaseOwner", {}).get("S") == "w1"
                                  for it in leases(ddb, table)):
                        if time.perf_counter() - t > 120:
                            raise RuntimeError("no takeover")
                        time.sleep(0.02)
                    takeovers.append(time.perf_counter() - t)
                    print(f"  takeover after SIGKILL: {takeovers[-1]:.2f} s", flush=True)
                    procs[0] = spawn(args, kport, "backlog", out, config,
                                     os.path.join(tmp, f"w{w}-0.json"),
                                     os.path.join(tmp, f"w{w}-0-{kill}.log"), "w0")
                run["takeover_s"] = takeovers
                run["lease_duration_s"] = 10
                run["renew_interval_s"] = 3
                stop(procs)
                result["takeover"] = run
    finally:
        for p in (kin, dyn):
            p.kill()
            p.wait()
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
