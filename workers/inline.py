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
  a lost message; killed while it runs, the ``handle_alert`` redelivered runs it again under the
  same task id, whose claim abandons the dead attempt at once (``attempts.left_by_task``), and
  if nothing redelivers it, its lease expires and the reconciler takes it over.

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
    pool replaces it. Use only where ``can_run_here`` is true, one block at a time.

    Written here because neither Celery nor billiard offers limits for part of a task: theirs
    are set once per message, by the parent, from the message's headers. A soft limit that
    fires as the block ends may still raise just after it, as with Celery's own: the caller
    handles ``SoftTimeLimitExceeded`` around the block too.
    """
    _WATCHDOG.arm(soft_s=soft_s, hard_s=hard_s)
    try:
        yield
    finally:
        _WATCHDOG.disarm()


class _Watchdog:
    """One thread per process that sends the limits of the block armed, if it outlives them.

    The thread lives as long as its process (a thread per block cost 140 us of CPU, a twentieth
    of a run); arming wakes it only when it sleeps past the new soft limit.
    """

    def __init__(self) -> None:
        self.pid = 0  # the process whose thread this is (a pool process is forked: none yet)
        self.cond = threading.Condition()
        self.soft_at: float | None = None  # the block armed: its deadlines (monotonic), if any
        self.hard_at = 0.0
        self.hard_s = 0.0
        self.soft_sent = False
        self.wakes_at: float | None = None  # when the thread looks again (None: when notified)

    def arm(self, *, soft_s: float, hard_s: float) -> None:
        if self.pid != os.getpid():
            self.cond = threading.Condition()  # not one a thread of the parent held at the fork
            self.pid = os.getpid()
            self.wakes_at = None
            threading.Thread(target=self._watch, name="inline-run-limits", daemon=True).start()
        with self.cond:
            now = time.monotonic()
            self.soft_at, self.hard_at, self.hard_s, self.soft_sent = (
                now + soft_s,
                now + hard_s,
                hard_s,
                False,
            )
            if self.wakes_at is None or self.wakes_at > self.soft_at:
                self.cond.notify()

    def disarm(self) -> None:
        with self.cond:  # after this, neither signal is sent
            self.soft_at = None

    def _watch(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                if self.soft_at is None:
                    self.wakes_at = None
                elif not self.soft_sent and now >= self.soft_at:
                    self.soft_sent = True
                    os.kill(self.pid, signal.SIGUSR1)
                    continue
                elif self.soft_sent and now >= self.hard_at:
                    log.error("inline_run_hard_time_limit", hard_limit_s=self.hard_s)
                    os.kill(self.pid, signal.SIGKILL)
                else:
                    self.wakes_at = self.hard_at if self.soft_sent else self.soft_at
                self.cond.wait(None if self.wakes_at is None else max(0.0, self.wakes_at - now))


_WATCHDOG = _Watchdog()
