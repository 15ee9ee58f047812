"""What every remediation sees: its params base model, its context and its result."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat

MAX_COMMAND_TIMEOUT = 900.0
# The two characters around a secret's reference in rendered params (workers.secrets): the
# runner replaces the reference with the secret's value before a remediation runs, so a
# validator that sees params at planning time may let them through (str.translate table).
SECRET_REFERENCE_MARKS = {0xE000: None, 0xE001: None}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> object:
    """``"10s"``, ``"1m30s"``, ``"500ms"`` or a number of seconds -> seconds (float)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r} (use e.g. 10s, 1m30s, 500ms)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


Duration = Annotated[PositiveFloat, BeforeValidator(parse_duration)]


class RemediationParams(BaseModel):
    """Base of every params model: immutable, and unknown keys are errors (typos do not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class CommandSpec(BaseModel):
    """A command the operator declared in the config; alert data only fills its arguments."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    argv: list[str] = Field(
        min_length=1,
        description="Program and arguments; each element renders to exactly one argument.",
    )
    timeout: Duration = Field(
        default=60.0,
        le=MAX_COMMAND_TIMEOUT,
        description="Time before the process group is killed; at most 900s.",
    )
    allow_option_args: bool = Field(
        default=False,
        description="Allow an argument rendered from alert data to start with '-'.",
    )


@dataclass(frozen=True)
class RemediationResult:
    """What a successful attempt reports: a one-line summary and structured details."""

    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def noop(cls, summary: str) -> RemediationResult:
        """A success that did not need to act (the target was already fine)."""
        return cls(summary=summary, details={"noop": True})


@dataclass(frozen=True)
class Preflight:
    """A side-effect-free check of params before anything runs: the attempt timeout and details."""

    timeout: float
    details: dict[str, Any] = field(default_factory=dict)


def _no_render(template: str) -> str:
    return template


@dataclass(frozen=True)
class RemediationContext:
    """Everything a remediation may use; the engine builds it, tests build it by hand."""

    run_id: str = ""
    http_allowlist: tuple[str, ...] = ()
    commands: Mapping[str, CommandSpec] = field(default_factory=dict)
    # Renders a template string from the config against this run's alert data (sandboxed).
    render: Callable[[str], str] = _no_render
    # Tests pass httpx.MockTransport; production uses the default transport.
    http_transport: httpx.BaseTransport | None = None
    # Set by the engine when this attempt lost its lease (another worker may take the run over):
    # a long remediation stops acting as soon as it sees it.
    cancelled: threading.Event = field(default_factory=threading.Event)
