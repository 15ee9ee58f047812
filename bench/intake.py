"""Intake: how many webhooks the receiver records per second, against a bare endpoint.

Each round starts, one after the other on the same machine, the bare FastAPI endpoint
(``bench.floors``) and the receiver on SQLite and on PostgreSQL, each with its own Redis and no
worker, and drives each with wrk (one thread, 50 connections): 3-alert webhooks with unique
fingerprints, then the same webhook over and over (all duplicates). Every 2xx must be recorded:
the ledger is counted after each run. Memory (RSS and PSS) at rest and at the peak under load;
also the bare endpoint's memory at rest with the receiver's libraries imported (no code of ours).

    .venv/bin/python -m bench.intake [--runs 3] [--seconds 8] [--connections 50]
"""

from __future__ import annotations

import argparse
import time

from sqlalchemy import func, select

from bench.harness import Bench, Report, memory_mib, peak_memory, settle, wrk
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent

ALERTS_PER_WEBHOOK = 3


def _count_events(url: str) -> int:
    with transaction(url) as session:
        return int(session.scalar(select(func.count()).select_from(AlertEvent)) or 0)


def _warm_up(url: str, args: argparse.Namespace, run: str, *, duplicates: bool = False) -> None:
    """Let a just-started server finish its imports, then one second of load: what each
    server's memory "at rest" is measured after."""
    settle()
    wrk(url + "/api/v1/alertmanager", seconds=1, connections=args.connections, duplicates=duplicates, run=run)


def measure_floor(report: Report, args: argparse.Namespace, run: str) -> None:
    with Bench("intake-floor") as bench:
        url, proc = bench.floor_receiver()
        _warm_up(url, args, "w" + run)
        report.add("floor_rest_rss", memory_mib(proc.pid)[0], name="bare endpoint RSS at rest", unit="MiB")
        report.add("floor_rest_pss", memory_mib(proc.pid)[1], name="bare endpoint PSS at rest", unit="MiB")
        with peak_memory({"floor": proc.pid}) as peaks:
            data = wrk(
                url + "/api/v1/alertmanager",
                seconds=args.seconds,
                connections=args.connections,
                duplicates=False,
                run=run,
            )
        report.add(
            "floor_rps", data["requests"] / data["duration_s"], name="bare endpoint", unit="webhooks/s"
        )
        report.add("floor_p50", data["p50_ms"], name="bare endpoint p50", unit="ms")
        report.add("floor_p99", data["p99_ms"], name="bare endpoint p99", unit="ms")
        report.add("floor_load_rss", peaks.get("floor_rss", 0.0), name="bare endpoint RSS peak", unit="MiB")


def measure_libraries_floor(report: Report, args: argparse.Namespace, run: str) -> None:
    """The bare endpoint with the receiver's libraries imported: its memory at rest, after the
    same warm-up. Not a target; it says how much of the receiver's memory its libraries hold."""
    with Bench("intake-floor-libraries") as bench:
        url, proc = bench.floor_receiver(with_libraries=True)
        _warm_up(url, args, "l" + run)
        report.add(
            "floor_libraries_rest_pss",
            memory_mib(proc.pid)[1],
            name="bare endpoint + the receiver's libraries, PSS at rest",
            unit="MiB",
        )


def measure_receiver(
    report: Report, args: argparse.Namespace, run: str, database: str, duplicates: bool, tag: str = ""
) -> None:
    """``tag``: a prefix of the report's keys and labels (``bench.telemetry``'s modes)."""
    key = f"{tag}{database}{'_dup' if duplicates else ''}"
    label = f"{tag}receiver {database}{', all duplicates' if duplicates else ''}"
    with Bench(f"intake-{key}") as bench:
        redis_url = bench.redis()
        ledger = bench.ledger(database)
        env = bench.responder_env(redis_url=redis_url, database_url=ledger, target_url=None)
        url, proc = bench.receiver(env)
        _warm_up(url, args, "w" + run, duplicates=duplicates)
        if not duplicates:
            report.add(f"{key}_rest_rss", memory_mib(proc.pid)[0], name=f"{label} RSS at rest", unit="MiB")
            report.add(f"{key}_rest_pss", memory_mib(proc.pid)[1], name=f"{label} PSS at rest", unit="MiB")
        before = _count_events(ledger)
        with peak_memory({"receiver": proc.pid}) as peaks:
            data = wrk(
                url + "/api/v1/alertmanager",
                seconds=args.seconds,
                connections=args.connections,
                duplicates=duplicates,
                run=run,
            )
        time.sleep(0.5)  # requests wrk cut off at the end may still commit
        recorded = _count_events(ledger) - before
        answered = int(data["requests"] - data["non_2xx"])
        expected = 0 if duplicates else answered * ALERTS_PER_WEBHOOK
        if recorded < expected:
            raise SystemExit(
                f"bench: {label}: {answered} webhooks answered 2xx but only {recorded} alerts recorded"
            )
        rps = data["requests"] / data["duration_s"]
        report.add(f"{key}_rps", rps, name=label, unit="webhooks/s")
        report.add(f"{key}_alerts", rps * ALERTS_PER_WEBHOOK, name=f"{label} alerts", unit="alerts/s")
        report.add(f"{key}_p50", data["p50_ms"], name=f"{label} p50", unit="ms")
        report.add(f"{key}_p99", data["p99_ms"], name=f"{label} p99", unit="ms")
        report.add(f"{key}_non2xx", data["non_2xx"], name=f"{label} non-2xx", unit="responses")
        if not duplicates:
            report.add(
                f"{key}_load_rss", peaks.get("receiver_rss", 0.0), name=f"{label} RSS peak", unit="MiB"
            )


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    report = Report("intake")
    databases = [d for d in args.databases.split(",") if d]
    for i in range(args.runs):
        run = f"{int(time.time())}{i}"
        measure_floor(report, args, run)
        measure_libraries_floor(report, args, run)
        for database in databases:
            measure_receiver(report, args, run, database, duplicates=False)
            measure_receiver(report, args, run, database, duplicates=True)
    floor = report.median("floor_rps")
    for database in databases:
        report.target(
            f"intake {database}: webhooks/s vs bare endpoint",
            report.median(f"{database}_rps") / floor,
            0.25,
            at_least=True,
        )
        report.target(
            f"intake {database}: p99 vs bare endpoint's p99",
            report.median(f"{database}_p99") / report.median("floor_p99"),
            5,
            at_least=False,
        )
    report.target(
        "receiver PSS at rest vs bare endpoint (SQLite)",
        report.median(f"{databases[0]}_rest_pss") / report.median("floor_rest_pss"),
        1.5,
        at_least=False,
    )
    report.notes.append(
        "the receiver's libraries alone (bench.floors.RECEIVER_LIBRARIES, no code of ours) hold "
        f"{report.median('floor_libraries_rest_pss') / report.median('floor_rest_pss'):.2f}x the "
        "bare endpoint's PSS at rest"
    )
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
