"""Where an alert's time and CPU go, end to end at a steady rate: stages, and CPU per process.

The whole system as ``bench/worker.py`` runs it end to end (receiver, a worker of 2 prefork
processes, a SQLite ledger, the bench's Redis and HTTP target), one alert per webhook at
``--rate`` for ``--seconds``. Printed, from the ledger's own timestamps and the target's:

- the time from webhook sent to remediation call, split into webhook sent -> event recorded
  (the receiver), recorded -> run created (``handle_alert``), run created -> attempt started
  (publishing, the pool, the claim) and attempt started -> call received (the remediation);
- each process's CPU time per alert over the measured alerts (``/proc/<pid>/stat``; the load
  generator is this process): what the machine spends on one alert, and so how busy a rate
  keeps it.

    .venv/bin/python -m bench.stages [--rate 100] [--seconds 8] [--runs 1]
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path

from bench.harness import Bench, Report, alert, percentile, send_at_rate, settle, tree, wait_for, webhook

WARM_UP = 10
STAGES = (
    ("recorded", "webhook sent -> event recorded"),
    ("planned", "event recorded -> run created"),
    ("claimed", "run created -> attempt started"),
    ("called", "attempt started -> call received"),
)
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _instant(stored: str) -> float:
    """A SQLite ledger timestamp (naive UTC text) as seconds since the epoch."""
    parsed = datetime.fromisoformat(stored)
    return calendar.timegm(parsed.timetuple()) + parsed.microsecond / 1e6


def _pid_of(pattern: str) -> int:
    return int(subprocess.check_output(["pgrep", "-f", pattern]).split()[-1])


def measure(report: Report, rate: float, seconds: float, run: str) -> None:
    count = max(1, int(rate * seconds))
    with Bench("stages") as bench:
        system = bench.system()
        url, target = system.url, system.target
        worker = bench.worker(system.env)
        settle(1.0)
        warm = [json.dumps(webhook([alert(f"w{i}", run=run)])).encode() for i in range(WARM_UP)]
        send_at_rate(url + "/api/v1/alertmanager", warm, rate)
        wait_for(lambda: target.count() >= WARM_UP, timeout=60, what="the warm-up alerts")
        target.reset()
        processes = {
            "worker parent": worker.pid,
            "receiver": system.receiver.pid,
            "redis": _pid_of(
                f"redis-server .*:{system.env['RESPONDER_REDIS_URL'].rsplit(':', 1)[1].split('/')[0]}"
            ),
            "target": _pid_of("bench/target.py"),
            "load generator": os.getpid(),
        }
        processes |= {f"worker child {i + 1}": pid for i, pid in enumerate(tree(worker.pid)[1:])}
        before = {name: _cpu_s(pid) for name, pid in processes.items()}
        bodies = [json.dumps(webhook([alert(str(i), run=run)])).encode() for i in range(count)]
        sent = send_at_rate(url + "/api/v1/alertmanager", bodies, rate)
        wait_for(lambda: target.count() >= count, timeout=seconds + 120, what="the calls", interval=0.2)
        for name, pid in processes.items():
            used = (_cpu_s(pid) - before[name]) / count * 1000
            report.add(f"cpu_{name.replace(' ', '_')}", used, name=f"CPU per alert: {name}", unit="ms")
        calls = {c["path"].rsplit("/", 1)[1]: c["at"] for c in target.calls()}
        sent_at = dict(zip((str(i) for i in range(count)), sorted(sent.sent_at), strict=True))
        with sqlite3.connect(system.env["RESPONDER_DATABASE_URL"].removeprefix("sqlite:///")) as db:
            rows = db.execute(
                "SELECT e.labels, e.received_at, r.created_at, a.started_at FROM alert_events e "
                "JOIN runs r ON r.event_id = e.id JOIN attempts a ON a.run_id = r.id AND a.number = 1"
            ).fetchall()
        spans: dict[str, list[float]] = {key: [] for key, _ in STAGES}
        totals = []
        for labels, recorded, created, started in rows:
            seq = json.loads(labels)["seq"]
            if seq not in sent_at or seq not in calls:
                continue
            marks = [sent_at[seq], _instant(recorded), _instant(created), _instant(started), calls[seq]]
            for (key, _), begin, end in zip(STAGES, marks, marks[1:], strict=False):
                spans[key].append(end - begin)
            totals.append(calls[seq] - sent_at[seq])
        for quantile in (50, 99):
            report.add(
                f"total_p{quantile}",
                percentile(totals, quantile) * 1000,
                name=f"webhook sent -> call received p{quantile}",
                unit="ms",
            )
            for key, label in STAGES:
                report.add(
                    f"{key}_p{quantile}",
                    percentile(spans[key], quantile) * 1000,
                    name=f"{label} p{quantile}",
                    unit="ms",
                )


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    report = Report("stages")
    for i in range(args.runs):
        measure(report, args.rate, args.seconds, f"{int(time.time())}{i}")
    cpu = sum(report.median(key) for key in report.figures if key.startswith("cpu_"))
    report.add("cpu_total", cpu, name="CPU per alert: all processes", unit="ms")
    report.add("cores_busy", cpu * args.rate / 1000, name=f"cores kept busy at {args.rate:g}/s", unit="cores")
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
