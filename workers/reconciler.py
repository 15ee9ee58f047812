"""The reconciler (a beat job): publish what the ledger holds but the broker never got."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from workers import telemetry
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import utcnow
from workers.publishing import Publisher, publish_events, publish_runs
from workers.settings import Settings

log = telemetry.get_logger(__name__)
BATCH = 500


@dataclass(frozen=True)
class Reconciled:
    """How many events and runs one pass published."""

    events: int
    runs: int


def reconcile(*, settings: Settings, publisher: Publisher) -> Reconciled:
    """Re-enqueue events recorded but not enqueued, and queued runs never published.

    Runs whose attempt outlived its deadline are put back in the queue (published by a later
    pass like any unpublished run; the attempt limit still applies when they are claimed).
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.reconcile_after_s)
    with transaction(settings.database_url) as session:
        stale = repository.requeue_stale_runs(session, now=now, limit=BATCH)
    if stale:
        log.warning("stale_attempts_abandoned", runs=len(stale))
    with transaction(settings.database_url) as session:
        event_ids = repository.events_to_enqueue(session, received_before=cutoff, limit=BATCH)
        runs = [
            (r.id, r.timeout_s)
            for r in repository.runs_to_enqueue(session, updated_before=cutoff, limit=BATCH)
        ]
    events = publish_events(event_ids, settings=settings, publisher=publisher) if event_ids else 0
    run_count = publish_runs(runs, settings=settings, publisher=publisher) if runs else 0
    result = Reconciled(events=events, runs=run_count)
    if result.events or result.runs:
        log.info("reconciled", events=result.events, runs=result.runs)
    return result
