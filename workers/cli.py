"""The ``responder`` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from workers import telemetry
from workers.settings import get_settings
from workers.tasknames import ALL_QUEUES

if TYPE_CHECKING:
    from workers.alerts import Alert
    from workers.config import ResponderConfig

# Each command imports what it alone needs: `responder serve` runs the receiver in this
# process, and the receiver needs neither the remediation catalogue nor the config's
# template engine and matchers (about 6 MiB of its memory at rest).


def _logging(role: str) -> None:
    """Per-process setup from settings: the logging pipeline for ``role`` (its lines'
    ``service``) and the ledger's lock timeout."""
    from workers.ledger.db import configure

    settings = get_settings()
    telemetry.configure_logging(
        fmt=settings.log_format,
        level=settings.log_level,
        service=f"responder-{role}",
        secret_keys=settings.redact_keys,
    )
    configure(lock_timeout_s=settings.db_lock_timeout_s, slow_statement_s=settings.slow_statement_ms / 1000)


def _load(path: Path) -> ResponderConfig:
    from workers.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"{exc.source}: {len(exc.problems)} problem(s)", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        raise SystemExit(1) from exc


@click.group()
def main() -> None:
    """alert-responder: auto-remediation for Prometheus Alertmanager alerts."""


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True)  # noqa: S104 - a server's default
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the receiver (HTTP API)."""
    import uvicorn

    settings = get_settings()
    _logging("receiver")
    missing = [n for n in ("ingest", "operator") if not getattr(settings, f"{n}_tokens")]
    if missing:
        names = " and ".join(f"RESPONDER_{n.upper()}_TOKENS" for n in missing)
        raise click.UsageError(f"{names} must be set (comma-separated bearer tokens)")
    uvicorn.run("receiver.app:serve_app", **server_options(host=host, port=port))


def server_options(*, host: str, port: int) -> dict[str, Any]:
    """The receiver's uvicorn configuration (the benchmark's bare endpoint runs on the same)."""
    return {"factory": True, "host": host, "port": port, "log_config": None, "timeout_graceful_shutdown": 10}


def _worker_app() -> Any:
    from workers import tasks  # noqa: F401 - registers tasks and logging signals
    from workers.celery_app import create_celery_app

    return create_celery_app(get_settings())


def _queues(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(ALL_QUEUES))
    if unknown or not queues:
        raise click.BadParameter(
            f"unknown queue(s) {', '.join(unknown) or '(none)'}; known: {', '.join(ALL_QUEUES)}"
        )
    return queues


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", type=int, default=None, help="Worker processes (default: CPUs).")
@click.option(
    "--queues",
    default=",".join(ALL_QUEUES),
    show_default=True,
    callback=_queues,
    help="Comma-separated queues to consume: a dedicated worker per queue keeps slow "
    "remediations from delaying the planning of new alerts.",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve Prometheus metrics of the worker and all its processes on this port (/metrics).",
)
@click.option("--metrics-host", default="0.0.0.0", show_default=True)  # noqa: S104 - a server's default
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    concurrency: int | None,
    queues: list[str],
    metrics_port: int | None,
    metrics_host: str,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker on the alerts, remediations and maintenance queues (or some of them)."""
    if metrics_port is not None:
        _multiprocess_metrics()  # before anything that counts is imported
    from remediations import ResponderError
    from workers import metrics
    from workers.runner import check_delivery_settings

    settings = get_settings()
    _logging("worker")
    config = _load(settings.config)
    try:
        check_delivery_settings(settings, config)
    except ResponderError as exc:
        raise click.UsageError(str(exc)) from exc
    name = "responder" if len(queues) == len(ALL_QUEUES) else "responder-" + "-".join(queues)
    argv = ["worker", "-Q", ",".join(queues), "--loglevel", settings.log_level, "-n", f"{name}@%h"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if metrics_port is not None:
        metrics.serve(metrics_host, metrics_port)
        telemetry.get_logger(__name__).info("metrics_serving", host=metrics_host, port=metrics_port)
    _worker_app().worker_main([*argv, *celery_args])


def _multiprocess_metrics() -> None:
    """Give this worker and its pool processes one multiprocess metrics directory: the one in
    ``PROMETHEUS_MULTIPROC_DIR`` (emptied), or a fresh one removed at exit."""
    import atexit
    import os
    import shutil
    import tempfile

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="responder-metrics-"))
    if not given:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    if "workers.metrics" in sys.modules:  # pragma: no cover - a programming error, not a user's
        raise RuntimeError("workers.metrics was imported before its multiprocess directory was set")
    for leftover in path.glob("*.db"):
        leftover.unlink()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


