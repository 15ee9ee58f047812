"""Tracing (OpenTelemetry) and the trace context the ledger keeps for every event and run.

One ``TracerProvider`` per process, set up once for its role (``receiver``, ``worker``,
``beat``): ``service.name`` ``responder-{role}`` unless ``OTEL_SERVICE_NAME`` says otherwise,
the sampler from ``OTEL_TRACES_SAMPLER`` (the SDK's default, parent-based always-on), spans
exported over OTLP (HTTP/protobuf) only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, and nothing at all with ``OTEL_SDK_DISABLED=true``.
With no exporter and no sampler set, spans are not recorded, but their ids exist and travel.

A message can be lost and sent again later by the reconciler, a retry or the dispatcher, from
contexts that have nothing to do with the alert. So the context is not only carried in the
message: it is stored. A webhook's context (its ``traceparent`` and the request's correlation
id, a *carrier*) is recorded on each of its events, and the span that planned an event's rules
is recorded on each run it made; every message is sent with its row's carrier as headers, and
the spans that plan an event or attempt a run take their parent from the row, linking the span
of the delivery that brought them when that one belongs to another trace.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import metadata
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor

Carrier = dict[str, str]

# The message header and carrier key of the correlation id (``X-Request-ID``). Not
# ``correlation_id``: Celery's task request already has one (the task id).
REQUEST_ID = "x_request_id"
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")

# The correlation id of the request or task being handled (for the carrier a row keeps).
CORRELATION_ID: ContextVar[str | None] = ContextVar("correlation_id", default=None)

_configured: str | None = None
_quiet = False
_lock = threading.Lock()

tracer = trace.get_tracer("alert-responder")


def version() -> str:
    """This package's version (``service.version``)."""
    try:
        return metadata.version("alert-responder")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout not installed
        return "0.0.0"


def exporting() -> bool:
    """Whether the standard variables ask for spans to be exported over OTLP."""
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def configure_tracing(role: str, *, processors: Sequence[SpanProcessor] = ()) -> None:
    """Set this process's tracer provider for ``role`` (once; later calls change nothing).

    ``processors``: more span processors (tests add an in-memory exporter).
    """
    global _configured, _quiet
    with _lock:
        if _configured is not None:
            return
        _configured = role
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return  # the API's no-op tracer: no spans, no ids
        attributes: dict[str, Any] = {"service.version": version(), "service.namespace": "alert-responder"}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = f"responder-{role}"
        # Nothing to export them to (and no sampler asked for): spans are not recorded. Each
        # still has its ids, so logs, messages and the runs API carry the trace as before, at
        # a fraction of the cost of building spans nobody receives.
        quiet = not exporting() and not processors and not os.environ.get("OTEL_TRACES_SAMPLER")
        _quiet = quiet
        provider = TracerProvider(
            resource=Resource.create(attributes),
            sampler=sampling.ParentBased(sampling.ALWAYS_OFF) if quiet else None,
        )
        if exporting():
            # Imported only when used: the exporter pulls in protobuf and requests.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        for processor in processors:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)


def quiet() -> bool:
    """Whether this process's spans are not recorded (``configure_tracing`` found nothing to
    export them to): only their ids matter, and instrumentation that builds rich spans is
    better left out (the receiver makes its request span itself, ``receiver.middleware``)."""
    return _quiet


@contextmanager
def server_span(headers: Iterable[tuple[bytes, bytes]], name: str) -> Iterator[trace.Span]:
    """A request's server span, whose parent is the caller's W3C ``traceparent`` if it sent one:
    what the FastAPI instrumentation makes, without its attributes (for a quiet process)."""
    carrier = {
        key.decode("latin-1"): value.decode("latin-1")
        for key, value in headers
        if key in (b"traceparent", b"tracestate")
    }
    parent = propagate.extract(carrier) if carrier else None
    # Started and made current by hand: ``start_as_current_span``'s wrappers cost as much again
    # as the span, on every request (docs/benchmarks.md).
    span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
    token = context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        if span.is_recording():
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        context.detach(token)
        span.end()


def shutdown() -> None:
    """Export what is buffered (a process about to exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def request_id(given: str | None) -> str | None:
    """The caller's ``X-Request-ID`` if it is a sane token (a header is hostile data), else None."""
    if given and _REQUEST_ID_OK.fullmatch(given):
        return given
    return None


def current_carrier(correlation_id: str | None = None) -> Carrier:
    """The current span's context as W3C headers, with the correlation id (by default the
    current one): what a row keeps."""
    carrier: Carrier = {}
    propagate.inject(carrier)
    correlation_id = correlation_id or CORRELATION_ID.get()
    if correlation_id:
        carrier[REQUEST_ID] = correlation_id
    return carrier


def trace_id(carrier: Mapping[str, Any] | None) -> str | None:
    """The trace id a stored carrier belongs to (hex), or None."""
    found = _TRACEPARENT.fullmatch(str((carrier or {}).get("traceparent", "")))
    return found.group(1) if found else None


def headers(carrier: Mapping[str, Any] | None) -> Carrier:
    """A stored carrier as message headers: its trace context and correlation id, nothing else."""
    if not carrier:
        return {}
    return {
        key: str(carrier[key])
        for key in ("traceparent", "tracestate", REQUEST_ID)
        if isinstance(carrier.get(key), str) and carrier[key]
    }


@contextmanager
def attached(carrier: Mapping[str, Any] | None) -> Iterator[None]:
    """Make a stored carrier's context the current one (a message published on its behalf
    becomes part of its trace, whatever else is current)."""
    if not carrier or trace_id(carrier) is None:
        yield
        return
    token = context.attach(propagate.extract(dict(carrier)))
    try:
        yield
    finally:
        context.detach(token)


def start_span(name: str, carrier: Mapping[str, Any] | None, **attributes: Any) -> trace.Span:
    """Start (not enter) a span whose parent is the stored carrier's context. When the current
    span (the delivering task's) belongs to another trace, it is linked instead: a reconciler's
    or a merged message's delivery still leads to the span."""
    current = trace.get_current_span().get_span_context()
    parent = propagate.extract(dict(carrier)) if carrier and trace_id(carrier) else None
    links = []
    if parent is not None and current.is_valid:
        stored = trace.get_current_span(parent).get_span_context()
        if stored.trace_id != current.trace_id:
            links.append(trace.Link(current))
    return tracer.start_span(
        name,
        context=parent,
        links=links,
        attributes={key: value for key, value in attributes.items() if value is not None},
    )


def carrier_of(span: trace.Span, correlation_id: str | None) -> Carrier:
    """The carrier of ``span`` (what a run records as the span that made it)."""
    with trace.use_span(span, end_on_exit=False):
        return current_carrier(correlation_id)


def log_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span, for a log line (empty outside one)."""
    span = trace.get_current_span().get_span_context()
    if not span.is_valid:
        return {}
    return {"trace_id": format(span.trace_id, "032x"), "span_id": format(span.span_id, "016x")}
