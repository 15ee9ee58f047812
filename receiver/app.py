"""``create_app()``: the receiver's routers and error handlers, nothing else."""

from __future__ import annotations

from fastapi import FastAPI

from receiver import errors
from receiver.routes import alertmanager, ops, runs


def create_app() -> FastAPI:
    """The receiver application."""
    app = FastAPI(title="alert-responder", version="0.1.0")
    errors.install(app)
    app.include_router(ops.router)
    app.include_router(alertmanager.router)
    app.include_router(runs.router)
    return app
