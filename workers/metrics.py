"""Prometheus metrics: every ``responder_*`` metric, defined once here, and their exposition.

Names carry their units; labels are few and bounded (a remediation, rule, route, outcome or
reason; never a fingerprint, run id, target or label value).

Several processes: a worker's prefork children each count what they did. With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client keeps every process's values in files in
that directory and ``exposition()`` adds them up (its multiprocess mode). The variable must be
set before this module is first imported in the process tree: ``responder worker
--metrics-port`` sets it (a fresh directory) before it imports anything that counts, and serves
the sum on that port from its main process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import MetricsHandler

if TYPE_CHECKING:
    from workers.ledger.schedules import BackupStatus

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: requests (a webhook answers in milliseconds; Alertmanager gives up at 10 s).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds: attempts and runs (a restart takes seconds; a grace period or a backup, minutes).
RUN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Seconds: from a succeeded run to its alert resolving (Prometheus evaluates every 15 s to 1 m).
RESOLVE_BUCKETS = (15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)

HTTP_REQUESTS = Counter(
    "responder_http_requests_total",
    "HTTP requests answered by the receiver, by method, route template and status code.",
    ["method", "route", "code"],
)
HTTP_DURATION = Histogram(
    "responder_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
    buckets=REQUEST_BUCKETS,
)
ALERTS_RECEIVED = Counter(
    "responder_alerts_received_total",
    "Alerts received from Alertmanager, by status (firing, resolved) and result (accepted, duplicate).",
    ["status", "result"],
)
ALERTS_TRUNCATED = Counter(
    "responder_alerts_truncated_total",
    "Alerts Alertmanager left out of a notification (max_alerts, truncatedAlerts).",
)
PUBLISH_FAILURES = Counter(
    "responder_publish_failures_total",
    "Task messages the broker did not take; the reconciler sends them later.",
    ["task"],
)
DECISIONS = Counter(
    "responder_decisions_total",
    "Guard decisions on runs, by decision: the guard that held (invalid, paused, disabled, resolved, "
    "grace, dry_run, cooldown, budget, ...) or queued when none did.",
    ["decision"],
)
ATTEMPTS = Counter(
    "responder_attempts_total",
    "Attempts of remediations, by remediation and outcome (succeeded, failed, retry).",
    ["remediation", "outcome"],
)
ATTEMPT_DURATION = Histogram(
    "responder_attempt_duration_seconds",
    "Time one attempt of a remediation took, by remediation.",
    ["remediation"],
    buckets=RUN_BUCKETS,
)
RUNS = Counter(
    "responder_runs_total",
    "Runs that ended after their attempts, by rule, remediation and outcome (succeeded, failed).",
    ["rule", "remediation", "outcome"],
)
RUN_DURATION = Histogram(
    "responder_run_duration_seconds",
    "From a run's creation to its end (grace period and retries included), by remediation.",
    ["remediation"],
    buckets=RUN_BUCKETS,
)
TIME_TO_RESOLVE = Histogram(
    "responder_time_to_resolve_seconds",
    "From a succeeded run to its alert resolving (Alertmanager's endsAt), by rule: does it fix things?",
    ["rule"],
    buckets=RESOLVE_BUCKETS,
)
REFIRED = Counter(
    "responder_alert_refired_total",
    "New episodes of an alert within an hour of a handled one resolving, by rule that ran on it.",
    ["rule"],
)
BREAKER_STATE = Gauge(
    "responder_breaker_state",
    "Circuit breakers by remediation and state (closed, open, half_open), from the ledger at scrape time.",
    ["remediation", "state"],
    multiprocess_mode="mostrecent",
)
BREAKER_TRANSITIONS = Counter(
    "responder_breaker_transitions_total",
    "Circuit breaker transitions, by remediation and transition (opened, half_opened, reopened, closed).",
    ["remediation", "transition"],
)
REDELIVERIES = Counter(
    "responder_reconciler_republished_total",
    "Events and runs the reconciler published again (their message lost, failed or stranded), by kind.",
    ["kind"],
)
GIVEN_UP = Counter(
    "responder_given_up_total",
    "Events and runs given up after RESPONDER_MAX_DELIVERIES, by kind.",
    ["kind"],
)
QUEUE_DEPTH = Gauge(
    "responder_queue_depth",
    "Messages waiting in each Celery queue in Redis, at scrape time.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
WORKERS_ALIVE = Gauge(
    "responder_workers_alive",
    "Workers whose heartbeat is fresh (workers.heartbeat), at scrape time.",
    multiprocess_mode="mostrecent",
)
BACKLOG = Gauge(
    "responder_backlog",
    "What the ledger says is not done, at scrape time: events not handled, runs queued or waiting.",
    ["kind"],
    multiprocess_mode="mostrecent",
)

# Backups (workers.ledger.schedules), from the ledger at scrape time, per backup schedule.
BACKUP_LAST_SUCCESS = Gauge(
    "responder_backup_last_success_timestamp_seconds",
    "When the last succeeded run of each backup schedule finished (absent until one succeeds).",
    ["schedule"],
    multiprocess_mode="mostrecent",
)
BACKUP_SIZE = Gauge(
    "responder_backup_size_bytes",
    "Size of the file the last succeeded run of each backup schedule wrote.",
    ["schedule"],
    multiprocess_mode="mostrecent",
)
BACKUP_STALE_AFTER = Gauge(
    "responder_backup_stale_after_seconds",
    "How old each backup schedule's last success may get (its stale_after: by default twice its interval).",
    ["schedule"],
    multiprocess_mode="mostrecent",
)
BACKUP_INSTALLED = Gauge(
    "responder_backup_installed_timestamp_seconds",
    "When beat first installed each backup schedule (a backup that never succeeded is stale from it).",
    ["schedule"],
    multiprocess_mode="mostrecent",
)


def set_backups(backups: Sequence[BackupStatus]) -> None:
    """The backup gauges for the installed backup schedules (a removed one's series go away)."""
    for gauge in (BACKUP_LAST_SUCCESS, BACKUP_SIZE, BACKUP_STALE_AFTER, BACKUP_INSTALLED):
        gauge.clear()
    for backup in backups:
        BACKUP_STALE_AFTER.labels(backup.schedule).set(backup.stale_after_s)
        BACKUP_INSTALLED.labels(backup.schedule).set(backup.since.timestamp())
        if backup.succeeded_at is not None:
            BACKUP_LAST_SUCCESS.labels(backup.schedule).set(backup.succeeded_at.timestamp())
        if backup.size_bytes is not None:
            BACKUP_SIZE.labels(backup.schedule).set(backup.size_bytes)


def count_decision(status: str, reason: str | None) -> None:
    """Count one guard decision: its reason, or the status when no guard held (``queued``)."""
    DECISIONS.labels(decision=reason or status).inc()


def count_breaker_transition(remediation: str, transition: str) -> None:
    """Count one breaker transition (the target is left out: its values are unbounded)."""
    BREAKER_TRANSITIONS.labels(remediation=remediation, transition=transition).inc()


def exposition() -> tuple[bytes, str]:
    """This process's metrics, or with ``PROMETHEUS_MULTIPROC_DIR`` the sum of every process's
    that writes there; and the content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay in the sum, as they should)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _Handler(MetricsHandler):
    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body, content_type = exposition()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics`` (``exposition()``) on a daemon thread; returns the server."""
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="responder-metrics", daemon=True).start()
    return server
