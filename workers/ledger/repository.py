"""The ledger's queries for events and runs, as small functions (attempts: ``attempts.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, bindparam, func, or_, select, text, tuple_, update
from sqlalchemy.orm import Session

from workers import jsoncodec
from workers.alerts import Alert
from workers.ledger.models import (
    ATTEMPTS,
    BREAKERS,
    EVENTS,
    PAUSES,
    RUNS,
    AlertEvent,
    BreakerRecord,
    Pause,
    Run,
    UTCDateTime,
    utcnow,
)
from workers.ledger.states import RunStatus

INSERT_CHUNK = 500


def new_id() -> str:
    """A fresh id for events and runs."""
    return str(uuid.uuid4())


def _insert(session: Session, model: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING.

    Each dialect's module is imported when first used: a process on SQLite (the receiver and
    the worker of the embedded default) does not hold PostgreSQL's (2 MiB), nor the reverse.
    """
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(model)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(model)


@dataclass(frozen=True)
class RecordedEvent:
    """The outcome of recording one alert: its event id and whether it was new."""

    alert: Alert
    event_id: str
    accepted: bool


@dataclass(frozen=True)
class Notification:
    """The alerts of one webhook and where it came from."""

    alerts: Sequence[Alert]
    receiver: str
    group_key: str
    # The webhook's trace context and correlation id (workers.tracing), kept on its events.
    trace_context: dict[str, str] | None = None


def record_events(
    session: Session, alerts: Sequence[Alert], *, receiver: str, group_key: str, published: bool = False
) -> list[RecordedEvent]:
    """Insert one webhook's new events (``record_notifications`` for one notification)."""
    return record_notifications(session, [Notification(alerts, receiver, group_key)], published=published)[0]


def record_notifications(
    session: Session, notifications: Sequence[Notification], *, published: bool = False
) -> list[list[RecordedEvent]]:
    """Insert the new events of several webhooks in the caller's transaction (group commit).

    Repeats, retries and HA duplicates become duplicates; within the batch the first webhook
    to carry an alert gets it accepted, later ones a duplicate, as if they had come one by one.
    ``published``: the caller publishes the accepted events right after the commit, so they are
    recorded as published once (``unmark_enqueued`` undoes it if publishing fails).
    """
    now = utcnow()
    fresh: dict[tuple[str, str, str], dict[str, Any]] = {}
    for notification in notifications:
        for alert in notification.alerts:
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
                    "receiver": notification.receiver,
                    "group_key": notification.group_key,
                    "trace_context": notification.trace_context or None,
                },
            )
    inserted: set[str] = set()
    if fresh:  # a webhook may carry no alert at all
        statement = _INSERT_STATEMENTS[session.get_bind().dialect.name]
        batch = {
            "rows": jsoncodec.dumps(list(fresh.values())),
            "received_at": now,
            "enqueued_at": now if published else None,
            "publishes": 1 if published else 0,
        }
        inserted.update(session.connection().execute(statement, batch).scalars())
    ids = {key: row["id"] for key, row in fresh.items() if row["id"] in inserted}
    missing = [key for key in fresh if key not in ids]
    if missing:
        ids.update(_existing_event_ids(session, missing))
    results: list[list[RecordedEvent]] = []
    seen: set[tuple[str, str, str]] = set()
    for notification in notifications:
        recorded = []
        for alert in notification.alerts:
            key = alert.event_key
            accepted = fresh[key]["id"] in inserted and key not in seen
            seen.add(key)
            recorded.append(RecordedEvent(alert=alert, event_id=ids[key], accepted=accepted))
        results.append(recorded)
    return results


