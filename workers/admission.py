"""The one way in: every trigger turns a ``RunRequest`` into a recorded run with its decision.

Alerts use it now (``workers.planner``); manual runs, schedules and runbook steps call the same
``admit``, so every guard is written once, here (``decide``), and applied in one documented
order. The first guard that holds decides; each outcome is a run row with its reason:

1. ``invalid``: the request could not be planned (render, validation, preflight): ``failed``
   with the error, nothing runs.
2. ``paused``: the global pause switch is on (``POST /api/v1/pause``): ``skipped``.
3. ``disabled``: the rule says ``enabled: false``: ``skipped``.
4. ``resolved``: an alert run whose episode already has a resolved event recorded (both
   arrived while the broker was down, or out of order): ``skipped``; ``cancelled`` when the
   run had been waiting.
5. ``grace``: the rule has ``for:`` and the period has not passed: ``waiting`` until
   ``not_before``; the dispatcher (``workers.dispatcher``) decides again then, from guard 2 on.
6. ``dry_run``: ``skipped`` with the params, target and preflight it would have run with.
7. ``cooldown``: the rule's label group holds a cooldown slot (``workers.guardstate``).
8. ``budget``: the rule's or the global budget window is full; escalated once per window.
9. ``guard_state_unavailable``: the slots of 7-8 cannot be read: a destructive run is refused.
10. otherwise ``queued``.

Guards 2-4 are checked again when a run is claimed: a run queued before a pause began, or
before its alert resolved, does not start. The claim then asks the run's circuit breaker and
its target's concurrency slot (``breaker_open``, ``locked``: ``workers.breakers``, via the
runner). Action is at most once per dedupe key
(``RunRequest.dedupe_key``): a second admission of the same key returns the run already
recorded and creates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy.orm import Session

from workers import metrics, tracing
from workers.guardstate import ESCALATIONS, GuardState, Slot, Verdict, from_ledger
from workers.ledger import repository
from workers.ledger.models import utcnow
from workers.ledger.states import FINISHED, RunStatus

# "resolved": a rule's ``on_resolved`` action, caused by the alert's resolved event;
# "escalation": the configured escalation, caused by another run (``parent_run_id``).
Trigger = Literal["alert", "resolved", "escalation", "manual", "schedule", "step"]
Mode = Literal["enforce", "dry_run"]


@dataclass(frozen=True)
class RunRequest:
    """What a trigger asks for: a remediation with rendered params, and where it came from."""

    trigger: Trigger
    remediation: str
    params: dict[str, Any]
    rule: str | None = None
    mode: Mode = "enforce"
    target: str | None = None
    destructive: bool = True
    timeout_s: float = 0.0
    preflight: dict[str, Any] = field(default_factory=dict)
    # The rule's guards: ``enabled: false``, and ``for:`` (seconds to wait while still firing).
    enabled: bool = True
    grace_s: float = 0.0
    # The cooldown group of the run when it takes a cooldown or budget slot (workers.guardstate):
    # "" for the whole rule; None when no such guard applies.
    guard_key: str | None = None
    # alert trigger: which extra run of the episode this is (a rule's ``repeat``), 0 for the first
    repeat: int = 0
    # Set when planning failed: the run is recorded failed with it.
    error: str | None = None
    # alert and resolved triggers: the event and its episode
    event_id: str | None = None
    fingerprint: str | None = None
    starts_at: str | None = None
    # manual and schedule triggers: the caller's key (a retried request admits nothing new)
    idempotency_key: str | None = None
    # step trigger: the runbook run and the step's name
    parent_run_id: str | None = None
    step: str | None = None
    # The trace context its attempts continue (workers.tracing); by default the current span's.
    trace_context: dict[str, str] | None = None

    def dedupe_key(self) -> str:
        """The key that makes this action at most once, whatever the trigger."""
        if self.trigger in ("alert", "resolved"):
            again = f":repeat:{self.repeat}" if self.repeat else ""
            return f"{self.trigger}:{self.fingerprint}:{self.starts_at}:{self.rule}{again}"
        if self.trigger == "step":
            return f"step:{self.parent_run_id}:{self.step}"
        if self.idempotency_key is None:
            return f"{self.trigger}:{repository.new_id()}"
        return f"{self.trigger}:{self.idempotency_key}"


@dataclass(frozen=True)
class Admission:
    """The decision for one request: the run, its status and reason, and whether it is new."""

    run_id: str
    status: RunStatus
    reason: str | None
    created: bool
    timeout_s: float
    # What the shared state answered, when the run asked for a cooldown or budget slot.
    slot: Verdict | None = None
    # The trace context recorded on the run (a new run's).
    trace_context: dict[str, str] | None = None


def decide(
    *,
    trigger: Trigger,
    mode: Mode,
    error: str | None = None,
    paused: bool = False,
    enabled: bool = True,
    episode_resolved: bool = False,
    grace_s: float = 0.0,
    due: bool = False,
    slot: Verdict | None = None,
    destructive: bool = True,
    unguarded: Literal["run", "skip"] = "run",
) -> tuple[RunStatus, str | None]:
    """The guards, in order: the status a request is admitted (or released) in, and the reason.

    ``due``: the grace period has passed (the dispatcher releasing a waiting run). ``slot``:
    what the shared state answered for its cooldown and budget slot (``workers.guardstate``),
    asked only once every guard before it let the run go; ``unguarded`` is the config's policy
    for a non-destructive run when that state is unavailable.
    """
    if error is not None:
        return RunStatus.FAILED, "invalid"
    if paused:
        return RunStatus.SKIPPED, "paused"
    if not enabled:
        return RunStatus.SKIPPED, "disabled"
    if trigger == "alert" and episode_resolved:
        return (RunStatus.CANCELLED if due else RunStatus.SKIPPED), "resolved"
    if grace_s > 0 and not due:
        return RunStatus.WAITING, "grace"
    if mode == "dry_run":
        return RunStatus.SKIPPED, "dry_run"
    if slot == "cooldown":
        return RunStatus.SKIPPED, "cooldown"
    if slot in ("budget", "budget_global"):
        return RunStatus.SKIPPED, "budget"
    # An escalation is a page: with the state unreadable it goes out rather than stay silent.
    if slot == "unavailable" and trigger != "escalation" and (destructive or unguarded == "skip"):
        return RunStatus.SKIPPED, "guard_state_unavailable"
    return RunStatus.QUEUED, None


def admit(
    session: Session,
    requests: Sequence[RunRequest],
    *,
    published: bool = False,
    guards: GuardState | None = None,
) -> list[Admission]:
    """Decide and record each request in the caller's transaction; one Admission per request.

    ``published``: the caller publishes the queued runs right after the commit, so they are
    recorded as published once (``publishing.publish_runs(marked=True)`` undoes a failure).
    ``guards``: the shared cooldown and budget state; a new run that needs a slot takes it once
    every other guard let it go (without ``guards`` the state counts as unavailable).
    """
    if not requests:
        return []
    now = utcnow()
    current = tracing.current_carrier() or None
    paused = repository.is_paused(session)
    episodes = {(r.fingerprint or "", r.starts_at or "") for r in requests if r.trigger == "alert"}
    resolved = repository.resolved_episodes(session, episodes) if episodes else set()
    rows: list[dict[str, Any]] = []
    facts: list[dict[str, Any]] = []
    decisions: list[tuple[RunStatus, str | None]] = []
    for request in requests:
        facts.append(
            {
                "trigger": request.trigger,
                "mode": request.mode,
                "error": request.error,
                "paused": paused,
                "enabled": request.enabled,
                "episode_resolved": (request.fingerprint or "", request.starts_at or "") in resolved,
                "grace_s": request.grace_s,
                "destructive": request.destructive,
            }
        )
        status, reason = decide(**facts[-1])
        decisions.append((status, reason))
        queued = status == RunStatus.QUEUED
        rows.append(
            {
                "id": repository.new_id(),
                "dedupe_key": request.dedupe_key(),
                "event_id": request.event_id,
                "fingerprint": request.fingerprint,
                "starts_at": request.starts_at,
                "rule": request.rule,
                "remediation": request.remediation,
                "params": request.params,
                "preflight": request.preflight,
                "timeout_s": request.timeout_s,
                "mode": request.mode,
                "trigger": request.trigger,
                "target": request.target[:500] if request.target else None,
                "destructive": request.destructive,
                "idempotency_key": request.idempotency_key,
                "parent_run_id": request.parent_run_id,
                "step": request.step,
                "status": status.value,
                "skip_reason": reason if status == RunStatus.SKIPPED else None,
                "error": request.error,
                "not_before": now + timedelta(seconds=request.grace_s)
                if status == RunStatus.WAITING
                else None,
                "guard_key": request.guard_key,
                "repeat": request.repeat,
                "slot_at": now if queued and request.guard_key is not None else None,
                "finished_at": now if status in FINISHED else None,
                "enqueued_at": now if published and queued else None,
                "publishes": 1 if published and queued else 0,
                "trace_context": request.trace_context or current,
            }
        )
    inserted = repository.insert_runs(session, rows)
    # Only a new queued run takes a slot: a second admission of a key changes nothing.
    takers = [
        i
        for i, (row, request) in enumerate(zip(rows, requests, strict=True))
        if row["id"] in inserted and decisions[i][0] == RunStatus.QUEUED and request.guard_key is not None
    ]
    slots = [
        slot_of(
            guards, requests[i].rule or "", rows[i]["dedupe_key"], requests[i].guard_key, requests[i].trigger
        )
        for i in takers
    ]
    verdicts: dict[int, Verdict] = {}
    for i, verdict in zip(takers, take_slots(session, guards, slots), strict=True):
        verdicts[i] = verdict
        decisions[i] = decide(**facts[i], slot=verdict, unguarded=unguarded_policy(guards))
        if verdict != "ok":
            status, reason = decisions[i]
            repository.settle_slot(session, rows[i]["id"], status=status, reason=reason)
    existing = repository.runs_by_keys(
        session, [row["dedupe_key"] for row in rows if row["id"] not in inserted]
    )
    admissions: list[Admission] = []
    for i, (request, row, (status, reason)) in enumerate(zip(requests, rows, decisions, strict=True)):
        if row["id"] in inserted:
            metrics.count_decision(status, reason)
            admissions.append(
                Admission(
                    row["id"], status, reason, True, request.timeout_s, verdicts.get(i), row["trace_context"]
                )
            )
            continue
        run = existing.get(row["dedupe_key"])
        if run is None:  # pragma: no cover - the conflicting row is committed and never deleted
            raise LookupError(f"no run for dedupe key {row['dedupe_key']!r}")
        admissions.append(Admission(run.id, RunStatus(run.status), run.skip_reason, False, run.timeout_s))
    return admissions


def slot_of(
    guards: GuardState | None, rule: str, member: str, group: str | None, trigger: str = "alert"
) -> Slot:
    """The cooldown and budget slot a run of ``rule`` asks for (its windows from the config);
    an escalation's is in the escalations' budget (``limits.max_escalations``) alone."""
    if trigger == "escalation":
        limit = guards.config.limits.max_escalations if guards is not None else None
        return Slot(member, ESCALATIONS, "", None, limit, counted_globally=False)
    found = guards.config.rule(rule) if guards is not None else None
    return Slot(
        member=member,
        rule=rule,
        group=group or "",
        cooldown_s=found.cooldown_s if found else None,
        budget=found.max_runs if found else None,
    )


def take_slots(session: Session, guards: GuardState | None, slots: Sequence[Slot]) -> list[Verdict]:
    """Take the slots in the shared state (rebuilt from this ledger if Redis lost it)."""
    if not slots:
        return []
    if guards is None:
        return ["unavailable"] * len(slots)
    return guards.take(slots, ledger=from_ledger(session))


def unguarded_policy(guards: GuardState | None) -> Literal["run", "skip"]:
    """What a non-destructive run does when the shared state is unavailable (the config's policy)."""
    return guards.config.limits.non_destructive_without_guard_state if guards is not None else "run"
