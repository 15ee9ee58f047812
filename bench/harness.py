"""What every benchmark needs: the system and the floors as separate processes, load, figures.

Nothing here is imported by the product. Each script builds a ``Bench``, starts what it needs
through it, and every process it started is stopped when the ``with`` block ends, whatever
happened. Figures are medians of several runs with min and max (``Figure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import redis
import yaml

from workers.dev import EmbeddedRedis, free_port
from workers.ledger.migrate import upgrade
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

INGEST, OPERATOR = "bench-ingest", "bench-operator"
WORKER_PROCESSES = 2
PG_ADMIN_URL = os.environ.get(
    "RESPONDER_BENCH_PG_URL",
    os.environ.get(
        "RESPONDER_TEST_PG_URL", "postgresql+psycopg://responder:responder@127.0.0.1:5432/postgres"
    ),
)
RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------------------------------------
# figures


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Figure:
    """One measured quantity over several runs: median, min, max."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def cell(self) -> str:
        if not self.values:
            return "-"
        fmt = "{:,.0f}" if abs(self.median) >= 100 else "{:,.1f}" if abs(self.median) >= 1 else "{:.2f}"
        low, high = min(self.values), max(self.values)
        return f"{fmt.format(self.median)} ({fmt.format(low)}-{fmt.format(high)})"


@dataclass
class Target:
    """A ratio the issue sets, judged on medians measured in the same run."""

    name: str
    value: float
    limit: float
    at_least: bool

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "met" if self.met else "NOT MET"
        return f"{self.name:<58} {self.value:8.2f}  (target {sign} {self.limit:g})  {verdict}"


@dataclass
class Report:
    """A script's figures and targets: printed as a table and written as JSON."""

    script: str
    figures: dict[str, Figure] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: float, *, name: str | None = None, unit: str = "") -> None:
        figure = self.figures.setdefault(key, Figure(name or key, unit))
        figure.values.append(value)

    def median(self, key: str) -> float:
        return self.figures[key].median

    def target(self, name: str, value: float, limit: float, *, at_least: bool) -> None:
        self.targets.append(Target(name, value, limit, at_least))

    def print(self) -> None:
        print(f"\n== {self.script} ==  median (min-max) of the runs")
        width = max((len(f.name) for f in self.figures.values()), default=10)
        for figure in self.figures.values():
            print(f"  {figure.name:<{width}}  {figure.cell():>28} {figure.unit}")
        for note in self.notes:
            print(f"  note: {note}")
        for target in self.targets:
            print(f"  {target.line()}")

    def write(self, path: Path | None = None) -> Path:
        path = path or RESULTS / f"{self.script}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "script": self.script,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "figures": {
                key: {**asdict(f), "median": f.median, "min": min(f.values), "max": max(f.values)}
                for key, f in self.figures.items()
                if f.values
            },
            "targets": [{**asdict(t), "met": t.met} for t in self.targets],
            "notes": self.notes,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


