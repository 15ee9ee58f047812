"""``run_remediation``: one attempt of one run, claimed under a lease and closed in the ledger.

While the remediation runs, its lease is kept alive (``workers.leases``); once it is lost the
remediation is told to stop (``ctx.cancelled``), and whatever the attempt reports afterwards is
recorded on the attempt alone (``late_outcome``), never on the run.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from billiard.exceptions import SoftTimeLimitExceeded
from opentelemetry import trace
from pydantic import ValidationError
from sqlalchemy import Row, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from remediations import (
    RemediationError,
    RemediationResult,
    ResponderError,
    RetryPolicy,
    TransientError,
    get_remediation,
    registered,
)
from workers import leases, metrics, secrets, telemetry, tracing
from workers.breakers import Outcome as BreakerOutcome
from workers.breakers import Transition, breaker_key
from workers.config import ResponderConfig
from workers.guardstate import GuardState, from_ledger
from workers.ledger import attempts, repository
from workers.ledger.attempts import ClaimedRun, GateVerdict
from workers.ledger.db import reading, single_writer, transaction
from workers.ledger.models import BREAKERS, utcnow
from workers.planner import Cause, escalate, event_alert
from workers.publishing import Publisher, publish_runs
from workers.resilience import attempt_policy, ledger_retrying
from workers.settings import Settings
from workers.templating import RenderError, renderer, template_context
from workers.verification import verify_delay

log = telemetry.get_logger(__name__)

# "deferred": the run's target was locked and it may still wait for it: delivered again shortly.
Outcome = Literal["succeeded", "failed", "retry", "skipped", "deferred"]
# How long a run waiting for its target's lock, or for the guard state, waits between two tries.
LOCK_RETRY_S = 1.0
GUARD_RETRY_S = 5.0


@dataclass(frozen=True)
class Execution:
    """What happened to one delivery: the outcome and, for a retry, the run's timeout."""

    outcome: Outcome
    timeout_s: float = 0.0
    attempt: int = 0
    retry_in_s: float = 0.0
    # How the attempt counts for its circuit breaker, and its error.
    breaker: BreakerOutcome = "neutral"
    error: str | None = None


@dataclass(frozen=True)
class _Held:
    """A breaker this delivery passed: its key, and whether this attempt is the half-open probe."""

    key: str
    probe: bool
    transition: Transition
    target: str | None


