#!/usr/bin/env python3
"""A fault-injecting HTTP proxy on 127.0.0.1 in front of one Kinesis emulator (plain HTTP).

Usage:
  python3 .ci/servers/faulty_proxy.py --upstream http://127.0.0.1:PORT [--port 0]
      [--throttle-every N] [--error-every M] [--targets GetRecords,PutRecords]

Requests whose X-Amz-Target is `Kinesis_20131202.<Op>` with <Op> in --targets are
"matching" and counted from 1. The Nth, 2Nth, ... matching request gets HTTP 400
ProvisionedThroughputExceededException; otherwise the Mth, 2Mth, ... gets HTTP 500
InternalFailure (throttling wins when both fall on one request); 0 turns either off. An
injected fault never reaches the upstream. Every other request is forwarded verbatim
(method, path, headers, body) to the single upstream, and its answer sent back (status,
headers less hop-by-hop ones, body).

Prints exactly one line `listening <port>` to stdout once bound. `GET /__faults` answers the
counts so far as JSON: {"matched": .., "throttled": .., "errors": .., "forwarded": ..};
the same counts go to stderr on exit (SIGTERM or SIGINT). Python 3 standard library only.
"""

import argparse
import http.client
import json
import signal
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TARGET_PREFIX = "Kinesis_20131202."
AMZ_JSON = "application/x-amz-json-1.1"
THROTTLE_BODY = (
    b'{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for shard"}'
)
ERROR_BODY = b'{"__type":"InternalFailure","message":"injected"}'
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
UPSTREAM_TIMEOUT_S = 60


class Faults:
    """Decides, per matching request, whether to inject, and counts what happened."""

    def __init__(self, throttle_every, error_every, targets):
        self.throttle_every = throttle_every
        self.error_every = error_every
        self.targets = targets
        self.lock = threading.Lock()
        self.counts = {"matched": 0, "throttled": 0, "errors": 0, "forwarded": 0}

    def decide(self, amz_target):
        """'throttle', 'error' or None for one request with this X-Amz-Target."""
        op = amz_target[len(TARGET_PREFIX):] if amz_target.startswith(TARGET_PREFIX) else None
        with self.lock:
            if op is None or op not in self.targets:
                self.counts["forwarded"] += 1
                return None
            self.counts["matched"] += 1
            n = self.counts["matched"]
            if self.throttle_every and n % self.throttle_every == 0:
                self.counts["throttled"] += 1
                return "throttle"
            if self.error_every and n % self.error_every == 0:
                self.counts["errors"] += 1
                return "error"
            self.counts["forwarded"] += 1
            return None

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


def connection_tokens(headers):
    """Header names listed in Connection, which are hop-by-hop too."""
    names = set()
    for value in headers.get_all("Connection") or []:
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "faulty-proxy"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _reply(self, status, body, content_type=AMZ_JSON):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self):
        body = self._read_body()
        if self.command == "GET" and self.path == "/__faults":
            self._reply(200, json.dumps(self.server.faults.snapshot()).encode(), "application/json")
            return
        decision = self.server.faults.decide(self.headers.get("X-Amz-Target") or "")
        if decision == "throttle":
            self._reply(400, THROTTLE_BODY)
            return
        if decision == "error":
            self._reply(500, ERROR_BODY)
            return
        self._forward(body)

    def _forward(self, body):
        # Expect: 100-continue was already answered here; the body is read in full.
        skip = HOP_BY_HOP | connection_tokens(self.headers) | {"content-length", "expect"}
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in skip]
        up = self.server.upstream
        if self.headers.get("Host") is None:
            headers.append(("Host", up.netloc))
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self._reply(502, json.dumps({"__type": "ProxyError", "message": str(e)}).encode())
            return
        finally:
            conn.close()
        rskip = HOP_BY_HOP | connection_tokens(resp.headers) | {"content-length"}
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.headers.items():
            if k.lower() not in rskip:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


class Proxy(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the emulator")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0 picks a free one)")
    p.add_argument("--throttle-every", type=int, default=0, metavar="N")
    p.add_argument("--error-every", type=int, default=0, metavar="M")
    p.add_argument("--targets", default="", help="comma-separated Kinesis operations to fault")
    a = p.parse_args()

    up = urllib.parse.urlsplit(a.upstream)
    if up.scheme != "http" or not up.hostname or not up.port or up.path not in ("", "/"):
        p.error("--upstream must be http://HOST:PORT")
    if up.hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--upstream must be on the loopback interface")
    if a.throttle_every < 0 or a.error_every < 0:
        p.error("--throttle-every and --error-every must be >= 0")
    targets = {t.strip() for t in a.targets.split(",") if t.strip()}

    server = Proxy(("127.0.0.1", a.port), Handler)
    server.upstream = up
    server.faults = Faults(a.throttle_every, a.error_every, targets)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        print(f"faulty_proxy faults: {json.dumps(server.faults.snapshot())}", file=sys.stderr,
              flush=True)


if __name__ == "__main__":
    main()
