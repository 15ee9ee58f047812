"""A handle_alert runs the last run it queued itself, on a worker that consumes remediations
(workers.inline), and sends the others; a worker split by queue sends every run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import alert_payload
from tests.stack import Stack, wait_for

pytestmark = [pytest.mark.redis]


def alert_fingerprint(instance: str) -> str:
    return str(alert_payload("ResponderProbe", instance=instance)["alerts"][0]["fingerprint"])


def _attempt_tasks(stack: Stack, worker: str = "worker") -> list[str]:
    """The task each attempt started in, from the worker's log, in order."""
    return [line["task_name"] for line in stack.log_lines(worker) if line.get("event") == "attempt_started"]


def test_a_webhooks_last_run_runs_in_its_handle_alert_and_the_others_are_sent(stack: Stack) -> None:
    stack.post(alert_payload("ResponderProbe", instance="alone-1"))
    run = stack.wait_run("succeeded", rule="probe-http", fingerprint=alert_fingerprint("alone-1"))
    assert [a["outcome"] for a in run["attempts"]] == ["succeeded"]
    assert _attempt_tasks(stack) == ["responder.handle_alert"]

    two = alert_payload("ResponderProbe", instance="pair-1")
    two["alerts"].append(alert_payload("ResponderProbe", instance="pair-2")["alerts"][0])
    stack.post(two)
    for instance in ("pair-1", "pair-2"):
        stack.wait_run("succeeded", rule="probe-http", fingerprint=alert_fingerprint(instance))
    assert sorted(_attempt_tasks(stack)[1:]) == ["responder.handle_alert", "responder.run_remediation"]


def test_a_worker_of_alerts_only_never_runs_a_remediation(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    stack = stack_factory(tmp=tmp_path, database_url=ledger_url)
    stack.start_split()
    stack.post(alert_payload("ResponderProbe", instance="split-1"))
    stack.wait_run("succeeded", rule="probe-http")
    assert _attempt_tasks(stack, "planner") == []
    assert _attempt_tasks(stack, "runner") == ["responder.run_remediation"]


def test_inline_runs_can_be_turned_off(stack_factory: type[Stack], ledger_url: str, tmp_path: Path) -> None:
    stack = stack_factory(tmp=tmp_path, database_url=ledger_url, overrides={"RESPONDER_INLINE_RUNS": "false"})
    stack.start_all()
    stack.post(alert_payload("ResponderProbe", instance="off-1"))
    stack.wait_run("succeeded", rule="probe-http")
    assert _attempt_tasks(stack) == ["responder.run_remediation"]


def test_an_inline_run_whose_process_is_killed_is_run_again_once_by_its_redelivered_message(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """SIGKILL of the pool process running a kept run: the broker redelivers its handle_alert,
    which plans nothing again and runs the run again under the same task id, so the dead
    attempt is abandoned at once, not after its lease (30 s here); the command runs to its end
    once."""
    stack = stack_factory(tmp=tmp_path, database_url=ledger_url, overrides={"RESPONDER_LEASE_S": "30"})
    stack.start_all()
    stack.post(alert_payload("ResponderSlow", instance="inline-killed-1"))
    wait_for(lambda: "start" in stack.lines("slow"), timeout=30, what="the slow command to start")
    running = stack.wait_run("running", rule="probe-slow")
    assert _attempt_tasks(stack) == ["responder.handle_alert"]
    os.kill(int(running["attempts"][0]["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    run = stack.wait_run("succeeded", timeout=20, rule="probe-slow")
    assert [a["outcome"] for a in run["attempts"]] == ["abandoned", "succeeded"]
    assert "worker lost" in (run["attempts"][0]["error"] or "")
    assert _attempt_tasks(stack) == ["responder.handle_alert"] * 2
    assert stack.count("worker", "handle_alert_redelivered") == 1
    time.sleep(4)  # the killed attempt's command would have finished by now if it survived
    assert (stack.lines("slow").count("start"), stack.lines("slow").count("done")) == (2, 1)
    assert len(stack.runs(rule="probe-slow")) == 1
