"""Test helpers shared by unit tests: configs, alerts and a recording publisher."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.alerts import Alert
from workers.config import ResponderConfig, parse_config
from workers.publishing import Message, Publisher, PublishError
from workers.settings import Settings
from workers.tasknames import HANDLE_ALERT

FIXTURES = Path(__file__).parent / "fixtures" / "alertmanager"


def compat_config(port: int = 15101, extra_rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The issue's compatibility config as YAML data, its HTTP rules aimed at ``port``."""
    return {
        "http_allowlist": ["127.0.0.1:*", "localhost:*"],
        "commands": {
            "record_instance": {
                "argv": ["/bin/echo", "restarting", "{{ labels.instance }}"],
                "timeout": "10s",
            }
        },
        "rules": [
            {
                "name": "probe-http",
                "match": ['alertname="ResponderProbe"', 'severity=~"page|critical"'],
                "remediation": "http_request",
                "params": {
                    "url": f"http://127.0.0.1:{port}/hook/{{{{ labels.instance }}}}",
                    "method": "POST",
                    "json": {"alert": "{{ labels.alertname }}", "instance": "{{ labels.instance }}"},
                    "expected_status": [200, 204],
                },
            },
            {
                "name": "probe-command",
                "match": ['alertname="ResponderCommand"'],
                "remediation": "run_command",
                "params": {"command": "record_instance"},
            },
            {
                "name": "probe-dry",
                "match": ['alertname="ResponderDry"'],
                "remediation": "http_request",
                "mode": "dry_run",
                "params": {"url": f"http://127.0.0.1:{port}/dry"},
            },
            *(extra_rules or []),
        ],
    }


def make_config(port: int = 15101, rules: list[dict[str, Any]] | None = None) -> ResponderConfig:
    """The compatibility config, validated, with ``rules`` appended."""
    return parse_config(compat_config(port, rules))


def alert_payload(alertname: str = "ResponderProbe", status: str = "firing", **labels: str) -> dict[str, Any]:
    """The real single_firing fixture with labels changed."""
    raw: dict[str, Any] = json.loads((FIXTURES / "single_firing.json").read_bytes())
    alert = raw["alerts"][0]
    alert["labels"].update({"alertname": alertname, "severity": "critical", **labels})
    # Like Alertmanager's: a hash of the label set, so other labels make another alert.
    alert["fingerprint"] = hashlib.sha256(json.dumps(alert["labels"], sort_keys=True).encode()).hexdigest()[
        :16
    ]
    alert["status"] = raw["status"] = status
    if status == "resolved":
        alert["endsAt"] = "2026-11-23T05:10:00Z"
    return raw


def alert_of(payload: dict[str, Any]) -> Alert:
    return Alert.model_validate(payload["alerts"][0])


class RecordingPublisher(Publisher):
    """Records what would be published; ``fail`` makes every publish raise like a down broker."""

    def __init__(self, settings: Settings, *, fail: bool = False) -> None:
        self.settings = settings
        self.fail = fail
        self.alerts: list[str] = []
        self.runs: list[tuple[str, float, float]] = []
        self.messages: list[Message] = []

    def publish(self, messages: Sequence[Message]) -> None:
        if self.fail:
            raise PublishError("broker down")
        self.messages.extend(messages)
        for message in messages:
            if message.task == HANDLE_ALERT:
                self.alerts.extend(message.args)
            else:
                self.runs.append(
                    (
                        message.args[0],
                        message.time_limit - self.settings.hard_limit_margin_s,
                        message.countdown,
                    )
                )
