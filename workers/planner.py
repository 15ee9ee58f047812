"""``handle_alert``: match rules, plan each one in isolation, admit one run per matching rule.

One message carries the events of one webhook (up to ``publishing.EVENTS_PER_MESSAGE``).

Rendering happens here, in the worker, never in the receiver. Each rule is planned on its own:
whatever one rule's templates or params do (a TypeError from a filter, a runaway render, the
soft time limit), that rule becomes a ``failed`` run with the error and the other rules go on.
Every plan is admitted through ``workers.admission`` (the guards, one recorded decision each).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from opentelemetry import trace
from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session

from remediations import RemediationDef, RemediationParams, ResponderError, get_remediation
from workers import metrics, telemetry, tracing
from workers.admission import Mode, RunRequest, Trigger, admit, decide
from workers.alerts import Alert, instant
from workers.config import ResponderConfig, Rule
from workers.guardstate import GuardState, group_key, needs_slot
from workers.ledger import repository
from workers.ledger.db import is_transient_ledger_error, reading, transaction
from workers.ledger.models import AlertEvent
from workers.ledger.states import RunStatus
from workers.publishing import Publisher, publish_runs
from workers.settings import Settings
from workers.templating import RenderError, render_string, render_value, renderer, template_context

log = telemetry.get_logger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one rule would do for one alert: params as they would run, or why not.

    Its ``status`` is the admission guards' verdict (``workers.admission.decide``) for a firing
    alert whose episode has not resolved, with the responder not paused: what ``config test``
    shows and ``admit`` records. ``trigger`` is ``resolved`` for a rule's ``on_resolved`` action.
    """

    rule: str
    remediation: str
    mode: Mode
    trigger: Trigger = "alert"
    enabled: bool = True
    grace_s: float = 0.0
    # The cooldown group when the run takes a cooldown or budget slot (None: no such guard).
    guard_key: str | None = None
    # The rule's guards that would apply, as text (``config test``); Redis is not consulted.
    guards: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    preflight: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 0.0
    error: str | None = None
    target: str | None = None
    destructive: bool = True

    @property
    def verdict(self) -> tuple[RunStatus, str | None]:
        """(status, reason) the guards give this plan."""
        return decide(
            trigger=self.trigger,
            mode=self.mode,
            error=self.error,
            enabled=self.enabled,
            grace_s=0.0 if self.trigger == "resolved" else self.grace_s,
        )

    @property
    def status(self) -> RunStatus:
        """``queued``, ``waiting`` (grace), ``failed`` (invalid) or ``skipped``."""
        return self.verdict[0]

    @property
    def skip_reason(self) -> str | None:
        """Why it would be skipped, if it would."""
        status, reason = self.verdict
        return reason if status == RunStatus.SKIPPED else None

    def report(self) -> dict[str, Any]:
        """The plan as data, with its verdict (``responder config test``)."""
        return {**asdict(self), "status": self.status.value, "skip_reason": self.skip_reason}


def validation_message(exc: ValidationError) -> str:
    """A params validation error as one line: ``params.FIELD: message; ...``."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "params"
        parts.append(f"params.{loc}: {error['msg']}" if error["loc"] else f"params: {error['msg']}")
    return "; ".join(parts)


def target_of(source: str | None, params: RemediationParams, context: dict[str, Any]) -> str | None:
    """Render a target declaration: a param's name, or a template over ``params`` and the alert."""
    if source is None:
        return None
    fields = type(params).model_fields
    if source in fields:
        value = getattr(params, source)
        return None if value is None else str(value)
    dumped = params.model_dump(mode="json", by_alias=True)
    return render_string(source, {**context, "params": dumped})


def _plan(
    rule: Rule,
    definition: RemediationDef,
    alert: Alert,
    config: ResponderConfig,
    base: dict[str, Any],
    extra: dict[str, Any],
) -> Plan:
    context = {**template_context(alert), **extra}
    rendered = render_value(rule.params, context)
    params = definition.validate(rendered)
    preflight = definition.preflight(config.context(render=renderer(context)), params)
    target = target_of(rule.target or definition.target, params, context)
    return Plan(
        **base,
        params=params.model_dump(mode="json", by_alias=True),
        preflight=preflight.details,
        timeout_s=preflight.timeout,
        target=target,
    )


