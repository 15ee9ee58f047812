"""The exception tree of alert-responder: every error it raises on purpose.

It lives in the leaf package so that remediations can raise typed errors without importing
the engine; the engine and the receiver subclass ``ResponderError`` for their own errors, so
``except ResponderError`` catches every one of them and nothing else (a bug stays a bug).

* ResponderError
  x RegistryError           # a remediation is declared wrongly: stops the import
  x ConfigError             # (workers.config) the responder config is invalid
  x RenderError             # (workers.templating) a template failed; also a ValueError
    + RenderLimitError      # a render went past its size or time bound
  x MatcherError            # (workers.matching) a matcher Alertmanager would refuse; a ValueError
  x PublishError            # (workers.publishing) the broker did not take the messages
  x EventsFailed            # (workers.planner) some events of a message were not planned
  x ApiError                # (receiver.errors) answered with its own status and JSON body
  x RemediationError
    + TransientError        # retry: timeouts, 5xx, connection refused, non-zero exit
    + PermanentError        # never retry: refused params, 4xx, unknown command
      + SecretError         # (workers.secrets) a secret reference that cannot be resolved

``RenderError`` and ``MatcherError`` stay ``ValueError`` too, as they were before they joined
the tree: what catches a ``ValueError`` (a pydantic validator, which makes it a field's
``ValidationError``) still catches them.
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
