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
from remediations.retry import RetryPolicy

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

BUILTIN_MODULES = ("remediations.http", "remediations.commands", "remediations.backup")

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
    # What a run acts on: a param's name, or a template over ``params`` (rendered by the engine).
    target: str | None = None
    # Whether acting could make things worse (restart, delete): guards fail closed for these.
    destructive: bool = True
    # Short in-call retries of one step (tenacity), declared here instead of hand-written loops.
    call_retry: RetryPolicy | None = None

    def validate(self, raw: Mapping[str, Any]) -> RemediationParams:
        """Validate rendered params with the remediation's model (raises pydantic's error)."""
        return self.params_model.model_validate(raw)

    def run(self, ctx: RemediationContext, params: RemediationParams) -> RemediationResult:
        """Run the remediation, with its declared in-call retries if any."""
        if self.call_retry is None:
            return self.fn(ctx, params)
        return self.call_retry.call(self.fn, ctx, params)

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
    target: str | None = None,
    destructive: bool = True,
    call_retry: RetryPolicy | None = None,
) -> Callable[[F], F]:
    """Register ``fn(ctx, params) -> RemediationResult`` under ``name``; return it unchanged.

    Args:
        name: the name rules refer to; unique across the catalogue.
        timeout: default seconds one attempt may take.
        max_timeout: the most any attempt may take (bounds Celery's hard time limit);
            defaults to ``timeout``.
        preflight: optional side-effect-free check run at plan time (and by dry runs).
        target: what a run acts on, stored on the run and used by guards: the name of a
            param, or a template over ``params`` (``"{{ params.url.split('?')[0] }}"``).
        destructive: whether acting can make an outage worse; guards fail closed for these.
        call_retry: in-call retries of transient failures (``remediations.retry.RetryPolicy``),
            applied around the function; the engine's whole-attempt retries come on top.
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
        if target is not None and not target.strip():
            raise RegistryError(f"{what}: target must name a param or be a template")
        if target is not None and "{" not in target and target not in params_model.model_fields:
            raise RegistryError(f"{what}: target {target!r} is not a param of {params_model.__name__}")
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
            target=target,
            destructive=destructive,
            call_retry=call_retry,
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
