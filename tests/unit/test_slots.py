"""Cooldowns and budgets on a real Redis and ledger: atomic slots, escalation, rebuild, fail safe."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select, update

from tests.helpers import RecordingPublisher, alert_payload, make_config
from workers import runner
from workers.admission import decide
from workers.alerts import WebhookPayload
from workers.config import Budget, ResponderConfig
from workers.dev import EmbeddedRedis
from workers.guardstate import GuardState, LedgerCopy, Slot, TakenSlot, group_key
from workers.ledger import attempts, repository
from workers.ledger.db import transaction
from workers.ledger.models import Attempt, Run, utcnow
from workers.planner import handle_events
from workers.settings import Settings

HOOK = "http://127.0.0.1:15101/hook/{{ labels.instance }}"
RULES: list[dict[str, Any]] = [
    {
        "name": "cooled",
        "match": ['alertname="Cooled"', 'instance!=""'],
        "remediation": "http_request",
        "cooldown": "15m",
        "group_by": ["instance"],
        "params": {"url": HOOK},
    },
    {
        "name": "budgeted",
        "match": ['alertname="Budgeted"'],
        "remediation": "http_request",
        "max_runs": {"count": 3, "per": "1h"},
        "params": {"url": HOOK},
    },
]
ESCALATION = {
    "remediation": "http_request",
    "params": {
        "url": "http://127.0.0.1:15101/page",
        "json": {"text": "{{ escalation.detail }} ({{ labels.alertname }}, run {{ escalation.run_id }})"},
    },
}


def config(**extra: Any) -> ResponderConfig:
    raw = make_config(rules=RULES).model_dump(by_alias=True)
    return ResponderConfig.model_validate({**raw, "escalation": ESCALATION, **extra})


@pytest.fixture
def state(redis_server: EmbeddedRedis) -> GuardState:
    client = redis.Redis.from_url(redis_server.url)
    return GuardState(client, prefix=f"test:{uuid.uuid4().hex}:", config=config())


def nothing_in_ledger(_since: datetime) -> LedgerCopy:
    return LedgerCopy()


def slot(member: str, *, rule: str = "cooled", group: str = "g", cooldown: float | None = 900) -> Slot:
    return Slot(member=member, rule=rule, group=group, cooldown_s=cooldown, budget=None)


def test_cooldown_allows_one_run_per_group_and_the_same_run_again(state: GuardState) -> None:
    """Within a cooldown only the holder of the group's slot gets it (again, on redelivery)."""
    assert state.take(
        [slot("a"), slot("b"), slot("a"), slot("c", group="other")], ledger=nothing_in_ledger
    ) == [
        "ok",
        "cooldown",
        "ok",
        "ok",
    ]


def test_budgets_of_a_rule_and_global_count_each_run_once(state: GuardState) -> None:
    """A budget of 3 takes 3 runs, refuses the 4th and 5th, and a redelivered 1st is still ok;
    the global budget counts across rules."""
    budget = Budget(count=3, per=3600)
    slots = [Slot(f"m{i}", "budgeted", "", None, budget) for i in range(5)]
    assert state.take([*slots, slots[0]], ledger=nothing_in_ledger) == ["ok"] * 3 + ["budget"] * 2 + ["ok"]
    limited = GuardState(
        state.client,
        prefix=state.prefix + "g:",
        config=config(limits={"max_runs": {"count": 2, "per": "1m"}}),
    )
    others = [Slot(f"x{i}", f"rule{i}", "", None, None) for i in range(3)]
    assert limited.take(others, ledger=nothing_in_ledger) == ["ok", "ok", "budget_global"]


def test_state_lost_is_rebuilt_from_the_ledger_before_deciding(state: GuardState) -> None:
    """Redis emptied: the next decision rebuilds cooldowns and budgets from the ledger's slots,
    so a group still cooling down stays refused."""
    held = [TakenSlot("holder", "cooled", "g", utcnow() - timedelta(minutes=5))]
    state.client.flushdb()
    asked: list[datetime] = []

    def ledger(since: datetime) -> LedgerCopy:
        asked.append(since)
        return LedgerCopy(held)

    assert state.take([slot("newcomer")], ledger=ledger) == ["cooldown"]
    assert state.take([slot("holder")], ledger=ledger) == ["ok"]  # a redelivery of the holder
    assert len(asked) == 1 and utcnow() - asked[0] > timedelta(minutes=59)  # the longest window, 1h
    expired = [TakenSlot("old", "cooled", "h", utcnow() - timedelta(minutes=20))]
    state.client.flushdb()
    assert state.take([slot("new", group="h")], ledger=lambda _since: LedgerCopy(expired)) == ["ok"]


def test_a_rebuild_in_progress_elsewhere_is_waited_for(state: GuardState) -> None:
    """Two workers find the state missing at once: the one not rebuilding waits for the other
    instead of refusing its run."""
    state.client.set(state.key("rebuild"), "another worker", px=30_000)
    threading.Timer(0.2, lambda: state.client.set(state.key("ready"), 1)).start()
    assert state.take([slot("a")], ledger=nothing_in_ledger) == ["ok"]


