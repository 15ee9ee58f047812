"""The beat schedule, the config's schedules, and the scheduler that keeps beat alive through
Redis outages.

A config schedule's tick is written to the ledger by beat itself, not sent as a message: beat
admits the run (``workers.admission``, trigger ``schedule``) in one transaction, then publishes
it. So a tick is either recorded or retried: when the ledger cannot take it, the entry is not
advanced and the next tick tries the same one again. The run's dedupe key holds the tick's due
time, computed from the entry's last run (the same on every retry), so a tick is admitted at
most once; a lost message is re-sent by the reconciler like any queued run's. A run acts on
its remediation's target (a backup set) or on ``schedule:NAME``: a tick that finds the previous
run still going is skipped (``locked``), so runs of a schedule never overlap.

Exactly one beat is active: celery-redbeat holds a Redis lock. Out of the box it exits when
Redis goes away (``ConnectionError``) or comes back empty (``LockNotOwnedError`` on the next
lock extension), and with it goes the reconciler, so nothing is swept until someone restarts
it. ``ResilientRedBeatScheduler`` rides that out: while Redis is unreachable it logs and ticks
again shortly; when its lock is gone it takes the lock again (waiting, as a standby does, if
another beat holds it now) and reinstalls the schedule, which an emptied Redis lost too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery.beat import ScheduleEntry
from celery.schedules import BaseSchedule
from celery.schedules import schedule as every
from pydantic import ValidationError
from redbeat import RedBeatScheduler
from redbeat.schedulers import acquire_distributed_beat_lock
from redis.exceptions import LockError
from sqlalchemy.exc import SQLAlchemyError

from remediations import ResponderError, get_remediation
from remediations.backup import BACKUPS
from workers import telemetry, tracing
from workers.admission import Admission, RunRequest, admit
from workers.config import ResponderConfig, Schedule, cached_config, crontab_of
from workers.ledger import schedules as ledger_schedules
from workers.ledger.db import transaction
from workers.ledger.states import RunStatus
from workers.planner import target_of, validation_message
from workers.publishing import Publisher, publish_runs
from workers.settings import Settings, get_settings
from workers.tasknames import DISPATCH, FIRE_SCHEDULE, QUEUE_MAINTENANCE, RECONCILE
from workers.templating import RenderError, render_value, renderer, template_context

log = telemetry.get_logger(__name__)
OUTAGE_TICK_S = 2.0
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


# The names of the config's schedules among beat's entries.
ENTRY_PREFIX = "schedule:"


def beat_schedule(settings: Settings, config: ResponderConfig | None = None) -> dict[str, dict[str, Any]]:
    """Periodic jobs: the reconciler every ``reconcile_interval_s``, the dispatcher of waiting
    runs every ``dispatch_interval_s``, and each enabled schedule of ``config``."""
    entries = {
        f"{ENTRY_PREFIX}{schedule.name}": {
            "task": FIRE_SCHEDULE,
            "schedule": timetable_of(schedule),
            "args": [schedule.name],
        }
        for schedule in (config.schedules if config is not None else [])
        if schedule.enabled
    }
    return entries | {
        "reconcile": {
            "task": RECONCILE,
            "schedule": settings.reconcile_interval_s,
            # A reconcile that waited longer than its interval is superseded by the next one.
            "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.reconcile_interval_s * 3},
        },
        "dispatch": {
            "task": DISPATCH,
            "schedule": settings.dispatch_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.dispatch_interval_s * 3},
        },
    }


def timetable_of(schedule: Schedule) -> BaseSchedule:
    """Celery's schedule for a config schedule (``every`` or ``cron``, in UTC)."""
    if schedule.every_s is not None:
        return every(run_every=timedelta(seconds=schedule.every_s))
    return crontab_of(schedule.cron or "")


def due_at(entry: ScheduleEntry) -> datetime:
    """When a due entry's tick was due: the same on every try until the entry is advanced (its
    last run plus the interval, or the cron time after its last run); now for a first run."""
    now = datetime.now(UTC)
    if entry.last_run_at is None or entry.schedule is None:
        return now.replace(microsecond=0)
    remaining: timedelta = entry.schedule.remaining_estimate(entry.last_run_at)
    return min(now, now + remaining).replace(microsecond=0)


def request_for(schedule: Schedule, config: ResponderConfig, due: datetime) -> RunRequest:
    """The admission request of one tick: params rendered (secrets become references) and
    validated, or the error the run is recorded failed with."""
    definition = get_remediation(schedule.remediation)
    base: dict[str, Any] = {
        "trigger": "schedule",
        "remediation": schedule.remediation,
        "rule": schedule.name,
        "mode": schedule.mode,
        "destructive": definition.destructive,
        "idempotency_key": f"{schedule.name}:{due.isoformat()}",
        "target": f"schedule:{schedule.name}",
    }
    try:
        context = template_context(None)
        params = definition.validate(render_value(schedule.params, context))
        preflight = definition.preflight(config.context(render=renderer(context)), params)
        target = target_of(definition.target, params, context)
    except RenderError as exc:
        return RunRequest(**base, params={}, error=f"render: {exc}")
    except ValidationError as exc:
        return RunRequest(**base, params={}, error=f"invalid params: {validation_message(exc)}")
    except ResponderError as exc:
        return RunRequest(**base, params={}, error=f"refused: {exc}")
    return RunRequest(
        **{**base, "target": target or base["target"]},
        params=params.model_dump(mode="json", by_alias=True),
        preflight=preflight.details,
        timeout_s=preflight.timeout,
    )


