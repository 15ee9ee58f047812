"""Database backups: dump, compress, verify, test-restore, keep the newest ``keep``.

Two remediations, meant for ``schedules:`` in the config (or a rule, or a manual run):

* ``postgres_backup``: ``pg_dump --format=custom`` (compressed) of ``database_url``; verified
  by reading the archive back with ``pg_restore --list``; with ``test_restore_url``, restored
  into that scratch database and its tables counted against the archive's.
* ``sqlite_backup``: SQLite's online backup API (a consistent copy of a live database),
  gzip-compressed; verified by restoring it to a scratch file and running
  ``PRAGMA integrity_check`` and counting its tables against the source's.

Every backup is written beside its final name (``.partial``), synced, checked, and only then
renamed, with a ``sha256sum``-format checksum file beside it: a file named ``PREFIX-*.dump`` or
``PREFIX-*.sqlite.gz`` with its ``.sha256`` is complete and verified. A failed attempt removes
its partial file and keeps every earlier backup. Retention counts complete backups only.

The password of ``database_url`` (best given as a secret reference) reaches ``pg_dump`` in its
environment (``PGPASSWORD``), never on its command line; the recorded argv and errors hold the
URL without it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, field_validator

from remediations.base import (
    SECRET_REFERENCE_MARKS,
    Duration,
    Preflight,
    RemediationContext,
    RemediationParams,
    RemediationResult,
)
from remediations.errors import PermanentError, TransientError
from remediations.processes import Finished, run_process
from remediations.registry import remediation

# A backup's attempt is one message: its hard limit, twice over, must stay under the broker's
# visibility timeout (an hour by default; workers.runner.check_delivery_settings).
MAX_BACKUP_TIMEOUT = 1500.0
CHUNK = 1024 * 1024
SQLITE_PAGES_PER_STEP = 1024
CONNECT_TIMEOUT_S = 10
# What a backup run acts on (its overlap lock and breaker): one backup set.
TARGET = "{{ params.directory }}/{{ params.prefix }}"
# The remediations that make backups (their schedules are measured as backups: workers.metrics).
BACKUPS = frozenset({"postgres_backup", "sqlite_backup"})
# How each backup remediation is declared: not destructive, acting on its backup set.
_backup = functools.partial(
    remediation, timeout=900.0, max_timeout=MAX_BACKUP_TIMEOUT, target=TARGET, destructive=False
)


def _is_reference(value: str) -> bool:
    return value != value.translate(SECRET_REFERENCE_MARKS)


class BackupParams(RemediationParams):
    """Where backups go and how many are kept."""

    directory: str = Field(
        description="Directory that holds the backups (relative: to the worker's working directory)."
    )
    prefix: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="File name prefix of this backup set (letters, digits, '_', '.', '-').",
    )
    keep: int = Field(default=7, ge=1, le=10_000, description="Complete backups kept; older are deleted.")
    compress: int = Field(default=6, ge=1, le=9, description="Compression level (1 fastest, 9 smallest).")
    timeout: Duration = Field(default=900.0, le=MAX_BACKUP_TIMEOUT, description="Time for the whole backup.")

    @field_validator("directory")
    @classmethod
    def _inside(cls, value: str) -> str:
        if not value or "\x00" in value or ".." in Path(value).parts:
            raise ValueError("must be a path without '..'")
        return value


class PostgresBackupParams(BackupParams):
    """``postgres_backup``: which database, and where to test-restore it."""

    database_url: str = Field(
        description="libpq URL (postgresql://user@host:port/db); give the password as a secret."
    )
    test_restore_url: str | None = Field(
        default=None,
        description="A scratch database the backup is restored into and checked (its objects are replaced).",
    )

    @field_validator("database_url", "test_restore_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or _is_reference(value):
            return value  # a secret, seen only when the backup runs
        try:
            _Connection.parse(value)
        except PermanentError as exc:
            raise ValueError(str(exc)) from exc
        return value


class SqliteBackupParams(BackupParams):
    """``sqlite_backup``: which database file."""

    database: str = Field(description="Path of the SQLite database file.")


@dataclass(frozen=True)
class _Connection:
    """A PostgreSQL URL split into what may be shown (``url``) and the password."""

    url: str
    password: str | None
    database: str
    host: str

    @classmethod
    def parse(cls, raw: str) -> _Connection:
        try:
            return cls._parse(raw)
        except ValueError as exc:  # a port that is not a number
            raise PermanentError(f"not a valid PostgreSQL URL: {exc}") from exc

    @classmethod
    def _parse(cls, raw: str) -> _Connection:
        parts = urlsplit(raw)
        scheme = parts.scheme.split("+", 1)[0]  # SQLAlchemy's postgresql+psycopg:// too
        if scheme not in ("postgresql", "postgres"):
            raise PermanentError("not a PostgreSQL URL (postgresql://user@host:port/database)")
        database = unquote(parts.path.lstrip("/"))
        if not database:
            raise PermanentError("the PostgreSQL URL names no database")
        netloc = parts.hostname or ""
        if ":" in netloc:  # an IPv6 address
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        shown = urlunsplit(("postgresql", netloc, parts.path, parts.query, ""))
        password = unquote(parts.password) if parts.password is not None else None
        return cls(url=shown, password=password, database=database, host=f"{parts.hostname}:{parts.port}")

    def env(self) -> dict[str, str]:
        env = {"PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT_S)}
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env


def _preflight(_ctx: RemediationContext, params: BackupParams) -> Preflight:
    return Preflight(timeout=params.timeout, details={"directory": params.directory, "keep": params.keep})


def _postgres_preflight(ctx: RemediationContext, params: PostgresBackupParams) -> Preflight:
    if params.test_restore_url is not None and not (
        _is_reference(params.database_url) or _is_reference(params.test_restore_url)
    ):
        _distinct(_Connection.parse(params.database_url), _Connection.parse(params.test_restore_url))
    return _preflight(ctx, params)


def _sqlite_preflight(ctx: RemediationContext, params: SqliteBackupParams) -> Preflight:
    return _preflight(ctx, params)


def _distinct(source: _Connection, scratch: _Connection) -> None:
    if (source.host, source.database) == (scratch.host, scratch.database):
        raise PermanentError("test_restore_url must be a scratch database, not the database backed up")


class _Deadline:
    """The backup's time budget, and the attempt's cancellation, checked between steps."""

    def __init__(self, ctx: RemediationContext, timeout: float) -> None:
        self.ctx = ctx
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def left(self) -> float:
        self.check()
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.ctx.cancelled.is_set():
            raise PermanentError("stopped: this attempt lost its lease")
        if time.monotonic() >= self.end:
            raise TransientError(f"backup timed out after {self.timeout:g}s")


def _stamp(ctx: RemediationContext) -> str:
    now = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{(ctx.run_id or os.urandom(4).hex())[:8]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _partial(directory: Path, name: str) -> Iterator[Path]:
    """A scratch path beside ``name`` in ``directory``, removed unless it was renamed away."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PermanentError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    path = directory / f".{name}.partial"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _complete(partial: Path, final: Path) -> str:
    """Sync, checksum and rename a verified backup into place; returns its sha256."""
    _fsync(partial)
    digest = _sha256(partial)
    partial.rename(final)
    checksum = final.with_name(final.name + ".sha256")
    checksum.write_text(f"{digest}  {final.name}\n", encoding="utf-8")
    _fsync(checksum)
    _fsync(final.parent)
    return digest


