"""``handle_alert``: match rules, render and validate params, record one run per matching rule.

Rendering happens here, in the worker, never in the receiver. Every outcome is a row: a
``queued`` run, a ``failed`` run (render, validation or preflight error, no attempt), or a
``skipped`` run (``dry_run``). A resolved event creates no run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from remediations import ResponderError, get_remediation
from workers import telemetry
from workers.alerts import Alert
from workers.config import ResponderConfig, Rule
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent, utcnow
from workers.publishing import Publisher, publish_runs
from workers.settings import Settings
from workers.templating import RenderError, render_value, renderer, template_context

log = telemetry.get_logger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one rule would do for one alert: status, params as they would run, or why not."""

    rule: str
    remediation: str
    mode: str
    status: Literal["queued", "failed", "skipped"]
    params: dict[str, Any] = field(default_factory=dict)
    preflight: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 0.0
    skip_reason: str | None = None
    error: str | None = None


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "params"
        parts.append(f"params.{loc}: {error['msg']}" if error["loc"] else f"params: {error['msg']}")
    return "; ".join(parts)


def plan_rule(rule: Rule, alert: Alert, config: ResponderConfig) -> Plan:
    """Render, validate and preflight one rule's params for one alert (no side effects)."""
    base: dict[str, Any] = {"rule": rule.name, "remediation": rule.remediation, "mode": rule.mode}
    context = template_context(alert)
    definition = get_remediation(rule.remediation)
    try:
        rendered = render_value(rule.params, context)
        params = definition.validate(rendered)
        preflight = definition.preflight(config.context(render=renderer(context)), params)
    except RenderError as exc:
        return Plan(**base, status="failed", error=f"render: {exc}")
    except ValidationError as exc:
        return Plan(**base, status="failed", error=f"invalid params: {_validation_message(exc)}")
    except ResponderError as exc:
        return Plan(**base, status="failed", error=f"refused: {exc}")
    stored = params.model_dump(mode="json", by_alias=True)
    if rule.mode == "dry_run":
        return Plan(
            **base,
            status="skipped",
            skip_reason="dry_run",
            params=stored,
            preflight=preflight.details,
            timeout_s=preflight.timeout,
        )
    return Plan(
        **base, status="queued", params=stored, preflight=preflight.details, timeout_s=preflight.timeout
    )


def event_alert(event: AlertEvent) -> Alert:
    """Rebuild the alert an event was recorded from."""
    return Alert.model_validate(
        {
            "status": event.status,
            "labels": event.labels,
            "annotations": event.annotations,
            "startsAt": event.starts_at,
            "endsAt": event.ends_at,
            "generatorURL": event.generator_url,
            "fingerprint": event.fingerprint,
        }
    )


def handle_event(
    *, event_id: str, settings: Settings, config: ResponderConfig, publisher: Publisher
) -> list[str]:
    """Plan the rules matching one event and publish its queued runs; returns the new run ids."""
    created: list[tuple[str, float]] = []
    with transaction(settings.database_url) as session:
        event = session.get(AlertEvent, event_id)
        if event is None:
            log.warning("event_not_found", event_id=event_id)
            return []
        telemetry.bind(fingerprint=event.fingerprint)
        alert = event_alert(event)
        rules = config.matching_rules(alert.labels)
        if alert.status == "resolved":
            # A resolved event never runs a firing rule's remediation.
            event.handled_at = event.handled_at or utcnow()
            event.matched_rules = len(rules)
            log.info("resolved_event_handled", matched_rules=len(rules))
            return []
        for rule in rules:
            plan = plan_rule(rule, alert, config)
            now = utcnow()
            run_id = repository.insert_run(
                session,
                {
                    "event_id": event.id,
                    "fingerprint": event.fingerprint,
                    "starts_at": event.starts_at,
                    "rule": plan.rule,
                    "remediation": plan.remediation,
                    "params": plan.params,
                    "preflight": plan.preflight,
                    "timeout_s": plan.timeout_s,
                    "mode": plan.mode,
                    "trigger": "alert",
                    "status": plan.status,
                    "skip_reason": plan.skip_reason,
                    "error": plan.error,
                    "finished_at": None if plan.status == "queued" else now,
                },
            )
            if run_id is None:
                log.info("run_already_planned", rule=rule.name)
                continue
            log.info(
                "run_planned",
                run_id=run_id,
                rule=plan.rule,
                remediation=plan.remediation,
                status=plan.status,
                skip_reason=plan.skip_reason,
                error=plan.error,
            )
            if plan.status == "queued":
                created.append((run_id, plan.timeout_s))
        event.handled_at = event.handled_at or utcnow()
        event.matched_rules = len(rules)
        if not rules:
            log.info("no_rule_matched")
    publish_runs(created, settings=settings, publisher=publisher)
    return [run_id for run_id, _ in created]
