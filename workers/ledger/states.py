"""The run and attempt state machines: every status, and which transitions are allowed.

Every write of a status goes through ``attempts.transition_run`` or an attempt update with the
expected source statuses in its ``WHERE`` clause (compare-and-set, rowcount checked), so two
writers (a late worker and the reconciler, an operator and a worker) can never overwrite each
other: the second one finds the row already moved and backs off.

Runs::

    (admission) -> waiting | queued | failed | skipped
    waiting  -> queued      its grace period passed and the later guards let it go (dispatcher)
    waiting  -> skipped     a later guard refused it when it fell due (paused, dry run)
    waiting  -> cancelled   its alert resolved during the grace period, or an operator
    queued   -> running     an attempt claimed it
    queued   -> failed      never started after the maximum deliveries, or attempts exhausted
    queued   -> skipped     its alert resolved, or the responder was paused, before it started
    queued   -> cancelled   an operator, or its alert resolved (or a pause began) after an
                            earlier attempt
    running  -> succeeded | failed
    running  -> queued      a retry follows, or the attempt was abandoned (lease expired)
    running  -> cancelled   an operator
    succeeded, failed, skipped, cancelled: final

``waiting`` holds a run until ``runs.not_before`` (a rule's grace period, ``for:``) in the
ledger, not in a delayed broker message: the dispatcher (``workers.dispatcher``) releases it.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a run is in its life."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class AttemptOutcome(StrEnum):
    """Where an attempt is: ``running`` until it ends or its lease is given up (``abandoned``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABANDONED = "abandoned"


# The statuses a run may be created in by admission.
INITIAL: frozenset[RunStatus] = frozenset(
    {RunStatus.WAITING, RunStatus.QUEUED, RunStatus.FAILED, RunStatus.SKIPPED}
)

RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.WAITING: frozenset({RunStatus.QUEUED, RunStatus.SKIPPED, RunStatus.CANCELLED}),
    RunStatus.QUEUED: frozenset(
        {RunStatus.RUNNING, RunStatus.FAILED, RunStatus.SKIPPED, RunStatus.CANCELLED}
    ),
    RunStatus.RUNNING: frozenset(
        {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.QUEUED, RunStatus.CANCELLED}
    ),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.SKIPPED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}

ATTEMPT_TRANSITIONS: dict[AttemptOutcome, frozenset[AttemptOutcome]] = {
    AttemptOutcome.RUNNING: frozenset(
        {AttemptOutcome.SUCCEEDED, AttemptOutcome.FAILED, AttemptOutcome.ABANDONED}
    ),
    AttemptOutcome.SUCCEEDED: frozenset(),
    AttemptOutcome.FAILED: frozenset(),
    AttemptOutcome.ABANDONED: frozenset(),
}

FINISHED: frozenset[RunStatus] = frozenset(s for s, nexts in RUN_TRANSITIONS.items() if not nexts)
PENDING: frozenset[RunStatus] = frozenset({RunStatus.WAITING, RunStatus.QUEUED, RunStatus.RUNNING})


def sources(target: RunStatus) -> frozenset[RunStatus]:
    """The statuses from which a run may move to ``target``."""
    return frozenset(s for s, nexts in RUN_TRANSITIONS.items() if target in nexts)


def allowed(current: RunStatus, target: RunStatus) -> bool:
    """Whether a run may move from ``current`` to ``target``."""
    return target in RUN_TRANSITIONS[current]