def retain(directory: Path, prefix: str, suffix: str, keep: int) -> tuple[list[str], list[str]]:
    """Delete all but the ``keep`` newest complete backups of a set: (kept, deleted) file names.

    Complete means the backup and its ``.sha256`` are both there; names sort by their UTC time.
    """
    complete = sorted(
        (
            path
            for path in directory.glob(f"{prefix}-*{suffix}")
            if path.is_file() and path.with_name(path.name + ".sha256").is_file()
        ),
        key=lambda path: path.name,
        reverse=True,
    )
    deleted = []
    for path in complete[keep:]:
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        deleted.append(path.name)
    return [path.name for path in complete[:keep]], deleted


def _failed(what: str, finished: Finished) -> TransientError | PermanentError:
    details = finished.details()
    if finished.stop_reason == "cancelled":
        return PermanentError("stopped: this attempt lost its lease", details=details)
    if finished.stop_reason == "timeout":
        return TransientError(f"{what} timed out; process group killed", details=details)
    last = finished.stderr.strip().splitlines()[-1:] or [f"exit status {finished.exit_code}"]
    return TransientError(f"{what} failed: {last[0][:300]}", details=details)


def _tables_in_archive(listing: str) -> int:
    """Tables in a ``pg_restore --list`` table of contents."""
    return sum(1 for line in listing.splitlines() if not line.startswith(";") and " TABLE DATA " in line)


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise PermanentError(f"{name} is not installed (PostgreSQL client programs are needed)")
    return found


