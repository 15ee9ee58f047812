"""Config schedules: beat's entries, the tick's due time, its request, and recording a tick."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import crontab
from celery.schedules import schedule as every
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from workers.config import ResponderConfig, parse_config
from workers.ledger import schedules as ledger_schedules
from workers.ledger.db import transaction
from workers.ledger.models import Run, ScheduleRecord
from workers.ledger.repository import set_pause
from workers.publishing import Message, Publisher
from workers.schedules import beat_schedule, due_at, fire, request_for
from workers.settings import Settings
from workers.tasknames import FIRE_SCHEDULE


def _config(tmp_path: Path, **extra: Any) -> ResponderConfig:
    backup = {"database": str(tmp_path / "live.sqlite"), "directory": str(tmp_path / "b"), "prefix": "db"}
    return parse_config(
        {
            "http_allowlist": ["127.0.0.1:*"],
            "schedules": [
                {
                    "name": "nightly",
                    "cron": "15 3 * * *",
                    "stale_after": "26h",
                    "remediation": "sqlite_backup",
                    "params": backup,
                },
                {
                    "name": "hourly",
                    "every": "1h",
                    "remediation": "sqlite_backup",
                    "params": {**backup, "prefix": "h"},
                },
                {
                    "name": "notify",
                    "every": "10m",
                    "remediation": "http_request",
                    "params": {
                        "url": "http://127.0.0.1:9/x",
                        "headers": {"Authorization": {"secret": "TOKEN"}},
                    },
                },
                {
                    "name": "off",
                    "every": "1m",
                    "enabled": False,
                    "remediation": "sqlite_backup",
                    "params": backup,
                },
            ],
            **extra,
        }
    )


class _Recorder(Publisher):
    def __init__(self, settings: Settings) -> None:
        super().__init__(Celery("test", broker="memory://"), settings)
        self.sent: list[Message] = []

    def publish(self, messages: Sequence[Message]) -> None:
        self.sent.extend(messages)


def test_beat_installs_the_enabled_schedules(tmp_path: Path) -> None:
    entries = beat_schedule(Settings(), _config(tmp_path))
    assert {"schedule:nightly", "schedule:hourly", "schedule:notify"} <= set(entries)
    assert "schedule:off" not in entries
    assert entries["schedule:nightly"]["task"] == FIRE_SCHEDULE and entries["schedule:nightly"]["args"] == [
        "nightly"
    ]
    assert isinstance(entries["schedule:nightly"]["schedule"], crontab)
    assert entries["schedule:hourly"]["schedule"].run_every == timedelta(hours=1)
    assert _config(tmp_path).schedule("hourly").stale_after == 7200  # type: ignore[union-attr]


def test_a_ticks_due_time_is_the_same_on_every_try() -> None:
    """Derived from the entry's last run, not from the clock: a retried tick keeps its key."""
    last = datetime.now(UTC) - timedelta(seconds=150)
    entry = ScheduleEntry(
        name="x", task=FIRE_SCHEDULE, schedule=every(timedelta(seconds=60)), last_run_at=last
    )
    first = due_at(entry)
    assert first == (last + timedelta(seconds=60)).replace(microsecond=0)
    assert due_at(entry) == first
    entry.last_run_at = None
    assert abs((due_at(entry) - datetime.now(UTC)).total_seconds()) < 2


def test_a_ticks_request_keeps_secret_references_and_reports_errors(tmp_path: Path) -> None:
    config = _config(tmp_path)
    due = datetime(2026, 12, 5, 3, 15, tzinfo=UTC)
    request = request_for(config.schedule("notify"), config, due)  # type: ignore[arg-type]
    assert request.trigger == "schedule" and request.rule == "notify" and request.error is None
    assert request.idempotency_key == "notify:2026-12-05T03:15:00+00:00"
    assert request.params["headers"]["Authorization"] == "\ue000secret:TOKEN\ue001"
    backup = request_for(config.schedule("hourly"), config, due)  # type: ignore[arg-type]
    assert backup.target == f"{tmp_path / 'b'}/h" and backup.destructive is False and backup.timeout_s == 900
    # What load-time checks refuse can still fail at the tick (an allowlist edited since, a
    # secret that resolves to something else): recorded as a failed run, not a crash of beat.
    refused = ResponderConfig.model_validate(
        {
            "schedules": [
                {
                    "name": "bad",
                    "every": "1m",
                    "remediation": "http_request",
                    "params": {"url": "http://10.0.0.1/x"},
                }
            ]
        }
    )
    failed = request_for(refused.schedules[0], refused, due)
    assert (
        failed.error is not None and failed.error.startswith("refused:") and failed.target == "schedule:bad"
    )


