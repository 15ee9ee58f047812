"""Intake: webhooks recorded by group commit, then published, off the event loop.

One writer thread per process takes every webhook waiting at that moment and records them all
in one transaction: concurrent webhooks share one durable commit instead of queueing one by one
on the ledger's write lock (SQLite allows one writer; its busy handler sleeps while it waits).
A request's 202 waits until the transaction holding its alerts has committed, so a 202 still
means committed.

The accepted events are recorded as published in that same transaction, and one publisher
thread sends them, ``EVENTS_PER_MESSAGE`` per ``handle_alert`` message, merging the webhooks
that committed together. Only a failed publish costs a second write: the events are marked
unpublished and the reconciler sends them. If the process dies between the commit and the
publish, the reconciler sends them once ``RESPONDER_REDELIVER_AFTER_S`` has passed.

Hand-written rather than a library: group commit is a few lines over a queue, and no library
we could find batches SQLAlchemy transactions across asyncio requests.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

from workers import metrics, telemetry
from workers.alerts import WebhookPayload
from workers.ledger import repository
from workers.ledger.db import connect, is_transient_ledger_error, transaction
from workers.publishing import Publisher, publish_events
from workers.settings import Settings

log = telemetry.get_logger(__name__)

# Alerts in one group-commit transaction at most; more wait for the next one.
MAX_BATCH_ALERTS = 5000


@dataclass
class _Pending:
    """One webhook between its request and its commit (and then its publish)."""

    notification: repository.Notification
    loop: asyncio.AbstractEventLoop
    recorded: asyncio.Future[list[repository.RecordedEvent]]
    published: asyncio.Future[None]
    new: tuple[str, ...] = ()


def _resolve(
    pending: _Pending, future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
    def settle() -> None:
        if future.done():  # the request went away (client disconnected); nothing to tell it
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    pending.loop.call_soon_threadsafe(settle)


class Intake:
    """Group commit and publishing for one ledger and one publisher, in this process."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self._commits: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._publishes: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._write_loop, name="intake-commit", daemon=True),
                threading.Thread(target=self._publish_loop, name="intake-publish", daemon=True),
            ]
            for thread in self._threads:
                thread.start()

    def warm_up(self) -> None:
        """Start the threads and connect to the ledger and the broker before the first webhook
        (which otherwise waited about 130 ms for them); a failure is logged, and the first
        webhook meets it again and answers for it."""
        self._start()
        try:
            connect(self.settings.database_url)
            self.publisher.warm_up()
        except Exception as exc:
            log.warning("intake_warm_up_failed", error_type=type(exc).__name__)

    def stop(self) -> None:
        """Finish what is queued, then stop the threads (application shutdown)."""
        with self._lock:
            threads, self._threads = self._threads, []
        if threads:
            self._commits.put(None)
            threads[0].join(timeout=30)
            self._publishes.put(None)
            threads[1].join(timeout=30)

    async def accept(
        self, payload: WebhookPayload, *, trace_context: dict[str, str] | None = None
    ) -> list[repository.RecordedEvent]:
        """Record a webhook's alerts (returns once committed) and publish the new ones;
        ``trace_context``: the webhook's, kept on its events (``workers.tracing``).

        Publishing waits at most ``RESPONDER_PUBLISH_BUDGET_S``: past it the answer is still
        given (the alerts are committed) and the publisher thread or the reconciler sends them.
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(
            repository.Notification(payload.alerts, payload.receiver, payload.group_key, trace_context),
            loop,
            loop.create_future(),
            loop.create_future(),
        )
        self._start()
        self._commits.put(pending)
        recorded = await pending.recorded
        if pending.new:
            try:
                await asyncio.wait_for(asyncio.shield(pending.published), self.settings.publish_budget_s)
            except TimeoutError:
                metrics.PUBLISH_FAILURES.labels(task="handle_alert").inc()
                log.warning(
                    "publish_budget_exceeded",
                    budget_s=self.settings.publish_budget_s,
                    left_for_publisher=len(pending.new),
                )
        return recorded

    def _write_loop(self) -> None:
        while (batch := _take_waiting(self._commits, limit=MAX_BATCH_ALERTS)) is not None:
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with transaction(self.settings.database_url) as session:
                results = repository.record_notifications(
                    session, [p.notification for p in batch], published=True
                )
        except Exception as exc:
            if len(batch) > 1 and not is_transient_ledger_error(exc):
                # Something in one webhook the ledger refuses must not fail the others.
                for pending in batch:
                    self._commit([pending])
                return
            for pending in batch:
                _resolve(pending, pending.recorded, error=exc)
            return
        for pending, recorded in zip(batch, results, strict=True):
            pending.new = tuple(r.event_id for r in recorded if r.accepted)
            if pending.new:
                self._publishes.put(pending)
            _resolve(pending, pending.recorded, recorded)

    def _publish_loop(self) -> None:
        while (batch := _take_waiting(self._publishes)) is not None:
            ids = [event_id for pending in batch for event_id in pending.new]
            traces = {
                event_id: pending.notification.trace_context for pending in batch for event_id in pending.new
            }
            try:
                publish_events(
                    ids, settings=self.settings, publisher=self.publisher, marked=True, traces=traces
                )
            except Exception:  # never let the thread die: the reconciler sends what is left
                log.exception("publish_crashed", events=len(ids))
            for pending in batch:
                _resolve(pending, pending.published)


def _take_waiting(
    waiting: queue.SimpleQueue[_Pending | None], *, limit: int | None = None
) -> list[_Pending] | None:
    """Block for one webhook, then take every other one waiting (up to ``limit`` alerts);
    None once ``stop`` was asked and nothing is left before it."""
    first = waiting.get()
    if first is None:
        return None
    batch, alerts = [first], len(first.notification.alerts)
    while limit is None or alerts < limit:
        try:
            more = waiting.get_nowait()
        except queue.Empty:
            break
        if more is None:
            waiting.put(None)  # stop after this batch
            break
        batch.append(more)
        alerts += len(more.notification.alerts)
    return batch


_intakes: dict[tuple[int, int, int], Intake] = {}
_intakes_lock = threading.Lock()


def get_intake(settings: Settings, publisher: Publisher) -> Intake:
    """This process's intake for these settings and this publisher."""
    key = (os.getpid(), id(settings), id(publisher))
    with _intakes_lock:
        intake = _intakes.get(key)
        if intake is None or intake.settings is not settings or intake.publisher is not publisher:
            intake = _intakes[key] = Intake(settings, publisher)
        return intake


def stop_all() -> None:
    """Stop this process's intakes (application shutdown)."""
    pid = os.getpid()
    for key, intake in list(_intakes.items()):
        if key[0] == pid:
            intake.stop()
            del _intakes[key]
