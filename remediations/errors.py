"""The exception tree of alert-responder.

It lives in the leaf package so that remediations can raise typed errors without importing
the engine; the engine and receiver subclass ``ResponderError`` for their own errors.

* ResponderError
  x RegistryError           # a remediation is declared wrongly: stops the import
  x ConfigError             # (workers.config) the responder config is invalid
  x RemediationError
    + TransientError        # retry: timeouts, 5xx, connection refused, non-zero exit
    + PermanentError        # never retry: refused params, 4xx, unknown command
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ResponderError(Exception):
    """Base class of every error alert-responder raises on purpose."""


class RegistryError(ResponderError):
    """A remediation is declared wrongly (bad signature, duplicate name)."""


class RemediationError(ResponderError):
    """A remediation attempt failed; the subclass says whether a retry can help."""

    retryable: bool = False

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})


class TransientError(RemediationError):
    """A failure that another attempt may not repeat (timeout, 5xx, refused connection).

    ``retry_after``: seconds the target asked us to wait (a 429's ``Retry-After``); the retry
    policy waits at least that long, up to its cap.
    """

    retryable = True

    def __init__(
        self, message: str, *, details: Mapping[str, Any] | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class PermanentError(RemediationError):
    """A failure that another attempt would repeat (refused params, 4xx, missing target)."""

    retryable = False
