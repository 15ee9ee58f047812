"""Secrets: references in the config and the ledger, values only as a remediation runs, and
redacted wherever they could leak (logs, spans, the ledger, the runs API). The canary test."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from receiver.app import create_app
from remediations.base import SECRET_REFERENCE_MARKS
from tests.helpers import RecordingPublisher, alert_payload, compat_config
from tests.stack import TargetServer
from workers import references, runner, secrets, telemetry
from workers.alerts import WebhookPayload
from workers.config import parse_config
from workers.ledger import repository
from workers.ledger.db import make_engine, transaction
from workers.planner import handle_events
from workers.settings import Settings

CANARY = "canary-7f3a9c1e55d04b2b"  # the token
HEADER_CANARY = "hdr-canary-0b1c2d3e4f"  # the Authorization header's secret


@pytest.fixture
def target() -> Iterator[TargetServer]:
    server = TargetServer()
    yield server
    server.close()


def test_references_resolve_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference resolves from RESPONDER_SECRET_<NAME>, else the secrets directory (trailing
    newline dropped); a missing one is an error naming the secret and where it was looked for;
    a name that could climb out of the directory is refused."""
    monkeypatch.setenv("RESPONDER_SECRET_FROM_ENV", "e-value")
    (tmp_path / "FROM_FILE").write_text("f-value\n")
    monkeypatch.setenv("RESPONDER_SECRETS_DIR", str(tmp_path))
    params = {"a": secrets.reference("FROM_ENV"), "b": [f"x{secrets.reference('FROM_FILE')}y"], "n": 3}
    found: dict[str, str] = {}
    assert secrets.resolve(params, found) == {"a": "e-value", "b": ["xf-valuey"], "n": 3}
    assert found == {"FROM_ENV": "e-value", "FROM_FILE": "f-value"}
    assert secrets.names(params) == {"FROM_ENV", "FROM_FILE"}
    with pytest.raises(secrets.SecretError, match="secret MISSING is not set"):
        secrets.resolve({"x": secrets.reference("MISSING")})
    with pytest.raises(secrets.SecretError, match="bad secret name"):
        secrets.reference("../etc/passwd")
    assert secrets.shown(params) == {"a": "{secret:FROM_ENV}", "b": ["x{secret:FROM_FILE}y"], "n": 3}


def test_the_receiver_and_the_remediations_agree_on_the_marks() -> None:
    """The reference's characters are the ones a remediation's validator lets through."""
    assert "".join(map(chr, SECRET_REFERENCE_MARKS)) == references.OPEN + references.CLOSE


def test_canary_secrets_appear_nowhere_but_at_the_target(
    sqlite_url: str,
    target: TargetServer,
    spans: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secrets in a token (URL query), a header ({secret: NAME}) and a body; the target fails
    once with an error that carries the URL and echoes the secret, then succeeds. The target
    receives the real values; the logs (the real JSON pipeline, tracebacks included), the spans,
    every table of the ledger and the runs API hold neither. A label that tries to forge a
    reference gets nothing resolved."""
    monkeypatch.setenv("RESPONDER_SECRET_HOOK_TOKEN", CANARY)
    monkeypatch.setenv("RESPONDER_SECRET_API_KEY", HEADER_CANARY)
    raw = compat_config(target.port)
    raw["rules"].insert(
        0,
        {
            "name": "chat-hook",
            "match": ['alertname="SecretProbe"'],
            "remediation": "http_request",
            "params": {
                "url": f"http://127.0.0.1:{target.port}/hook/{{{{ labels.instance }}}}"
                "?token={{ secret('HOOK_TOKEN') }}",
                "headers": {"X-Api-Key": {"secret": "API_KEY"}},
                "json": {"text": "firing {{ labels.instance }}", "sig": "{{ secret('HOOK_TOKEN') }}"},
            },
        },
    )
    config = parse_config(raw)
    forged = "\ue000secret:API_KEY\ue001"
    payload = WebhookPayload.model_validate(alert_payload("SecretProbe", instance=f"h1{forged}"))
    settings = Settings(database_url=sqlite_url, retry_backoff_s=0, ingest_tokens="i", operator_tokens="op")
    telemetry.configure_logging(fmt="json", level="DEBUG")
    try:
        with transaction(sqlite_url) as session:
            (recorded,) = repository.record_notifications(
                session, [repository.Notification(payload.alerts, "r", "g")]
            )
        (run_id,) = handle_events(
            event_ids=[recorded[0].event_id],
            settings=settings,
            config=config,
            publisher=RecordingPublisher(settings),
        )
        target.fail_first[f"/hook/h1secret:API_KEY?token={CANARY}"] = 1
        first = runner.execute(run_id=run_id, task_id="t1", settings=settings, config=config)
        second = runner.execute(run_id=run_id, task_id="t2", settings=settings, config=config)
        structlog.get_logger("canary").error("boom", exc_info=RuntimeError(f"failed at {CANARY}"))
        logging.getLogger("celery.canary").error("stdlib line with %s", HEADER_CANARY)
        with TestClient(create_app(settings=settings, publisher=RecordingPublisher(settings))) as client:
            api = client.get(f"/api/v1/runs/{run_id}", headers={"Authorization": "Bearer op"}).text
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert (first.outcome, second.outcome) == ("retry", "succeeded")

    # The target got the real values, and nothing for the forged reference.
    calls = [c for c in target.calls if c.path.startswith("/hook/")]
    assert len(calls) == 2
    assert calls[-1].path == f"/hook/h1secret:API_KEY?token={CANARY}"
    assert calls[-1].headers["X-Api-Key"] == HEADER_CANARY
    assert json.loads(calls[-1].body)["sig"] == CANARY

    logs = capsys.readouterr().out
    assert "attempt_failed" in logs and "run_finished" in logs and "failed at" in logs
    spans_text = repr(
        [(s.name, s.attributes, s.events, s.status.description) for s in spans.get_finished_spans()]
    )
    engine = make_engine(sqlite_url)
    every = sa.MetaData()
    with engine.connect() as connection:
        every.reflect(bind=connection)
        assert {"alert_events", "runs", "attempts"} <= set(every.tables)
        ledger = repr([list(connection.execute(sa.select(table))) for table in every.sorted_tables])
    engine.dispose()
    for where, text in (("logs", logs), ("spans", spans_text), ("ledger", ledger), ("runs API", api)):
        for value in (CANARY, HEADER_CANARY):
            assert value not in text, f"{value} leaked into the {where}"
    assert "{secret:HOOK_TOKEN}" in api and "{secret:API_KEY}" in api
