"""Operational endpoints: liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from receiver.deps import SettingsDep
from workers import metrics, telemetry
from workers.heartbeat import fresh_workers
from workers.ledger import repository, schedules
from workers.ledger.db import connect, reading
from workers.settings import Settings
from workers.tasknames import ALL_QUEUES

router = APIRouter(tags=["ops"])
log = telemetry.get_logger(__name__)

# Each readiness check answers within this, or counts as failed.
CHECK_TIMEOUT_S = 2.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process lives (no auth, no dependencies checked)."""
    return {"status": "ok"}


@lru_cache(maxsize=8)
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


async def _check(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one blocking check off the event loop, bounded; its state, latency and findings."""
    started = time.perf_counter()
    try:
        found = await asyncio.wait_for(run_in_threadpool(probe), CHECK_TIMEOUT_S)
        result: dict[str, Any] = {"ok": True, **found}
    except TimeoutError:
        result = {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_S:g}s"}
    except Exception as exc:  # any failure is the answer: the check is down, and why
        result = {"ok": False, "error": type(exc).__name__}
    if result.pop("failed", False):
        result["ok"] = False
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


def _redis_probe(settings: Settings) -> dict[str, Any]:
    _redis(settings.redis_url).ping()
    return {}


def _ledger_probe(settings: Settings) -> dict[str, Any]:
    connect(settings.database_url)
    return {}


def _workers_probe(settings: Settings) -> dict[str, Any]:
    workers = fresh_workers(_redis(settings.redis_url), settings)
    found: dict[str, Any] = {"workers": workers}
    if not workers:
        found.update(
            failed=True, error=f"no worker heartbeat in the last {3 * settings.heartbeat_interval_s:g}s"
        )
    return found


@router.get("/readyz")
async def readyz(settings: SettingsDep) -> JSONResponse:
    """200 when Redis and the ledger answer and at least one worker's heartbeat is fresh, else
    503; each check's state and latency either way (no auth: it names no secret)."""
    checks = dict(
        zip(
            ("redis", "ledger", "workers"),
            await asyncio.gather(
                _check(lambda: _redis_probe(settings)),
                _check(lambda: _ledger_probe(settings)),
                _check(lambda: _workers_probe(settings)),
            ),
            strict=True,
        )
    )
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics")
async def scrape(settings: SettingsDep) -> Response:
    """Prometheus metrics of this receiver process (with ``PROMETHEUS_MULTIPROC_DIR``, of every
    process writing there), and what is read at scrape time: the breakers' states and the
    backlog from the ledger, the queues' depths from Redis. A source that does not answer
    within its bound leaves its gauges as they were and is logged."""
    await asyncio.gather(
        run_in_threadpool(_scrape_ledger, settings), run_in_threadpool(_scrape_queues, settings)
    )
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


def _scrape_ledger(settings: Settings) -> None:
    try:
        with reading(settings.database_url) as session:
            counts = repository.breaker_counts(session)
            backlog = repository.backlog_counts(session)
            backups = schedules.backups(session)
    except SQLAlchemyError as exc:
        log.warning("metrics_ledger_unavailable", error_type=type(exc).__name__)
        return
    for remediation in {remediation for remediation, _ in counts}:
        for state in ("closed", "open", "half_open"):
            metrics.BREAKER_STATE.labels(remediation=remediation, state=state).set(
                counts.get((remediation, state), 0)
            )
    for kind, count in backlog.items():
        metrics.BACKLOG.labels(kind=kind).set(count)
    metrics.set_backups(backups)


def _scrape_queues(settings: Settings) -> None:
    try:
        pipe = _redis(settings.redis_url).pipeline(transaction=False)
        for queue in ALL_QUEUES:
            pipe.llen(queue)
        depths = pipe.execute()
        alive = len(fresh_workers(_redis(settings.redis_url), settings))
    except redis.RedisError as exc:
        log.warning("metrics_redis_unavailable", error_type=type(exc).__name__)
        return
    for queue, depth in zip(ALL_QUEUES, depths, strict=True):
        metrics.QUEUE_DEPTH.labels(queue=queue).set(depth)
    metrics.WORKERS_ALIVE.set(alive)
