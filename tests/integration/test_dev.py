"""`responder dev`: the whole system from one command, as `make dev` runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import _redis_binary_available, require
from tests.helpers import alert_payload
from tests.stack import wait_for
from workers.dev import free_port

pytestmark = [pytest.mark.redis]


def test_dev_runs_everything_and_stops_cleanly(tmp_path: Path) -> None:
    """dev starts Redis, migrates, prints generated tokens once, handles an alert, stops on Ctrl-C."""
    require(_redis_binary_available(), "redis-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESPONDER_")}
    env["RESPONDER_LOG_FORMAT"] = "json"
    out = (tmp_path / "dev.out").open("wb")
    env["RESPONDER_CONFIG"] = str(Path("examples/responder.yaml").resolve())
    # As `make dev` runs it: the default data directory, relative to the working directory.
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "dev", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:

        def text() -> str:
            return (tmp_path / "dev.out").read_text(errors="replace")

        wait_for(lambda: "operator token:" in text(), timeout=30, what="the dev banner")
        ingest = re.search(r"ingest token:\s+(\S+)", text())
        operator = re.search(r"operator token:\s+(\S+)", text())
        redis_url = re.search(r"redis:\s+(\S+)", text())
        assert ingest and operator and redis_url
        base = f"http://127.0.0.1:{port}"

        def posted() -> httpx.Response | None:
            try:
                return httpx.post(
                    f"{base}/api/v1/alertmanager",
                    content=json.dumps(alert_payload("ResponderCommand", instance="dev-1")),
                    headers={"Authorization": f"Bearer {ingest[1]}"},
                    timeout=5,
                )
            except httpx.TransportError:
                return None

        assert wait_for(posted, timeout=30, what="the receiver").status_code == 202

        def succeeded(rule: str) -> bool:
            runs = httpx.get(
                f"{base}/api/v1/runs",
                params={"rule": rule},
                headers={"Authorization": f"Bearer {operator[1]}"},
                timeout=5,
            ).json()["runs"]
            return bool(runs) and runs[0]["status"] == "succeeded"

        wait_for(lambda: succeeded("probe-command"), timeout=60, what="the run to succeed")

        # The example config's hourly backup of the dev ledger is installed (its first tick is
        # an hour after it), and measured.
        def scheduled() -> str | None:
            scrape = httpx.get(f"{base}/metrics", timeout=5).text
            installed = 'responder_backup_stale_after_seconds{schedule="ledger-backup"} 7200.0'
            return scrape if installed in scrape else None

        metrics = wait_for(scheduled, timeout=30, what="the dev ledger's backup schedule")
        assert 'responder_backup_installed_timestamp_seconds{schedule="ledger-backup"}' in metrics
        assert text().count("ingest token:") == 1
        assert (tmp_path / ".responder" / "dev" / "ledger.db").exists()
        assert (tmp_path / ".responder" / "dev" / "redis" / "redis.log").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=40)
        out.close()
    assert code == 0, (tmp_path / "dev.out").read_text(errors="replace")[-4000:]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url[1], socket_connect_timeout=1).ping()