def test_unreachable_state_is_unavailable_and_refuses_destructive_runs() -> None:
    """No Redis: every slot is unavailable; a destructive run is refused, a non-destructive one
    follows the policy."""
    dead = GuardState(
        redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5), prefix="x:", config=config()
    )
    assert dead.take([slot("a")], ledger=nothing_in_ledger) == ["unavailable"]
    base: dict[str, Any] = {"trigger": "alert", "mode": "enforce", "slot": "unavailable"}
    assert decide(**base) == ("skipped", "guard_state_unavailable")
    assert decide(**base, destructive=False) == ("queued", None)
    assert decide(**base, destructive=False, unguarded="skip") == ("skipped", "guard_state_unavailable")


def test_group_keys_hash_the_group_labels() -> None:
    """Only the group_by labels count, and label values never shape the key."""
    rule = config().rule("cooled")
    assert rule is not None
    a = group_key(rule, {"instance": "h1", "job": "x"})
    assert a == group_key(rule, {"instance": "h1", "job": "y"}) != group_key(rule, {"instance": "h2"})
    assert len(a) == 32 and "h1" not in a


def _handle(
    url: str, cfg: ResponderConfig, guards: GuardState | None, payload: dict[str, Any]
) -> RecordingPublisher:
    p = WebhookPayload.model_validate(payload)
    with transaction(url) as session:
        event_id = repository.record_events(session, p.alerts, receiver="r", group_key="g")[0].event_id
    settings = Settings(database_url=url)
    publisher = RecordingPublisher(settings)
    handle_events(event_ids=[event_id], settings=settings, config=cfg, publisher=publisher, guards=guards)
    return publisher


def _runs(url: str) -> list[Run]:
    with transaction(url) as session:
        runs = list(session.scalars(select(Run).order_by(Run.created_at)))
        session.expunge_all()
        return runs


def test_budget_of_3_with_10_alerts_runs_3_skips_7_and_escalates_once(
    ledger_url: str, state: GuardState
) -> None:
    """10 matching alerts against max_runs 3/1h: 3 queued (holding slots in the ledger), 7
    skipped with reason budget, one escalation linked to the first refused run."""
    published = [
        _handle(ledger_url, state.config, state, alert_payload("Budgeted", instance=f"b{i}"))
        for i in range(10)
    ]
    runs = _runs(ledger_url)
    alert_runs = [r for r in runs if r.trigger == "alert"]
    assert [r.status for r in alert_runs].count("queued") == 3
    assert sorted({(r.status, r.skip_reason) for r in alert_runs if r.status != "queued"}) == [
        ("skipped", "budget")
    ]
    assert all(r.slot_at is not None and r.guard_key == "" for r in alert_runs if r.status == "queued")
    assert all(r.slot_at is None for r in alert_runs if r.status == "skipped")
    (escalation,) = [r for r in runs if r.trigger == "escalation"]
    first_refused = next(r for r in alert_runs if r.status == "skipped")
    assert escalation.parent_run_id == first_refused.id and escalation.status == "queued"
    assert escalation.params["json"]["text"] == (
        f"rule budgeted: budget of 3 runs per 3600s reached (Budgeted, run {first_refused.id})"
    )
    assert sum(len(p.runs) for p in published) == 4  # 3 remediations and the escalation


def test_a_batch_deciding_while_the_state_is_rebuilt_keeps_the_budget(
    ledger_url: str, state: GuardState
) -> None:
    """One webhook of 5 matching alerts is the first decision after Redis lost its memory: the
    rebuild must not read the batch's own uncommitted runs back as slots already held (each
    would then find "its own" slot): 3 queued, 2 skipped (budget)."""
    payload = alert_payload("Budgeted", instance="b0")
    for i in range(1, 5):
        payload["alerts"].append(alert_payload("Budgeted", instance=f"b{i}")["alerts"][0])
    assert not state.client.exists(state.key("ready"))
    p = WebhookPayload.model_validate(payload)
    with transaction(ledger_url) as session:
        events = repository.record_events(session, p.alerts, receiver="r", group_key="g")
    settings = Settings(database_url=ledger_url)
    handle_events(
        event_ids=[e.event_id for e in events],
        settings=settings,
        config=state.config,
        publisher=RecordingPublisher(settings),
        guards=state,
    )
    alert_runs = [(r.status, r.skip_reason) for r in _runs(ledger_url) if r.trigger == "alert"]
    assert sorted(alert_runs, key=str) == [("queued", None)] * 3 + [("skipped", "budget")] * 2


