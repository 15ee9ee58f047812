"""Operational endpoints: liveness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process lives (no auth, no dependencies checked)."""
    return {"status": "ok"}


@router.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of this receiver process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
