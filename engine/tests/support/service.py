"""A small service for the process backend's tests: GET /health answers 200 with its release
(500 for a release whose name starts with "bad"), POST /drain answers 200. SIGTERM stops it."""
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])
release = sys.argv[sys.argv.index("--release") + 1]
drained = False


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            ok = not release.startswith("bad")
            self.answer(200 if ok else 500, {"release": release, "drained": drained})
        else:
            self.answer(404, {})

    def do_POST(self):
        global drained
        if self.path == "/drain":
            drained = True
            self.answer(200, {"drained": True})
        else:
            self.answer(404, {})


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server.serve_forever()
