"""``create_app()``: the receiver's routers and error handlers, nothing else."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.concurrency import run_in_threadpool

from receiver import deps, errors, intake
from receiver.middleware import RequestContext
from receiver.routes import alertmanager, breakers, ops, pause, runs
from workers import tracing
from workers.publishing import Publisher
from workers.settings import Settings, get_settings


def create_app(
    *,
    settings: Settings | None = None,
    publisher: Publisher | None = None,
    warm_up: bool = False,
    instrument: bool | None = None,
) -> FastAPI:
    """The receiver application on ``settings`` (default: the environment's) and ``publisher``
    (default: Celery on the settings' broker); ``warm_up``: connect to the ledger and the
    broker at startup; ``instrument``: OpenTelemetry's FastAPI instrumentation (default: unless
    this process records no spans, ``tracing.quiet()``)."""
    settings = settings or get_settings()
    publisher = publisher or deps.publisher_for(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if warm_up:
            await run_in_threadpool(intake.get_intake(settings, publisher).warm_up)
            # What the process built to start (FastAPI, SQLAlchemy, Celery, OpenTelemetry: most
            # of its objects, all long-lived) is left out of garbage collection from now on.
            # Each full collection walked them all: under load a pause of about 20 ms every
            # third of a second, which was the receiver's p99 (docs/benchmarks.md).
            gc.collect()
            gc.freeze()
        yield
        intake.stop_all()  # commit and publish what is queued before the process exits

    instrument = not tracing.quiet() if instrument is None else instrument
    # The request's server span (a W3C traceparent from the caller is its parent); probes and
    # scrapes are left out, and so are the per-chunk receive/send spans. When no span is
    # recorded, the instrumentation's work (attributes, the route looked up again, FastAPI's
    # own telemetry middlewares and operation spans) is wasted: a quarter of the receiver's
    # event loop under load (docs/benchmarks.md). RequestContext then makes the request's span
    # itself, for its ids alone.
    native: TelemetryConfig | None = (
        None if instrument else {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    )
    app = FastAPI(title="alert-responder", version=tracing.version(), lifespan=lifespan, telemetry=native)
    app.add_middleware(RequestContext, spans=not instrument)
    if instrument:
        # Imported only here: with its semantic conventions, 2 MiB a quiet receiver never uses.
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="/healthz,/readyz,/metrics", exclude_spans=["receive", "send"]
        )
    app.state.settings = settings
    app.state.publisher = publisher
    errors.install(app)
    # The webhook's router first: routes are matched in order, and it takes nearly every request.
    app.include_router(alertmanager.router)
    app.include_router(ops.router)
    app.include_router(runs.router)
    app.include_router(pause.router)
    app.include_router(breakers.router)
    return app


def serve_app() -> FastAPI:
    """The application ``responder serve`` runs: traced, and warmed up before it answers the
    first webhook."""
    tracing.configure_tracing("receiver")
    return create_app(warm_up=True)
