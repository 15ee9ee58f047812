"""Cooldowns and budgets shared by every worker: slots taken atomically in Redis, kept in the ledger.

A run that a rule's ``cooldown`` or ``max_runs``, or the global ``limits.max_runs``, applies to
takes a slot when it is queued: one Lua script checks the cooldown of its group and every budget
window and, only if all allow it, takes them all, so that two workers can never both take the
last slot. The slot's member is the run's dedupe key: a redelivered admission of the same run
finds its own slot and is allowed again, never counted twice.

Keys, under ``RESPONDER_GUARD_KEY_PREFIX`` (``responder:guard:``):

- ``ready``: set once the state is complete. Missing means Redis lost its memory (restarted
  without persistence, flushed, failed over to an empty replica) or never had it.
- ``cooldown:{rule}:{group}``: the dedupe key of the run holding the cooldown; expires with it.
- ``budget:rule:{rule}`` and ``budget:global``: sorted sets of dedupe keys, scored by the time
  (ms, Redis's clock) their run took the slot; trimmed to the window on every check.
- ``rebuild``: held while one worker rebuilds the state.

Every slot taken is also on its run in the ledger (``runs.guard_key``, ``runs.slot_at``), and
every breaker's state in ``breakers`` (``workers.breakers``, under the same prefix). When
``ready`` is missing the state is rebuilt from the ledger before anything is decided, and while
it cannot be (Redis unreachable), the answer is ``unavailable``: the caller refuses a
destructive remediation (``guard_state_unavailable``) rather than run it unguarded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import redis
from sqlalchemy.orm import Session

from workers import telemetry
from workers.breakers import Breakers, BreakerState, Gate, Outcome, Recorded, Transition, lock_key
from workers.config import Budget, ResponderConfig, Rule
from workers.ledger import repository
from workers.settings import Settings

log = telemetry.get_logger(__name__)

Verdict = Literal["ok", "cooldown", "budget", "budget_global", "unavailable"]

_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'unavailable' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local cooldown = tonumber(ARGV[2])
if cooldown > 0 then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= member then return 'cooldown' end
end
local function full(key, count, window)
  if count <= 0 then return false end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZSCORE', key, member) then return false end
  return redis.call('ZCARD', key) >= count
end
if full(KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4])) then return 'budget' end
if full(KEYS[4], tonumber(ARGV[5]), tonumber(ARGV[6])) then return 'budget_global' end
if cooldown > 0 then redis.call('SET', KEYS[2], member, 'PX', cooldown, 'NX') end
if tonumber(ARGV[3]) > 0 then
  redis.call('ZADD', KEYS[3], 'NX', now, member)
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
if tonumber(ARGV[5]) > 0 then
  redis.call('ZADD', KEYS[4], 'NX', now, member)
  redis.call('PEXPIRE', KEYS[4], ARGV[6])
end
return 'ok'
"""

REBUILD_LOCK_MS = 30_000
REBUILD_WAIT_S = 5.0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def group_key(rule: Rule, labels: dict[str, str]) -> str:
    """The cooldown group of an alert under ``rule``: its ``group_by`` label values, hashed
    (labels are hostile data: they never shape a Redis key); "" when the rule has no groups."""
    if not rule.group_by:
        return ""
    values = "\x00".join(f"{name}={labels.get(name, '')}" for name in sorted(rule.group_by))
    return hashlib.sha256(values.encode()).hexdigest()[:32]


def needs_slot(rule: Rule | None, config: ResponderConfig) -> bool:
    """Whether alert runs of ``rule`` take a slot (a cooldown, or a budget of theirs or global)."""
    if config.limits.max_runs is not None:
        return True
    return rule is not None and (rule.cooldown_s is not None or rule.max_runs is not None)


@dataclass(frozen=True)
class Slot:
    """What one run asks of the shared state."""

    member: str  # the run's dedupe key
    rule: str
    group: str  # the cooldown group ("" for the whole rule)
    cooldown_s: float | None
    budget: Budget | None
    # Counted in the global budget (limits.max_runs): every alert run, no escalation.
    counted_globally: bool = True


# The budget key of escalations (limits.max_escalations); no rule can have this name.
ESCALATIONS = "*escalations*"


@dataclass(frozen=True)
class TakenSlot:
    """A slot held by a run, as the ledger remembers it (for a rebuild)."""

    member: str
    rule: str
    group: str
    at: datetime
    trigger: str = "alert"


