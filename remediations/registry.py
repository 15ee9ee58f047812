"""The ``@remediation`` decorator and the registry it fills, checked when a module is imported."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from remediations.base import (
    CommandSpec,
    Preflight,
    RemediationContext,
    RemediationParams,
    RemediationResult,
)
from remediations.errors import RegistryError

__all__ = [
    "CommandSpec",
    "Preflight",
    "RemediationContext",
    "RemediationDef",
    "RemediationParams",
    "RemediationResult",
    "get_remediation",
    "load_builtins",
    "registered",
    "remediation",
]

BUILTIN_MODULES = ("remediations.http", "remediations.commands")

RemediationFn = Callable[[RemediationContext, Any], RemediationResult]
PreflightFn = Callable[[RemediationContext, Any], Preflight]
F = TypeVar("F", bound=Callable[..., RemediationResult])


@dataclass(frozen=True)
class RemediationDef:
    """One registered remediation: its function, params model and time limits."""

    name: str
    fn: RemediationFn
    params_model: type[RemediationParams]
    timeout: float
    max_timeout: float
    description: str
    preflight_fn: PreflightFn | None = None

    def validate(self, raw: Mapping[str, Any]) -> RemediationParams:
        """Validate rendered params with the remediation's model (raises pydantic's error)."""
        return self.params_model.model_validate(raw)

    def preflight(self, ctx: RemediationContext, params: RemediationParams) -> Preflight:
        """Check params without side effects; raises PermanentError when they would be refused."""
        if self.preflight_fn is None:
            return Preflight(timeout=self.timeout)
        return self.preflight_fn(ctx, params)


_REGISTRY: dict[str, RemediationDef] = {}


def _check_signature(fn: Callable[..., Any], what: str) -> type[RemediationParams]:
    try:
        hints = get_type_hints(fn)
    except Exception as exc:
        raise RegistryError(f"{what}: cannot resolve type hints: {exc}") from exc
    params = list(inspect.signature(fn).parameters)
    if len(params) != 2:
        raise RegistryError(f"{what}: must take exactly (ctx, params), got {params}")
    ctx_type, params_type = hints.get(params[0]), hints.get(params[1])
    if ctx_type is not RemediationContext:
        raise RegistryError(f"{what}: first parameter must be annotated RemediationContext")
    if not (inspect.isclass(params_type) and issubclass(params_type, RemediationParams)):
        raise RegistryError(f"{what}: second parameter must be a RemediationParams subclass")
    return params_type


def remediation(
    *,
    name: str,
    timeout: float = 30.0,
    max_timeout: float | None = None,
    preflight: PreflightFn | None = None,
) -> Callable[[F], F]:
    """Register ``fn(ctx, params) -> RemediationResult`` under ``name``; return it unchanged.

    Args:
        name: the name rules refer to; unique across the catalogue.
        timeout: default seconds one attempt may take.
        max_timeout: the most any attempt may take (bounds Celery's hard time limit);
            defaults to ``timeout``.
        preflight: optional side-effect-free check run at plan time (and by dry runs).
    """

    def decorate(fn: F) -> F:
        what = f"remediation {name!r} ({fn.__module__}.{fn.__qualname__})"
        params_model = _check_signature(fn, what)
        if get_type_hints(fn).get("return") is not RemediationResult:
            raise RegistryError(f"{what}: must be annotated to return RemediationResult")
        if preflight is not None and _check_signature(preflight, f"{what} preflight") is not params_model:
            raise RegistryError(f"{what}: preflight must take the same params model")
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise RegistryError(f"{what}: name already registered by {_REGISTRY[name].fn.__module__}")
        cap = timeout if max_timeout is None else max_timeout
        if not 0 < timeout <= cap:
            raise RegistryError(f"{what}: need 0 < timeout <= max_timeout")
        _REGISTRY[name] = RemediationDef(
            name=name,
            fn=fn,
            params_model=params_model,
            timeout=timeout,
            max_timeout=cap,
            description=inspect.getdoc(fn) or "",
            preflight_fn=preflight,
        )
        return fn

    return decorate


def load_builtins() -> None:
    """Import the built-in remediation modules (idempotent)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def registered() -> Mapping[str, RemediationDef]:
    """All registered remediations by name, built-ins loaded."""
    load_builtins()
    return dict(_REGISTRY)


def get_remediation(name: str) -> RemediationDef:
    """The remediation called ``name``; KeyError when there is none."""
    load_builtins()
    return _REGISTRY[name]