def guards_of(rule: Rule, config: ResponderConfig) -> list[str]:
    """The guards a rule configures, in their order, as ``config test`` shows them."""
    shown = [] if rule.enabled else ["disabled"]
    if rule.grace_s:
        shown.append(f"for {rule.grace_s:g}s")
    if rule.mode == "dry_run":
        shown.append("dry_run")
    if rule.cooldown_s:
        by = f" by {', '.join(rule.group_by)}" if rule.group_by else ""
        shown.append(f"cooldown {rule.cooldown_s:g}s{by}")
    if rule.max_runs:
        shown.append(f"max_runs {rule.max_runs.count} per {rule.max_runs.per:g}s")
    if config.limits.max_runs:
        shown.append(f"limits.max_runs {config.limits.max_runs.count} per {config.limits.max_runs.per:g}s")
    breaker = config.breaker_of(rule.name, rule.remediation)
    shown.append(f"breaker {breaker.failures} failures, cool_down {breaker.cool_down_s:g}s")
    wait = f", lock_wait {rule.lock_wait_s:g}s" if rule.lock_wait_s else ""
    shown.append(f"concurrency {rule.concurrency} per target{wait}")
    if rule.repeat:
        shown.append(f"repeat after {rule.repeat.after_s:g}s, max {rule.repeat.max}")
    if rule.verify_within_s:
        shown.append(f"verify_within {rule.verify_within_s:g}s")
    return shown


def plan_rule(
    rule: Rule,
    alert: Alert,
    config: ResponderConfig,
    *,
    trigger: Trigger = "alert",
    extra: dict[str, Any] | None = None,
) -> Plan:
    """Render, validate and preflight one rule's params for one alert (no side effects).

    ``trigger="resolved"`` plans the rule's ``on_resolved`` action instead of its remediation,
    ``trigger="escalation"`` the config's ``escalation`` (templates also see ``extra``).
    Never raises: any failure, expected or not, is this rule's ``failed`` plan with the error.
    """
    action = {"resolved": rule.on_resolved, "escalation": config.escalation}.get(trigger)
    if action is not None:
        rule = rule.model_copy(
            update={
                "remediation": action.remediation,
                "params": action.params,
                "target": action.target,
                "mode": "enforce",
                "enabled": True,
                "grace_s": None,
            }
        )
    definition = get_remediation(rule.remediation)
    base: dict[str, Any] = {
        "rule": rule.name,
        "remediation": rule.remediation,
        "mode": rule.mode,
        "trigger": trigger,
        "enabled": rule.enabled,
        "grace_s": rule.grace_s or 0.0,
        "guard_key": group_key(rule, alert.labels)
        if trigger == "alert" and needs_slot(rule, config)
        else None,
        "guards": guards_of(rule, config) if trigger == "alert" else [],
        "destructive": definition.destructive,
    }
    try:
        return _plan(rule, definition, alert, config, base, extra or {})
    except RenderError as exc:
        error = f"render: {exc}"
    except ValidationError as exc:
        error = f"invalid params: {validation_message(exc)}"
    except ResponderError as exc:
        error = f"refused: {exc}"
    except SoftTimeLimitExceeded:
        error = "planning exceeded the soft time limit"
    except Exception as exc:  # RecursionError, MemoryError, TypeError...: one rule, not the alert
        log.warning("rule_planning_crashed", rule=rule.name, error_type=type(exc).__name__, exc_info=True)
        error = f"unexpected {type(exc).__name__}: {str(exc)[:500]}"
    return Plan(**base, error=error)


