"""The engine's retry policies, declared once and read from settings.

- ``attempt_policy``: whole attempts of a run (``run_remediation``): ``RESPONDER_MAX_ATTEMPTS``
  tries, waiting U(0, min(cap, base * 2**n)) between them (full jitter), at least a target's
  ``Retry-After`` up to the cap. Each retry is a new message.
- ``ledger_policy``: a task that hit a transient ledger error (lock timeout, lost connection)
  retries itself with the same backoff, ``RESPONDER_LEDGER_RETRIES`` times; past that the row
  is left to the reconciler, which finds it by its state.
- ``ledger_retrying``: recording an attempt's end, in-process (tenacity), for up to a minute:
  the action already happened, so its record is worth waiting for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from remediations import RetryPolicy
from workers.ledger.db import is_transient_ledger_error
from workers.settings import Settings

T = TypeVar("T")


def attempt_policy(settings: Settings) -> RetryPolicy:
    """Whole attempts of a run."""
    return RetryPolicy(
        attempts=settings.max_attempts,
        base_s=settings.retry_backoff_s,
        cap_s=max(settings.retry_backoff_cap_s, settings.retry_backoff_s),
    )


def ledger_policy(settings: Settings) -> RetryPolicy:
    """Task-level retries after a transient ledger error."""
    return RetryPolicy(
        attempts=settings.ledger_retries + 1,
        base_s=max(settings.retry_backoff_s, 0.5),
        cap_s=max(60.0, settings.retry_backoff_s),
    )


def ledger_retrying(settings: Settings, *, within_s: float | None = None) -> Callable[[Callable[[], T]], T]:
    """Call a ledger write, retrying transient errors for ``within_s`` (default one lease)."""

    def call(fn: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(lambda e: is_transient_ledger_error(e)),
            stop=stop_after_delay(settings.lease_s if within_s is None else within_s),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            reraise=True,
        )
        return retrying(fn)

    return call
