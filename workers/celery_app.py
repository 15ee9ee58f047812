"""The Celery application with the delivery settings the design depends on."""

from __future__ import annotations

from celery import Celery

from workers.settings import Settings
from workers.tasknames import (
    DISPATCH,
    HANDLE_ALERT,
    QUEUE_ALERTS,
    QUEUE_MAINTENANCE,
    QUEUE_REMEDIATIONS,
    RECONCILE,
    RUN_REMEDIATION,
)


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app on ``settings.redis_url``; tasks are included only when a worker starts."""
    app = Celery("responder", broker=settings.redis_url, include=["workers.tasks"])
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        # Ack after the task ran: a worker that dies mid-task leaves the message to redeliver.
        # Tasks are idempotent by the ledger (a finished run is not run again).
        task_acks_late=True,
        # Without this a SIGKILLed/OOM-killed child's message is acked and lost (celery#1628).
        task_reject_on_worker_lost=True,
        # Reserve only the running message, so a dead worker strands at most one.
        worker_prefetch_multiplier=1,
        # Not cancelled when the broker connection drops: cancelling kills an attempt between its
        # action and its record, so the lease expires and the action is done again (seen with
        # Redis restarted under 20 runs). A redelivery while it runs is harmless: the ledger's
        # claim answers "busy" (workers/ledger/attempts.py).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # JSON only: pickle from the broker would be code execution.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results live in the ledger; no result backend.
        task_ignore_result=True,
        # Redis redelivers unacked messages after this; all three places must agree (celery#7651)
        # and it must exceed the longest hard time limit (checked at worker start).
        visibility_timeout=settings.visibility_timeout_s,
        broker_transport_options={
            **visibility,
            "socket_connect_timeout": settings.publish_connect_timeout_s,
            "socket_timeout": 5,
        },
        result_backend_transport_options=visibility,
        broker_connection_timeout=settings.publish_connect_timeout_s,
        broker_connection_retry_on_startup=True,
        # Bounded publishing: the receiver must answer Alertmanager well under 10 s.
        task_publish_retry_policy={
            "max_retries": settings.publish_max_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        task_routes={
            HANDLE_ALERT: {"queue": QUEUE_ALERTS},
            RUN_REMEDIATION: {"queue": QUEUE_REMEDIATIONS},
            RECONCILE: {"queue": QUEUE_MAINTENANCE},
            DISPATCH: {"queue": QUEUE_MAINTENANCE},
        },
        task_default_queue=QUEUE_ALERTS,
        worker_hijack_root_logger=False,  # structlog owns logging (workers.telemetry)
        worker_send_task_events=False,
        enable_utc=True,
        # Exactly one active beat: celery-redbeat holds a Redis lock; this subclass survives
        # Redis outages and restarts instead of exiting (workers.schedules).
        beat_scheduler="workers.schedules:ResilientRedBeatScheduler",
        redbeat_redis_url=settings.redis_url,
        redbeat_key_prefix=settings.redbeat_key_prefix,
        redbeat_redis_options={"socket_connect_timeout": 2, "socket_timeout": 5},
        redbeat_lock_timeout=max(30, int(settings.reconcile_interval_s * 5)),
        beat_max_loop_interval=min(5.0, settings.reconcile_interval_s),
    )
    return app
