"""Running a program for a remediation: argv only (never a shell), its own process group, bounded
output, a timeout and the attempt's cancellation, and nothing of it left behind afterwards.

``run_command`` runs the operator's declared commands with it; the backups run ``pg_dump`` and
``pg_restore`` with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from remediations.base import RemediationContext
from remediations.errors import PermanentError

POLL_S = 0.2
# After a command exits, how long what it left in its group may take to leave it (setsid).
DETACH_GRACE_S = 0.5
DETACH_POLL_S = 0.02
OUTPUT_LIMIT_BYTES = 16 * 1024
PR_SET_PDEATHSIG = 1
StopReason = Literal["timeout", "cancelled", "interrupted"]


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


def _wait(proc: subprocess.Popen[bytes], ctx: RemediationContext, timeout: float) -> StopReason | None:
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


@dataclass(frozen=True)
class Finished:
    """How a program ended: its exit code (None when it was stopped), why it was stopped, and
    its bounded output."""

    argv: list[str]
    exit_code: int | None
    stop_reason: StopReason | None
    stdout: str
    stderr: str
    truncated: bool
    killed: int
    kill_reason: str | None
    incomplete: bool

    @property
    def ok(self) -> bool:
        """It ran to the end and exited 0."""
        return self.stop_reason is None and self.exit_code == 0

    def details(self) -> dict[str, Any]:
        """What an attempt records of it."""
        details: dict[str, Any] = {
            "argv": self.argv,
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "output_truncated": self.truncated,
            "processes_killed": self.killed,
        }
        if self.incomplete:
            details["output_incomplete"] = "a detached process kept the output pipe open"
        if self.killed:
            details["kill_reason"] = self.kill_reason
        return details


def run_process(
    argv: Sequence[str],
    ctx: RemediationContext,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> Finished:
    """Run ``argv`` with only ``env`` (plus PATH) in its environment, until it exits, the timeout
    passes or the attempt is cancelled; then kill whatever is left of its process group.

    A missing program is a PermanentError; every other ending is in the returned ``Finished``.
    """
    argv = list(argv)
    # The program inherits nothing of ours (tokens, database URLs): only PATH, to find tools.
    environment = {"PATH": os.environ.get("PATH", os.defpath), **(env or {})}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
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
    stop_reason: StopReason | None = "interrupted"
    killed = 0
    try:
        stop_reason = _wait(proc, ctx, timeout)
    finally:
        # Also on SoftTimeLimitExceeded or any other exception raised into this frame. Whatever
        # is left of the group after the command (a child it started in the background) is
        # killed too: an orphan must not go on acting after the attempt is recorded.
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
    return Finished(
        argv=argv,
        exit_code=proc.returncode,
        stop_reason=stop_reason,
        stdout=readers[0].text(),
        stderr=readers[1].text(),
        truncated=any(r.total > OUTPUT_LIMIT_BYTES for r in readers),
        killed=killed,
        kill_reason=(stop_reason or "left running after the command exited") if killed else None,
        incomplete=incomplete,
    )
