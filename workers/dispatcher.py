"""The dispatcher (a beat job): waiting runs whose grace period has passed are decided again.

A rule with ``for: 2m`` admits its run as ``waiting`` with ``not_before`` in the ledger, not as
a delayed broker message (Redis redelivers a message that waits longer than its visibility
timeout, and loses it if it restarts empty). Every ``RESPONDER_DISPATCH_INTERVAL_S`` this pass
takes the due runs and applies the admission guards from ``paused`` on (``workers.admission``):
a run whose alert resolved meanwhile is ``cancelled``, one refused by a pause, a since-disabled
rule or dry run is ``skipped``, and the rest are ``queued`` and published. Each move is a
compare-and-set from ``waiting``, so two passes at once release a run once; the publish is
recorded with the move and undone if the broker refuses it, for the reconciler to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from workers import telemetry
from workers.admission import Mode, Trigger, decide
from workers.config import ResponderConfig
from workers.ledger import attempts, repository
from workers.ledger.db import db_now, reading, transaction
from workers.ledger.states import RunStatus
from workers.publishing import Publisher, publish_runs
from workers.settings import Settings

log = telemetry.get_logger(__name__)
BATCH = 500


@dataclass(frozen=True)
class Released:
    """What one pass did with the due runs."""

    queued: int = 0
    refused: int = 0


def release_due(*, settings: Settings, config: ResponderConfig, publisher: Publisher) -> Released:
    """Decide every due waiting run (up to ``BATCH`` per pass) and publish the queued ones."""
    with reading(settings.database_url) as session:
        # The usual answer is "nothing is due": found without the ledger's write lock.
        if not repository.due_waiting_runs(session, now=db_now(session), limit=1):
            return Released()
    queued: list[tuple[str, float]] = []
    refused = 0
    with transaction(settings.database_url) as session:
        now = db_now(session)
        paused = repository.current_pause(session).paused
        for run in repository.due_waiting_runs(session, now=now, limit=BATCH):
            rule = config.rule(run.rule) if run.rule else None
            status, reason = decide(
                trigger=cast(Trigger, run.trigger),
                mode=cast(Mode, run.mode),
                paused=paused,
                enabled=rule is not None and rule.enabled,
                episode_resolved=run.resolved,
                due=True,
            )
            if status == RunStatus.QUEUED:
                moved = attempts.transition_run(
                    session, run.id, status, expect=[RunStatus.WAITING], enqueued_at=now, publishes=1
                )
                if moved:
                    queued.append((run.id, run.timeout_s))
            else:
                moved = attempts.transition_run(
                    session, run.id, status, expect=[RunStatus.WAITING], skip_reason=reason
                )
                refused += moved
            if moved:
                telemetry.count_decision(status.value, reason)
                log.info(
                    "waiting_run_decided", run_id=run.id, rule=run.rule, status=status.value, reason=reason
                )
    publish_runs(queued, settings=settings, publisher=publisher, marked=True)
    return Released(queued=len(queued), refused=refused)
