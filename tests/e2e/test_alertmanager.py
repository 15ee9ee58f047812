"""End to end with the real Alertmanager binary posting to a real receiver with a bearer token."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from tests.conftest import require
from tests.stack import INGEST_TOKEN, Stack, wait_for
from workers.dev import free_port
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent

pytestmark = [pytest.mark.alertmanager, pytest.mark.redis]

LABELS = {"alertname": "ResponderProbe", "severity": "critical", "instance": "e2e-1"}


class Alertmanager:
    """A prometheus-alertmanager process routing everything to the stack's receiver."""

    def __init__(self, tmp: Path, receiver_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "route": {
                "receiver": "responder",
                "group_by": ["alertname", "instance"],
                "group_wait": "1s",
                "group_interval": "2s",
                "repeat_interval": "4s",
            },
            "receivers": [
                {
                    "name": "responder",
                    "webhook_configs": [
                        {
                            "url": f"{receiver_url}/api/v1/alertmanager",
                            "send_resolved": True,
                            "http_config": {"authorization": {"type": "Bearer", "credentials": INGEST_TOKEN}},
                        }
                    ],
                }
            ],
        }
        (tmp / "am.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "alertmanager.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "prometheus-alertmanager",
                f"--config.file={tmp / 'am.yml'}",
                f"--storage.path={tmp / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=30, what="Alertmanager to be ready")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def alertmanager(stack: Stack, tmp_path: Path) -> Iterator[Alertmanager]:
    require(
        bool(shutil.which("prometheus-alertmanager") and shutil.which("amtool")),
        "prometheus-alertmanager and amtool",
    )
    am = Alertmanager(tmp_path, stack.base_url)
    yield am
    am.close()


def _events(stack: Stack) -> list[AlertEvent]:
    with transaction(stack.database_url) as session:
        return list(session.scalars(select(AlertEvent).order_by(AlertEvent.received_at)))


def test_alertmanager_fires_and_resolves(stack: Stack, alertmanager: Alertmanager) -> None:
    """amtool fires: one call and one succeeded run; repeats dedupe; resolve: handled, no second run."""
    fired_at = time.time()
    subprocess.run(
        [
            "amtool",
            "alert",
            "add",
            *(f"{k}={v}" for k, v in LABELS.items()),
            f"--alertmanager.url={alertmanager.url}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    call = wait_for(lambda: stack.target.calls, timeout=30, what="the remediation's HTTP call")[0]
    print(f"amtool alert add -> remediation HTTP call: {call.at - fired_at:.3f}s")
    assert (call.method, call.path) == ("POST", "/hook/e2e-1")
    assert json.loads(call.body) == {"alert": "ResponderProbe", "instance": "e2e-1"}
    run = stack.wait_run("succeeded", rule="probe-http")
    assert run["fingerprint"] and run["trigger"] == "alert"

    # Alertmanager re-sends the still-firing group every repeat_interval: a duplicate, no new run.
    wait_for(
        lambda: any(line.get("duplicate") == 1 for line in stack.log_lines("receiver")),
        timeout=30,
        what="a repeated notification",
    )

    # Resolve as a source does, with the alert's own startsAt. (GET /api/v2/alerts shows it cut to
    # milliseconds; resolving with that value makes Alertmanager send another startsAt, i.e.
    # another episode: see docs/alertmanager.md.)
    starts_at = _events(stack)[0].starts_at
    resolved = [{"labels": LABELS, "startsAt": starts_at, "endsAt": datetime.now(UTC).isoformat()}]
    httpx.post(f"{alertmanager.url}/api/v2/alerts", json=resolved, timeout=5).raise_for_status()

    def resolved_handled() -> bool:
        return any(e.status == "resolved" and e.handled_at is not None for e in _events(stack))

    wait_for(resolved_handled, timeout=30, what="the resolved event to be handled")
    events = _events(stack)
    assert [e.status for e in events] == ["firing", "resolved"]
    assert events[0].starts_at == events[1].starts_at  # one episode
    assert events[1].matched_rules == 1
    time.sleep(3)  # past a group interval: any second notification or run would show now
    assert len(stack.target.calls) == 1
    assert len(stack.runs()) == 1
