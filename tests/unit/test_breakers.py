"""The circuit breaker's state machine on a real Redis: open, one probe, close, rebuild."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import pytest
import redis
from fastapi.testclient import TestClient

from receiver.app import create_app
from tests.helpers import RecordingPublisher, make_config
from tests.stack import wait_for
from workers.breakers import Breakers, BreakerState, breaker_key
from workers.dev import EmbeddedRedis
from workers.guardstate import GuardState, LedgerCopy
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import utcnow
from workers.settings import Settings


@pytest.fixture
def breakers(redis_server: EmbeddedRedis) -> Breakers:
    prefix = f"test:{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(redis_server.url)
    client.set(prefix + "ready", 1)
    return Breakers(client, prefix)


def fail(breakers: Breakers, key: str, probe: str = "t", *, cool: float = 0.3) -> str:
    return breakers.record(key, token=probe, outcome="failure", threshold=3, cool_down_s=cool).transition


def test_opens_after_n_failures_lets_one_probe_and_closes_on_success(breakers: Breakers) -> None:
    """3 consecutive failures open it; after the cool-down exactly one caller probes while the
    others are refused; a failed probe re-opens it, a successful one closes it."""
    key = breaker_key("http_request", "http://svc/restart")
    assert breakers.acquire(key, token="a", lease_s=30) == ("closed", "")
    assert [fail(breakers, key) for _ in range(3)] == ["", "", "opened"]
    assert breakers.acquire(key, token="a", lease_s=30) == ("open", "")
    wait_for(lambda: breakers.acquire(key, token="p1", lease_s=30)[0] == "probe", timeout=5, what="half-open")
    assert [breakers.acquire(key, token=t, lease_s=30)[0] for t in ("x", "y", "p1")] == [
        "open",
        "open",
        "probe",
    ]
    assert breakers.record(key, token="x", outcome="failure", threshold=3, cool_down_s=0.3).transition == ""
    assert fail(breakers, key, "p1") == "reopened"
    assert breakers.acquire(key, token="z", lease_s=30) == ("open", "")
    wait_for(lambda: breakers.acquire(key, token="p2", lease_s=30)[0] == "probe", timeout=5, what="half-open")
    closed = breakers.record(key, token="p2", outcome="success", threshold=3, cool_down_s=0.3)
    assert (closed.transition, closed.failures) == ("closed", 0)
    assert breakers.acquire(key, token="z", lease_s=30) == ("closed", "")


def test_permanent_errors_and_successes_do_not_add_up(breakers: Breakers) -> None:
    """A neutral outcome (PermanentError, a bug) is not counted; a success resets the count."""
    key = breaker_key("run_command", "restart")
    fail(breakers, key)
    fail(breakers, key)
    neutral = breakers.record(key, token="t", outcome="neutral", threshold=3, cool_down_s=1)
    assert (neutral.transition, neutral.failures) == ("", 2)
    assert breakers.record(key, token="t", outcome="success", threshold=3, cool_down_s=1).failures == 0
    assert [fail(breakers, key) for _ in range(2)] == ["", ""]
    assert breakers.acquire(key, token="a", lease_s=30)[0] == "closed"


def test_a_dead_probe_frees_half_open_when_its_lease_runs_out(breakers: Breakers) -> None:
    """The probe's worker died: once its lease runs out another caller becomes the probe."""
    key = breaker_key("http_request", "http://svc/x")
    for _ in range(3):
        fail(breakers, key, cool=0.05)
    wait_for(lambda: breakers.acquire(key, token="dead", lease_s=0.3)[0] == "probe", timeout=5, what="probe")
    assert breakers.acquire(key, token="next", lease_s=30)[0] == "open"
    wait_for(
        lambda: breakers.acquire(key, token="next", lease_s=30)[0] == "probe", timeout=5, what="lease expiry"
    )


def test_open_breaker_survives_redis_losing_its_memory(redis_server: EmbeddedRedis) -> None:
    """Redis emptied while a breaker is open: the next gate rebuilds from the ledger's copy and
    refuses; without Redis at all the gate says unavailable."""
    client = redis.Redis.from_url(redis_server.url)
    state = GuardState(client, prefix=f"test:{uuid.uuid4().hex}:", config=make_config())
    key = breaker_key("http_request", "http://svc/open")
    opened = BreakerState(key, "open", 3, int(time.time() * 1000), 600_000)

    def ledger(_since: datetime) -> LedgerCopy:
        return LedgerCopy(breakers=[opened])

    client.flushdb()
    assert state.gate(key, token="t", lease_s=30, ledger=ledger) == ("open", "")
    assert (
        state.gate(breaker_key("http_request", "other"), token="t", lease_s=30, ledger=ledger)[0] == "closed"
    )
    dead = GuardState(
        redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5), prefix="x:", config=make_config()
    )
    assert dead.gate(key, token="t", lease_s=30, ledger=ledger) == ("unavailable", "")


