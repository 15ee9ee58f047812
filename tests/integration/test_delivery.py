"""Delivery with real processes: receiver, Celery worker and beat on a real Redis and ledger."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.helpers import alert_payload
from tests.stack import INGEST_TOKEN, OPERATOR_TOKEN, Stack, wait_for
from workers.dev import free_port
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent

pytestmark = [pytest.mark.redis]


def test_webhook_runs_the_remediation(stack: Stack) -> None:
    """A matching firing alert calls the endpoint once and shows a succeeded run."""
    response = stack.post(alert_payload("ResponderProbe", instance="web-1"))
    assert response.status_code == 202
    assert response.json()["alerts"][0]["result"] == "accepted"
    run = stack.wait_run("succeeded", rule="probe-http")
    call = wait_for(lambda: stack.target.calls, timeout=5, what="the HTTP call")[0]
    assert (call.method, call.path) == ("POST", "/hook/web-1")
    assert json.loads(call.body) == {"alert": "ResponderProbe", "instance": "web-1"}
    assert run["trigger"] == "alert" and run["remediation"] == "http_request"
    assert [a["outcome"] for a in run["attempts"]] == ["succeeded"]
    assert run["params"]["url"].endswith("/hook/web-1")
    assert run["result"]["status"] == 200 and run["result"] == run["attempts"][0]["output"]


def test_command_and_dry_run(stack: Stack) -> None:
    """A command rule runs echo with the label as one argument; a dry-run rule calls nothing."""
    stack.post(alert_payload("ResponderCommand", instance="$(reboot)"))
    stack.post(alert_payload("ResponderDry", instance="db-1"))
    command = stack.wait_run("succeeded", rule="probe-command")
    assert command["attempts"][0]["output"]["stdout"] == "restarting $(reboot)\n"
    dry = stack.wait_run("skipped", rule="probe-dry")
    assert dry["skip_reason"] == "dry_run" and dry["attempts"] == []
    assert dry["preflight"]["url"].endswith("/dry")
    time.sleep(1)
    assert [c.path for c in stack.target.calls] == []


def test_duplicates_and_concurrent_duplicates_run_once(stack: Stack) -> None:
    """The same alert delivered again and 20 times at once gives one run and one call."""
    payload = json.dumps(alert_payload("ResponderProbe", instance="dup-1")).encode()
    assert stack.post(payload).json()["alerts"][0]["result"] == "accepted"
    assert stack.post(payload).json()["alerts"][0]["result"] == "duplicate"
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda _: stack.post(payload), range(20)))
    assert [r.status_code for r in responses] == [202] * 20
    assert {r.json()["alerts"][0]["result"] for r in responses} == {"duplicate"}
    stack.wait_run("succeeded", rule="probe-http")
    time.sleep(2)  # time for any second run to show up
    assert len(stack.runs()) == 1
    assert len(stack.target.calls) == 1


def test_concurrent_first_deliveries_run_once(stack: Stack) -> None:
    """Fifty simultaneous first deliveries of one alert from two senders (an HA pair: the same
    alert, each its own externalURL), and retries: one accepted, one run, one call."""
    raw = alert_payload("ResponderProbe", instance="race-1")
    first = json.dumps(raw).encode()
    second = json.dumps({**raw, "externalURL": "http://alertmanager-2:9093"}).encode()
    with ThreadPoolExecutor(max_workers=25) as pool:
        responses = list(pool.map(lambda i: stack.post(first if i % 2 else second), range(50)))
    assert [r.status_code for r in responses] == [202] * 50
    assert sum(r.json()["alerts"][0]["result"] == "accepted" for r in responses) == 1
    stack.wait_run("succeeded", rule="probe-http")
    stack.wait_reconcile_passes(2)  # anything that would run twice has been sent again by now
    assert len(stack.runs()) == 1 and len(stack.target.calls) == 1


def test_redis_down_at_intake_then_reconciled(stack: Stack) -> None:
    """With Redis stopped the webhook still answers 202 fast; after Redis returns the run happens."""
    stack.redis.stop()
    started = time.monotonic()
    response = stack.post(alert_payload("ResponderProbe", instance="outage-1"))
    elapsed = time.monotonic() - started
    assert response.status_code == 202
    assert elapsed < 8, f"webhook took {elapsed:.1f}s with Redis down"

    def unpublished() -> bool:
        # Recorded as published with the insert; the failed publish undoes it (the publisher
        # thread may still be trying when the 202 goes out after the publish budget).
        with transaction(stack.database_url) as session:
            event = session.scalars(select(AlertEvent)).one()
            return event.enqueued_at is None and event.publishes == 0

    wait_for(unpublished, timeout=30, what="the failed publish to be recorded")
    stack.redis.start()
    run = stack.wait_run("succeeded", timeout=60, rule="probe-http")
    assert run["fingerprint"] == response.json()["alerts"][0]["fingerprint"]
    assert len(stack.target.calls) == 1
    # Work continues after the broker came back (celery#8030-style stalls would fail here).
    stack.post(alert_payload("ResponderCommand", instance="after-1"))
    stack.wait_run("succeeded", timeout=30, rule="probe-command")


def test_ledger_unreachable_is_503(stack_factory: type[Stack], ledger_url: str, tmp_path: Path) -> None:
    """When the ledger cannot be reached the webhook answers 503, quickly, naming no secret."""
    dead = (
        f"sqlite:///{tmp_path}/missing-dir/ledger.db"
        if ledger_url.startswith("sqlite")
        else f"postgresql+psycopg://responder:hunter2@127.0.0.1:{free_port()}/nope"
    )
    stack = stack_factory(tmp=tmp_path, database_url=dead)
    stack.start_receiver()
    started = time.monotonic()
    response = stack.post(alert_payload("ResponderProbe"))
    assert response.status_code == 503
    assert time.monotonic() - started < 9
    assert response.json()["error"] == "ledger_unavailable"
    assert "hunter2" not in response.text and "hunter2" not in stack.log("receiver")


def _pid_of(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])


def test_worker_killed_mid_run_finishes_once(stack: Stack) -> None:
    """SIGKILL of the process running a remediation: redelivered, abandoned attempt recorded, done once."""
    stack.post(alert_payload("ResponderSlow", instance="slow-1"))
    wait_for(
        lambda: stack.slow_log.exists() and "start" in stack.slow_log.read_text(),
        timeout=30,
        what="the slow command to start",
    )
    running = stack.wait_run("running", rule="probe-slow")
    victim = _pid_of(running["attempts"][0]["worker"])
    os.kill(victim, signal.SIGKILL)
    run = stack.wait_run("succeeded", timeout=60, rule="probe-slow")
    assert [a["outcome"] for a in run["attempts"]] == ["abandoned", "succeeded"]
    # Whichever notices first abandons it: the redelivered message (same task id) or the
    # reconciler (the lease expired); both are recorded, and the action still happens once.
    error = run["attempts"][0]["error"] or ""
    assert "worker lost" in error or "lease expired" in error
    time.sleep(4)  # the killed attempt's command would have finished by now if it survived
    lines = stack.slow_log.read_text().split()
    assert lines.count("start") == 2
    assert lines.count("done") == 1


def test_whole_worker_killed_mid_run_is_recovered(stack: Stack) -> None:
    """The whole worker dies (main and pool, as with its machine): the run is recovered once."""
    stack.post(alert_payload("ResponderSlow", instance="slow-2"))
    wait_for(
        lambda: stack.slow_log.exists() and "start" in stack.slow_log.read_text(),
        timeout=30,
        what="the slow command to start",
    )
    worker = stack.procs["worker"]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    # The message stays unacked in Redis until the visibility timeout (an hour); the
    # reconciler abandons the attempt once past its deadline and requeues the run.
    stack.start_worker("worker2")
    run = stack.wait_run("succeeded", timeout=90, rule="probe-slow")
    assert [a["outcome"] for a in run["attempts"]] == ["abandoned", "succeeded"]
    assert "lease expired" in (run["attempts"][0]["error"] or "")
    time.sleep(4)
    lines = stack.slow_log.read_text().split()
    assert (lines.count("start"), lines.count("done")) == (2, 1)


def test_transient_failures_retry_then_fail(stack: Stack) -> None:
    """A failing endpoint is tried three times, each attempt recorded, then the run fails."""
    stack.target.status = 503
    stack.post(alert_payload("ResponderProbe", instance="down-1"))
    run = stack.wait_run("failed", timeout=60, rule="probe-http")
    assert [a["outcome"] for a in run["attempts"]] == ["failed"] * 3
    assert "unexpected status 503" in (run["error"] or "")
    assert len(stack.target.calls) == 3


def test_resolved_alert_runs_nothing(stack: Stack) -> None:
    """A resolved notification is recorded and handled, and calls nothing."""
    stack.post(alert_payload("ResponderProbe", status="resolved", instance="gone-1"))

    def handled() -> bool:
        with transaction(stack.database_url) as session:
            event = session.scalars(select(AlertEvent)).first()
            return event is not None and event.handled_at is not None and event.matched_rules == 1

    wait_for(handled, timeout=20, what="the resolved event to be handled")
    assert stack.runs() == [] and stack.target.calls == []


def test_auth_against_the_running_receiver(stack: Stack) -> None:
    """The real server refuses a wrong token and a wrong scope."""
    assert stack.post(alert_payload(), token="wrong").status_code == 401
    assert stack.post(alert_payload(), token="it-operator-token").status_code == 403
    assert httpx.get(f"{stack.base_url}/api/v1/runs", timeout=5).status_code == 401
    stack.post(alert_payload("ResponderCommand", instance="log-1"))
    stack.wait_run("succeeded", rule="probe-command")
    for name in ("receiver", "worker", "beat"):
        log = stack.log(name)
        assert log, f"{name} logged nothing"
        assert INGEST_TOKEN not in log and OPERATOR_TOKEN not in log, f"a token is in the {name} log"
    assert '"run_id"' in stack.log("worker") and '"task_id"' in stack.log("worker")


def test_hung_redis_at_intake_answers_within_budget(stack: Stack) -> None:
    """A Redis that holds connections but never answers (SIGSTOP) delays the 202 by the budget only."""
    stack.post(alert_payload("ResponderCommand", instance="warm-1"))  # producer connection pooled
    stack.wait_run("succeeded", rule="probe-command")
    assert stack.redis.proc is not None
    os.kill(stack.redis.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = stack.post(alert_payload("ResponderProbe", instance="hung-1"))
        elapsed = time.monotonic() - started
    finally:
        os.kill(stack.redis.proc.pid, signal.SIGCONT)
    assert response.status_code == 202
    assert elapsed < 4, f"webhook took {elapsed:.1f}s with Redis hung"
    run = stack.wait_run("succeeded", timeout=60, rule="probe-http")
    assert run["params"]["url"].endswith("/hook/hung-1")
    time.sleep(2)
    assert [c.path for c in stack.target.calls] == ["/hook/hung-1"]
