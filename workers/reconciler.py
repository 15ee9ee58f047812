"""The reconciler (a beat job): whatever the ledger says must still happen is sent again.

Redis is only the doorbell. A message can be lost (a Redis restarted without AOF), acked after
its task raised (Celery acks failures even with ``acks_late``), or stranded with a dead worker.
So the reconciler never asks whether a message was sent; it asks the ledger what is not done:

1. Attempts whose lease expired (no heartbeat) are abandoned; their runs go back to ``queued``.
2. Events not handled, and ``queued`` runs not started, are published again once their last
   publish is ``RESPONDER_REDELIVER_AFTER_S`` old (doubling per publish), or
   ``RESPONDER_RECONCILE_AFTER_S`` after they were recorded if never published.
3. A run published ``RESPONDER_MAX_DELIVERIES`` times without ever being claimed is ``failed``
   (its messages keep dying before they start); an event is given up by ``handle_alert`` itself
   once it has started that many times (counted before it plans).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from workers import metrics, telemetry
from workers.ledger import attempts, repository
from workers.ledger.db import db_now, reading, transaction
from workers.ledger.states import RunStatus
from workers.publishing import Publisher, publish_events, publish_runs
from workers.settings import Settings

log = telemetry.get_logger(__name__)
BATCH = 500


@dataclass(frozen=True)
class Reconciled:
    """What one pass did: events and runs published, runs given up."""

    events: int
    runs: int
    given_up: int = 0


def reconcile(*, settings: Settings, publisher: Publisher) -> Reconciled:
    """One pass: abandon expired attempts, give up undeliverable runs, publish what is not done.

    What is due is found with reads; a write transaction is taken only for what must change, so
    a pass with nothing to do never takes the ledger's writer (SQLite has one for all).
    """
    with reading(settings.database_url) as session:
        now = db_now(session)
        stale_found = attempts.has_stale_attempts(session, now=now)
    stale: list[str] = []
    if stale_found:
        with transaction(settings.database_url) as session:
            stale = attempts.requeue_stale_runs(session, now=db_now(session), limit=BATCH)
    if stale:
        log.warning("stale_attempts_abandoned", runs=len(stale))
    cutoff = now - timedelta(seconds=settings.reconcile_after_s)
    with reading(settings.database_url) as session:
        event_ids = repository.events_to_enqueue(
            session,
            received_before=cutoff,
            now=now,
            redeliver_after_s=settings.redeliver_after_s,
            limit=BATCH,
        )
        due = repository.runs_to_enqueue(
            session,
            updated_before=cutoff,
            now=now,
            redeliver_after_s=settings.redeliver_after_s,
            limit=BATCH,
        )
    traces: dict[str, dict[str, str] | None] = dict(event_ids)
    runs: list[tuple[str, float]] = []
    undeliverable = []
    for run in due:
        if run.publishes >= settings.max_deliveries:
            undeliverable.append(run)
        else:
            runs.append((run.id, run.timeout_s))
            traces[run.id] = run.trace_context
    given_up = 0
    if undeliverable:
        with transaction(settings.database_url) as session:
            for run in undeliverable:
                error = f"never started after {run.publishes} deliveries; giving up"
                if attempts.transition_run(
                    session, run.id, RunStatus.FAILED, expect=[RunStatus.QUEUED], error=error
                ):
                    given_up += 1
                    log.error("run_given_up", run_id=run.id, deliveries=run.publishes)
    # Each message in its alert's trace, not this pass's (workers.tracing).
    events = publish_events(list(event_ids), settings=settings, publisher=publisher, traces=traces)
    run_count = publish_runs(runs, settings=settings, publisher=publisher, traces=traces) if runs else 0
    result = Reconciled(events=events, runs=run_count, given_up=given_up)
    metrics.REDELIVERIES.labels(kind="events").inc(events)
    metrics.REDELIVERIES.labels(kind="runs").inc(run_count)
    metrics.GIVEN_UP.labels(kind="runs").inc(given_up)
    if result.events or result.runs or result.given_up:
        log.info("reconciled", events=result.events, runs=result.runs, given_up=result.given_up)
    return result
