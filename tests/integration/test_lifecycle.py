"""Fault tests of the run lifecycle with real processes, on SQLite and PostgreSQL.

Each test breaks something the design says it survives (the ledger refusing a task, Redis
restarted empty, a bad rule, a firing and its resolved arriving together, a remediation that
outlives its first lease) and counts what the target saw: every alert acted on once, none lost,
none twice. Absence is asserted after reconcile passes, never after a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.helpers import alert_payload
from tests.stack import Stack, wait_for
from workers.ledger.db import make_engine, transaction
from workers.ledger.models import AlertEvent

pytestmark = [pytest.mark.redis]


@contextmanager
def ledger_locked(url: str, table: str) -> Iterator[None]:
    """Hold a lock that makes the ledger refuse writers (past their lock timeout) until released."""
    if url.startswith("sqlite"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")  # the database's one write lock
        try:
            yield
        finally:
            db.rollback()
            db.close()
        return
    engine = make_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()
    engine.dispose()


def report(test: str, stack: Stack, *, sent: int, expected: int) -> None:
    """One line of figures per fault test (``pytest -s`` shows them): sent, acted, lost, twice."""
    calls = [c.path for c in stack.target.calls]
    acted = len(set(calls))
    print(
        f"FAULT {test} [{stack.database_url.split(':')[0]}]: alerts sent {sent}, actions {len(calls)}, "
        f"lost {expected - acted}, duplicated {len(calls) - acted}"
    )


def settle(stack: Stack, worker: str = "worker") -> None:
    """Let two reconcile passes run, so anything that would be re-sent or run twice has been."""
    stack.wait_reconcile_passes(2, worker=worker)


def test_handle_alert_ledger_error_is_retried(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """handle_alert hits a lock held past the lock timeout: once released, the run happens once."""
    stack = stack_factory(tmp=tmp_path, database_url=ledger_url)
    stack.start_all(worker=False)
    assert stack.post(alert_payload("ResponderProbe", instance="locked-1")).status_code == 202
    with ledger_locked(ledger_url, "alert_events"):
        stack.start_worker()
        wait_for(
            lambda: stack.count("worker", "ledger_error_retrying") >= 1,
            timeout=30,
            what="handle_alert to fail on the locked ledger",
        )
    run = stack.wait_run("succeeded", timeout=60, rule="probe-http")
    settle(stack)
    report("handle_alert ledger error", stack, sent=1, expected=1)
    assert [c.path for c in stack.target.calls] == ["/hook/locked-1"]
    assert [r["id"] for r in stack.runs()] == [run["id"]]


def test_claim_ledger_error_is_retried(stack_factory: type[Stack], ledger_url: str, tmp_path: Path) -> None:
    """run_remediation fails at its claim: the run is attempted later, once."""
    stack = stack_factory(tmp=tmp_path, database_url=ledger_url)
    stack.start_all(worker=False)
    stack.start_worker("planner", queues="alerts,maintenance")
    stack.post(alert_payload("ResponderProbe", instance="claim-1"))
    stack.wait_run("queued", rule="probe-http")
    with ledger_locked(ledger_url, "attempts"):
        stack.start_worker("runner", queues="remediations")
        wait_for(
            lambda: stack.count("runner", "ledger_error_retrying") >= 1,
            timeout=30,
            what="the claim to fail on the locked ledger",
        )
    run = stack.wait_run("succeeded", timeout=60, rule="probe-http")
    settle(stack, worker="planner")
    report("claim ledger error", stack, sent=1, expected=1)
    assert [a["outcome"] for a in stack.runs()[0]["attempts"]] == ["succeeded"]
    assert [c.path for c in stack.target.calls] == ["/hook/claim-1"] and run["status"] == "succeeded"


def test_redis_restarted_empty_loses_nothing(stack: Stack) -> None:
    """Redis killed and restarted empty with 20 alerts in flight: all 20 acted on, each once."""
    instances = [f"flight-{i}" for i in range(20)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(
            pool.map(lambda i: stack.post(alert_payload("ResponderProbe", instance=i)), instances)
        )
    assert [r.status_code for r in responses] == [202] * 20
    stack.restart_redis_empty()
    lost_at_restart = 20 - len(stack.target.calls)

    def all_done() -> bool:
        runs = stack.runs(rule="probe-http", limit="100")
        return len(runs) == 20 and all(r["status"] == "succeeded" for r in runs)

    wait_for(all_done, timeout=120, what="all 20 runs to succeed")
    settle(stack)
    report(f"Redis restarted empty ({lost_at_restart} not yet acted on)", stack, sent=20, expected=20)
    paths = sorted(c.path for c in stack.target.calls)
    assert paths == sorted(f"/hook/{i}" for i in instances), f"{lost_at_restart} were in flight"
    beat = stack.procs["beat"]
    assert beat.poll() is None, "beat exited after the Redis restart"
    assert stack.count("beat", "beat_lock_lost") >= 1  # it noticed the empty Redis and recovered


def test_bad_rule_fails_alone(stack_factory: type[Stack], ledger_url: str, tmp_path: Path) -> None:
    """One rule's template raising, and a backtracking-prone regex on a long label: the others run."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "multi-typeerror",
                "match": ['alertname="ResponderMulti"'],
                "remediation": "http_request",
                "params": {"url": "http://127.0.0.1:1/{{ '%d' | format(labels.instance) }}"},
            },
            {
                "name": "multi-regex",
                "match": ['alertname="ResponderMulti"', 'instance=~"(a+)+b"'],
                "remediation": "run_command",
                "params": {"command": "record_instance"},
            },
            {
                "name": "multi-good",
                "match": ['alertname="ResponderMulti"', 'instance=~"a+c"'],
                "remediation": "run_command",
                "params": {"command": "record_instance"},
            },
        ],
    )
    stack.start_all()
    stack.post(alert_payload("ResponderMulti", instance="a" * 30_000 + "c"))
    good = stack.wait_run("succeeded", timeout=30, rule="multi-good")
    bad = stack.wait_run("failed", rule="multi-typeerror")
    assert good["attempts"][0]["output"]["stdout"].startswith("restarting aaaa")
    assert "TypeError" in (bad["error"] or "") and bad["attempts"] == []
    assert stack.runs(rule="multi-regex") == []  # no match, answered in linear time


