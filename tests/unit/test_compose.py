"""docker-compose.yml is a valid compose file (validated by docker-compose, no daemon needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require


def test_compose_file_is_valid() -> None:
    """`docker-compose config -q` accepts the file with the required tokens set."""
    require(shutil.which("docker-compose") is not None, "docker-compose")
    env = {**os.environ, "RESPONDER_INGEST_TOKENS": "t1", "RESPONDER_OPERATOR_TOKENS": "t2"}
    result = subprocess.run(
        ["docker-compose", "config", "-q"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_compose_has_every_service_and_safe_redis() -> None:
    """The stack has every part, Redis keeps its queue (AOF, noeviction), tokens are required."""
    text = Path("docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert set(compose["services"]) == {
        "redis",
        "postgres",
        "migrate",
        "receiver",
        "worker-alerts",
        "worker-remediations",
        "beat",
        "alertmanager",
        "prometheus",
        "otel-collector",
        "jaeger",
        "grafana",
    }
    redis_cmd = compose["services"]["redis"]["command"]
    assert "--appendonly" in redis_cmd and "noeviction" in redis_cmd
    assert "RESPONDER_INGEST_TOKENS:?" in text
    queues = [compose["services"][w]["command"] for w in ("worker-alerts", "worker-remediations")]
    assert queues == [
        ["worker", "--queues", "alerts,maintenance", "--metrics-port", "9100"],
        ["worker", "--queues", "remediations", "--metrics-port", "9100"],
    ]
    scraped = yaml.safe_load(Path("deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scraped for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"receiver:8000", "worker-alerts:9100", "worker-remediations:9100"}


def test_alertmanager_config_is_valid() -> None:
    """The shipped Alertmanager config passes amtool's check."""
    require(shutil.which("amtool") is not None, "amtool")
    result = subprocess.run(
        ["amtool", "check-config", "deploy/alertmanager/alertmanager.yml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_a_valid_config_with_a_verified_ledger_backup() -> None:
    """The config compose points at is in the image and valid, its backup's secret is set, and
    the backups have a volume and a scratch database to be test-restored into."""
    from workers.config import load_config

    compose = yaml.safe_load(Path("docker-compose.yml").read_text())
    env = compose["x-responder"]["environment"]
    path = Path(env["RESPONDER_CONFIG"].removeprefix("/app/"))
    assert f"COPY {path.parent} ./{path.parent}" in Path("Dockerfile").read_text()
    [backup] = load_config(path).schedules
    assert backup.remediation == "postgres_backup" and "LEDGER_PASSWORD" in backup.params["database_url"]
    assert "RESPONDER_SECRET_LEDGER_PASSWORD" in env
    assert "backups:/var/backups/responder" in compose["services"]["worker-remediations"]["volumes"]
    scratch = backup.params["test_restore_url"].rsplit("/", 1)[1]
    assert f"CREATE DATABASE {scratch};" in Path("deploy/postgres/initdb/restore-check.sql").read_text()
