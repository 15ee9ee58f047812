"""Engines and sessions: one engine per process (created after fork), SQLite made multi-process safe.

SQLite with several processes (receiver, worker children, beat) writing: WAL so readers do not
block the writer, a busy timeout so a writer waits instead of failing, and ``BEGIN IMMEDIATE``
so a transaction takes the write lock up front rather than failing to upgrade a read lock
midway ("database is locked" surfacing as a false 503).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from workers.ledger.models import utcnow

PG_CONNECT_TIMEOUT_S = 5
PG_TCP_USER_TIMEOUT_MS = 10_000
# How long a statement waits for a lock before failing (SQLite's busy timeout, PostgreSQL's
# lock_timeout): a task then retries with backoff instead of holding a worker slot forever.
_lock_timeout_s = 30.0

_engines: dict[tuple[int, str], Engine] = {}
_sessionmakers: dict[tuple[int, str], sessionmaker[Session]] = {}


def normalize_url(url: str) -> str:
    """Map ``postgres://`` and ``postgresql://`` to the installed psycopg (3) driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def configure(*, lock_timeout_s: float) -> None:
    """Set the lock timeout of engines made from now on (each process, from its settings)."""
    global _lock_timeout_s  # one value per process, read when engines are made
    _lock_timeout_s = lock_timeout_s


def _sqlite_engine(url: str) -> Engine:
    timeout = _lock_timeout_s
    engine = create_engine(url, connect_args={"timeout": timeout})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would BEGIN lazily (deferred); take it over.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")  # a 2xx means on disk, even after power loss
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_engine(url: str) -> Engine:
    """A new engine for ``url``, configured for this ledger's needs."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "options": f"-c lock_timeout={int(_lock_timeout_s * 1000)}",
            # A partition leaves sockets waiting, not failing: give up on unacknowledged data
            # and probe idle connections, so a cut-off process errors out and reconnects.
            "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
        },
    )


def get_engine(url: str) -> Engine:
    """This process's engine for ``url``; a forked child gets its own, never its parent's."""
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = make_engine(url)
    return engine


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    """This process's session factory for ``url``."""
    key = (os.getpid(), url)
    factory = _sessionmakers.get(key)
    if factory is None:
        factory = _sessionmakers[key] = sessionmaker(get_engine(url), expire_on_commit=False)
    return factory


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    with get_sessionmaker(url).begin() as session:
        yield session


def db_now(session: Session) -> datetime:
    """The ledger's clock: deadlines and leases are judged on it, never a worker's own clock.

    PostgreSQL's ``clock_timestamp()`` on PostgreSQL; on SQLite the database is a file on this
    machine, so every process that can open it shares this machine's clock.
    """
    if session.get_bind().dialect.name == "postgresql":
        now: datetime = session.execute(select(func.clock_timestamp())).scalar_one()
        return now
    return utcnow()


def dispose_all() -> None:
    """Close this process's pooled connections (tests, shutdown)."""
    pid = os.getpid()
    for (owner, _), engine in list(_engines.items()):
        if owner == pid:
            engine.dispose()


def is_transient_ledger_error(exc: BaseException) -> bool:
    """A ledger error that retrying can fix: lock timeouts, lost connections, a full pool."""
    if isinstance(exc, (OperationalError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
