"""Settings from the environment, redaction, and log context handling."""

from __future__ import annotations

import logging

import pytest
import structlog

from workers import telemetry
from workers.settings import Settings, get_settings


def test_tokens_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """RESPONDER_*_TOKENS are comma-separated lists, not JSON."""
    monkeypatch.setenv("RESPONDER_INGEST_TOKENS", " a1, b2 ,,c3")
    monkeypatch.setenv("RESPONDER_OPERATOR_TOKENS", "op")
    settings = get_settings()
    assert [t.get_secret_value() for t in settings.ingest_tokens] == ["a1", "b2", "c3"]
    assert "a1" not in repr(settings)


def test_defaults() -> None:
    """SQLite ledger by default, a 4 MiB body limit, three attempts."""
    settings = Settings()
    assert (
        settings.database_url.startswith("sqlite")
        and settings.max_body_bytes == 4 * 1024 * 1024
        and settings.max_attempts == 3
    )


def test_redact_by_key() -> None:
    """Values of secret-named keys are replaced at any depth; other values stay."""
    data = {
        "url": "u",
        "headers": {"Authorization": "Bearer x", "X-Api-Key": "k"},
        "items": [{"password": "p", "n": 1}],
    }
    assert telemetry.redact(data) == {
        "url": "u",
        "headers": {"Authorization": "[REDACTED]", "X-Api-Key": "[REDACTED]"},
        "items": [{"password": "[REDACTED]", "n": 1}],
    }


def test_log_lines_are_json_with_bound_keys_and_no_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    """Services log JSON lines carrying the bound keys and the logger's name, ours and the standard
    library's alike; secret-named fields (and the configured extra key words) are redacted;
    errors are error.type and error.message; lines under the level are dropped."""
    telemetry.configure_logging(fmt="json", level="INFO", service="responder-test", secret_keys=["session"])
    try:
        telemetry.clear()
        telemetry.bind(run_id="r1", rule="probe")
        telemetry.get_logger("t").info(
            "remediation_succeeded",
            token="abc",
            params={"password": "p", "Session-Id": "s1"},
            error_type="ValueError",
            error="bad value",
        )
        telemetry.get_logger("t").debug("below_the_level")
        logging.getLogger("celery.x").warning("stdlib line")
        logging.getLogger("celery.x").debug("stdlib below the level")
        telemetry.clear()
        telemetry.get_logger("t").info("after_clear")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
        telemetry.redact_keys([])
    import json

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first, stdlib, cleared = lines
    assert first["event"] == "remediation_succeeded" and first["run_id"] == "r1" and first["rule"] == "probe"
    assert first["token"] == "[REDACTED]"
    assert first["params"] == {"password": "[REDACTED]", "Session-Id": "[REDACTED]"}
    assert first["error.type"] == "ValueError" and first["error.message"] == "bad value"
    assert "error" not in first and "error_type" not in first and first["service"] == "responder-test"
    assert first["logger"] == "t" and first["level"] == "info" and first["timestamp"].endswith("Z")
    assert stdlib["event"] == "stdlib line" and stdlib["run_id"] == "r1"
    assert stdlib["logger"] == "celery.x" and stdlib["level"] == "warning"
    assert "run_id" not in cleared


def test_extra_secret_key_words_apply_to_names_already_seen() -> None:
    """Key names are remembered once judged (a log line's fields are few): adding key words
    forgets those verdicts, so a name logged in the clear before is redacted after."""
    try:
        assert telemetry.redact({"session_id": "s1"}) == {"session_id": "s1"}
        telemetry.redact_keys(["session"])
        assert telemetry.redact({"session_id": "s1"}) == {"session_id": "[REDACTED]"}
        assert telemetry.redact_values({"Session": "s2"}) == {"Session": "[REDACTED]"}
    finally:
        telemetry.redact_keys([])
    assert telemetry.redact({"session_id": "s1"}) == {"session_id": "s1"}