def test_firing_and_resolved_during_outage_act_on_nothing(stack: Stack) -> None:
    """Firing and resolved both recorded while Redis is down: afterwards nothing runs."""
    stack.redis.stop()
    assert stack.post(alert_payload("ResponderProbe", instance="flap-1")).status_code == 202
    assert (
        stack.post(alert_payload("ResponderProbe", status="resolved", instance="flap-1")).status_code == 202
    )
    stack.redis.start()
    run = stack.wait_run("skipped", timeout=60, rule="probe-http")
    assert run["skip_reason"] == "resolved" and run["attempts"] == []

    def both_handled() -> bool:
        with transaction(stack.database_url) as session:
            handled = session.scalars(select(AlertEvent.handled_at)).all()
            return len(handled) == 2 and all(handled)

    wait_for(both_handled, timeout=30, what="both events to be handled")
    settle(stack)
    report("firing+resolved during outage", stack, sent=2, expected=0)
    assert stack.target.calls == []
    assert stack.procs["beat"].poll() is None, "beat exited during the Redis outage"


def test_heartbeat_keeps_a_long_remediation_single(stack: Stack) -> None:
    """A remediation running well past its first lease renews it: never a second attempt."""
    stack.post(alert_payload("ResponderLong", instance="long-1"))
    run = stack.wait_run("succeeded", timeout=60, rule="probe-long")
    settle(stack)
    assert [a["outcome"] for a in run["attempts"]] == ["succeeded"]
    assert stack.lines("long") == ["start", "done"]


def test_busy_remediation_workers_do_not_delay_planning(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """With every remediation slot busy on a slow command, a new alert is still planned at once."""
    stack = stack_factory(tmp=tmp_path, database_url=ledger_url)
    stack.start_split()
    stack.post(alert_payload("ResponderLong", instance="busy-1"))
    wait_for(lambda: "start" in stack.lines("long"), timeout=30, what="the long command to start")
    stack.post(alert_payload("ResponderProbe", instance="next-1"))
    planned = stack.wait_run("queued", timeout=5, rule="probe-http")
    assert "done" not in stack.lines("long"), "the slot was free after all"
    assert stack.wait_run("succeeded", timeout=60, rule="probe-http")["id"] == planned["id"]


def test_handle_alert_killed_in_its_first_delivery_is_redelivered_and_counted(
    stack_factory: type[Stack], sqlite_url: str, tmp_path: Path
) -> None:
    """The first delivery of the receiver's message writes nothing before it admits (its start is
    counted with its outcome). Its process killed while it waits to admit, the broker restores
    the message marked redelivered, whose start is counted before it plans: the event is handled,
    with one start counted, and the kill is logged."""
    stack = stack_factory(tmp=tmp_path, database_url=sqlite_url)
    stack.start_receiver()
    assert stack.post(alert_payload("NothingMatches", instance="killed-1")).status_code == 202
    with ledger_locked(sqlite_url, "alert_events"):
        worker = stack.start_worker()
        # It planned (no rule matched) and now waits for the ledger to admit: kill its process.
        wait_for(lambda: stack.count("worker", "no_rule_matched") >= 1, timeout=30, what="planning")
        children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        assert len(children) == 1
        os.kill(int(children[0]), signal.SIGKILL)
        wait_for(
            lambda: stack.count("worker", "handle_alert_redelivered") >= 1, timeout=30, what="redelivery"
        )

    def handled() -> AlertEvent | None:
        with transaction(sqlite_url) as session:
            event = session.scalars(select(AlertEvent)).one()
            return event if event.handled_at is not None else None

    event = wait_for(handled, timeout=30, what="the event handled")
    assert (event.deliveries, event.matched_rules, event.error) == (1, 0, None)
    assert stack.count("worker", "no_rule_matched") == 2