def request_for(
    plan: Plan, event: AlertEvent, *, repeat: int = 0, trace_context: dict[str, str] | None = None
) -> RunRequest:
    """The admission request of one rule's plan for one alert event (``repeat``: the how-manieth
    extra run of the episode, ``workers.verification``); its attempts continue ``trace_context``
    (by default the event's trace)."""
    return RunRequest(
        trigger=plan.trigger,
        remediation=plan.remediation,
        params=plan.params,
        rule=plan.rule,
        mode=plan.mode,
        enabled=plan.enabled,
        grace_s=plan.grace_s if plan.trigger == "alert" else 0.0,
        guard_key=plan.guard_key,
        repeat=repeat,
        target=plan.target,
        destructive=plan.destructive,
        timeout_s=plan.timeout_s,
        preflight=plan.preflight,
        error=plan.error,
        event_id=event.id,
        fingerprint=event.fingerprint,
        starts_at=event.starts_at,
        trace_context=trace_context or event.trace_context,
    )


def event_alert(event: AlertEvent | Row[Any]) -> Alert:
    """Rebuild the alert an event was recorded from (an ORM event or a row of its columns)."""
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


class EventsFailed(ResponderError):
    """Some events of a message could not be planned; the others were (each error is on its event)."""


def handle_events(
    *,
    event_ids: Sequence[str],
    settings: Settings,
    config: ResponderConfig,
    publisher: Publisher,
    guards: GuardState | None = None,
    first_delivery: bool = False,
    keep: Callable[[str, float], bool] | None = None,
) -> list[str]:
    """Plan the rules matching each event and publish the queued runs; returns the new run ids.

    ``keep(run_id, timeout_s)``: when every event was planned and runs were queued, the caller
    may take the last of them to run it now (``workers.inline``), once the others are sent. A
    run taken is recorded as published like the others but not sent: if the caller never claims
    it, the reconciler sends it after the redelivery delay, as for a lost message.

    Three steps, so that the ledger's write lock (SQLite has one) is held only for statements,
    never while templates render:

    1. This start is counted on every event of the message (``_start``): committed on its own
       before anything else, so an event whose handling keeps crashing the task (even by
       killing the process) is given up after the maximum, with its error, instead of being
       redelivered forever. Only the first delivery of the receiver's message
       (``first_delivery``) reads its events without writing, and its start is counted with
       its outcome in step 3.
    2. Outside any transaction, each event's matching rules are planned (each in isolation).
    3. One short transaction admits every plan and marks the events handled; queued runs are
       recorded as published and published right after it (a failed publish is undone and left
       to the reconciler). If the ledger refuses it for a reason other than a transient error,
       each event is admitted in a transaction of its own, so one bad event keeps its error
       (and is delivered again) without holding back the others (``EventsFailed``).
    """
    events, counted, given_up = _start(event_ids, settings, first_delivery=first_delivery)
    metrics.GIVEN_UP.labels(kind="events").inc(given_up)
    failed: dict[str, Exception] = {}
    planned: list[_EventPlan] = []
    # One span per event, in the event's own trace (its webhook's), open until its runs are decided.
    spans = {
        event.id: tracing.start_span(
            "plan_alert",
            event.trace_context,
            **{"alert.fingerprint": event.fingerprint, "alert.status": event.status, "event.id": event.id},
        )
        for event in events
    }
    created: list[tuple[str, float]] = []
    traces: dict[str, dict[str, str] | None] = {}
    try:
        for event in events:
            try:
                planned.append(_plan_event(event, config, spans[event.id]))
            except Exception as exc:  # a stored event that no longer parses: this event, not the message
                log.exception("event_planning_failed", event_id=event.id)
                spans[event.id].record_exception(exc)
                failed[event.id] = exc
        try:
            with transaction(settings.database_url) as session:
                created = _admit(session, planned, config, guards, spans, traces, count_start=not counted)
        except Exception as exc:
            if is_transient_ledger_error(exc) or len(planned) < 2:
                raise  # transient: the whole message is retried; nothing of it was committed
            for one in planned:
                try:
                    with transaction(settings.database_url) as session:
                        created.extend(
                            _admit(session, [one], config, guards, spans, traces, count_start=not counted)
                        )
                except Exception as single:
                    if is_transient_ledger_error(single):
                        raise
                    log.exception("event_admission_failed", event_id=one.event.id)
                    spans[one.event.id].record_exception(single)
                    failed[one.event.id] = single
    finally:
        for span in spans.values():
            span.end()
    if failed:
        with transaction(settings.database_url) as session:
            for event_id, problem in failed.items():
                repository.note_event_error(
                    session,
                    event_id,
                    error=f"{type(problem).__name__}: {problem}"[:2000],
                    count_start=not counted,
                )
    to_send = created
    if keep is not None and created and not failed and keep(*created[-1]):
        to_send = created[:-1]
    publish_runs(to_send, settings=settings, publisher=publisher, marked=True, traces=traces)
    if failed:
        raise EventsFailed(f"{len(failed)} of {len(event_ids)} events not planned: {', '.join(failed)}")
    return [run_id for run_id, _ in created]


