"""A worker on another host loses its network mid-run (a network namespace and a veth pair).

The cut-off worker can reach neither Redis nor the ledger: it must stop acting once its lease
runs out, another worker must take the run over once the ledger sees the lease expired, and
whatever the cut-off worker reports when its network returns must not overwrite the run.
PostgreSQL only: SQLite is a file, which a worker on another host could not share.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import require
from tests.helpers import alert_payload
from tests.stack import Stack, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Forwarder:
    """A TCP forwarder on the host side of the veth: the namespace reaches Redis and PostgreSQL here."""

    listen: str
    target: tuple[str, int]
    server: socket.socket = field(init=False)
    port: int = field(init=False)
    sockets: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = socket.create_server((self.listen, 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            s.close()


@dataclass
class Namespace:
    """A network namespace joined to the host by a veth pair: a second host on this machine."""

    name: str
    host_ip: str
    ns_ip: str

    @property
    def host_if(self) -> str:
        return f"{self.name}h"

    def up(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", f"{self.name}n")
        _ip("link", "set", f"{self.name}n", "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/24", "dev", f"{self.name}n")
        _ip("netns", "exec", self.name, "ip", "link", "set", f"{self.name}n", "up")
        _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def restore(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], check=False, capture_output=True)


def _netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"rtp{os.getpid() % 100000}"
    ok = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return ok


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    require(_netns_available(), "ip netns (root and iproute2)")
    octet = os.getpid() % 200 + 20
    ns = Namespace(name=f"rt{os.getpid() % 100000}", host_ip=f"10.213.{octet}.1", ns_ip=f"10.213.{octet}.2")
    ns.down()
    ns.up()
    yield ns
    ns.down()


def _via(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    where = f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{where}" if len(netloc) == 2 else where))


def test_partitioned_worker_is_taken_over_once(
    stack_factory: type[Stack], pg_url: str, tmp_path: Path, namespace: Namespace
) -> None:
    """Cut a worker off mid-run: another finishes the run once, the late result changes nothing."""
    stack = stack_factory(tmp=tmp_path, database_url=pg_url)
    stack.start_all(worker=False)
    pg = urlsplit(pg_url)
    redis_fwd = Forwarder(namespace.host_ip, ("127.0.0.1", stack.redis.port))
    pg_fwd = Forwarder(namespace.host_ip, (pg.hostname or "127.0.0.1", pg.port or 5432))
    try:
        remote_env = {
            **stack.env,
            "RESPONDER_REDIS_URL": f"redis://{namespace.host_ip}:{redis_fwd.port}/0",
            "RESPONDER_DATABASE_URL": _via(pg_url, namespace.host_ip, pg_fwd.port),
        }
        stack.start_worker("remote", env=remote_env, prefix=["ip", "netns", "exec", namespace.name])
        stack.post(alert_payload("ResponderLong", instance="cut-1"))
        wait_for(
            lambda: "start" in stack.lines("long"), timeout=30, what="the long command to start remotely"
        )
        namespace.cut()
        stack.start_worker("worker2")
        run = stack.wait_run("succeeded", timeout=120, rule="probe-long")
        namespace.restore()
        first, second = run["attempts"]
        assert first["outcome"] == "abandoned" and "lease expired" in (first["error"] or "")
        assert second["outcome"] == "succeeded" and second["worker"] != first["worker"]
        # The cut-off worker stopped acting when its lease ran out: its command never finished.
        assert stack.lines("long") == ["start", "start", "done"]

        def late_reported() -> str | None:
            late: str | None = stack.runs(rule="probe-long")[0]["attempts"][0]["late_outcome"]
            return late

        late = wait_for(late_reported, timeout=90, what="the cut-off worker's late result")
        # Either worker may take the passes: with both idle, Redis hands each message to the
        # consumer blocked longest, and with the beat's and the consumers' one-second cycles in
        # step that can be the same one every time (seen: worker2 got none for 30 s).
        stack.wait_reconcile_passes(2, worker=("worker2", "remote"))
        final = stack.runs(rule="probe-long")[0]
        assert late == "failed" and final["status"] == "succeeded"
        assert [a["outcome"] for a in final["attempts"]] == ["abandoned", "succeeded"]
        assert stack.lines("long") == ["start", "start", "done"]
    finally:
        namespace.restore()
        # Before its forwarders close: cut off from Redis, its warm shutdown would wait out the
        # stop's timeout (15 s of every run).
        stack.stop("remote")
        redis_fwd.close()
        pg_fwd.close()