@dataclass(frozen=True)
class LedgerCopy:
    """What the ledger holds of the shared state: the slots taken since a time, and breakers."""

    slots: list[TakenSlot] = field(default_factory=list)
    breakers: list[BreakerState] = field(default_factory=list)
    # Attempts running now: (target, their run's id, when its slot's lease ends).
    locks: list[tuple[str, str, datetime]] = field(default_factory=list)


Ledger = Callable[[datetime], LedgerCopy]


def from_ledger(session: Session) -> Ledger:
    """Read the shared state's ledger copy in ``session`` (called only for a rebuild)."""

    def read(since: datetime) -> LedgerCopy:
        slots = [TakenSlot(*row) for row in repository.slots_since(session, since)]
        breakers = [
            BreakerState(
                key=b.key,
                state=b.state,
                failures=b.failures,
                opened_at_ms=round(b.opened_at.timestamp() * 1000) if b.opened_at else 0,
                cool_down_ms=round(b.cool_down_s * 1000),
            )
            for b in repository.list_breakers(session, limit=100_000)
        ]
        return LedgerCopy(slots, breakers, repository.running_targets(session))

    return read


class GuardState:
    """The shared guard state on one Redis, for one config: cooldown and budget slots, the
    circuit breakers and target locks (``breakers``), and their rebuild from the ledger."""

    def __init__(self, client: redis.Redis, *, prefix: str, config: ResponderConfig) -> None:
        self.client = client
        self.prefix = prefix
        self.config = config
        self._take = client.register_script(_TAKE)
        self.breakers = Breakers(client, prefix)

    def key(self, *parts: str) -> str:
        """A key under this deployment's prefix."""
        return self.prefix + ":".join(parts)

    def take(self, slots: Sequence[Slot], *, ledger: Ledger) -> list[Verdict]:
        """Try to take each slot, in order (one Redis round trip); ``ledger(since)`` lists the
        slots the ledger holds since a time, for a rebuild when Redis has lost the state."""
        if not slots:
            return []
        try:
            verdicts = self._take_all(slots)
            asked = frozenset(slot.member for slot in slots)
            if "unavailable" in verdicts and self.rebuild(ledger, asking=asked):
                verdicts = self._take_all(slots)
        except redis.RedisError as exc:
            log.warning("guard_state_unreachable", error_type=type(exc).__name__)
            return ["unavailable"] * len(slots)
        return verdicts

    def _take_all(self, slots: Sequence[Slot]) -> list[Verdict]:
        pipe = self.client.pipeline(transaction=False)
        limit = self.config.limits.max_runs
        for slot in slots:
            keys = [
                self.key("ready"),
                self.key("cooldown", slot.rule, slot.group),
                self.key("budget", "rule", slot.rule),
                self.key("budget", "global"),
            ]
            args: list[Any] = [
                slot.member,
                _ms(slot.cooldown_s) if slot.cooldown_s else 0,
                slot.budget.count if slot.budget else 0,
                _ms(slot.budget.per) if slot.budget else 0,
                limit.count if limit and slot.counted_globally else 0,
                _ms(limit.per) if limit and slot.counted_globally else 0,
            ]
            self._take(keys=keys, args=args, client=pipe)
        return [_verdict(raw) for raw in pipe.execute()]

    def longest_window_s(self) -> float:
        """The longest cooldown or budget window in the config: how far back a rebuild reads."""
        windows = [0.0]
        for rule in self.config.rules:
            windows += [rule.cooldown_s or 0.0, rule.max_runs.per if rule.max_runs else 0.0]
        for limit in (self.config.limits.max_runs, self.config.limits.max_escalations):
            if limit is not None:
                windows.append(limit.per)
        return max(windows)

    def gate(
        self,
        key: str,
        *,
        token: str,
        lease_s: float,
        ledger: Ledger,
        target: str | None = None,
        slots: int = 0,
    ) -> tuple[Gate, Transition]:
        """May a run of breaker ``key`` start, holding one of ``target``'s ``slots``
        (``workers.breakers.Breakers.acquire``)? The state is rebuilt from the ledger first if
        Redis lost it; ``unavailable`` if Redis is unreachable."""
        try:
            found = self.breakers.acquire(key, token=token, lease_s=lease_s, target=target, slots=slots)
            if found[0] == "unavailable" and self.rebuild(ledger):
                found = self.breakers.acquire(key, token=token, lease_s=lease_s, target=target, slots=slots)
        except redis.RedisError as exc:
            log.warning("guard_state_unreachable", error_type=type(exc).__name__)
            return "unavailable", ""
        return found

    def record(
        self,
        key: str,
        *,
        token: str,
        outcome: Outcome,
        threshold: int,
        cool_down_s: float,
        target: str | None = None,
    ) -> Recorded | None:
        """Count an attempt's outcome on its breaker and free its slot of ``target``; None if
        Redis could not be reached (the probe's and the slot's leases then run out)."""
        try:
            return self.breakers.record(
                key, token=token, outcome=outcome, threshold=threshold, cool_down_s=cool_down_s, target=target
            )
        except redis.RedisError as exc:
            log.warning("breaker_not_recorded", error_type=type(exc).__name__, outcome=outcome)
            return None

    def rebuild(self, ledger: Ledger, *, asking: frozenset[str] = frozenset()) -> bool:
        """Write back every slot the ledger says is still held, then mark the state ready.

        ``asking``: the members whose slots the caller is asking for now. The caller's session
        already holds their runs, slot time included, uncommitted; read back as held, each would
        find "its own" slot and a batch would overrun its budget, so they are left out: none of
        them holds a slot until the script grants it.

        One worker rebuilds at a time (a lock); the others wait for it, up to ``REBUILD_WAIT_S``
        (a rebuild takes milliseconds), then answer ``unavailable`` for this decision. Returns
        whether the state is ready now.
        """
        token = uuid.uuid4().hex
        if not self.client.set(self.key("rebuild"), token, nx=True, px=REBUILD_LOCK_MS):
            deadline = time.monotonic() + REBUILD_WAIT_S
            while not self.client.exists(self.key("ready")):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
            return True
        try:
            if self.client.exists(self.key("ready")):
                return True
            seconds, micros = self.client.time()
            now_ms = seconds * 1000 + micros // 1000
            now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
            copy = ledger(now - timedelta(seconds=self.longest_window_s()))
            taken = [slot for slot in copy.slots if slot.member not in asking]
            pipe = self.client.pipeline(transaction=False)
            self.breakers.restore(pipe, copy.breakers)
            for target, token, until in copy.locks:
                until_ms = round(until.timestamp() * 1000)
                if until_ms > now_ms:
                    pipe.zadd(lock_key(self.prefix, target), {token: until_ms})
                    pipe.pexpire(lock_key(self.prefix, target), until_ms - now_ms)
            rules = {rule.name: rule for rule in self.config.rules}
            limit = self.config.limits.max_runs
            escalations = self.config.limits.max_escalations
            for slot in taken:
                at_ms = round(slot.at.timestamp() * 1000)
                if slot.trigger == "escalation":
                    if escalations is not None:
                        pipe.zadd(self.key("budget", "rule", ESCALATIONS), {slot.member: at_ms}, nx=True)
                        pipe.pexpire(self.key("budget", "rule", ESCALATIONS), _ms(escalations.per))
                    continue
                rule = rules.get(slot.rule)
                if rule is not None and rule.cooldown_s and at_ms + _ms(rule.cooldown_s) > now_ms:
                    pipe.set(
                        self.key("cooldown", slot.rule, slot.group),
                        slot.member,
                        px=at_ms + _ms(rule.cooldown_s) - now_ms,
                        nx=True,
                    )
                if rule is not None and rule.max_runs is not None:
                    pipe.zadd(self.key("budget", "rule", slot.rule), {slot.member: at_ms}, nx=True)
                    pipe.pexpire(self.key("budget", "rule", slot.rule), _ms(rule.max_runs.per))
                if limit is not None:
                    pipe.zadd(self.key("budget", "global"), {slot.member: at_ms}, nx=True)
                    pipe.pexpire(self.key("budget", "global"), _ms(limit.per))
            pipe.set(self.key("ready"), now_ms)
            pipe.execute()
            log.warning("guard_state_rebuilt", slots=len(taken), breakers=len(copy.breakers))
            return True
        finally:
            self.client.delete(self.key("rebuild"))


def _verdict(raw: Any) -> Verdict:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if text not in ("ok", "cooldown", "budget", "budget_global", "unavailable"):
        raise ValueError(f"unexpected guard verdict {text!r}")
    return text  # type: ignore[return-value]


_states: dict[tuple[int, str, int], GuardState] = {}
_states_lock = threading.Lock()


def guard_state(settings: Settings, config: ResponderConfig) -> GuardState:
    """This process's guard state for the settings' Redis and ``config`` (one client per process)."""
    key = (os.getpid(), settings.redis_url, id(config))
    with _states_lock:
        found = _states.get(key)
        if found is None:
            client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
            found = _states[key] = GuardState(client, prefix=settings.guard_key_prefix, config=config)
        return found
