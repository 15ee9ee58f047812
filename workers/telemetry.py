"""Logging (structlog, JSON lines in services, console on a TTY) and secret redaction.

Every line carries ``service`` (the process's role), and inside a span its ``trace_id`` and
``span_id`` (``workers.tracing``); a request's or task's ``correlation_id`` is bound to it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
import structlog.tracebacks

from workers import tracing

SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|token|authori[sz]ation|api[_-]?key|cookie|credential|private[_-]?key)", re.I
)
REDACTED = "[REDACTED]"


def redact(value: Any) -> Any:
    """A copy with the values of secret-named keys replaced, walking dicts and lists."""
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(key, str) and SECRET_KEY.search(key) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def _redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        elif isinstance(event_dict[key], (Mapping, list)):
            event_dict[key] = redact(event_dict[key])
    return event_dict


_service = {"name": "responder"}


def _add_service_and_trace(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["service"] = _service["name"]
    event_dict.update(tracing.log_ids())
    return event_dict


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's ``WriteLogger`` with a ``name``, which ``add_logger_name`` puts on each line."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def configure_logging(*, fmt: str = "auto", level: str = "INFO", service: str | None = None) -> None:
    """One pipeline for our structlog lines and the standard library's (Celery, uvicorn);
    ``service``: this process's role (``responder-receiver``...; kept if not given).

    Our lines go straight from structlog to the stream (filtered by level before any processor
    runs); only foreign lines go through ``logging`` and structlog's ``ProcessorFormatter``.
    Routing our own lines through ``logging`` as well cost a webhook about 8% of the receiver's
    time for its one line (``docs/benchmarks.md``).
    """
    if service:
        _service["name"] = service
    # stdout, as services log (twelve-factor); structlog and the handler flush every line.
    stream = sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    numeric_level = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service_and_trace,
        _redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # Tracebacks as data, without frame locals: a local can hold a token or a rendered secret.
    tracebacks = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )
    final: list[Any] = [tracebacks, renderer] if as_json else [renderer]
    structlog.configure(
        processors=[*shared, *final],
        logger_factory=lambda name="", *_: _NamedWriteLogger(stream, name),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # Per-request and per-task lines that repeat our own structured ones (a run's attempt_started
    # and remediation_succeeded, Celery's "received" and "succeeded"); warnings and errors pass.
    for noisy in ("uvicorn.access", "httpx", "httpcore", "celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def bind(**values: Any) -> None:
    """Bind log keys for the rest of this task or request."""
    structlog.contextvars.bind_contextvars(**values)


def clear() -> None:
    """Forget every bound key (between tasks)."""
    structlog.contextvars.clear_contextvars()


def get_logger(name: str) -> Any:
    """A structlog logger; its lines carry ``logger``: ``name``."""
    return structlog.get_logger(name)
