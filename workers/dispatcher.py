"""The dispatcher (a beat job): waiting runs whose grace period has passed are decided again,
and succeeded runs due for verification are looked at (``workers.verification``).

A rule with ``for: 2m`` admits its run as ``waiting`` with ``not_before`` in the ledger, not as
a delayed broker message (Redis redelivers a message that waits longer than its visibility
timeout, and loses it if it restarts empty). Every ``RESPONDER_DISPATCH_INTERVAL_S`` this pass
takes the due runs and applies the admission guards from ``paused`` on (``workers.admission``):
a run whose alert resolved meanwhile is ``cancelled``, one refused by a pause, a since-disabled
rule or dry run is ``skipped``, and the rest take their cooldown and budget slots (a refusal is
``skipped``, a budget's escalated once per window) and are ``queued`` and published. Each move is a
compare-and-set from ``waiting``, so two passes at once release a run once; the publish is
recorded with the move and undone if the broker refuses it, for the reconciler to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from workers import metrics, telemetry, verification
from workers.admission import Mode, Trigger, decide, slot_of, take_slots, unguarded_policy
from workers.config import ResponderConfig
from workers.guardstate import GuardState
from workers.ledger import attempts, repository
from workers.ledger.db import db_now, reading, transaction
from workers.ledger.states import RunStatus
from workers.planner import budget_cause, escalate
from workers.publishing import Publisher, publish_runs
from workers.settings import Settings

log = telemetry.get_logger(__name__)
BATCH = 500


@dataclass(frozen=True)
class Released:
    """What one pass did with the due runs."""

    queued: int = 0
    refused: int = 0


def release_due(
    *, settings: Settings, config: ResponderConfig, publisher: Publisher, guards: GuardState | None = None
) -> Released:
    """Decide every due waiting run (up to ``BATCH`` per pass) and publish the queued ones."""
    with reading(settings.database_url) as session:
        # The usual answer is "nothing is due": found without the ledger's write lock.
        now = db_now(session)
        if not repository.due_waiting_runs(session, now=now, limit=1) and not verification.any_due(
            session, now
        ):
            return Released()
    queued: list[tuple[str, float]] = []
    refused = 0
    with transaction(settings.database_url) as session:
        now = db_now(session)
        paused = repository.is_paused(session)
        due = repository.due_waiting_runs(session, now=now, limit=BATCH)
        traces: dict[str, dict[str, str] | None] = {}
        facts: list[dict[str, Any]] = []
        decisions: list[tuple[RunStatus, str | None]] = []
        for run in due:
            rule = config.rule(run.rule) if run.rule else None
            facts.append(
                {
                    "trigger": cast(Trigger, run.trigger),
                    "mode": cast(Mode, run.mode),
                    "paused": paused,
                    "enabled": rule is not None and rule.enabled,
                    "episode_resolved": run.resolved,
                    "due": True,
                    "destructive": run.destructive,
                }
            )
            decisions.append(decide(**facts[-1]))
        takers = [
            i
            for i, run in enumerate(due)
            if decisions[i][0] == RunStatus.QUEUED and run.guard_key is not None
        ]
        slots = [slot_of(guards, due[i].rule or "", due[i].dedupe_key, due[i].guard_key) for i in takers]
        slotted: set[int] = set()
        budget_refused: dict[int, bool] = {}  # run index -> refused by the global budget
        for i, verdict in zip(takers, take_slots(session, guards, slots), strict=True):
            decisions[i] = decide(**facts[i], slot=verdict, unguarded=unguarded_policy(guards))
            if verdict == "ok":
                slotted.add(i)
            elif verdict in ("budget", "budget_global"):
                budget_refused[i] = verdict == "budget_global"
        for i, (run, (status, reason)) in enumerate(zip(due, decisions, strict=True)):
            if status == RunStatus.QUEUED:
                moved = attempts.transition_run(
                    session,
                    run.id,
                    status,
                    expect=[RunStatus.WAITING],
                    enqueued_at=now,
                    publishes=1,
                    slot_at=now if i in slotted else None,
                )
                if moved:
                    queued.append((run.id, run.timeout_s))
                    traces[run.id] = run.trace_context
            else:
                moved = attempts.transition_run(
                    session, run.id, status, expect=[RunStatus.WAITING], skip_reason=reason
                )
                refused += moved
            if moved:
                metrics.count_decision(status.value, reason)
                log.info(
                    "waiting_run_decided", run_id=run.id, rule=run.rule, status=status.value, reason=reason
                )
            else:
                budget_refused.pop(i, None)
        events = {
            e.id: e
            for e in repository.events_by_ids(session, [due[i].event_id or "" for i in budget_refused])
        }
        causes = [
            cause
            for i, global_budget in budget_refused.items()
            if due[i].event_id in events
            and (
                cause := budget_cause(
                    due[i].id,
                    due[i].rule or "",
                    events[due[i].event_id or ""],
                    config,
                    global_budget=global_budget,
                )
            )
        ]
        queued.extend(escalate(session, causes, config, guards))
        queued.extend(verification.verify_due(session, now=now, config=config, guards=guards))
    publish_runs(queued, settings=settings, publisher=publisher, marked=True, traces=traces)
    return Released(queued=len(queued), refused=refused)
