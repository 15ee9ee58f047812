"""The admission guards on a real ledger: pause, disabled rules, resolved, grace, on_resolved."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.helpers import RecordingPublisher, alert_payload, compat_config, make_config
from workers import dispatcher
from workers.admission import decide
from workers.alerts import WebhookPayload
from workers.config import ConfigError, ResponderConfig, parse_config
from workers.ledger import attempts, repository
from workers.ledger.db import transaction
from workers.ledger.models import Run, utcnow
from workers.ledger.states import RunStatus
from workers.planner import handle_events
from workers.settings import Settings

HOOK = "http://127.0.0.1:15101/hook/{{ labels.instance }}"
RULES: list[dict[str, Any]] = [
    {
        "name": "graceful",
        "match": ['alertname="Graceful"'],
        "remediation": "http_request",
        "for": "2m",
        "params": {"url": HOOK},
    },
    {
        "name": "off",
        "match": ['alertname="Off"'],
        "remediation": "http_request",
        "enabled": False,
        "params": {"url": HOOK},
    },
    {
        "name": "notify",
        "match": ['alertname="Notify"'],
        "remediation": "http_request",
        "params": {"url": HOOK},
        "on_resolved": {"remediation": "http_request", "params": {"url": HOOK + "/resolved"}},
    },
]
CONFIG = make_config(rules=RULES)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"error": "render: x", "paused": True}, ("failed", "invalid")),
        ({"paused": True, "enabled": False, "episode_resolved": True}, ("skipped", "paused")),
        ({"enabled": False, "episode_resolved": True, "grace_s": 5}, ("skipped", "disabled")),
        ({"episode_resolved": True, "grace_s": 5}, ("skipped", "resolved")),
        ({"episode_resolved": True, "due": True}, ("cancelled", "resolved")),
        ({"grace_s": 5, "mode": "dry_run"}, ("waiting", "grace")),
        ({"grace_s": 5, "mode": "dry_run", "due": True}, ("skipped", "dry_run")),
        ({"grace_s": 5, "due": True}, ("queued", None)),
        ({"trigger": "resolved", "episode_resolved": True}, ("queued", None)),
        ({}, ("queued", None)),
    ],
)
def test_guards_apply_in_their_documented_order(facts: dict[str, Any], expected: tuple[str, Any]) -> None:
    """The first guard that holds decides: invalid, paused, disabled, resolved, grace, dry run."""
    given: dict[str, Any] = {"trigger": "alert", "mode": "enforce", **facts}
    assert decide(**given) == expected


def test_rule_guard_keys_are_validated() -> None:
    """for, enabled and on_resolved parse with units; mistakes are reported by rule and field."""
    rule = CONFIG.rule("graceful")
    assert rule is not None and rule.grace_s == 120.0 and rule.enabled
    assert CONFIG.disabled_rules == {"off"}
    bad = compat_config(
        extra_rules=[
            {"name": "x", "match": ['a="b"'], "remediation": "http_request", "for": "2 minutes"},
            {"name": "y", "match": ['a="b"'], "remediation": "http_request", "for": "25h"},
        ]
    )
    with pytest.raises(ConfigError) as shape:
        parse_config(bad)
    assert shape.value.problems[0].startswith("rules[3] (x).for: Value error, not a duration: '2 minutes'")
    assert shape.value.problems[1].startswith("rules[4] (y).for: Input should be less than or equal to 86400")
    action = {"name": "z", "match": ['a="b"'], "remediation": "http_request", "params": {"url": HOOK}}
    for on_resolved, problem in (
        ({"remediation": "nope"}, "rules[3] (z).on_resolved.remediation: unknown remediation 'nope'"),
        ({"remediation": "http_request", "params": {"nope": 1}}, "rules[3] (z).on_resolved.params.nope:"),
        ({"remediation": "http_request", "params": {"url": "{{ x"}}, "rules[3] (z).on_resolved.params"),
    ):
        with pytest.raises(ConfigError) as semantic:
            parse_config(compat_config(extra_rules=[{**action, "on_resolved": on_resolved}]))
        assert len(semantic.value.problems) == 1 and semantic.value.problems[0].startswith(problem)


def test_cooldown_groups_and_budgets_are_validated() -> None:
    """group_by labels must be matched or declared optional, and need a cooldown; budgets and
    windows have units and ranges."""
    base: dict[str, Any] = {
        "name": "c",
        "match": ['alertname="A"', 'instance!=""'],
        "remediation": "http_request",
        "params": {"url": HOOK},
    }
    ok = parse_config(
        compat_config(
            extra_rules=[
                {**base, "cooldown": "15m", "group_by": ["instance", "job"], "group_by_optional": ["job"]},
                {**base, "name": "d", "max_runs": {"count": 3, "per": "1h"}},
            ]
        )
        | {"limits": {"max_runs": {"count": 50, "per": "1h"}}}
    )
    cooled = ok.rule("c")
    assert cooled is not None and cooled.cooldown_s == 900.0 and ok.limits.max_runs is not None
    for extra, problem in (
        (
            {"cooldown": "15m", "group_by": ["job"]},
            "rules[3] (c).group_by: label 'job' is not named by any matcher",
        ),
        ({"group_by": ["instance"]}, "rules[3] (c).group_by: needs a cooldown"),
        (
            {"cooldown": "15m", "group_by_optional": ["job"]},
            "rules[3] (c).group_by_optional: label 'job' is not in",
        ),
        (
            {"max_runs": {"count": 0, "per": "1h"}},
            "rules[3] (c).max_runs.count: Input should be greater than",
        ),
        ({"max_runs": {"count": 3, "per": "169h"}}, "rules[3] (c).max_runs.per: Input should be less than"),
        ({"cooldown": "soon"}, "rules[3] (c).cooldown: Value error, not a duration"),
        ({"group_by": ["in-stance"], "cooldown": "1m"}, "rules[3] (c).group_by[0]: String should match"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(compat_config(extra_rules=[{**base, **extra}]))
        assert caught.value.problems[0].startswith(problem), caught.value.problems


def test_breaker_settings_come_from_the_rule_the_remediation_or_the_default() -> None:
    """A rule's breaker wins, then the remediation's, then the top-level default."""
    raw = compat_config(
        extra_rules=[
            {
                "name": "own",
                "match": ['a="b"'],
                "remediation": "http_request",
                "breaker": {"failures": 5, "cool_down": "1m"},
                "params": {"url": HOOK},
            }
        ]
    )
    config = parse_config(
        raw
        | {
            "breaker": {"failures": 4, "cool_down": "20m"},
            "remediations": {"run_command": {"breaker": {"failures": 2, "cool_down": "30m"}}},
        }
    )
    assert config.breaker_of("own", "http_request").failures == 5
    assert config.breaker_of("probe-command", "run_command").cool_down_s == 1800.0
    assert config.breaker_of("probe-http", "http_request").failures == 4
    assert parse_config(compat_config()).breaker_of(None, "http_request").cool_down_s == 600.0
    with pytest.raises(ConfigError) as caught:
        parse_config(raw | {"remediations": {"restart_everything": {}}})
    assert caught.value.problems[0].startswith("remediations.restart_everything: unknown remediation")


def _handle(url: str, config: ResponderConfig, payload: dict[str, Any]) -> list[str]:
    p = WebhookPayload.model_validate(payload)
    with transaction(url) as session:
        event_id = repository.record_events(session, p.alerts, receiver="r", group_key="g")[0].event_id
    settings = Settings(database_url=url)
    return handle_events(
        event_ids=[event_id], settings=settings, config=config, publisher=RecordingPublisher(settings)
    )


def _runs(url: str) -> list[Run]:
    with transaction(url) as session:
        runs = list(session.scalars(select(Run).order_by(Run.created_at, Run.trigger)))
        session.expunge_all()
        return runs


def _release(url: str, config: ResponderConfig = CONFIG) -> tuple[dispatcher.Released, RecordingPublisher]:
    settings = Settings(database_url=url)
    publisher = RecordingPublisher(settings)
    return dispatcher.release_due(settings=settings, config=config, publisher=publisher), publisher


def _make_due(url: str) -> None:
    with transaction(url) as session:
        session.execute(update(Run).values(not_before=utcnow() - timedelta(seconds=1)))


def test_grace_waits_in_the_ledger_and_is_released_once(ledger_url: str) -> None:
    """for: 2m records a waiting run due in 2 minutes; nothing is published until then, and
    once due it is queued and published exactly once, however many passes run."""
    before = utcnow()
    assert _handle(ledger_url, CONFIG, alert_payload("Graceful", instance="a")) == []
    (run,) = _runs(ledger_url)
    assert run.status == "waiting" and run.not_before is not None and run.finished_at is None
    assert timedelta(seconds=119) < run.not_before - before < timedelta(seconds=125)
    assert _release(ledger_url)[0] == dispatcher.Released()
    _make_due(ledger_url)
    released, publisher = _release(ledger_url)
    assert released == dispatcher.Released(queued=1) and [r[0] for r in publisher.runs] == [run.id]
    assert _release(ledger_url)[0] == dispatcher.Released()
    (after,) = _runs(ledger_url)
    assert after.status == "queued" and after.publishes == 1 and after.enqueued_at is not None


def test_resolved_during_grace_cancels_the_waiting_run(ledger_url: str) -> None:
    """The alert resolves before the period ends: its waiting run ends cancelled, never released."""
    _handle(ledger_url, CONFIG, alert_payload("Graceful", instance="a"))
    _handle(ledger_url, CONFIG, alert_payload("Graceful", status="resolved", instance="a"))
    (run,) = _runs(ledger_url)
    assert (run.status, run.skip_reason) == ("cancelled", "resolved") and run.finished_at is not None
    _make_due(ledger_url)
    assert _release(ledger_url)[0] == dispatcher.Released()


def test_due_run_whose_resolved_event_is_not_handled_yet_is_cancelled(ledger_url: str) -> None:
    """The dispatcher itself looks for a recorded resolved event of the episode."""
    _handle(ledger_url, CONFIG, alert_payload("Graceful", instance="a"))
    p = WebhookPayload.model_validate(alert_payload("Graceful", status="resolved", instance="a"))
    with transaction(ledger_url) as session:
        repository.record_events(session, p.alerts, receiver="r", group_key="g")
    _make_due(ledger_url)
    assert _release(ledger_url)[0] == dispatcher.Released(refused=1)
    assert [(r.status, r.skip_reason) for r in _runs(ledger_url)] == [("cancelled", "resolved")]


def test_pause_skips_new_runs_stops_queued_ones_and_resume_replays_nothing(ledger_url: str) -> None:
    """While paused: new runs skipped (paused), a queued run is not started, a due waiting run is
    skipped. After resume, new alerts run; what was skipped stays skipped."""
    _handle(ledger_url, CONFIG, alert_payload("ResponderProbe", instance="queued-before"))
    _handle(ledger_url, CONFIG, alert_payload("Graceful", instance="waiting-before"))
    with transaction(ledger_url) as session:
        repository.set_pause(session, paused=True, actor="alice", reason="db migration")
    assert _handle(ledger_url, CONFIG, alert_payload("ResponderProbe", instance="during")) == []
    queued = next(r for r in _runs(ledger_url) if r.status == "queued")
    with transaction(ledger_url) as session:
        claim = attempts.claim_run(
            session, run_id=queued.id, task_id="t", worker="w", max_attempts=3, lease_s=30
        )
    assert claim.kind == "paused"
    _make_due(ledger_url)
    assert _release(ledger_url)[0] == dispatcher.Released(refused=1)
    with transaction(ledger_url) as session:
        state = repository.set_pause(session, paused=False, actor="alice", reason="done")
        assert [h.paused for h in repository.pause_history(session, limit=5)] == [False, True]
    assert not state.paused and state.actor == "alice"
    assert len(_handle(ledger_url, CONFIG, alert_payload("ResponderProbe", instance="after"))) == 1
    assert _release(ledger_url)[0] == dispatcher.Released()
    statuses = sorted((r.status, r.skip_reason or "") for r in _runs(ledger_url))
    assert statuses == [("queued", ""), ("skipped", "paused"), ("skipped", "paused"), ("skipped", "paused")]


def test_disabled_rule_is_recorded_skipped_and_not_claimed(ledger_url: str) -> None:
    """enabled: false records the decision; a run queued before the rule was disabled does not start."""
    _handle(ledger_url, CONFIG, alert_payload("Off", instance="a"))
    assert [(r.status, r.skip_reason) for r in _runs(ledger_url)] == [("skipped", "disabled")]
    (run_id,) = _handle(ledger_url, CONFIG, alert_payload("ResponderProbe", instance="b"))
    with transaction(ledger_url) as session:
        claim = attempts.claim_run(
            session,
            run_id=run_id,
            task_id="t",
            worker="w",
            max_attempts=3,
            lease_s=30,
            disabled_rules=frozenset({"probe-http"}),
        )
        assert claim.kind == "disabled"
        run = session.get(Run, run_id)
        assert run is not None and (run.status, run.skip_reason) == ("skipped", "disabled")


def test_resolved_cancels_pending_firing_runs_and_runs_on_resolved(ledger_url: str) -> None:
    """A resolved event cancels its episode's queued firing run and admits the rule's
    on_resolved action once (trigger resolved), which the resolved guard does not stop."""
    (firing,) = _handle(ledger_url, CONFIG, alert_payload("Notify", instance="a"))
    (action,) = _handle(ledger_url, CONFIG, alert_payload("Notify", status="resolved", instance="a"))
    assert _handle(ledger_url, CONFIG, alert_payload("Notify", status="resolved", instance="a")) == []
    runs = {r.id: r for r in _runs(ledger_url)}
    assert (runs[firing].status, runs[firing].skip_reason) == ("cancelled", "resolved")
    assert (runs[action].trigger, runs[action].status) == ("resolved", "queued")
    assert runs[action].params["url"].endswith("/hook/a/resolved")
    with transaction(ledger_url) as session:
        claim = attempts.claim_run(
            session, run_id=action, task_id="t", worker="w", max_attempts=3, lease_s=30
        )
    assert claim.kind == "run"
    assert RunStatus(runs[action].status) == RunStatus.QUEUED
