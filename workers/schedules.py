"""The beat schedule, and the scheduler that keeps beat alive through Redis outages.

Exactly one beat is active: celery-redbeat holds a Redis lock. Out of the box it exits when
Redis goes away (``ConnectionError``) or comes back empty (``LockNotOwnedError`` on the next
lock extension), and with it goes the reconciler, so nothing is swept until someone restarts
it. ``ResilientRedBeatScheduler`` rides that out: while Redis is unreachable it logs and ticks
again shortly; when its lock is gone it takes the lock again (waiting, as a standby does, if
another beat holds it now) and reinstalls the schedule, which an emptied Redis lost too.
"""

from __future__ import annotations

from typing import Any

import redis
from redbeat import RedBeatScheduler
from redbeat.schedulers import acquire_distributed_beat_lock
from redis.exceptions import LockError

from workers import telemetry
from workers.settings import Settings
from workers.tasknames import DISPATCH, QUEUE_MAINTENANCE, RECONCILE

log = telemetry.get_logger(__name__)
OUTAGE_TICK_S = 2.0
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic jobs: the reconciler every ``reconcile_interval_s``, the dispatcher of waiting
    runs every ``dispatch_interval_s``."""
    return {
        "reconcile": {
            "task": RECONCILE,
            "schedule": settings.reconcile_interval_s,
            # A reconcile that waited longer than its interval is superseded by the next one.
            "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.reconcile_interval_s * 3},
        },
        "dispatch": {
            "task": DISPATCH,
            "schedule": settings.dispatch_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.dispatch_interval_s * 3},
        },
    }


class ResilientRedBeatScheduler(RedBeatScheduler):  # type: ignore[misc]
    """celery-redbeat's scheduler, surviving Redis outages and restarts (see the module doc)."""

    _needs_setup = False

    def setup_schedule(self) -> None:
        """Install the static schedule; if Redis is down, do it on a later tick."""
        try:
            super().setup_schedule()
            self._needs_setup = False
        except _REDIS_DOWN as exc:
            self._needs_setup = True
            log.warning("beat_redis_unavailable", during="setup", error_type=type(exc).__name__)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One scheduling pass; never raises for a Redis outage or a lost lock."""
        try:
            if self.lock_key and getattr(self, "lock", None) is None:
                self._acquire()
            if self._needs_setup:
                super().setup_schedule()
                self._needs_setup = False
                log.info("beat_schedule_installed")
            interval: float = super().tick(*args, **kwargs)
            return interval
        except LockError as exc:
            # The lock key is gone (Redis restarted empty) or another beat holds it now.
            log.warning("beat_lock_lost", error_type=type(exc).__name__)
            self.lock = None
            self._needs_setup = True
            return 0.0
        except _REDIS_DOWN as exc:
            log.warning("beat_redis_unavailable", during="tick", error_type=type(exc).__name__)
            return OUTAGE_TICK_S

    def _acquire(self) -> None:
        """Take the beat lock (blocking while another beat holds it), as redbeat does at start."""

        class _Sender:
            scheduler = self

        acquire_distributed_beat_lock(sender=_Sender())
        log.info("beat_lock_acquired")
