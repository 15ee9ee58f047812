"""The backup remediations' pure parts and the SQLite backup, end to end on real files."""

from __future__ import annotations

import gzip
import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from remediations import PermanentError, RemediationContext, TransientError, get_remediation
from remediations.backup import PostgresBackupParams, SqliteBackupParams, retain, sqlite_backup


def _database(path: Path, rows: int = 100) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("CREATE TABLE other (x)")
    db.executemany("INSERT INTO items (name) VALUES (?)", [(f"item-{i}" * 20,) for i in range(rows)])
    db.commit()
    db.close()
    return path


def _params(tmp_path: Path, **extra: object) -> SqliteBackupParams:
    return SqliteBackupParams.model_validate(
        {
            "database": str(tmp_path / "live.sqlite"),
            "directory": str(tmp_path / "backups"),
            "prefix": "ledger",
            **extra,
        }
    )


def test_sqlite_backup_is_verified_checksummed_and_restorable(tmp_path: Path) -> None:
    _database(tmp_path / "live.sqlite")
    result = sqlite_backup(RemediationContext(run_id="run-one"), _params(tmp_path))
    final = Path(result.details["file"])
    assert final.parent == tmp_path / "backups" and final.name.startswith("ledger-")
    assert final.name.endswith("-run-one.sqlite.gz")
    assert result.details["size_bytes"] == final.stat().st_size > 0
    assert result.details["tables"] == 2 and result.details["test_restore"]["tables"] == 2
    checksum = final.with_name(final.name + ".sha256").read_text()
    assert checksum == f"{hashlib.sha256(final.read_bytes()).hexdigest()}  {final.name}\n"
    assert result.details["sha256"] == checksum.split()[0]
    restored = tmp_path / "restored.sqlite"
    restored.write_bytes(gzip.decompress(final.read_bytes()))
    assert sqlite3.connect(restored).execute("SELECT count(*) FROM items").fetchone() == (100,)
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == [final.name, final.name + ".sha256"]


def test_sqlite_backup_keeps_the_newest(tmp_path: Path) -> None:
    _database(tmp_path / "live.sqlite")
    names = []
    for number in range(4):
        result = sqlite_backup(RemediationContext(run_id=f"run-{number}"), _params(tmp_path, keep=2))
        names.append(Path(result.details["file"]).name)
    assert result.details["kept"] == 2
    # Names sort by time, then by run id (run-0 < run-3): the last two made are kept.
    newest = sorted(names)[-2:]
    assert newest == names[-2:]
    left = sorted(p.name for p in (tmp_path / "backups").iterdir())
    assert left == sorted([*newest, *(name + ".sha256" for name in newest)])


def test_retention_counts_only_complete_backups(tmp_path: Path) -> None:
    for stamp in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):
        (tmp_path / f"db-{stamp}-a.dump").write_bytes(b"x")
        (tmp_path / f"db-{stamp}-a.dump.sha256").write_text("x")
    (tmp_path / "db-20260104T000000Z-a.dump").write_bytes(b"no checksum: incomplete")
    (tmp_path / "other-20250101T000000Z-a.dump").write_bytes(b"another set")
    (tmp_path / "other-20250101T000000Z-a.dump.sha256").write_text("x")
    kept, deleted = retain(tmp_path, "db", ".dump", 2)
    assert kept == ["db-20260103T000000Z-a.dump", "db-20260102T000000Z-a.dump"]
    assert deleted == ["db-20260101T000000Z-a.dump"]
    assert not (tmp_path / "db-20260101T000000Z-a.dump.sha256").exists()
    assert (tmp_path / "db-20260104T000000Z-a.dump").exists()
    assert (tmp_path / "other-20250101T000000Z-a.dump").exists()


def test_a_failed_backup_leaves_nothing_and_keeps_the_earlier_ones(tmp_path: Path) -> None:
    _database(tmp_path / "live.sqlite")
    first = sqlite_backup(RemediationContext(run_id="first"), _params(tmp_path))
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(PermanentError, match="lost its lease"):
        sqlite_backup(RemediationContext(run_id="second", cancelled=cancelled), _params(tmp_path, keep=1))
    (tmp_path / "live.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(TransientError, match="SQLite backup failed"):
        sqlite_backup(RemediationContext(run_id="third"), _params(tmp_path, keep=1))
    left = sorted(p.name for p in (tmp_path / "backups").iterdir())
    assert left == [Path(first.details["file"]).name, Path(first.details["file"]).name + ".sha256"]


def test_the_password_leaves_the_url_shown() -> None:
    from remediations.backup import _Connection

    parsed = _Connection.parse("postgresql+psycopg://app:p%40ss@[::1]:5433/main?sslmode=require")
    assert parsed.url == "postgresql://app@[::1]:5433/main?sslmode=require"
    assert parsed.password == "p@ss" and parsed.env()["PGPASSWORD"] == "p@ss" and parsed.database == "main"


def test_missing_database_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="no SQLite database"):
        sqlite_backup(RemediationContext(), _params(tmp_path))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("directory", ""),
        ("directory", "../up"),
        ("directory", "/srv/../etc"),
        ("prefix", "../x"),
        ("prefix", "a b"),
        ("keep", 0),
    ],
)
def test_bad_params_are_refused(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        _params(tmp_path, **{field: value})


def test_postgres_urls_are_checked_and_the_scratch_database_is_not_the_source() -> None:
    base = {"directory": "/var/backups/pg", "prefix": "main"}
    with pytest.raises(ValidationError, match="not a PostgreSQL URL"):
        PostgresBackupParams.model_validate({**base, "database_url": "mysql://db/x"})
    with pytest.raises(ValidationError, match="names no database"):
        PostgresBackupParams.model_validate({**base, "database_url": "postgresql://db:5432"})
    with pytest.raises(ValidationError, match="not a valid PostgreSQL URL"):
        PostgresBackupParams.model_validate({**base, "database_url": "postgresql://db:port/x"})
    # A secret reference is looked at only when the backup runs.
    PostgresBackupParams.model_validate({**base, "database_url": "\ue000secret:PG_URL\ue001"})
    definition = get_remediation("postgres_backup")
    params = definition.validate(
        {
            **base,
            "database_url": "postgresql://u@db:5432/app",
            "test_restore_url": "postgresql://u:pw@db:5432/app",
        }
    )
    with pytest.raises(PermanentError, match="scratch database"):
        definition.preflight(RemediationContext(), params)
