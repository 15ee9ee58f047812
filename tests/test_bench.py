"""A smoke run of every benchmark script with tiny numbers: each starts, measures and stops.

No timing is asserted (figures from such a small run mean nothing); what is asserted is what
each script checks: every accepted alert recorded, and in the storm nothing lost, no 5xx and
exactly one run and one call per alert.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script from the repository; it must exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COV_CORE")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.redis
@pytest.mark.postgres
def test_every_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    done = _bench("bench.suite", "--smoke", timeout=600)
    results = json.loads((ROOT / "bench" / "results" / "suite.json").read_text())
    assert set(results) == {"intake", "ledger", "worker", "storm", "telemetry"}
    intake = results["intake"]["figures"]
    for key in ("floor_rps", "sqlite_rps", "sqlite_dup_rps", "postgresql_rps", "postgresql_dup_rps"):
        assert intake[key]["median"] > 0, key
    # The libraries' floor is the bare endpoint plus imports: it holds more memory than it.
    assert intake["floor_libraries_rest_pss"]["median"] > intake["floor_rest_pss"]["median"]
    ledger = results["ledger"]["figures"]
    assert ledger["sqlite_attempt_ms"]["median"] > 0 and ledger["postgresql_attempt_ms"]["median"] > 0
    worker = results["worker"]["figures"]
    assert worker["drain"]["median"] > 0 and worker["floor_drain"]["median"] > 0
    assert worker["e2e_20_non2xx"]["median"] == 0
    storm = results["storm"]["figures"]
    assert storm["lost"]["median"] == storm["server_errors"]["median"] == storm["duplicated"]["median"] == 0
    assert results["storm"]["notes"] == ["every run: 0 lost, 0 5xx, one succeeded run and one call per alert"]
    telemetry = results["telemetry"]["figures"]
    for key in ("off_sqlite_rps", "on_sqlite_rps", "off_drain", "on_drain", "intake_ratio", "drain_ratio"):
        assert telemetry[key]["median"] > 0, key
    assert telemetry["otlp_exports"]["median"] > 0  # "on" really exported spans
    assert "== targets" in done.stdout and ("met" in done.stdout)


@pytest.mark.redis
@pytest.mark.postgres
def test_receiver_cost_runs(tmp_path: Path) -> None:
    """``bench/receiver_cost.py`` (not part of the suite: its instruction count needs valgrind)
    drives the receiver in-process on both ledgers; every webhook it sends must get its 202."""
    _bench("bench.receiver_cost", "--webhooks", "20", "--connections", "4", timeout=300)
    figures = json.loads((ROOT / "bench" / "results" / "receiver_cost.json").read_text())["figures"]
    assert figures["sqlite_cpu_us"]["median"] > 0 and figures["postgresql_cpu_us"]["median"] > 0


@pytest.mark.redis
@pytest.mark.postgres
def test_worker_cost_runs(tmp_path: Path) -> None:
    """``bench/worker_cost.py`` (not part of the suite) handles and runs its alerts in-process
    on both ledgers; every run must succeed and reach the target, once."""
    _bench("bench.worker_cost", "--alerts", "10", timeout=300)
    figures = json.loads((ROOT / "bench" / "results" / "worker_cost.json").read_text())["figures"]
    for database in ("sqlite", "postgresql"):
        assert figures[f"{database}_handle_us"]["median"] > 0 and figures[f"{database}_run_us"]["median"] > 0
        assert figures[f"{database}_first_handle_ms"]["median"] > 0
        assert figures[f"{database}_first_run_ms"]["median"] > 0


@pytest.mark.redis
def test_stages_runs(tmp_path: Path) -> None:
    """``bench/stages.py`` (not part of the suite) splits each alert's time into its stages from
    the ledger's timestamps and adds up each process's CPU; every alert must be called."""
    _bench("bench.stages", "--rate", "20", "--seconds", "1", timeout=300)
    figures = json.loads((ROOT / "bench" / "results" / "stages.json").read_text())["figures"]
    assert figures["total_p50"]["median"] >= figures["planned_p50"]["median"] > 0
    assert figures["cpu_total"]["median"] > figures["cpu_worker_parent"]["median"] > 0
