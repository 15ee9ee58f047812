"""The beat schedule (run by exactly one active beat through celery-redbeat)."""

from __future__ import annotations

from typing import Any

from workers.settings import Settings
from workers.tasknames import QUEUE_MAINTENANCE, RECONCILE


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic jobs: the reconciler, every ``reconcile_interval_s``."""
    return {
        "reconcile": {
            "task": RECONCILE,
            "schedule": settings.reconcile_interval_s,
            # A reconcile that waited longer than its interval is superseded by the next one.
            "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.reconcile_interval_s * 3},
        }
    }