def test_breakers_api_lists_the_ledger_copy_and_resets_both(
    redis_server: EmbeddedRedis, sqlite_url: str
) -> None:
    """GET lists open breakers first with when they probe; reset closes Redis's state and the
    ledger's, needs who and why, and is 404 for an unknown key."""
    settings = Settings(
        database_url=sqlite_url,
        redis_url=redis_server.url,
        guard_key_prefix=f"test:{uuid.uuid4().hex}:",
        operator_tokens="op",
        ingest_tokens="in",
    )
    live = Breakers(redis.Redis.from_url(redis_server.url), settings.guard_key_prefix)
    live.client.set(settings.guard_key_prefix + "ready", 1)
    key = breaker_key("http_request", "http://svc/restart")
    for _ in range(3):
        fail(live, key, cool=600)
    with transaction(sqlite_url) as session:
        for name, state, failures in (("other", "closed", 1), ("http://svc/restart", "open", 3)):
            repository.save_breaker(
                session,
                key=breaker_key("http_request", name),
                remediation="http_request",
                target=name,
                state=state,
                failures=failures,
                opened_at=utcnow() if state == "open" else None,
                cool_down_s=600,
                error="503 from target",
            )
    headers = {"Authorization": "Bearer op"}
    with TestClient(create_app(settings=settings, publisher=RecordingPublisher(settings))) as client:
        listed = client.get("/api/v1/breakers", headers=headers).json()["breakers"]
        assert [(b["target"], b["state"]) for b in listed] == [
            ("http://svc/restart", "open"),
            ("other", "closed"),
        ]
        assert listed[0]["probe_after"] is not None and listed[1]["probe_after"] is None
        scrape = client.get("/metrics").text
        assert 'responder_breaker_state{remediation="http_request",state="open"} 1.0' in scrape
        assert 'responder_breaker_state{remediation="http_request",state="half_open"} 0.0' in scrape
        assert client.get("/api/v1/breakers?state=open", headers=headers).json()["breakers"][0]["key"] == key
        assert (
            client.post(f"/api/v1/breakers/{key}/reset", json={"by": "a"}, headers=headers).status_code == 422
        )
        unknown = client.post("/api/v1/breakers/nope/reset", json={"by": "a", "reason": "b"}, headers=headers)
        assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
        reset = client.post(
            f"/api/v1/breakers/{key}/reset", json={"by": "alice", "reason": "fixed"}, headers=headers
        )
        assert (reset.json()["state"], reset.json()["failures"]) == ("closed", 0)
        assert client.get("/api/v1/breakers", headers={"Authorization": "Bearer in"}).status_code == 403
    assert live.acquire(key, token="t", lease_s=30) == ("closed", "")


def test_target_slots_bound_concurrent_runs_and_free_on_record(breakers: Breakers) -> None:
    """concurrency 1: a second run on the same target is locked until the first records; another
    target is free; a locked run takes neither the slot nor a half-open probe."""
    key = breaker_key("run_command", "restart")
    assert breakers.acquire(key, token="a", lease_s=30, target="svc", slots=1) == ("closed", "")
    assert breakers.acquire(key, token="a", lease_s=30, target="svc", slots=1) == ("closed", "")  # its own
    assert breakers.acquire(key, token="b", lease_s=30, target="svc", slots=1) == ("locked", "")
    assert breakers.acquire(key, token="b", lease_s=30, target="svc", slots=2) == ("closed", "")
    assert breakers.acquire(key, token="c", lease_s=30, target="other", slots=1) == ("closed", "")
    breakers.record(key, token="a", outcome="success", threshold=3, cool_down_s=1, target="svc")
    breakers.record(key, token="b", outcome="success", threshold=3, cool_down_s=1, target="svc")
    assert breakers.acquire(key, token="d", lease_s=0.2, target="svc", slots=1) == ("closed", "")
    wait_for(
        lambda: breakers.acquire(key, token="e", lease_s=30, target="svc", slots=1)[0] == "closed",
        timeout=5,
        what="a dead holder's slot to expire",
    )
    for _ in range(3):
        fail(breakers, key, cool=0.05)
    time.sleep(0.1)  # the cool-down passes; e still holds the only slot
    assert breakers.acquire(key, token="f", lease_s=30, target="svc", slots=1) == ("locked", "")
    breakers.record(key, token="e", outcome="neutral", threshold=3, cool_down_s=1, target="svc")
    assert breakers.acquire(key, token="f", lease_s=30, target="svc", slots=1) == ("probe", "half_opened")
