"""``GET /api/v1/breakers`` and ``POST /api/v1/breakers/{key}/reset``: the circuit breakers.

The list is the ledger's copy, which every transition and counted failure updates (Redis holds
the live state the workers decide on). A reset closes the breaker in both, recording who and why
in the log; use it once the target is known to be fixed, rather than wait for the cool-down.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

import redis
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, computed_field
from sqlalchemy import update

from receiver.deps import RequireOperator, SettingsDep
from receiver.errors import ApiError
from workers import telemetry
from workers.breakers import Breakers
from workers.ledger import repository
from workers.ledger.db import reading, transaction
from workers.ledger.models import BREAKERS, BreakerRecord, utcnow

router = APIRouter(prefix="/api/v1/breakers", tags=["breakers"], dependencies=[RequireOperator])
log = telemetry.get_logger(__name__)


class BreakerOut(BaseModel):
    """One breaker of a (remediation, target)."""

    model_config = ConfigDict(from_attributes=True)

    key: str
    remediation: str
    target: str | None
    state: str
    failures: int
    opened_at: datetime | None
    cool_down_s: float
    last_error: str | None
    updated_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def probe_after(self) -> datetime | None:
        """When an open breaker lets one probe through."""
        if self.state != "open" or self.opened_at is None:
            return None
        return self.opened_at + timedelta(seconds=self.cool_down_s)


class BreakerList(BaseModel):
    """Breakers, open and half-open first."""

    breakers: list[BreakerOut]


class ResetRequest(BaseModel):
    """Who resets a breaker, and why."""

    model_config = ConfigDict(extra="forbid")

    by: str = Field(min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=2000)


@router.get("")
def list_breakers(
    settings: SettingsDep,
    state: Annotated[str | None, Query(pattern="^(closed|open|half_open)$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> BreakerList:
    """Breakers the responder knows (any that counted a failure), filtered by ``state``."""
    with reading(settings.database_url) as session:
        found = repository.list_breakers(session, state=state, limit=limit)
        return BreakerList(breakers=[BreakerOut.model_validate(b) for b in found])


@router.post("/{key}/reset")
def reset_breaker(key: str, request: ResetRequest, settings: SettingsDep) -> BreakerOut:
    """Close a breaker now (no failures counted); 404 if there is none, 503 if Redis is down."""
    with reading(settings.database_url) as session:
        if session.get(BreakerRecord, key) is None:
            raise ApiError(404, "not_found", f"no breaker {key!r}")
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        Breakers(client, settings.guard_key_prefix).reset(key)
    except redis.RedisError as exc:
        raise ApiError(
            503, "guard_state_unavailable", "Redis could not be reached; nothing was reset"
        ) from exc
    finally:
        client.close()
    with transaction(settings.database_url) as session:
        session.execute(
            update(BREAKERS)
            .where(BREAKERS.c.key == key)
            .values(
                state="closed",
                failures=0,
                updated_at=utcnow(),
                last_error=f"reset by {request.by}: {request.reason}"[:2000],
            )
        )
        out = BreakerOut.model_validate(session.get_one(BreakerRecord, key))
    log.warning("breaker_reset", breaker=key, by=request.by, reason=request.reason)
    return out
