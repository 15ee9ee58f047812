"""Keeping attempts' leases alive while their remediations run: one keeper thread per process.

While a remediation runs, its attempt's lease (``attempts.deadline_at``, on the ledger's clock)
is renewed every ``lease_s / 3``. If it cannot be renewed (the ledger is unreachable, or the
attempt was abandoned or its run cancelled), the lease tells the remediation to stop
(``Lease.cancelled``, the remediation's ``ctx.cancelled``) before anyone else may take the run
over, and whatever the attempt reports afterwards is recorded on the attempt alone.

Each renewal runs in a thread of its own, so a ledger that hangs (a network partition leaves
sockets waiting, not failing) cannot stop the keeper from noticing that a lease ran out. The
local expiry is counted from before each renewal was sent, so this worker stops acting no later
than the ledger, which other workers' reconcilers read, expires the lease.

One long-lived keeper per process, not a thread per attempt: starting and joining a thread
around every run cost an eighth of a short run's time on a busy two-core machine (bench/).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import SQLAlchemyError

from workers import telemetry
from workers.ledger import attempts
from workers.ledger.db import db_now, transaction

log = telemetry.get_logger(__name__)


class Lease:
    """One attempt's lease as this process keeps it; ``cancelled`` is set once it is lost."""

    def __init__(self, *, url: str, attempt_id: int, lease_s: float) -> None:
        self.url = url
        self.attempt_id = attempt_id
        self.lease_s = lease_s
        self.cancelled = threading.Event()
        self.lost: str | None = None
        self.released = False
        now = time.monotonic()
        self.expires = now + lease_s
        self.due = now + lease_s / 3
        self._renewal: threading.Thread | None = None

    def next_wake(self) -> float:
        """When the keeper must look at this lease again (monotonic)."""
        return min(self.due, self.expires)

    def tick(self, now: float) -> None:
        """Lose the lease once it has expired locally; start a renewal when one is due."""
        if self.lost is not None or self.released:
            return
        if now >= self.expires:
            self._lose("lease expired: the ledger could not be reached to renew it")
            return
        if now < self.due:
            return
        self.due = now + self.lease_s / 3
        if self._renewal is None or not self._renewal.is_alive():
            self._renewal = threading.Thread(
                target=self._renew, name=f"lease-{self.attempt_id}-renew", daemon=True
            )
            self._renewal.start()

    def _renew(self) -> None:
        sent = time.monotonic()
        try:
            with transaction(self.url) as session:
                renewed = attempts.renew_lease(
                    session, self.attempt_id, now=db_now(session), lease_s=self.lease_s
                )
        except SQLAlchemyError as exc:
            log.warning("lease_renewal_failed", error_type=type(exc).__name__)
            return
        if renewed:
            self.expires = max(self.expires, sent + self.lease_s)
        elif not self.released:
            self._lose("superseded: the attempt was abandoned or its run cancelled")

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            self.cancelled.set()
            log.warning("lease_lost", reason=reason, attempt_id=self.attempt_id)


class LeaseKeeper:
    """Renews every lease this process holds, from one daemon thread started on first use."""

    def __init__(self) -> None:
        self._leases: set[Lease] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` alive until ``release``."""
        with self._changed:
            self._leases.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
            self._changed.notify()

    def release(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (its attempt is being closed); a renewal in flight may land."""
        with self._changed:
            lease.released = True
            self._leases.discard(lease)

    def holding(self) -> int:
        """How many leases this keeper renews."""
        with self._changed:
            return len(self._leases)

    def _run(self) -> None:
        while True:
            with self._changed:
                held = list(self._leases)
            now = time.monotonic()
            for lease in held:
                lease.tick(now)
            with self._changed:
                wakes = [lease.next_wake() for lease in self._leases if lease.lost is None]
                timeout = max(0.0, min(wakes) - time.monotonic()) if wakes else None
                self._changed.wait(timeout)


_keepers: dict[int, LeaseKeeper] = {}
_keepers_lock = threading.Lock()


def keeper() -> LeaseKeeper:
    """This process's keeper; a forked child gets its own (its parent's thread is not there)."""
    pid = os.getpid()
    with _keepers_lock:
        found = _keepers.get(pid)
        if found is None:
            found = _keepers[pid] = LeaseKeeper()
        return found


@contextmanager
def kept(*, url: str, attempt_id: int, lease_s: float) -> Iterator[Lease]:
    """Keep an attempt's lease alive for the body."""
    lease = Lease(url=url, attempt_id=attempt_id, lease_s=lease_s)
    owner = keeper()
    owner.hold(lease)
    try:
        yield lease
    finally:
        owner.release(lease)
