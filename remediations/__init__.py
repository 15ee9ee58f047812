"""The remediation catalogue: a leaf package with no Celery, broker or settings.

A remediation is a function ``fn(ctx, params) -> RemediationResult`` declared with
``@remediation(name=...)``. Its single params model is the contract: rendered rule params are
validated by it before anything runs, at plan time and again at run time.
"""

from remediations.errors import (
    PermanentError,
    RegistryError,
    RemediationError,
    ResponderError,
    TransientError,
)
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
