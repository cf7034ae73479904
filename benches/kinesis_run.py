#!/usr/bin/env python3
"""`healer run` against kinesalite on 127.0.0.1: sustained records/s, and the latency from
`PutRecords` to the anomaly row being durable in the incident log.

Two phases, one kinesalite server, all in one run:

1. Throughput. A backlog of N records (one JSON sample each, canonical schema) is put into a
   stream of S shards. A plain reader (this script: GetRecords as fast as the emulator answers,
   shard after shard, 10,000 records per call) reads it all: that is the emulator's delivery
   rate. Then `healer run` reads the same stream from its trim horizon; its rate is N over
   the time from its first record to its last (from `--status-file`), and also over its whole
   process time. healer keeps up when its rate is at least the plain reader's.
2. Latency. An empty stream, `healer run` reading it, and a producer putting R records/s with
   `ts` = now for a fleet of resources. After every resource has a full 300-sample window, a
   spike (the current value + 40 σ on `cpu_percent`) goes into one resource every 0.5 s. The
   latency of a spike is the time from its `PutRecords` returning to the first moment a
   parquet file holding its anomaly row is in the log (the log is polled every 10 ms).

Usage:
  python3 benches/kinesis_run.py --healer <target>/release/healer [--records 200000]
      [--shards 4] [--rate 4000] [--seconds 30] [--out benches/results/kinesis_run.json]

Needs node with kinesalite (`.ci/test` installs it; set HEALER_NODE_MODULES) and pyarrow.
"""

import argparse
import base64
import glob
import http.client
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference rolling z-score rule, so that figures compare across detector changes.
ZSCORE = os.path.join(REPO, "sql", "rules", "zscore.sql")
METRICS = [
    "cpu_percent", "memory_percent", "disk_io_read_mb", "disk_io_write_mb", "network_in_mb",
    "network_out_mb", "active_connections", "error_rate", "p95_latency_ms", "p99_latency_ms",
    "request_rate", "cache_hit_rate", "db_connections", "queue_depth", "gc_pause_ms",
    "thread_count",
]


