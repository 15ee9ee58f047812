"""The receiver's /metrics: what it counts, what it reads at scrape time, and promtool's lint."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from receiver.app import create_app
from tests.helpers import FIXTURES, RecordingPublisher
from workers.dev import EmbeddedRedis
from workers.settings import Settings

INGEST = {"Authorization": "Bearer ingest-1"}


@pytest.fixture
def client(sqlite_url: str, redis_server: EmbeddedRedis) -> Iterator[TestClient]:
    settings = Settings(
        database_url=sqlite_url, redis_url=redis_server.url, ingest_tokens="ingest-1", operator_tokens="op-1"
    )
    with TestClient(create_app(settings=settings, publisher=RecordingPublisher(settings))) as c:
        yield c


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_scrape_counts_requests_alerts_queues_and_backlog(
    client: TestClient, redis_server: EmbeddedRedis
) -> None:
    """A webhook and a 404 are counted by route template and code, with a duration histogram;
    alerts by status and result; the queues' depths and the ledger's backlog are read at scrape."""
    before = samples(client.get("/metrics").text)
    body = (FIXTURES / "single_firing.json").read_bytes()
    assert client.post("/api/v1/alertmanager", content=body, headers=INGEST).status_code == 202
    assert client.post("/api/v1/alertmanager", content=body, headers=INGEST).status_code == 202
    assert client.get("/api/v1/runs/x", headers={"Authorization": "Bearer op-1"}).status_code == 404
    redis.Redis.from_url(redis_server.url).rpush("remediations", "m1", "m2")
    after = samples(client.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    route = {"method": "POST", "route": "/api/v1/alertmanager"}
    assert grew("responder_http_requests_total", **route, code="202") == 2
    assert grew("responder_http_request_duration_seconds_count", **route) == 2
    assert grew("responder_http_requests_total", method="GET", route="/api/v1/runs/{run_id}", code="404") == 1
    assert grew("responder_alerts_received_total", status="firing", result="accepted") == 1
    assert grew("responder_alerts_received_total", status="firing", result="duplicate") == 1
    assert after[("responder_queue_depth", frozenset({("queue", "remediations")}))] == 2
    assert after[("responder_backlog", frozenset({("kind", "events_unhandled")}))] == 1
    assert after[("responder_workers_alive", frozenset())] == 0
    assert not any("fingerprint" in dict(labels) or "run_id" in dict(labels) for _, labels in after)
    redis.Redis.from_url(redis_server.url).delete("remediations")


def test_scrape_passes_promtool_without_warnings(client: TestClient, promtool: str) -> None:
    """promtool's metrics lint (names, units, help, types) finds nothing."""
    client.post(
        "/api/v1/alertmanager", content=(FIXTURES / "single_firing.json").read_bytes(), headers=INGEST
    )
    scrape = client.get("/metrics").text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=scrape, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0 and checked.stdout.strip() == checked.stderr.strip() == "", (
        checked.stdout + checked.stderr
    )
