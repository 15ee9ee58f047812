"""What a secret's reference looks like in rendered params (``workers.secrets``), and how it is
shown to people. A module of its own, importing nothing: the receiver shows references (runs
API) without importing the remediations.

The two characters must be those of ``remediations.base.SECRET_REFERENCE_MARKS`` (a test checks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

OPEN, CLOSE = "\ue000", "\ue001"
PATTERN = re.compile(OPEN + r"secret:([A-Za-z][A-Za-z0-9_]{0,63})" + CLOSE)


def is_reference(value: Any) -> bool:
    """Whether ``value`` is a string holding a reference (a name, safe to show)."""
    return isinstance(value, str) and OPEN + "secret:" in value


def shown(value: Any) -> Any:
    """A copy for people (runs API, CLI): each reference as ``{secret:NAME}``."""
    if isinstance(value, str):
        return PATTERN.sub(lambda m: "{secret:" + m.group(1) + "}", value) if OPEN in value else value
    if isinstance(value, Mapping):
        return {key: shown(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shown(item) for item in value]
    return value
