"""The Celery tasks: thin wrappers that carry ids and delegate to planner, runner, reconciler."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task, current_app, shared_task, signals
from sqlalchemy.orm import configure_mappers

from remediations import http
from workers import dispatcher, inline, metrics, planner, reconciler, runner, telemetry, tracing
from workers.config import ResponderConfig, cached_config
from workers.guardstate import GuardState, guard_state
from workers.heartbeat import Heartbeat
from workers.ledger import attempts
from workers.ledger.db import configure, connect, is_transient_ledger_error, reading
from workers.publishing import Publisher, publish_runs
from workers.resilience import ledger_policy
from workers.settings import Settings, get_settings
from workers.tasknames import DISPATCH, HANDLE_ALERT, RECONCILE, RUN_REMEDIATION

log = telemetry.get_logger(__name__)


def _config() -> ResponderConfig:
    return cached_config(get_settings().config)


def _publisher() -> Publisher:
    return Publisher(current_app, get_settings())


@signals.setup_logging.connect(weak=False)
def _setup_logging(**_: Any) -> None:
    """Keep Celery from configuring logging: structlog's pipeline owns it."""
    settings = get_settings()
    telemetry.configure_logging(
        fmt=settings.log_format, level=settings.log_level, secret_keys=settings.redact_keys
    )
    configure(lock_timeout_s=settings.db_lock_timeout_s, slow_statement_s=settings.slow_statement_ms / 1000)


def _retry_on_ledger_error(task: Task[Any, Any], exc: Exception) -> None:
    """Turn a transient ledger error into a retry with backoff; anything else propagates."""
    if not is_transient_ledger_error(exc):
        return
    settings = get_settings()
    policy = ledger_policy(settings)
    number = task.request.retries + 1
    log.warning("ledger_error_retrying", error_type=type(exc).__name__, retry=number)
    raise task.retry(exc=exc, countdown=policy.delay(number), max_retries=policy.attempts - 1) from exc


@signals.worker_init.connect(weak=False)
def _warm_up_before_fork(**_: Any) -> None:
    """In the worker's main process, before it forks its pool: what every child would otherwise
    build for itself (the parsed config, the TLS context, SQLAlchemy's mapper configuration) is
    built once and shared by the children's memory pages.

    Then ``gc.freeze()``: the objects created so far are left out of garbage collection, so a
    child's collections do not write to them and copy the parent's pages into its own memory
    (the pattern Python's ``gc`` documentation gives for fork without exec).
    """
    try:
        _config()
        http.warm_up()  # a client here loads httpx's transport modules once, shared too
        configure_mappers()
    except Exception as exc:  # each child tries again, and its tasks report it
        log.warning("worker_warm_up_failed", error_type=type(exc).__name__)
    gc.collect()
    gc.freeze()


_heartbeats: list[Heartbeat] = []


@signals.worker_ready.connect(weak=False)
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """The main process beats for the worker while it runs (``/readyz`` reads it)."""
    heartbeat = Heartbeat(get_settings(), getattr(sender, "hostname", None) or runner.worker_name())
    heartbeat.start()
    _heartbeats.append(heartbeat)


@signals.worker_shutdown.connect(weak=False)
def _stop_heartbeat(**_: Any) -> None:
    while _heartbeats:
        _heartbeats.pop().stop()


@signals.worker_process_init.connect(weak=False)
def _warm_up(**_: Any) -> None:
    _trace("worker")
    warm_up_process()


def warm_up_process() -> None:
    """Pay a fresh worker process's one-time costs before its first task, not during an alert.

    The ledger connected, the pooled HTTP client built, the broker connection for publishing
    opened with what Celery builds on a first publish, the guard state's Redis connection
    opened (and the config, if the parent could not load it): together with what the parent
    prepares they made the first alerts after a start about 300 ms slower than the rest, and
    a pool process's first alert under load among the slowest of a steady rate
    (``bench/worker_cost.py`` measures a fresh process's first alert). A failure here is not
    fatal: the first task meets it again and handles it as usual.
    """
    settings = get_settings()
    try:
        config = _config()
        connect(settings.database_url)
        http.warm_up()
        _publisher().warm_up()
        guard_state(settings, config).client.ping()
    except Exception as exc:
        log.warning("worker_warm_up_failed", error_type=type(exc).__name__)


def _trace(role: str) -> None:
    """Tracing for this process (after the fork: the exporter's thread is the child's own) and
    Celery's instrumentation: a task's span continues the trace in its message's headers."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    tracing.configure_tracing(role)
    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


@signals.beat_init.connect(weak=False)
def _trace_beat(**_: Any) -> None:
    _trace("beat")


@signals.worker_process_shutdown.connect(weak=False)
def _flush_spans(**_: Any) -> None:
    """A pool process exits without running ``atexit``: export its last spans first, and drop
    its live gauges from the worker's metrics."""
    tracing.shutdown()
    metrics.process_exited(os.getpid())


@signals.task_prerun.connect(weak=False)
def _bind_task(task_id: str | None = None, task: Task[Any, Any] | None = None, **_: Any) -> None:
    """Bind the task and its message's correlation id (the webhook's ``X-Request-ID``) to its
    log lines and to the trace context its rows keep."""
    telemetry.clear()
    correlation_id = tracing.request_id(getattr(task.request, tracing.REQUEST_ID, None) if task else None)
    tracing.CORRELATION_ID.set(correlation_id)
    telemetry.bind(task_id=task_id, task_name=task.name if task else None)
    if correlation_id:
        telemetry.bind(correlation_id=correlation_id)


