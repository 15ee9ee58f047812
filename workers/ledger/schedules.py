"""The ledger's queries for schedules: what beat installed, each one's last tick, and how recent
each backup's last success is (the receiver's metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from workers.ledger.models import ATTEMPTS, SCHEDULES, utcnow


@dataclass(frozen=True)
class Installed:
    """A schedule as beat installs it."""

    name: str
    remediation: str
    timetable: str
    stale_after_s: float
    backup: bool


def sync(session: Session, schedules: Sequence[Installed]) -> None:
    """Make the table hold exactly these schedules, keeping when each was first installed."""
    names = [schedule.name for schedule in schedules]
    session.execute(delete(SCHEDULES).where(SCHEDULES.c.name.not_in(names)))
    existing = set(session.scalars(select(SCHEDULES.c.name)))
    for schedule in schedules:
        values: dict[str, Any] = {
            "remediation": schedule.remediation,
            "timetable": schedule.timetable,
            "stale_after_s": schedule.stale_after_s,
            "backup": schedule.backup,
        }
        if schedule.name in existing:
            session.execute(update(SCHEDULES).where(SCHEDULES.c.name == schedule.name).values(**values))
        else:
            session.execute(SCHEDULES.insert().values(name=schedule.name, since=utcnow(), **values))


def note_fired(session: Session, name: str, *, at: datetime, run_id: str) -> bool:
    """Record a tick of schedule ``name`` and the run it made; False when the schedule has no
    row (not recorded yet)."""
    result = session.execute(
        update(SCHEDULES).where(SCHEDULES.c.name == name).values(fired_at=at, last_run_id=run_id)
    )
    return bool(getattr(result, "rowcount", 0))


def note_succeeded(session: Session, name: str, *, at: datetime, run_id: str) -> None:
    """Record that a run of schedule ``name`` succeeded (with the attempt that closes it)."""
    session.execute(
        update(SCHEDULES).where(SCHEDULES.c.name == name).values(succeeded_at=at, succeeded_run_id=run_id)
    )


@dataclass(frozen=True)
class BackupStatus:
    """One backup schedule: since when it is installed, how old its last success may get, and
    that success's time and size (None when it never succeeded)."""

    schedule: str
    since: datetime
    stale_after_s: float
    fired_at: datetime | None
    succeeded_at: datetime | None
    size_bytes: int | None


def backups(session: Session) -> list[BackupStatus]:
    """Every installed backup schedule, with the size its last succeeded run reported."""
    found = []
    for row in session.execute(select(SCHEDULES).where(SCHEDULES.c.backup.is_(True))).all():
        size = None
        if row.succeeded_run_id is not None:
            output = session.scalar(
                select(ATTEMPTS.c.output)
                .where(ATTEMPTS.c.run_id == row.succeeded_run_id, ATTEMPTS.c.outcome == "succeeded")
                .order_by(ATTEMPTS.c.number.desc())
                .limit(1)
            )
            value = output.get("size_bytes") if isinstance(output, dict) else None
            size = int(value) if isinstance(value, int | float) else None
        found.append(
            BackupStatus(
                schedule=row.name,
                since=row.since,
                stale_after_s=row.stale_after_s,
                fired_at=row.fired_at,
                succeeded_at=row.succeeded_at,
                size_bytes=size,
            )
        )
    return found
