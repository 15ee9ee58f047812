"""A worker's metrics on its own port: the sum of its prefork processes, lint-clean."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import alert_payload
from tests.stack import Stack, wait_for
from workers.dev import free_port


def _value(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_worker_metrics_add_up_its_processes(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path, promtool: str
) -> None:
    """Two pool processes run 8 alerts' remediations: the worker's /metrics counts all 8 runs,
    attempts and decisions (both processes wrote their share to the multiprocess directory),
    and promtool finds nothing to say about it."""
    stack = stack_factory(tmp=tmp_path, database_url=ledger_url)
    port = free_port()
    shared = tmp_path / "metrics"
    stack.start_receiver()
    stack.start_worker(
        concurrency=2,
        options=("--metrics-port", str(port), "--metrics-host", "127.0.0.1"),
        env={**stack.env, "PROMETHEUS_MULTIPROC_DIR": str(shared)},
    )
    stack.target.delay_s = 0.2  # so both processes get some of them
    for i in range(8):
        assert stack.post(alert_payload("ResponderProbe", instance=f"m{i}")).status_code == 202

    def counted() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        done = _value(text, "responder_runs_total", remediation="http_request", outcome="succeeded")
        return text if done >= 8 else None

    text = wait_for(counted, timeout=40, what="8 runs counted on the worker's /metrics")
    assert _value(text, "responder_runs_total", remediation="http_request", outcome="succeeded") == 8
    assert _value(text, "responder_attempts_total", remediation="http_request", outcome="succeeded") == 8
    assert _value(text, "responder_attempt_duration_seconds_count", remediation="http_request") == 8
    assert _value(text, "responder_decisions_total", decision="queued") == 8
    assert len(list(shared.glob("counter_*.db"))) >= 2  # each pool process kept its own
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
        checked.stdout + checked.stderr
    )


def test_readyz_follows_the_workers(stack_factory: type[Stack], sqlite_url: str, tmp_path: Path) -> None:
    """/readyz is 200 while a real worker beats, and 503 naming the check once it has stopped."""
    stack = stack_factory(
        tmp=tmp_path, database_url=sqlite_url, overrides={"RESPONDER_HEARTBEAT_INTERVAL_S": "0.5"}
    )
    stack.start_receiver()
    stack.start_worker()

    def ready(code: int) -> dict[str, Any] | None:
        response = httpx.get(f"{stack.base_url}/readyz", timeout=5)
        return response.json() if response.status_code == code else None

    body = wait_for(lambda: ready(200), timeout=20, what="/readyz 200 with a worker")
    assert body["status"] == "ready" and body["checks"]["workers"]["ok"] and body["checks"]["ledger"]["ok"]
    stack.stop("worker")
    body = wait_for(lambda: ready(503), timeout=20, what="/readyz 503 without a worker")
    assert (
        body["status"] == "not_ready"
        and not body["checks"]["workers"]["ok"]
        and body["checks"]["redis"]["ok"]
    )