def _start(
    event_ids: Sequence[str], settings: Settings, *, first_delivery: bool
) -> tuple[list[AlertEvent], bool, int]:
    """The events of this delivery still to handle, whether this start is counted on them
    already, and how many events were given up instead.

    A start is counted in a transaction of its own before the events are planned, except on
    the first delivery of the message the receiver sent (not redelivered by the broker, not a
    retry, its events published once and never started): a crash there leaves nothing counted
    and its message comes back redelivered, which counts. So an event is given up after at
    most ``RESPONDER_MAX_DELIVERIES`` counted starts and the first, and the usual alert costs
    one write transaction less.
    """
    if first_delivery:
        with reading(settings.database_url) as session:
            events = repository.events_by_ids(session, event_ids)
        if all(e.handled_at is not None or (e.deliveries == 0 and e.publishes <= 1) for e in events):
            found = {e.id for e in events}
            handled = {e.id: e.deliveries for e in events if e.handled_at is not None}
            _log_skipped([event_id for event_id in event_ids if event_id not in found], handled)
            return [e for e in events if e.id not in handled], False, 0
    with transaction(settings.database_url) as session:
        deliveries = repository.note_event_deliveries(session, event_ids)
        _log_skipped(
            [event_id for event_id, d in deliveries.items() if d.missing],
            {event_id: d.deliveries for event_id, d in deliveries.items() if d.handled},
        )
        todo: list[str] = []
        given_up = 0
        for event_id, delivery in deliveries.items():
            if delivery.missing or delivery.handled:
                continue
            if delivery.deliveries > settings.max_deliveries:
                starts = delivery.deliveries - 1
                error = f"gave up after {starts} deliveries that did not finish"
                repository.give_up_event(session, event_id, error=error)
                log.error("event_given_up", event_id=event_id, deliveries=starts)
                given_up += 1
            else:
                todo.append(event_id)
        events = repository.events_by_ids(session, todo)
        session.expunge_all()
    return events, True, given_up


def _log_skipped(missing: Sequence[str], handled: dict[str, int]) -> None:
    """Log the events of a delivery that are not planned: missing, or handled already (with
    their deliveries)."""
    for event_id in missing:
        log.warning("event_not_found", event_id=event_id)
    for event_id, deliveries in handled.items():
        log.info("event_already_handled", event_id=event_id, deliveries=deliveries)


@dataclass(frozen=True)
class _EventPlan:
    """One event and the plans of its matching rules (for a resolved event, their
    ``on_resolved`` actions), and the context of the span that planned them."""

    event: AlertEvent
    matched: int
    plans: list[Plan]
    trace_context: dict[str, str] | None = None


def _plan_event(event: AlertEvent, config: ResponderConfig, span: trace.Span) -> _EventPlan:
    """Match and plan one event's rules (no ledger access); what matched is an event of ``span``."""
    alert = event_alert(event)
    rules = config.matching_rules(alert.labels)
    span.add_event("rules_matched", {"rules": [rule.name for rule in rules], "count": len(rules)})
    if alert.status == "resolved":
        # A resolved event never runs a firing rule's remediation: its episode's pending runs
        # are cancelled when it is admitted (``_admit``), and the rules' on_resolved run.
        log.info("resolved_event_handled", event_id=event.id, matched_rules=len(rules))
        actions = [plan_rule(rule, alert, config, trigger="resolved") for rule in rules if rule.on_resolved]
        return _EventPlan(event, len(rules), actions, tracing.carrier_of(span, _correlation(event)))
    if not rules:
        log.info("no_rule_matched", event_id=event.id, fingerprint=event.fingerprint)
    plans = [plan_rule(rule, alert, config) for rule in rules]
    return _EventPlan(event, len(rules), plans, tracing.carrier_of(span, _correlation(event)))


