"""handle_alert's planning: rendered, validated, preflighted runs; dry runs; resolved events."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from sqlalchemy import select

from tests.helpers import RecordingPublisher, alert_of, alert_payload, make_config
from workers import planner
from workers.alerts import WebhookPayload
from workers.dev import EmbeddedRedis
from workers.ledger import db, repository
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent, Run
from workers.planner import handle_events, plan_rule
from workers.reconciler import Reconciled, reconcile
from workers.settings import Settings

CONFIG = make_config()


def plan(rule: str, **labels: str) -> object:
    alertname = {
        "probe-http": "ResponderProbe",
        "probe-command": "ResponderCommand",
        "probe-dry": "ResponderDry",
    }[rule]
    found = CONFIG.rule(rule)
    assert found is not None
    return plan_rule(found, alert_of(alert_payload(alertname, **labels)), CONFIG)


def test_http_rule_renders_and_queues() -> None:
    """The probe rule renders its URL and JSON body from labels and is queued."""
    p = plan("probe-http", instance="host1:9100")
    assert p.status == "queued"  # type: ignore[attr-defined]
    assert p.params["url"] == "http://127.0.0.1:15101/hook/host1:9100"  # type: ignore[attr-defined]
    assert p.params["json"] == {"alert": "ResponderProbe", "instance": "host1:9100"}  # type: ignore[attr-defined]
    assert p.timeout_s == 10.0  # type: ignore[attr-defined]


def test_dry_run_is_skipped_with_checked_params() -> None:
    """A dry-run rule records rendered, validated, allowlist-checked params and runs nothing."""
    p = plan("probe-dry")
    assert (p.status, p.skip_reason) == ("skipped", "dry_run")  # type: ignore[attr-defined]
    assert p.preflight == {"url": "http://127.0.0.1:15101/dry", "method": "POST"}  # type: ignore[attr-defined]


def test_command_rule_preflight_shows_argv() -> None:
    """A command rule's plan shows the exact argv it would run."""
    assert plan("probe-command", instance="h1").preflight == {"argv": ["/bin/echo", "restarting", "h1"]}  # type: ignore[attr-defined]


def test_render_validation_and_refusal_errors_are_failed_plans() -> None:
    """Missing labels, invalid params and refused URLs give failed plans that say why."""
    missing = make_config(
        rules=[
            {
                "name": "m",
                "match": ['alertname="M"'],
                "remediation": "http_request",
                "params": {"url": "http://127.0.0.1:1/{{ labels.nope }}"},
            }
        ]
    )
    rule = missing.rule("m")
    assert rule is not None
    failed = plan_rule(rule, alert_of(alert_payload("M")), missing)
    assert failed.status == "failed" and failed.error and failed.error.startswith("render:")
    invalid = make_config(
        rules=[
            {
                "name": "v",
                "match": ['alertname="V"'],
                "remediation": "http_request",
                "params": {"url": "http://127.0.0.1:1/", "timeout": "{{ labels.job }}"},
            }
        ]
    )
    rule = invalid.rule("v")
    assert rule is not None
    failed = plan_rule(rule, alert_of(alert_payload("V")), invalid)
    assert failed.status == "failed" and "params.timeout" in (failed.error or "")
    hostile = make_config(
        rules=[
            {
                "name": "h",
                "match": ['alertname="H"'],
                "remediation": "http_request",
                "params": {"url": "http://{{ labels.instance }}/x"},
            }
        ]
    )
    rule = hostile.rule("h")
    assert rule is not None
    for instance in ("127.0.0.1:1@evil", "evil#", "evil.example"):
        refused = plan_rule(rule, alert_of(alert_payload("H", instance=instance)), hostile)
        assert refused.status == "failed" and (refused.error or "").startswith("refused:")


def _record(url: str, raw: dict[str, object]) -> str:
    p = WebhookPayload.model_validate(raw)
    with transaction(url) as session:
        return repository.record_events(session, p.alerts, receiver="r", group_key="g")[0].event_id


