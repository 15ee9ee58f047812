"""``POST /api/v1/alertmanager``: record every alert durably, publish it, answer 202.

Nothing here matches rules or renders params; that is the worker's job. A 2xx is sent only
after the alerts are committed to the ledger; if the broker is down after that, the answer is
still 202 and the reconciler publishes what is stuck.
"""

from __future__ import annotations

from typing import Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from receiver.deps import PublisherDep, RequireIngest, SettingsDep
from receiver.errors import ApiError, field_errors
from workers import telemetry
from workers.alerts import WebhookPayload
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.publishing import Publisher, publish_events
from workers.settings import Settings

router = APIRouter(prefix="/api/v1", tags=["alertmanager"])
log = telemetry.get_logger(__name__)


class AlertResult(BaseModel):
    """What became of one alert of the notification."""

    fingerprint: str
    starts_at: str
    status: Literal["firing", "resolved"]
    result: Literal["accepted", "duplicate"]
    event_id: str


class IngestResponse(BaseModel):
    """The 202 body: one entry per alert, in the order received."""

    alerts: list[AlertResult]
    truncated_alerts: int


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (by header or while read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", f"body is larger than {limit} bytes")
    return bytes(body)


def _record(settings: Settings, payload: WebhookPayload) -> list[repository.RecordedEvent]:
    with transaction(settings.database_url) as session:
        return repository.record_events(
            session, payload.alerts, receiver=payload.receiver, group_key=payload.group_key
        )


# Publishing threads are few and separate from the ledger's, so a hung broker cannot starve
# the inserts that make a 2xx safe.
_publish_limiter = anyio.CapacityLimiter(8)


async def _publish_within_budget(settings: Settings, publisher: Publisher, event_ids: list[str]) -> None:
    with anyio.move_on_after(settings.publish_budget_s) as scope:
        await anyio.to_thread.run_sync(
            lambda: publish_events(event_ids, settings=settings, publisher=publisher),
            abandon_on_cancel=True,
            limiter=_publish_limiter,
        )
    if scope.cancelled_caught:
        # The thread may still publish; if it does not, the reconciler will (handle_alert is idempotent).
        telemetry.PUBLISH_FAILURES.labels(task="handle_alert").inc()
        log.warning(
            "publish_budget_exceeded", budget_s=settings.publish_budget_s, left_for_reconciler=len(event_ids)
        )


@router.post("/alertmanager", status_code=202, dependencies=[RequireIngest])
async def receive_alertmanager(
    request: Request, settings: SettingsDep, publisher: PublisherDep
) -> IngestResponse:
    """Record each alert of an Alertmanager notification (v4) and publish the new ones."""
    body = await _read_limited(request, settings.max_body_bytes)
    try:
        payload = WebhookPayload.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(
            422,
            "invalid_payload",
            "not an Alertmanager v4 webhook payload",
            detail=field_errors(exc.errors()),
        ) from exc
    if payload.truncated_alerts:
        telemetry.ALERTS_TRUNCATED.inc(payload.truncated_alerts)
        log.warning(
            "alerts_truncated",
            truncated_alerts=payload.truncated_alerts,
            received=len(payload.alerts),
            receiver=payload.receiver,
        )
    recorded = await run_in_threadpool(_record, settings, payload)
    new = [r.event_id for r in recorded if r.accepted]
    for r in recorded:
        telemetry.ALERTS_RECEIVED.labels(result="accepted" if r.accepted else "duplicate").inc()
    if new:
        await _publish_within_budget(settings, publisher, new)
    log.info(
        "alerts_received", accepted=len(new), duplicate=len(recorded) - len(new), receiver=payload.receiver
    )
    return IngestResponse(
        alerts=[
            AlertResult(
                fingerprint=r.alert.fingerprint,
                starts_at=r.alert.starts_at,
                status=r.alert.status,
                result="accepted" if r.accepted else "duplicate",
                event_id=r.event_id,
            )
            for r in recorded
        ],
        truncated_alerts=payload.truncated_alerts,
    )
