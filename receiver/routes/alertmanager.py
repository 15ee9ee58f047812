"""``POST /api/v1/alertmanager``: record every alert durably, publish it, answer 202.

Nothing here matches rules or renders params; that is the worker's job. A 2xx is sent only
after the alerts are committed to the ledger (``receiver.intake``: group commit); if the broker
is down after that, the answer is still 202 and the reconciler publishes what is stuck.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, cast

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from receiver.deps import ingest_intake
from receiver.errors import ApiError, field_errors
from workers import metrics, telemetry, tracing
from workers.alerts import WebhookPayload

log = telemetry.get_logger(__name__)


class DirectRoute(APIRoute):
    """A route whose endpoint takes the ``Request`` alone and returns its ``Response``: called
    as it is, without FastAPI's parameter and dependency resolution, which for the webhook
    parsed a query string, headers and cookies it never reads (a twentieth of the receiver's
    instructions per webhook, docs/benchmarks.md). Still an ``APIRoute`` (FastAPI's
    ``route_class`` hook): it keeps its place in the OpenAPI document."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = cast(Callable[[Request], Awaitable[Response]], self.endpoint)

        async def handle(request: Request) -> Response:
            return await endpoint(request)

        return handle


router = APIRouter(prefix="/api/v1", tags=["alertmanager"], route_class=DirectRoute)


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


@router.post(
    "/alertmanager",
    status_code=202,
    response_model=IngestResponse,
    # The bearer token is checked in the route (``ingest_intake``); declared for the OpenAPI document.
    openapi_extra={"security": [{"HTTPBearer": []}]},
)
async def receive_alertmanager(request: Request) -> Response:
    """Record each alert of an Alertmanager notification (v4) and publish the new ones."""
    settings, intake = ingest_intake(request)
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
        metrics.ALERTS_TRUNCATED.inc(payload.truncated_alerts)
        log.warning(
            "alerts_truncated",
            truncated_alerts=payload.truncated_alerts,
            received=len(payload.alerts),
            receiver=payload.receiver,
        )
    # The request's server span is the alerts' parent: its context is kept on each event.
    recorded = await intake.accept(payload, trace_context=tracing.current_carrier())
    span = trace.get_current_span()
    for r in recorded:
        span.add_event(
            "alert_recorded",
            {
                "fingerprint": r.alert.fingerprint,
                "status": r.alert.status,
                "result": "accepted" if r.accepted else "duplicate",
                "event_id": r.event_id,
            },
        )
    accepted = sum(1 for r in recorded if r.accepted)
    for (status, result), count in Counter(
        (r.alert.status, "accepted" if r.accepted else "duplicate") for r in recorded
    ).items():
        metrics.ALERTS_RECEIVED.labels(status=status, result=result).inc(count)
    # On the request's access line (receiver.middleware), not a line of its own.
    request.state.log_fields = {
        "accepted": accepted,
        "duplicate": len(recorded) - accepted,
        "receiver": payload.receiver,
    }
    answer = IngestResponse(
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
    # Serialized once here (the model is built from trusted values): FastAPI would validate it again.
    return Response(answer.model_dump_json(), status_code=202, media_type="application/json")