def _correlation(event: AlertEvent) -> str | None:
    """The correlation id of the webhook that brought ``event``."""
    return (event.trace_context or {}).get(tracing.REQUEST_ID)


def _admit(
    session: Session,
    planned: Sequence[_EventPlan],
    config: ResponderConfig,
    guards: GuardState | None,
    spans: dict[str, trace.Span] | None = None,
    traces: dict[str, dict[str, str] | None] | None = None,
    *,
    count_start: bool = False,
) -> list[tuple[str, float]]:
    """Cancel the pending runs of resolved episodes, admit every plan and mark the events
    handled (``count_start``: counting this start on them); returns (run id, timeout) of the
    queued runs, and puts their trace contexts in ``traces``. Each decision is an event of its
    alert's span in ``spans``."""
    spans = spans or {}
    traces = traces if traces is not None else {}
    resolved = [
        (one.event.fingerprint, one.event.starts_at) for one in planned if one.event.status == "resolved"
    ]
    if resolved:
        cancelled = repository.cancel_pending_episode_runs(session, resolved)
        for run_id in cancelled:
            metrics.count_decision("cancelled", "resolved")
            log.info("run_cancelled", run_id=run_id, reason="resolved")
    _note_outcomes(session, planned)
    requests = [(one, plan) for one in planned for plan in one.plans]
    admissions = admit(
        session,
        [request_for(plan, one.event, trace_context=one.trace_context) for one, plan in requests],
        published=True,
        guards=guards,
    )
    repository.mark_events_handled(
        session, {one.event.id: one.matched for one in planned}, count_start=count_start
    )
    queued: list[tuple[str, float]] = []
    causes: list[Cause] = []
    for (one, plan), admission in zip(requests, admissions, strict=True):
        if not admission.created:
            log.info("run_already_planned", event_id=one.event.id, rule=plan.rule, run_id=admission.run_id)
            continue
        if admission.reason == "budget":
            cause = budget_cause(
                admission.run_id,
                plan.rule,
                one.event,
                config,
                global_budget=admission.slot == "budget_global",
            )
            causes.extend([cause] if cause else [])
        log.info(
            "run_planned",
            event_id=one.event.id,
            fingerprint=one.event.fingerprint,
            run_id=admission.run_id,
            rule=plan.rule,
            remediation=plan.remediation,
            trigger=plan.trigger,
            target=plan.target,
            status=admission.status.value,
            reason=admission.reason,
            error=plan.error,
        )
        span = spans.get(one.event.id)
        if span is not None:
            span.add_event(
                "run_decided",
                {
                    "run.id": admission.run_id,
                    "rule": plan.rule,
                    "remediation": plan.remediation,
                    "status": admission.status.value,
                    "reason": admission.reason or "",
                },
            )
        if admission.status == RunStatus.QUEUED:
            queued.append((admission.run_id, admission.timeout_s))
            traces[admission.run_id] = admission.trace_context
    escalations = escalate(session, causes, config, guards)
    return queued + escalations


# A new episode of an alert this soon after a handled one resolved counts as firing again.
REFIRED_WITHIN_S = 3600.0


def _note_outcomes(session: Session, planned: Sequence[_EventPlan]) -> None:
    """Did the automation work? A resolved event records on its episode's runs when it resolved
    (``responder_time_to_resolve_seconds`` from each succeeded run); a new firing episode
    soon after a handled one resolved counts as the alert firing again, per rule that ran."""
    resolved: dict[tuple[str, str], datetime] = {}
    fired: list[tuple[str, str, datetime]] = []
    for one in planned:
        event = one.event
        if event.status == "resolved":
            resolved[(event.fingerprint, event.starts_at)] = instant(event.ends_at) or event.received_at
        elif (began := instant(event.starts_at)) is not None:
            fired.append((event.fingerprint, event.starts_at, began))
    for run in repository.note_episodes_resolved(session, resolved):
        if run.status == RunStatus.SUCCEEDED.value and run.finished_at is not None and run.rule:
            seconds = max(0.0, (run.resolved_at - run.finished_at).total_seconds())
            metrics.TIME_TO_RESOLVE.labels(rule=run.rule).observe(seconds)
    for rule in repository.refired_rules(session, fired, REFIRED_WITHIN_S):
        metrics.REFIRED.labels(rule=rule).inc()


