"""``create_app()``: the receiver's routers and error handlers, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from receiver import errors, intake
from receiver.routes import alertmanager, ops, runs


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    intake.stop_all()  # commit and publish what is queued before the process exits


def create_app() -> FastAPI:
    """The receiver application."""
    app = FastAPI(title="alert-responder", version="0.1.0", lifespan=_lifespan)
    errors.install(app)
    app.include_router(ops.router)
    app.include_router(alertmanager.router)
    app.include_router(runs.router)
    return app
