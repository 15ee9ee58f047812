"""``GET /api/v1/runs`` and ``GET /api/v1/runs/{id}``: the history of runs and their attempts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field

from receiver.deps import RequireOperator, SettingsDep
from receiver.errors import ApiError
from workers import references, tracing
from workers.ledger import repository
from workers.ledger.db import reading
from workers.ledger.models import Run
from workers.ledger.states import RunStatus
from workers.telemetry import redact_values

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], dependencies=[RequireOperator])


def _for_people(value: Any) -> Any:
    """Secret references as ``{secret:NAME}``; secret-named keys and secret-looking values
    redacted."""
    return references.shown(redact_values(value))


Redacted = Annotated[dict[str, Any] | None, AfterValidator(_for_people)]


class AttemptOut(BaseModel):
    """One attempt of a run."""

    model_config = ConfigDict(from_attributes=True)

    number: int
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    # Reported by an abandoned attempt's worker after the run was taken over (changed nothing).
    late_outcome: str | None
    error: str | None
    worker: str
    output: Redacted


class RunOut(BaseModel):
    """A run with its attempts; params are the rendered ones, secret-named values redacted."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    rule: str | None
    remediation: str
    params: Annotated[dict[str, Any], AfterValidator(_for_people)]
    preflight: Redacted
    mode: str
    status: str
    # Why the run was skipped or cancelled: the guard that refused it.
    skip_reason: str | None
    error: str | None
    # A waiting run's due time (its rule's grace period).
    not_before: datetime | None
    # Did it work (rules with repeat or verify_within): effective or ineffective once looked at
    # again at verify_at; repeat: which extra run of the episode this is (0: the first).
    verdict: str | None
    verify_at: datetime | None
    repeat: int
    fingerprint: str | None
    starts_at: str | None
    event_id: str | None
    trigger: str
    target: str | None
    destructive: bool
    idempotency_key: str | None
    parent_run_id: str | None
    step: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # When the run's alert resolved (its episode's resolved notification).
    resolved_at: datetime | None = None
    attempts: list[AttemptOut]
    trace_context: Annotated[dict[str, Any] | None, Field(exclude=True)] = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def time_to_resolve_s(self) -> float | None:
        """Seconds from the run succeeding to its alert resolving (0 if it had resolved already)."""
        if self.status != "succeeded" or self.finished_at is None or self.resolved_at is None:
            return None
        return max(0.0, round((self.resolved_at - self.finished_at).total_seconds(), 3))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def trace_id(self) -> str | None:
        """The trace (OpenTelemetry, W3C) of the webhook the run came from: its attempts' spans
        are in it."""
        return tracing.trace_id(self.trace_context)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def correlation_id(self) -> str | None:
        """The ``X-Request-ID`` of the webhook (or request) that caused the run."""
        return (self.trace_context or {}).get(tracing.REQUEST_ID)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def result(self) -> dict[str, Any] | None:
        """The output of the succeeded attempt, if any."""
        return next((a.output for a in self.attempts if a.outcome == "succeeded"), None)


class RunList(BaseModel):
    """Runs, newest first."""

    runs: list[RunOut]


@router.get("")
def list_runs(
    settings: SettingsDep,
    status: RunStatus | None = None,
    rule: str | None = None,
    remediation: str | None = None,
    fingerprint: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> RunList:
    """Runs matching every filter given, newest first."""
    filters = repository.RunFilter(
        status=status.value if status else None,
        rule=rule,
        remediation=remediation,
        fingerprint=fingerprint,
        limit=limit,
    )
    with reading(settings.database_url) as session:
        return RunList(runs=[RunOut.model_validate(run) for run in repository.list_runs(session, filters)])


@router.get("/{run_id}")
def get_run(run_id: str, settings: SettingsDep) -> RunOut:
    """One run and its attempts; 404 when there is none."""
    with reading(settings.database_url) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ApiError(404, "not_found", f"no run {run_id!r}")
        return RunOut.model_validate(run)