@dataclass(frozen=True)
class Cause:
    """What an escalation is about: a run a budget refused, or whose breaker it opened."""

    run_id: str
    rule: str
    reason: str  # budget, breaker_open
    # At most one escalation per key, across all workers and redeliveries.
    key: str
    detail: str
    event: AlertEvent | Row[Any]
    facts: dict[str, Any] = field(default_factory=dict)


def budget_cause(
    run_id: str, rule: str, event: AlertEvent | Row[Any], config: ResponderConfig, *, global_budget: bool
) -> Cause | None:
    """The cause of a budget's escalation: keyed by the budget and its window number, so one
    per window however many alerts it refused."""
    found = config.rule(rule)
    budget = config.limits.max_runs if global_budget else (found.max_runs if found else None)
    if budget is None:
        return None
    scope = "*" if global_budget else rule
    detail = f"{'all rules' if global_budget else 'rule ' + rule}: budget of {budget.count} runs per {budget.per:g}s reached"
    key = f"budget:{scope}:{int(time.time() // budget.per)}"
    return Cause(run_id, rule, "budget", key, detail, event, {"count": budget.count, "per_s": budget.per})


def escalate(
    session: Session, causes: Sequence[Cause], config: ResponderConfig, guards: GuardState | None
) -> list[tuple[str, float]]:
    """Admit the config's ``escalation`` run for each cause key not escalated yet; returns the
    queued runs (published by the caller after its commit).

    The escalation is a run of its own (trigger ``escalation``), linked to the run it is about
    (``parent_run_id``) and to that run's alert; its dedupe key is ``escalation:{cause key}``
    (a budget and its window number; a breaker and the moment it opened). Its templates see
    ``escalation`` (``reason``, ``rule``, ``detail``, ``run_id``, and ``count``, ``per_s`` for a
    budget) besides the alert.
    """
    if config.escalation is None or not causes:
        return []
    requests: list[RunRequest] = []
    for cause in causes:
        rule = config.rule(cause.rule)
        if rule is None or any(request.idempotency_key == cause.key for request in requests):
            continue
        facts = {"reason": cause.reason, "rule": rule.name, "detail": cause.detail, "run_id": cause.run_id}
        extra = {"escalation": {**facts, **cause.facts}}
        plan = plan_rule(rule, event_alert(cause.event), config, trigger="escalation", extra=extra)
        requests.append(
            RunRequest(
                trigger="escalation",
                remediation=plan.remediation,
                params=plan.params,
                rule=rule.name,
                target=plan.target,
                destructive=plan.destructive,
                timeout_s=plan.timeout_s,
                preflight=plan.preflight,
                error=plan.error,
                event_id=cause.event.id,
                fingerprint=cause.event.fingerprint,
                starts_at=cause.event.starts_at,
                idempotency_key=cause.key,
                parent_run_id=cause.run_id,
                guard_key="" if config.limits.max_escalations is not None else None,
            )
        )
    queued: list[tuple[str, float]] = []
    admissions = admit(session, requests, published=True, guards=guards)
    for request, admission in zip(requests, admissions, strict=True):
        if admission.created:
            log.warning(
                "escalation_admitted",
                run_id=admission.run_id,
                cause_run_id=request.parent_run_id,
                rule=request.rule,
                reason=(request.idempotency_key or "").split(":", 1)[0],
                status=admission.status.value,
                error=request.error,
            )
            if admission.status == RunStatus.QUEUED:
                queued.append((admission.run_id, admission.timeout_s))
    return queued
