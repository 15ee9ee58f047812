"""The ledger's queries for events and runs, as small functions (attempts: ``attempts.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from workers.alerts import Alert
from workers.ledger.models import AlertEvent, Run, utcnow
from workers.ledger.states import RunStatus

INSERT_CHUNK = 500


def new_id() -> str:
    """A fresh id for events and runs."""
    return str(uuid.uuid4())


def _insert(session: Session, model: type[Any]) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


@dataclass(frozen=True)
class RecordedEvent:
    """The outcome of recording one alert: its event id and whether it was new."""

    alert: Alert
    event_id: str
    accepted: bool


def record_events(
    session: Session, alerts: Sequence[Alert], *, receiver: str, group_key: str
) -> list[RecordedEvent]:
    """Insert the webhook's new events; repeats, retries and HA duplicates become duplicates."""
    now = utcnow()
    fresh: dict[tuple[str, str, str], dict[str, Any]] = {}
    for alert in alerts:
        fresh.setdefault(
            alert.event_key,
            {
                "id": new_id(),
                "fingerprint": alert.fingerprint,
                "starts_at": alert.starts_at,
                "status": alert.status,
                "ends_at": alert.ends_at,
                "labels": alert.labels,
                "annotations": alert.annotations,
                "generator_url": alert.generator_url,
                "receiver": receiver,
                "group_key": group_key,
                "received_at": now,
            },
        )
    rows = list(fresh.values())
    inserted: set[str] = set()
    for start in range(0, len(rows), INSERT_CHUNK):
        statement = (
            _insert(session, AlertEvent)
            .values(rows[start : start + INSERT_CHUNK])
            .on_conflict_do_nothing(index_elements=["fingerprint", "starts_at", "status"])
            .returning(AlertEvent.id)
        )
        inserted.update(session.scalars(statement))
    ids = {key: row["id"] for key, row in fresh.items() if row["id"] in inserted}
    missing = [key for key in fresh if key not in ids]
    if missing:
        ids.update(_existing_event_ids(session, missing))
    results: list[RecordedEvent] = []
    seen: set[tuple[str, str, str]] = set()
    for alert in alerts:
        key = alert.event_key
        accepted = fresh[key]["id"] in inserted and key not in seen
        seen.add(key)
        results.append(RecordedEvent(alert=alert, event_id=ids[key], accepted=accepted))
    return results


def _existing_event_ids(
    session: Session, keys: Iterable[tuple[str, str, str]]
) -> dict[tuple[str, str, str], str]:
    found: dict[tuple[str, str, str], str] = {}
    keys = list(keys)
    for start in range(0, len(keys), INSERT_CHUNK):
        chunk = keys[start : start + INSERT_CHUNK]
        condition = or_(
            *(
                and_(
                    AlertEvent.fingerprint == fp,
                    AlertEvent.starts_at == starts_at,
                    AlertEvent.status == status,
                )
                for fp, starts_at, status in chunk
            )
        )
        rows = session.execute(
            select(AlertEvent.fingerprint, AlertEvent.starts_at, AlertEvent.status, AlertEvent.id).where(
                condition
            )
        )
        found.update({(fp, st, status): id_ for fp, st, status, id_ in rows})
    return found


def mark_events_enqueued(session: Session, event_ids: Sequence[str]) -> None:
    """Record that ``handle_alert`` was published (again) for these events."""
    if event_ids:
        session.execute(
            update(AlertEvent)
            .where(AlertEvent.id.in_(event_ids))
            .values(enqueued_at=utcnow(), publishes=AlertEvent.publishes + 1)
        )


def redelivery_due(published_at: datetime | None, publishes: int, *, now: datetime, after_s: float) -> bool:
    """Whether a message published ``publishes`` times, last at ``published_at``, is due again.

    The wait doubles with every publish (``after_s``, 2x, 4x ... capped at 64x): a message that
    is merely waiting behind a backlog is re-sent a few times, not once per reconcile pass.
    """
    if published_at is None:
        return True
    return published_at <= now - timedelta(seconds=after_s * 2 ** min(max(publishes - 1, 0), 6))


def _unpublished_since(published_at: Any, since: datetime) -> Any:
    """SQL: never published, or last published at or before ``since`` (``redelivery_due`` refines)."""
    return or_(published_at.is_(None), published_at <= since)


