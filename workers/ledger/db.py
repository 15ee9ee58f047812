"""Engines and sessions: one engine per process (created after fork), SQLite made multi-process safe.

SQLite with several processes (receiver, worker children, beat) writing: WAL so readers do not
block the writer, a busy timeout so a writer waits instead of failing, and ``BEGIN IMMEDIATE``
so a transaction takes the write lock up front rather than failing to upgrade a read lock
midway ("database is locked" surfacing as a false 503). Before that, a transaction takes the
ledger's writer lock (``WriterLock``), which wakes a waiting writer within a millisecond of the
lock's release where SQLite's busy handler sleeps up to 100 ms.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, make_url, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from workers import jsoncodec, telemetry
from workers.ledger.models import utcnow

_log = telemetry.get_logger(__name__)

PG_CONNECT_TIMEOUT_S = 5
PG_TCP_USER_TIMEOUT_MS = 10_000
# How long a statement waits for a lock before failing (SQLite's busy timeout, PostgreSQL's
# lock_timeout): a task then retries with backoff instead of holding a worker slot forever.
_lock_timeout_s = 30.0
# Statements slower than this are logged (their SQL, never their parameters).
_slow_statement_s = 0.5

# The execution option that marks a read-only session's connections (``reading``).
READ_ONLY = "responder_read_only"

_engines: dict[tuple[int, str], Engine] = {}
_sessionmakers: dict[tuple[int, str, bool], sessionmaker[Session]] = {}
_writer_locks: dict[tuple[int, str], WriterLock | None] = {}


def normalize_url(url: str) -> str:
    """Map ``postgres://`` and ``postgresql://`` to the installed psycopg (3) driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def configure(*, lock_timeout_s: float, slow_statement_s: float | None = None) -> None:
    """Set the lock timeout of engines made from now on, and the slow-statement threshold
    (each process, from its settings)."""
    global _lock_timeout_s, _slow_statement_s  # one value per process, read when engines are made
    _lock_timeout_s = lock_timeout_s
    if slow_statement_s is not None:
        _slow_statement_s = slow_statement_s


