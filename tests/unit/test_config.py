"""The config file: the issue's compatibility config loads, and errors name rule and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.config import ConfigError, load_config, parse_config

COMPAT = """
http_allowlist: ["127.0.0.1:*", "localhost:*"]   # host or host:port patterns; nothing else is reachable
commands:
  record_instance:                                  # argv list; each element renders to one argument
    argv: ["/bin/echo", "restarting", "{{ labels.instance }}"]
    timeout: 10s
rules:
  - name: probe-http
    match: ['alertname="ResponderProbe"', 'severity=~"page|critical"']
    remediation: http_request
    params:
      url: "http://127.0.0.1:15101/hook/{{ labels.instance }}"
      method: POST
      json: {alert: "{{ labels.alertname }}", instance: "{{ labels.instance }}"}
      expected_status: [200, 204]
  - name: probe-command
    match: ['alertname="ResponderCommand"']
    remediation: run_command
    params: {command: record_instance}
  - name: probe-dry
    match: ['alertname="ResponderDry"']
    remediation: http_request
    mode: dry_run
    params: {url: "http://127.0.0.1:15101/dry"}
"""


def problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def base(**rule: Any) -> dict[str, Any]:
    return {
        "http_allowlist": ["127.0.0.1:*"],
        "commands": {"echo": {"argv": ["/bin/echo", "{{ labels.instance }}"]}},
        "rules": [
            {
                "name": "r1",
                "match": ['alertname="A"'],
                "remediation": "http_request",
                "params": {"url": "http://127.0.0.1:1/"},
                **rule,
            }
        ],
    }


def test_compatibility_config_loads_as_written(tmp_path: Path) -> None:
    """The issue's config loads unchanged: 3 rules, durations parsed, modes kept."""
    path = tmp_path / "responder.yaml"
    path.write_text(COMPAT)
    config = load_config(path)
    assert [r.name for r in config.rules] == ["probe-http", "probe-command", "probe-dry"]
    assert config.commands["record_instance"].timeout == 10.0
    assert config.rules[2].mode == "dry_run"
    assert config.matching_rules({"alertname": "ResponderProbe", "severity": "page"})[0].name == "probe-http"
    assert config.matching_rules({"alertname": "ResponderProbe", "severity": "info"}) == []


def test_example_config_is_valid() -> None:
    """examples/responder.yaml, which `make dev` runs with, passes the check."""
    assert len(load_config(Path("examples/responder.yaml")).rules) >= 3


def test_unknown_keys_are_errors_at_every_level() -> None:
    """Typos anywhere are refused, with the rule named."""
    assert any("rules[0] (r1).matchh" in p for p in problems(base(matchh=["x"])))
    raw = base()
    raw["extra"] = 1
    assert any(p.startswith("extra") for p in problems(raw))
    raw = base()
    raw["commands"]["echo"]["shell"] = True
    assert any("commands.echo.shell" in p for p in problems(raw))


def test_bad_matcher_names_rule_and_field() -> None:
    """A matcher Alertmanager would refuse is reported against its rule."""
    found = problems(base(match=['alertname="A', "severity=~crit.*"]))
    assert any("rules[0] (r1).match" in p and "unescaped double quote" in p for p in found)


def test_unknown_remediation_and_param() -> None:
    """An unknown remediation or param key is caught before any alert arrives."""
    assert any("unknown remediation 'restart_it'" in p for p in problems(base(remediation="restart_it")))
    assert any(
        "rules[0] (r1).params.metod" in p
        for p in problems(base(params={"url": "http://127.0.0.1:1/", "metod": "GET"}))
    )


def test_literal_params_are_fully_checked() -> None:
    """Params without templates are validated and preflighted: allowlist, unknown command."""
    assert any("not on http_allowlist" in p for p in problems(base(params={"url": "http://evil.example/"})))
    assert any(
        "unknown command 'nope'" in p
        for p in problems(base(remediation="run_command", params={"command": "nope"}))
    )
    assert any(
        "params.timeout" in p for p in problems(base(params={"url": "http://127.0.0.1:1/", "timeout": 0}))
    )


def test_template_syntax_errors_and_templated_program() -> None:
    """A broken template or a templated argv[0] is an error at load."""
    assert any("rules[0] (r1).params.url" in p for p in problems(base(params={"url": "http://{{ labels.x "})))
    raw = base()
    raw["commands"]["echo"]["argv"] = ["{{ labels.prog }}"]
    assert any("commands.echo.argv[0]" in p for p in problems(raw))


def test_duplicate_rule_names_and_bad_mode() -> None:
    """Rule names are unique; mode is enforce or dry_run."""
    raw = base()
    raw["rules"].append(dict(raw["rules"][0]))
    assert any("duplicate rule name" in p for p in problems(raw))
    assert any("mode" in p for p in problems(base(mode="yolo")))


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    """Files that cannot be read or parsed give one clear problem."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_bad_duration() -> None:
    """Durations are 10s, 1m30s, 500ms or seconds."""
    raw = base()
    raw["commands"]["echo"]["timeout"] = "ten seconds"
    assert any("commands.echo.timeout" in p for p in problems(raw))
    raw["commands"]["echo"]["timeout"] = "1m30s"
    assert parse_config(yaml.safe_load(yaml.safe_dump(raw))).commands["echo"].timeout == 90.0


def test_a_whole_param_secret_passes_the_config_check() -> None:
    """``{secret: NAME}`` for a whole param is checked as the reference it renders to."""
    from workers.config import parse_config

    config = parse_config(
        {
            "http_allowlist": ["127.0.0.1:*"],
            "rules": [
                {
                    "name": "r",
                    "match": ['a="b"'],
                    "remediation": "http_request",
                    "params": {
                        "url": "http://127.0.0.1:9/x",
                        "headers": {"Authorization": {"secret": "TOKEN"}},
                    },
                }
            ],
        }
    )
    assert config.rules[0].params["headers"]["Authorization"] == {"secret": "TOKEN"}
