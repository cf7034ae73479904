"""moto's server on 127.0.0.1, answering one request at a time.

Stock `moto_server` is threaded and not atomic: two concurrent conditional writes on one
DynamoDB item can both succeed, which would make a lease table lie. Serialising requests
gives the atomicity DynamoDB has. Prints `listening <port>` once it accepts connections.
"""

import argparse
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serial(environ, start_response):
        # The whole request, body included, runs under the lock.
        with lock:
            body = app(environ, start_response)
            try:
                return [b"".join(body)]
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()

    server = make_server("127.0.0.1", args.port, serial, threaded=True)
    print(f"listening {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