class Kinesis:
    """The Kinesis JSON API, unsigned (kinesalite checks the headers' presence, not the
    signature)."""

    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, op, body):
        headers = {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"Kinesis_20131202.{op}",
            "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "Authorization": "AWS4-HMAC-SHA256 Credential=bench/20260101/us-east-1/kinesis/"
                             "aws4_request, SignedHeaders=host;x-amz-date, Signature=00",
        }
        self.conn.request("POST", "/", json.dumps(body), headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{op}: HTTP {r.status} {data[:300]!r}")
        return json.loads(data) if data else {}

    def create(self, stream, shards):
        self.call("CreateStream", {"StreamName": stream, "ShardCount": shards})
        while self.call("DescribeStreamSummary", {"StreamName": stream})[
                "StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
            time.sleep(0.05)

    def put(self, stream, records):
        """records: [(partition_key, bytes)]; retries failed entries. Returns each record's
        result (ShardId, SequenceNumber), in order."""
        results = [None] * len(records)
        pending = list(range(len(records)))
        while pending:
            out = self.call("PutRecords", {"StreamName": stream, "Records": [
                {"PartitionKey": records[i][0], "Data": base64.b64encode(records[i][1]).decode()}
                for i in pending]})
            retry = []
            for i, r in zip(pending, out["Records"]):
                if "ErrorCode" in r:
                    retry.append(i)
                else:
                    results[i] = r
            pending = retry
            if pending:
                time.sleep(0.05)
        return results


def sample(resource, ts, rng, spike=False):
    row = {"ts": ts, "resource": resource, "service": resource.split("-")[0], "region": "bench"}
    for i, m in enumerate(METRICS):
        row[m] = round(50.0 + 5.0 * math.sin(i + ts / 60000.0) + rng.gauss(0.0, 1.0), 6)
    if spike:
        row["cpu_percent"] += 40.0
    return json.dumps(row, separators=(",", ":")).encode()


def start_kinesalite():
    modules = os.environ.get("HEALER_NODE_MODULES",
                             os.path.join("/var/tmp/healer-ci-node", "node_modules"))
    p = subprocess.Popen(["node", os.path.join(REPO, ".ci/servers/kinesalite.js"), "0"],
                         env=dict(os.environ, NODE_PATH=modules), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("listening "):
        raise RuntimeError(f"kinesalite did not start: {line!r}")
    return p, int(line.split()[1])


def write_config(path, poll, batch_delay, flush):
    with open(path, "w") as f:
        f.write(f"""[source.kinesis]
poll_interval = "{poll}"
max_poll_interval = "1s"
batch_max_delay = "{batch_delay}"
idle_timeout = "5s"
[engine]
partitions = 2
[sink]
flush_interval = "{flush}"
[checkpoint]
interval = "10s"
""")


def run_healer(args, port, stream, out, config, status):
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_REGION="us-east-1", HEALER_LOG="warn")
    return subprocess.Popen(
        [args.healer, "run", "--config", config, "--stream", stream, "--endpoint",
         f"http://127.0.0.1:{port}", "--out", out, "--status-file", status,
         "--rules", str(ZSCORE)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_status(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def throughput(args, port, tmp):
    k = Kinesis(port)
    k.create("backlog", args.shards)
    rng = random.Random(1)
    resources = [f"svc{r % 10}-{r:03d}" for r in range(args.resources)]
    t0 = 1_767_225_600_000
    started = time.perf_counter()
    batch = []
    for i in range(args.records):
        r = resources[i % len(resources)]
        batch.append((r, sample(r, t0 + (i // len(resources)) * 1000, rng)))
        if len(batch) == len(resources) or i == args.records - 1:
            k.put("backlog", batch)
            batch = []
    put_s = time.perf_counter() - started

    # The plain reader: every shard to its end, as fast as the emulator answers.
    shards = k.call("ListShards", {"StreamName": "backlog"})["Shards"]
    started = time.perf_counter()
    read = 0
    for s in shards:
        it = k.call("GetShardIterator", {"StreamName": "backlog", "ShardId": s["ShardId"],
                                         "ShardIteratorType": "TRIM_HORIZON"})["ShardIterator"]
        while it:
            out = k.call("GetRecords", {"ShardIterator": it, "Limit": 10000})
            read += len(out["Records"])
            if not out["Records"] and out.get("MillisBehindLatest", 0) == 0:
                break
            it = out.get("NextShardIterator")
    raw_s = time.perf_counter() - started
    assert read == args.records, (read, args.records)

    out_dir = os.path.join(tmp, "throughput")
    config = os.path.join(tmp, "throughput.toml")
    status = os.path.join(tmp, "throughput.json")
    write_config(config, "200ms", "200ms", "1s")
    started = time.perf_counter()
    healer = run_healer(args, port, "backlog", out_dir, config, status)
    first_records = first_elapsed = None
    while True:
        st = read_status(status)
        now = time.perf_counter()
        if st and st["records"] > 0 and first_records is None:
            # The first status sample with records read: the steady rate is measured from
            # here, on healer's own clock.
            first_records, first_elapsed = st["records"], st["elapsed_s"]
        if st and st["records"] >= args.records:
            done = now
            final = st
            break
        if now - started > 600:
            healer.kill()
            raise RuntimeError(f"healer did not read the backlog: {st}")
        time.sleep(0.02)
    healer.send_signal(signal.SIGTERM)
    code = healer.wait()
    # Rate over the status samples (both taken by healer's own clock).
    rate_steady = (final["records"] - first_records) / max(final["elapsed_s"] - first_elapsed, 1e-9)
    return {
        "records": args.records,
        "shards": args.shards,
        "put_records_per_s": args.records / put_s,
        "plain_reader_records_per_s": args.records / raw_s,
        "healer_records_per_s_steady": rate_steady,
        "healer_records_per_s_whole_process": args.records / (done - started),
        "healer_rows": final["rows"],
        "healer_late_rows": final["late_rows"],
        "healer_throttled": final["throttled"],
        "healer_exit_code": code,
    }


def latency(args, port, tmp):
    k = Kinesis(port)
    k.create("live", args.shards)
    out_dir = os.path.join(tmp, "latency")
    config = os.path.join(tmp, "latency.toml")
    status = os.path.join(tmp, "latency.json")
    write_config(config, "200ms", "50ms", "100ms")
    healer = run_healer(args, port, "live", out_dir, config, status)
    time.sleep(1.0)

    spikes = {}  # (resource, ts) -> put time
    lock = threading.Lock()
    seen = {}
    stop = threading.Event()

    def poll():
        known = set()
        while not stop.is_set():
            for path in glob.glob(os.path.join(out_dir, "anomalies", "*", "*.parquet")):
                if path in known:
                    continue
                now = time.perf_counter()
                known.add(path)
                t = pq.read_table(path, columns=["ts", "resource", "metric"]).to_pylist()
                with lock:
                    for row in t:
                        if row["metric"] != "cpu_percent":
                            continue
                        key = (row["resource"], int(row["ts"].timestamp() * 1000))
                        if key in spikes and key not in seen:
                            seen[key] = now
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rng = random.Random(2)
    resources = [f"svc{r % 10}-{r:03d}" for r in range(args.live_resources)]
    per_tick = max(1, int(args.rate * 0.02))
    warmup_records = 320 * len(resources)
    sent = 0
    next_spike = None
    last_ts = 0
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        tick = time.perf_counter()
        batch = []
        spike_keys = []
        for _ in range(per_tick):
            r = resources[sent % len(resources)]
            ts = max(int(time.time() * 1000), last_ts)
            last_ts = ts
            spike = False
            if sent >= warmup_records and (next_spike is None or tick >= next_spike) \
                    and not spike_keys:
                spike = True
                next_spike = tick + 0.5
                spike_keys.append((r, ts))
            batch.append((r, sample(r, ts, rng, spike)))
            sent += 1
        k.put("live", batch)
        put_done = time.perf_counter()
        with lock:
            for key in spike_keys:
                spikes[key] = put_done
        time.sleep(max(0.0, 0.02 - (time.perf_counter() - tick)))
    produced_s = time.perf_counter() - started
    time.sleep(3.0)
    stop.set()
    poller.join()
    healer.send_signal(signal.SIGTERM)
    code = healer.wait()
    final = read_status(status) or {}
    lat = sorted((seen[k] - spikes[k]) * 1000 for k in spikes if k in seen)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else None

    return {
        "rate_records_per_s": sent / produced_s,
        "resources": len(resources),
        "spikes": len(spikes),
        "spikes_detected": len(lat),
        "latency_ms_p50": pct(50),
        "latency_ms_p99": pct(99),
        "latency_ms_max": lat[-1] if lat else None,
        "healer_late_rows": final.get("late_rows"),
        "healer_exit_code": code,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--healer", required=True)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--resources", type=int, default=200)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rate", type=int, default=4000)
    ap.add_argument("--live-resources", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--out", default=os.path.join(REPO, "benches/results/kinesis_run.json"))
    args = ap.parse_args()
    server, port = start_kinesalite()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"throughput": throughput(args, port, tmp)}
            print(json.dumps(result["throughput"], indent=2), flush=True)
            result["latency"] = latency(args, port, tmp)
            print(json.dumps(result["latency"], indent=2), flush=True)
    finally:
        server.terminate()
        server.wait()
    result["machine"] = {"cores": os.cpu_count()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
