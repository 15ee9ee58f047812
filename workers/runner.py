"""``run_remediation``: one attempt of one run, claimed under a lease and closed in the ledger.

While the remediation runs, its lease is kept alive (``workers.leases``); once it is lost the
remediation is told to stop (``ctx.cancelled``), and whatever the attempt reports afterwards is
recorded on the attempt alone (``late_outcome``), never on the run.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Literal

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from remediations import (
    RemediationError,
    RemediationResult,
    ResponderError,
    RetryPolicy,
    TransientError,
    get_remediation,
    registered,
)
from workers import leases, telemetry
from workers.config import ResponderConfig
from workers.ledger import attempts
from workers.ledger.attempts import ClaimedRun
from workers.ledger.db import transaction
from workers.planner import event_alert
from workers.resilience import attempt_policy, ledger_retrying
from workers.settings import Settings
from workers.templating import RenderError, renderer, template_context

log = telemetry.get_logger(__name__)

Outcome = Literal["succeeded", "failed", "retry", "skipped"]


@dataclass(frozen=True)
class Execution:
    """What happened to one delivery: the outcome and, for a retry, the run's timeout."""

    outcome: Outcome
    timeout_s: float = 0.0
    attempt: int = 0
    retry_in_s: float = 0.0


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
    """(error text, details, retryable) for an exception raised by a remediation."""
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
    params = definition.validate(run.params)  # re-checked before acting
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


def execute(*, run_id: str, task_id: str, settings: Settings, config: ResponderConfig) -> Execution:
    """Run one attempt of ``run_id`` if it is due; record it and say what comes next."""
    with transaction(settings.database_url) as session:
        claim = attempts.claim_run(
            session,
            run_id=run_id,
            task_id=task_id,
            worker=worker_name(),
            max_attempts=settings.max_attempts,
            lease_s=settings.lease_s,
            disabled_rules=config.disabled_rules,
        )
    run = claim.run
    if claim.kind in ("paused", "disabled", "resolved"):
        telemetry.count_decision("skipped", claim.kind)
    if claim.kind != "run" or run is None or claim.attempt_id is None:
        log.info("run_not_attempted", reason=claim.kind, abandoned=claim.abandoned)
        return Execution("failed" if claim.kind == "exhausted" else "skipped")
    telemetry.bind(rule=run.rule, remediation=run.remediation, fingerprint=run.fingerprint, target=run.target)
    if claim.abandoned:
        log.warning("attempts_abandoned", attempts=claim.abandoned)
    log.info("attempt_started", attempt=claim.number)
    with leases.kept(
        url=settings.database_url, attempt_id=claim.attempt_id, lease_s=settings.lease_s
    ) as lease:
        return _run_and_record(run, config, settings, claim.attempt_id, claim.number, lease.cancelled)


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
        if not retry:
            return Execution("failed", attempt=number)
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        return Execution(
            "retry",
            timeout_s=run.timeout_s,
            attempt=number,
            retry_in_s=policy.delay(number, retry_after=retry_after),
        )
    owned = _finish(
        settings,
        run_id=run.id,
        attempt_id=attempt_id,
        outcome="succeeded",
        error=None,
        output={"summary": result.summary, **result.details},
        run_status="succeeded",
    )
    if not owned:
        log.warning("attempt_superseded", attempt=number, late_outcome="succeeded")
        return Execution("skipped", attempt=number)
    log.info("remediation_succeeded", attempt=number, summary=result.summary)
    return Execution("succeeded", attempt=number)
