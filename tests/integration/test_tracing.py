"""One trace from the webhook to every attempt, across real processes and a lost message.

The receiver, worker and beat export to a local OTLP collector (``tests.otlp``) with the
standard variables; the caller sends a W3C ``traceparent`` and an ``X-Request-ID``.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import alert_payload
from tests.otlp import Collector, Span, ancestors
from tests.stack import INGEST_TOKEN, Stack, wait_for
from workers.tasknames import QUEUE_ALERTS


@pytest.fixture
def collector() -> Any:
    found = Collector()
    yield found
    found.close()


def _post(
    stack: Stack, payload: dict[str, Any], *, trace_id: str, parent: str, request_id: str
) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/api/v1/alertmanager",
        content=json.dumps(payload).encode(),
        headers={
            "Authorization": f"Bearer {INGEST_TOKEN}",
            "Content-Type": "application/json",
            "traceparent": f"00-{trace_id}-{parent}-01",
            "X-Request-ID": request_id,
        },
        timeout=15,
    )


def test_webhook_span_is_an_ancestor_of_every_attempt_however_delivered(
    collector: Collector, stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """Two webhooks, each with the caller's trace: A's run fails once (503) and is retried;
    B's handle_alert message is lost in Redis and the reconciler sends it again from the ledger.
    Every attempt span of both runs is in its webhook's trace, under the receiver's request
    span; the runs API gives the trace id and correlation id, and the worker's log lines carry
    them."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "traced",
                "match": ['alertname="ResponderTraced"'],
                "remediation": "http_request",
                "params": {"url": "http://127.0.0.1:{target}/traced/{{ labels.instance }}"},
            }
        ],
        overrides={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    stack.target.fail_first["/traced/a"] = 1
    traces = {name: secrets.token_hex(16) for name in ("a", "b")}
    callers = {name: secrets.token_hex(8) for name in ("a", "b")}
    request_ids = {name: f"req-{name}-{secrets.token_hex(4)}" for name in ("a", "b")}

    # B: accepted while no worker runs, then its message is lost (a Redis that forgot it).
    stack.start_receiver()
    answer = _post(
        stack,
        alert_payload("ResponderTraced", instance="b"),
        trace_id=traces["b"],
        parent=callers["b"],
        request_id=request_ids["b"],
    )
    assert answer.status_code == 202
    assert answer.headers["x-request-id"] == request_ids["b"]
    assert redis.Redis.from_url(stack.redis.url).delete(QUEUE_ALERTS) == 1

    stack.start_worker()
    stack.start_beat()
    assert (
        _post(
            stack,
            alert_payload("ResponderTraced", instance="a"),
            trace_id=traces["a"],
            parent=callers["a"],
            request_id=request_ids["a"],
        ).status_code
        == 202
    )
    runs = {
        name: stack.wait_run("succeeded", timeout=40, rule="traced", fingerprint=fingerprint)
        for name, fingerprint in (
            ("a", alert_payload("ResponderTraced", instance="a")["alerts"][0]["fingerprint"]),
            ("b", alert_payload("ResponderTraced", instance="b")["alerts"][0]["fingerprint"]),
        )
    }
    assert len(runs["a"]["attempts"]) == 2
    assert stack.count("worker", "reconciled") >= 1  # B came back through the reconciler

    def exported() -> list[Span] | None:
        spans = collector.snapshot()
        attempts = [s for s in spans if s.name == "attempt"]
        return spans if len(attempts) >= 3 else None

    spans = wait_for(exported, timeout=20, what="3 attempt spans exported")
    for name, run in runs.items():
        assert run["trace_id"] == traces[name]
        assert run["correlation_id"] == request_ids[name]
        (request_span,) = [
            s
            for s in spans
            if s.service == "responder-receiver"
            and s.trace_id == traces[name]
            and s.parent_id == callers[name]
        ]
        assert "/api/v1/alertmanager" in request_span.name
        attempts = [s for s in spans if s.name == "attempt" and s.attributes.get("run.id") == run["id"]]
        assert len(attempts) == len(run["attempts"])
        for attempt in attempts:
            chain = ancestors(attempt, spans)
            assert attempt.trace_id == traces[name]
            assert request_span in chain, [s.name for s in chain]
            assert {"remediation", "target", "attempt", "outcome"} <= set(attempt.attributes)
            services = {s.service for s in chain}
            assert {"responder-receiver", "responder-worker"} <= services
        assert sorted(a.attributes["outcome"] for a in attempts) == (
            ["retry", "succeeded"] if name == "a" else ["succeeded"]
        )
        (plan,) = [s for s in spans if s.name == "plan_alert" and s.trace_id == traces[name]]
        decided = [attrs for event, attrs in plan.events if event == "run_decided"]
        assert decided == [
            {
                "run.id": run["id"],
                "rule": "traced",
                "remediation": "http_request",
                "status": "queued",
                "reason": "",
            }
        ]

    lines = [json.loads(line) for line in stack.log("worker").splitlines() if line.startswith("{")]
    started = [
        line for line in lines if line["event"] == "attempt_started" and line.get("run_id") == runs["a"]["id"]
    ]
    assert len(started) == 2
    for line in started:
        assert line["trace_id"] == traces["a"] and line["correlation_id"] == request_ids["a"]
        assert line["service"] == "responder-worker" and len(line["span_id"]) == 16
    access = [
        json.loads(line)
        for line in stack.log("receiver").splitlines()
        if '"http_request"' in line and request_ids["a"] in line
    ]
    assert access and access[0]["route"] == "/api/v1/alertmanager" and access[0]["status"] == 202
    assert access[0]["trace_id"] == traces["a"]
