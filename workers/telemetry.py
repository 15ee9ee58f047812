"""Logging (structlog, JSON lines in services, console on a TTY) and secret redaction.

Every line carries ``service`` (the process's role), and inside a span its ``trace_id`` and
``span_id`` (``workers.tracing``); a request's or task's ``correlation_id`` is bound to it.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, TextIO

import structlog
import structlog.tracebacks

from workers import jsoncodec, references, tracing

# Keys whose values are secret wherever they appear (params, headers, log fields); more with
# RESPONDER_REDACT_KEYS (``redact_keys``).
_REDACTED_KEY_WORDS = (
    r"pass(word|wd)?|secret|token|authori[sz]ation|api[_-]?key|cookie|credential|private[_-]?key"
)
SECRET_KEY = re.compile(f"({_REDACTED_KEY_WORDS})", re.I)
REDACTED = "[REDACTED]"


def redact_keys(extra: Sequence[str]) -> None:
    """Also treat keys containing any of ``extra`` (plain words, case-insensitive) as secret."""
    global SECRET_KEY
    words = "|".join(re.escape(word) for word in extra if word)
    SECRET_KEY = re.compile(f"({_REDACTED_KEY_WORDS}{'|' + words if words else ''})", re.I)
    secret_key.cache_clear()


@functools.lru_cache(maxsize=4096)
def secret_key(key: object) -> bool:
    """Whether a key's name marks its value as secret. Remembered: the names a process logs and
    stores are few, and searching each one on every log line was a third of the line's cost
    (``docs/benchmarks.md``)."""
    return isinstance(key, str) and SECRET_KEY.search(key) is not None


# Values that hold nothing to walk: checked by their exact type first, which is much cheaper
# than ``isinstance`` against the ``Mapping`` ABC for the usual log field.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _error_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``error_type`` and ``error`` as the fields ``error.type`` and ``error.message`` (an empty
    error is left out)."""
    if "error_type" in event_dict:
        event_dict["error.type"] = event_dict.pop("error_type")
    if "error" in event_dict:
        error = event_dict.pop("error")
        if error is not None:
            event_dict["error.message"] = error if isinstance(error, str) else str(error)
    return event_dict


def redact(value: Any) -> Any:
    """A copy with the values of secret-named keys replaced, walking dicts and lists."""
    if isinstance(value, Mapping):
        return {key: REDACTED if secret_key(key) else redact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


# Values known to be secret in this process (resolved secrets, workers.secrets): replaced
# wherever they appear in a log line, an error or an output.
_secrets: set[str] = set()
_secret_values: re.Pattern[str] | None = None
# Shorter values would redact ordinary words.
MIN_SECRET_CHARS = 4
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
# A secret's reference (workers.secrets, U+E000...U+E001) is a name, not a value: left alone.
_SECRET_QUERY = re.compile(
    r"(?i)([?&;][^=&\s#]*(?:pass(?:word|wd)?|secret|token|api[_-]?key|apikey|key|sig|signature|auth|"
    r"credential|code)[^=&\s#]*=)[^&\s#\"'\ue000]+"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{8,}")


def add_secret(value: str) -> None:
    """Redact ``value`` from now on, wherever it appears (a secret just resolved)."""
    global _secret_values
    if len(value) < MIN_SECRET_CHARS or value in _secrets:
        return
    _secrets.add(value)
    ordered = sorted(_secrets, key=len, reverse=True)  # a longer secret before its own prefix
    _secret_values = re.compile("|".join(re.escape(s) for s in ordered))


def redact_text(text: str) -> str:
    """``text`` with every known secret value, a URL's user info, secret-named query
    parameters and bearer-looking credentials replaced by ``[REDACTED]``."""
    if _secret_values is not None:
        text = _secret_values.sub(REDACTED, text)
    if "://" in text:
        text = _URL_USERINFO.sub(r"\1" + REDACTED + "@", text)
    if "=" in text and ("?" in text or "&" in text or ";" in text):
        text = _SECRET_QUERY.sub(r"\1" + REDACTED, text)
    lowered = text.lower()
    if "bearer" in lowered or "basic" in lowered or "token" in lowered:
        text = _BEARER.sub(r"\1\2" + REDACTED, text)
    return text


def redact_values(value: Any) -> Any:
    """A copy with secret-named keys (``redact``) and secret values (``redact_text``) redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            key: REDACTED if secret_key(key) and not references.is_reference(item) else redact_values(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value


# Fields whose values we make (ids, names, times): never a secret, not scanned. Not ``event``:
# a standard-library line's message is its event.
_OURS = frozenset(
    {
        "level",
        "logger",
        "timestamp",
        "service",
        "trace_id",
        "span_id",
        "correlation_id",
        "run_id",
        "event_id",
        "task_id",
        "task_name",
        "rule",
        "remediation",
        "fingerprint",
        "trigger",
        "status",
        "reason",
        "outcome",
    }
)


def _redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The last step before rendering (tracebacks included): secret-named fields, and secret
    values wherever they are. One pass over the fields: a line's redaction was a third of its
    cost in two (docs/benchmarks.md)."""
    for key, item in event_dict.items():  # values replaced in place: the keys do not change
        if secret_key(key):
            event_dict[key] = REDACTED
            continue
        if key in _OURS:
            continue
        kind = type(item)
        if kind is str or (kind not in _SCALARS and isinstance(item, str)):  # a str subclass too
            event_dict[key] = redact_text(item)
        elif kind not in _SCALARS and isinstance(item, (Mapping, list, tuple)):
            event_dict[key] = redact_values(redact(item))
    return event_dict


_service = {"name": "responder"}
# Module loggers bind to the pipeline on first use (fast); the tests, which configure it more
# than once in a process, turn this off.
CACHE_LOGGERS = True


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


def configure_logging(
    *, fmt: str = "auto", level: str = "INFO", service: str | None = None, secret_keys: Sequence[str] = ()
) -> None:
    """One pipeline for our structlog lines and the standard library's (Celery, uvicorn);
    ``service``: this process's role (``responder-receiver``...; kept if not given).

    Our lines go straight from structlog to the stream (filtered by level before any processor
    runs); only foreign lines go through ``logging`` and structlog's ``ProcessorFormatter``.
    Routing our own lines through ``logging`` as well cost a webhook about 8% of the receiver's
    time for its one line (``docs/benchmarks.md``).
    """
    if service:
        _service["name"] = service
    redact_keys(secret_keys)
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
        _error_fields,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=jsoncodec.dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # Tracebacks as data, without frame locals: a local can hold a token or a rendered secret.
    tracebacks = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )
    final: list[Any] = [tracebacks, _redact_processor, renderer] if as_json else [_redact_processor, renderer]
    structlog.configure(
        processors=[*shared, *final],
        logger_factory=lambda name="", *_: _NamedWriteLogger(stream, name),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=CACHE_LOGGERS,
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
