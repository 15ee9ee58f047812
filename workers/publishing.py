"""Publishing task messages (ids only) with a bounded timeout; failures are left to the reconciler."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from celery import Celery
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from workers import telemetry
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.settings import Settings
from workers.tasknames import HANDLE_ALERT, RUN_REMEDIATION

log = telemetry.get_logger(__name__)


class PublishError(Exception):
    """The broker did not take the message (down, refused, timed out)."""


class Publisher:
    """Sends ``handle_alert(*event_ids)`` and ``run_remediation(run_id)`` by task name."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _send(
        self, name: str, args: list[str], *, soft_time_limit: float, time_limit: float, countdown: float = 0
    ) -> None:
        try:
            self.app.send_task(
                name,
                args=args,
                countdown=countdown or None,
                soft_time_limit=math.ceil(soft_time_limit),
                time_limit=math.ceil(time_limit),
                retry=True,
                retry_policy=self.app.conf.task_publish_retry_policy,
            )
        except Exception as exc:  # any failure is recoverable: the ledger keeps the id
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc

    def handle_alert(self, event_ids: Sequence[str]) -> None:
        """Publish one ``handle_alert(*event_ids)``; raises PublishError."""
        self._send(HANDLE_ALERT, list(event_ids), time_limit=120, soft_time_limit=90)

    def run_remediation(self, run_id: str, *, timeout_s: float, countdown: float = 0) -> None:
        """Publish ``run_remediation(run_id)`` with time limits from the run's own timeout."""
        self._send(
            RUN_REMEDIATION,
            [run_id],
            # The soft limit (an exception inside the task) comes well before the hard kill.
            soft_time_limit=timeout_s + self.settings.hard_limit_margin_s / 3,
            time_limit=timeout_s + self.settings.hard_limit_margin_s,
            countdown=countdown,
        )


# Events per handle_alert message: one message per webhook, a large group split so that
# several worker processes share it.
EVENTS_PER_MESSAGE = 10


def _until_refused(
    batches: Sequence[list[str]], send: Callable[[list[str]], None], *, task: str
) -> list[str]:
    """Send one message per batch of ids, stopping at the first refusal: a down broker costs one
    timeout. Returns the ids sent."""
    sent: list[str] = []
    total = sum(len(batch) for batch in batches)
    for batch in batches:
        try:
            send(batch)
        except PublishError as exc:
            telemetry.PUBLISH_FAILURES.labels(task=task).inc()
            log.warning(
                "publish_failed",
                task=task,
                ids=batch[:10],
                error=str(exc),
                left_for_reconciler=total - len(sent),
            )
            break
        sent.extend(batch)
    return sent


def _record_publishes(
    ids: Sequence[str],
    sent: Sequence[str],
    *,
    marked: bool,
    mark: Callable[[Session, Sequence[str]], None],
    unmark: Callable[[Session, Sequence[str]], None],
    settings: Settings,
) -> None:
    """Record the publishes: mark what was sent, or, when the rows were marked as published in
    the transaction that recorded them, unmark what was not (the reconciler then sends it soon)."""
    if marked:
        done = set(sent)
        todo, write = [i for i in ids if i not in done], unmark
    else:
        todo, write = list(sent), mark
    if not todo:
        return
    try:
        with transaction(settings.database_url) as session:
            write(session, todo)
    except SQLAlchemyError as exc:  # the reconciler sends them again after the redelivery delay, harmlessly
        log.warning("publish_not_recorded", error_type=type(exc).__name__, ids=len(todo))


def publish_events(
    event_ids: Sequence[str], *, settings: Settings, publisher: Publisher, marked: bool = False
) -> int:
    """Publish ``handle_alert`` for recorded events, ``EVENTS_PER_MESSAGE`` per message; returns how many.

    ``marked``: the events were recorded as published (``record_notifications(published=True)``),
    so only a failure needs a write; otherwise what was sent is marked.
    """
    batches = [
        list(event_ids[i : i + EVENTS_PER_MESSAGE]) for i in range(0, len(event_ids), EVENTS_PER_MESSAGE)
    ]
    sent = _until_refused(batches, publisher.handle_alert, task="handle_alert")
    _record_publishes(
        event_ids,
        sent,
        marked=marked,
        mark=repository.mark_events_enqueued,
        unmark=repository.unmark_events_enqueued,
        settings=settings,
    )
    return len(sent)


def publish_runs(
    runs: Sequence[tuple[str, float]],
    *,
    settings: Settings,
    publisher: Publisher,
    countdown: float = 0,
    marked: bool = False,
) -> int:
    """Publish ``run_remediation`` for (run id, timeout) pairs, one message per run; as ``publish_events``."""
    timeouts = dict(runs)
    sent = _until_refused(
        [[run_id] for run_id, _ in runs],
        lambda ids: publisher.run_remediation(ids[0], timeout_s=timeouts[ids[0]], countdown=countdown),
        task="run_remediation",
    )
    _record_publishes(
        [run_id for run_id, _ in runs],
        sent,
        marked=marked,
        mark=repository.mark_runs_enqueued,
        unmark=repository.unmark_runs_enqueued,
        settings=settings,
    )
    return len(sent)
