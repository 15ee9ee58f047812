"""The ledger's tables: alert events, runs, attempts and pauses (what must not be lost)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every database (SQLite keeps no zone, so it is stored as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, _dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the ledger."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UTCDateTime}


# Timestamps from Alertmanager: canonical RFC 3339 with nanoseconds (workers.alerts).
TIMESTAMP_LEN = 30


class AlertEvent(Base):
    """One state (firing or resolved) of one alert episode, as received."""

    __tablename__ = "alert_events"
    __table_args__ = (
        UniqueConstraint("fingerprint", "starts_at", "status", name="uq_alert_events_event_key"),
        Index("ix_alert_events_enqueued_at", "enqueued_at"),
        Index("ix_alert_events_received_at", "received_at"),
        Index("ix_alert_events_handled_at", "handled_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    starts_at: Mapped[str] = mapped_column(String(TIMESTAMP_LEN))
    status: Mapped[str] = mapped_column(String(16))
    ends_at: Mapped[str] = mapped_column(String(TIMESTAMP_LEN))
    labels: Mapped[dict[str, Any]]
    annotations: Mapped[dict[str, Any]]
    generator_url: Mapped[str] = mapped_column(Text, default="")
    receiver: Mapped[str] = mapped_column(Text, default="")
    group_key: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When handle_alert was last published, and how often (the reconciler backs off by it).
    enqueued_at: Mapped[datetime | None]
    publishes: Mapped[int] = mapped_column(Integer, default=0)
    handled_at: Mapped[datetime | None]
    matched_rules: Mapped[int | None] = mapped_column(Integer)
    # Times handle_alert started on this event; a poison event gives up after the maximum.
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # Why handling failed (the last error) or was given up.
    error: Mapped[str | None] = mapped_column(Text)
    # The webhook's trace context and correlation id (workers.tracing): its spans' parent.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSON)


class Run(Base):
    """One admitted remediation: from an alert, by hand, on schedule or as a runbook step."""

    __tablename__ = "runs"
    __table_args__ = (
        # Action at most once, for every trigger (workers.admission.dedupe_key): an alert's
        # (episode, rule), a manual run's idempotency key, a step's (parent, step).
        UniqueConstraint("dedupe_key", name="uq_runs_dedupe_key"),
        Index("ix_runs_created_at", "created_at"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_episode", "fingerprint", "starts_at"),
        Index("ix_runs_waiting", "status", "not_before"),
        Index("ix_runs_slot_at", "slot_at"),
        Index("ix_runs_verify_at", "verify_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    dedupe_key: Mapped[str] = mapped_column(String(512))
    event_id: Mapped[str | None] = mapped_column(ForeignKey("alert_events.id"))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    starts_at: Mapped[str | None] = mapped_column(String(TIMESTAMP_LEN))
    rule: Mapped[str | None] = mapped_column(String(200))
    remediation: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]]
    preflight: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timeout_s: Mapped[float] = mapped_column(Float)
    mode: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16))
    # What the remediation acts on (rendered from its declaration or the rule's `target`).
    target: Mapped[str | None] = mapped_column(String(500))
    destructive: Mapped[bool] = mapped_column(Boolean, default=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    parent_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"))
    step: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    # Why a run was skipped or cancelled: the guard that refused it (workers.admission).
    skip_reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    # A waiting run's due time (its rule's grace period): the dispatcher releases it then.
    not_before: Mapped[datetime | None]
    # Cooldown and budget (workers.guardstate): the run's cooldown group ("" for the whole rule;
    # None when no such guard applies) and when it took its slot; the ledger's copy of Redis's.
    guard_key: Mapped[str | None] = mapped_column(String(64))
    slot_at: Mapped[datetime | None]
    # Did it work? A succeeded alert run of a rule with ``repeat`` or ``verify_within`` is looked
    # at again at ``verify_at``; ``verdict`` is then effective or ineffective. ``repeat``: which
    # extra run of the episode this is (0 for the first).
    verify_at: Mapped[datetime | None]
    verdict: Mapped[str | None] = mapped_column(String(16))
    repeat: Mapped[int] = mapped_column(Integer, default=0)
    # The context of the span that made the run (workers.tracing): its attempts' parent.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # When its alert's episode resolved (the resolved event's endsAt): did the run fix it?
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # When run_remediation was last published, and how often since the last claim: a run that
    # is never claimed after the maximum is failed, not re-sent forever.
    enqueued_at: Mapped[datetime | None]
    publishes: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    attempts: Mapped[list[Attempt]] = relationship(
        back_populates="run", order_by="Attempt.number", lazy="selectin"
    )


class Attempt(Base):
    """One try at a run, counted here (a redelivered message does not bump Celery's retries)."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("run_id", "number", name="uq_attempts_run_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    number: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[str] = mapped_column(String(64))
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The lease: renewed by the worker's heartbeat; once past, the attempt may be abandoned.
    deadline_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    outcome: Mapped[str] = mapped_column(String(16))
    # What an abandoned attempt's worker reported when it finished after all (it changed nothing).
    late_outcome: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    run: Mapped[Run] = relationship(back_populates="attempts")


class Pause(Base):
    """One pause or resume of the responder, with who asked and why; the latest row is in force."""

    __tablename__ = "pauses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    paused: Mapped[bool] = mapped_column(Boolean)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class BreakerRecord(Base):
    """A circuit breaker's state as of its last transition or counted failure (Redis decides;
    this copy survives Redis losing its memory, and is what the breakers API lists)."""

    __tablename__ = "breakers"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    remediation: Mapped[str] = mapped_column(String(100))
    target: Mapped[str | None] = mapped_column(String(500))
    state: Mapped[str] = mapped_column(String(16))
    failures: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None]
    cool_down_s: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ScheduleRecord(Base):
    """A schedule of the config as beat last installed it, and its last tick (beat writes it;
    the receiver's metrics read which backups are configured and how stale they may get)."""

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    remediation: Mapped[str] = mapped_column(String(100))
    timetable: Mapped[str] = mapped_column(String(200))
    stale_after_s: Mapped[float] = mapped_column(Float)
    backup: Mapped[bool] = mapped_column(Boolean, default=False)
    # When beat first installed it: a backup that never succeeded is stale this long after it.
    since: Mapped[datetime] = mapped_column(default=utcnow)
    fired_at: Mapped[datetime | None]
    last_run_id: Mapped[str | None] = mapped_column(String(36))
    # Its last succeeded run (the runner notes it as the run's attempt closes).
    succeeded_at: Mapped[datetime | None]
    succeeded_run_id: Mapped[str | None] = mapped_column(String(36))


# The tables, for Core statements where the ORM costs more than the statement (hot paths).
EVENTS = cast(Table, AlertEvent.__table__)
RUNS = cast(Table, Run.__table__)
ATTEMPTS = cast(Table, Attempt.__table__)
PAUSES = cast(Table, Pause.__table__)
BREAKERS = cast(Table, BreakerRecord.__table__)
SCHEDULES = cast(Table, ScheduleRecord.__table__)
