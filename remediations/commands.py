"""``run_command``: run a command declared in the config, as an argv list, never through a shell."""

from __future__ import annotations

from pydantic import Field

from remediations.base import (
    MAX_COMMAND_TIMEOUT,
    CommandSpec,
    Preflight,
    RemediationContext,
    RemediationParams,
    RemediationResult,
)
from remediations.errors import PermanentError, TransientError
from remediations.processes import run_process
from remediations.registry import remediation

MAX_TIMEOUT = MAX_COMMAND_TIMEOUT
TEMPLATE_MARKERS = ("{{", "{%")


class RunCommandParams(RemediationParams):
    """Params of ``run_command``: which declared command to run."""

    command: str = Field(description="Name of a command under `commands:` in the config.")


def is_template(element: str) -> bool:
    """Whether an argv element takes data from the alert (contains template syntax)."""
    return any(marker in element for marker in TEMPLATE_MARKERS)


def render_argv(spec: CommandSpec, ctx: RemediationContext) -> list[str]:
    """Render each argv element to exactly one argument and refuse injected options.

    An argument rendered from alert data that starts with '-' could be read as an option
    (``ssh -oProxyCommand=...``): refused unless the command sets ``allow_option_args``.
    """
    argv: list[str] = []
    for index, element in enumerate(spec.argv):
        if index == 0 and is_template(element):
            raise PermanentError("the program (argv[0]) must be a literal path, not a template")
        value = ctx.render(element) if is_template(element) else element
        if "\x00" in value:
            raise PermanentError(f"argument {index} contains a NUL byte")
        if is_template(element) and value.startswith("-") and not spec.allow_option_args:
            raise PermanentError(
                f"argument {index} rendered from alert data starts with '-' "
                "(set allow_option_args: true on the command to permit it)"
            )
        argv.append(value)
    return argv


def _command(ctx: RemediationContext, params: RunCommandParams) -> CommandSpec:
    spec = ctx.commands.get(params.command)
    if spec is None:
        raise PermanentError(f"unknown command {params.command!r} (not under `commands:`)")
    return spec


def preflight_run_command(ctx: RemediationContext, params: RunCommandParams) -> Preflight:
    """Resolve the command and render its argv, refusing what ``run_command`` would refuse."""
    spec = _command(ctx, params)
    return Preflight(timeout=spec.timeout, details={"argv": render_argv(spec, ctx)})


@remediation(
    name="run_command",
    timeout=60.0,
    max_timeout=MAX_TIMEOUT,
    preflight=preflight_run_command,
    target="command",
    destructive=True,
)
def run_command(ctx: RemediationContext, params: RunCommandParams) -> RemediationResult:
    """Run a declared command with an empty environment (plus PATH), capturing bounded output.

    Exit status 0 succeeds; another status or the timeout (which kills the whole process
    group) is transient; a missing program is permanent. Processes the command leaves behind
    in its group are killed when it exits, and counted on the attempt (``processes_killed``,
    ``kill_reason``): to start a daemon, detach it (``setsid CMD >/dev/null 2>&1 &`` or
    ``systemd-run``).
    """
    spec = _command(ctx, params)
    argv = render_argv(spec, ctx)
    finished = run_process(argv, ctx, timeout=spec.timeout)
    details = finished.details()
    if finished.stop_reason == "cancelled":
        raise PermanentError("stopped: this attempt lost its lease", details=details)
    if finished.stop_reason == "timeout":
        raise TransientError(f"timed out after {spec.timeout}s; process group killed", details=details)
    if finished.exit_code != 0:
        raise TransientError(f"exit status {finished.exit_code}", details=details)
    return RemediationResult(summary=f"{argv[0]} exited 0", details=details)