def worker_name() -> str:
    """host:pid of this process, recorded on attempts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def largest_hard_limit(settings: Settings, config: ResponderConfig) -> float:
    """The longest hard time limit any run_remediation message can carry."""
    longest = max(
        [d.max_timeout for d in registered().values()] + [spec.timeout for spec in config.commands.values()]
    )
    return longest + settings.hard_limit_margin_s


def check_delivery_settings(settings: Settings, config: ResponderConfig) -> None:
    """Refuse to start when a message could be redelivered while it runs or waits to retry."""
    hard = largest_hard_limit(settings, config)
    if settings.visibility_timeout_s < 2 * hard:
        raise ResponderError(
            f"RESPONDER_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must be at least twice "
            f"the longest hard time limit ({hard:.0f}s): a longer task would be redelivered while running"
        )
    if settings.visibility_timeout_s < 2 * settings.retry_backoff_cap_s:
        raise ResponderError(
            f"RESPONDER_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must be at least twice "
            f"RESPONDER_RETRY_BACKOFF_CAP_S ({settings.retry_backoff_cap_s:.0f}s): Redis redelivers a "
            "retry waiting longer than the visibility timeout"
        )


def _failure(exc: BaseException) -> tuple[str, dict[str, Any] | None, bool]:
    """(error text, details, retryable) for an exception raised by a remediation, with every
    known secret value and secret-looking part of a URL redacted."""
    error, details, retryable = _described(exc)
    return telemetry.redact_text(error), telemetry.redact_values(details), retryable


def _described(exc: BaseException) -> tuple[str, dict[str, Any] | None, bool]:
    if isinstance(exc, RemediationError):
        return exc.message, exc.details or None, exc.retryable
    if isinstance(exc, SoftTimeLimitExceeded):
        return "soft time limit exceeded", None, True
    if isinstance(exc, ValidationError):
        return f"invalid params: {exc}", None, False
    if isinstance(exc, RenderError):
        return f"render: {exc}", None, False
    # An unexpected exception is a bug or an unknown state: do not act again blindly.
    return f"unexpected {type(exc).__name__}: {exc}", None, False


def _attempt(run: ClaimedRun, config: ResponderConfig, cancelled: threading.Event) -> RemediationResult:
    definition = get_remediation(run.remediation)
    context = template_context(event_alert(run.event) if run.event is not None else None)
    ctx = config.context(run_id=run.id, render=renderer(context), cancelled=cancelled)
    # Secrets are looked up now, at the last moment, and never stored; their values are
    # redacted from every log line, error and output from here on.
    found: dict[str, str] = {}
    try:
        resolved = secrets.resolve(run.params, found)
    finally:
        for value in found.values():
            telemetry.add_secret(value)
    params = definition.validate(resolved)  # re-checked before acting
    return definition.run(ctx, params)


def _finish(settings: Settings, **values: Any) -> bool:
    """Close the attempt, retrying ledger errors (the action is done: its record must land).

    Returns False when the attempt no longer owned its run, or when the ledger stayed
    unreachable for a minute: the lease expires meanwhile and the reconciler takes the run over,
    as it would for a dead worker. Trying longer is safe: the write is a compare-and-set, so a
    result that lands late is kept on the attempt alone.
    """

    def record() -> bool:
        with transaction(settings.database_url) as session:
            return attempts.finish_attempt(session, **values)

    try:
        return ledger_retrying(settings, within_s=max(60.0, settings.lease_s))(record)
    except SQLAlchemyError as exc:
        log.error(  # noqa: TRY400 - the driver's traceback can hold the database URL
            "attempt_not_recorded", error_type=type(exc).__name__, outcome=values.get("outcome")
        )
        return False


def execute(
    *,
    run_id: str,
    task_id: str,
    settings: Settings,
    config: ResponderConfig,
    guards: GuardState | None = None,
    publisher: Publisher | None = None,
) -> Execution:
    """Run one attempt of ``run_id`` if it is due; record it and say what comes next.

    With ``guards`` the attempt passes its (remediation, target) circuit breaker and takes a
    concurrency slot of its target first (``workers.breakers``), and its outcome is counted on
    the breaker; an escalation for a breaker that opened is published with ``publisher``. The
    probe lease and the slot are held in the run's name, not the delivery's: a later attempt of
    the same run (after a worker died, or a retry) finds them its own, never locked out by itself.
    """
    held: list[_Held] = []
    deferred: list[tuple[str, float]] = []  # why the run must wait, and for how long

    def gate(session: Session, run: Row[Any]) -> GateVerdict | None:
        if guards is None:
            return None
        key = breaker_key(run.remediation, run.target)
        rule = config.rule(run.rule) if run.rule else None
        lease_s = run.timeout_s + settings.hard_limit_margin_s + settings.lease_s
        verdict, transition = guards.gate(
            key,
            token=run_id,
            lease_s=lease_s,
            ledger=from_ledger(session),
            target=run.target,
            slots=(rule.concurrency if rule else 1) if run.target else 0,
        )
        if verdict == "open":
            return "breaker_open"
        if verdict == "locked":
            # Waited since the run was queued (a re-delivery for the lock keeps that time).
            waited = (utcnow() - (run.enqueued_at or utcnow())).total_seconds()
            if rule and rule.lock_wait_s and waited < rule.lock_wait_s:
                deferred.append(("locked", LOCK_RETRY_S))
                return "lock_wait"
            return "locked"
        if verdict == "unavailable":
            if run.destructive or config.limits.non_destructive_without_guard_state == "skip":
                # Not run unguarded, and not given up for a Redis outage either: the run stays
                # queued and is delivered again (by the reconciler if Redis cannot take it now).
                deferred.append(("guard_state_unavailable", GUARD_RETRY_S))
                return "lock_wait"
            return None
        held.append(_Held(key, verdict == "probe", transition, run.target))
        return None

    # On a ledger with one writer (SQLite) the run is read first, without a lock, and the gate
    # (Redis round trips) asked on that read, so that the claim's write transaction holds
    # neither: it claims the run as seen with one compare-and-set, or decides again if the run
    # changed meanwhile (what the gate granted is then given back below); when the claim
    # reaches the gate unasked (the run changed the other way), it asks it there. PostgreSQL
    # locks only the run's row: the claim reads and asks in its own transaction, one round trip
    # set less (the drain was 10-20% slower with the read first, docs/benchmarks.md).
    asked: list[GateVerdict | None] = []  # the gate's verdict, when asked on the look
    seen: attempts.Look | None = None
    if single_writer(settings.database_url):
        with reading(settings.database_url) as session:
            seen = attempts.look(
                session,
                run_id=run_id,
                task_id=task_id,
                max_attempts=settings.max_attempts,
                disabled_rules=config.disabled_rules,
            )
            if seen is not None and seen.gate_due and guards is not None:
                asked.append(gate(session, seen.run))

    def gate_once(session: Session, run: Row[Any]) -> GateVerdict | None:
        return asked[0] if asked else gate(session, run)

    with transaction(settings.database_url) as session:
        claim = attempts.claim_run(
            session,
            run_id=run_id,
            task_id=task_id,
            worker=worker_name(),
            max_attempts=settings.max_attempts,
            lease_s=settings.lease_s,
            disabled_rules=config.disabled_rules,
            gate=gate_once,
            seen=seen,
        )
    run = claim.run
    if claim.kind == "lock_wait":
        reason, retry_in_s = deferred[0] if deferred else ("locked", LOCK_RETRY_S)
        log.info("run_deferred", reason=reason, retry_in_s=retry_in_s)
        return Execution("deferred", timeout_s=claim.timeout_s, retry_in_s=retry_in_s)
    if held and claim.kind != "run" and guards is not None:  # passed the gate, then did not start
        guards.record(
            held[0].key, token=run_id, outcome="neutral", threshold=1, cool_down_s=1, target=held[0].target
        )
    if claim.kind in ("paused", "disabled", "resolved", "breaker_open", "guard_state_unavailable", "locked"):
        metrics.count_decision("skipped", claim.kind)
    if claim.kind != "run" or run is None or claim.attempt_id is None:
        log.info("run_not_attempted", reason=claim.kind, abandoned=claim.abandoned)
        return Execution("failed" if claim.kind == "exhausted" else "skipped")
    telemetry.bind(rule=run.rule, remediation=run.remediation, fingerprint=run.fingerprint, target=run.target)
    # The attempt's span continues the run's trace (its alert's webhook), however it was delivered.
    span = tracing.start_span(
        "attempt",
        run.trace_context,
        **{
            "run.id": run.id,
            "rule": run.rule,
            "remediation": run.remediation,
            "target": run.target,
            "attempt": claim.number,
            "trigger": run.trigger,
        },
    )
    with trace.use_span(span, end_on_exit=True):
        if claim.abandoned:
            log.warning("attempts_abandoned", attempts=claim.abandoned)
        log.info("attempt_started", attempt=claim.number, probe=bool(held and held[0].probe))
        if held and held[0].transition == "half_opened":
            metrics.count_breaker_transition(run.remediation, "half_opened")
            span.add_event("breaker_half_opened", {"breaker": held[0].key, "probe": True})
            log.info("breaker_half_opened", breaker=held[0].key, probe=True)
            _breaker_moved(run, held[0].key, "half_open", settings, config, failures=None, error=None)
        started = time.perf_counter()
        with leases.kept(
            url=settings.database_url, attempt_id=claim.attempt_id, lease_s=settings.lease_s
        ) as lease:
            execution = _run_and_record(
                run, config, settings, claim.attempt_id, claim.number, lease.cancelled
            )
        span.set_attribute("outcome", execution.outcome)
        if execution.outcome in ("succeeded", "failed", "retry"):  # not one superseded meanwhile
            metrics.ATTEMPTS.labels(run.remediation, execution.outcome).inc()
            metrics.ATTEMPT_DURATION.labels(run.remediation).observe(time.perf_counter() - started)
        if execution.outcome in ("succeeded", "failed"):
            run_s = (utcnow() - run.created_at).total_seconds() if run.created_at else None
            metrics.RUNS.labels(run.rule or "", run.remediation, execution.outcome).inc()
            if run_s is not None:
                metrics.RUN_DURATION.labels(run.remediation).observe(run_s)
            # The run's one summary line: a run read in one grep.
            log.info(
                "run_finished",
                outcome=execution.outcome,
                attempts=claim.number,
                duration_ms=round(run_s * 1000, 1) if run_s is not None else None,
                error=execution.error,
            )
        if execution.error:
            span.set_status(trace.StatusCode.ERROR, execution.error[:200])
        if held and guards is not None:
            _count_on_breaker(run, held[0], execution, run_id, settings, config, guards, publisher)
    return execution


def follow_up(run_id: str, execution: Execution, *, settings: Settings, publisher: Publisher) -> None:
    """What a delivery leaves to do after ``execute``: the run's next message, if it has one.

    A deferral (waiting for its target's lock) keeps its last publish time, from which the wait
    and the reconciler's redelivery are measured (``marked``). A retry is a fresh message, not
    Celery's retry: if publishing fails the run stays queued and unpublished in the ledger, and
    the reconciler sends it.
    """
    if execution.outcome in ("deferred", "retry"):
        publish_runs(
            [(run_id, execution.timeout_s)],
            settings=settings,
            publisher=publisher,
            countdown=execution.retry_in_s,
            marked=execution.outcome == "deferred",
        )


def _verification(config: ResponderConfig, run: ClaimedRun) -> dict[str, Any] | None:
    """When a succeeded run of a rule with ``repeat`` or ``verify_within`` is looked at again."""
    delay = verify_delay(config, rule=run.rule, trigger=run.trigger, repeat=run.repeat)
    return None if delay is None else {"verify_at": utcnow() + timedelta(seconds=delay)}


def _count_on_breaker(
    run: ClaimedRun,
    held: _Held,
    execution: Execution,
    token: str,
    settings: Settings,
    config: ResponderConfig,
    guards: GuardState,
    publisher: Publisher | None,
) -> None:
    """Count the attempt on its breaker; record a transition or a counted failure in the ledger,
    and escalate a breaker that opened."""
    breaker = config.breaker_of(run.rule, run.remediation)
    recorded = guards.record(
        held.key,
        token=token,
        outcome=execution.breaker,
        threshold=breaker.failures,
        cool_down_s=breaker.cool_down_s,
        target=held.target,
    )
    if recorded is None or not (recorded.transition or execution.breaker == "failure"):
        return
    state = "open" if recorded.transition in ("opened", "reopened") else "closed"
    queued = _breaker_moved(
        run,
        held.key,
        state,
        settings,
        config,
        failures=recorded.failures,
        error=execution.error,
        guards=guards,
    )
    if recorded.transition:
        metrics.count_breaker_transition(run.remediation, recorded.transition)
        trace.get_current_span().add_event(
            f"breaker_{recorded.transition}", {"breaker": held.key, "failures": recorded.failures}
        )
        level = log.info if recorded.transition == "closed" else log.warning
        level(
            f"breaker_{recorded.transition}", breaker=held.key, failures=recorded.failures, probe=held.probe
        )
    if queued and publisher is not None:
        publish_runs(queued, settings=settings, publisher=publisher, marked=True)


def _breaker_moved(
    run: ClaimedRun,
    key: str,
    state: str,
    settings: Settings,
    config: ResponderConfig,
    *,
    failures: int | None,
    error: str | None,
    guards: GuardState | None = None,
) -> list[tuple[str, float]]:
    """Keep the ledger's copy of a breaker; an opening escalates (once per opening)."""
    breaker = config.breaker_of(run.rule, run.remediation)
    now = utcnow()
    queued: list[tuple[str, float]] = []
    try:
        with transaction(settings.database_url) as session:
            if failures is None:  # half-open: only the state moves
                session.execute(
                    update(BREAKERS).where(BREAKERS.c.key == key).values(state=state, updated_at=now)
                )
                return []
            repository.save_breaker(
                session,
                key=key,
                remediation=run.remediation,
                target=run.target,
                state=state,
                failures=failures,
                opened_at=now if state == "open" else None,
                cool_down_s=breaker.cool_down_s,
                error=error,
            )
            if state == "open" and run.rule and run.event is not None:
                detail = (
                    f"breaker of {run.remediation} on {run.target or '(no target)'} opened after "
                    f"{failures} consecutive failures; closed again by a successful probe after "
                    f"{breaker.cool_down_s:g}s"
                )
                cause = Cause(
                    run.id,
                    run.rule,
                    "breaker_open",
                    f"breaker:{key}:{now.timestamp():.3f}",
                    detail,
                    run.event,
                )
                queued = escalate(session, [cause], config, guards)
    except SQLAlchemyError as exc:
        log.warning("breaker_not_saved", error_type=type(exc).__name__, state=state)
    return queued


def _run_and_record(
    run: ClaimedRun,
    config: ResponderConfig,
    settings: Settings,
    attempt_id: int,
    number: int,
    cancelled: threading.Event,
) -> Execution:
    policy: RetryPolicy = attempt_policy(settings)
    try:
        result = _attempt(run, config, cancelled)
    except (Exception, SoftTimeLimitExceeded) as exc:
        error, details, retryable = _failure(exc)
        retry = retryable and not policy.gives_up_after(number)
        owned = _finish(
            settings,
            run_id=run.id,
            attempt_id=attempt_id,
            outcome="failed",
            error=error,
            output=details,
            run_status="queued" if retry else "failed",
        )
        if not owned:
            log.warning("attempt_superseded", attempt=number, late_outcome="failed", error=error)
            return Execution("skipped", attempt=number)
        level = log.warning if retry else log.error
        level(
            "attempt_failed",
            attempt=number,
            error=error,
            retry=retry,
            exc_info=not isinstance(exc, (ResponderError, SoftTimeLimitExceeded)),
        )
        # Counted on the breaker: what another attempt could have changed (not a refusal or a bug).
        counted: BreakerOutcome = (
            "failure" if isinstance(exc, (TransientError, SoftTimeLimitExceeded)) else "neutral"
        )
        if not retry:
            return Execution("failed", attempt=number, breaker=counted, error=error)
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        return Execution(
            "retry",
            timeout_s=run.timeout_s,
            attempt=number,
            retry_in_s=policy.delay(number, retry_after=retry_after),
            breaker=counted,
            error=error,
        )
    owned = _finish(
        settings,
        run_id=run.id,
        attempt_id=attempt_id,
        outcome="succeeded",
        error=None,
        output=telemetry.redact_values({"summary": result.summary, **result.details}),
        run_status="succeeded",
        run_values=_verification(config, run),
        schedule=run.rule if run.trigger == "schedule" else None,
    )
    if not owned:
        log.warning("attempt_superseded", attempt=number, late_outcome="succeeded")
        return Execution("skipped", attempt=number)
    log.info("remediation_succeeded", attempt=number, summary=result.summary)
    return Execution("succeeded", attempt=number, breaker="success")
