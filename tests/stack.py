"""A whole running system for integration and end-to-end tests: real processes, real Redis.

Each stack has its own redis-server (free port, own data dir), ledger, config and target HTTP
server that records the remediation's calls; receiver, worker and beat are the real commands.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tests.helpers import compat_config
from workers.dev import EmbeddedRedis, free_port

INGEST_TOKEN = "it-ingest-token"
OPERATOR_TOKEN = "it-operator-token"
T = TypeVar("T")


@dataclass
class Call:
    """One request the target server received."""

    method: str
    path: str
    body: bytes
    at: float
    headers: dict[str, str] = field(default_factory=dict)


class TargetServer:
    """The endpoint remediations call: records every request; answers ``status`` (or the status
    of the longest matching prefix in ``path_status``) after ``delay_s``; ``fail_first[path]``:
    that many calls to ``path`` are answered 503 first."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.status = 200
        self.path_status: dict[str, int] = {}
        self.fail_first: dict[str, int] = {}
        self.delay_s = 0.0
        target = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                target.calls.append(
                    Call(self.command, self.path, self.rfile.read(length), time.time(), dict(self.headers))
                )
                time.sleep(target.delay_s)
                prefixes = sorted((p for p in target.path_status if self.path.startswith(p)), key=len)
                status = target.path_status[prefixes[-1]] if prefixes else target.status
                with lock:
                    if target.fail_first.get(self.path, 0) > 0:
                        target.fail_first[self.path] -= 1
                        status = 503
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def stack_config(
    target_port: int, tmp: Path, extra_rules: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The issue's compatibility config plus a slow and a long command for the fault tests."""
    config = compat_config(
        target_port,
        [
            {
                "name": "probe-slow",
                "match": ['alertname="ResponderSlow"'],
                "remediation": "run_command",
                "params": {"command": "slow"},
            },
            {
                "name": "probe-long",
                "match": ['alertname="ResponderLong"'],
                "remediation": "run_command",
                "params": {"command": "long"},
            },
            *(extra_rules or []),
        ],
    )
    for name, seconds, timeout in (("slow", 3, "6s"), ("long", 8, "20s")):
        script = tmp / f"{name}.sh"
        script.write_text(f'#!/bin/sh\necho start >> "$1"\nsleep {seconds}\necho done >> "$1"\n')
        script.chmod(0o755)
        config["commands"][name] = {
            "argv": ["/bin/sh", str(script), str(tmp / f"{name}.log")],
            "timeout": timeout,
        }
    return config


def _reap(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Wait for a process asked to stop; kill it if it has not within ``timeout``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Stack:
    """Receiver, worker and beat on a private Redis and the given ledger."""

    tmp: Path
    database_url: str
    extra_rules: list[dict[str, Any]] = field(default_factory=list)
    # Top-level config keys (limits, escalation). In these and in extra_rules, "{target}" in a
    # string becomes the target server's port.
    extra_config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    redis: EmbeddedRedis = field(init=False)
    target: TargetServer = field(init=False)
    port: int = field(init=False)
    env: dict[str, str] = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.redis = EmbeddedRedis(self.tmp / "redis")
        self.redis.start()
        self.target = TargetServer()
        self.port = free_port()
        config = self.tmp / "responder.yaml"
        rules, extra = json.loads(
            json.dumps([self.extra_rules, self.extra_config]).replace("{target}", str(self.target.port))
        )
        config.write_text(yaml.safe_dump({**stack_config(self.target.port, self.tmp, rules), **extra}))
        self.env = {
            **os.environ,
            "RESPONDER_REDIS_URL": self.redis.url,
            "RESPONDER_DATABASE_URL": self.database_url,
            "RESPONDER_CONFIG": str(config),
            "RESPONDER_INGEST_TOKENS": INGEST_TOKEN,
            "RESPONDER_OPERATOR_TOKENS": OPERATOR_TOKEN,
            "RESPONDER_LOG_FORMAT": "json",
            "RESPONDER_RECONCILE_INTERVAL_S": "1",
            "RESPONDER_RECONCILE_AFTER_S": "1",
            "RESPONDER_RETRY_BACKOFF_S": "0.2",
            "RESPONDER_HARD_LIMIT_MARGIN_S": "2",
            # A dead worker's lease expires (and a lost message is re-sent) within seconds.
            "RESPONDER_LEASE_S": "3",
            "RESPONDER_REDELIVER_AFTER_S": "2",
            "RESPONDER_DB_LOCK_TIMEOUT_S": "2",
            **self.overrides,
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def slow_log(self) -> Path:
        return self.tmp / "slow.log"

    def lines(self, name: str) -> list[str]:
        """The words the slow or long command wrote to its log (start, done)."""
        path = self.tmp / f"{name}.log"
        return path.read_text().split() if path.exists() else []

    def restart_redis_empty(self) -> None:
        """Kill Redis and start it again on the same port with nothing in it (no AOF, no RDB)."""
        assert self.redis.proc is not None
        self.redis.proc.kill()
        self.redis.proc.wait()
        for leftover in ("appendonlydir", "dump.rdb"):
            path = self.redis.data_dir / leftover
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.redis.start()

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``responder <args>`` with its output in ``<tmp>/<name>.log``."""
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "workers.cli", *args],
            env=env or self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a test can kill a whole worker
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of process ``name``, parsed (a line cut off as it is written, and
        anything not JSON, is left out)."""
        lines = []
        for line in self.log(name).splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return lines

    def start_receiver(self, env: dict[str, str] | None = None) -> None:
        proc = self.start("receiver", "serve", "--host", "127.0.0.1", "--port", str(self.port), env=env)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"receiver exited {proc.returncode}:\n{self.log('receiver')}")
            try:
                return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=20, what="the receiver")

    def start_worker(
        self,
        name: str = "worker",
        *,
        queues: str | None = None,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        options: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        before = self.log(name).count(" ready.")
        args = ["worker", "--concurrency", str(concurrency), *options, "--without-mingle", "--without-gossip"]
        if queues:
            args += ["--queues", queues]
        proc = self.start(name, *args, env=env, prefix=prefix)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited {proc.returncode}:\n{self.log(name)}")
            return self.log(name).count(" ready.") > before

        wait_for(ready, timeout=30, what="the worker")
        return proc

    def start_all(self, *, worker: bool = True) -> None:
        self.start_receiver()
        if worker:
            self.start_worker()
        self.start_beat()

    def start_split(self) -> None:
        """Receiver and beat, and workers split by queue as docker-compose.yml runs them:
        ``planner`` on alerts and maintenance, ``runner`` on remediations."""
        self.start_all(worker=False)
        self.start_worker("planner", queues="alerts,maintenance")
        self.start_worker("runner", queues="remediations")

    def start_beat(self) -> None:
        beat = self.start("beat", "beat")

        def beat_ready() -> bool:
            if beat.poll() is not None:
                raise AssertionError(f"beat exited {beat.returncode}:\n{self.log('beat')}")
            return "beat: Starting" in self.log("beat")

        wait_for(beat_ready, timeout=30, what="beat")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        _reap(proc)

    def close(self) -> None:
        # Every process asked to stop at once, then each waited for: their shutdowns overlap.
        procs = [proc for proc in self.procs.values() if proc.poll() is None]
        self.procs.clear()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            _reap(proc)
        self.redis.stop()
        self.target.close()

    def post(
        self, payload: dict[str, Any] | bytes, token: str = INGEST_TOKEN, timeout: float = 15
    ) -> httpx.Response:
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return httpx.post(
            f"{self.base_url}/api/v1/alertmanager",
            content=content,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=timeout,
        )

    def runs(self, **filters: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.base_url}/api/v1/runs",
            params=filters,
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
            timeout=10,
        )
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()["runs"]
        return runs

    def wait_run(self, status: str, timeout: float = 30, **filters: str) -> dict[str, Any]:
        """Wait until a run matching ``filters`` has ``status``; returns it."""

        def done() -> dict[str, Any] | None:
            return next((r for r in self.runs(**filters) if r["status"] == status), None)

        return wait_for(done, timeout=timeout, what=f"a {status} run {filters}")

    def count(self, name: str, event: str) -> int:
        """How many JSON log lines of process ``name`` have ``event``."""
        return sum(line.get("event") == event for line in self.log_lines(name))

    def wait_reconcile_passes(
        self, passes: int, timeout: float = 30, worker: str | tuple[str, ...] = "worker"
    ) -> None:
        """Wait until ``passes`` more reconcile passes were logged by ``worker`` (or by any of
        several: which worker takes the beat's task is Redis's choice)."""
        names = (worker,) if isinstance(worker, str) else worker

        def done() -> int:
            return sum(self.count(name, "reconcile_pass") for name in names)

        target = done() + passes
        wait_for(lambda: done() >= target, timeout=timeout, what=f"{passes} reconcile passes")

    def diagnostics(self) -> str:
        names = sorted({*self.procs, "receiver", "worker", "beat", "worker2"})
        return "\n".join(f"===== {name}.log =====\n{self.log(name)[-6000:]}" for name in names)
