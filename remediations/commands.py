"""``run_command``: run a command declared in the config, as an argv list, never through a shell."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

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
from remediations.registry import remediation

MAX_TIMEOUT = MAX_COMMAND_TIMEOUT
POLL_S = 0.2
# After a command exits, how long what it left in its group may take to leave it (setsid).
DETACH_GRACE_S = 0.5
DETACH_POLL_S = 0.02
OUTPUT_LIMIT_BYTES = 16 * 1024
PR_SET_PDEATHSIG = 1
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


class _BoundedReader(threading.Thread):
    """Drains a pipe so the child never blocks, keeping only the first OUTPUT_LIMIT_BYTES."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.kept = bytearray()
        self.total = 0

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read1(65536), b""):  # type: ignore[attr-defined]
            self.total += len(chunk)
            room = OUTPUT_LIMIT_BYTES - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


def _die_with_parent() -> None:
    """In the command's process: get SIGKILL if the worker process dies (Linux prctl).

    A worker killed mid-attempt (OOM, SIGKILL) has its message redelivered; without this the
    orphaned command would go on acting while the next attempt starts.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _group_members(pgid: int) -> int:
    """How many processes are in process group ``pgid`` (Linux /proc; 0 where unreadable)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                count += 1
    return count


def _kill_group(proc: subprocess.Popen[bytes], *, detach_grace_s: float = 0.0) -> int:
    """SIGKILL what is left of the command's process group; returns how many processes that was.

    ``detach_grace_s``: first give what is left that long to leave the group. A script that
    ends with ``setsid daemon &`` exits before its background child has called setsid(2);
    killed at once, that child (the daemon) would die with the group some of the time.
    """
    members = _group_members(proc.pid)
    deadline = time.monotonic() + detach_grace_s
    while members and time.monotonic() < deadline:
        time.sleep(DETACH_POLL_S)
        members = _group_members(proc.pid)
    if members:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return members


def _wait(proc: subprocess.Popen[bytes], ctx: RemediationContext, timeout: float) -> str | None:
    """Wait for the command; returns why it must be stopped (timeout, cancelled) or None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            return None
        except subprocess.TimeoutExpired:
            if ctx.cancelled.is_set():
                return "cancelled"
            if time.monotonic() >= deadline:
                return "timeout"


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
    timeout = spec.timeout
    # The command inherits nothing of ours (tokens, database URLs): only PATH, to find tools.
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group, so a timeout kills every child
            close_fds=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    except OSError as exc:
        raise PermanentError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None  # noqa: S101 - PIPE was asked
    readers = [_BoundedReader(proc.stdout), _BoundedReader(proc.stderr)]
    for reader in readers:
        reader.start()
    stop_reason: str | None = "interrupted"
    killed = 0
    try:
        stop_reason = _wait(proc, ctx, timeout)
    finally:
        # Also on SoftTimeLimitExceeded or any other exception raised into this frame. Whatever
        # is left of the group after the command (a child it started in the background) is
        # killed too: an orphan must not go on acting after the attempt is recorded.
        reason = stop_reason or "left running after the command exited"
        killed = _kill_group(proc, detach_grace_s=0.0 if stop_reason else DETACH_GRACE_S)
        proc.wait()
    incomplete = False
    for reader in readers:
        reader.join(timeout=2)
        if reader.is_alive():
            # A process that left the group (setsid) still holds our pipe: keep what was read
            # and leave the daemon thread to end when the pipe closes.
            incomplete = True
        else:
            reader.stream.close()
    details: dict[str, Any] = {
        "argv": argv,
        "exit_code": proc.returncode,
        "stdout": readers[0].text(),
        "stderr": readers[1].text(),
        "output_truncated": any(r.total > OUTPUT_LIMIT_BYTES for r in readers),
        "processes_killed": killed,
    }
    if incomplete:
        details["output_incomplete"] = "a detached process kept the output pipe open"
    if killed:
        details["kill_reason"] = reason
    if stop_reason == "cancelled":
        raise PermanentError("stopped: this attempt lost its lease", details=details)
    if stop_reason == "timeout":
        raise TransientError(f"timed out after {timeout}s; process group killed", details=details)
    if proc.returncode != 0:
        raise TransientError(f"exit status {proc.returncode}", details=details)
    return RemediationResult(summary=f"{argv[0]} exited 0", details=details)
