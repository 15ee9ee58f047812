"""A local OTLP/HTTP endpoint for the telemetry benchmark: takes every export, answers 200.

It reads each body whole and counts requests and bytes (``GET /count``), as a collector's
receiver would before batching; it decodes nothing, so its own cost stays small.

    .venv/bin/python -m bench.otlp_sink PORT
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_counts = {"requests": 0, "bytes": 0}
_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        size = len(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with _lock:
            _counts["requests"] += 1
            _counts["bytes"] += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        with _lock:
            body = json.dumps(_counts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _Handler).serve_forever()


if __name__ == "__main__":
    main()