# A batch's rows as one JSON document (``rows``: an object per event, keyed by column), unpacked
# by the database, with the fields every row shares as scalars: one statement text whatever the
# row count. SQLAlchemy's executemany with RETURNING builds a multi-row VALUES statement per
# batch size and binds every value of every row through its type processors: that was most of the receiver's writer thread, and on PostgreSQL psycopg parsed
# each statement anew (too long for its cache). One array per column instead cost as much again
# in psycopg's escaping of each element (docs/benchmarks.md). SQLite needs JSON1 (built in
# since 3.38, a compile option before) and RETURNING (3.35); "WHERE true" keeps its parser from
# reading ON CONFLICT as a join's ON.
_INSERT_EVENTS = {
    "postgresql": """
    INSERT INTO alert_events (id, fingerprint, starts_at, status, ends_at, labels, annotations,
        generator_url, receiver, group_key, trace_context, received_at, enqueued_at, publishes)
    SELECT id, fingerprint, starts_at, status, ends_at, labels, annotations, generator_url,
        receiver, group_key, trace_context, :received_at, :enqueued_at, :publishes
    FROM json_to_recordset(CAST(:rows AS json)) AS rows(id varchar, fingerprint varchar,
        starts_at varchar, status varchar, ends_at varchar, labels json, annotations json,
        generator_url text, receiver text, group_key text, trace_context json)
    ON CONFLICT (fingerprint, starts_at, status) DO NOTHING
    RETURNING id
    """,
    "sqlite": """
    INSERT INTO alert_events (id, fingerprint, starts_at, status, ends_at, labels, annotations,
        generator_url, receiver, group_key, trace_context, received_at, enqueued_at, publishes)
    SELECT json_extract(value, '$.id'), json_extract(value, '$.fingerprint'),
        json_extract(value, '$.starts_at'), json_extract(value, '$.status'),
        json_extract(value, '$.ends_at'), json_extract(value, '$.labels'),
        json_extract(value, '$.annotations'), json_extract(value, '$.generator_url'),
        json_extract(value, '$.receiver'), json_extract(value, '$.group_key'),
        json_extract(value, '$.trace_context'), :received_at, :enqueued_at, :publishes
    FROM json_each(:rows) WHERE true
    ON CONFLICT (fingerprint, starts_at, status) DO NOTHING
    RETURNING id
    """,
}


def _insert_events(dialect: str) -> Any:
    """The statement recording events on ``dialect``, its scalar parameters typed."""
    return text(_INSERT_EVENTS[dialect]).bindparams(
        bindparam("received_at", type_=UTCDateTime()),
        bindparam("enqueued_at", type_=UTCDateTime()),
        bindparam("publishes", type_=Integer()),
    )


_INSERT_STATEMENTS = {dialect: _insert_events(dialect) for dialect in _INSERT_EVENTS}


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


Publishable = type[AlertEvent] | type[Run]


def mark_enqueued(session: Session, model: Publishable, ids: Sequence[str]) -> None:
    """Record that a message was published (again) for these events or runs."""
    if ids:
        session.execute(
            update(model).where(model.id.in_(ids)).values(enqueued_at=utcnow(), publishes=model.publishes + 1)
        )


def unmark_enqueued(session: Session, model: Publishable, ids: Sequence[str]) -> None:
    """Undo a publish recorded with the rows (``published=True``) whose message the broker did
    not take: the reconciler then sends it soon."""
    if ids:
        session.execute(
            update(model)
            .where(model.id.in_(ids), model.publishes > 0)
            .values(enqueued_at=None, publishes=model.publishes - 1)
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
) -> dict[str, dict[str, str] | None]:
    """Events not handled: never published, or published but not handled within the bound
    (id: trace context, oldest first).

    A ``handle_alert`` that raised was acked all the same, and a Redis restarted without AOF
    loses what it held: whatever is not handled is found here, whatever happened to the message.
    """
    statement = (
        select(AlertEvent.id, AlertEvent.enqueued_at, AlertEvent.publishes, AlertEvent.trace_context)
        .where(
            AlertEvent.handled_at.is_(None),
            AlertEvent.received_at < received_before,
            _unpublished_since(AlertEvent.enqueued_at, now - timedelta(seconds=redeliver_after_s)),
        )
        .order_by(AlertEvent.received_at)
        .limit(limit)
    )
    return {
        event_id: trace_context
        for event_id, published, publishes, trace_context in session.execute(statement)
        if redelivery_due(published, publishes, now=now, after_s=redeliver_after_s)
    }


@dataclass(frozen=True)
class Delivery:
    """One start of ``handle_alert`` on an event: whether to plan, and the count so far."""

    deliveries: int
    handled: bool
    missing: bool = False


