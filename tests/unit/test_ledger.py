"""The ledger on SQLite and PostgreSQL: dedupe, exact timestamps, attempts, migrations."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from tests.helpers import FIXTURES
from workers.alerts import WebhookPayload
from workers.ledger import repository
from workers.ledger.db import get_engine, transaction
from workers.ledger.models import AlertEvent, Base, Run, utcnow


def payload(name: str = "single_firing.json") -> WebhookPayload:
    return WebhookPayload.model_validate_json((FIXTURES / name).read_bytes())


def record(url: str, p: WebhookPayload) -> list[repository.RecordedEvent]:
    with transaction(url) as session:
        return repository.record_events(session, p.alerts, receiver=p.receiver, group_key=p.group_key)


def test_migrations_match_the_models(ledger_url: str) -> None:
    """The Alembic head creates exactly the schema the models describe."""
    with get_engine(ledger_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_repeat_and_retry_are_duplicates(ledger_url: str) -> None:
    """The same alert twice is accepted once; the second answer points at the same event."""
    first = record(ledger_url, payload())
    second = record(ledger_url, payload("single_repeat_annotation_changed.json"))
    assert [r.accepted for r in first] == [True]
    assert [r.accepted for r in second] == [False]
    assert second[0].event_id == first[0].event_id


def test_resolved_is_a_new_event_of_the_same_episode(ledger_url: str) -> None:
    """Firing and resolved are two events of one episode."""
    firing = record(ledger_url, payload())[0]
    resolved = record(ledger_url, payload("single_resolved.json"))[0]
    assert resolved.accepted and resolved.event_id != firing.event_id


def test_same_instant_in_other_precision_is_the_same_episode(ledger_url: str) -> None:
    """startsAt written with another precision or offset dedupes against the stored one."""
    raw = json.loads((FIXTURES / "single_firing.json").read_bytes())
    record(ledger_url, WebhookPayload.model_validate(raw))
    raw["alerts"][0]["startsAt"] = "2026-11-23T06:02:19.803814981+01:00"
    again = record(ledger_url, WebhookPayload.model_validate(raw))
    assert again[0].accepted is False
    with transaction(ledger_url) as session:
        stored = session.scalars(select(AlertEvent.starts_at)).all()
    assert stored == ["2026-11-23T05:02:19.803814981Z"]


def test_duplicates_inside_one_body(ledger_url: str) -> None:
    """The same alert twice in one notification is accepted once."""
    p = payload()
    doubled = p.model_copy(update={"alerts": [p.alerts[0], p.alerts[0]]})
    assert [r.accepted for r in record(ledger_url, doubled)] == [True, False]


def test_concurrent_duplicate_deliveries_record_once(ledger_url: str) -> None:
    """Twenty threads recording the same body at once: one accepted, no errors."""
    results: list[bool] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            results.extend(r.accepted for r in record(ledger_url, payload("group3_firing.json")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results.count(True) == 3 and len(results) == 60


def _run(url: str, **values: object) -> str:
    with transaction(url) as session:
        run_id = repository.insert_run(
            session,
            {
                "fingerprint": "f1",
                "starts_at": "2026-11-23T05:02:19.000000000Z",
                "rule": "r1",
                "remediation": "http_request",
                "params": {},
                "timeout_s": 1.0,
                "mode": "enforce",
                "trigger": "alert",
                "status": "queued",
                **values,
            },
        )
    assert run_id is not None
    return run_id


def test_one_run_per_episode_and_rule(ledger_url: str) -> None:
    """A second run for the same (episode, rule) is not inserted; manual runs never collide."""
    _run(ledger_url)
    with transaction(ledger_url) as session:
        again = repository.insert_run(
            session,
            {
                "fingerprint": "f1",
                "starts_at": "2026-11-23T05:02:19.000000000Z",
                "rule": "r1",
                "remediation": "x",
                "params": {},
                "timeout_s": 1.0,
                "mode": "enforce",
                "trigger": "alert",
                "status": "queued",
            },
        )
    assert again is None
    assert _run(ledger_url, fingerprint=None, starts_at=None, rule=None, trigger="manual")
    assert _run(ledger_url, fingerprint=None, starts_at=None, rule=None, trigger="manual")


def claim(
    url: str, run_id: str, task_id: str, deadline: timedelta = timedelta(minutes=1)
) -> repository.Claim:
    with transaction(url) as session:
        return repository.claim_run(
            session,
            run_id=run_id,
            task_id=task_id,
            worker="w",
            max_attempts=3,
            deadline_at=utcnow() + deadline,
        )


def test_attempt_claims(ledger_url: str) -> None:
    """One open attempt at a time; a redelivery abandons its own; three attempts at most."""
    run_id = _run(ledger_url)
    first = claim(ledger_url, run_id, "task-a")
    assert (first.kind, first.number) == ("run", 1)
    assert claim(ledger_url, run_id, "task-b").kind == "busy"  # another message, still in time
    redelivered = claim(ledger_url, run_id, "task-a")  # the same message again: its worker died
    assert (redelivered.kind, redelivered.number, redelivered.abandoned) == ("run", 2, [1])
    with transaction(ledger_url) as session:
        repository.finish_attempt(
            session,
            attempt_id=redelivered.attempt_id or 0,
            outcome="failed",
            error="boom",
            output=None,
            run_status="queued",
        )
    third = claim(ledger_url, run_id, "task-c")
    assert third.number == 3
    with transaction(ledger_url) as session:
        repository.finish_attempt(
            session,
            attempt_id=third.attempt_id or 0,
            outcome="failed",
            error="boom3",
            output=None,
            run_status="queued",
        )
    assert claim(ledger_url, run_id, "task-d").kind == "exhausted"
    with transaction(ledger_url) as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert run.status == "failed" and "gave up after 3 attempts" in (run.error or "")
        assert [a.outcome for a in run.attempts] == ["abandoned", "failed", "failed"]
    assert claim(ledger_url, run_id, "task-e").kind == "finished"


def test_stale_attempt_of_another_message_is_abandoned(ledger_url: str) -> None:
    """An open attempt past its deadline no longer blocks the run."""
    run_id = _run(ledger_url)
    claim(ledger_url, run_id, "task-a", deadline=timedelta(seconds=-1))
    second = claim(ledger_url, run_id, "task-b")
    assert (second.kind, second.abandoned) == ("run", [1])


def test_timestamps_come_back_aware_utc(ledger_url: str) -> None:
    """Datetimes read back are timezone-aware UTC on both databases."""
    run_id = _run(ledger_url)
    with transaction(ledger_url) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.created_at.utcoffset() == timedelta(0)


def test_stale_attempts_are_requeued(ledger_url: str) -> None:
    """An attempt past its deadline (hard limit, dead machine) is abandoned and its run requeued."""
    stale_run = _run(ledger_url)
    live_run = _run(ledger_url, rule="r2")
    claim(ledger_url, stale_run, "task-a", deadline=timedelta(seconds=-1))
    claim(ledger_url, live_run, "task-b")
    with transaction(ledger_url) as session:
        assert repository.requeue_stale_runs(session, now=utcnow(), limit=10) == [stale_run]
    with transaction(ledger_url) as session:
        run = session.get(Run, stale_run)
        live = session.get(Run, live_run)
        assert run is not None and live is not None
        assert (run.status, run.enqueued_at) == ("queued", None)
        assert [a.outcome for a in run.attempts] == ["abandoned"]
        assert live.status == "running"
    assert claim(ledger_url, stale_run, "task-c").number == 2