# ---------------------------------------------------------------------------------------------
# processes


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll ``check`` until it returns something truthy; SystemExit after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(_children(current))
    return pids


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB of a process and its descendants.

    PSS divides each page shared after fork among the processes sharing it, so the sum is what
    the tree costs the machine; the RSS sum counts a prefork pool's shared pages once per child.
    """
    rss = pss = 0
    for member in tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


HEARTBEAT_KEY: str = Settings.model_fields["heartbeat_key"].default


class Bench(contextlib.ExitStack):
    """A scratch directory and every process started for one measurement, stopped on exit.

    ``telemetry``: more environment for the system's processes (``bench.telemetry`` turns
    tracing and its export on or off with it).
    """

    telemetry: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix=f"responder-bench-{name}-"))
        self.callback(shutil.rmtree, self.dir, ignore_errors=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RESPONDER_", "OTEL_"))}
        self.env["PYTHONPATH"] = str(ROOT)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a process (its output to a log file in the scratch directory), stopped on exit."""
        log = (self.dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.callback(self._stop, proc, log)
        return proc

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], log: Any) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def redis(self) -> str:
        """A private redis-server (AOF on, as ``responder dev`` runs it); returns its URL."""
        embedded = EmbeddedRedis(self.dir / "redis")
        url = embedded.start()
        self.callback(embedded.stop)
        return url

    def ledger(self, database: str) -> str:
        """A fresh, migrated ledger: a SQLite file, or a new PostgreSQL database."""
        url = f"sqlite:///{self.dir / 'ledger.db'}" if database == "sqlite" else self._pg_database()
        upgrade(url)
        return url

    def _pg_database(self) -> str:
        import psycopg

        name = f"responder_bench_{os.getpid()}"
        admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

        def drop() -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        self.callback(drop)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    def target(self) -> TargetClient:
        """The local HTTP endpoint remediations call (its own process); counts what it receives."""
        port = free_port()
        self.spawn("target", [sys.executable, str(ROOT / "bench" / "target.py"), str(port)])
        client = TargetClient(f"http://127.0.0.1:{port}")
        wait_for(lambda: _answers(client.url + "/count"), timeout=20, what="the bench target")
        return client

    def responder_env(self, *, redis_url: str, database_url: str, target_url: str | None) -> dict[str, str]:
        """The environment of the system's processes: default settings but for the bench's own."""
        rules = []
        if target_url is not None:
            rules.append(
                {
                    "name": "bench",
                    "match": ['alertname="BenchAlert"'],
                    "remediation": "http_request",
                    "params": {"url": target_url + "/call/{{ labels.seq }}"},
                }
            )
        config = self.dir / "responder.yaml"
        config.write_text(yaml.safe_dump({"http_allowlist": ["127.0.0.1:*"], "rules": rules}))
        return {
            "RESPONDER_REDIS_URL": redis_url,
            "RESPONDER_DATABASE_URL": database_url,
            "RESPONDER_CONFIG": str(config),
            "RESPONDER_INGEST_TOKENS": INGEST,
            "RESPONDER_OPERATOR_TOKENS": OPERATOR,
            "RESPONDER_LOG_FORMAT": "json",
            **self.telemetry,
        }

    def otlp_sink(self) -> str:
        """A local OTLP/HTTP endpoint (``bench.otlp_sink``); returns its URL once it answers."""
        port = free_port()
        self.spawn("otlp-sink", [sys.executable, "-m", "bench.otlp_sink", str(port)])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/count"), timeout=20, what="the OTLP sink")
        return url

    def system(self, database: str = "sqlite") -> System:
        """The responder's receiver on its own Redis, a fresh ledger and the bench target (whose
        rule every bench alert matches); start its worker with ``worker(system.env)``."""
        redis_url = self.redis()
        ledger = self.ledger(database)
        target = self.target()
        env = self.responder_env(redis_url=redis_url, database_url=ledger, target_url=target.url)
        url, receiver = self.receiver(env)
        return System(env=env, url=url, receiver=receiver, target=target)

    def receiver(self, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
        """``responder serve`` on a free port; returns its base URL once it answers."""
        port = free_port()
        proc = self.spawn(
            "receiver",
            [sys.executable, "-m", "workers.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env,
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: proc.poll() is not None or _answers(url + "/healthz"), timeout=60, what="the receiver"
        )
        if proc.poll() is not None:
            raise SystemExit(f"bench: the receiver exited:\n{self.log('receiver')[-3000:]}")
        return url, proc

    def worker(self, env: dict[str, str], *, name: str = "worker") -> subprocess.Popen[bytes]:
        """``responder worker`` with the bench's pool size, ready to consume."""
        proc = self.spawn(
            name,
            [sys.executable, "-m", "workers.cli", "worker", "--concurrency", str(WORKER_PROCESSES)],
            env,
        )
        # Its heartbeat (workers.heartbeat), written once it is ready: with the log level above
        # INFO, Celery's "ready." line is not logged.
        beats = redis.Redis.from_url(env["RESPONDER_REDIS_URL"])
        wait_for(
            lambda: proc.poll() is not None or beats.zcard(HEARTBEAT_KEY) > 0,
            timeout=60,
            what="the worker",
            interval=0.05,
        )
        beats.close()
        if proc.poll() is not None:
            raise SystemExit(f"bench: the worker exited:\n{self.log(name)[-3000:]}")
        return proc

    def floor_receiver(self, *, with_libraries: bool = False) -> tuple[str, subprocess.Popen[bytes]]:
        """The bare FastAPI endpoint in the receiver's exact server configuration
        (``with_libraries``: with the receiver's libraries imported, ``bench.floors``)."""
        port = free_port()
        argv = [sys.executable, "-m", "bench.floors", "serve", str(port)]
        proc = self.spawn("floor-receiver", argv + (["--with-libraries"] if with_libraries else []))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/healthz"), timeout=60, what="the floor endpoint")
        return url, proc

    def floor_worker(self, redis_url: str) -> subprocess.Popen[bytes]:
        """Bare Celery with a no-op task on the worker's configuration (same pool, acks_late...)."""
        proc = self.spawn(
            "floor-worker",
            [sys.executable, "-m", "bench.floors", "worker", str(WORKER_PROCESSES)],
            {"RESPONDER_REDIS_URL": redis_url},
        )
        wait_for(
            lambda: proc.poll() is not None or "ready." in self.log("floor-worker"),
            timeout=60,
            what="the floor worker",
            interval=0.05,
        )
        return proc


@dataclass(frozen=True)
class System:
    """What ``Bench.system`` started: the environment of the responder's processes, the
    receiver (its base URL and process) and the target."""

    env: dict[str, str]
    url: str
    receiver: subprocess.Popen[bytes]
    target: TargetClient


class TargetClient:
    """Reads what the bench target received."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(timeout=10)

    def count(self) -> int:
        return int(self.http.get(self.url + "/count").json()["count"])

    def calls(self) -> list[dict[str, Any]]:
        """Every call: path, idempotency key, receipt time (epoch seconds)."""
        calls: list[dict[str, Any]] = self.http.get(self.url + "/calls").json()["calls"]
        return calls

    def reset(self) -> None:
        self.http.post(self.url + "/reset")


# ---------------------------------------------------------------------------------------------
# load


def alert(seq: str, *, run: str, status: str = "firing") -> dict[str, Any]:
    """One Alertmanager v4 alert with a unique fingerprint per ``run`` and ``seq``."""
    return {
        "status": status,
        "labels": {"alertname": "BenchAlert", "seq": seq, "run": run, "severity": "page"},
        "annotations": {"summary": f"bench alert {seq}"},
        "startsAt": "2026-11-23T05:00:00.000Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example:9090/graph",
        "fingerprint": hashlib.sha256(f"{run}/{seq}".encode()).hexdigest()[:16],
    }


def webhook(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    """An Alertmanager v4 notification carrying ``alerts``."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="BenchAlert"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "responder",
        "groupLabels": {"alertname": "BenchAlert"},
        "commonLabels": {"alertname": "BenchAlert"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": alerts,
    }


HEADERS = {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/json"}


@dataclass
class Sent:
    """What a load run sent and got back."""

    sent_at: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300) + self.errors


async def _post(client: httpx.AsyncClient, url: str, body: bytes, sent: Sent) -> None:
    started = time.time()
    sent.sent_at.append(started)
    try:
        response = await client.post(url, content=body, headers=HEADERS)
    except httpx.HTTPError:
        sent.errors += 1
        return
    sent.latencies.append(time.time() - started)
    sent.statuses[response.status_code] = sent.statuses.get(response.status_code, 0) + 1


def send_at_rate(url: str, bodies: Sequence[bytes], rate: float) -> Sent:
    """Open loop: body i is sent at t0 + i/rate whether or not earlier ones were answered."""

    async def main() -> Sent:
        sent = Sent()
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            t0 = time.monotonic()
            tasks = []
            for i, body in enumerate(bodies):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_post(client, url, body, sent)))
            await asyncio.gather(*tasks)
            sent.elapsed = time.monotonic() - t0
        return sent

    return asyncio.run(main())