def test_handle_event_creates_runs_once(sqlite_url: str) -> None:
    """A firing event plans one run per matching rule, once however often it is handled."""
    settings = Settings(database_url=sqlite_url)
    publisher = RecordingPublisher(settings)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe"))
    created = handle_events(event_ids=[event_id], settings=settings, config=CONFIG, publisher=publisher)
    assert len(created) == 1 and [r[0] for r in publisher.runs] == created
    assert handle_events(event_ids=[event_id], settings=settings, config=CONFIG, publisher=publisher) == []
    with transaction(sqlite_url) as session:
        runs = session.scalars(select(Run)).all()
        event = session.get(AlertEvent, event_id)
        assert [r.status for r in runs] == ["queued"] and runs[0].enqueued_at is not None
        assert event is not None and event.handled_at is not None and event.matched_rules == 1


def test_resolved_event_creates_no_run(sqlite_url: str) -> None:
    """A resolved event is marked handled with its match count and runs nothing."""
    settings = Settings(database_url=sqlite_url)
    publisher = RecordingPublisher(settings)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe", status="resolved"))
    assert handle_events(event_ids=[event_id], settings=settings, config=CONFIG, publisher=publisher) == []
    with transaction(sqlite_url) as session:
        event = session.get(AlertEvent, event_id)
        assert event is not None and event.matched_rules == 1 and event.handled_at is not None
        assert session.scalars(select(Run)).all() == []
    assert publisher.runs == []


def test_unpublished_runs_and_events_are_reconciled(sqlite_url: str) -> None:
    """What the broker did not take is published by the reconciler later, once."""
    settings = Settings(database_url=sqlite_url, reconcile_after_s=0)
    down = RecordingPublisher(settings, fail=True)
    handled = _record(sqlite_url, alert_payload("ResponderProbe"))
    handle_events(event_ids=[handled], settings=settings, config=CONFIG, publisher=down)
    unhandled = _record(sqlite_url, alert_payload("ResponderProbe", instance="other"))
    with transaction(sqlite_url) as session:
        assert session.scalars(select(Run.enqueued_at)).all() == [None]
    up = RecordingPublisher(settings)
    done = reconcile(settings=settings, publisher=up)
    assert (done.events, done.runs) == (1, 1)
    assert up.alerts == [unhandled] and len(up.runs) == 1
    assert reconcile(settings=settings, publisher=up) == type(done)(events=0, runs=0)


def test_time_limits_follow_the_run_timeout() -> None:
    """Each run_remediation message carries soft < hard limits derived from the run's timeout."""
    from workers.celery_app import create_celery_app
    from workers.publishing import Publisher

    for margin in (2.0, 15.0):
        settings = Settings(hard_limit_margin_s=margin)
        message = Publisher(create_celery_app(settings), settings).run_remediation("r1", timeout_s=6.0)
        assert 6 < message.soft_time_limit < message.time_limit == 6 + margin
        assert message.args == ("r1",)  # ids only


def test_a_warmed_up_publisher_declares_nothing_on_its_first_publish(redis_server: EmbeddedRedis) -> None:
    """What a process's first publish would pay once (the queues' declarations) is paid by
    ``warm_up``, before the first alert: that publish sends its messages and nothing else."""
    import redis

    from workers.celery_app import create_celery_app
    from workers.publishing import Publisher

    settings = Settings(redis_url=redis_server.url)
    publisher = Publisher(create_celery_app(settings), settings)
    publisher.warm_up()
    client = redis.Redis.from_url(redis_server.url)
    client.config_resetstat()
    publisher.publish([publisher.run_remediation("r1", timeout_s=5.0), publisher.handle_alert(["e1"])])
    used = {name.removeprefix("cmdstat_") for name in client.info("commandstats")}
    assert "lpush" in used
    assert not used & {"sadd", "llen", "smembers"}, used  # a declaration's binding and size
    client.close()


