"""Every query the engine and the receiver make against the ledger, as small functions."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from workers.alerts import Alert
from workers.ledger.models import AlertEvent, Attempt, Run, utcnow

FINISHED = ("succeeded", "failed", "skipped")
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
    """Record that ``handle_alert`` was published for these events."""
    if event_ids:
        session.execute(update(AlertEvent).where(AlertEvent.id.in_(event_ids)).values(enqueued_at=utcnow()))


def events_to_enqueue(session: Session, *, received_before: datetime, limit: int) -> list[str]:
    """Events recorded but never published (the broker was down), oldest first."""
    statement = (
        select(AlertEvent.id)
        .where(AlertEvent.enqueued_at.is_(None), AlertEvent.received_at < received_before)
        .order_by(AlertEvent.received_at)
        .limit(limit)
    )
    return list(session.scalars(statement))


def insert_run(session: Session, values: dict[str, Any]) -> str | None:
    """Insert a run; None when its (episode, rule) already has one (action at most once)."""
    statement = (
        _insert(session, Run)
        .values(id=new_id(), created_at=utcnow(), updated_at=utcnow(), **values)
        .on_conflict_do_nothing(index_elements=["fingerprint", "starts_at", "rule"])
        .returning(Run.id)
    )
    return session.scalars(statement).first()


def mark_runs_enqueued(session: Session, run_ids: Sequence[str]) -> None:
    """Record that ``run_remediation`` was published for these runs."""
    if run_ids:
        session.execute(update(Run).where(Run.id.in_(run_ids)).values(enqueued_at=utcnow()))


def runs_to_enqueue(session: Session, *, updated_before: datetime, limit: int) -> list[Run]:
    """Queued runs whose message was never published (or whose retry could not be)."""
    statement = (
        select(Run)
        .where(Run.status == "queued", Run.enqueued_at.is_(None), Run.updated_at < updated_before)
        .order_by(Run.created_at)
        .limit(limit)
    )
    return list(session.scalars(statement))


def requeue_stale_runs(session: Session, *, now: datetime, limit: int) -> list[str]:
    """Close attempts past their deadline as abandoned and put their runs back in the queue.

    Covers what redelivery does not: Celery acks a task killed by its hard time limit, and a
    dead worker machine's message returns only after the visibility timeout.
    """
    stale = session.scalars(
        select(Attempt)
        .where(Attempt.outcome == "running", Attempt.deadline_at < now)
        .order_by(Attempt.deadline_at)
        .limit(limit)
        .with_for_update()
    ).all()
    run_ids: list[str] = []
    for attempt in stale:
        attempt.outcome = "abandoned"
        attempt.ended_at = now
        attempt.error = "attempt passed its deadline (hard time limit hit or worker lost)"
        run = session.get(Run, attempt.run_id, with_for_update=True)
        if run is not None and run.status == "running":
            run.status = "queued"
            run.enqueued_at = None
            run.updated_at = now
            run_ids.append(run.id)
    return run_ids


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


ClaimKind = Literal["run", "missing", "finished", "busy", "exhausted"]


@dataclass
class Claim:
    """What ``claim_run`` decided for one delivery of ``run_remediation``."""

    kind: ClaimKind
    attempt_id: int | None = None
    number: int = 0
    abandoned: list[int] = field(default_factory=list)


def claim_run(
    session: Session,
    *,
    run_id: str,
    task_id: str,
    worker: str,
    max_attempts: int,
    deadline_at: datetime,
) -> Claim:
    """Open the next attempt of a run, or say why not; one attempt at a time per run.

    An open attempt left by this same message (the worker died and the broker redelivered it),
    or one past its deadline, is closed as ``abandoned``. An open attempt of another message
    within its deadline is still running somewhere: this delivery is ``busy`` and does nothing.
    """
    now = utcnow()
    run = session.get(Run, run_id, with_for_update=True, populate_existing=True)
    if run is None:
        return Claim("missing")
    if run.status in FINISHED:
        return Claim("finished")
    claim = Claim("run")
    for attempt in run.attempts:
        if attempt.outcome != "running":
            continue
        if attempt.task_id == task_id or attempt.deadline_at <= now:
            attempt.outcome = "abandoned"
            attempt.ended_at = now
            attempt.error = (
                "worker lost during the attempt; message redelivered"
                if attempt.task_id == task_id
                else "attempt passed its deadline without finishing"
            )
            claim.abandoned.append(attempt.number)
        else:
            return Claim("busy")
    if len(run.attempts) >= max_attempts:
        last = run.attempts[-1].error if run.attempts else None
        run.status = "failed"
        run.error = f"gave up after {len(run.attempts)} attempts; last error: {last}"
        run.finished_at = now
        claim.kind = "exhausted"
        return claim
    attempt = Attempt(
        run_id=run.id,
        number=len(run.attempts) + 1,
        task_id=task_id,
        worker=worker[:200],
        started_at=now,
        deadline_at=deadline_at,
        outcome="running",
    )
    session.add(attempt)
    run.status = "running"
    run.started_at = run.started_at or now
    session.flush()
    claim.attempt_id = attempt.id
    claim.number = attempt.number
    return claim


def finish_attempt(
    session: Session,
    *,
    attempt_id: int,
    outcome: Literal["succeeded", "failed"],
    error: str | None,
    output: dict[str, Any] | None,
    run_status: Literal["succeeded", "failed", "queued"],
) -> None:
    """Close an attempt and move its run on (``queued`` means a retry will follow)."""
    now = utcnow()
    attempt = session.get(Attempt, attempt_id, with_for_update=True)
    if attempt is None:
        raise LookupError(f"attempt {attempt_id} not found")
    attempt.outcome = outcome
    attempt.ended_at = now
    attempt.error = error
    attempt.output = output
    run = session.get(Run, attempt.run_id, with_for_update=True)
    if run is None:
        raise LookupError(f"run {attempt.run_id} not found")
    run.status = run_status
    run.error = error if run_status != "succeeded" else None
    if run_status == "queued":
        run.enqueued_at = None  # set again once the retry is published
    else:
        run.finished_at = now