@_backup(name="postgres_backup", preflight=_postgres_preflight)
def postgres_backup(ctx: RemediationContext, params: PostgresBackupParams) -> RemediationResult:
    """Dump a PostgreSQL database (custom format, compressed), verify the archive, optionally
    restore it into a scratch database and count its tables, then keep the newest ``keep``."""
    deadline = _Deadline(ctx, params.timeout)
    source = _Connection.parse(params.database_url)
    scratch = _Connection.parse(params.test_restore_url) if params.test_restore_url else None
    if scratch is not None:
        _distinct(source, scratch)
    directory = Path(params.directory)
    final = directory / f"{params.prefix}-{_stamp(ctx)}.dump"
    details: dict[str, Any] = {"database": source.url}
    started = time.monotonic()
    with _partial(directory, final.name) as partial:
        dump = run_process(
            [
                _program("pg_dump"),
                "--format=custom",
                f"--compress={params.compress}",
                "--no-password",
                f"--file={partial}",
                f"--dbname={source.url}",
            ],
            ctx,
            timeout=deadline.left(),
            env=source.env(),
        )
        if not dump.ok:
            raise _failed("pg_dump", dump)
        toc = partial.with_name(partial.name + ".toc")
        try:
            # The table of contents to a file: a large schema's would not fit the kept output.
            listing = run_process(
                [_program("pg_restore"), "--list", f"--file={toc}", str(partial)],
                ctx,
                timeout=deadline.left(),
            )
            if not listing.ok:
                raise _failed("verify (pg_restore --list)", listing)
            tables = _tables_in_archive(toc.read_text(encoding="utf-8", errors="replace"))
        finally:
            toc.unlink(missing_ok=True)
        details["tables"] = tables
        if scratch is not None:
            details["test_restore"] = _test_restore(ctx, deadline, partial, scratch, tables)
        digest = _complete(partial, final)
    size = final.stat().st_size
    kept, deleted = retain(directory, params.prefix, ".dump", params.keep)
    details.update(
        file=str(final),
        size_bytes=size,
        sha256=digest,
        verified=True,
        kept=len(kept),
        deleted=deleted,
        duration_s=round(time.monotonic() - started, 3),
    )
    return RemediationResult(
        summary=f"backed up {source.database} to {final.name} ({size} bytes)", details=details
    )