def test_one_bad_rule_does_not_drop_the_others(sqlite_url: str) -> None:
    """A template raising TypeError or running away fails its own rule; the alert's others run."""
    rules = [
        {
            "name": f"bad-{i}",
            "match": ['alertname="ResponderProbe"'],
            "remediation": "http_request",
            "params": {"url": "http://127.0.0.1:1/" + template},
        }
        for i, template in enumerate(
            [
                "{{ '%d' | format(labels.instance) }}",  # TypeError
                "{{ 'a' * 10**9 }}",  # repetition bound
                "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
                "{{ labels.instance | indent(30000) }}",
            ]
        )
    ]
    config = make_config(rules=rules)
    settings = Settings(database_url=sqlite_url)
    publisher = RecordingPublisher(settings)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe", instance="web-1"))
    created = handle_events(event_ids=[event_id], settings=settings, config=config, publisher=publisher)
    with transaction(sqlite_url) as session:
        runs = {r.rule: r for r in session.scalars(select(Run))}
        event = session.get(AlertEvent, event_id)
    assert event is not None and event.handled_at is not None and event.matched_rules == 5
    assert runs["probe-http"].status == "queued" and created == [runs["probe-http"].id]
    errors = {name: runs[name].error or "" for name in ("bad-0", "bad-1", "bad-2", "bad-3")}
    assert all(runs[name].status == "failed" for name in errors)
    assert "TypeError" in errors["bad-0"]
    assert "too large" in errors["bad-1"] and "longer than" in errors["bad-2"]
    assert "30000" in errors["bad-3"]


def test_target_is_declared_or_overridden_by_the_rule() -> None:
    """The remediation declares its target (the URL without query); a rule may name its own."""
    p = plan("probe-http", instance="web-1")
    assert p.target == "http://127.0.0.1:15101/hook/web-1"  # type: ignore[attr-defined]
    config = make_config(
        rules=[
            {
                "name": "t",
                "match": ['alertname="T"'],
                "remediation": "run_command",
                "target": "{{ labels.instance }}",
                "params": {"command": "record_instance"},
            }
        ]
    )
    rule = config.rule("t")
    assert rule is not None
    assert plan_rule(rule, alert_of(alert_payload("T", instance="db-9")), config).target == "db-9"
    assert plan("probe-command", instance="h1").target == "record_instance"  # type: ignore[attr-defined]


def test_poison_event_is_given_up_with_its_error(sqlite_url: str) -> None:
    """An event whose handling keeps dying is recorded as given up after the maximum deliveries."""
    settings = Settings(database_url=sqlite_url, max_deliveries=2)
    publisher = RecordingPublisher(settings)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe"))
    with transaction(sqlite_url) as session:  # two starts that crashed before finishing
        repository.note_event_deliveries(session, [event_id])
        repository.note_event_deliveries(session, [event_id])
        repository.note_event_error(session, event_id, error="KeyError: boom")
    assert handle_events(event_ids=[event_id], settings=settings, config=CONFIG, publisher=publisher) == []
    with transaction(sqlite_url) as session:
        event = session.get(AlertEvent, event_id)
        assert event is not None and event.handled_at is not None
        assert "gave up after 2 deliveries" in (event.error or "")
        assert session.scalars(select(Run)).all() == []


def _deliveries(url: str, event_id: str) -> tuple[int, bool]:
    with transaction(url) as session:
        event = session.get(AlertEvent, event_id)
        assert event is not None
        return event.deliveries, event.handled_at is not None


def test_a_first_delivery_counts_its_start_with_its_outcome(sqlite_url: str) -> None:
    """The receiver's message, delivered for the first time, writes nothing before it plans: its
    start is counted in the transaction that admits the runs. A redelivery counts first."""
    settings = Settings(database_url=sqlite_url)
    publisher = RecordingPublisher(settings)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe"))
    with transaction(sqlite_url) as session:
        repository.mark_enqueued(session, AlertEvent, [event_id])  # as the receiver records it
    created = handle_events(
        event_ids=[event_id], settings=settings, config=CONFIG, publisher=publisher, first_delivery=True
    )
    assert len(created) == 1
    assert _deliveries(sqlite_url, event_id) == (1, True)
    again = handle_events(event_ids=[event_id], settings=settings, config=CONFIG, publisher=publisher)
    assert again == [] and _deliveries(sqlite_url, event_id) == (1, True)


class _Crash(BaseException):
    """The process dying in the middle of planning (nothing after it runs)."""


