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
    """Sends ``handle_alert(event_id)`` and ``run_remediation(run_id)`` by task name."""

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

    def handle_alert(self, event_id: str) -> None:
        """Publish ``handle_alert(event_id)``; raises PublishError."""
        self._send(HANDLE_ALERT, [event_id], time_limit=120, soft_time_limit=90)

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


def _until_refused(ids: Sequence[str], send: Callable[[str], None], *, task: str) -> list[str]:
    """Send one message per id, stopping at the first refusal: a down broker costs one timeout."""
    sent: list[str] = []
    for item in ids:
        try:
            send(item)
        except PublishError as exc:
            telemetry.PUBLISH_FAILURES.labels(task=task).inc()
            log.warning(
                "publish_failed", task=task, id=item, error=str(exc), left_for_reconciler=len(ids) - len(sent)
            )
            break
        sent.append(item)
    return sent


def _mark(ids: list[str], mark: Callable[[Session, Sequence[str]], None], settings: Settings) -> None:
    if not ids:
        return
    try:
        with transaction(settings.database_url) as session:
            mark(session, ids)
    except SQLAlchemyError as exc:  # published but unmarked: the reconciler sends them again, harmlessly
        log.warning("mark_enqueued_failed", error_type=type(exc).__name__)


def publish_events(event_ids: Sequence[str], *, settings: Settings, publisher: Publisher) -> int:
    """Publish ``handle_alert`` for recorded events and mark them enqueued; returns how many."""
    sent = _until_refused(event_ids, publisher.handle_alert, task="handle_alert")
    _mark(sent, repository.mark_events_enqueued, settings)
    return len(sent)


def publish_runs(
    runs: Sequence[tuple[str, float]], *, settings: Settings, publisher: Publisher, countdown: float = 0
) -> int:
    """Publish ``run_remediation`` for (run id, timeout) pairs and mark them enqueued."""
    timeouts = dict(runs)
    sent = _until_refused(
        [run_id for run_id, _ in runs],
        lambda run_id: publisher.run_remediation(run_id, timeout_s=timeouts[run_id], countdown=countdown),
        task="run_remediation",
    )
    _mark(sent, repository.mark_runs_enqueued, settings)
    return len(sent)
