"""The Alertmanager payload model on every real payload, and canonical timestamps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.helpers import FIXTURES
from workers.alerts import Alert, WebhookPayload, canonical_time

PAYLOADS = sorted(p for p in FIXTURES.glob("*.json") if not p.name.startswith("headers_"))


def test_fixtures_were_copied() -> None:
    """The payload fixtures of ../shared are all here (the model test below is not vacuous)."""
    assert len(PAYLOADS) >= 10


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.name)
def test_model_reads_every_real_payload(path: Path) -> None:
    """Every payload recorded from the real Alertmanager validates, alert by alert."""
    raw = json.loads(path.read_bytes())
    payload = WebhookPayload.model_validate_json(path.read_bytes())
    assert payload.version == "4"
    assert len(payload.alerts) == len(raw["alerts"])
    for alert, raw_alert in zip(payload.alerts, raw["alerts"], strict=True):
        assert alert.status == raw_alert["status"]  # each alert's own status, not the group's
        assert alert.fingerprint == raw_alert["fingerprint"]
        assert alert.labels == raw_alert["labels"]
        assert alert.starts_at == canonical_time(raw_alert["startsAt"])
    assert payload.truncated_alerts == raw["truncatedAlerts"]


def test_mixed_group_keeps_each_alert_status() -> None:
    """In a partially resolved group the top-level status is firing, alerts keep their own."""
    payload = WebhookPayload.model_validate_json((FIXTURES / "group3_partial_resolved.json").read_bytes())
    assert payload.status == "firing"
    assert {a.status for a in payload.alerts} == {"firing", "resolved"}


def test_unknown_keys_are_ignored() -> None:
    """A newer Alertmanager's extra fields do not make the payload invalid."""
    raw = json.loads((FIXTURES / "single_firing.json").read_bytes())
    raw["newTopLevelField"] = {"x": 1}
    raw["alerts"][0]["newAlertField"] = "y"
    assert WebhookPayload.model_validate(raw).alerts[0].fingerprint == "439d472d491187f0"


def test_repeat_is_the_same_episode() -> None:
    """A repeat with changed annotations keeps the same episode and event key."""
    first = WebhookPayload.model_validate_json((FIXTURES / "single_firing.json").read_bytes()).alerts[0]
    repeat = WebhookPayload.model_validate_json(
        (FIXTURES / "single_repeat_annotation_changed.json").read_bytes()
    ).alerts[0]
    resolved = WebhookPayload.model_validate_json((FIXTURES / "single_resolved.json").read_bytes()).alerts[0]
    assert repeat.event_key == first.event_key
    assert resolved.episode == first.episode
    assert resolved.event_key != first.event_key


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("2026-11-23T05:02:19.803814981Z", "2026-11-23T05:02:19.803814981Z"),
        ("2026-11-23T05:02:19.803Z", "2026-11-23T05:02:19.803000000Z"),
        ("2026-11-23T05:02:19Z", "2026-11-23T05:02:19.000000000Z"),
        ("2026-11-23T06:02:19.5+01:00", "2026-11-23T05:02:19.500000000Z"),
        ("2026-11-23T05:02:19.803814981+00:00", "2026-11-23T05:02:19.803814981Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000000Z"),
    ],
)
def test_same_instant_has_one_canonical_form(given: str, canonical: str) -> None:
    """The same instant written with any precision or offset becomes the same string."""
    assert canonical_time(given) == canonical


@pytest.mark.parametrize(
    "bad", ["yesterday", "2026-11-23", "2026-11-23T05:02:19", "2026-11-23T05:02:19.1234567890Z"]
)
def test_bad_timestamps_are_refused(bad: str) -> None:
    """Anything but RFC 3339 with a zone is a validation error."""
    with pytest.raises(ValidationError):
        Alert.model_validate({"status": "firing", "labels": {}, "startsAt": bad, "fingerprint": "ab"})