def events_to_enqueue(
    session: Session, *, received_before: datetime, now: datetime, redeliver_after_s: float, limit: int
) -> list[str]:
    """Events not handled: never published, or published but not handled within the bound.

    A ``handle_alert`` that raised was acked all the same, and a Redis restarted without AOF
    loses what it held: whatever is not handled is found here, whatever happened to the message.
    """
    statement = (
        select(AlertEvent.id, AlertEvent.enqueued_at, AlertEvent.publishes)
        .where(
            AlertEvent.handled_at.is_(None),
            AlertEvent.received_at < received_before,
            _unpublished_since(AlertEvent.enqueued_at, now - timedelta(seconds=redeliver_after_s)),
        )
        .order_by(AlertEvent.received_at)
        .limit(limit)
    )
    return [
        event_id
        for event_id, published, publishes in session.execute(statement)
        if redelivery_due(published, publishes, now=now, after_s=redeliver_after_s)
    ]


@dataclass(frozen=True)
class Delivery:
    """One start of ``handle_alert`` on an event: whether to plan, and the count so far."""

    deliveries: int
    handled: bool
    missing: bool = False


def note_event_delivery(session: Session, event_id: str) -> Delivery:
    """Count a start of ``handle_alert`` (committed on its own, so a crash still counts)."""
    event = session.get(AlertEvent, event_id, with_for_update=True)
    if event is None:
        return Delivery(0, handled=False, missing=True)
    if event.handled_at is not None:
        return Delivery(event.deliveries, handled=True)
    event.deliveries += 1
    return Delivery(event.deliveries, handled=False)


def give_up_event(session: Session, event_id: str, *, error: str) -> None:
    """Mark an event handled with the reason it could not be (poison message, after N tries)."""
    session.execute(
        update(AlertEvent)
        .where(AlertEvent.id == event_id, AlertEvent.handled_at.is_(None))
        .values(handled_at=utcnow(), error=error[:4000])
    )


def note_event_error(session: Session, event_id: str, *, error: str) -> None:
    """Keep the last error of a failed ``handle_alert`` on its event."""
    session.execute(update(AlertEvent).where(AlertEvent.id == event_id).values(error=error[:4000]))


def episode_resolved(session: Session, fingerprint: str, starts_at: str) -> bool:
    """Whether a resolved event of this episode has been recorded."""
    found = session.scalar(
        select(AlertEvent.id)
        .where(
            AlertEvent.fingerprint == fingerprint,
            AlertEvent.starts_at == starts_at,
            AlertEvent.status == "resolved",
        )
        .limit(1)
    )
    return found is not None


def insert_run(session: Session, values: dict[str, Any]) -> str | None:
    """Insert a run; None when its dedupe key already has one (action at most once)."""
    now = utcnow()
    statement = (
        _insert(session, Run)
        .values(id=new_id(), created_at=now, updated_at=now, **values)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(Run.id)
    )
    return session.scalars(statement).first()


def run_by_key(session: Session, dedupe_key: str) -> Run | None:
    """The run already admitted under ``dedupe_key``, if any."""
    return session.scalar(select(Run).where(Run.dedupe_key == dedupe_key))


def mark_runs_enqueued(session: Session, run_ids: Sequence[str]) -> None:
    """Record that ``run_remediation`` was published (again) for these runs."""
    if run_ids:
        session.execute(
            update(Run).where(Run.id.in_(run_ids)).values(enqueued_at=utcnow(), publishes=Run.publishes + 1)
        )


def runs_to_enqueue(
    session: Session, *, updated_before: datetime, now: datetime, redeliver_after_s: float, limit: int
) -> list[Run]:
    """Queued runs not started: never published, or published but not claimed within the bound."""
    statement = (
        select(Run)
        .where(
            Run.status == RunStatus.QUEUED,
            Run.updated_at < updated_before,
            _unpublished_since(Run.enqueued_at, now - timedelta(seconds=redeliver_after_s)),
        )
        .order_by(Run.created_at)
        .limit(limit)
    )
    return [
        run
        for run in session.scalars(statement)
        if redelivery_due(run.enqueued_at, run.publishes, now=now, after_s=redeliver_after_s)
    ]


@dataclass(frozen=True)
class RunFilter:
    """Filters of ``GET /api/v1/runs``; None means any."""

    status: str | None = None
    rule: str | None = None
    remediation: str | None = None
    fingerprint: str | None = None
    limit: int = 50


def list_runs(session: Session, filters: RunFilter) -> list[Run]:
    """Runs matching the filters, newest first."""
    statement = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(filters.limit)
    for column, value in (
        (Run.status, filters.status),
        (Run.rule, filters.rule),
        (Run.remediation, filters.remediation),
        (Run.fingerprint, filters.fingerprint),
    ):
        if value is not None:
            statement = statement.where(column == value)
    return list(session.scalars(statement))