def test_a_poison_event_is_given_up_even_when_its_first_start_was_not_counted(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first delivery that dies while planning leaves no count; its redeliveries count before
    they plan, so the event is given up after RESPONDER_MAX_DELIVERIES counted starts and the
    first. A message the reconciler re-sent (published twice) is counted before it plans even
    when the broker delivers it for the first time."""
    settings = Settings(database_url=sqlite_url, max_deliveries=2)
    publisher = RecordingPublisher(settings)
    starts: list[str] = []

    def crash(event: AlertEvent, *_: object) -> None:
        starts.append(event.id)
        raise _Crash

    monkeypatch.setattr(planner, "_plan_event", crash)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe"))
    with transaction(sqlite_url) as session:
        repository.mark_enqueued(session, AlertEvent, [event_id])
    deliveries = [True, False, False, False]  # the first delivery, then the broker's redeliveries
    for first in deliveries:
        with contextlib.suppress(_Crash):
            handle_events(
                event_ids=[event_id],
                settings=settings,
                config=CONFIG,
                publisher=publisher,
                first_delivery=first,
            )
        if first:
            assert _deliveries(sqlite_url, event_id) == (0, False)
    assert len(starts) == 3
    with transaction(sqlite_url) as session:
        event = session.get(AlertEvent, event_id)
        assert event is not None and event.handled_at is not None
        assert "gave up after 2 deliveries" in (event.error or "")

    resent = _record(sqlite_url, alert_payload("ResponderProbe", instance="resent"))
    with transaction(sqlite_url) as session:
        repository.mark_enqueued(session, AlertEvent, [resent])
        repository.mark_enqueued(session, AlertEvent, [resent])  # the reconciler sent it again
    with contextlib.suppress(_Crash):
        handle_events(
            event_ids=[resent], settings=settings, config=CONFIG, publisher=publisher, first_delivery=True
        )
    assert _deliveries(sqlite_url, resent) == (1, False)


def test_unhandled_event_is_redelivered_with_backoff(sqlite_url: str) -> None:
    """An event published but never handled is published again, less often each time."""
    from datetime import timedelta

    from workers.ledger.models import utcnow

    settings = Settings(database_url=sqlite_url, reconcile_after_s=0, redeliver_after_s=60)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe"))
    with transaction(sqlite_url) as session:
        repository.mark_enqueued(session, AlertEvent, [event_id])  # published; the message was lost
    publisher = RecordingPublisher(settings)
    assert reconcile(settings=settings, publisher=publisher).events == 0  # not due yet
    with transaction(sqlite_url) as session:
        event = session.get(AlertEvent, event_id)
        assert event is not None
        event.enqueued_at = utcnow() - timedelta(seconds=61)
    assert reconcile(settings=settings, publisher=publisher).events == 1
    with transaction(sqlite_url) as session:
        event = session.get(AlertEvent, event_id)
        assert event is not None and event.publishes == 2
        event.enqueued_at = utcnow() - timedelta(seconds=61)  # second wait is 120 s
    assert reconcile(settings=settings, publisher=publisher).events == 0
    assert publisher.alerts == [event_id]


def test_a_reconcile_pass_with_nothing_due_takes_no_write_lock(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler finds what is due with reads: with a handled event and a run just
    published, a pass completes while another connection holds SQLite's write lock."""
    monkeypatch.setattr(db, "_lock_timeout_s", 1.0)
    settings = Settings(database_url=sqlite_url, reconcile_after_s=0)
    publisher = RecordingPublisher(settings)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe"))
    assert (
        len(handle_events(event_ids=[event_id], settings=settings, config=CONFIG, publisher=publisher)) == 1
    )
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert reconcile(settings=settings, publisher=publisher) == Reconciled(events=0, runs=0)
    finally:
        holder.rollback()
        holder.close()


def test_never_claimed_run_fails_after_max_deliveries(sqlite_url: str) -> None:
    """A run whose messages never get it started is failed with the reason, not re-sent forever."""
    from datetime import timedelta

    from workers.ledger.models import utcnow

    settings = Settings(database_url=sqlite_url, reconcile_after_s=0, max_deliveries=2)
    event_id = _record(sqlite_url, alert_payload("ResponderProbe"))
    handle_events(
        event_ids=[event_id], settings=settings, config=CONFIG, publisher=RecordingPublisher(settings)
    )
    with transaction(sqlite_url) as session:
        run = session.scalars(select(Run)).one()
        run.publishes = 2
        run.enqueued_at = utcnow() - timedelta(days=1)
        run_id = run.id
    done = reconcile(settings=settings, publisher=RecordingPublisher(settings))
    assert (done.runs, done.given_up) == (0, 1)
    with transaction(sqlite_url) as session:
        failed = session.get(Run, run_id)
        assert failed is not None and failed.status == "failed" and "never started" in (failed.error or "")
