"""The remediation catalogue: a leaf package with no Celery, broker or settings.

A remediation is a function ``fn(ctx, params) -> RemediationResult`` declared with
``@remediation(name=...)``. Its single params model is the contract: rendered rule params are
validated by it before anything runs, at plan time and again at run time.

The exception tree (``remediations.errors``) is imported with the package; the catalogue's
names are imported when first used (PEP 562). The receiver subclasses the tree's root for its
own errors without loading the catalogue (httpx, its TLS context, tenacity), which it never
runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from remediations.errors import (
    PermanentError,
    RegistryError,
    RemediationError,
    ResponderError,
    TransientError,
)

if TYPE_CHECKING:
    from remediations.registry import (
        CommandSpec,
        Preflight,
        RemediationContext,
        RemediationDef,
        RemediationParams,
        RemediationResult,
        get_remediation,
        load_builtins,
        registered,
        remediation,
    )
    from remediations.retry import RetryPolicy


def __getattr__(name: str) -> Any:
    """The catalogue's names (``__all__`` beyond the errors), from its registry on first use."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("remediations.registry"), name)
    globals()[name] = value
    return value


__all__ = [
    "CommandSpec",
    "PermanentError",
    "Preflight",
    "RegistryError",
    "RemediationContext",
    "RemediationDef",
    "RemediationError",
    "RemediationParams",
    "RemediationResult",
    "ResponderError",
    "RetryPolicy",
    "TransientError",
    "get_remediation",
    "load_builtins",
    "registered",
    "remediation",
]
