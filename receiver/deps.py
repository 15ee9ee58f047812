"""FastAPI dependencies: settings, the publisher and bearer-token scopes."""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from receiver.errors import ApiError
from receiver.intake import Intake, get_intake
from workers.celery_app import create_celery_app
from workers.publishing import Publisher
from workers.settings import Settings, get_settings


# Dependencies are coroutines: FastAPI runs a plain function in the thread pool, which cost
# a thread hop per dependency per request on the webhook's hot path.
async def settings_dependency() -> Settings:
    """The process's settings."""
    return get_settings()


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


async def get_publisher(settings: SettingsDep) -> Publisher:
    """The process's publisher (``publisher_for``)."""
    return publisher_for(settings)


PublisherDep = Annotated[Publisher, Depends(get_publisher)]


async def get_intake_dep(settings: SettingsDep, publisher: PublisherDep) -> Intake:
    """The process's group-commit intake for these settings and publisher."""
    return get_intake(settings, publisher)


IntakeDep = Annotated[Intake, Depends(get_intake_dep)]


def _known(token: str, tokens: list[SecretStr]) -> bool:
    # Compare against every token, in constant time, so timing says nothing about which matched.
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(token.encode(), candidate.get_secret_value().encode())
    return found


def require(scope: Scope) -> Any:
    """A dependency that admits a bearer token of ``scope``: 401 unknown, 403 wrong scope."""

    async def check(
        settings: SettingsDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing bearer token", headers=challenge)
        token = credentials.credentials
        ingest = _known(token, settings.ingest_tokens)
        operator = _known(token, settings.operator_tokens)
        if (scope == "ingest" and ingest) or (scope == "operator" and operator):
            return
        if ingest or operator:
            raise ApiError(403, "forbidden", f"this token does not have the {scope} scope")
        raise ApiError(401, "unauthorized", "unknown bearer token", headers=challenge)

    return Depends(check)


RequireIngest = require("ingest")
RequireOperator = require("operator")
