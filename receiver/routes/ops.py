"""Operational endpoints: liveness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from receiver.deps import SettingsDep
from workers import telemetry
from workers.ledger import repository
from workers.ledger.db import reading

router = APIRouter(tags=["ops"])
log = telemetry.get_logger(__name__)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process lives (no auth, no dependencies checked)."""
    return {"status": "ok"}


@router.get("/metrics")
def metrics(settings: SettingsDep) -> Response:
    """Prometheus metrics of this receiver process, and the breakers' states from the ledger."""
    try:
        with reading(settings.database_url) as session:
            counts = repository.breaker_counts(session)
    except SQLAlchemyError as exc:
        log.warning("metrics_ledger_unavailable", error_type=type(exc).__name__)
    else:
        for remediation in {remediation for remediation, _ in counts}:
            for state in ("closed", "open", "half_open"):
                telemetry.BREAKER_STATE.labels(remediation=remediation, state=state).set(
                    counts.get((remediation, state), 0)
                )
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
