"""Run lifecycle writes: status transitions, attempt claims, leases and their end.

Every status change here is a compare-and-set (``workers.ledger.states``): one conditional
UPDATE whose rowcount says whether this writer won. Leases are set and judged on the ledger's
clock (``db.db_now``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.ledger.db import db_now
from workers.ledger.models import Attempt, Run, utcnow
from workers.ledger.repository import episode_resolved
from workers.ledger.states import FINISHED, AttemptOutcome, RunStatus, sources


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
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status.in_([s.value for s in allowed]))
        .values(status=to.value, **extra)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count


def _update_running_attempt(session: Session, attempt_id: int, **values: Any) -> bool:
    """Update an attempt only while it is running (compare-and-set); False if it was not."""
    result = session.execute(
        update(Attempt)
        .where(Attempt.id == attempt_id, Attempt.outcome == AttemptOutcome.RUNNING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def _close_attempt(session: Session, attempt_id: int, outcome: AttemptOutcome, **values: Any) -> bool:
    """Move a running attempt to ``outcome``; False if it was no longer running."""
    return _update_running_attempt(session, attempt_id, outcome=outcome.value, **values)


def abandon_attempt(session: Session, attempt: Attempt, *, now: datetime, error: str) -> bool:
    """Give up a running attempt and put its run back in the queue; False if it had moved on."""
    if not _close_attempt(session, attempt.id, AttemptOutcome.ABANDONED, ended_at=now, error=error):
        return False
    transition_run(
        session, attempt.run_id, RunStatus.QUEUED, expect=[RunStatus.RUNNING], enqueued_at=None, publishes=0
    )
    return True


def requeue_stale_runs(session: Session, *, now: datetime, limit: int) -> list[str]:
    """Abandon attempts whose lease expired and put their runs back in the queue.

    ``now`` is the ledger's clock (``db.db_now``), the same clock the leases were set on.
    Covers what redelivery does not: Celery acks a task killed by its hard time limit, and a
    dead or cut-off worker's message returns only after the visibility timeout.
    """
    stale = session.scalars(
        select(Attempt)
        .where(Attempt.outcome == AttemptOutcome.RUNNING, Attempt.deadline_at < now)
        .order_by(Attempt.deadline_at)
        .limit(limit)
    ).all()
    error = "lease expired: no heartbeat from the worker (killed, hard time limit, or cut off)"
    return [a.run_id for a in stale if abandon_attempt(session, a, now=now, error=error)]


def renew_lease(session: Session, attempt_id: int, *, now: datetime, lease_s: float) -> bool:
    """Extend a running attempt's lease; False when it is no longer running (it was superseded)."""
    return _update_running_attempt(
        session, attempt_id, deadline_at=now + timedelta(seconds=lease_s), heartbeat_at=now
    )


ClaimKind = Literal["run", "missing", "finished", "busy", "exhausted", "resolved"]


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
    lease_s: float,
) -> Claim:
    """Open the next attempt of a run, or say why not; one attempt at a time per run.

    An open attempt left by this same message (the worker died and the broker redelivered it),
    or one whose lease expired, is closed as ``abandoned``. An open attempt of another message
    within its lease is still running somewhere: this delivery is ``busy`` and does nothing.
    An alert run whose episode has resolved meanwhile is not started. Every status change is
    a compare-and-set; the lease is set on the ledger's clock.
    """
    now = db_now(session)
    run = session.get(Run, run_id, with_for_update=True, populate_existing=True)
    if run is None:
        return Claim("missing")
    if run.status in FINISHED:
        return Claim("finished")
    claim = Claim("run")
    for attempt in run.attempts:
        if attempt.outcome != AttemptOutcome.RUNNING:
            continue
        if attempt.task_id == task_id or attempt.deadline_at <= now:
            error = (
                "worker lost during the attempt; message redelivered"
                if attempt.task_id == task_id
                else "lease expired without a heartbeat"
            )
            if abandon_attempt(session, attempt, now=now, error=error):
                claim.abandoned.append(attempt.number)
        else:
            return Claim("busy")
    session.expire_all()  # the compare-and-set updates above bypassed the loaded objects
    run = session.get(Run, run_id)
    if run is None:
        return Claim("missing")
    resolved = run.trigger == "alert" and run.fingerprint and run.starts_at
    if resolved and episode_resolved(session, run.fingerprint or "", run.starts_at or ""):
        to = RunStatus.CANCELLED if run.attempts else RunStatus.SKIPPED
        transition_run(session, run.id, to, expect=[RunStatus.QUEUED], skip_reason="resolved")
        return Claim("resolved")
    if len(run.attempts) >= max_attempts:
        last = run.attempts[-1].error if run.attempts else None
        transition_run(
            session,
            run.id,
            RunStatus.FAILED,
            error=f"gave up after {len(run.attempts)} attempts; last error: {last}",
        )
        claim.kind = "exhausted"
        return claim
    attempt = Attempt(
        run_id=run.id,
        number=len(run.attempts) + 1,
        task_id=task_id,
        worker=worker[:200],
        started_at=now,
        deadline_at=now + timedelta(seconds=lease_s),
        heartbeat_at=now,
        outcome=AttemptOutcome.RUNNING,
    )
    if not transition_run(
        session,
        run.id,
        RunStatus.RUNNING,
        expect=[RunStatus.QUEUED],
        started_at=run.started_at or now,
        publishes=0,
    ):
        return Claim("finished")
    session.add(attempt)
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
) -> bool:
    """Close an attempt and move its run on (``queued`` means a retry will follow).

    Returns False when the attempt had lost its claim (its lease was given up, or the run was
    cancelled): then only the attempt's own late outcome is recorded and the run is left alone.
    """
    now = utcnow()
    attempt = session.get(Attempt, attempt_id)
    if attempt is None:
        raise LookupError(f"attempt {attempt_id} not found")
    if not _close_attempt(
        session, attempt_id, AttemptOutcome(outcome), ended_at=now, error=error, output=output
    ):
        session.execute(
            update(Attempt)
            .where(Attempt.id == attempt_id)
            .values(late_outcome=outcome, output=output)
            .execution_options(synchronize_session=False)
        )
        return False
    to = RunStatus(run_status)
    values: dict[str, Any] = {"error": error if to != RunStatus.SUCCEEDED else None}
    if to == RunStatus.QUEUED:
        values.update(enqueued_at=None, publishes=0)  # set again once the retry is published
    return transition_run(session, attempt.run_id, to, expect=[RunStatus.RUNNING], **values)
