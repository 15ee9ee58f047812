"""Worker benchmarks: end to end at a steady rate, and draining a backlog, against bare Celery.

End to end: one alert per webhook at a steady rate (open loop), from the webhook sent to the
remediation's HTTP call received at a local target; against bare Celery's enqueue-to-start at
the same rate (``bench.floors``, the worker's own Celery configuration). Both first get
``WARM_UP`` messages at that rate, whose first is reported alone (the first after a start). Drain: N alerts recorded
by the receiver while no worker runs, then one worker started: alerts remediated per second
from the moment it is ready; against bare Celery draining N no-op tasks the same way. Memory
(RSS and PSS of the worker's process tree) at rest and at the peak of the drain. SQLite ledger
(the embedded default), a worker of 2 prefork processes on every queue, as ``make dev`` runs.

    .venv/bin/python -m bench.worker [--runs 3] [--rates 20,100] [--seconds 10] [--drain 10000]
"""

from __future__ import annotations

import argparse
import json
import time

from bench.floors import FLOOR_QUEUE, LATENCIES, NOOP, STAMP
from bench.harness import (
    Bench,
    Report,
    alert,
    memory_mib,
    peak_memory,
    percentile,
    queue_depth,
    redis_client,
    send_all,
    send_at_rate,
    settle,
    wait_for,
    webhook,
)
from workers.celery_app import create_celery_app
from workers.settings import Settings

WEBHOOK_ALERTS_IN_DRAIN = 10
# The first messages after a start pay one-time costs (SQLAlchemy compiling statements, the
# first task in each process); they are reported on their own ("first after start"), and the
# steady-state figures start after these many, for the floor and the project alike.
WARM_UP = 10


def _celery(redis_url: str):  # type: ignore[no-untyped-def]
    app = create_celery_app(Settings(redis_url=redis_url))
    app.conf.task_routes = {NOOP: {"queue": FLOOR_QUEUE}, STAMP: {"queue": FLOOR_QUEUE}}
    return app


def _send_tasks(app, name: str, count: int, *, rate: float | None = None) -> float:  # type: ignore[no-untyped-def]
    """Publish ``count`` tasks (pipelined when no rate is set); returns the seconds it took."""
    t0 = time.monotonic()
    with app.producer_or_acquire() as producer:
        if rate is None:
            with producer.batch(max_size=500):
                for _ in range(count):
                    app.send_task(name, producer=producer)
        else:
            for i in range(count):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                app.send_task(name, args=[time.time()], producer=producer)
    return time.monotonic() - t0


def end_to_end(report: Report, rate: float, seconds: float, run: str) -> None:
    count = max(1, int(rate * seconds))
    with Bench("e2e-floor") as bench:
        redis_url = bench.redis()
        worker = bench.floor_worker(redis_url)
        settle(1.0)
        report.add(
            "floor_worker_rest_pss", memory_mib(worker.pid)[1], name="bare Celery PSS at rest", unit="MiB"
        )
        report.add(
            "floor_worker_rest_rss", memory_mib(worker.pid)[0], name="bare Celery RSS at rest", unit="MiB"
        )
        app = _celery(redis_url)
        client = redis_client(redis_url)
        _send_tasks(app, STAMP, WARM_UP, rate=rate)
        wait_for(lambda: client.llen(LATENCIES) >= WARM_UP, timeout=60, what="bare Celery to warm up")
        first = float(client.lindex(LATENCIES, 0))  # type: ignore[arg-type]
        report.add(
            f"floor_e2e_{rate:g}_first", first * 1000, name="bare Celery first task after start", unit="ms"
        )
        client.delete(LATENCIES)
        _send_tasks(app, STAMP, count, rate=rate)
        wait_for(lambda: client.llen(LATENCIES) >= count, timeout=seconds + 60, what="bare Celery")
        latencies = [float(v) for v in client.lrange(LATENCIES, 0, -1)]  # type: ignore[union-attr]
        report.add(
            f"floor_e2e_{rate:g}_p50",
            percentile(latencies, 50) * 1000,
            name=f"bare Celery enqueue->start at {rate:g}/s p50",
            unit="ms",
        )
        report.add(
            f"floor_e2e_{rate:g}_p99",
            percentile(latencies, 99) * 1000,
            name=f"bare Celery enqueue->start at {rate:g}/s p99",
            unit="ms",
        )

    with Bench("e2e") as bench:
        system = bench.system()
        url, target = system.url, system.target
        worker = bench.worker(system.env)
        settle(1.0)
        report.add("worker_rest_pss", memory_mib(worker.pid)[1], name="worker PSS at rest", unit="MiB")
        report.add("worker_rest_rss", memory_mib(worker.pid)[0], name="worker RSS at rest", unit="MiB")
        warm = [json.dumps(webhook([alert(f"w{i}", run=run)])).encode() for i in range(WARM_UP)]
        warmed = send_at_rate(url + "/api/v1/alertmanager", warm, rate)
        wait_for(lambda: target.count() >= WARM_UP, timeout=60, what="the worker to warm up", interval=0.05)
        first_call = {c["path"].rsplit("/", 1)[1]: c["at"] for c in target.calls()}["w0"]
        report.add(
            f"e2e_{rate:g}_first",
            (first_call - min(warmed.sent_at)) * 1000,
            name="first alert after start: webhook->call",
            unit="ms",
        )
        target.reset()
        bodies = [json.dumps(webhook([alert(str(i), run=run)])).encode() for i in range(count)]
        sent = send_at_rate(url + "/api/v1/alertmanager", bodies, rate)
        last_sent = max(sent.sent_at)
        wait_for(
            lambda: target.count() >= count, timeout=seconds + 120, what="the remediations", interval=0.2
        )
        calls = {c["path"].rsplit("/", 1)[1]: c["at"] for c in target.calls()}
        sent_at = dict(zip((str(i) for i in range(count)), sorted(sent.sent_at), strict=True))
        # Sent in order at fixed intervals: the i-th send time is the i-th smallest.
        latencies = [calls[seq] - sent_at[seq] for seq in sent_at if seq in calls]
        lag = max(calls.values()) - last_sent
        report.add(
            f"e2e_{rate:g}_p50",
            percentile(latencies, 50) * 1000,
            name=f"webhook->remediation call at {rate:g}/s p50",
            unit="ms",
        )
        report.add(
            f"e2e_{rate:g}_p99",
            percentile(latencies, 99) * 1000,
            name=f"webhook->remediation call at {rate:g}/s p99",
            unit="ms",
        )
        report.add(f"e2e_{rate:g}_lag", lag, name=f"last call after last webhook at {rate:g}/s", unit="s")
        report.add(f"e2e_{rate:g}_non2xx", sent.non_2xx, name=f"non-2xx at {rate:g}/s", unit="responses")