def _log_slow_statements(engine: Engine) -> Engine:
    """Log every statement on ``engine`` that takes ``_slow_statement_s`` or longer: its
    duration (a lock wait included), its SQL's start (parameters are never logged: they hold
    alert data and rendered params) and its rows."""

    @event.listens_for(engine, "before_cursor_execute")
    def _started(
        conn: Any, _cursor: Any, _statement: str, _parameters: Any, _context: Any, _many: bool
    ) -> None:
        conn.info.setdefault("responder_started", []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _finished(
        conn: Any, cursor: Any, statement: str, _parameters: Any, _context: Any, many: bool
    ) -> None:
        started = conn.info["responder_started"].pop()
        elapsed = time.perf_counter() - started
        if elapsed >= _slow_statement_s:
            _log.warning(
                "slow_statement",
                duration_ms=round(elapsed * 1000, 1),
                statement=" ".join(statement.split())[:200],
                executemany=many,
                rows=cursor.rowcount,
            )

    return engine


def _sqlite_engine(url: str) -> Engine:
    timeout = _lock_timeout_s
    engine = create_engine(
        url,
        connect_args={"timeout": timeout},
        json_serializer=jsoncodec.dumps,
        json_deserializer=jsoncodec.loads,
    )

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
        # A read-only session (``reading``) begins deferred: in WAL mode a reader neither waits
        # for the writer nor holds one up. IMMEDIATE would take the write lock for it, behind the
        # writers' own lock (``WriterLock``), and send them to SQLite's busy handler meanwhile.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    @event.listens_for(engine, "handle_error")
    def _failed(context: Any) -> None:
        started = context.connection.info.get("responder_started") if context.connection else None
        if started:
            started.pop()

    return engine


def make_engine(url: str) -> Engine:
    """A new engine for ``url``, configured for this ledger's needs."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _log_slow_statements(_sqlite_engine(url))
    return _log_slow_statements(
        create_engine(
            url,
            pool_pre_ping=True,
            json_serializer=jsoncodec.dumps,
            json_deserializer=jsoncodec.loads,
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
    )


def get_engine(url: str) -> Engine:
    """This process's engine for ``url``; a forked child gets its own, never its parent's."""
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = make_engine(url)
    return engine


def get_sessionmaker(url: str, *, read_only: bool = False) -> sessionmaker[Session]:
    """This process's session factory for ``url`` (``read_only``: for ``reading``)."""
    key = (os.getpid(), url, read_only)
    factory = _sessionmakers.get(key)
    if factory is None:
        engine = get_engine(url)
        bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
        factory = _sessionmakers[key] = sessionmaker(bind, expire_on_commit=False)
    return factory


class WriterLock:
    """One writer at a time on a SQLite ledger, across this machine's processes, woken fast.

    SQLite's busy handler sleeps in growing steps (1, 2, 5, 10 ... 100 ms) while another
    connection holds the write lock, so under contention a writer sleeps long after the lock was
    released: two worker children draining a backlog spent over a third of their time there. Here
    a writer first takes a thread lock (threads of one process share the file lock below), then
    an exclusive ``flock`` on a file beside the database, polled at most every millisecond, and
    only then begins its transaction. The kernel drops a ``flock`` when its process dies, so a
    killed worker cannot wedge the ledger. Waiting is bounded by the lock timeout; past it the
    caller gets an ``OperationalError`` like SQLite's own "database is locked", and retries.
    Writers that do not take it (the ``sqlite3`` shell, an old process) still meet SQLite's lock.
    """

    POLL_FIRST_S = 0.0001
    POLL_MAX_S = 0.001

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:  # as SQLite says when it cannot open the database file
                raise OperationalError("open ledger writer lock", None, exc) from exc
        return self._fd

    @contextmanager
    def hold(self, timeout_s: float) -> Iterator[None]:
        """Hold the lock for the body; raise ``OperationalError`` after ``timeout_s`` of waiting."""
        deadline = time.monotonic() + timeout_s
        if not self._thread_lock.acquire(timeout=timeout_s):
            raise self._timeout(timeout_s)
        try:
            fd = self._file()
            delay = self.POLL_FIRST_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._timeout(timeout_s) from None
                    time.sleep(delay)
                    delay = min(delay * 2, self.POLL_MAX_S)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _timeout(self, timeout_s: float) -> OperationalError:
        return OperationalError(
            "BEGIN IMMEDIATE", None, TimeoutError(f"ledger writer lock not acquired in {timeout_s:g}s")
        )


def writer_lock(url: str) -> WriterLock | None:
    """This process's writer lock for a SQLite file ledger; None for other databases."""
    key = (os.getpid(), url)
    if key not in _writer_locks:
        parsed = make_url(normalize_url(url))
        path = parsed.database if parsed.get_backend_name() == "sqlite" else None
        file_backed = bool(path) and path != ":memory:" and not parsed.query.get("uri")
        _writer_locks[key] = WriterLock(f"{path}-writer.lock") if file_backed and path else None
    return _writer_locks[key]


def single_writer(url: str) -> bool:
    """Whether the ledger has one writer at a time for the whole database (a SQLite file), so
    that reads and waits are worth keeping out of write transactions."""
    return writer_lock(url) is not None


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    lock = writer_lock(url)
    with lock.hold(_lock_timeout_s) if lock else nullcontext(), get_sessionmaker(url).begin() as session:
        yield session


@contextmanager
def reading(url: str) -> Iterator[Session]:
    """A session for reads only: no writer lock taken (on SQLite not even the database's own),
    rolled back at the end."""
    with get_sessionmaker(url, read_only=True)() as session:
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


def connect(url: str) -> None:
    """Open this process's pooled connection to the ledger now (start-up, not the first
    request's time); a read, so it takes no write lock. Raises if the ledger is unreachable."""
    with get_engine(url).connect() as connection:
        connection.exec_driver_sql("SELECT 1")


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
