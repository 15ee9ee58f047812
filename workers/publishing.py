"""Publishing task messages (ids only) with a bounded timeout; failures are left to the reconciler."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from celery import Celery
from sqlalchemy.exc import SQLAlchemyError

from remediations import ResponderError
from workers import metrics, telemetry, tracing
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.ledger.models import AlertEvent, Run
from workers.settings import Settings
from workers.tasknames import HANDLE_ALERT, QUEUE_ALERTS, QUEUE_REMEDIATIONS, RUN_REMEDIATION

log = telemetry.get_logger(__name__)


class PublishError(ResponderError):
    """The broker did not take the messages (down, refused, timed out)."""


@dataclass(frozen=True)
class Message:
    """One task message: the task's name, its ids, and its time limits."""

    task: str
    args: tuple[str, ...]
    soft_time_limit: float
    time_limit: float
    countdown: float = 0.0
    # The trace context (and correlation id) of the row it is about, sent as headers.
    trace_context: tracing.Carrier | None = None


# Trace contexts by event or run id (the rows'), for the messages about them.
Traces = Mapping[str, "tracing.Carrier | None"]


# Events per handle_alert message: the events of a webhook (or of the webhooks committed
# together) in one message, a large group split so that several worker processes share it.
# Each message costs the receiver's publisher about 1.3M instructions (Celery and kombu):
# at 10 per message that was a sixth of a 3-alert webhook's cost (docs/benchmarks.md).
EVENTS_PER_MESSAGE = 25
# Messages per Redis round trip.
PIPELINE_SIZE = 200


class Publisher:
    """Sends ``handle_alert(*event_ids)`` and ``run_remediation(run_id)`` messages by task name."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def handle_alert(self, event_ids: Sequence[str]) -> Message:
        """The ``handle_alert`` message for these events."""
        return Message(HANDLE_ALERT, tuple(event_ids), soft_time_limit=90, time_limit=120)

    def run_remediation(self, run_id: str, *, timeout_s: float, countdown: float = 0) -> Message:
        """The ``run_remediation`` message, with time limits from the run's own timeout."""
        return Message(
            RUN_REMEDIATION,
            (run_id,),
            # The soft limit (an exception inside the task) comes well before the hard kill.
            soft_time_limit=timeout_s + self.settings.hard_limit_margin_s / 3,
            time_limit=timeout_s + self.settings.hard_limit_margin_s,
            countdown=countdown,
        )

    def warm_up(self) -> None:
        """Pay now what the first publish of a process would: the broker connection (kombu sets
        up its transport: over 100 ms); Celery's result backend object and message sender
        (``send_task`` builds both even with results ignored, and finding the backend scans the
        installed packages' entry points: about 7 ms together); the declarations of the queues
        it publishes to (Redis round trips, once per connection). The first alert after a start
        should not wait for them (``docs/benchmarks.md``). Raises if the broker cannot be
        reached; publishing later connects again as usual."""
        self.app.backend  # noqa: B018 - built on first access, then kept by the app
        self.app.amqp.send_task_message  # noqa: B018 - the same
        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
            for name in (QUEUE_ALERTS, QUEUE_REMEDIATIONS):
                producer.maybe_declare(self.app.amqp.queues[name])

    def publish(self, messages: Sequence[Message]) -> None:
        """Send the messages, pipelined (kombu's ``Producer.batch``: one Redis round trip per
        ``PIPELINE_SIZE``); raises PublishError, after which none may be counted as sent."""
        try:
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
                for message in messages:
                    # In its row's trace: a worker's Celery instrumentation injects the current
                    # context into the headers, whatever else (a reconciler pass) is current.
                    # Without a row's context (a retry), the current one and its correlation id.
                    carrier = message.trace_context or tracing.current_carrier()
                    with tracing.attached(message.trace_context):
                        self.app.send_task(
                            message.task,
                            args=list(message.args),
                            countdown=message.countdown or None,
                            soft_time_limit=math.ceil(message.soft_time_limit),
                            time_limit=math.ceil(message.time_limit),
                            producer=producer,
                            retry=False,  # buffered: the batch's flush is what talks to Redis
                            # Celery would repr() the args into a header for monitors: ids say little.
                            argsrepr=f"({len(message.args)} ids)",
                            kwargsrepr="{}",
                            headers=tracing.headers(carrier) or None,
                        )
        except Exception as exc:  # any failure is recoverable: the ledger keeps the ids
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc


def _publish(
    ids: Sequence[str],
    messages: Sequence[Message],
    *,
    model: repository.Publishable,
    marked: bool,
    settings: Settings,
    publisher: Publisher,
) -> int:
    """Send the messages for ``ids`` (all or none: a down broker costs one timeout) and record it.

    What was sent is marked; or, when the rows were marked as published in the transaction that
    recorded them (``marked``), only a refusal writes, to unmark them so the reconciler sends
    them soon. Returns how many ids were sent.
    """
    if not ids:
        return 0
    task = messages[0].task
    try:
        publisher.publish(messages)
        sent = True
    except PublishError as exc:
        metrics.PUBLISH_FAILURES.labels(task=task).inc()
        log.warning("publish_failed", task=task, error=str(exc), left_for_reconciler=len(ids))
        sent = False
    if sent != marked:
        try:
            with transaction(settings.database_url) as session:
                (repository.mark_enqueued if sent else repository.unmark_enqueued)(session, model, ids)
        except SQLAlchemyError as exc:  # the reconciler sends them after the redelivery delay, harmlessly
            log.warning("publish_not_recorded", error_type=type(exc).__name__, ids=len(ids))
    return len(ids) if sent else 0


def publish_events(
    event_ids: Sequence[str],
    *,
    settings: Settings,
    publisher: Publisher,
    marked: bool = False,
    traces: Traces | None = None,
) -> int:
    """Publish ``handle_alert`` for recorded events, ``EVENTS_PER_MESSAGE`` per message; returns how many.

    ``marked``: the events were recorded as published (``record_notifications(published=True)``).
    ``traces``: the events' trace contexts; a message goes in its first event's trace (the
    planner links each event's spans to its own).
    """
    traces = traces or {}
    messages = [
        replace(
            publisher.handle_alert(event_ids[i : i + EVENTS_PER_MESSAGE]),
            trace_context=traces.get(event_ids[i]),
        )
        for i in range(0, len(event_ids), EVENTS_PER_MESSAGE)
    ]
    return _publish(
        event_ids, messages, model=AlertEvent, marked=marked, settings=settings, publisher=publisher
    )


def publish_runs(
    runs: Sequence[tuple[str, float]],
    *,
    settings: Settings,
    publisher: Publisher,
    countdown: float = 0,
    marked: bool = False,
    traces: Traces | None = None,
) -> int:
    """Publish ``run_remediation`` for (run id, timeout) pairs, one message per run; as
    ``publish_events`` (each message in its run's trace)."""
    traces = traces or {}
    messages = [
        replace(
            publisher.run_remediation(run_id, timeout_s=t, countdown=countdown),
            trace_context=traces.get(run_id),
        )
        for run_id, t in runs
    ]
    ids = [run_id for run_id, _ in runs]
    return _publish(ids, messages, model=Run, marked=marked, settings=settings, publisher=publisher)
