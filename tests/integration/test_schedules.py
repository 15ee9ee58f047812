"""Schedules on the real stack: beat records each tick in the ledger, a worker runs it; the
backups' metrics on the receiver; a lost message re-sent; runs of a schedule never overlap."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from tests.integration.test_metrics import _value
from tests.stack import Stack, wait_for


def _backup_schedule(ledger_url: str, directory: Path) -> dict[str, Any]:
    url = sa.engine.make_url(ledger_url)
    if url.get_backend_name() == "sqlite":
        remediation, params = "sqlite_backup", {"database": url.database}
    else:  # the SQLAlchemy URL is one libpq takes too, once its driver is dropped
        remediation, params = "postgres_backup", {"database_url": ledger_url.replace("+psycopg", "")}
    return {
        "name": "ledger-backup",
        "every": "2s",
        "remediation": remediation,
        "params": {**params, "directory": str(directory), "prefix": "ledger", "keep": 2},
    }


def test_a_backup_schedule_runs_and_is_measured(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path, promtool: str
) -> None:
    """Every 2 s beat records a tick, the worker backs the ledger up; each tick is one run (its
    due time in its key), two backups are kept, and the receiver's /metrics gives the last
    success, its size and the threshold, lint-clean."""
    backups = tmp_path / "backups"
    stack = stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_config={"schedules": [_backup_schedule(ledger_url, backups)]},
    )
    stack.start_all()

    def three() -> list[dict[str, Any]] | None:
        runs = [r for r in stack.runs(rule="ledger-backup") if r["status"] == "succeeded"]
        return runs if len(runs) >= 3 else None

    runs = wait_for(three, timeout=60, what="three succeeded backups")
    everything = stack.runs(rule="ledger-backup", limit="500")
    keys = [r["idempotency_key"] for r in everything]
    assert len(keys) == len(set(keys))  # one run per tick
    assert all(r["trigger"] == "schedule" and r["remediation"].endswith("_backup") for r in everything)
    result = runs[0]["attempts"][-1]["output"]
    assert result["verified"] is True and result["size_bytes"] > 0
    assert result["tables"] >= 5  # the ledger's

    def measured() -> str | None:
        text = httpx.get(f"{stack.base_url}/metrics", timeout=5).text
        return text if _value(text, "responder_backup_size_bytes", schedule="ledger-backup") > 0 else None

    text = wait_for(measured, timeout=20, what="the backup metrics")
    last = _value(text, "responder_backup_last_success_timestamp_seconds", schedule="ledger-backup")
    assert abs(last - _timestamp(runs[0]["finished_at"])) < 60
    assert _value(text, "responder_backup_stale_after_seconds", schedule="ledger-backup") == 4
    assert _value(text, "responder_backup_installed_timestamp_seconds", schedule="ledger-backup") > 0
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
        checked.stdout + checked.stderr
    )
    stack.stop("beat")
    wait_for(
        lambda: all(
            r["status"] in ("succeeded", "failed", "skipped") for r in stack.runs(rule="ledger-backup")
        ),
        timeout=30,
        what="the last backup to finish",
    )
    kept = sorted(p.name for p in backups.iterdir() if not p.name.startswith("."))
    assert len(kept) == 4, kept  # two backups and their checksums


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_a_tick_whose_message_is_lost_still_runs_once(
    stack_factory: type[Stack], sqlite_url: str, tmp_path: Path
) -> None:
    """With no worker, beat records ticks and publishes them; Redis then restarts empty (every
    message gone). The reconciler re-sends each recorded tick from the ledger: every tick runs,
    and each exactly once."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=sqlite_url,
        extra_config={
            "schedules": [
                {
                    "name": "ping",
                    "every": "1s",
                    "remediation": "http_request",
                    "params": {"url": "http://127.0.0.1:{target}/ping", "method": "POST"},
                }
            ]
        },
    )
    stack.start_receiver()
    stack.start_beat()
    wait_for(lambda: len(stack.runs(rule="ping")) >= 2, timeout=30, what="two recorded ticks")
    stack.stop("beat")
    recorded = stack.runs(rule="ping", limit="500")
    assert all(r["status"] == "queued" and r["trigger"] == "schedule" for r in recorded)
    stack.restart_redis_empty()
    stack.start_worker()
    stack.start_beat()  # the reconciler is a beat job
    ticks = {r["id"] for r in recorded}
    wait_for(
        lambda: ticks <= {r["id"] for r in stack.runs(rule="ping", status="succeeded", limit="500")},
        timeout=60,
        what="every recorded tick to run",
    )
    stack.stop("beat")

    def all_done() -> list[dict[str, Any]] | None:
        runs = stack.runs(rule="ping", limit="500")
        return runs if all(r["status"] == "succeeded" for r in runs) else None

    every = wait_for(all_done, timeout=30, what="the last ticks to run")
    assert len({r["idempotency_key"] for r in every}) == len(every)
    assert all(len(r["attempts"]) == 1 for r in every)
    assert len([c for c in stack.target.calls if c.path == "/ping"]) == len(every)


def test_runs_of_a_schedule_never_overlap(
    stack_factory: type[Stack], sqlite_url: str, tmp_path: Path
) -> None:
    """A schedule every second whose command takes 3 s: the ticks that come while it runs are
    skipped (locked), so the command never runs twice at once."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=sqlite_url,
        extra_config={
            "schedules": [
                {
                    "name": "slow-job",
                    "every": "1s",
                    "remediation": "run_command",
                    "params": {"command": "slow"},
                }
            ]
        },
    )
    stack.start_receiver()
    stack.start_worker(concurrency=2)
    stack.start_beat()
    wait_for(lambda: stack.lines("slow").count("done") >= 2, timeout=60, what="two slow runs")
    stack.stop("beat")

    def finished() -> list[dict[str, Any]] | None:
        runs = stack.runs(rule="slow-job", limit="500")
        return runs if all(r["status"] in ("succeeded", "skipped") for r in runs) else None

    runs = wait_for(finished, timeout=30, what="the last run to end")
    lines = stack.lines("slow")
    assert lines == ["start", "done"] * (len(lines) // 2), lines  # one at a time
    skipped = [r for r in runs if r["status"] == "skipped"]
    assert skipped and all(r["skip_reason"] == "locked" for r in skipped)
    assert len([r for r in runs if r["status"] == "succeeded"]) == len(lines) // 2
