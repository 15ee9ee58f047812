"""``GET /api/v1/runs`` and ``GET /api/v1/runs/{id}``: the history of runs and their attempts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from receiver.deps import RequireOperator, SettingsDep
from receiver.errors import ApiError
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import Attempt, Run
from workers.telemetry import redact

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], dependencies=[RequireOperator])

RunStatus = Literal["queued", "running", "succeeded", "failed", "skipped"]


class AttemptOut(BaseModel):
    """One attempt of a run."""

    number: int
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    error: str | None
    worker: str
    output: dict[str, Any] | None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptOut:
        """From the ledger row, secrets redacted."""
        return cls(
            number=attempt.number,
            started_at=attempt.started_at,
            ended_at=attempt.ended_at,
            outcome=attempt.outcome,
            error=attempt.error,
            worker=attempt.worker,
            output=redact(attempt.output),
        )


class RunOut(BaseModel):
    """A run with its attempts; params are the rendered ones, secret-named values redacted."""

    id: str
    rule: str | None
    remediation: str
    params: dict[str, Any]
    preflight: dict[str, Any] | None
    mode: str
    status: str
    skip_reason: str | None
    error: str | None
    result: dict[str, Any] | None
    fingerprint: str | None
    starts_at: str | None
    event_id: str | None
    trigger: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: list[AttemptOut]

    @classmethod
    def of(cls, run: Run) -> RunOut:
        """From the ledger row, secrets redacted."""
        return cls(
            id=run.id,
            rule=run.rule,
            remediation=run.remediation,
            params=redact(run.params),
            preflight=redact(run.preflight),
            mode=run.mode,
            status=run.status,
            skip_reason=run.skip_reason,
            error=run.error,
            result=redact(run.result),
            fingerprint=run.fingerprint,
            starts_at=run.starts_at,
            event_id=run.event_id,
            trigger=run.trigger,
            created_at=run.created_at,
            updated_at=run.updated_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            attempts=[AttemptOut.of(a) for a in run.attempts],
        )


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
        status=status, rule=rule, remediation=remediation, fingerprint=fingerprint, limit=limit
    )
    with transaction(settings.database_url) as session:
        return RunList(runs=[RunOut.of(run) for run in repository.list_runs(session, filters)])


@router.get("/{run_id}")
def get_run(run_id: str, settings: SettingsDep) -> RunOut:
    """One run and its attempts; 404 when there is none."""
    with transaction(settings.database_url) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ApiError(404, "not_found", f"no run {run_id!r}")
        return RunOut.of(run)
