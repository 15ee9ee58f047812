"""The responder command: config check/test, refusals at start-up, migrations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import inspect

from tests.helpers import FIXTURES, alert_payload
from workers.cli import main
from workers.ledger.db import get_engine


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_config_check_ok(runner: CliRunner) -> None:
    """A valid config is reported OK with its counts."""
    result = runner.invoke(main, ["config", "check", "examples/responder.yaml"])
    assert result.exit_code == 0 and "OK (3 rules, 1 commands, 1 schedules)" in result.output


def test_config_check_lists_problems(runner: CliRunner, tmp_path: Path) -> None:
    """An invalid config exits 1 and names each rule and field."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"rules": [{"name": "r", "match": ['a="b'], "remediation": "nope"}], "typo": 1})
    )
    result = runner.invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 1
    assert "rules[0] (r).match" in result.output and "typo" in result.output


def test_config_test_shows_matches_and_rendered_params(runner: CliRunner, tmp_path: Path) -> None:
    """config test prints matching rules with rendered params and runs nothing."""
    payload = tmp_path / "alert.json"
    raw = alert_payload("ResponderProbe", instance="web-7")
    raw["alerts"].append(alert_payload("ResponderDry")["alerts"][0])
    raw["alerts"].append(alert_payload("Unmatched")["alerts"][0])
    payload.write_text(json.dumps(raw))
    result = runner.invoke(main, ["config", "test", "examples/responder.yaml", "--alert", str(payload)])
    assert result.exit_code == 0, result.output
    assert "rule probe-http -> http_request [enforce]: would be queued" in result.output
    assert "http://127.0.0.1:15101/hook/web-7" in result.output
    assert "would be skipped (dry_run)" in result.output
    assert "no rule matches" in result.output
    as_json = runner.invoke(
        main, ["config", "test", "examples/responder.yaml", "--alert", str(payload), "--json"]
    )
    report = json.loads(as_json.output)
    assert report[0]["matched_rules"] == ["probe-http"] and report[2]["matched_rules"] == []


def test_config_test_accepts_a_bare_alert_and_resolved(runner: CliRunner, tmp_path: Path) -> None:
    """A single alert object works too; a resolved alert would run nothing."""
    single = tmp_path / "one.yaml"
    single.write_text(yaml.safe_dump({"labels": {"alertname": "ResponderCommand", "instance": "h1"}}))
    result = runner.invoke(main, ["config", "test", "examples/responder.yaml", "--alert", str(single)])
    assert '"argv": ["/bin/echo", "restarting", "h1"]' in result.output
    resolved = runner.invoke(
        main, ["config", "test", "examples/responder.yaml", "--alert", str(FIXTURES / "single_resolved.json")]
    )
    assert resolved.exit_code == 0
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert (
        runner.invoke(main, ["config", "test", "examples/responder.yaml", "--alert", str(bad)]).exit_code == 2
    )


def test_config_test_shows_the_guards_without_touching_state(runner: CliRunner, tmp_path: Path) -> None:
    """A rule's guards are listed in order; a grace period shows as waiting; a resolved alert
    shows its rule's on_resolved action."""
    config = tmp_path / "guarded.yaml"
    hook = "http://127.0.0.1:9/{{ labels.instance }}"
    config.write_text(
        yaml.safe_dump(
            {
                "http_allowlist": ["127.0.0.1:*"],
                "limits": {"max_runs": {"count": 50, "per": "1h"}},
                "rules": [
                    {
                        "name": "g",
                        "match": ['alertname="G"', 'instance!=""'],
                        "for": "2m",
                        "cooldown": "15m",
                        "group_by": ["instance"],
                        "max_runs": {"count": 3, "per": "1h"},
                        "remediation": "http_request",
                        "params": {"url": hook},
                        "on_resolved": {"remediation": "http_request", "params": {"url": hook + "/ok"}},
                    }
                ],
            }
        )
    )
    firing, resolved = tmp_path / "firing.json", tmp_path / "resolved.json"
    firing.write_text(json.dumps(alert_payload("G", instance="h1")))
    resolved.write_text(json.dumps(alert_payload("G", status="resolved", instance="h1")))
    shown = runner.invoke(main, ["config", "test", str(config), "--alert", str(firing)])
    assert shown.exit_code == 0, shown.output
    assert "rule g -> http_request [enforce]: would be waiting (grace: 120s)" in shown.output
    assert (
        "    guards: for 120s; cooldown 900s by instance; max_runs 3 per 3600s; limits.max_runs 50 per 3600s; "
        "breaker 3 failures, cool_down 600s; concurrency 1 per target\n" in shown.output
    )
    after = runner.invoke(main, ["config", "test", str(config), "--alert", str(resolved)])
    assert "pending runs would be cancelled; on_resolved:" in after.output
    assert "rule g -> http_request [enforce]: would be queued" in after.output and "/h1/ok" in after.output


def test_serve_refuses_without_tokens(runner: CliRunner) -> None:
    """serve will not start an unauthenticated receiver."""
    result = runner.invoke(main, ["serve"])
    assert result.exit_code == 2
    assert "RESPONDER_INGEST_TOKENS and RESPONDER_OPERATOR_TOKENS must be set" in result.output


def test_worker_refuses_short_visibility_timeout(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A visibility timeout under twice the longest hard limit stops the worker at start."""
    monkeypatch.setenv("RESPONDER_VISIBILITY_TIMEOUT_S", "600")
    monkeypatch.setenv("RESPONDER_CONFIG", "examples/responder.yaml")
    result = runner.invoke(main, ["worker"])
    assert (
        result.exit_code == 2 and "RESPONDER_VISIBILITY_TIMEOUT_S=600 must be at least twice" in result.output
    )


def test_worker_refuses_invalid_config(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker with a broken config exits with the config's problems."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: 3\n")
    monkeypatch.setenv("RESPONDER_CONFIG", str(bad))
    result = runner.invoke(main, ["worker"])
    assert result.exit_code == 1 and "rules" in result.output


def test_db_upgrade(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """db upgrade creates the ledger's tables at RESPONDER_DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    monkeypatch.setenv("RESPONDER_DATABASE_URL", url)
    result = runner.invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert {"alert_events", "runs", "attempts"} <= set(inspect(get_engine(url)).get_table_names())


def test_worker_queues_option(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """--queues picks the queues a worker consumes (default all); an unknown name is refused."""
    import workers.cli as cli

    started: list[list[str]] = []

    class App:
        def worker_main(self, argv: list[str]) -> None:
            started.append(argv)

    monkeypatch.setattr(cli, "_worker_app", App)
    monkeypatch.setenv("RESPONDER_CONFIG", "examples/responder.yaml")
    assert runner.invoke(main, ["worker"]).exit_code == 0
    assert runner.invoke(main, ["worker", "--queues", "alerts, maintenance"]).exit_code == 0
    queues = [argv[argv.index("-Q") + 1] for argv in started]
    assert queues == ["alerts,remediations,maintenance", "alerts,maintenance"]
    assert "responder-alerts-maintenance@%h" in started[1]
    bad = runner.invoke(main, ["worker", "--queues", "alerts,bogus"])
    assert bad.exit_code == 2 and "bogus" in bad.output
