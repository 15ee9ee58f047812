"""The ledger on SQLite and PostgreSQL: dedupe, exact timestamps, attempts, migrations."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import timedelta
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from tests.helpers import FIXTURES
from workers.admission import Admission, RunRequest, admit
from workers.alerts import WebhookPayload
from workers.ledger import attempts, repository
from workers.ledger.db import db_now, get_engine, reading, transaction
from workers.ledger.models import AlertEvent, Attempt, Base, Run, utcnow
from workers.ledger.states import RunStatus


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


def _request(**values: Any) -> RunRequest:
    fields: dict[str, Any] = {
        "trigger": "alert",
        "remediation": "http_request",
        "params": {},
        "rule": "r1",
        "timeout_s": 1.0,
        "fingerprint": "f1",
        "starts_at": "2026-11-23T05:02:19.000000000Z",
        **values,
    }
    return RunRequest(**fields)


def _admit(url: str, **values: Any) -> Admission:
    with transaction(url) as session:
        return admit(session, [_request(**values)])[0]


def _run(url: str, **values: Any) -> str:
    admission = _admit(url, **values)
    assert admission.created
    return admission.run_id


def test_one_run_per_dedupe_key(ledger_url: str) -> None:
    """Admission is at most once per key: (episode, rule), idempotency key, (parent, step)."""
    first = _run(ledger_url)
    again = _admit(ledger_url, remediation="x")
    assert (again.created, again.run_id, again.status) == (False, first, "queued")
    manual = {"trigger": "manual", "fingerprint": None, "starts_at": None, "rule": None}
    assert _run(ledger_url, **manual) != _run(ledger_url, **manual)  # no key: never collide
    keyed = _run(ledger_url, **manual, idempotency_key="k1")
    assert _admit(ledger_url, **manual, idempotency_key="k1").run_id == keyed
    step = {"trigger": "step", "parent_run_id": keyed, "step": "dump"}
    child = _run(ledger_url, **manual | step)
    assert _admit(ledger_url, **manual | step).run_id == child
    assert _run(ledger_url, **manual | step | {"step": "verify"}) != child


def test_admission_guards_in_order(ledger_url: str) -> None:
    """Invalid before resolved before dry run; each outcome recorded with its reason."""
    assert _admit(ledger_url, rule="a", error="render: boom", mode="dry_run").status == "failed"
    assert _admit(ledger_url, rule="b", mode="dry_run").reason == "dry_run"
    with transaction(ledger_url) as session:
        raw = json.loads((FIXTURES / "single_resolved.json").read_bytes())
        p = WebhookPayload.model_validate(raw)
        repository.record_events(session, p.alerts, receiver="r", group_key="g")
    episode = {"fingerprint": p.alerts[0].fingerprint, "starts_at": p.alerts[0].starts_at}
    resolved = _admit(ledger_url, rule="c", mode="dry_run", **episode)
    assert (resolved.status, resolved.reason) == ("skipped", "resolved")
    with transaction(ledger_url) as session:
        run = session.get(Run, resolved.run_id)
        assert run is not None and run.skip_reason == "resolved" and run.finished_at is not None


def claim(
    url: str, run_id: str, task_id: str, lease_s: float = 60, seen: attempts.Look | None = None
) -> attempts.Claim:
    with transaction(url) as session:
        return attempts.claim_run(
            session,
            run_id=run_id,
            task_id=task_id,
            worker="w",
            max_attempts=3,
            lease_s=lease_s,
            seen=seen,
        )


def look(url: str, run_id: str, task_id: str) -> attempts.Look | None:
    with reading(url) as session:
        return attempts.look(session, run_id=run_id, task_id=task_id, max_attempts=3)


def finish(url: str, run_id: str, attempt_id: int | None, outcome: str, run_status: str) -> bool:
    with transaction(url) as session:
        return attempts.finish_attempt(
            session,
            run_id=run_id,
            attempt_id=attempt_id or 0,
            outcome=outcome,  # type: ignore[arg-type]
            error=None if outcome == "succeeded" else "boom",
            output=None,
            run_status=run_status,  # type: ignore[arg-type]
        )


def test_attempt_claims(ledger_url: str) -> None:
    """One open attempt at a time; a redelivery abandons its own; three attempts at most."""
    run_id = _run(ledger_url)
    first = claim(ledger_url, run_id, "task-a")
    assert (first.kind, first.number) == ("run", 1)
    assert claim(ledger_url, run_id, "task-b").kind == "busy"  # another message, still in time
    redelivered = claim(ledger_url, run_id, "task-a")  # the same message again: its worker died
    assert (redelivered.kind, redelivered.number, redelivered.abandoned) == ("run", 2, [1])
    assert finish(ledger_url, run_id, redelivered.attempt_id, "failed", "queued")
    third = claim(ledger_url, run_id, "task-c")
    assert third.number == 3
    assert finish(ledger_url, run_id, third.attempt_id, "failed", "queued")
    assert claim(ledger_url, run_id, "task-d").kind == "exhausted"
    with transaction(ledger_url) as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert run.status == "failed" and "gave up after 3 attempts" in (run.error or "")
        assert [a.outcome for a in run.attempts] == ["abandoned", "failed", "failed"]
    assert claim(ledger_url, run_id, "task-e").kind == "finished"


def test_a_run_is_claimed_as_seen_unless_it_changed_since(ledger_url: str) -> None:
    """The runner looks at a run without a lock and claims it as seen. If, in between, another
    delivery took an attempt, a pause began or the episode resolved, the claim decides from the
    run as it is now: the next attempt's number, paused, resolved. Never a second attempt 1."""
    run_id = _run(ledger_url)
    seen = look(ledger_url, run_id, "task-a")
    assert seen is not None and seen.ready and seen.gate_due
    fresh = claim(ledger_url, run_id, "task-a", seen=seen)
    assert (fresh.kind, fresh.number) == ("run", 1)
    assert claim(ledger_url, run_id, "task-a2", seen=seen).kind == "busy"  # the same sight again
    assert finish(ledger_url, run_id, fresh.attempt_id, "failed", "queued")
    stale = look(ledger_url, run_id, "task-b")
    other = claim(ledger_url, run_id, "task-c")  # meanwhile, another delivery: attempt 2
    assert finish(ledger_url, run_id, other.attempt_id, "failed", "queued")
    late = claim(ledger_url, run_id, "task-b", seen=stale)
    assert (late.kind, late.number) == ("run", 3)
    with transaction(ledger_url) as session:
        numbers = session.execute(
            select(Attempt.number, Attempt.task_id).where(Attempt.run_id == run_id).order_by(Attempt.number)
        ).all()
    assert [tuple(n) for n in numbers] == [(1, "task-a"), (2, "task-c"), (3, "task-b")]

    paused_run = _run(ledger_url, rule="paused")
    seen = look(ledger_url, paused_run, "task-p")
    with transaction(ledger_url) as session:
        repository.set_pause(session, paused=True, actor="alice", reason="maintenance")
    assert claim(ledger_url, paused_run, "task-p", seen=seen).kind == "paused"
    with transaction(ledger_url) as session:
        repository.set_pause(session, paused=False, actor="alice", reason="done")

    raw = json.loads((FIXTURES / "single_resolved.json").read_bytes())
    p = WebhookPayload.model_validate(raw)
    episode = {"fingerprint": p.alerts[0].fingerprint, "starts_at": p.alerts[0].starts_at}
    resolving = _run(ledger_url, rule="resolving", **episode)
    seen = look(ledger_url, resolving, "task-r")
    assert seen is not None and seen.ready
    with transaction(ledger_url) as session:
        repository.record_events(session, p.alerts, receiver="r", group_key="g")
    assert claim(ledger_url, resolving, "task-r", seen=seen).kind == "resolved"


