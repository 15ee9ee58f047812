"""JSON for the ledger's columns and the log lines: orjson, falling back to the standard
library for what orjson refuses.

On the receiver's hot path the standard library's encoder was a twentieth of the process's
instructions (each event's labels, annotations and trace context, each access line), and orjson
does the same work in a fraction of them (``docs/benchmarks.md``). The text differs only in
form: compact, and UTF-8 rather than ``\\u`` escapes. A value orjson cannot encode (an integer
past 64 bits, a lone surrogate) or text it cannot decode (``NaN``, which the standard library
wrote for a float that was not a number) goes through ``json`` as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

# Keys that are numbers or enums become strings, as ``json`` makes them.
_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
    """``value`` as JSON text; ``default`` makes something of what JSON cannot hold (structlog's
    ``JSONRenderer`` passes one for a log line)."""
    try:
        return orjson.dumps(value, default=default, option=_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value, default=default)


def loads(text: str | bytes) -> Any:
    """The value of JSON ``text``."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