def note_event_deliveries(session: Session, event_ids: Sequence[str]) -> dict[str, Delivery]:
    """Count a start of ``handle_alert`` on each event not yet handled (commit it on its own,
    so a start that kills the process still counts)."""
    counted = session.execute(
        update(AlertEvent)
        .where(AlertEvent.id.in_(event_ids), AlertEvent.handled_at.is_(None))
        .values(deliveries=AlertEvent.deliveries + 1)
        .returning(AlertEvent.id, AlertEvent.deliveries)
        .execution_options(synchronize_session=False)
    )
    found = {event_id: Delivery(deliveries, handled=False) for event_id, deliveries in counted}
    rest = [event_id for event_id in event_ids if event_id not in found]
    if rest:
        handled = session.execute(select(AlertEvent.id, AlertEvent.deliveries).where(AlertEvent.id.in_(rest)))
        found.update({event_id: Delivery(deliveries, handled=True) for event_id, deliveries in handled})
    return {event_id: found.get(event_id, Delivery(0, handled=False, missing=True)) for event_id in event_ids}


_EVENTS_BY_IDS = select(AlertEvent).where(AlertEvent.id.in_(bindparam("ids", expanding=True)))


def events_by_ids(session: Session, event_ids: Sequence[str]) -> list[AlertEvent]:
    """The events with these ids, in the order given (missing ones left out)."""
    if not event_ids:
        return []
    found = {e.id: e for e in session.scalars(_EVENTS_BY_IDS, {"ids": list(event_ids)})}
    return [found[event_id] for event_id in event_ids if event_id in found]


_MARK_HANDLED = (
    update(EVENTS)
    .where(EVENTS.c.id == bindparam("event_id"), EVENTS.c.handled_at.is_(None))
    .values(handled_at=bindparam("now"), matched_rules=bindparam("matched"))
)
_MARK_HANDLED_COUNTED = _MARK_HANDLED.values(deliveries=EVENTS.c.deliveries + 1)


def mark_events_handled(session: Session, matched: dict[str, int], *, count_start: bool = False) -> None:
    """Mark events handled with how many rules matched each (those not handled already);
    ``count_start``: and count this start of ``handle_alert`` on them (a first delivery's)."""
    if not matched:
        return
    now = utcnow()
    session.connection().execute(
        _MARK_HANDLED_COUNTED if count_start else _MARK_HANDLED,
        [{"event_id": event_id, "matched": count, "now": now} for event_id, count in matched.items()],
    )


def give_up_event(session: Session, event_id: str, *, error: str) -> None:
    """Mark an event handled with the reason it could not be (poison message, after N tries)."""
    session.execute(
        update(AlertEvent)
        .where(AlertEvent.id == event_id, AlertEvent.handled_at.is_(None))
        .values(handled_at=utcnow(), error=error[:4000])
    )


def note_event_error(session: Session, event_id: str, *, error: str, count_start: bool = False) -> None:
    """Keep the last error of a failed ``handle_alert`` on its event; ``count_start``: and count
    this start on it (a first delivery's)."""
    values: dict[str, Any] = {"error": error[:4000]}
    if count_start:
        values["deliveries"] = AlertEvent.deliveries + 1
    session.execute(update(AlertEvent).where(AlertEvent.id == event_id).values(**values))


_RESOLVED_EPISODES = select(EVENTS.c.fingerprint, EVENTS.c.starts_at).where(
    EVENTS.c.status == "resolved",
    tuple_(EVENTS.c.fingerprint, EVENTS.c.starts_at).in_(bindparam("episodes", expanding=True)),
)


