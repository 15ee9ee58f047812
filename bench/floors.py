"""The floors the project is measured against, on the project's own server and worker settings.

``serve PORT``: a bare FastAPI endpoint that validates the same webhook payload (the same
pydantic model) and answers 202, run by uvicorn with the receiver's exact options. With
``--with-libraries`` it first imports the libraries the receiver is built on and no code of
ours (``RECEIVER_LIBRARIES``): what the receiver's memory cannot go below with them.
``worker N``: bare Celery with no-op tasks, on the app the worker uses (acks_late, prefetch 1,
the same pool and JSON serializer), consuming its own queue.

    python -m bench.floors serve PORT [--with-libraries]
    python -m bench.floors worker PROCESSES
"""

from __future__ import annotations

import sys
import time

FLOOR_QUEUE = "floor"
NOOP = "bench.noop"
STAMP = "bench.stamp"
LATENCIES = "bench:latency"
# What the receiver needs from the chosen dependencies, beyond the bare endpoint's FastAPI,
# pydantic and uvicorn: SQLAlchemy's engine (not its ORM), Celery and kombu's Redis transport
# (redis-py) to send task messages, prometheus-client for /metrics, OpenTelemetry's SDK.
RECEIVER_LIBRARIES = (
    "sqlalchemy",
    "celery.app.base",
    "kombu.transport.redis",
    "prometheus_client",
    "opentelemetry.sdk.trace",
)


def create_floor_app():  # type: ignore[no-untyped-def]
    """The bare endpoint: read, validate, answer 202 with a small JSON body."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from workers.alerts import WebhookPayload

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/alertmanager", status_code=202)
    async def receive(request: Request) -> JSONResponse:
        payload = WebhookPayload.model_validate_json(await request.body())
        return JSONResponse({"alerts": len(payload.alerts)}, status_code=202)

    return app


def floor_celery():  # type: ignore[no-untyped-def]
    """The worker's Celery app (``create_celery_app``) with a no-op and a stamping task."""
    import redis

    from workers.celery_app import create_celery_app
    from workers.settings import Settings

    settings = Settings()
    app = create_celery_app(settings)
    app.conf.include = []
    app.conf.task_routes = {NOOP: {"queue": FLOOR_QUEUE}, STAMP: {"queue": FLOOR_QUEUE}}
    app.conf.worker_hijack_root_logger = True
    clients: list[redis.Redis] = []

    @app.task(name=NOOP, ignore_result=True)
    def noop() -> None:
        return None

    @app.task(name=STAMP, ignore_result=True)
    def stamp(sent_at: float) -> None:
        started = time.time()
        if not clients:
            clients.append(redis.Redis.from_url(settings.redis_url))
        clients[0].rpush(LATENCIES, started - sent_at)

    return app


def main() -> None:
    role = sys.argv[1]
    if role == "serve":
        import importlib

        import uvicorn

        from workers.cli import server_options

        if "--with-libraries" in sys.argv[3:]:
            for name in RECEIVER_LIBRARIES:
                importlib.import_module(name)
        uvicorn.run(
            "bench.floors:create_floor_app", **server_options(host="127.0.0.1", port=int(sys.argv[2]))
        )
    elif role == "worker":
        floor_celery().worker_main(
            [
                "worker",
                "-Q",
                FLOOR_QUEUE,
                "--loglevel",
                "INFO",
                "--concurrency",
                sys.argv[2],
                "-n",
                "floor@%h",
            ]
        )
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