@main.command()
def beat() -> None:
    """Run Celery beat (one active across replicas, by a Redis lock)."""
    from workers.config import cached_config
    from workers.schedules import beat_schedule

    settings = get_settings()
    _logging("beat")
    app = _worker_app()
    app.conf.beat_schedule = beat_schedule(settings, cached_config(settings.config))
    app.start(["beat", "--loglevel", settings.log_level])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", default=".responder/dev", show_default=True, type=click.Path(path_type=Path))
@click.option("--concurrency", default=2, show_default=True, type=int)
def dev(host: str, port: int, data_dir: Path, concurrency: int) -> None:
    """Run everything locally: embedded Redis, SQLite ledger, receiver, worker and beat."""
    from workers.dev import run_dev

    settings = get_settings()
    _load(settings.config)
    sys.exit(run_dev(settings=settings, host=host, port=port, data_dir=data_dir, concurrency=concurrency))


@main.group()
def db() -> None:
    """Ledger database commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the ledger's migrations to RESPONDER_DATABASE_URL."""
    from workers.ledger.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    click.echo(f"ledger at {revision}")


@main.group()
def config() -> None:
    """Config file commands."""


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate a config file; problems are listed by rule and field."""
    loaded = _load(path)
    click.echo(
        f"{path}: OK ({len(loaded.rules)} rules, {len(loaded.commands)} commands, {len(loaded.schedules)} schedules)"
    )


def _alerts_of(path: Path) -> list[Alert]:
    import yaml
    from pydantic import ValidationError

    from workers.alerts import Alert, WebhookPayload

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
        if isinstance(raw, dict) and "alerts" in raw:
            return WebhookPayload.model_validate(raw).alerts
        items = raw if isinstance(raw, list) else [raw]
        return [
            Alert.model_validate(
                {"status": "firing", "fingerprint": "0", "startsAt": "1970-01-01T00:00:00Z", **i}
            )
            for i in items
        ]
    except (OSError, yaml.YAMLError, ValidationError, TypeError) as exc:
        raise click.BadParameter(f"{path}: not an Alertmanager payload or alert: {exc}") from exc


@config.command("test")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--alert",
    "alert_path",
    required=True,
    type=click.Path(path_type=Path),
    help="A webhook payload, an alert, or a list of alerts (JSON or YAML).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def config_test(path: Path, alert_path: Path, as_json: bool) -> None:
    """Show which rules match each alert and the params they would run with; runs nothing."""
    from workers.planner import plan_rule

    loaded = _load(path)
    report: list[dict[str, Any]] = []
    for alert in _alerts_of(alert_path):
        rules = loaded.matching_rules(alert.labels)
        if alert.status == "resolved":
            plans = [plan_rule(rule, alert, loaded, trigger="resolved") for rule in rules if rule.on_resolved]
        else:
            plans = [plan_rule(rule, alert, loaded) for rule in rules]
        report.append(
            {
                "fingerprint": alert.fingerprint,
                "status": alert.status,
                "labels": alert.labels,
                "matched_rules": [rule.name for rule in rules],
                "plans": [telemetry.redact(plan.report()) for plan in plans],
            }
        )
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for entry in report:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(entry["labels"].items()))
        click.echo(f"alert {{{labels}}} ({entry['status']})")
        if not entry["matched_rules"]:
            click.echo("  no rule matches")
        elif entry["status"] == "resolved":
            click.echo(
                f"  resolved: matches {', '.join(entry['matched_rules'])}; their pending runs would be "
                "cancelled" + ("; on_resolved:" if entry["plans"] else "")
            )
        for plan in entry["plans"]:
            guard = plan["skip_reason"] or (
                f"grace: {plan['grace_s']:g}s" if plan["status"] == "waiting" else ""
            )
            click.echo(
                f"  rule {plan['rule']} -> {plan['remediation']} [{plan['mode']}]: would be {plan['status']}"
                + (f" ({guard})" if guard else "")
            )
            if plan["guards"]:
                click.echo(f"    guards: {'; '.join(plan['guards'])}")
            if plan["error"]:
                click.echo(f"    error: {plan['error']}")
            else:
                click.echo(f"    params: {json.dumps(plan['params'], sort_keys=True)}")
                if plan["preflight"]:
                    click.echo(f"    checked: {json.dumps(plan['preflight'], sort_keys=True)}")


# The operator API's URL; its token comes from RESPONDER_API_TOKEN, never an argument (ps shows those).
_api_url = click.option(
    "--url",
    envvar="RESPONDER_API_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The receiver's base URL (RESPONDER_API_URL).",
)


def _api(method: str, url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call the operator API with RESPONDER_API_TOKEN; exit 1 with the API's message on error."""
    import os

    import httpx

    token = os.environ.get("RESPONDER_API_TOKEN", "")
    if not token:
        raise click.UsageError("RESPONDER_API_TOKEN must hold an operator token")
    try:
        response = httpx.request(
            method,
            url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"{url}: {exc}") from exc
    try:
        data: dict[str, Any] = response.json()
    except ValueError:
        data = {"message": response.text[:500]}
    if response.status_code >= 400:
        raise click.ClickException(
            f"{response.status_code} {data.get('error', '')}: {data.get('message', data)}"
        )
    return data