def resolved_episodes(session: Session, episodes: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (fingerprint, startsAt) episodes have a resolved event recorded."""
    wanted = list(set(episodes))
    found: set[tuple[str, str]] = set()
    connection = session.connection()
    for start in range(0, len(wanted), INSERT_CHUNK):
        rows = connection.execute(_RESOLVED_EPISODES, {"episodes": wanted[start : start + INSERT_CHUNK]})
        found.update((fingerprint, starts_at) for fingerprint, starts_at in rows)
    return found


def insert_runs(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert runs (each row with its ``id``); returns the ids inserted. A row whose dedupe key
    already has a run is not inserted (action at most once). One cached statement, executemany."""
    if not rows:
        return set()
    now = utcnow()
    statement = (
        _insert(session, RUNS).on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(RUNS.c.id)
    )
    params = [{"created_at": now, "updated_at": now, **row} for row in rows]
    return set(session.connection().execute(statement, params).scalars())


def runs_by_keys(session: Session, dedupe_keys: Sequence[str]) -> dict[str, Run]:
    """The runs already admitted under these dedupe keys."""
    if not dedupe_keys:
        return {}
    return {
        run.dedupe_key: run for run in session.scalars(select(Run).where(Run.dedupe_key.in_(dedupe_keys)))
    }


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
class PauseState:
    """Whether the responder is paused, since when, by whom and why (None: never paused)."""

    paused: bool
    actor: str | None = None
    reason: str | None = None
    at: datetime | None = None


# The pause in force is the latest row: one indexed lookup, also used inside the claim.
LATEST_PAUSE = select(PAUSES.c.paused).order_by(PAUSES.c.id.desc()).limit(1)


def is_paused(session: Session) -> bool:
    """Whether the pause switch is on (the latest pause or resume); one Core statement, for the
    hot paths that need only that."""
    return bool(session.connection().execute(LATEST_PAUSE).scalar())


def current_pause(session: Session) -> PauseState:
    """The pause switch as the latest pause or resume left it."""
    row = session.scalars(select(Pause).order_by(Pause.id.desc()).limit(1)).first()
    if row is None:
        return PauseState(paused=False)
    return PauseState(paused=row.paused, actor=row.actor, reason=row.reason, at=row.at)


def set_pause(session: Session, *, paused: bool, actor: str, reason: str) -> PauseState:
    """Pause or resume, recording who and why (the history is kept)."""
    row = Pause(paused=paused, actor=actor[:200], reason=reason, at=utcnow())
    session.add(row)
    session.flush()
    return PauseState(paused=row.paused, actor=row.actor, reason=row.reason, at=row.at)


def pause_history(session: Session, *, limit: int) -> list[PauseState]:
    """The latest pauses and resumes, newest first."""
    rows = session.scalars(select(Pause).order_by(Pause.id.desc()).limit(limit))
    return [PauseState(paused=r.paused, actor=r.actor, reason=r.reason, at=r.at) for r in rows]


def cancel_pending_episode_runs(session: Session, episodes: Iterable[tuple[str, str]]) -> list[str]:
    """Cancel the firing runs of these resolved episodes that have not started: ``waiting``
    (grace period) and ``queued`` (not yet claimed, or between attempts). A running attempt is
    left to finish; its run's next attempt is not started (the claim checks). Returns the ids."""
    wanted = list(set(episodes))
    cancelled: list[str] = []
    now = utcnow()
    for start in range(0, len(wanted), INSERT_CHUNK):
        result = session.connection().execute(
            update(RUNS)
            .where(
                RUNS.c.trigger == "alert",
                RUNS.c.status.in_([RunStatus.WAITING.value, RunStatus.QUEUED.value]),
                tuple_(RUNS.c.fingerprint, RUNS.c.starts_at).in_(wanted[start : start + INSERT_CHUNK]),
            )
            .values(
                status=RunStatus.CANCELLED.value,
                skip_reason="resolved",
                updated_at=now,
                finished_at=now,
            )
            .returning(RUNS.c.id)
        )
        cancelled.extend(result.scalars())
    return cancelled


@dataclass(frozen=True)
class ResolvedRun:
    """A run whose alert's episode has just been seen to resolve."""

    rule: str | None
    status: str
    finished_at: datetime | None
    resolved_at: datetime


def note_episodes_resolved(
    session: Session, resolved: Mapping[tuple[str, str], datetime]
) -> list[ResolvedRun]:
    """Record on the alert runs of each resolved episode when it resolved (once: a repeated
    resolved notification changes nothing); returns the runs just updated."""
    found: list[ResolvedRun] = []
    for (fingerprint, starts_at), at in resolved.items():
        rows = session.connection().execute(
            update(RUNS)
            .where(
                RUNS.c.trigger == "alert",
                RUNS.c.fingerprint == fingerprint,
                RUNS.c.starts_at == starts_at,
                RUNS.c.resolved_at.is_(None),
            )
            .values(resolved_at=at)
            .returning(RUNS.c.rule, RUNS.c.status, RUNS.c.finished_at)
        )
        found.extend(ResolvedRun(rule, status, finished_at, at) for rule, status, finished_at in rows)
    return found


_RESOLVED_RUNS_OF_ALERTS = select(
    RUNS.c.fingerprint, RUNS.c.starts_at, RUNS.c.rule, RUNS.c.resolved_at
).where(
    RUNS.c.trigger == "alert",
    RUNS.c.fingerprint.in_(bindparam("fingerprints", expanding=True)),
    RUNS.c.resolved_at >= bindparam("since"),
    RUNS.c.rule.is_not(None),
)


def refired_rules(
    session: Session, episodes: Iterable[tuple[str, str, datetime]], within_s: float
) -> list[str]:
    """For each new episode (fingerprint, startsAt, its instant), the rules that ran on an
    earlier episode of the same alert that resolved less than ``within_s`` before it began: the
    alert fired again soon after it was handled."""
    episodes = list(episodes)
    if not episodes:
        return []
    # One statement for the whole batch (the episode index), filtered here.
    rows = session.connection().execute(
        _RESOLVED_RUNS_OF_ALERTS,
        {
            "fingerprints": sorted({fingerprint for fingerprint, _, _ in episodes}),
            "since": min(began for _, _, began in episodes) - timedelta(seconds=within_s),
        },
    )
    earlier: dict[str, list[tuple[str, str, datetime]]] = {}
    for fingerprint, starts_at, rule, resolved_at in rows:
        earlier.setdefault(fingerprint, []).append((starts_at, rule, resolved_at))
    rules: list[str] = []
    for fingerprint, starts_at, began in episodes:
        rules.extend(
            sorted(
                {
                    rule
                    for other, rule, resolved_at in earlier.get(fingerprint, [])
                    if other != starts_at and began - timedelta(seconds=within_s) <= resolved_at <= began
                }
            )
        )
    return rules


def settle_slot(session: Session, run_id: str, *, status: RunStatus, reason: str | None) -> None:
    """A new queued run did not take its slot: record the guard's refusal (or, when it runs
    without one, that it holds none)."""
    values: dict[str, Any] = {"slot_at": None}
    if status != RunStatus.QUEUED:
        now = utcnow()
        values.update(
            status=status.value,
            skip_reason=reason,
            finished_at=now,
            updated_at=now,
            enqueued_at=None,
            publishes=0,
        )
    session.execute(update(RUNS).where(RUNS.c.id == run_id).values(**values))


def slots_since(session: Session, since: datetime) -> list[tuple[str, str, str, datetime, str]]:
    """(dedupe key, rule, cooldown group, slot time, trigger) of the runs that took a slot since
    ``since``."""
    rows = session.connection().execute(
        select(RUNS.c.dedupe_key, RUNS.c.rule, RUNS.c.guard_key, RUNS.c.slot_at, RUNS.c.trigger).where(
            RUNS.c.slot_at >= since, RUNS.c.rule.is_not(None), RUNS.c.guard_key.is_not(None)
        )
    )
    return [(key, rule, group, at, trigger) for key, rule, group, at, trigger in rows]


def save_breaker(
    session: Session,
    *,
    key: str,
    remediation: str,
    target: str | None,
    state: str,
    failures: int,
    opened_at: datetime | None,
    cool_down_s: float,
    error: str | None,
) -> None:
    """Record a breaker's state after a transition or a counted failure (insert or update)."""
    values = {
        "remediation": remediation,
        "target": target,
        "state": state,
        "failures": failures,
        "opened_at": opened_at,
        "cool_down_s": cool_down_s,
        "last_error": error[:2000] if error else None,
        "updated_at": utcnow(),
    }
    statement = _insert(session, BREAKERS).values(key=key, **values)
    if opened_at is None:  # a failure counted or a close: the time it last opened stays
        del values["opened_at"]
    session.execute(statement.on_conflict_do_update(index_elements=["key"], set_=values))


def list_breakers(session: Session, *, state: str | None = None, limit: int = 500) -> list[BreakerRecord]:
    """Breakers the ledger knows, not-closed first, then most recently changed."""
    statement = (
        select(BreakerRecord)
        .order_by((BreakerRecord.state == "closed"), BreakerRecord.updated_at.desc())
        .limit(limit)
    )
    if state is not None:
        statement = statement.where(BreakerRecord.state == state)
    return list(session.scalars(statement))


def running_targets(session: Session) -> list[tuple[str, str, datetime]]:
    """(target, run id, end of the slot's lease) of every attempt running now: the holders of
    targets' concurrency slots, for a rebuild. The lease is the attempt's, plus its timeout."""
    rows = session.execute(
        select(RUNS.c.target, ATTEMPTS.c.run_id, ATTEMPTS.c.deadline_at, RUNS.c.timeout_s)
        .join(RUNS, RUNS.c.id == ATTEMPTS.c.run_id)
        .where(ATTEMPTS.c.outcome == "running", RUNS.c.target.is_not(None))
    )
    return [(target, task, deadline + timedelta(seconds=timeout)) for target, task, deadline, timeout in rows]


def breaker_counts(session: Session) -> dict[tuple[str, str], int]:
    """How many breakers each remediation has in each state."""
    rows = session.execute(
        select(BreakerRecord.remediation, BreakerRecord.state, func.count()).group_by(
            BreakerRecord.remediation, BreakerRecord.state
        )
    )
    return {(remediation, state): count for remediation, state, count in rows}


def backlog_counts(session: Session) -> dict[str, int]:
    """What is not done yet (each by an index): events not handled, runs queued, runs waiting."""
    events = session.scalar(
        select(func.count()).select_from(AlertEvent).where(AlertEvent.handled_at.is_(None))
    )
    runs = dict(
        session.execute(
            select(Run.status, func.count())
            .where(Run.status.in_([RunStatus.QUEUED.value, RunStatus.WAITING.value]))
            .group_by(Run.status)
        ).all()
    )
    return {
        "events_unhandled": int(events or 0),
        "runs_queued": int(runs.get(RunStatus.QUEUED.value, 0)),
        "runs_waiting": int(runs.get(RunStatus.WAITING.value, 0)),
    }


@dataclass(frozen=True)
class DueRun:
    """A waiting run whose grace period has passed, with what the guards need to decide again."""

    id: str
    dedupe_key: str
    rule: str | None
    mode: str
    trigger: str
    timeout_s: float
    destructive: bool
    guard_key: str | None
    event_id: str | None
    resolved: bool
    trace_context: dict[str, str] | None = None


def due_waiting_runs(session: Session, *, now: datetime, limit: int) -> list[DueRun]:
    """Waiting runs whose ``not_before`` has passed, oldest due first."""
    resolved = (
        select(EVENTS.c.id)
        .where(
            EVENTS.c.fingerprint == RUNS.c.fingerprint,
            EVENTS.c.starts_at == RUNS.c.starts_at,
            EVENTS.c.status == "resolved",
        )
        .exists()
    )
    rows = session.connection().execute(
        select(RUNS.c.id, RUNS.c.dedupe_key, RUNS.c.rule, RUNS.c.mode, RUNS.c.trigger, RUNS.c.timeout_s)
        .add_columns(RUNS.c.destructive, RUNS.c.guard_key, RUNS.c.event_id, resolved.label("resolved"))
        .add_columns(RUNS.c.trace_context)
        .where(RUNS.c.status == RunStatus.WAITING.value, RUNS.c.not_before <= now)
        .order_by(RUNS.c.not_before)
        .limit(limit)
    )
    return [
        DueRun(
            r.id,
            r.dedupe_key,
            r.rule,
            r.mode,
            r.trigger,
            r.timeout_s,
            r.destructive,
            r.guard_key,
            r.event_id,
            bool(r.resolved),
            r.trace_context,
        )
        for r in rows
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