def test_late_attempt_does_not_overwrite_its_successor(ledger_url: str) -> None:
    """An attempt whose lease was given up records its late outcome on itself, not on the run."""
    run_id = _run(ledger_url)
    first = claim(ledger_url, run_id, "task-a", lease_s=-1)
    second = claim(ledger_url, run_id, "task-b")
    assert (second.kind, second.abandoned) == ("run", [1])
    assert finish(ledger_url, run_id, first.attempt_id, "succeeded", "succeeded") is False
    with transaction(ledger_url) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.status == "running"
        assert [(a.outcome, a.late_outcome) for a in run.attempts] == [
            ("abandoned", "succeeded"),
            ("running", None),
        ]
    assert finish(ledger_url, run_id, second.attempt_id, "failed", "failed") is True
    with transaction(ledger_url) as session:
        run = session.get(Run, run_id)
        assert run is not None and (run.status, run.error) == ("failed", "boom")


def test_transitions_are_compare_and_set(ledger_url: str) -> None:
    """A transition from a status the table does not allow, or not expected, changes nothing."""
    run_id = _run(ledger_url)
    with transaction(ledger_url) as session:
        assert not attempts.transition_run(session, run_id, RunStatus.SUCCEEDED)  # queued -> succeeded
        assert attempts.transition_run(session, run_id, RunStatus.CANCELLED, expect=[RunStatus.QUEUED])
        assert not attempts.transition_run(session, run_id, RunStatus.QUEUED)  # final
    with transaction(ledger_url) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.status == "cancelled" and run.finished_at is not None


def test_resolved_episode_is_not_started(ledger_url: str) -> None:
    """A queued alert run whose episode resolved meanwhile is skipped when claimed."""
    raw = json.loads((FIXTURES / "single_resolved.json").read_bytes())
    p = WebhookPayload.model_validate(raw)
    run_id = _run(ledger_url, fingerprint=p.alerts[0].fingerprint, starts_at=p.alerts[0].starts_at)
    with transaction(ledger_url) as session:
        repository.record_events(session, p.alerts, receiver="r", group_key="g")
    assert claim(ledger_url, run_id, "task-a").kind == "resolved"
    with transaction(ledger_url) as session:
        run = session.get(Run, run_id)
        assert run is not None and (run.status, run.skip_reason) == ("skipped", "resolved")


