"""``postgres_backup`` against the real PostgreSQL server, with the real pg_dump and pg_restore."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import sqlalchemy as sa

from remediations import RemediationContext, TransientError, get_remediation
from tests.conftest import require
from workers.ledger.db import make_engine


@pytest.fixture
def scratch_url(pg_server: str) -> Iterator[str]:
    """An empty database to test-restore into, dropped afterwards."""
    require(shutil.which("pg_dump") is not None and shutil.which("pg_restore") is not None, "pg_dump")
    name = f"responder_restore_{os.getpid()}"
    admin = make_engine(pg_server).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _run(params: Mapping[str, object], run_id: str) -> dict[str, object]:
    definition = get_remediation("postgres_backup")
    validated = definition.validate(params)
    definition.preflight(RemediationContext(), validated)
    return definition.run(RemediationContext(run_id=run_id), validated).details


def test_dump_verify_test_restore_and_retain(pg_url: str, scratch_url: str, tmp_path: Path) -> None:
    """A migrated ledger is dumped, read back, restored into a scratch database with every table,
    and only the newest two backups stay; the password never reaches an argv or the result."""
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE canary (id int)"))
        conn.execute(sa.text("INSERT INTO canary SELECT generate_series(1, 500)"))
    engine.dispose()
    password = sa.engine.make_url(pg_url).password
    assert password  # the tests' role has one: it must travel in PGPASSWORD
    params = {
        "database_url": pg_url,
        "test_restore_url": scratch_url,
        "directory": str(tmp_path / "pg"),
        "prefix": "ledger",
        "keep": 2,
    }
    results = [_run(params, f"run-{n}") for n in range(3)]
    last = results[-1]
    final = Path(str(last["file"]))
    assert last["verified"] is True and last["size_bytes"] == final.stat().st_size > 0
    tables = last["tables"]
    assert isinstance(tables, int) and tables >= 5  # the ledger's tables and the canary
    assert last["test_restore"] == {
        "database": scratch_url.replace("+psycopg", "").replace(f":{password}@", "@"),
        "tables": tables,
    }
    assert f":{password}@" not in repr(results)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    assert final.with_name(final.name + ".sha256").read_text() == f"{digest}  {final.name}\n"
    left = sorted(p.name for p in final.parent.iterdir())
    newest = sorted(Path(str(r["file"])).name for r in results)[-2:]
    assert left == sorted([*newest, *(n + ".sha256" for n in newest)])
    assert last["deleted"] == [Path(str(results[0]["file"])).name] and last["kept"] == 2
    # The scratch database holds the data as it was dumped.
    scratch = make_engine(scratch_url)
    with scratch.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM canary")).scalar() == 500
    scratch.dispose()
    # And the archive restores with the standard tools alone.
    listing = subprocess.run(["pg_restore", "--list", str(final)], capture_output=True, text=True, check=True)
    assert "TABLE DATA public canary" in listing.stdout


def test_a_failed_dump_is_transient_and_keeps_earlier_backups(
    pg_url: str, scratch_url: str, tmp_path: Path
) -> None:
    params = {"database_url": pg_url, "directory": str(tmp_path), "prefix": "ledger"}
    first = _run(params, "first")
    missing = pg_url.rsplit("/", 1)[0] + "/responder_no_such_database"
    with pytest.raises(TransientError, match=r"pg_dump failed: .*responder_no_such_database"):
        _run({**params, "database_url": missing}, "second")
    left = sorted(p.name for p in tmp_path.iterdir())
    name = Path(str(first["file"])).name
    assert left == [name, name + ".sha256"]
