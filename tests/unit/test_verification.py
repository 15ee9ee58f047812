"""Did it work? Repeats while an episode stays unresolved, then ineffective, escalated once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from tests.helpers import RecordingPublisher, alert_payload, compat_config
from workers.alerts import WebhookPayload
from workers.config import parse_config
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import Run, utcnow
from workers.planner import handle_events
from workers.settings import Settings
from workers.verification import verify_delay, verify_due

HOOK = "http://127.0.0.1:15101/fix/{{ labels.instance }}"
CONFIG = parse_config(
    compat_config(
        extra_rules=[
            {
                "name": "fixer",
                "match": ['alertname="Broken"'],
                "remediation": "http_request",
                "repeat": {"after": "1m", "max": 1},
                "verify_within": "5m",
                "params": {"url": HOOK},
            }
        ]
    )
    | {"escalation": {"remediation": "http_request", "params": {"url": "http://127.0.0.1:15101/page"}}}
)


def record(url: str, payload: dict[str, Any]) -> None:
    p = WebhookPayload.model_validate(payload)
    with transaction(url) as session:
        event_id = repository.record_events(session, p.alerts, receiver="r", group_key="g")[0].event_id
    settings = Settings(database_url=url)
    handle_events(
        event_ids=[event_id], settings=settings, config=CONFIG, publisher=RecordingPublisher(settings)
    )


def succeed_and_make_due(url: str) -> None:
    """What the runner does on success (verify_at), with the time already come."""
    with transaction(url) as session:
        session.execute(
            update(Run)
            .where(Run.status == "queued", Run.trigger == "alert")
            .values(status="succeeded", finished_at=utcnow(), verify_at=utcnow() - timedelta(seconds=1))
        )


def verify(url: str) -> list[tuple[str, float]]:
    with transaction(url) as session:
        return verify_due(session, now=utcnow(), config=CONFIG, guards=None)


def runs(url: str) -> list[Run]:
    with transaction(url) as session:
        found = list(session.scalars(select(Run).order_by(Run.created_at, Run.repeat)))
        session.expunge_all()
        return found


def test_the_delay_follows_repeat_then_verify_within() -> None:
    """The first success is looked at after repeat.after; the last repeat after verify_within."""
    assert verify_delay(CONFIG, rule="fixer", trigger="alert", repeat=0) == 60.0
    assert verify_delay(CONFIG, rule="fixer", trigger="alert", repeat=1) == 300.0
    assert verify_delay(CONFIG, rule="fixer", trigger="resolved", repeat=0) is None
    assert verify_delay(CONFIG, rule="probe-http", trigger="alert", repeat=0) is None


def test_still_firing_repeats_then_is_ineffective_and_escalated_once(ledger_url: str) -> None:
    """Unresolved after the first success: one repeat (a new run, dedupe key ...:repeat:1);
    unresolved after that too: ineffective, one escalation; later passes change nothing."""
    record(ledger_url, alert_payload("Broken", instance="db1"))
    succeed_and_make_due(ledger_url)
    assert len(verify(ledger_url)) == 1
    first, again = runs(ledger_url)
    assert (again.repeat, again.status, again.trigger) == (1, "queued", "alert")
    assert again.dedupe_key.endswith(":fixer:repeat:1") and first.verify_at is None
    assert verify(ledger_url) == []
    succeed_and_make_due(ledger_url)
    assert len(verify(ledger_url)) == 1  # the escalation
    after = runs(ledger_url)
    assert [(r.trigger, r.repeat, r.verdict) for r in after] == [
        ("alert", 0, None),
        ("alert", 1, "ineffective"),
        ("escalation", 0, None),
    ]
    assert after[2].parent_run_id == after[1].id and after[2].params["url"].endswith("/page")
    assert verify(ledger_url) == [] and len(runs(ledger_url)) == 3


def test_resolved_episode_is_effective(ledger_url: str) -> None:
    """The alert resolved before the verification: effective, no repeat, no escalation."""
    record(ledger_url, alert_payload("Broken", instance="db2"))
    succeed_and_make_due(ledger_url)
    record(ledger_url, alert_payload("Broken", status="resolved", instance="db2"))
    assert verify(ledger_url) == []
    assert [(r.verdict, r.verify_at) for r in runs(ledger_url)] == [("effective", None)]


def test_a_new_episode_before_the_verification_makes_it_ineffective(ledger_url: str) -> None:
    """The alert resolved and fired again (a new startsAt) within the window: ineffective at
    once, though the verification was not due yet."""
    record(ledger_url, alert_payload("Broken", instance="db3"))
    with transaction(ledger_url) as session:
        session.execute(
            update(Run).values(
                status="succeeded", finished_at=utcnow(), verify_at=utcnow() + timedelta(minutes=1)
            )
        )
    record(ledger_url, alert_payload("Broken", status="resolved", instance="db3"))
    again = alert_payload("Broken", instance="db3")
    again["alerts"][0]["startsAt"] = "2026-11-23T06:00:00Z"
    record(ledger_url, again)
    assert len(verify(ledger_url)) == 1  # the escalation
    verdicts = [(r.trigger, r.starts_at, r.verdict) for r in runs(ledger_url)]
    assert verdicts[0][2] == "ineffective" and verdicts[-1][0] == "escalation"
