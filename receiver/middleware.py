"""Every request: a correlation id (``X-Request-ID``), one access log line, and its metrics
(``responder_http_requests_total``, ``responder_http_request_duration_seconds``).

A pure ASGI middleware, not Starlette's ``BaseHTTPMiddleware``, which runs the endpoint in a
task of its own (a context copy) and costs a webhook several times as much.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers import metrics, telemetry, tracing

log = telemetry.get_logger("receiver.access")

HEADER = b"x-request-id"
# Methods counted by name; any other (a client's invention) is "other": labels stay bounded.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Requests whose access line would only be noise at info (scrapes and probes): logged at debug.
QUIET = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestContext:
    """Takes the caller's ``X-Request-ID`` (if sane) or makes one, binds it to the request's
    log lines and trace carrier (``tracing.CORRELATION_ID``), returns it in the response, and
    logs one ``http_request`` line: method, route template, status, duration, response bytes
    (never a body, a query string or a header), and the fields the route put in
    ``request.state.log_fields``.

    ``spans``: also make the request's server span (its parent the caller's ``traceparent``),
    where the FastAPI instrumentation is left out (``tracing.quiet()``: spans are not recorded,
    and their ids are all that is needed)."""

    def __init__(self, app: ASGIApp, *, spans: bool = False) -> None:
        self.app = app
        self.spans = spans

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == HEADER), None)
        correlation_id = tracing.request_id(given.decode("latin-1") if given else None) or uuid.uuid4().hex
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "bytes": 0}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, correlation_id.encode())]
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        token = tracing.CORRELATION_ID.set(correlation_id)
        spanned = self.spans and scope["path"] not in QUIET
        try:
            with (
                structlog.contextvars.bound_contextvars(correlation_id=correlation_id),
                tracing.server_span(scope["headers"], scope["method"])
                if spanned
                else contextlib.nullcontext(),
            ):
                try:
                    await self.app(scope, receive, sending)
                finally:
                    route = scope.get("route")
                    path = getattr(route, "path", None) or "unmatched"
                    elapsed = time.perf_counter() - started
                    method = scope["method"] if scope["method"] in METHODS else "other"
                    metrics.HTTP_REQUESTS.labels(method, path, str(answer["status"])).inc()
                    metrics.HTTP_DURATION.labels(method, path).observe(elapsed)
                    (log.debug if path in QUIET else log.info)(
                        "http_request",
                        method=scope["method"],
                        route=path,
                        status=answer["status"],
                        duration_ms=round(elapsed * 1000, 2),
                        bytes=answer["bytes"],
                        # What the route added (the webhook: alerts accepted and duplicate).
                        **(scope.get("state") or {}).get("log_fields", {}),
                    )
        finally:
            tracing.CORRELATION_ID.reset(token)
