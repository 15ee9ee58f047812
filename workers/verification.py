"""Did it work? Succeeded runs of rules with ``repeat`` or ``verify_within`` are looked at again.

A run that succeeded while its alert keeps firing did not fix anything: restarting a service that
is killed again right away says ``succeeded`` every time. Alertmanager re-sends a still-firing
alert with the same ``startsAt`` (a duplicate of the episode), so the ledger sees it as an
episode with no resolved event. So a succeeded alert run of such a rule gets ``verify_at``:

- ``repeat: {after, max}``: ``after`` the success, if the episode has not resolved, the rule's
  remediation runs again for the same episode (a new run, through every guard, its dedupe key
  ``...:repeat:{n}``, so a redelivery still cannot run a step twice), at most ``max`` times;
- ``verify_within``: after it (and after the last repeat), an episode still unresolved makes the
  run ``ineffective`` (``runs.verdict``), which counts as a failure on its breaker and escalates
  once per episode. A new episode of the same alert beginning within ``verify_within`` of the
  success does the same (checked when that episode's run is planned). A resolved episode makes
  the run ``effective``.

The dispatcher (a beat job, every ``RESPONDER_DISPATCH_INTERVAL_S``) finds due runs by the
indexed ``verify_at``; each is claimed by clearing it (compare-and-set), so two passes never
decide one twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, exists, or_, select, update
from sqlalchemy.orm import Session

from workers import metrics, telemetry
from workers.admission import admit
from workers.breakers import breaker_key
from workers.config import ResponderConfig
from workers.guardstate import GuardState
from workers.ledger import repository
from workers.ledger.models import EVENTS, RUNS, utcnow
from workers.ledger.states import RunStatus
from workers.planner import Cause, escalate, event_alert, plan_rule, request_for

log = telemetry.get_logger(__name__)
BATCH = 200


def verify_delay(config: ResponderConfig, *, rule: str | None, trigger: str, repeat: int) -> float | None:
    """Seconds after a success at which its run is looked at again; None when never."""
    found = config.rule(rule) if rule and trigger == "alert" else None
    if found is None:
        return None
    if found.repeat is not None and repeat < found.repeat.max:
        return found.repeat.after_s
    return found.verify_within_s


_RESOLVED = exists().where(
    EVENTS.c.fingerprint == RUNS.c.fingerprint,
    EVENTS.c.starts_at == RUNS.c.starts_at,
    EVENTS.c.status == "resolved",
)
# A later episode of the same alert (startsAt is canonical RFC 3339: its text order is time order).
_FIRED_AGAIN = exists().where(
    EVENTS.c.fingerprint == RUNS.c.fingerprint,
    EVENTS.c.starts_at > RUNS.c.starts_at,
    EVENTS.c.status == "firing",
)


def _due(session: Session, now: datetime, *, limit: int = BATCH) -> list[Row[Any]]:
    """Runs due for verification: their time has come, or their alert has fired again since."""
    return list(
        session.connection().execute(
            select(RUNS.c.id, RUNS.c.rule, RUNS.c.remediation, RUNS.c.target, RUNS.c.event_id, RUNS.c.repeat)
            .add_columns(_RESOLVED.label("resolved"), _FIRED_AGAIN.label("fired_again"))
            .where(RUNS.c.verify_at.is_not(None), or_(RUNS.c.verify_at <= now, _FIRED_AGAIN))
            .order_by(RUNS.c.verify_at)
            .limit(limit)
        )
    )


def any_due(session: Session, now: datetime) -> bool:
    """Whether a verification is due (a read, for the dispatcher's quiet passes)."""
    return bool(_due(session, now, limit=1))


def _claim(session: Session, run_id: str, **values: Any) -> bool:
    result = session.connection().execute(
        update(RUNS)
        .where(RUNS.c.id == run_id, RUNS.c.verify_at.is_not(None))
        .values(verify_at=None, **values)
    )
    return bool(result.rowcount == 1)


def verify_due(
    session: Session, *, now: datetime, config: ResponderConfig, guards: GuardState | None
) -> list[tuple[str, float]]:
    """Decide every run due for verification: effective, a repeat, or ineffective; returns the
    queued runs (repeats and escalations) to publish after the commit."""
    due = _due(session, now)
    if not due:
        return []
    events = {e.id: e for e in repository.events_by_ids(session, [r.event_id for r in due if r.event_id])}
    repeats = []
    ineffective = []
    for run in due:
        rule = config.rule(run.rule) if run.rule else None
        event = events.get(run.event_id or "")
        if run.fired_again:  # a new episode began before the verification: it did not hold
            if _claim(session, run.id, verdict="ineffective"):
                ineffective.append(run)
            continue
        if run.resolved or rule is None or event is None:
            if _claim(session, run.id, verdict="effective" if run.resolved else None):
                log.info("run_verified", run_id=run.id, verdict="effective" if run.resolved else "unknown")
            continue
        if rule.repeat is not None and run.repeat < rule.repeat.max:
            if _claim(session, run.id):
                plan = plan_rule(rule, event_alert(event), config)
                repeats.append(request_for(plan, event, repeat=run.repeat + 1))
                log.warning("run_repeated", run_id=run.id, rule=rule.name, repeat=run.repeat + 1)
            continue
        if _claim(session, run.id, verdict="ineffective"):
            ineffective.append(run)
    queued: list[tuple[str, float]] = []
    if repeats:
        queued += [
            (a.run_id, a.timeout_s)
            for a in admit(session, repeats, published=True, guards=guards)
            if a.created and a.status == RunStatus.QUEUED
        ]
    return queued + _ineffective(session, ineffective, events, config, guards)


def _ineffective(
    session: Session,
    runs: Sequence[Row[Any]],
    events: dict[str, Any],
    config: ResponderConfig,
    guards: GuardState | None,
) -> list[tuple[str, float]]:
    """Count each ineffective run as a failure on its breaker, and escalate it."""
    causes = []
    for run in runs:
        breaker = config.breaker_of(run.rule, run.remediation)
        recorded = None
        if guards is not None:
            recorded = guards.record(
                breaker_key(run.remediation, run.target),
                token=run.id,
                outcome="failure",
                threshold=breaker.failures,
                cool_down_s=breaker.cool_down_s,
            )
        if recorded is not None:
            opened = recorded.transition in ("opened", "reopened")
            repository.save_breaker(
                session,
                key=breaker_key(run.remediation, run.target),
                remediation=run.remediation,
                target=run.target,
                state="open" if opened else "closed",
                failures=recorded.failures,
                opened_at=utcnow() if opened else None,
                cool_down_s=breaker.cool_down_s,
                error="ineffective: the alert kept firing after the remediation succeeded",
            )
            if recorded.transition:
                metrics.count_breaker_transition(run.remediation, recorded.transition)
        metrics.count_decision("succeeded", "ineffective")
        log.warning("run_ineffective", run_id=run.id, rule=run.rule, repeat=run.repeat)
        event = events.get(run.event_id or "")
        if event is not None and run.rule:
            detail = (
                f"rule {run.rule}: {run.remediation} on {run.target or '(no target)'} succeeded "
                f"but the alert kept firing" + (f" after {run.repeat} repeats" if run.repeat else "")
            )
            key = f"ineffective:{event.fingerprint}:{event.starts_at}:{run.rule}"
            causes.append(Cause(run.id, run.rule, "ineffective", key, detail, event))
    return escalate(session, causes, config, guards)
