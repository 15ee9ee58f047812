"""Time from an alert to the remediation's HTTP call, through the real system.

Starts `responder dev` (embedded Redis, SQLite ledger, receiver, worker, beat) with one rule that
calls a local HTTP target, and a real Alertmanager routing to it. Then, one alert at a time:
  1. `amtool alert add` -> the target receives the remediation's call (includes group_wait);
  2. a direct webhook POST -> 202 answered, and -> the target receives the call.
Prints each series' min / median / p90 / max in milliseconds.

    .venv/bin/python bench/alert_to_action.py [--alerts 10] [--group-wait 0s]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from workers.dev import free_port

ROOT = Path(__file__).resolve().parent.parent

INGEST, OPERATOR = "bench-ingest", "bench-operator"
calls: dict[str, float] = {}


class Target(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        calls[self.path] = time.time()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def wait(check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.005)
    raise SystemExit("timed out")


def up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def summary(name: str, values: list[float]) -> None:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    print(
        f"{name:<42} n={len(ms):<3} min {ms[0]:7.1f}  median {statistics.median(ms):7.1f}  p90 {p90:7.1f}  max {ms[-1]:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--alerts", type=int, default=10)
    parser.add_argument("--group-wait", default="0s")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="responder-bench-"))
    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    config = {
        "http_allowlist": ["127.0.0.1:*"],
        "rules": [
            {
                "name": "bench",
                "match": ['alertname="BenchProbe"'],
                "remediation": "http_request",
                "params": {"url": f"http://127.0.0.1:{target.server_port}/hook/{{{{ labels.instance }}}}"},
            }
        ],
    }
    (tmp / "responder.yaml").write_text(yaml.safe_dump(config))
    port, am_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESPONDER_")}
    env.update(
        RESPONDER_CONFIG=str(tmp / "responder.yaml"),
        RESPONDER_INGEST_TOKENS=INGEST,
        RESPONDER_OPERATOR_TOKENS=OPERATOR,
        RESPONDER_LOG_LEVEL="WARNING",
    )
    dev = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "dev", "--port", str(port), "--data-dir", str(tmp / "dev")],
        env=env,
        cwd=ROOT,
        stdout=(tmp / "dev.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    am_config = {
        "route": {
            "receiver": "r",
            "group_by": ["alertname", "instance"],
            "group_wait": args.group_wait,
            "group_interval": "1m",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "r",
                "webhook_configs": [
                    {
                        "url": f"http://127.0.0.1:{port}/api/v1/alertmanager",
                        "http_config": {"authorization": {"type": "Bearer", "credentials": INGEST}},
                    }
                ],
            }
        ],
    }
    (tmp / "am.yml").write_text(yaml.safe_dump(am_config))
    am = subprocess.Popen(
        [
            "prometheus-alertmanager",
            f"--config.file={tmp / 'am.yml'}",
            f"--storage.path={tmp / 'am'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",
        ],
        stdout=(tmp / "am.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait(lambda: up(f"http://127.0.0.1:{port}/healthz"), 60)
        wait(lambda: up(f"http://127.0.0.1:{am_port}/-/ready"), 60)
        time.sleep(3)  # let the worker finish starting
        amtool: list[float] = []
        for i in range(args.alerts):
            started = time.time()
            subprocess.run(
                [
                    "amtool",
                    "alert",
                    "add",
                    "alertname=BenchProbe",
                    f"instance=am-{i}",
                    f"--alertmanager.url=http://127.0.0.1:{am_port}",
                ],
                check=True,
                capture_output=True,
            )
            amtool.append(wait(lambda i=i: calls.get(f"/hook/am-{i}")) - started)
        answered: list[float] = []
        direct: list[float] = []
        for i in range(args.alerts):
            labels = {"alertname": "BenchProbe", "instance": f"direct-{i}"}
            body = {
                "version": "4",
                "status": "firing",
                "receiver": "r",
                "alerts": [
                    {
                        "status": "firing",
                        "labels": labels,
                        "startsAt": "2026-11-23T05:00:00Z",
                        "fingerprint": hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:16],
                    }
                ],
            }
            started = time.time()
            response = httpx.post(
                f"http://127.0.0.1:{port}/api/v1/alertmanager",
                json=body,
                headers={"Authorization": f"Bearer {INGEST}"},
                timeout=10,
            )
            answered.append(time.time() - started)
            response.raise_for_status()
            direct.append(wait(lambda i=i: calls.get(f"/hook/direct-{i}")) - started)
        print(
            f"alert-responder: responder dev (SQLite ledger, embedded Redis), Alertmanager group_wait={args.group_wait}"
        )
        summary("amtool alert add -> remediation HTTP call", amtool)
        summary("webhook POST -> 202 answered", answered)
        summary("webhook POST -> remediation HTTP call", direct)
    finally:
        am.terminate()
        dev.send_signal(signal.SIGINT)
        dev.wait(timeout=60)
        am.wait(timeout=10)
        target.shutdown()


if __name__ == "__main__":
    main()
