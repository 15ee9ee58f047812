"""The @remediation decorator and the built-in catalogue."""

from __future__ import annotations

import pytest

from remediations import (
    RegistryError,
    RemediationContext,
    RemediationParams,
    RemediationResult,
    registered,
    remediation,
)


class P(RemediationParams):
    x: int = 1


def test_builtins_are_registered_with_schemas() -> None:
    """Every built-in imports, has a unique name, a docstring and a JSON schema."""
    catalogue = registered()
    assert {"http_request", "run_command"} <= set(catalogue)
    for name, definition in catalogue.items():
        assert definition.name == name
        assert definition.description
        assert definition.params_model.model_json_schema()["type"] == "object"
        assert 0 < definition.timeout <= definition.max_timeout


def test_duplicate_name_stops_the_import() -> None:
    """A second remediation under an existing name raises RegistryError."""
    with pytest.raises(RegistryError, match="already registered"):

        @remediation(name="http_request")
        def other(ctx: RemediationContext, params: P) -> RemediationResult:
            return RemediationResult("x")


@pytest.mark.parametrize("kind", ["ctx", "params", "arity", "return"])
def test_bad_signatures_stop_the_import(kind: str) -> None:
    """Wrong parameter or return types are refused at import, not at 3 a.m."""
    with pytest.raises(RegistryError):
        if kind == "ctx":

            @remediation(name="bad_ctx")
            def a(ctx: dict, params: P) -> RemediationResult:  # type: ignore[type-arg]
                return RemediationResult("x")

        elif kind == "params":

            @remediation(name="bad_params")
            def b(ctx: RemediationContext, params: dict) -> RemediationResult:  # type: ignore[type-arg]
                return RemediationResult("x")

        elif kind == "arity":

            @remediation(name="bad_arity")
            def c(ctx: RemediationContext) -> RemediationResult:
                return RemediationResult("x")

        else:

            @remediation(name="bad_return")  # type: ignore[type-var]
            def d(ctx: RemediationContext, params: P) -> str:
                return "x"


def test_params_models_forbid_unknown_keys_and_are_frozen() -> None:
    """Params models refuse typos and cannot be changed after validation."""
    with pytest.raises(ValueError, match="validation error"):
        P.model_validate({"y": 2})
    with pytest.raises(ValueError, match="frozen"):
        P().x = 3  # type: ignore[misc]


def test_noop_result() -> None:
    """A no-op success says so in its details."""
    assert RemediationResult.noop("already fine").details == {"noop": True}