def test_escalations_have_a_budget_of_their_own(ledger_url: str, redis_server: EmbeddedRedis) -> None:
    """limits.max_escalations 1 per hour: two budgets spent, one page goes out and the second
    escalation is recorded skipped (budget); neither counts in the runs' global budget."""
    rules = [
        *RULES,
        {
            "name": "budgeted2",
            "match": ['alertname="Budgeted2"'],
            "remediation": "http_request",
            "max_runs": {"count": 1, "per": "1h"},
            "params": {"url": HOOK},
        },
    ]
    raw = make_config(rules=rules).model_dump(by_alias=True)
    cfg = ResponderConfig.model_validate(
        {**raw, "escalation": ESCALATION, "limits": {"max_escalations": {"count": 1, "per": "1h"}}}
    )
    guards = GuardState(
        redis.Redis.from_url(redis_server.url), prefix=f"test:{uuid.uuid4().hex}:", config=cfg
    )
    for name, count in (("Budgeted", 4), ("Budgeted2", 2)):
        for i in range(count):
            _handle(ledger_url, cfg, guards, alert_payload(name, instance=f"{name}-{i}"))
    escalations = [(r.status, r.skip_reason) for r in _runs(ledger_url) if r.trigger == "escalation"]
    assert escalations == [("queued", None), ("skipped", "budget")]
    assert decide(trigger="escalation", mode="enforce", slot="unavailable") == ("queued", None)


def test_cooldown_holds_across_episodes_of_one_group(ledger_url: str, state: GuardState) -> None:
    """A new episode of the same instance within the cooldown is skipped; another instance runs."""
    for instance, starts in (
        ("h1", "2026-11-23T05:00:00Z"),
        ("h1", "2026-11-23T05:01:00Z"),
        ("h2", "2026-11-23T05:01:00Z"),
    ):
        payload = alert_payload("Cooled", instance=instance)
        payload["alerts"][0]["startsAt"] = starts
        _handle(ledger_url, state.config, state, payload)
    assert [(r.status, r.skip_reason) for r in _runs(ledger_url)] == [
        ("queued", None),
        ("skipped", "cooldown"),
        ("queued", None),
    ]


def test_without_guard_state_a_destructive_run_is_refused(ledger_url: str) -> None:
    """No shared state at all: the destructive remediation is skipped (guard_state_unavailable)."""
    _handle(ledger_url, config(), None, alert_payload("Cooled", instance="h1"))
    assert [(r.status, r.skip_reason) for r in _runs(ledger_url)] == [("skipped", "guard_state_unavailable")]


def _queued_runs(url: str, state: GuardState, *instances: str) -> list[str]:
    for instance in instances:
        _handle(url, state.config, state, alert_payload("Cooled", instance=instance))
    runs = _runs(url)
    assert [run.status for run in runs] == ["queued"] * len(instances)
    return [run.id for run in runs]


@pytest.mark.parametrize("raced", [False, True], ids=["looked at first", "changed since"])
def test_the_gate_is_asked_once_and_holds_no_ledger_lock(
    ledger_url: str, state: GuardState, monkeypatch: pytest.MonkeyPatch, raced: bool
) -> None:
    """The breaker gate (Redis round trips) is asked once per delivery. On SQLite, whose writer
    is the whole database's, it is asked before the claim's write transaction, on a read: while
    Redis answers, another writer commits at once, even one touching the very run. When the run
    changed since that read so that it saw no gate due (``raced``), the claim asks it; so does
    PostgreSQL's claim always, holding only the run's row: another run's writer commits at once."""
    run_id, other_id = _queued_runs(ledger_url, state, "h1", "h2")
    sqlite_first = ledger_url.startswith("sqlite") and not raced
    # Whether a writer of the other run, then of this run, commits while the gate is asked.
    expected = [sqlite_first or not ledger_url.startswith("sqlite"), sqlite_first]
    committed: list[bool] = []
    writers: list[threading.Thread] = []
    real_gate = state.gate

    def write(run: str) -> bool:
        def touch() -> None:
            with transaction(ledger_url) as session:
                session.execute(update(Run).where(Run.id == run).values(updated_at=utcnow()))

        writer = threading.Thread(target=touch)
        writers.append(writer)
        writer.start()
        writer.join(timeout=10 if expected[run == run_id] else 1)
        return not writer.is_alive()

    def slow_gate(*args: Any, **kwargs: Any) -> Any:
        committed.extend([write(other_id), write(run_id)])
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(state, "gate", slow_gate)
    if raced:
        monkeypatch.setattr(attempts, "look", lambda *_, **__: None)
    settings = Settings(database_url=ledger_url)
    execution = runner.execute(
        run_id=run_id, task_id="t1", settings=settings, config=state.config, guards=state
    )
    for writer in writers:
        writer.join()
    # The hook does not answer: a failed attempt, to be retried; it ran, having passed the gate.
    assert execution.outcome == "retry"
    assert committed == expected
    with transaction(ledger_url) as session:
        assert session.scalars(select(Attempt.number).where(Attempt.run_id == run_id)).all() == [1]
