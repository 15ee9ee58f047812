"""The retry policy: full jitter within a capped window, Retry-After honoured, tenacity in-call."""

from __future__ import annotations

import pytest

from remediations import (
    PermanentError,
    RemediationContext,
    RemediationParams,
    RemediationResult,
    RetryPolicy,
    TransientError,
    remediation,
)
from remediations.registry import get_remediation


def test_delay_is_full_jitter_within_a_capped_window() -> None:
    """Waits are in [0, min(cap, base * 2**(n-1))]."""
    policy = RetryPolicy(attempts=5, base_s=2, cap_s=10)
    for attempt, window in ((1, 2), (2, 4), (3, 8), (4, 10), (9, 10)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= window for d in delays)
        assert max(delays) > window / 2  # jittered across the window, not fixed


def test_retry_after_is_a_floor_up_to_the_cap() -> None:
    """A target's Retry-After is waited at least, but never past the cap."""
    policy = RetryPolicy(attempts=3, base_s=1, cap_s=30)
    assert all(policy.delay(1, retry_after=20) >= 20 for _ in range(50))
    assert all(policy.delay(1, retry_after=3600) <= 30 for _ in range(50))


def test_policy_refuses_nonsense() -> None:
    """At least one attempt, and a cap no lower than the base."""
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="cap_s"):
        RetryPolicy(base_s=10, cap_s=1)


class FlakyParams(RemediationParams):
    """No params."""


CALLS: list[int] = []


@remediation(
    name="test_flaky_in_call", call_retry=RetryPolicy(attempts=3, base_s=0, cap_s=0), destructive=False
)
def flaky(ctx: RemediationContext, params: FlakyParams) -> RemediationResult:
    """Fails transiently twice, then succeeds."""
    CALLS.append(1)
    if len(CALLS) < 3:
        raise TransientError("not yet", retry_after=0)
    return RemediationResult(summary="ok")


@remediation(name="test_permanent_in_call", call_retry=RetryPolicy(attempts=3, base_s=0, cap_s=0))
def permanent(ctx: RemediationContext, params: FlakyParams) -> RemediationResult:
    """Fails permanently."""
    CALLS.append(1)
    raise PermanentError("no")


def test_declared_in_call_retries_go_through_tenacity() -> None:
    """A remediation's call_retry retries TransientError in the call; PermanentError is not retried."""
    CALLS.clear()
    definition = get_remediation("test_flaky_in_call")
    assert definition.run(RemediationContext(), FlakyParams()).summary == "ok"
    assert len(CALLS) == 3 and definition.destructive is False
    CALLS.clear()
    with pytest.raises(PermanentError):
        get_remediation("test_permanent_in_call").run(RemediationContext(), FlakyParams())
    assert len(CALLS) == 1