@signals.task_postrun.connect(weak=False)
def _clear_task(**_: Any) -> None:
    telemetry.clear()
    tracing.CORRELATION_ID.set(None)


@shared_task(name=HANDLE_ALERT, bind=True, ignore_result=True)
def handle_alert(self: Task[Any, Any], *event_ids: str) -> list[str]:
    """Match, render, validate and record runs for the events of one webhook (idempotent); the
    last run queued is run here when this process may (``workers.inline``), the others sent."""
    started = time.monotonic()
    # The receiver's message, delivered for the first time (the broker marks what it restores
    # after a lost worker or a visibility timeout; a retry is a new message of this task).
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    if redelivered:  # its worker was lost (killed, or cut off past the visibility timeout)
        log.warning("handle_alert_redelivered", events=len(event_ids))
    settings = get_settings()
    offer: inline.Offer | None = None
    if settings.inline_runs and inline.can_run_here(self.app):
        hard, soft = self.request.timelimit or (None, None)
        offer = inline.Offer(margin_s=settings.hard_limit_margin_s, task_soft_s=soft or hard, started=started)
    try:
        config = _config()
        publisher = _publisher()
        guards = guard_state(settings, config)
        run_ids = planner.handle_events(
            event_ids=event_ids,
            settings=settings,
            config=config,
            publisher=publisher,
            guards=guards,
            first_delivery=not redelivered and not self.request.retries,
            keep=offer.take if offer else None,
        )
        if redelivered and offer is not None and offer.run is None:
            # The process this message was delivered to died: the run it kept, if it was
            # running it, is run again now under the same task id, whose claim abandons the
            # dead attempt at once (as a redelivered run_remediation's does), not after its lease.
            with reading(settings.database_url) as session:
                for run_id, timeout_s in attempts.left_by_task(session, self.request.id or "")[:1]:
                    offer.take(run_id, timeout_s)
    except Exception as exc:
        _retry_on_ledger_error(self, exc)
        # Not transient: each failed event keeps its error; the reconciler delivers it again
        # until RESPONDER_MAX_DELIVERIES, then the event is given up with that error.
        raise
    if offer is not None and offer.run is not None:
        _run_here(
            *offer.run,
            task_id=self.request.id or offer.run[0],
            settings=settings,
            config=config,
            guards=guards,
            publisher=publisher,
        )
    return run_ids


def _run_here(
    run_id: str,
    timeout_s: float,
    *,
    task_id: str,
    settings: Settings,
    config: ResponderConfig,
    guards: GuardState,
    publisher: Publisher,
) -> None:
    """Run the run ``handle_alert`` kept, under the limits its message would carry; whatever
    stops it before its outcome is known, its message is sent after all."""
    limits = publisher.run_remediation(run_id, timeout_s=timeout_s)
    telemetry.bind(run_id=run_id)
    try:
        with inline.time_limits(soft_s=limits.soft_time_limit, hard_s=limits.time_limit):
            execution = runner.execute(
                run_id=run_id,
                task_id=task_id,
                settings=settings,
                config=config,
                guards=guards,
                publisher=publisher,
            )
        runner.follow_up(run_id, execution, settings=settings, publisher=publisher)
    except (Exception, SoftTimeLimitExceeded) as exc:
        # Its claim refuses a message for a run already started or finished, so sending one
        # is safe whatever happened before the exception.
        log.warning("inline_run_not_finished", error_type=type(exc).__name__, exc_info=True)
        publish_runs([(run_id, timeout_s)], settings=settings, publisher=publisher, marked=True)


@shared_task(name=RUN_REMEDIATION, bind=True, ignore_result=True)
def run_remediation(self: Task[Any, Any], run_id: str) -> str:
    """Run one attempt of a run; a transient failure publishes the next attempt with backoff."""
    telemetry.bind(run_id=run_id)
    settings = get_settings()
    task_id = self.request.id or run_id
    try:
        config = _config()
        publisher = _publisher()
        execution = runner.execute(
            run_id=run_id,
            task_id=task_id,
            settings=settings,
            config=config,
            guards=guard_state(settings, config),
            publisher=publisher,
        )
    except Exception as exc:
        _retry_on_ledger_error(self, exc)
        raise
    runner.follow_up(run_id, execution, settings=settings, publisher=publisher)
    return execution.outcome


@shared_task(name=RECONCILE, ignore_result=True)
def reconcile() -> dict[str, int]:
    """Re-send whatever the ledger says is not done; one reconciler at a time (Redis lock)."""
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
    lock = client.lock("responder:lock:reconcile", timeout=300, blocking=False)
    try:
        if not lock.acquire():
            log.info("reconcile_already_running")
            return {"events": 0, "runs": 0}
        try:
            done = reconciler.reconcile(settings=settings, publisher=_publisher())
        finally:
            lock.release()
    except redis.RedisError as exc:
        log.warning("reconcile_failed", error=str(exc))
        return {"events": 0, "runs": 0}
    finally:
        client.close()
    log.info("reconcile_pass", events=done.events, runs=done.runs, given_up=done.given_up)
    return {"events": done.events, "runs": done.runs, "given_up": done.given_up}


@shared_task(name=DISPATCH, ignore_result=True)
def dispatch() -> dict[str, int]:
    """Release the waiting runs whose grace period has passed and verify the succeeded runs due
    (a failed pass: the next one does it)."""
    settings = get_settings()
    config = _config()
    done = dispatcher.release_due(
        settings=settings, config=config, publisher=_publisher(), guards=guard_state(settings, config)
    )
    if done.queued or done.refused:
        log.info("dispatch_pass", queued=done.queued, refused=done.refused)
    return {"queued": done.queued, "refused": done.refused}
