"""Worker cost: what ``handle_alert`` (one event per message) and one run cost a worker process.

The worker's figures in ``bench/worker.py`` move with the machine (the same commit's drain moved
by a tenth between runs of one session). This script measures the cost instead: in a process of
its own, with its own Redis, ledger and HTTP target, and the worker's settings, JSON logs at INFO
and quiet tracing, it calls what the two tasks call (``planner.handle_events`` for the first
delivery of a one-event message, then ``runner.execute`` for each run it queued: look, breaker
gate, claim, the ``http_request`` call, close), without Celery. Printed: CPU time per call,
every thread of the process together (Redis and the target run in processes of their own).
Celery's own cost per task (the pool's parent and the child's trace) comes on top. Also
printed: the wall time of a fresh process's first ``handle_alert`` and first run, after what a
pool process does before its first task (``workers.tasks.warm_up_process``): what the first
alert each pool process takes pays beyond the rest.

    .venv/bin/python -m bench.worker_cost [--alerts 1000] [--databases sqlite,postgresql] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import Bench, Report, alert, webhook

WARM_UP = 20
RESULT = "COST "


def _measure(alerts: int, log_path: Path) -> dict[str, float]:
    """In the child: record the alerts, then handle each and run each run; CPU microseconds."""
    sys.stdout = log_path.open("w")  # the worker's log lines, as a service writes them
    from workers import planner, runner, telemetry, tracing
    from workers.alerts import WebhookPayload
    from workers.celery_app import create_celery_app
    from workers.config import cached_config
    from workers.guardstate import from_ledger, guard_state
    from workers.ledger import repository
    from workers.ledger.db import reading, transaction
    from workers.ledger.models import AlertEvent
    from workers.publishing import Publisher
    from workers.settings import get_settings
    from workers.tasks import warm_up_process

    settings = get_settings()
    telemetry.configure_logging(fmt="json", level="INFO", secret_keys=settings.redact_keys)
    tracing.configure_tracing("worker")
    config = cached_config(settings.config)
    publisher = Publisher(create_celery_app(settings), settings)
    guards = guard_state(settings, config)
    event_ids = []
    for i in range(WARM_UP + alerts):
        alerts_of = WebhookPayload.model_validate(webhook([alert(f"cost-{i}", run="cost")])).alerts
        with transaction(settings.database_url) as session:  # as the receiver records and publishes
            (recorded,) = repository.record_events(session, alerts_of, receiver="bench", group_key="cost")
            repository.mark_enqueued(session, AlertEvent, [recorded.event_id])
        event_ids.append(recorded.event_id)

    def handle(event_id: str) -> list[str]:
        return planner.handle_events(
            event_ids=[event_id],
            settings=settings,
            config=config,
            publisher=publisher,
            guards=guards,
            first_delivery=True,
        )

    def run(run_id: str) -> None:
        done = runner.execute(
            run_id=run_id, task_id=f"task-{run_id}", settings=settings, config=config, guards=guards
        )
        if done.outcome != "succeeded":
            raise SystemExit(f"bench: worker_cost: run {run_id} {done.outcome}: {done.error}")

    # A fresh worker process: what a pool process does before its first task, then its first
    # alert timed (the guard state's rebuild, once per Redis and not per process, done first).
    with reading(settings.database_url) as session:
        guards.rebuild(from_ledger(session))
    warm_up_process()
    started = time.perf_counter()
    runs = handle(event_ids[0])
    first_handle = time.perf_counter() - started
    started = time.perf_counter()
    run(runs[0])
    first_run = time.perf_counter() - started
    runs = [run_id for event_id in event_ids[1:WARM_UP] for run_id in handle(event_id)]
    started = time.process_time()
    runs += [run_id for event_id in event_ids[WARM_UP:] for run_id in handle(event_id)]
    handled = time.process_time() - started
    if len(runs) != len(event_ids) - 1:
        raise SystemExit(f"bench: worker_cost: {len(runs)} runs for {len(event_ids)} alerts")
    for run_id in runs[: WARM_UP - 1]:
        run(run_id)
    started = time.process_time()
    for run_id in runs[WARM_UP - 1 :]:
        run(run_id)
    ran = time.process_time() - started
    return {
        "handle_us": handled / alerts * 1e6,
        "run_us": ran / alerts * 1e6,
        "first_handle_ms": first_handle * 1000,
        "first_run_ms": first_run * 1000,
    }


def _child(bench: Bench, database: str, args: argparse.Namespace) -> dict[str, float]:
    redis_url = bench.redis()
    ledger = bench.ledger(database)
    target = bench.target()
    env = {
        **bench.env,
        **bench.responder_env(redis_url=redis_url, database_url=ledger, target_url=target.url),
    }
    argv = [sys.executable, "-m", "bench.worker_cost", "--child", "--alerts", str(args.alerts)]
    argv += ["--log", str(bench.dir / "worker.log")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith(RESULT)), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(
            f"bench: worker_cost: the measurement failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    if target.count() != WARM_UP + args.alerts:
        raise SystemExit(f"bench: worker_cost: the target saw {target.count()} calls")
    figures: dict[str, float] = json.loads(line.removeprefix(RESULT))
    return figures


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--alerts", type=int, default=1000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        figures = _measure(args.alerts, args.log)
        print(RESULT + json.dumps(figures), file=sys.__stdout__, flush=True)
        raise SystemExit(0)
    report = Report("worker_cost")
    for _ in range(args.runs):
        for database in args.databases.split(","):
            with Bench(f"worker-cost-{database}") as bench:
                figures = _child(bench, database, args)
            report.add(
                f"{database}_handle_us",
                figures["handle_us"],
                name=f"CPU per handle_alert of one event ({database})",
                unit="us",
            )
            report.add(f"{database}_run_us", figures["run_us"], name=f"CPU per run ({database})", unit="us")
            for step in ("handle", "run"):
                report.add(
                    f"{database}_first_{step}_ms",
                    figures[f"first_{step}_ms"],
                    name=f"first {'handle_alert' if step == 'handle' else 'run'} of a fresh process ({database})",
                    unit="ms",
                )
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
