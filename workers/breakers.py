"""Circuit breakers per (remediation, target), shared by every worker: one Lua state machine.

    closed --N consecutive counted failures--> open --cool-down passed, one run asks--> half_open
    half_open --the probe succeeds--> closed;  --the probe fails--> open (again, for a cool-down)

Remediations are rare, so a breaker counts consecutive failures, not a failure rate. In
``half_open`` exactly one run across all workers is the probe: it holds a lease (its attempt's
longest possible run), and every other run asking meanwhile is refused; a probe that dies
without reporting frees the lease when it runs out. A failure counts when another attempt could
have gone differently (``TransientError``: timeouts, 5xx, refused connections; the soft time
limit); a ``PermanentError`` (refused params, 4xx) or a bug of ours does not.

State lives in a Redis hash per breaker, ``{prefix}breaker:{key}``, under the guard prefix and
its ``ready`` sentinel (``workers.guardstate``): a Redis that lost its memory answers
``unavailable`` until the state, breakers included, is rebuilt from the ledger's ``breakers``
table, which every transition and counted failure also updates. So an open breaker stays open
through a Redis restart, and a destructive remediation is refused rather than run unguarded.

The same acquire takes the target's concurrency slot (``{prefix}lock:{hash of target}``, a sorted
set of the holders' tokens scored by lease expiry): a run that would pass the breaker but finds
``concurrency`` runs already acting on its target is ``locked``, and neither the probe nor a slot
is taken; ``record`` frees the slot. One script for both, so a run never holds one without the
other, in one round trip.

This module imports no config and no remediation: the receiver uses it to reset a breaker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import redis

Gate = Literal["closed", "probe", "open", "locked", "unavailable"]
Outcome = Literal["success", "failure", "neutral"]
Transition = Literal["", "opened", "closed", "reopened", "half_opened"]

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unavailable', ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token, lease, slots = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[2], 'state') or 'closed'
local gate, transition = 'closed', ''
if state == 'open' then
  local opened = tonumber(redis.call('HGET', KEYS[2], 'opened_at') or '0')
  local cool = tonumber(redis.call('HGET', KEYS[2], 'cool_down_ms') or '0')
  if now < opened + cool then return {'open', ''} end
  gate, transition = 'probe', 'half_opened'
elseif state == 'half_open' then
  local probe = redis.call('HGET', KEYS[2], 'probe')
  local probe_until = tonumber(redis.call('HGET', KEYS[2], 'probe_until') or '0')
  if probe and probe ~= '' and probe ~= token and now < probe_until then return {'open', ''} end
  gate = 'probe'
end
if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if not redis.call('ZSCORE', KEYS[3], token) and redis.call('ZCARD', KEYS[3]) >= slots then
    return {'locked', ''}
  end
  redis.call('ZADD', KEYS[3], now + lease, token)
  redis.call('PEXPIRE', KEYS[3], lease)
end
if gate == 'probe' then
  redis.call('HSET', KEYS[2], 'state', 'half_open', 'probe', token, 'probe_until', now + lease)
end
return {gate, transition}
"""

_RECORD = """
redis.call('ZREM', KEYS[2], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token, outcome = ARGV[1], ARGV[2]
local threshold, cool = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
local probe = redis.call('HGET', KEYS[1], 'probe') or ''
if state == 'half_open' and probe == token then
  if outcome == 'success' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe', '')
    return {'closed', 0}
  elseif outcome == 'failure' then
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'cool_down_ms', cool, 'probe', '',
      'failures', failures + 1)
    return {'reopened', failures + 1}
  end
  redis.call('HSET', KEYS[1], 'probe', '')
  return {'', failures}
end
if state ~= 'closed' then return {'', failures} end
if outcome == 'success' then
  if failures == 0 then return {'', 0} end
  redis.call('HSET', KEYS[1], 'failures', 0)
  return {'', 0}
elseif outcome == 'failure' then
  failures = failures + 1
  if failures >= threshold then
    redis.call('HSET', KEYS[1], 'state', 'open', 'failures', failures, 'opened_at', now, 'cool_down_ms', cool)
    return {'opened', failures}
  end
  redis.call('HSET', KEYS[1], 'failures', failures)
  return {'', failures}
end
return {'', failures}
"""


def breaker_key(remediation: str, target: str | None) -> str:
    """The breaker of a (remediation, target): a hash (targets come from hostile labels)."""
    return hashlib.sha256(f"{remediation}\x00{target or ''}".encode()).hexdigest()[:32]


def redis_key(prefix: str, key: str) -> str:
    """The Redis hash of one breaker."""
    return f"{prefix}breaker:{key}"


def lock_key(prefix: str, target: str | None) -> str:
    """The Redis sorted set of the runs holding a target's concurrency slots (by lease expiry)."""
    return f"{prefix}lock:{hashlib.sha256((target or '').encode()).hexdigest()[:32]}"


@dataclass(frozen=True)
class Recorded:
    """What one attempt's outcome did to its breaker."""

    transition: Transition
    failures: int


@dataclass(frozen=True)
class BreakerState:
    """A breaker as the ledger keeps it (for a rebuild)."""

    key: str
    state: str
    failures: int
    opened_at_ms: int
    cool_down_ms: int


class Breakers:
    """The breakers on one Redis under one prefix."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._record = client.register_script(_RECORD)

    def acquire(
        self, key: str, *, token: str, lease_s: float, target: str | None = None, slots: int = 0
    ) -> tuple[Gate, Transition]:
        """May a run go? ``closed``; ``probe`` (this run is the half-open probe); ``open``
        (refused); ``locked`` (``slots`` runs already hold ``target``'s concurrency slots);
        ``unavailable`` (the state must be rebuilt first). A run that may go holds one of the
        target's slots (with ``slots`` > 0) until ``record`` or its lease ends. Raises RedisError."""
        gate, transition = self._acquire(
            keys=[self.prefix + "ready", redis_key(self.prefix, key), lock_key(self.prefix, target)],
            args=[token, max(1, round(lease_s * 1000)), slots],
        )
        return _text(gate), _text(transition)  # type: ignore[return-value]

    def record(
        self,
        key: str,
        *,
        token: str,
        outcome: Outcome,
        threshold: int,
        cool_down_s: float,
        target: str | None = None,
    ) -> Recorded:
        """Count one attempt's outcome and free its slot of ``target``; returns the transition
        it caused. Raises RedisError."""
        transition, failures = self._record(
            keys=[redis_key(self.prefix, key), lock_key(self.prefix, target)],
            args=[token, outcome, threshold, max(1, round(cool_down_s * 1000))],
        )
        return Recorded(_text(transition), int(failures))  # type: ignore[arg-type]

    def restore(self, pipe: Any, states: list[BreakerState]) -> None:
        """Queue the ledger's breakers on ``pipe`` (a rebuild): an open or half-open breaker comes
        back open, with the time it opened, so its cool-down runs on; a closed one with its count."""
        for state in states:
            fields: dict[str, Any] = {"state": "closed" if state.state == "closed" else "open"}
            fields.update(
                failures=state.failures, opened_at=state.opened_at_ms, cool_down_ms=state.cool_down_ms
            )
            pipe.hset(redis_key(self.prefix, state.key), mapping=fields)

    def reset(self, key: str) -> None:
        """Forget a breaker's state: it is closed with no failures. Raises RedisError."""
        self.client.delete(redis_key(self.prefix, key))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