def installed(config: ResponderConfig) -> list[ledger_schedules.Installed]:
    """The config's enabled schedules as the ledger keeps them."""
    return [
        ledger_schedules.Installed(
            name=schedule.name,
            remediation=schedule.remediation,
            timetable=schedule.timetable,
            stale_after_s=schedule.stale_after,
            backup=schedule.remediation in BACKUPS,
        )
        for schedule in config.schedules
        if schedule.enabled
    ]


def fire(
    name: str, due: datetime, *, settings: Settings, config: ResponderConfig, publisher: Publisher
) -> Admission | None:
    """Record the tick of schedule ``name`` due at ``due`` as a run, then publish it if queued.

    Raises the ledger's error (the tick is then tried again); None for a schedule no longer in
    the config (an entry beat has not dropped yet).
    """
    schedule = config.schedule(name)
    if schedule is None or not schedule.enabled:
        log.warning("schedule_unknown", schedule=name)
        return None
    with tracing.tracer.start_as_current_span(
        "fire_schedule", attributes={"schedule": name, "due_at": due.isoformat()}
    ) as span:
        request = request_for(schedule, config, due)
        with transaction(settings.database_url) as session:
            [admission] = admit(session, [request], published=True)
            if admission.created and not ledger_schedules.note_fired(
                session, name, at=due, run_id=admission.run_id
            ):
                # Beat found the ledger down when it installed the schedules: record them now.
                ledger_schedules.sync(session, installed(config))
                ledger_schedules.note_fired(session, name, at=due, run_id=admission.run_id)
        span.set_attribute("run.id", admission.run_id)
        if admission.created and admission.status == RunStatus.QUEUED:
            publish_runs(
                [(admission.run_id, admission.timeout_s)],
                settings=settings,
                publisher=publisher,
                marked=True,
                traces={admission.run_id: admission.trace_context},
            )
    log.info(
        "schedule_fired",
        schedule=name,
        due_at=due.isoformat(),
        run_id=admission.run_id,
        status=admission.status.value,
        reason=admission.reason,
        created=admission.created,
    )
    return admission


class ResilientRedBeatScheduler(RedBeatScheduler):  # type: ignore[misc]
    """celery-redbeat's scheduler, surviving Redis outages and restarts (see the module doc)."""

    _needs_setup = False

    def setup_schedule(self) -> None:
        """Install the static schedule; if Redis is down, do it on a later tick."""
        try:
            super().setup_schedule()
            self._needs_setup = False
        except _REDIS_DOWN as exc:
            self._needs_setup = True
            log.warning("beat_redis_unavailable", during="setup", error_type=type(exc).__name__)
        self._record_schedules()

    def _record_schedules(self) -> None:
        """Write the config's schedules to the ledger (the receiver's backup metrics read them)."""
        settings = get_settings()
        try:
            with transaction(settings.database_url) as session:
                ledger_schedules.sync(session, installed(cached_config(settings.config)))
        except SQLAlchemyError as exc:  # the first tick of each schedule writes them again
            log.warning("schedules_not_recorded", error_type=type(exc).__name__)

    def apply_async(
        self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        """Send a due entry's message; a config schedule's tick is recorded in the ledger instead
        (``fire``), and the entry advanced only once it is."""
        if entry.task != FIRE_SCHEDULE:
            return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        settings = get_settings()
        name = str((entry.args or ("",))[0])
        try:
            fire(
                name,
                due_at(entry),
                settings=settings,
                config=cached_config(settings.config),
                publisher=Publisher(self.app, settings),
            )
        except SQLAlchemyError as exc:
            # Not advanced: the same tick is tried again on the next pass.
            log.error("schedule_not_recorded", schedule=name, error_type=type(exc).__name__)  # noqa: TRY400
            return None
        if advance:
            self.reserve(entry)
        return None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One scheduling pass; never raises for a Redis outage or a lost lock."""
        try:
            if self.lock_key and getattr(self, "lock", None) is None:
                self._acquire()
            if self._needs_setup:
                super().setup_schedule()
                self._needs_setup = False
                log.info("beat_schedule_installed")
            interval: float = super().tick(*args, **kwargs)
            return interval
        except LockError as exc:
            # The lock key is gone (Redis restarted empty) or another beat holds it now.
            log.warning("beat_lock_lost", error_type=type(exc).__name__)
            self.lock = None
            self._needs_setup = True
            return 0.0
        except _REDIS_DOWN as exc:
            log.warning("beat_redis_unavailable", during="tick", error_type=type(exc).__name__)
            return OUTAGE_TICK_S

    def _acquire(self) -> None:
        """Take the beat lock (blocking while another beat holds it), as redbeat does at start."""

        class _Sender:
            scheduler = self

        acquire_distributed_beat_lock(sender=_Sender())
        log.info("beat_lock_acquired")
