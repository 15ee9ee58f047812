"""Run lifecycle writes: status transitions, attempt claims, leases and their end.

Every status change here is a compare-and-set (``workers.ledger.states``): one conditional
UPDATE whose rowcount says whether this writer won. Leases are set and judged on the ledger's
clock (``db.db_now``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Row, and_, bindparam, exists, false, func, insert, not_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from workers.ledger import schedules
from workers.ledger.db import db_now
from workers.ledger.models import ATTEMPTS, EVENTS, RUNS, utcnow
from workers.ledger.repository import LATEST_PAUSE
from workers.ledger.states import FINISHED, AttemptOutcome, RunStatus, sources

# A run's claim and close are the worker's hot path: Core statements built once (their SET
# columns come from the parameters), since building a statement and the ORM's identity map and
# unit of work cost more than executing it (bench/ledger.py; docs/benchmarks.md).
_SET_RUN = update(RUNS).where(
    RUNS.c.id == bindparam("run_key"), RUNS.c.status.in_(bindparam("allowed", expanding=True))
)
_SET_RUNNING_ATTEMPT = update(ATTEMPTS).where(
    ATTEMPTS.c.id == bindparam("attempt_key"), ATTEMPTS.c.outcome == AttemptOutcome.RUNNING.value
)
_SET_ATTEMPT = update(ATTEMPTS).where(ATTEMPTS.c.id == bindparam("attempt_key"))
_EPISODE_RESOLVED = exists().where(
    EVENTS.c.fingerprint == RUNS.c.fingerprint,
    EVENTS.c.starts_at == RUNS.c.starts_at,
    EVENTS.c.status == "resolved",
)
_RUN_AND_GUARDS = select(
    RUNS, _EPISODE_RESOLVED.label("resolved"), LATEST_PAUSE.scalar_subquery().label("paused")
).where(RUNS.c.id == bindparam("run_key"))
_RUN_TO_CLAIM = _RUN_AND_GUARDS.with_for_update(of=RUNS)
# The claim of a run as ``look`` saw it: still queued, with as many attempts, and neither paused
# nor resolved since (the ledger's guards of ``_refusal``, judged in the statement itself).
_CLAIM_AS_SEEN = update(RUNS).where(
    RUNS.c.id == bindparam("run_key"),
    RUNS.c.status == RunStatus.QUEUED.value,
    select(func.count()).select_from(ATTEMPTS).where(ATTEMPTS.c.run_id == RUNS.c.id).scalar_subquery()
    == bindparam("tried"),
    func.coalesce(LATEST_PAUSE.scalar_subquery(), false()).is_(false()),
    not_(and_(RUNS.c.trigger == "alert", _EPISODE_RESOLVED)),
)
_ATTEMPTS_OF_RUN = (
    select(ATTEMPTS.c.id, ATTEMPTS.c.number, ATTEMPTS.c.task_id, ATTEMPTS.c.deadline_at)
    .add_columns(ATTEMPTS.c.outcome, ATTEMPTS.c.error)
    .where(ATTEMPTS.c.run_id == bindparam("run_key"))
    .order_by(ATTEMPTS.c.number)
)
_INSERT_ATTEMPT = insert(ATTEMPTS).returning(ATTEMPTS.c.id)
_EVENT_OF_RUN = (
    select(EVENTS.c.status, EVENTS.c.labels, EVENTS.c.annotations, EVENTS.c.starts_at, EVENTS.c.ends_at)
    .add_columns(EVENTS.c.generator_url, EVENTS.c.fingerprint, EVENTS.c.id)
    .where(EVENTS.c.id == bindparam("event_key"))
)


def transition_run(
    session: Session,
    run_id: str,
    to: RunStatus,
    *,
    expect: Iterable[RunStatus] | None = None,
    **values: Any,
) -> bool:
    """Move a run to ``to`` if it is in an allowed (and expected) status; False if it was not.

    One conditional UPDATE: two writers racing for the same run cannot both succeed.
    """
    allowed = sources(to) if expect is None else sources(to) & set(expect)
    now = utcnow()
    extra: dict[str, Any] = {"updated_at": now, **values}
    if to in FINISHED:
        extra.setdefault("finished_at", now)
    result = session.connection().execute(
        _SET_RUN,
        {"run_key": run_id, "allowed": [s.value for s in allowed], "status": to.value, **extra},
    )
    return _rowcount(result) == 1


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count


def _update_running_attempt(session: Session, attempt_id: int, **values: Any) -> bool:
    """Update an attempt only while it is running (compare-and-set); False if it was not."""
    result = session.connection().execute(_SET_RUNNING_ATTEMPT, {"attempt_key": attempt_id, **values})
    return _rowcount(result) == 1


def _close_attempt(session: Session, attempt_id: int, outcome: AttemptOutcome, **values: Any) -> bool:
    """Move a running attempt to ``outcome``; False if it was no longer running."""
    return _update_running_attempt(session, attempt_id, outcome=outcome.value, **values)


def abandon_attempt(session: Session, attempt_id: int, run_id: str, *, now: datetime, error: str) -> bool:
    """Give up a running attempt and put its run back in the queue; False if it had moved on."""
    if not _close_attempt(session, attempt_id, AttemptOutcome.ABANDONED, ended_at=now, error=error):
        return False
    transition_run(
        session, run_id, RunStatus.QUEUED, expect=[RunStatus.RUNNING], enqueued_at=None, publishes=0
    )
    return True


def _lease_expired(now: datetime) -> ColumnElement[bool]:
    """A running attempt whose lease ran out before ``now`` (the ledger's clock)."""
    return and_(ATTEMPTS.c.outcome == AttemptOutcome.RUNNING.value, ATTEMPTS.c.deadline_at < now)


def has_stale_attempts(session: Session, *, now: datetime) -> bool:
    """Whether any running attempt's lease has expired (a read: ``requeue_stale_runs`` acts)."""
    found = session.connection().execute(select(ATTEMPTS.c.id).where(_lease_expired(now)).limit(1))
    return found.first() is not None


def left_by_task(session: Session, task_id: str) -> list[tuple[str, float]]:
    """(run id, timeout) of the runs with an attempt still running under ``task_id``: what a
    redelivered ``handle_alert`` was running when its process died (``workers.inline``)."""
    found = session.connection().execute(
        select(RUNS.c.id, RUNS.c.timeout_s)
        .join(ATTEMPTS, ATTEMPTS.c.run_id == RUNS.c.id)
        .where(ATTEMPTS.c.task_id == task_id, ATTEMPTS.c.outcome == AttemptOutcome.RUNNING.value)
    )
    return [(row.id, row.timeout_s) for row in found]


def requeue_stale_runs(session: Session, *, now: datetime, limit: int) -> list[str]:
    """Abandon attempts whose lease expired and put their runs back in the queue.

    ``now`` is the ledger's clock (``db.db_now``), the same clock the leases were set on.
    Covers what redelivery does not: Celery acks a task killed by its hard time limit, and a
    dead or cut-off worker's message returns only after the visibility timeout.
    """
    stale = session.connection().execute(
        select(ATTEMPTS.c.id, ATTEMPTS.c.run_id)
        .where(_lease_expired(now))
        .order_by(ATTEMPTS.c.deadline_at)
        .limit(limit)
    )
    error = "lease expired: no heartbeat from the worker (killed, hard time limit, or cut off)"
    return [
        run_id
        for attempt_id, run_id in stale
        if abandon_attempt(session, attempt_id, run_id, now=now, error=error)
    ]


def renew_lease(session: Session, attempt_id: int, *, now: datetime, lease_s: float) -> bool:
    """Extend a running attempt's lease; False when it is no longer running (it was superseded)."""
    return _update_running_attempt(
        session, attempt_id, deadline_at=now + timedelta(seconds=lease_s), heartbeat_at=now
    )


ClaimKind = Literal[
    "run",
    "missing",
    "finished",
    "busy",
    "exhausted",
    "resolved",
    "paused",
    "disabled",
    "breaker_open",
    "guard_state_unavailable",
    "locked",
    "lock_wait",
]
# Asked as an attempt is about to open (the run's row in hand): None lets it go, the reason it may
# not (the runner's circuit breaker and target lock), or "lock_wait": not now, the run stays queued.
GateVerdict = Literal["breaker_open", "guard_state_unavailable", "locked", "lock_wait"]
ClaimGate = Callable[[Session, Row[Any]], GateVerdict | None]


@dataclass(frozen=True)
class ClaimedRun:
    """What an attempt needs of its run, read in the claim's transaction."""

    id: str
    remediation: str
    params: dict[str, Any]
    timeout_s: float
    rule: str | None
    fingerprint: str | None
    target: str | None
    trigger: str
    repeat: int
    # The alert event that caused the run (status, labels, annotations, times, fingerprint).
    event: Row[Any] | None
    # The context of the span that made the run: its attempts' parent (workers.tracing).
    trace_context: dict[str, str] | None = None
    created_at: datetime | None = None


@dataclass
class Claim:
    """What ``claim_run`` decided for one delivery of ``run_remediation``."""

    kind: ClaimKind
    attempt_id: int | None = None
    # lock_wait: the run's timeout, for its next delivery's time limits.
    timeout_s: float = 0.0
    number: int = 0
    abandoned: list[int] = field(default_factory=list)
    run: ClaimedRun | None = None


def _left_behind(attempt: Row[Any], task_id: str, now: datetime) -> bool:
    """A running attempt this delivery may close as abandoned: its own message's (the worker
    died and the broker redelivered it), or one whose lease expired."""
    return bool(attempt.task_id == task_id or attempt.deadline_at <= now)


def _refusal(run: Row[Any], disabled_rules: frozenset[str]) -> ClaimKind | None:
    """The admission guards that can change while a run is queued, in their order."""
    if run.paused:
        return "paused"
    if run.rule is not None and run.rule in disabled_rules:
        return "disabled"
    if run.trigger == "alert" and run.fingerprint and run.starts_at and run.resolved:
        return "resolved"
    return None


@dataclass(frozen=True)
class Look:
    """A run as a read outside any write transaction saw it (``look``)."""

    run: Row[Any]
    tried: list[Row[Any]]
    event: Row[Any] | None
    # Would ``claim_run`` ask its gate (the run is due for an attempt)?
    gate_due: bool
    # ...with no attempt to close first: ``claim_run`` may claim it as seen.
    ready: bool


def look(
    session: Session,
    *,
    run_id: str,
    task_id: str,
    max_attempts: int,
    disabled_rules: frozenset[str] = frozenset(),
) -> Look | None:
    """Read a run as its claim would, without a lock; None when it is missing or finished.

    The runner looks first, then asks the gate (Redis) and claims: the claim's write transaction
    (SQLite's one writer) holds neither the gate's round trips nor these reads. The claim then
    takes the run as seen with one compare-and-set, or, when it changed meanwhile, decides
    again from what it reads itself.
    """
    connection = session.connection()
    run = connection.execute(_RUN_AND_GUARDS, {"run_key": run_id}).one_or_none()
    if run is None or run.status in FINISHED:
        return None
    tried = connection.execute(_ATTEMPTS_OF_RUN, {"run_key": run_id}).all()
    now = db_now(session)
    running = [a for a in tried if a.outcome == AttemptOutcome.RUNNING]
    due = (
        _refusal(run, disabled_rules) is None
        and len(tried) < max_attempts
        and all(_left_behind(a, task_id, now) for a in running)
    )
    event = (
        connection.execute(_EVENT_OF_RUN, {"event_key": run.event_id}).one_or_none()
        if due and run.event_id
        else None
    )
    return Look(run, list(tried), event, gate_due=due, ready=due and not running and run.status == "queued")


def claim_run(
    session: Session,
    *,
    run_id: str,
    task_id: str,
    worker: str,
    max_attempts: int,
    lease_s: float,
    disabled_rules: frozenset[str] = frozenset(),
    gate: ClaimGate | None = None,
    seen: Look | None = None,
) -> Claim:
    """Open the next attempt of a run, or say why not; one attempt at a time per run.

    ``seen``: the run as ``look`` saw it. If it was ready and its gate lets it go, one
    compare-and-set claims it as seen; if the run changed meanwhile, the claim decides below.

    An open attempt left by this same message (the worker died and the broker redelivered it),
    or one whose lease expired, is closed as ``abandoned``. An open attempt of another message
    within its lease is still running somewhere: this delivery is ``busy`` and does nothing.
    The admission guards that can change while a run is queued are checked again (in their
    order): a pause that began, a rule since disabled, an episode that resolved meanwhile: the
    run is not started (``skipped``, or ``cancelled`` after an earlier attempt); last, ``gate``
    (the circuit breaker) may refuse it the same way. Every status change is
    a compare-and-set (the run's row is also locked on PostgreSQL); the lease is set on the
    ledger's clock.
    """
    if seen is not None and seen.ready and (gate is None or gate(session, seen.run) is None):
        claimed = _claim_as_seen(session, seen, task_id=task_id, worker=worker, lease_s=lease_s)
        if claimed is not None:
            return claimed
    connection = session.connection()
    now = db_now(session)
    run = connection.execute(_RUN_TO_CLAIM, {"run_key": run_id}).one_or_none()
    if run is None:
        return Claim("missing")
    if run.status in FINISHED:
        return Claim("finished")
    tried = connection.execute(_ATTEMPTS_OF_RUN, {"run_key": run_id}).all()
    claim = Claim("run")
    for attempt in tried:
        if attempt.outcome != AttemptOutcome.RUNNING:
            continue
        if _left_behind(attempt, task_id, now):
            error = (
                "worker lost during the attempt; message redelivered"
                if attempt.task_id == task_id
                else "lease expired without a heartbeat"
            )
            if abandon_attempt(session, attempt.id, run_id, now=now, error=error):
                claim.abandoned.append(attempt.number)
        else:
            return Claim("busy")
    refused = _refusal(run, disabled_rules)
    if refused is None and len(tried) < max_attempts and gate is not None:
        refused = gate(session, run)
        if refused == "lock_wait":
            return Claim("lock_wait", abandoned=claim.abandoned, timeout_s=run.timeout_s)
    if refused is not None:
        to = RunStatus.CANCELLED if tried else RunStatus.SKIPPED
        transition_run(session, run_id, to, expect=[RunStatus.QUEUED], skip_reason=refused)
        return Claim(refused)
    if len(tried) >= max_attempts:
        last = tried[-1].error if tried else None
        transition_run(
            session,
            run_id,
            RunStatus.FAILED,
            error=f"gave up after {len(tried)} attempts; last error: {last}",
        )
        claim.kind = "exhausted"
        return claim
    if not transition_run(
        session,
        run_id,
        RunStatus.RUNNING,
        expect=[RunStatus.QUEUED],
        started_at=run.started_at or now,
        publishes=0,
    ):
        return Claim("finished")
    event = (
        connection.execute(_EVENT_OF_RUN, {"event_key": run.event_id}).one_or_none() if run.event_id else None
    )
    return _open_attempt(session, run, event, len(tried) + 1, task_id, worker, now, lease_s, claim)


def _claim_as_seen(
    session: Session, seen: Look, *, task_id: str, worker: str, lease_s: float
) -> Claim | None:
    """Claim the run as ``look`` saw it; None (nothing written) when it has changed since."""
    run = seen.run
    now = db_now(session)
    values = {"status": RunStatus.RUNNING.value, "started_at": run.started_at or now, "publishes": 0}
    result = session.connection().execute(
        _CLAIM_AS_SEEN, {"run_key": run.id, "tried": len(seen.tried), "updated_at": now, **values}
    )
    if _rowcount(result) != 1:
        return None
    return _open_attempt(
        session, run, seen.event, len(seen.tried) + 1, task_id, worker, now, lease_s, Claim("run")
    )


def _open_attempt(
    session: Session,
    run: Row[Any],
    event: Row[Any] | None,
    number: int,
    task_id: str,
    worker: str,
    now: datetime,
    lease_s: float,
    claim: Claim,
) -> Claim:
    """Insert attempt ``number`` of a run just moved to running, with its lease."""
    inserted = session.connection().execute(
        _INSERT_ATTEMPT,
        {
            "run_id": run.id,
            "number": number,
            "task_id": task_id,
            "worker": worker[:200],
            "started_at": now,
            "deadline_at": now + timedelta(seconds=lease_s),
            "heartbeat_at": now,
            "outcome": AttemptOutcome.RUNNING.value,
        },
    )
    claim.attempt_id = int(inserted.scalar_one())
    claim.number = number
    claim.run = ClaimedRun(
        id=run.id,
        remediation=run.remediation,
        params=run.params,
        timeout_s=run.timeout_s,
        rule=run.rule,
        fingerprint=run.fingerprint,
        target=run.target,
        trigger=run.trigger,
        repeat=run.repeat,
        event=event,
        trace_context=run.trace_context,
        created_at=run.created_at,
    )
    return claim


def finish_attempt(
    session: Session,
    *,
    run_id: str,
    attempt_id: int,
    outcome: Literal["succeeded", "failed"],
    error: str | None,
    output: dict[str, Any] | None,
    run_status: Literal["succeeded", "failed", "queued"],
    run_values: dict[str, Any] | None = None,
    schedule: str | None = None,
) -> bool:
    """Close an attempt of ``run_id`` and move the run on (``queued`` means a retry will follow).

    ``schedule``: the run is this schedule's, which records its success with it.

    Returns False when the attempt had lost its claim (its lease was given up, or the run was
    cancelled): then only the attempt's own late outcome is recorded and the run is left alone.
    """
    now = utcnow()
    if not _close_attempt(
        session, attempt_id, AttemptOutcome(outcome), ended_at=now, error=error, output=output
    ):
        late = session.connection().execute(
            _SET_ATTEMPT, {"attempt_key": attempt_id, "late_outcome": outcome, "output": output}
        )
        if _rowcount(late) != 1:
            raise LookupError(f"attempt {attempt_id} not found")
        return False
    to = RunStatus(run_status)
    values: dict[str, Any] = {"error": error if to != RunStatus.SUCCEEDED else None, **(run_values or {})}
    if to == RunStatus.QUEUED:
        values.update(enqueued_at=None, publishes=0)  # set again once the retry is published
    moved = transition_run(session, run_id, to, expect=[RunStatus.RUNNING], **values)
    if moved and schedule is not None and to == RunStatus.SUCCEEDED:
        schedules.note_succeeded(session, schedule, at=now, run_id=run_id)
    return moved
