"""One error shape for every non-2xx answer: ``{"error": code, "message": ..., "detail": ...}``.

Alertmanager logs the body of an error response, so nothing secret goes in here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from remediations import ResponderError
from workers import telemetry

log = telemetry.get_logger(__name__)


class ApiError(ResponderError):
    """An error the API answers with its own status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


def error_response(error: ApiError) -> JSONResponse:
    """The JSON answer for an ApiError."""
    body: dict[str, Any] = {"error": error.code, "message": error.message}
    if error.detail is not None:
        body["detail"] = error.detail
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def field_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without the offending input (it may be huge or hostile)."""
    return [{"loc": [str(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]


def install(app: FastAPI) -> None:
    """Map every error to the one JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(
            ApiError(422, "invalid_request", "invalid request", detail=field_errors(exc.errors()))
        )

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", error_type=type(exc).__name__, exc_info=exc)
        return error_response(ApiError(500, "internal_error", "internal error; see the receiver's log"))

    @app.exception_handler(SQLAlchemyError)
    async def _ledger(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        # The driver's message can hold the database URL; log the type, not the text.
        log.error("ledger_unavailable", error_type=type(exc).__name__)
        return error_response(ApiError(503, "ledger_unavailable", "the ledger is unavailable; retry later"))
