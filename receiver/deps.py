"""FastAPI dependencies: settings, the publisher and bearer-token scopes."""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from receiver.errors import ApiError
from receiver.intake import Intake, get_intake
from workers.celery_app import create_celery_app
from workers.publishing import Publisher
from workers.settings import Settings


# The application's settings and publisher live on ``app.state`` (``create_app``); routes reach
# them through the request. Dependencies are coroutines: FastAPI runs a plain function in the
# thread pool, which cost a thread hop per dependency per request.
async def settings_dependency(request: Request) -> Settings:
    """The application's settings."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(settings_dependency)]
Scope = Literal["ingest", "operator"]

_bearer = HTTPBearer(auto_error=False)


_publishers: dict[int, Publisher] = {}


def publisher_for(settings: Settings) -> Publisher:
    """The process's publisher: one Celery app and producer pool per settings object."""
    publisher = _publishers.get(id(settings))
    if publisher is None or publisher.settings is not settings:
        publisher = _publishers[id(settings)] = Publisher(create_celery_app(settings), settings)
    return publisher


def ingest_intake(request: Request) -> tuple[Settings, Intake]:
    """The webhook's settings and intake, once its bearer token has the ``ingest`` scope.

    A plain call rather than FastAPI dependencies: resolving the four the webhook needed was a
    fifth of the receiver's time per request (``docs/benchmarks.md``).
    """
    state = request.app.state
    settings: Settings = state.settings
    authorize(request.headers.get("authorization"), settings, "ingest")
    return settings, get_intake(settings, state.publisher)


def _known(token: str, tokens: list[SecretStr]) -> bool:
    # Compare against every token, in constant time, so timing says nothing about which matched.
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(token.encode(), candidate.get_secret_value().encode())
    return found


def authorize(authorization: str | None, settings: Settings, scope: Scope) -> None:
    """Admit a bearer token (the ``Authorization`` header) of ``scope``: 401 unknown, 403 wrong scope."""
    challenge = {"WWW-Authenticate": "Bearer"}
    kind, _, token = (authorization or "").partition(" ")
    if kind.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "missing bearer token", headers=challenge)
    ingest = _known(token, settings.ingest_tokens)
    operator = _known(token, settings.operator_tokens)
    if (scope == "ingest" and ingest) or (scope == "operator" and operator):
        return
    if ingest or operator:
        raise ApiError(403, "forbidden", f"this token does not have the {scope} scope")
    raise ApiError(401, "unauthorized", "unknown bearer token", headers=challenge)


def require(scope: Scope) -> Any:
    """A dependency that admits a bearer token of ``scope`` (``authorize``)."""

    async def check(
        settings: SettingsDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
        authorize(header, settings, scope)

    return Depends(check)


RequireIngest = require("ingest")
RequireOperator = require("operator")