def _test_restore(
    ctx: RemediationContext, deadline: _Deadline, archive: Path, scratch: _Connection, tables: int
) -> dict[str, Any]:
    """Restore ``archive`` into the scratch database and check its tables are all there."""
    restore = run_process(
        [
            _program("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
            f"--dbname={scratch.url}",
            str(archive),
        ],
        ctx,
        timeout=deadline.left(),
        env=scratch.env(),
    )
    if not restore.ok:
        raise _failed("test restore (pg_restore)", restore)
    count = run_process(
        [
            _program("psql"),
            "--no-psqlrc",
            "--no-password",
            "--tuples-only",
            "--no-align",
            "--set=ON_ERROR_STOP=1",
            f"--dbname={scratch.url}",
            "--command=SELECT count(*) FROM pg_catalog.pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        ],
        ctx,
        timeout=deadline.left(),
        env=scratch.env(),
    )
    if not count.ok:
        raise _failed("test restore (counting tables)", count)
    restored = int(count.stdout.strip() or 0)
    if restored < tables:
        raise TransientError(
            f"test restore: {restored} tables in {scratch.database}, the archive has {tables}",
            details={"restored_tables": restored, "tables": tables},
        )
    return {"database": scratch.url, "tables": restored}


@_backup(name="sqlite_backup", preflight=_sqlite_preflight)
def sqlite_backup(ctx: RemediationContext, params: SqliteBackupParams) -> RemediationResult:
    """Copy a live SQLite database with its online backup API, gzip it, verify the copy by
    restoring it (``PRAGMA integrity_check``, tables counted), then keep the newest ``keep``."""
    deadline = _Deadline(ctx, params.timeout)
    source_path = Path(params.database)
    if not source_path.is_file():
        raise PermanentError(f"no SQLite database at {source_path}")
    directory = Path(params.directory)
    final = directory / f"{params.prefix}-{_stamp(ctx)}.sqlite.gz"
    started = time.monotonic()
    with _partial(directory, final.name) as partial, tempfile.TemporaryDirectory(dir=directory) as scratch:
        copy = Path(scratch) / "copy.sqlite"
        tables = _sqlite_copy(source_path, copy, deadline)
        with copy.open("rb") as raw, gzip.open(partial, "wb", compresslevel=params.compress) as packed:
            shutil.copyfileobj(raw, packed, CHUNK)
        deadline.check()
        restored = Path(scratch) / "restored.sqlite"
        with gzip.open(partial, "rb") as packed, restored.open("wb") as raw:
            shutil.copyfileobj(packed, raw, CHUNK)
        found = _sqlite_check(restored)
        if found < tables:
            raise TransientError(f"verify: the restored copy has {found} tables, the database {tables}")
        deadline.check()
        digest = _complete(partial, final)
    size = final.stat().st_size
    kept, deleted = retain(directory, params.prefix, ".sqlite.gz", params.keep)
    return RemediationResult(
        summary=f"backed up {source_path.name} to {final.name} ({size} bytes)",
        details={
            "database": str(source_path),
            "file": str(final),
            "size_bytes": size,
            "sha256": digest,
            "tables": tables,
            "verified": True,
            "test_restore": {"integrity_check": "ok", "tables": found},
            "kept": len(kept),
            "deleted": deleted,
            "duration_s": round(time.monotonic() - started, 3),
        },
    )


_COUNT_TABLES = "SELECT count(*) FROM sqlite_master WHERE type = 'table'"


def _sqlite_copy(source_path: Path, copy: Path, deadline: _Deadline) -> int:
    """A consistent copy of a live database (online backup API); its table count."""

    def progress(_status: int, _remaining: int, _total: int) -> None:
        deadline.check()  # an exception here aborts the backup

    try:
        source = sqlite3.connect(f"{source_path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            target = sqlite3.connect(copy)
            try:
                source.backup(target, pages=SQLITE_PAGES_PER_STEP, progress=progress)
            finally:
                target.close()
            tables: int = source.execute(_COUNT_TABLES).fetchone()[0]
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise TransientError(f"SQLite backup failed: {exc}") from exc
    return tables


def _sqlite_check(path: Path) -> int:
    """``PRAGMA integrity_check`` on a restored copy; its table count."""
    try:
        db = sqlite3.connect(path)
        try:
            verdict = [row[0] for row in db.execute("PRAGMA integrity_check")]
            tables: int = db.execute(_COUNT_TABLES).fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise TransientError(f"verify: the restored copy cannot be read: {exc}") from exc
    if verdict != ["ok"]:
        raise TransientError(f"verify: integrity_check found {'; '.join(verdict[:5])[:300]}")
    return tables
