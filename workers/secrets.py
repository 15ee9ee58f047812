"""Secrets in the config are references, resolved only as a remediation runs.

A param written ``{secret: NAME}``, or ``{{ secret('NAME') }}`` inside a template, renders to a
*reference*: a marker between two private-use characters (U+E000, U+E001). Planning stores the
references, so the rendered params on a run, its preflight and everything derived from them
(the runs API, logs, spans) hold the name, never the value. The runner resolves them just
before the remediation runs, from the environment variable ``RESPONDER_SECRET_<NAME>`` or the
file ``<RESPONDER_SECRETS_DIR>/<NAME>`` (one value per file, a trailing newline dropped, like
Alertmanager's ``credentials_file``), and registers each value for redaction
(``telemetry.add_secret``).

Alert data is hostile: the template context has the two marker characters removed from every
string (``templating.template_context``), so a label can never forge a reference and have a
secret resolved into a URL of its choosing. Only the config's own templates can make one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remediations.base import SECRET_REFERENCE_MARKS
from remediations.errors import PermanentError
from workers.references import CLOSE, OPEN, shown
from workers.references import PATTERN as _REFERENCE

__all__ = ["SecretError", "lookup", "names", "reference", "resolve", "scrub", "shown", "whole_param"]

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
ENV_PREFIX = "RESPONDER_SECRET_"
DIR_ENV = "RESPONDER_SECRETS_DIR"


class SecretError(PermanentError):
    """A secret that is referenced but not set (or a bad name): the run fails, naming it."""


def reference(name: str) -> str:
    """The reference to secret ``name`` (what planning renders ``secret(name)`` to)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SecretError(
            f"bad secret name {str(name)[:70]!r}: letters, digits and _, starting with a letter"
        )
    return f"{OPEN}secret:{name}{CLOSE}"


def whole_param(value: Any) -> str | None:
    """The reference a config value ``{secret: NAME}`` stands for, or None for any other value."""
    if isinstance(value, Mapping) and set(value) == {"secret"}:
        return reference(value["secret"])
    return None


def names(value: Any) -> set[str]:
    """The secrets a params structure refers to."""
    if isinstance(value, str):
        return set(_REFERENCE.findall(value)) if OPEN in value else set()
    if isinstance(value, Mapping):
        return set().union(*(names(item) for item in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(names(item) for item in value)) if value else set()
    return set()


def lookup(name: str) -> str:
    """The value of secret ``name``: ``RESPONDER_SECRET_<NAME>``, else ``<RESPONDER_SECRETS_DIR>/<NAME>``."""
    reference(name)  # checks the name (a file name must not climb out of the directory)
    found = os.environ.get(ENV_PREFIX + name)
    if found is not None:
        return found
    directory = os.environ.get(DIR_ENV)
    if directory:
        path = Path(directory) / name
        if path.is_file():
            return path.read_text().removesuffix("\n")
    raise SecretError(
        f"secret {name} is not set ({ENV_PREFIX}{name}"
        + (f", or the file {name} in {DIR_ENV}" if directory else f", or {DIR_ENV}")
        + ")"
    )


def resolve(value: Any, found: dict[str, str] | None = None) -> Any:
    """A copy with every reference replaced by its secret's value (``found``: the values looked
    up, by name, filled in as a side effect). Raises SecretError for a secret not set."""
    found = found if found is not None else {}
    if isinstance(value, str):
        if OPEN not in value:
            return value

        def value_of(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in found:
                found[name] = lookup(name)
            return found[name]

        return _REFERENCE.sub(value_of, value)
    if isinstance(value, Mapping):
        return {key: resolve(item, found) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, found) for item in value]
    return value


def scrub(text: str) -> str:
    """``text`` without the marker characters (alert data must not forge a reference)."""
    return text.translate(SECRET_REFERENCE_MARKS) if OPEN in text or CLOSE in text else text