def send_all(url: str, bodies: Sequence[bytes], connections: int) -> Sent:
    """Closed loop: ``connections`` senders, each posting its next body once answered."""

    async def main() -> Sent:
        sent = Sent()
        queue = list(reversed(bodies))
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def sender() -> None:
                while queue:
                    await _post(client, url, queue.pop(), sent)

            t0 = time.monotonic()
            await asyncio.gather(*(sender() for _ in range(connections)))
            sent.elapsed = time.monotonic() - t0
        return sent

    return asyncio.run(main())


def wrk(url: str, *, seconds: float, connections: int, duplicates: bool, run: str) -> dict[str, float]:
    """Closed-loop load with wrk (C, its own process): webhooks/s, p50/p99 ms, non-2xx."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk not found (make bench installs Debian's wrk)")
    env = {**os.environ, "BENCH_RUN": run, "BENCH_DUPLICATES": "1" if duplicates else "0"}
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(ROOT / "bench" / "intake.lua"),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    data: dict[str, float] = json.loads(line.removeprefix("BENCH "))
    return data


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def queue_depth(client: redis.Redis, *queues: str) -> int:
    """Messages waiting in Celery's Redis queues plus those delivered but not yet acked."""
    waiting = sum(int(client.llen(q)) for q in queues)  # type: ignore[arg-type]
    return waiting + int(client.hlen("unacked"))  # type: ignore[arg-type]


@contextlib.contextmanager
def peak_memory(pids: dict[str, int], every_s: float = 0.2) -> Iterator[dict[str, float]]:
    """Sample the trees' RSS and PSS in a thread; the dict holds the peaks when the block ends."""
    import threading

    peaks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            for name, pid in pids.items():
                rss, pss = memory_mib(pid)
                peaks[f"{name}_rss"] = max(peaks.get(f"{name}_rss", 0.0), rss)
                peaks[f"{name}_pss"] = max(peaks.get(f"{name}_pss", 0.0), pss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()


def settle(seconds: float = 0.5) -> None:
    """Let a just-started process finish its first imports before load starts."""
    time.sleep(seconds)
