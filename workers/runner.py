"""``run_remediation``: one attempt of one run, counted and closed in the ledger."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from remediations import (
    RemediationError,
    RemediationResult,
    ResponderError,
    get_remediation,
    registered,
)
from workers import telemetry
from workers.config import ResponderConfig
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent, Run, utcnow
from workers.planner import event_alert
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
    """Refuse to start when a running task could be redelivered: visibility > 2 x hard limit."""
    hard = largest_hard_limit(settings, config)
    if settings.visibility_timeout_s < 2 * hard:
        raise ResponderError(
            f"RESPONDER_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must be at least twice "
            f"the longest hard time limit ({hard:.0f}s): a longer task would be redelivered while running"
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


def _attempt(run: Run, event: AlertEvent | None, config: ResponderConfig) -> RemediationResult:
    definition = get_remediation(run.remediation)
    context = template_context(event_alert(event) if event is not None else None)
    ctx = config.context(run_id=run.id, render=renderer(context))
    params = definition.validate(run.params)  # re-checked before acting
    return definition.fn(ctx, params)


def execute(*, run_id: str, task_id: str, settings: Settings, config: ResponderConfig) -> Execution:
    """Run one attempt of ``run_id`` if it is due; record it and say what comes next."""
    with transaction(settings.database_url) as session:
        run = session.get(Run, run_id)
        timeout = run.timeout_s if run is not None else 0.0
        claim = repository.claim_run(
            session,
            run_id=run_id,
            task_id=task_id,
            worker=worker_name(),
            max_attempts=settings.max_attempts,
            deadline_at=utcnow() + timedelta(seconds=timeout + settings.hard_limit_margin_s + 5),
        )
        if claim.kind != "run" or run is None:
            log.info("run_not_attempted", reason=claim.kind, abandoned=claim.abandoned)
            return Execution("failed" if claim.kind == "exhausted" else "skipped")
        event = session.get(AlertEvent, run.event_id) if run.event_id else None
        session.expunge_all()
    telemetry.bind(rule=run.rule, remediation=run.remediation, fingerprint=run.fingerprint)
    if claim.abandoned:
        log.warning("attempts_abandoned", attempts=claim.abandoned)
    log.info("attempt_started", attempt=claim.number)
    assert claim.attempt_id is not None  # noqa: S101 - set for kind "run"
    try:
        result = _attempt(run, event, config)
    except (Exception, SoftTimeLimitExceeded) as exc:
        error, details, retryable = _failure(exc)
        retry = retryable and claim.number < settings.max_attempts
        with transaction(settings.database_url) as session:
            repository.finish_attempt(
                session,
                attempt_id=claim.attempt_id,
                outcome="failed",
                error=error,
                output=details,
                run_status="queued" if retry else "failed",
            )
        level = log.warning if retry else log.error
        level(
            "attempt_failed",
            attempt=claim.number,
            error=error,
            retry=retry,
            exc_info=not isinstance(exc, (ResponderError, SoftTimeLimitExceeded)),
        )
        return Execution("retry" if retry else "failed", timeout_s=run.timeout_s, attempt=claim.number)
    with transaction(settings.database_url) as session:
        repository.finish_attempt(
            session,
            attempt_id=claim.attempt_id,
            outcome="succeeded",
            error=None,
            output={"summary": result.summary, **result.details},
            run_status="succeeded",
        )
    log.info("remediation_succeeded", attempt=claim.number, summary=result.summary)
    return Execution("succeeded", attempt=claim.number)
