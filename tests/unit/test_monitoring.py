"""The shipped monitoring of the responder itself: rules valid, each alert unit-tested (firing),
each with a runbook that exists; the dashboard's queries valid and about real metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import workers.metrics  # noqa: F401 - registers every responder_* metric

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"


def _alerts() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_are_valid_and_their_unit_tests_pass(promtool: str) -> None:
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_has_a_runbook() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    for alert in _alerts():
        name = str(alert["alert"])
        assert name in fired, f"{name} has no test in which it fires"
        annotations = alert["annotations"]
        assert isinstance(annotations, dict)
        runbook = ROOT / annotations["runbook_url"]
        assert runbook.parent == ROOT / "docs" / "runbooks" and runbook.exists(), (
            f"{name}: no runbook {runbook}"
        )


def test_dashboard_queries_parse_and_use_only_metrics_that_exist(promtool: str, tmp_path: Path) -> None:
    """Every panel's query is valid PromQL (promtool checks each as a rule) and names only
    metrics the responder exports or the rules record."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 15
    probe = tmp_path / "dashboard_rules.yml"
    rules = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
    probe.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(probe)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    exported = {
        name
        for metric in REGISTRY.collect()
        for name in (metric.name, metric.name + "_total", metric.name + "_bucket")
    }
    recorded = {
        rule["record"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    for expr in exprs:
        for name in re.findall(r"\b(responder[:_][a-z0-9_:]+)", expr):
            assert name in exported | recorded, f"{name} in {expr!r} is neither exported nor recorded"
