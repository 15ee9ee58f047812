"""Publishing task messages (ids only) with a bounded timeout; failures are left to the reconciler."""

from __future__ import annotations

import math

from celery import Celery

from workers.settings import Settings
from workers.tasknames import HANDLE_ALERT, RUN_REMEDIATION


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
            soft_time_limit=timeout_s + 5,
            time_limit=timeout_s + self.settings.hard_limit_margin_s,
            countdown=countdown,
        )
