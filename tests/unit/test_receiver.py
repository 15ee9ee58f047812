"""The receiver's HTTP contract: auth, limits, validation, durable 202, 503, the runs API."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select

from receiver.app import create_app
from tests.helpers import FIXTURES, RecordingPublisher, alert_payload
from workers.dev import EmbeddedRedis
from workers.heartbeat import Heartbeat
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent
from workers.settings import Settings

INGEST = {"Authorization": "Bearer ingest-secret-1"}
OPERATOR = {"Authorization": "Bearer operator-secret-1"}


def make_client(settings: Settings, publisher: RecordingPublisher) -> TestClient:
    return TestClient(create_app(settings=settings, publisher=publisher), raise_server_exceptions=False)


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return Settings(
        database_url=sqlite_url,
        ingest_tokens="ingest-secret-1,ingest-secret-2",
        operator_tokens="operator-secret-1",
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
def publisher(settings: Settings) -> RecordingPublisher:
    return RecordingPublisher(settings)


@pytest.fixture
def client(settings: Settings, publisher: RecordingPublisher) -> Iterator[TestClient]:
    with make_client(settings, publisher) as c:
        yield c


def body(name: str = "single_firing.json") -> bytes:
    return (FIXTURES / name).read_bytes()


def test_healthz_needs_no_auth(client: TestClient) -> None:
    """GET /healthz answers 200 without a token."""
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer nope"}, 401, "unauthorized"),
        ({"Authorization": "Basic aW5nZXN0LXNlY3JldC0xOg=="}, 401, "unauthorized"),
        (OPERATOR, 403, "forbidden"),
    ],
)
def test_ingest_auth(client: TestClient, headers: dict[str, str], status: int, code: str) -> None:
    """Missing or unknown tokens get 401, a token of the wrong scope 403; the body names no secret."""
    response = client.post("/api/v1/alertmanager", content=body(), headers=headers)
    assert response.status_code == status
    assert response.json()["error"] == code
    assert "secret" not in response.text


def test_runs_need_operator_scope(client: TestClient) -> None:
    """An ingest token cannot read runs."""
    assert client.get("/api/v1/runs", headers=INGEST).status_code == 403
    assert client.get("/api/v1/runs").status_code == 401


def test_pause_and_resume_record_who_and_why(client: TestClient) -> None:
    """Operators pause and resume with who and why; the state and its history are served;
    an ingest token may not pause, and a request without who or why is refused with the field."""
    assert client.get("/api/v1/pause", headers=OPERATOR).json() == {
        "paused": False,
        "by": None,
        "reason": None,
        "since": None,
        "history": [],
    }
    ask = {"by": "alice", "reason": "database failover in progress"}
    assert client.post("/api/v1/pause", json=ask, headers=INGEST).status_code == 403
    missing = client.post("/api/v1/pause", json={"by": "alice"}, headers=OPERATOR)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "reason"]
    paused = client.post("/api/v1/pause", json=ask, headers=OPERATOR).json()
    assert (paused["paused"], paused["by"], paused["reason"]) == (True, "alice", ask["reason"])
    assert client.get("/api/v1/pause", headers=OPERATOR).json()["paused"] is True
    resumed = client.post("/api/v1/resume", json={"by": "bob", "reason": "failover done"}, headers=OPERATOR)
    state = resumed.json()
    assert (state["paused"], state["by"]) == (False, "bob")
    assert [(h["paused"], h["by"]) for h in state["history"]] == [(False, "bob"), (True, "alice")]


def test_accepts_then_reports_duplicates(client: TestClient, publisher: RecordingPublisher) -> None:
    """202 per alert: accepted the first time, duplicate after; only new events are published."""
    first = client.post("/api/v1/alertmanager", content=body("group3_firing.json"), headers=INGEST)
    assert first.status_code == 202
    alerts = first.json()["alerts"]
    assert [a["result"] for a in alerts] == ["accepted"] * 3
    assert set(alerts[0]) == {"fingerprint", "starts_at", "status", "result", "event_id"}
    again = client.post(
        "/api/v1/alertmanager",
        content=body("group3_firing.json"),
        headers={"Authorization": "Bearer ingest-secret-2"},
    )
    assert [a["result"] for a in again.json()["alerts"]] == ["duplicate"] * 3
    assert [a["event_id"] for a in again.json()["alerts"]] == [a["event_id"] for a in alerts]
    assert publisher.alerts == [a["event_id"] for a in alerts]


def test_a_webhook_without_alerts_is_answered_and_records_nothing(
    client: TestClient, publisher: RecordingPublisher
) -> None:
    """An empty ``alerts`` list (Alertmanager never sends one; a client may) is a 202 with
    nothing in it, not a ledger error."""
    empty = json.loads(body("group3_firing.json"))
    empty["alerts"] = []
    answer = client.post("/api/v1/alertmanager", json=empty, headers=INGEST)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"alerts": [], "truncated_alerts": 0}
    assert publisher.alerts == []


def test_mixed_group_is_handled_per_alert(client: TestClient) -> None:
    """A partially resolved group records each alert under its own status."""
    client.post("/api/v1/alertmanager", content=body("group3_firing.json"), headers=INGEST)
    response = client.post(
        "/api/v1/alertmanager", content=body("group3_partial_resolved.json"), headers=INGEST
    )
    results = {(a["status"], a["result"]) for a in response.json()["alerts"]}
    assert ("resolved", "accepted") in results and ("firing", "duplicate") in results


def test_truncated_alerts_are_reported(client: TestClient) -> None:
    """truncatedAlerts is echoed and counted in the metrics."""
    response = client.post(
        "/api/v1/alertmanager", content=body("truncated_max_alerts_2.json"), headers=INGEST
    )
    assert response.json()["truncated_alerts"] == 1
    assert "responder_alerts_truncated_total 1.0" in client.get("/metrics").text


def test_body_limit(client: TestClient, settings: Settings) -> None:
    """Over the limit is 413, by Content-Length or while streaming."""
    big = b"{" + b" " * settings.max_body_bytes + b"}"
    assert client.post("/api/v1/alertmanager", content=big, headers=INGEST).status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    response = client.post("/api/v1/alertmanager", content=chunks(), headers=INGEST)
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"


def test_default_limit_takes_a_large_group(sqlite_url: str, publisher: RecordingPublisher) -> None:
    """The 4 MiB default accepts a 1,000-alert group with 10,000-character labels' neighbours."""
    settings = Settings(database_url=sqlite_url, ingest_tokens="ingest-secret-1")
    raw = json.loads(body())
    template = raw["alerts"][0]
    raw["alerts"] = [
        {
            **template,
            "fingerprint": f"{i:016x}",
            "labels": {**template["labels"], "i": str(i), "big": "x" * 3000},
        }
        for i in range(1000)
    ]
    payload = json.dumps(raw).encode()
    assert len(payload) > 3_000_000
    with make_client(settings, publisher) as c:
        response = c.post("/api/v1/alertmanager", content=payload, headers=INGEST)
    assert response.status_code == 202 and len(response.json()["alerts"]) == 1000


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"not json", None),
        (b'{"version": "4", "status": "firing"}', "alerts"),
        (json.dumps({**json.loads(body()), "version": "3"}).encode(), "version"),
        (
            body().replace(b'"status": "firing",\n      "labels"', b'"status": "exploded",\n      "labels"'),
            "status",
        ),
        (body().replace(b"2026-11-23T05:02:19.803814981Z", b"yesterday"), "startsAt"),
        (body().replace(b"2026-11-23T05:02:19.803814981Z", b"2026-13-45T99:99:99Z"), "startsAt"),
        (body().replace(b"2026-11-23T05:02:19.803814981Z", b"9999-12-31T23:59:59-23:59"), "startsAt"),
        (body().replace(b"2026-11-23T05:02:19.803814981Z", b"0001-01-01T00:00:00+01:00"), "startsAt"),
        (json.dumps({**json.loads(body()), "truncatedAlerts": 10**400}).encode(), "truncatedAlerts"),
        (json.dumps({**json.loads(body()), "receiver": "a\x00b"}).encode(), "receiver"),
        (json.dumps({**json.loads(body()), "groupKey": "{}:\x00"}).encode(), "groupKey"),
        (body().replace(b'"generatorURL": "', b'"generatorURL": "\\u0000'), "generatorURL"),
    ],
)
def test_invalid_payload_is_422_with_field_errors(
    client: TestClient, content: bytes, field: str | None
) -> None:
    """A malformed body gets 422 and says which field is wrong, without echoing input."""
    response = client.post("/api/v1/alertmanager", content=content, headers=INGEST)
    assert response.status_code == 422
    data = response.json()
    assert data["error"] == "invalid_payload"
    if field:
        assert any(field in e["loc"] for e in data["detail"])
    assert all("input" not in e for e in data["detail"])


