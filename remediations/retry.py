"""One retry policy, declared once: attempts, exponential backoff with full jitter, a cap.

The engine uses it for whole attempts of a run (``run_remediation``: each retry a new message);
a remediation may declare one for short in-call retries (``@remediation(call_retry=...)``),
applied with tenacity around the function. Both read as the same sentence::

    RetryPolicy(attempts=3, base_s=5, cap_s=300)   # up to 3 tries; wait U(0, min(300, 5 * 2**n))

A ``TransientError`` carrying ``retry_after`` (a 429's ``Retry-After``) waits at least that
long, up to the cap. Only ``TransientError`` is retried: retryability is the error's type.
Do not declare both layers for the same failure: the counts multiply.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from remediations.errors import TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often to try and how long to wait between tries."""

    attempts: int = 3
    base_s: float = 1.0
    cap_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError("need attempts >= 1 and 0 <= base_s <= cap_s")

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based), full jitter.

        ``retry_after`` (from the target) is honoured as a floor, up to the cap.
        """
        window = min(self.cap_s, self.base_s * 2 ** max(attempt - 1, 0))
        wait = random.uniform(0, window)  # noqa: S311 - jitter, not cryptography
        if retry_after is not None and retry_after > 0:
            wait = max(wait, min(retry_after, self.cap_s))
        return wait

    def gives_up_after(self, attempt: int) -> bool:
        """Whether try number ``attempt`` was the last one allowed."""
        return attempt >= self.attempts

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = error.retry_after if isinstance(error, TransientError) else None
        return self.delay(state.attempt_number, retry_after=retry_after)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)``, retrying ``TransientError`` by this policy (tenacity)."""
        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=self._wait,
            retry=retry_if_exception_type(TransientError),
            reraise=True,
        )
        return retrying(fn, *args)