def drain_floor(report: Report, count: int) -> None:
    with Bench("drain-floor") as bench:
        redis_url = bench.redis()
        app = _celery(redis_url)
        _send_tasks(app, NOOP, count)
        client = redis_client(redis_url)
        worker = bench.floor_worker(redis_url)
        t0 = time.monotonic()
        with peak_memory({"floor_worker": worker.pid}) as peaks:
            wait_for(lambda: queue_depth(client, FLOOR_QUEUE) == 0, timeout=600, what="bare Celery to drain")
        elapsed = time.monotonic() - t0
        report.add("floor_drain", count / elapsed, name="bare Celery no-op drain", unit="tasks/s")
        report.add(
            "floor_worker_load_pss",
            peaks.get("floor_worker_pss", 0.0),
            name="bare Celery PSS peak",
            unit="MiB",
        )


def drain(report: Report, count: int, run: str, database: str, tag: str = "") -> None:
    """``tag``: a prefix of the report's keys and labels (``bench.telemetry``'s modes)."""
    key = tag + ("drain" if database == "sqlite" else f"drain_{database}")
    with Bench(key) as bench:
        system = bench.system(database)
        url, target = system.url, system.target
        bodies = [
            json.dumps(webhook([alert(f"{w}-{k}", run=run) for k in range(WEBHOOK_ALERTS_IN_DRAIN)])).encode()
            for w in range(max(1, count // WEBHOOK_ALERTS_IN_DRAIN))
        ]
        sent = send_all(url + "/api/v1/alertmanager", bodies, connections=20)
        if sent.non_2xx:
            raise SystemExit(f"bench: drain: {sent.non_2xx} webhooks not accepted")
        total = len(bodies) * WEBHOOK_ALERTS_IN_DRAIN
        worker = bench.worker(system.env)
        t0 = time.monotonic()
        with peak_memory({"worker": worker.pid}) as peaks:
            wait_for(lambda: target.count() >= total, timeout=1200, what="the backlog to drain", interval=0.1)
        elapsed = time.monotonic() - t0
        report.add(
            key, total / elapsed, name=f"{tag}alerts remediated from a backlog ({database})", unit="alerts/s"
        )
        if database == "sqlite" and not tag:
            report.add("worker_load_pss", peaks.get("worker_pss", 0.0), name="worker PSS peak", unit="MiB")
            report.add("worker_load_rss", peaks.get("worker_rss", 0.0), name="worker RSS peak", unit="MiB")


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="20,100")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--drain", type=int, default=10000)
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql",
        help="ledgers to drain into (comma-separated; sqlite is the embedded default)",
    )
    args = parser.parse_args(argv)
    databases = [d for d in args.databases.split(",") if d]
    rates = [float(r) for r in args.rates.split(",") if r]
    report = Report("worker")
    for i in range(args.runs):
        run = f"{int(time.time())}{i}"
        for rate in rates:
            end_to_end(report, rate, args.seconds, f"{run}r{rate:g}")
        if args.drain:
            drain_floor(report, args.drain)
            for database in databases:
                drain(report, args.drain, run + "d" + database[0], database)
    for rate in rates:
        report.target(
            f"end to end at {rate:g}/s: p50 vs bare Celery's",
            report.median(f"e2e_{rate:g}_p50") / report.median(f"floor_e2e_{rate:g}_p50"),
            8,
            at_least=False,
        )
        report.target(
            f"end to end at {rate:g}/s: p99 vs bare Celery's",
            report.median(f"e2e_{rate:g}_p99") / report.median(f"floor_e2e_{rate:g}_p99"),
            15,
            at_least=False,
        )
        report.target(
            f"end to end at {rate:g}/s: backlog (s from last webhook to last call)",
            report.median(f"e2e_{rate:g}_lag"),
            2.0,
            at_least=False,
        )
    for database in databases if args.drain else []:
        key = "drain" if database == "sqlite" else f"drain_{database}"
        report.target(
            f"drain ({database}): alerts/s vs bare Celery no-op tasks/s",
            report.median(key) / report.median("floor_drain"),
            0.35,
            at_least=True,
        )
    if rates:  # memory at rest is measured by the end-to-end runs
        report.target(
            "worker PSS at rest vs bare Celery",
            report.median("worker_rest_pss") / report.median("floor_worker_rest_pss"),
            1.5,
            at_least=False,
        )
    report.print()
    report.write()
    return report


if __name__ == "__main__":
    main()
