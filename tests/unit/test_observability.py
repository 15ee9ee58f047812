"""Observability in one process: trace context kept in the ledger, spans parented from it, a run's
summary line, slow statements."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
import structlog
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from receiver.app import create_app
from tests.helpers import RecordingPublisher, alert_payload, compat_config
from tests.stack import TargetServer
from workers import runner, tracing
from workers.alerts import WebhookPayload
from workers.config import ResponderConfig, parse_config
from workers.ledger import db, repository
from workers.ledger.db import transaction
from workers.ledger.models import Run
from workers.planner import handle_events
from workers.settings import Settings


@pytest.fixture
def target() -> Iterator[TargetServer]:
    server = TargetServer()
    yield server
    server.close()


def test_request_ids_and_carriers_are_checked() -> None:
    """A hostile X-Request-ID is refused; a stored carrier yields its trace id and only the
    headers it should."""
    assert tracing.request_id("abc-123.x") == "abc-123.x"
    assert tracing.request_id("a b") is None
    assert tracing.request_id("x" * 129) is None
    assert tracing.request_id("\r\nSet-Cookie: a") is None
    trace_id = secrets.token_hex(16)
    carrier = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "x_request_id": "r1", "evil": "1"}
    assert tracing.trace_id(carrier) == trace_id
    assert tracing.trace_id({"traceparent": "garbage"}) is None
    assert set(tracing.headers(carrier)) == {"traceparent", "x_request_id"}


def test_a_span_from_the_ledger_links_the_delivery_of_another_trace(spans: InMemorySpanExporter) -> None:
    """Started from a stored carrier while a span of another trace is current (a reconciler's
    delivery), the span is a child of the stored context and links the current span."""
    stored_trace, stored_parent = secrets.token_hex(16), secrets.token_hex(8)
    carrier = {"traceparent": f"00-{stored_trace}-{stored_parent}-01"}
    with tracing.tracer.start_as_current_span("delivery") as delivery:
        span = tracing.start_span("plan_alert", carrier, fingerprint="f1", ignored=None)
        span.end()
    (done,) = [s for s in spans.get_finished_spans() if s.name == "plan_alert"]
    assert format(done.context.trace_id, "032x") == stored_trace
    assert done.parent is not None and format(done.parent.span_id, "016x") == stored_parent
    assert [link.context.span_id for link in done.links] == [delivery.get_span_context().span_id]
    assert dict(done.attributes or {}) == {"fingerprint": "f1"}


def test_runs_and_attempts_continue_the_webhooks_trace(
    sqlite_url: str, spans: InMemorySpanExporter, target: TargetServer
) -> None:
    """An event recorded with its webhook's context: the planning span is its child, the run
    keeps the planning span's context (and the correlation id), and the attempt is the run's
    child, with what it did as attributes and the guard decision as an event."""
    config = parse_config(compat_config(target.port))
    payload = WebhookPayload.model_validate(alert_payload("ResponderProbe", instance="t1"))
    webhook_trace = secrets.token_hex(16)
    carrier = {"traceparent": f"00-{webhook_trace}-{secrets.token_hex(8)}-01", tracing.REQUEST_ID: "req-7"}
    with transaction(sqlite_url) as session:
        (recorded,) = repository.record_notifications(
            session, [repository.Notification(payload.alerts, "r", "g", carrier)]
        )
    settings = Settings(database_url=sqlite_url)
    (run_id,) = handle_events(
        event_ids=[recorded[0].event_id],
        settings=settings,
        config=config,
        publisher=RecordingPublisher(settings),
    )
    with transaction(sqlite_url) as session:
        run = session.get(Run, run_id)
        assert run is not None
        stored = dict(run.trace_context or {})
    assert tracing.trace_id(stored) == webhook_trace and stored[tracing.REQUEST_ID] == "req-7"
    (plan,) = [s for s in spans.get_finished_spans() if s.name == "plan_alert"]
    assert format(plan.context.trace_id, "032x") == webhook_trace
    assert stored["traceparent"].split("-")[2] == format(plan.context.span_id, "016x")
    decided = [dict(e.attributes or {}) for e in plan.events if e.name == "run_decided"]
    assert decided == [
        {
            "run.id": run_id,
            "rule": "probe-http",
            "remediation": "http_request",
            "status": "queued",
            "reason": "",
        }
    ]

    execution = runner.execute(run_id=run_id, task_id="t", settings=settings, config=config)
    assert execution.outcome == "succeeded"
    (attempt,) = [s for s in spans.get_finished_spans() if s.name == "attempt"]
    assert attempt.parent is not None and attempt.parent.span_id == plan.context.span_id
    attributes = dict(attempt.attributes or {})
    assert attributes["run.id"] == run_id and attributes["outcome"] == "succeeded"
    assert attributes["attempt"] == 1 and attributes["remediation"] == "http_request"
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_a_run_ends_with_one_summary_line(sqlite_url: str, target: TargetServer) -> None:
    """A run that fails once and then succeeds has one run_finished line, after its second
    attempt: outcome, attempts, duration."""
    config = parse_config(compat_config(target.port))
    payload = WebhookPayload.model_validate(alert_payload("ResponderProbe", instance="s1"))
    with transaction(sqlite_url) as session:
        (recorded,) = repository.record_notifications(
            session, [repository.Notification(payload.alerts, "r", "g")]
        )
    settings = Settings(database_url=sqlite_url, retry_backoff_s=0)
    (run_id,) = handle_events(
        event_ids=[recorded[0].event_id],
        settings=settings,
        config=config,
        publisher=RecordingPublisher(settings),
    )
    target.status = 503
    with structlog.testing.capture_logs() as logs:
        first = runner.execute(run_id=run_id, task_id="t1", settings=settings, config=config)
        target.status = 200
        second = runner.execute(run_id=run_id, task_id="t2", settings=settings, config=config)
    assert (first.outcome, second.outcome) == ("retry", "succeeded")
    (summary,) = [line for line in logs if line["event"] == "run_finished"]
    assert summary["outcome"] == "succeeded" and summary["attempts"] == 2 and summary["error"] is None
    assert summary["duration_ms"] > 0


def test_slow_statements_are_logged_without_their_parameters(sqlite_url: str) -> None:
    """A statement over the threshold is one slow_statement line with its duration and SQL;
    the bound values are not in it."""
    db.configure(lock_timeout_s=2, slow_statement_s=0.05)
    try:
        engine = db.make_engine(sqlite_url)
        engine.pool.connect().close()  # connect outside the measured statement
        with structlog.testing.capture_logs() as logs, engine.connect() as connection:
            connection.execute(sa.text("SELECT :secret"), {"secret": "canary-value"})
            connection.exec_driver_sql(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) "
                "SELECT count(*) FROM n"
            )
        engine.dispose()
    finally:
        db.configure(lock_timeout_s=30, slow_statement_s=0.5)
    (slow,) = [line for line in logs if line["event"] == "slow_statement"]
    assert slow["statement"].startswith("WITH RECURSIVE n(i)") and slow["duration_ms"] >= 50
    assert "canary-value" not in repr(logs)


def _handle_payload(
    url: str, payload: dict[str, object], config: ResponderConfig, settings: Settings
) -> list[str]:
    parsed = WebhookPayload.model_validate(payload)
    with transaction(url) as session:
        (recorded,) = repository.record_notifications(
            session, [repository.Notification(parsed.alerts, "r", "g")]
        )
    return handle_events(
        event_ids=[r.event_id for r in recorded],
        settings=settings,
        config=config,
        publisher=RecordingPublisher(settings),
    )


def test_time_to_resolve_and_firing_again_are_measured(sqlite_url: str, target: TargetServer) -> None:
    """A succeeded run whose alert resolves 90 s later: resolved_at on the run, 90 s in the
    runs API and in responder_time_to_resolve_seconds (once, however often the resolution is
    repeated); a new episode 10 minutes after counts as firing again for the rule."""
    config = parse_config(compat_config(target.port))
    settings = Settings(database_url=sqlite_url, operator_tokens="op", ingest_tokens="in")
    firing = alert_payload("ResponderProbe", instance="r1")
    (run_id,) = _handle_payload(sqlite_url, firing, config, settings)
    assert runner.execute(run_id=run_id, task_id="t", settings=settings, config=config).outcome == "succeeded"
    with transaction(sqlite_url) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.finished_at is not None
        finished = run.finished_at
    resolved = alert_payload("ResponderProbe", status="resolved", instance="r1")
    resolved["alerts"][0]["startsAt"] = firing["alerts"][0]["startsAt"]
    resolved["alerts"][0]["endsAt"] = (finished + timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    count = ("responder_time_to_resolve_seconds_count", {"rule": "probe-http"})
    total = ("responder_time_to_resolve_seconds_sum", {"rule": "probe-http"})
    before = (REGISTRY.get_sample_value(*count) or 0, REGISTRY.get_sample_value(*total) or 0)
    _handle_payload(sqlite_url, resolved, config, settings)
    resolved["alerts"][0]["annotations"] = {"again": "yes"}
    resolved["groupKey"] = "another"
    _handle_payload(sqlite_url, resolved, config, settings)  # a duplicate: nothing recorded twice
    assert (REGISTRY.get_sample_value(*count) or 0) - before[0] == 1
    assert abs((REGISTRY.get_sample_value(*total) or 0) - before[1] - 90) < 0.01
    with TestClient(create_app(settings=settings, publisher=RecordingPublisher(settings))) as client:
        shown = client.get(f"/api/v1/runs/{run_id}", headers={"Authorization": "Bearer op"}).json()
    assert shown["time_to_resolve_s"] == 90.0 and shown["resolved_at"] is not None

    refired = ("responder_alert_refired_total", {"rule": "probe-http"})
    before_refired = REGISTRY.get_sample_value(*refired) or 0
    again = alert_payload("ResponderProbe", instance="r1")
    again["alerts"][0]["startsAt"] = (finished + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    _handle_payload(sqlite_url, again, config, settings)
    assert (REGISTRY.get_sample_value(*refired) or 0) - before_refired == 1


def test_without_an_exporter_spans_are_not_recorded_but_their_ids_travel() -> None:
    """No exporter and no sampler set: a span is not recorded (nothing would receive it), yet it
    has a valid trace id that the carrier, and so the ledger and the messages, carry."""
    code = (
        "from opentelemetry import trace\n"
        "from workers import tracing\n"
        "tracing.configure_tracing('worker')\n"
        "with tracing.tracer.start_as_current_span('x') as span:\n"
        "    carrier = tracing.current_carrier('r-1')\n"
        "    print(span.is_recording(), tracing.trace_id(carrier) is not None, carrier['x_request_id'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True", "r-1"], done.stderr
