"""Ledger: what one attempt costs the ledger (claim, then close), uncontended, in milliseconds.

Every run a worker executes opens its attempt in one transaction (``attempts.claim_run``) and
closes it in another (``attempts.finish_attempt``), exactly as ``workers.runner`` does, each
commit an fsync on SQLite (``synchronous=FULL``). On SQLite these transactions are in series
across all worker processes, so their cost bounds the drain: this script measures it alone, in
one process, on a fresh SQLite file and a fresh PostgreSQL database.

    .venv/bin/python -m bench.ledger [--runs 3] [--attempts 1000] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.harness import Bench, Report
from workers.ledger import attempts, repository
from workers.ledger.db import dispose_all, transaction


def _queued_runs(url: str, count: int, tag: str) -> list[str]:
    rows: list[dict[str, Any]] = [
        {
            "id": repository.new_id(),
            "dedupe_key": f"bench-{tag}-{i}",
            "remediation": "http_request",
            "params": {"url": "http://127.0.0.1:9/"},
            "timeout_s": 10.0,
            "mode": "live",
            "trigger": "manual",
            "status": "queued",
            "destructive": False,
        }
        for i in range(count)
    ]
    with transaction(url) as session:
        repository.insert_runs(session, rows)
    return [row["id"] for row in rows]


def attempt_cost(url: str, count: int, tag: str) -> float:
    """Milliseconds per attempt claimed and closed, over ``count`` queued runs."""
    run_ids = _queued_runs(url, count, tag)
    started = time.perf_counter()
    for run_id in run_ids:
        with transaction(url) as session:
            claim = attempts.claim_run(
                session, run_id=run_id, task_id=run_id, worker="bench", max_attempts=3, lease_s=30
            )
        if claim.attempt_id is None:
            raise SystemExit(f"bench: ledger: run {run_id} not claimed ({claim.kind})")
        with transaction(url) as session:
            attempts.finish_attempt(
                session,
                run_id=run_id,
                attempt_id=claim.attempt_id,
                outcome="succeeded",
                error=None,
                output={"summary": "ok"},
                run_status="succeeded",
            )
    return (time.perf_counter() - started) * 1000 / count


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--attempts", type=int, default=1000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    report = Report("ledger")
    for i in range(args.runs):
        for database in args.databases.split(","):
            with Bench(f"ledger-{database}") as bench:
                url = bench.ledger(database)
                try:
                    cost = attempt_cost(url, args.attempts, f"{i}")
                finally:
                    dispose_all()
            report.add(
                f"{database}_attempt_ms",
                cost,
                name=f"{database}: claim + close of one attempt",
                unit="ms",
            )
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
