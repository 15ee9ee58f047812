"""A ``handle_alert`` runs one of the runs it queued itself, under the run's own limits.

A run's ``run_remediation`` message costs the worker about a third of an alert's CPU (Celery's
trace and signals, the pipe between a pool process and its parent, the publish and the ack:
``docs/benchmarks.md``, seventh round). The process that planned a message's runs sends the
others as before, so that free pool processes take them side by side, and runs the last one at
once instead of sending it, with nothing changed for that run:

- the same claim, lease, gate, slot and breaker as a delivered message (``runner.execute``);
- the same time limits: Celery sets a task's limits from its message, so ``time_limits`` gives
  the inline run the ones its message would have carried (``Publisher.run_remediation``);
- the same recovery: the run was recorded as published when it was admitted, so if this process
  dies before claiming it, the reconciler sends its message after the redelivery delay, as for
  a lost message; killed while it runs, its attempt's lease expires and it is taken over.

Only where that holds (``can_run_here``): a prefork pool process of a worker that consumes the
``remediations`` queue (a worker started with ``--queues alerts`` never runs a remediation),
and only a run whose hard limit ends before the ``handle_alert`` task's own soft limit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from billiard.pool import soft_timeout_sighandler
from celery import Celery

from workers import telemetry
from workers.tasknames import QUEUE_REMEDIATIONS

log = telemetry.get_logger(__name__)


def can_run_here(app: Celery) -> bool:
    """Whether a task in this process may run a remediation inline, under enforced limits.

    True in the main thread of a prefork pool process (billiard's, where SIGUSR1 raises
    ``SoftTimeLimitExceeded``: the signal Celery's parent sends at a soft limit) of a worker
    that consumes the ``remediations`` queue.
    """
    return (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler
        and QUEUE_REMEDIATIONS in app.amqp.queues.consume_from
    )


class Offer:
    """A ``handle_alert``'s offer to run one of its queued runs (``planner.handle_events(keep=)``).

    ``take`` accepts a run whose hard limit (its timeout plus ``margin_s``) ends before the
    task's own soft limit (``task_soft_s``, from ``started``; None: the task has no limit).
    """

    def __init__(self, *, margin_s: float, task_soft_s: float | None, started: float) -> None:
        self.margin_s = margin_s
        self.task_soft_s = task_soft_s
        self.started = started
        self.run: tuple[str, float] | None = None

    def take(self, run_id: str, timeout_s: float) -> bool:
        """Keep this run to run here, if its limits fit in the task's."""
        ends = time.monotonic() - self.started + timeout_s + self.margin_s
        if self.task_soft_s is not None and ends >= self.task_soft_s:
            return False
        self.run = (run_id, timeout_s)
        return True


@contextlib.contextmanager
def time_limits(*, soft_s: float, hard_s: float) -> Iterator[None]:
    """The soft and hard time limits Celery gives a task, for work run inside another task.

    At ``soft_s`` the process sends itself SIGUSR1, so billiard's handler raises
    ``SoftTimeLimitExceeded`` in the main thread, as when the pool's parent sends it; at
    ``hard_s`` it is killed (SIGKILL), as the parent kills a task past its hard limit, and the
    pool replaces it. Use only where ``can_run_here`` is true.

    Written here because neither Celery nor billiard offers limits for part of a task: theirs
    are set once per message, by the parent, from the message's headers. A soft limit that
    fires as the block ends may still raise just after it, as with Celery's own: the caller
    handles ``SoftTimeLimitExceeded`` around the block too.
    """
    watchdog = _Watchdog(soft_s=soft_s, hard_s=hard_s)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.stop()


class _Watchdog(threading.Thread):
    def __init__(self, *, soft_s: float, hard_s: float) -> None:
        super().__init__(name="inline-run-limits", daemon=True)
        self.soft_s = soft_s
        self.hard_s = hard_s
        self.done = threading.Event()
        self.lock = threading.Lock()

    def stop(self) -> None:
        with self.lock:  # after this, neither signal is sent
            self.done.set()

    def run(self) -> None:
        pid = os.getpid()
        if self.done.wait(self.soft_s) or not self._send(pid, signal.SIGUSR1):
            return
        if self.done.wait(max(0.0, self.hard_s - self.soft_s)):
            return
        with self.lock:
            if self.done.is_set():
                return
            log.error("inline_run_hard_time_limit", hard_limit_s=self.hard_s)
            os.kill(pid, signal.SIGKILL)

    def _send(self, pid: int, signum: int) -> bool:
        with self.lock:
            if self.done.is_set():
                return False
            os.kill(pid, signum)
            return True