def test_a_tick_is_recorded_once_and_published(
    tmp_path: Path, sqlite_url: str, spans: InMemorySpanExporter
) -> None:
    settings = Settings(database_url=sqlite_url)
    config = _config(tmp_path)
    publisher = _Recorder(settings)
    due = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
    first = fire("hourly", due, settings=settings, config=config, publisher=publisher)
    again = fire("hourly", due, settings=settings, config=config, publisher=publisher)
    assert first is not None and again is not None
    assert first.created and not again.created and again.run_id == first.run_id
    assert [m.args for m in publisher.sent] == [(first.run_id,)]
    # The tick's trace: its run keeps the context of beat's fire_schedule span, as an alert's
    # run keeps its webhook's, so the attempts are its descendants.
    [fired, *_] = [s for s in spans.get_finished_spans() if s.name == "fire_schedule"]
    assert fired.attributes is not None and fired.attributes["run.id"] == first.run_id
    assert publisher.sent[0].trace_context is not None
    assert publisher.sent[0].trace_context["traceparent"].split("-")[1] == format(
        fired.context.trace_id, "032x"
    )
    with transaction(sqlite_url) as session:
        run = session.get(Run, first.run_id)
        assert run is not None and run.status == "queued" and run.publishes == 1 and run.trigger == "schedule"
        record = session.get(ScheduleRecord, "hourly")
        assert record is not None and record.fired_at == due and record.last_run_id == first.run_id
        assert record.backup and record.stale_after_s == 7200 and record.timetable == "every 3600s"
        assert {r.name for r in session.query(ScheduleRecord)} == {"nightly", "hourly", "notify"}
        set_pause(session, paused=True, actor="test", reason="maintenance")
    paused = fire("hourly", due + timedelta(hours=1), settings=settings, config=config, publisher=publisher)
    assert paused is not None and paused.status == "skipped" and paused.reason == "paused"
    assert len(publisher.sent) == 1
    assert fire("gone", due, settings=settings, config=config, publisher=publisher) is None
    with transaction(sqlite_url) as session:
        [status] = [b for b in ledger_schedules.backups(session) if b.schedule == "hourly"]
        assert status.succeeded_at is None and status.size_bytes is None and status.stale_after_s == 7200


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [
        ({"every": "1h", "cron": "* * * * *"}, "exactly one of every and cron"),
        ({}, "exactly one of every and cron"),
        ({"cron": "0 3 * * *"}, "needs stale_after"),
        ({"cron": "0 3 * *", "stale_after": "1d"}, "five fields"),
        ({"every": "1h", "name": "probe"}, "already the name of a rule or schedule"),
        # No alert here: a template over one fails when the config is loaded, not at a tick.
        ({"every": "1h", "params": {"url": "http://x/{{ labels.instance }}"}}, "params.url"),
        (
            {"every": "1h", "params": {"url": "http://x/", "headers": {"A": {"secret": "bad name"}}}},
            "bad secret name",
        ),
    ],
)
def test_schedule_problems_are_reported(schedule: dict[str, Any], problem: str) -> None:
    raw = {
        "rules": [
            {
                "name": "probe",
                "match": ['a="b"'],
                "remediation": "http_request",
                "params": {"url": "http://x/"},
            }
        ],
        "schedules": [
            {"name": "s", "remediation": "http_request", "params": {"url": "http://x/"}, **schedule}
        ],
    }
    with pytest.raises(Exception, match=problem):
        parse_config(raw)
