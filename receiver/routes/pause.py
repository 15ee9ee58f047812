"""The pause switch: ``GET /api/v1/pause``, ``POST /api/v1/pause`` and ``POST /api/v1/resume``.

While paused, every alert is still recorded and every new run is ``skipped`` with reason
``paused``; queued runs are not started. Resuming does not replay what was skipped: those
alerts were seen by someone who chose to pause, and a remediation run late, against a state
that has moved on, could do harm. The switch lives in the ledger (not in Redis), so a Redis
restart cannot silently lift a pause; each pause and resume keeps who asked and why.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from receiver.deps import RequireOperator, SettingsDep
from workers import telemetry
from workers.ledger import repository
from workers.ledger.db import reading, transaction

router = APIRouter(prefix="/api/v1", tags=["pause"], dependencies=[RequireOperator])
log = telemetry.get_logger(__name__)


class PauseRequest(BaseModel):
    """Who pauses or resumes, and why (both recorded)."""

    model_config = ConfigDict(extra="forbid")

    by: str = Field(min_length=1, max_length=200, description="Who asks (a person or a system).")
    reason: str = Field(min_length=1, max_length=2000, description="Why, for the next person on call.")


class PauseChange(BaseModel):
    """One pause or resume."""

    paused: bool
    by: str | None
    reason: str | None
    at: datetime | None


class PauseStatus(BaseModel):
    """The switch as it stands and the latest changes, newest first."""

    paused: bool
    by: str | None
    reason: str | None
    since: datetime | None
    history: list[PauseChange]


def _status(state: repository.PauseState, history: list[repository.PauseState]) -> PauseStatus:
    return PauseStatus(
        paused=state.paused,
        by=state.actor,
        reason=state.reason,
        since=state.at,
        history=[PauseChange(paused=h.paused, by=h.actor, reason=h.reason, at=h.at) for h in history],
    )


def _set(settings: SettingsDep, request: PauseRequest, *, paused: bool) -> PauseStatus:
    with transaction(settings.database_url) as session:
        state = repository.set_pause(session, paused=paused, actor=request.by, reason=request.reason)
        history = repository.pause_history(session, limit=10)
    log.warning("responder_paused" if paused else "responder_resumed", by=request.by, reason=request.reason)
    return _status(state, history)


@router.get("/pause")
def get_pause(settings: SettingsDep, history: Annotated[int, Query(ge=0, le=500)] = 10) -> PauseStatus:
    """Whether the responder is paused, by whom and why, and the latest changes."""
    with reading(settings.database_url) as session:
        return _status(repository.current_pause(session), repository.pause_history(session, limit=history))


@router.post("/pause")
def pause(request: PauseRequest, settings: SettingsDep) -> PauseStatus:
    """Pause: new runs are skipped (reason ``paused``) and queued runs do not start."""
    return _set(settings, request, paused=True)


@router.post("/resume")
def resume(request: PauseRequest, settings: SettingsDep) -> PauseStatus:
    """Resume: alerts from now on are acted on; nothing skipped while paused is replayed."""
    return _set(settings, request, paused=False)