def _default_actor() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _show_pause(state: dict[str, Any]) -> None:
    if state["paused"]:
        click.echo(f"PAUSED since {state['since']} by {state['by']}: {state['reason']}")
    elif state["since"]:
        click.echo(f"running (resumed {state['since']} by {state['by']}: {state['reason']})")
    else:
        click.echo("running (never paused)")


@main.command("pause")
@_api_url
@click.option("--reason", help="Why (recorded with the pause).")
@click.option("--by", "actor", default=_default_actor, help="Who pauses  [default: user@host]")
@click.option("--show", is_flag=True, help="Only show whether the responder is paused.")
def pause_command(url: str, reason: str | None, actor: str, show: bool) -> None:
    """Pause the responder: alerts are recorded, every new run is skipped (reason paused)."""
    if show:
        _show_pause(_api("GET", url, "/api/v1/pause"))
        return
    if not reason:
        raise click.UsageError("--reason is required (it is recorded for the next person on call)")
    _show_pause(_api("POST", url, "/api/v1/pause", {"by": actor, "reason": reason}))


@main.command("resume")
@_api_url
@click.option("--reason", required=True, help="Why (recorded with the resume).")
@click.option("--by", "actor", default=_default_actor, help="Who resumes  [default: user@host]")
def resume_command(url: str, reason: str, actor: str) -> None:
    """Resume the responder; what was skipped while paused is not replayed."""
    _show_pause(_api("POST", url, "/api/v1/resume", {"by": actor, "reason": reason}))


@main.group("breakers", invoke_without_command=True)
@_api_url
@click.option(
    "--state", type=click.Choice(["open", "half_open", "closed"]), help="Only breakers in this state."
)
@click.pass_context
def breakers_command(ctx: click.Context, url: str, state: str | None) -> None:
    """List the circuit breakers (open and half-open first); `breakers reset KEY` closes one."""
    if ctx.invoked_subcommand is not None:
        return
    query = f"?state={state}" if state else ""
    found = _api("GET", url, f"/api/v1/breakers{query}")["breakers"]
    if not found:
        click.echo("no breakers" + (f" {state}" if state else ""))
    for b in found:
        after = f", probe after {b['probe_after']}" if b["probe_after"] else ""
        click.echo(
            f"{b['key']}  {b['state']:<9} {b['remediation']} -> {b['target'] or '-'}  "
            f"failures {b['failures']}{after}"
        )
        if b["last_error"]:
            click.echo(f"    last error: {b['last_error'][:200]}")


@breakers_command.command("reset")
@_api_url
@click.argument("key")
@click.option("--reason", required=True, help="Why (logged with the reset).")
@click.option("--by", "actor", default=_default_actor, help="Who resets  [default: user@host]")
def breakers_reset(url: str, key: str, reason: str, actor: str) -> None:
    """Close breaker KEY now, with no failures counted."""
    b = _api("POST", url, f"/api/v1/breakers/{key}/reset", {"by": actor, "reason": reason})
    click.echo(f"{b['key']}  {b['state']}  {b['remediation']} -> {b['target'] or '-'}")


if __name__ == "__main__":
    main()
