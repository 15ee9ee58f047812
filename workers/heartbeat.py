"""Worker heartbeats in Redis: how ``/readyz`` knows a worker is alive without asking Celery.

Each worker's main process writes its name and the time into one sorted set every
``RESPONDER_HEARTBEAT_INTERVAL_S`` (a daemon thread, from ``worker_ready`` until it stops);
a heartbeat older than three intervals is stale. Reading it is one ``ZRANGEBYSCORE``, bounded
by the client's timeouts: no broadcast to the workers on a request's path, unlike
``celery inspect ping``.
"""

from __future__ import annotations

import contextlib
import threading

import redis

from workers import telemetry
from workers.settings import Settings

log = telemetry.get_logger(__name__)

# Missed beats after which a worker counts as gone.
STALE_AFTER_BEATS = 3


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1)


def fresh_workers(client: redis.Redis, settings: Settings) -> dict[str, float]:
    """The workers whose last heartbeat is fresh: name -> its age in seconds (Redis's clock)."""
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    oldest = now - STALE_AFTER_BEATS * settings.heartbeat_interval_s
    found: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
        settings.heartbeat_key, oldest, "+inf", withscores=True
    )
    return {name.decode(): round(now - float(score), 3) for name, score in found}


class Heartbeat:
    """Beats for one worker (``name``) until stopped; a Redis error skips a beat, nothing more."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="responder-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove this worker's heartbeat (a clean shutdown is not a failure,
        but it is no longer a worker either)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            _client(self.settings).zrem(self.settings.heartbeat_key, self.name)

    def beat(self, client: redis.Redis) -> None:
        """Write one heartbeat, and drop those long gone (a worker that never came back)."""
        seconds, micros = client.time()
        now = seconds + micros / 1e6
        pipe = client.pipeline(transaction=False)
        pipe.zadd(self.settings.heartbeat_key, {self.name: now})
        pipe.zremrangebyscore(self.settings.heartbeat_key, "-inf", now - 3600)
        pipe.execute()

    def _loop(self) -> None:
        client = _client(self.settings)
        failing = False
        while not self._stop.is_set():
            try:
                self.beat(client)
                if failing:
                    log.info("heartbeat_restored")
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("heartbeat_failed", error_type=type(exc).__name__)
                failing = True
            self._stop.wait(self.settings.heartbeat_interval_s)
        client.close()
