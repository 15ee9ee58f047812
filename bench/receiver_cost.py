"""Receiver cost: what one 3-alert webhook costs the receiver's process, without the network.

Throughput on a shared 2-core machine moves by a fifth between runs, and a change worth 3% is
lost in it. This script measures the cost instead: the receiver application, as ``responder
serve`` runs it (``receiver.app.serve_app``: warmed up, JSON logs at INFO, tracing quiet), in a
process of its own with its own Redis and a fresh ledger, is given webhooks straight to its ASGI
callable from ``--connections`` coroutines. Each goes the whole way (auth, validation, group
commit, publishing, the access line) except the socket. Printed: CPU time per webhook, all the
process's threads together (it still moves with the machine), and with ``--instructions`` the
instructions per webhook, counted by valgrind's callgrind over the measured webhooks only: a
figure that repeats within about 1% and compares two commits (``docs/benchmarks.md``).

    .venv/bin/python -m bench.receiver_cost [--webhooks 3000] [--databases sqlite,postgresql] [--instructions]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import INGEST, Bench, Report, alert, webhook

ALERTS_PER_WEBHOOK = 3
WARM_UP = 100
RESULT = "COST "


def _measure(webhooks: int, connections: int, log_path: Path, count_instructions: bool) -> dict[str, float]:
    """In the child: drive the application, return CPU microseconds per webhook."""
    sys.stdout = log_path.open("w")  # the application's log lines, as a service writes them
    from receiver.app import serve_app
    from workers.cli import _logging

    _logging("receiver")
    app = serve_app()
    bodies = [
        json.dumps(webhook([alert(f"{i}-{k}", run="cost") for k in range(ALERTS_PER_WEBHOOK)])).encode()
        for i in range(WARM_UP + webhooks)
    ]
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {INGEST}".encode()),
    ]

    async def post(body: bytes) -> None:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/api/v1/alertmanager",
            "raw_path": b"/api/v1/alertmanager",
            "query_string": b"",
            "root_path": "",
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        given = False
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [202]:
            raise SystemExit(f"bench: receiver_cost: answered {statuses}, expected 202")

    async def run() -> float:
        async with app.router.lifespan_context(app):
            queue = iter(bodies)
            await asyncio.gather(*(post(next(queue)) for _ in range(WARM_UP)))

            async def client() -> None:
                for body in queue:
                    await post(body)

            if count_instructions:
                subprocess.run(
                    ["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True
                )
            started = time.process_time()
            await asyncio.gather(*(client() for _ in range(connections)))
            used = time.process_time() - started
            if count_instructions:
                subprocess.run(
                    ["callgrind_control", "-i", "off", str(os.getpid())], check=True, capture_output=True
                )
            return used

    import uvloop  # the receiver's event loop (uvicorn[standard])

    used = uvloop.run(run())
    return {"cpu_us": used / webhooks * 1e6}


def _child(bench: Bench, database: str, args: argparse.Namespace) -> dict[str, float]:
    """Run the measurement in a process of its own (under callgrind with ``--instructions``)."""
    redis_url = bench.redis()
    ledger = bench.ledger(database)
    env = {**bench.env, **bench.responder_env(redis_url=redis_url, database_url=ledger, target_url=None)}
    argv = [sys.executable, "-m", "bench.receiver_cost", "--child", "--webhooks", str(args.webhooks)]
    argv += ["--connections", str(args.connections), "--log", str(bench.dir / "receiver.log")]
    out = bench.dir / "callgrind.out"
    if args.instructions:
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]
        argv.append("--instructions")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith(RESULT)), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(
            f"bench: receiver_cost: the measurement failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    figures: dict[str, float] = json.loads(line.removeprefix(RESULT))
    if args.instructions:
        # valgrind's own count of what it collected: only the measured webhooks (the collection
        # is switched on and off around them), every thread included.
        collected = next(x for x in done.stderr.splitlines() if "Collected :" in x)
        figures["instructions_k"] = int(collected.rsplit(":", 1)[1].strip()) / args.webhooks / 1000
    return figures


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--webhooks", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--instructions", action="store_true", help="count instructions with valgrind")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        figures = _measure(args.webhooks, args.connections, args.log, args.instructions)
        print(RESULT + json.dumps(figures), file=sys.__stdout__, flush=True)
        raise SystemExit(0)
    if args.instructions and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("bench: receiver_cost: --instructions needs valgrind (apt-get install valgrind)")
    report = Report("receiver_cost")
    for _ in range(args.runs):
        for database in args.databases.split(","):
            with Bench(f"cost-{database}") as bench:
                figures = _child(bench, database, args)
            if "instructions_k" not in figures:  # under valgrind, CPU time means nothing
                report.add(
                    f"{database}_cpu_us", figures["cpu_us"], name=f"CPU per webhook ({database})", unit="us"
                )
            else:
                report.add(
                    f"{database}_instructions_k",
                    figures["instructions_k"],
                    name=f"instructions per webhook ({database})",
                    unit="k",
                )
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