def test_lease_renewal_keeps_an_attempt_alive(ledger_url: str) -> None:
    """A renewed lease is not swept; a renewal of a closed attempt says it was superseded."""
    run_id = _run(ledger_url)
    first = claim(ledger_url, run_id, "task-a", lease_s=-1)
    with transaction(ledger_url) as session:
        now = db_now(session)
        assert attempts.renew_lease(session, first.attempt_id or 0, now=now, lease_s=60)
    with transaction(ledger_url) as session:
        assert attempts.requeue_stale_runs(session, now=db_now(session), limit=10) == []
    assert claim(ledger_url, run_id, "task-b").kind == "busy"
    assert finish(ledger_url, run_id, first.attempt_id, "succeeded", "succeeded")
    with transaction(ledger_url) as session:
        assert not attempts.renew_lease(session, first.attempt_id or 0, now=utcnow(), lease_s=60)


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
    claim(ledger_url, stale_run, "task-a", lease_s=-1)
    claim(ledger_url, live_run, "task-b")
    with transaction(ledger_url) as session:
        assert attempts.requeue_stale_runs(session, now=utcnow(), limit=10) == [stale_run]
    with transaction(ledger_url) as session:
        run = session.get(Run, stale_run)
        live = session.get(Run, live_run)
        assert run is not None and live is not None
        assert (run.status, run.enqueued_at) == ("queued", None)
        assert [a.outcome for a in run.attempts] == ["abandoned"]
        assert live.status == "running"
    assert claim(ledger_url, stale_run, "task-c").number == 2


def test_heartbeat_renews_then_notices_it_was_superseded(ledger_url: str) -> None:
    """The heartbeat keeps a lease alive, stops cleanly, and cancels the attempt once superseded."""
    import time

    from workers import leases

    run_id = _run(ledger_url)
    first = claim(ledger_url, run_id, "task-a", lease_s=1)
    with leases.kept(url=ledger_url, attempt_id=first.attempt_id or 0, lease_s=1) as lease:
        assert leases.keeper().holding() == 1
        time.sleep(1.5)  # past the first lease: only renewals keep it
        assert claim(ledger_url, run_id, "task-b").kind == "busy" and not lease.cancelled.is_set()
        with transaction(ledger_url) as session:  # an operator cancels the run: the attempt is closed
            assert attempts.abandon_attempt(
                session, first.attempt_id or 0, run_id, now=db_now(session), error="operator"
            )
        assert lease.cancelled.wait(5) and lease.lost is not None and "superseded" in lease.lost
    assert leases.keeper().holding() == 0


def test_one_keeper_renews_every_lease_and_notices_an_unreachable_ledger(
    ledger_url: str, tmp_path: Any
) -> None:
    """Several attempts' leases from one thread; a lease it cannot renew is lost once it expires."""
    import time

    from workers import leases

    runs = [_run(ledger_url, rule=f"r{i}") for i in range(3)]
    claims = [claim(ledger_url, run_id, f"task-{run_id}", lease_s=1) for run_id in runs]
    with contextlib.ExitStack() as held:
        kept = [
            held.enter_context(leases.kept(url=ledger_url, attempt_id=c.attempt_id or 0, lease_s=1))
            for c in claims
        ]
        time.sleep(1.5)  # past every first lease: only renewals keep them
        assert [claim(ledger_url, run_id, "other").kind for run_id in runs] == ["busy"] * 3
        assert not any(lease.cancelled.is_set() for lease in kept)
    unreachable = f"sqlite:///{tmp_path}/no/such/dir/ledger.db"
    started = time.monotonic()
    with leases.kept(url=unreachable, attempt_id=1, lease_s=1) as lease:
        assert lease.cancelled.wait(5) and "lease expired" in (lease.lost or "")
    assert time.monotonic() - started >= 1  # not before the lease ran out


def test_a_read_neither_waits_for_a_writer_nor_holds_one_up(ledger_url: str) -> None:
    """``reading`` sees the last committed state while a write transaction is open elsewhere,
    at once; and a writer does not wait for an open read (on SQLite: a deferred BEGIN in WAL
    mode, never the write lock)."""
    record(ledger_url, payload())
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with transaction(ledger_url) as session:
            group = payload("group3_firing.json").alerts
            repository.record_events(session, group, receiver="r", group_key="g")
            writing.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(10)
        started = time.monotonic()
        with reading(ledger_url) as session:
            seen = session.scalar(select(func.count()).select_from(AlertEvent))
        assert seen == 1  # the open transaction's rows are not visible yet
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        thread.join(10)
    with reading(ledger_url) as session:
        session.scalar(select(func.count()).select_from(AlertEvent))
        started = time.monotonic()
        record(ledger_url, payload("single_resolved.json"))  # a write while the read is open
        assert time.monotonic() - started < 1.0