def test_unknown_keys_are_accepted(client: TestClient) -> None:
    """Fields a newer Alertmanager adds do not cause a 4xx (which would be final)."""
    raw = json.loads(body())
    raw["somethingNew"] = [1, 2]
    raw["alerts"][0]["alsoNew"] = True
    assert client.post("/api/v1/alertmanager", json=raw, headers=INGEST).status_code == 202


def test_broker_down_still_202_and_left_for_reconciler(settings: Settings) -> None:
    """With the broker down the alert is recorded, 202 is answered, and it stays unenqueued."""
    with make_client(settings, RecordingPublisher(settings, fail=True)) as c:
        response = c.post("/api/v1/alertmanager", content=body(), headers=INGEST)
    assert response.status_code == 202
    with transaction(settings.database_url) as session:
        events = session.scalars(select(AlertEvent)).all()
        assert len(events) == 1 and events[0].enqueued_at is None


def test_ledger_unreachable_is_503_without_secrets(tmp_path: Path, publisher: RecordingPublisher) -> None:
    """When the ledger cannot record, 503 (Alertmanager retries) and nothing secret in the body."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/no/such/dir/ledger.db",
        ingest_tokens="ingest-secret-1",
    )
    with make_client(settings, publisher) as c:
        response = c.post("/api/v1/alertmanager", content=body(), headers=INGEST)
    assert response.status_code == 503
    assert response.json()["error"] == "ledger_unavailable"
    assert "secret" not in response.text and str(tmp_path) not in response.text
    assert publisher.alerts == []


def _seed_runs(url: str) -> None:
    with transaction(url) as session:
        for rule, status, params in (
            (
                "r1",
                "succeeded",
                {"url": "http://x/", "headers": {"Authorization": "Bearer s3cr3t"}, "api_key": "k"},
            ),
            ("r2", "failed", {"command": "c"}),
        ):
            repository.insert_runs(
                session,
                [
                    {
                        "id": repository.new_id(),
                        "dedupe_key": f"alert:fp-{rule}:2026-11-23T05:02:19.000000000Z:{rule}",
                        "fingerprint": f"fp-{rule}",
                        "starts_at": "2026-11-23T05:02:19.000000000Z",
                        "rule": rule,
                        "remediation": "http_request",
                        "params": params,
                        "timeout_s": 1.0,
                        "mode": "enforce",
                        "trigger": "alert",
                        "status": status,
                    }
                ],
            )


def test_runs_api_filters_newest_first_and_redacts(client: TestClient, settings: Settings) -> None:
    """GET /api/v1/runs filters by status, rule, remediation, fingerprint; secrets are redacted."""
    _seed_runs(settings.database_url)
    runs = client.get("/api/v1/runs", headers=OPERATOR).json()["runs"]
    assert [r["rule"] for r in runs] == ["r2", "r1"]
    assert client.get("/api/v1/runs?status=failed", headers=OPERATOR).json()["runs"][0]["rule"] == "r2"
    assert client.get("/api/v1/runs?rule=r1", headers=OPERATOR).json()["runs"][0]["status"] == "succeeded"
    assert client.get("/api/v1/runs?fingerprint=fp-r2", headers=OPERATOR).json()["runs"][0]["rule"] == "r2"
    assert client.get("/api/v1/runs?remediation=run_command", headers=OPERATOR).json()["runs"] == []
    r1 = client.get("/api/v1/runs?rule=r1", headers=OPERATOR).json()["runs"][0]
    assert r1["params"]["headers"]["Authorization"] == "[REDACTED]"
    assert r1["params"]["api_key"] == "[REDACTED]" and r1["params"]["url"] == "http://x/"
    one = client.get(f"/api/v1/runs/{r1['id']}", headers=OPERATOR).json()
    assert one["id"] == r1["id"] and one["attempts"] == [] and "s3cr3t" not in json.dumps(one)
    missing = client.get("/api/v1/runs/nope", headers=OPERATOR)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert client.get("/api/v1/runs?status=exploded", headers=OPERATOR).status_code == 422


def test_firing_probe_payload_from_helpers(client: TestClient) -> None:
    """The helper payload used by integration tests is accepted as is."""
    assert client.post("/api/v1/alertmanager", json=alert_payload(), headers=INGEST).status_code == 202


def test_receiver_imports_no_remediation_code() -> None:
    """The receiver publishes by task name: importing it loads neither remediations nor tasks,
    only the exception tree its errors belong to (``remediations.errors``)."""
    code = (
        "import sys, receiver.app; receiver.app.create_app(); "
        "tree = ('remediations', 'remediations.errors'); "
        "bad = [m for m in sys.modules if m.startswith(('remediations', 'workers.tasks', 'workers.planner', 'workers.runner', 'httpx', 'tenacity')) and m not in tree]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_served_app_starts_when_the_broker_and_ledger_are_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm-up at startup (ledger and broker connections) may fail: the receiver still
    starts and answers, and the failure is logged; the first webhook meets it and answers 503."""
    from structlog.testing import capture_logs

    from receiver.app import serve_app
    from workers.settings import get_settings

    monkeypatch.setenv("RESPONDER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("RESPONDER_DATABASE_URL", f"sqlite:///{tmp_path}/no/such/dir/ledger.db")
    monkeypatch.setenv("RESPONDER_INGEST_TOKENS", "ingest-secret-1")
    monkeypatch.setenv("RESPONDER_PUBLISH_CONNECT_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    try:
        with capture_logs() as logs, TestClient(serve_app(), raise_server_exceptions=False) as client:
            assert client.get("/healthz").status_code == 200
            response = client.post("/api/v1/alertmanager", content=body(), headers=INGEST)
            assert response.status_code == 503 and response.json()["error"] == "ledger_unavailable"
    finally:
        get_settings.cache_clear()
    assert [e["error_type"] for e in logs if e["event"] == "intake_warm_up_failed"] == ["OperationalError"]


def test_request_id_is_taken_or_made_and_returned(client: TestClient) -> None:
    """A sane X-Request-ID comes back as given; a hostile one is replaced by a fresh id; every
    request has one access line (route template, status, duration, bytes; no body, no token)."""
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        given = client.post(
            "/api/v1/alertmanager", content=body(), headers={**INGEST, "X-Request-ID": "am-42"}
        )
        hostile = client.get("/api/v1/runs/nope", headers={**OPERATOR, "X-Request-ID": "a b <script>"})
    assert given.status_code == 202 and given.headers["x-request-id"] == "am-42"
    assert hostile.status_code == 404
    made = hostile.headers["x-request-id"]
    assert len(made) == 32 and made != "a b <script>"
    access = {line["correlation_id"]: line for line in logs if line["event"] == "http_request"}
    assert set(access) == {"am-42", made}
    assert access["am-42"]["route"] == "/api/v1/alertmanager" and access["am-42"]["status"] == 202
    assert access[made]["route"] == "/api/v1/runs/{run_id}" and access[made]["status"] == 404
    assert access[made]["bytes"] > 0 and access[made]["method"] == "GET"
    assert access[made]["duration_ms"] >= 0
    assert "ingest-secret" not in repr(logs) and "alertname" not in repr(access)
    assert access["am-42"]["accepted"] == 1 and access["am-42"]["duplicate"] == 0


def test_readyz_names_what_is_down(
    settings: Settings, publisher: RecordingPublisher, redis_server: EmbeddedRedis
) -> None:
    """Ready only with Redis, the ledger and a fresh worker heartbeat; otherwise 503 with each
    check's state, latency and error."""
    live = settings.model_copy(update={"redis_url": redis_server.url, "heartbeat_key": "test:readyz:workers"})
    with make_client(live, publisher) as c:
        answer = c.get("/readyz")
        assert answer.status_code == 503
        checks = answer.json()["checks"]
        assert checks["redis"]["ok"] and checks["ledger"]["ok"] and not checks["workers"]["ok"]
        assert "no worker heartbeat" in checks["workers"]["error"]
        Heartbeat(live, "w1@host").beat(redis.Redis.from_url(redis_server.url))
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and list(ready["checks"]["workers"]["workers"]) == ["w1@host"]
        assert all("latency_ms" in check for check in ready["checks"].values())
        Heartbeat(live, "w1@host").stop()  # a clean shutdown takes the worker out at once
        assert c.get("/readyz").status_code == 503
    dead = live.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with make_client(dead, publisher) as c:
        answer = c.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["redis"] == {
            "ok": False,
            "error": "ConnectionError",
            "latency_ms": answer.json()["checks"]["redis"]["latency_ms"],
        }
        assert answer.json()["checks"]["ledger"]["ok"]


@pytest.mark.parametrize("instrument", [True, False])
def test_the_callers_trace_continues_into_the_ledger(
    settings: Settings, publisher: RecordingPublisher, instrument: bool, spans: InMemorySpanExporter
) -> None:
    """With the FastAPI instrumentation, or without it (a process that records no spans makes
    the request's span itself): the event keeps a context in the caller's trace, whose parent
    is the request's own span, and the request id."""
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    app = create_app(settings=settings, publisher=publisher, instrument=instrument)
    with TestClient(app) as client:
        response = client.post(
            "/api/v1/alertmanager",
            content=body(),
            headers={**INGEST, "traceparent": f"00-{caller_trace}-{caller_span}-01", "X-Request-ID": "am-7"},
        )
    assert response.status_code == 202
    with transaction(settings.database_url) as session:
        [event] = session.scalars(select(AlertEvent)).all()
    stored = event.trace_context or {}
    _, trace_id, parent, _ = stored["traceparent"].split("-")
    assert trace_id == caller_trace and parent != caller_span
    assert stored["x_request_id"] == "am-7"
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert format(server.context.span_id, "016x") == parent


def test_the_webhook_keeps_its_place_in_the_openapi_document(client: TestClient) -> None:
    """The webhook's route skips FastAPI's parameter resolution (``DirectRoute``), not its
    documentation: its answer and its bearer scheme are still described."""
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/api/v1/alertmanager"]["post"]
    assert "202" in operation["responses"]
    assert operation["security"] == [{"HTTPBearer": []}]
