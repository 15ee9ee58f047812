"""Storm: N alerts in webhooks of 10, as fast as 50 connections can send them, to the whole system.

The whole system as ``make dev`` runs it (receiver, one worker of 2 processes on every queue,
beat with the reconciler, SQLite ledger, its own Redis) and a local target. Checks what must
hold (nothing lost, no 5xx, exactly one run and one call per alert) and measures the time from
the first webhook to the last remediation call, and the peak memory of receiver and worker.

    .venv/bin/python -m bench.storm [--runs 3] [--alerts 10000]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from sqlalchemy import func, select

from bench.harness import Bench, Report, alert, peak_memory, send_all, wait_for, webhook
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent, Run

PER_WEBHOOK = 10
DRAIN_LIMIT_S = 120


def _ledger_counts(url: str) -> tuple[int, dict[str, int]]:
    with transaction(url) as session:
        events = int(session.scalar(select(func.count()).select_from(AlertEvent)) or 0)
        runs = dict(session.execute(select(Run.status, func.count()).group_by(Run.status)).all())
    return events, {str(k): int(v) for k, v in runs.items()}


def storm(report: Report, alerts: int, run: str) -> list[str]:
    """One storm; returns what did not hold (empty when all did)."""
    problems: list[str] = []
    with Bench("storm") as bench:
        system = bench.system()
        env, url, receiver, target = system.env, system.url, system.receiver, system.target
        worker = bench.worker(env)
        bench.spawn("beat", [sys.executable, "-m", "workers.cli", "beat"], env)
        webhooks = max(1, alerts // PER_WEBHOOK)
        bodies = [
            json.dumps(webhook([alert(f"{w}-{k}", run=run) for k in range(PER_WEBHOOK)])).encode()
            for w in range(webhooks)
        ]
        total = webhooks * PER_WEBHOOK
        with peak_memory({"receiver": receiver.pid, "worker": worker.pid}) as peaks:
            t0 = time.time()
            sent = send_all(url + "/api/v1/alertmanager", bodies, connections=50)
            recorded_s = time.time() - t0
            try:
                wait_for(
                    lambda: target.count() >= total, timeout=600, what="the storm to drain", interval=0.2
                )
            except SystemExit as exc:
                problems.append(str(exc))
        calls = target.calls()
        drained_s = (max(c["at"] for c in calls) - t0) if calls else float("nan")
        time.sleep(1.0)  # a duplicate call would come after the last expected one
        calls = target.calls()
        per_key = collections.Counter(c["key"] for c in calls)
        events, runs = _ledger_counts(env["RESPONDER_DATABASE_URL"])
        server_errors = sum(n for status, n in sent.statuses.items() if status >= 500) + sent.errors
        lost = total - events
        duplicated = sum(n - 1 for n in per_key.values() if n > 1)
        report.add("webhooks_s", webhooks / sent.elapsed, name="webhooks accepted", unit="webhooks/s")
        report.add("recorded_s", recorded_s, name="all webhooks answered after", unit="s")
        report.add("drained_s", drained_s, name="first webhook to last remediation call", unit="s")
        report.add("alerts_s", total / drained_s, name="alerts remediated", unit="alerts/s")
        report.add("lost", lost, name="alerts lost (sent - recorded)", unit="alerts")
        report.add("server_errors", server_errors, name="5xx or failed requests", unit="webhooks")
        report.add("duplicated", duplicated, name="remediation calls beyond one per run", unit="calls")
        report.add("receiver_rss", peaks.get("receiver_rss", 0.0), name="receiver peak RSS", unit="MiB")
        report.add(
            "worker_rss", peaks.get("worker_rss", 0.0), name="worker peak RSS (3 processes)", unit="MiB"
        )
        report.add(
            "worker_pss", peaks.get("worker_pss", 0.0), name="worker peak PSS (3 processes)", unit="MiB"
        )
        if lost:
            problems.append(f"{lost} alerts lost")
        if server_errors:
            problems.append(f"{server_errors} webhooks failed or got a 5xx")
        if runs != {"succeeded": total}:
            problems.append(f"runs by status {runs}, expected {{'succeeded': {total}}}")
        if len(per_key) != total or duplicated:
            problems.append(
                f"{len(per_key)} runs called the target ({duplicated} calls duplicated), expected {total}"
            )
    return problems


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--alerts", type=int, default=10000)
    args = parser.parse_args(argv)
    report = Report("storm")
    problems: list[str] = []
    for i in range(args.runs):
        problems += [f"run {i + 1}: {p}" for p in storm(report, args.alerts, f"{int(time.time())}s{i}")]
    report.notes += problems or ["every run: 0 lost, 0 5xx, one succeeded run and one call per alert"]
    report.target(
        "storm: runs where anything was lost, failed or duplicated", len(problems), 0, at_least=False
    )
    report.target(
        "storm: seconds to drain (median)", report.median("drained_s"), DRAIN_LIMIT_S, at_least=False
    )
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
