"""The run a handle_alert keeps and runs inline: when it may, its time limits, and what it leaves
for the reconciler (the worker's behaviour is in tests/integration/test_inline.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import cast

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from billiard.pool import soft_timeout_sighandler
from celery import Celery
from sqlalchemy.exc import OperationalError

from tests.helpers import RecordingPublisher, alert_payload, make_config
from workers import inline
from workers.alerts import WebhookPayload
from workers.guardstate import GuardState
from workers.ledger import repository
from workers.ledger.db import transaction
from workers.planner import handle_events
from workers.reconciler import reconcile
from workers.settings import Settings
from workers.tasknames import ALL_QUEUES, QUEUE_ALERTS


@pytest.fixture
def pool_process() -> Iterator[None]:
    """SIGUSR1 handled as in a prefork pool process (billiard installs it in each child)."""
    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    yield
    signal.signal(signal.SIGUSR1, previous)


def _app(*queues: str) -> Celery:
    app = Celery("inline-test", set_as_current=False)
    app.conf.task_queues = None
    app.amqp.queues.select(list(queues))
    return app


def test_only_a_pool_process_consuming_remediations_runs_inline(pool_process: None) -> None:
    assert inline.can_run_here(_app(*ALL_QUEUES))
    assert not inline.can_run_here(_app(QUEUE_ALERTS))  # --queues alerts: never a remediation
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # not billiard's: no soft limit to enforce
    assert not inline.can_run_here(_app(*ALL_QUEUES))


def test_an_offer_takes_a_run_whose_hard_limit_ends_before_the_tasks_soft_limit() -> None:
    started = time.monotonic()
    offer = inline.Offer(margin_s=15, task_soft_s=90, started=started)
    assert not offer.take("long", 75.0) and offer.run is None
    assert offer.take("short", 10.0) and offer.run == ("short", 10.0)
    late = inline.Offer(margin_s=15, task_soft_s=90, started=started - 70)
    assert not late.take("short", 10.0)  # 70 s of planning already: 10 + 15 would pass 90
    assert inline.Offer(margin_s=15, task_soft_s=None, started=started).take("any", 3600.0)


def test_the_soft_limit_raises_in_the_block(pool_process: None) -> None:
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded), inline.time_limits(soft_s=0.2, hard_s=30):
        time.sleep(10)
    assert time.monotonic() - started < 5


def test_each_block_gets_its_own_limits(pool_process: None) -> None:
    """One watchdog serves the process's blocks in turn: a long limit left behind neither
    fires later nor delays a shorter one after it."""
    with inline.time_limits(soft_s=60, hard_s=90):
        pass
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(SoftTimeLimitExceeded), inline.time_limits(soft_s=0.2, hard_s=30):
            time.sleep(10)
        assert time.monotonic() - started < 5


def test_no_limit_fires_after_the_block(pool_process: None) -> None:
    with inline.time_limits(soft_s=0.3, hard_s=0.6):
        pass
    time.sleep(1.0)  # a soft limit still armed would raise here, a hard one kill the test


def test_the_hard_limit_kills_the_process() -> None:
    """A block that outlives its soft limit (a remediation that swallowed it) is killed at the
    hard limit, as Celery's parent kills a task past its own."""
    script = textwrap.dedent(
        """
        import signal, time
        from billiard.exceptions import SoftTimeLimitExceeded
        from billiard.pool import soft_timeout_sighandler
        from workers import inline

        signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
        with inline.time_limits(soft_s=0.2, hard_s=0.6):
            try:
                time.sleep(10)
            except SoftTimeLimitExceeded:
                print("soft", flush=True)
            time.sleep(10)
        print("survived", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert done.returncode == -signal.SIGKILL
    assert "soft" in done.stdout and "survived" not in done.stdout
    assert "inline_run_hard_time_limit" in done.stdout + done.stderr


def _record(url: str, *instances: str) -> list[str]:
    payload = alert_payload("ResponderProbe")
    payload["alerts"] = [alert_payload("ResponderProbe", instance=i)["alerts"][0] for i in instances]
    with transaction(url) as session:
        recorded = repository.record_events(
            session, WebhookPayload.model_validate(payload).alerts, receiver="r", group_key="g"
        )
    return [r.event_id for r in recorded]


def test_a_kept_run_is_not_published_and_is_reconciled_if_never_claimed(sqlite_url: str) -> None:
    """The run a message keeps is not sent; if its caller dies before claiming it, the
    reconciler sends it after the redelivery delay, once."""
    settings = Settings(database_url=sqlite_url, reconcile_after_s=0, redeliver_after_s=0.2)
    publisher = RecordingPublisher(settings)
    offered: list[tuple[str, float]] = []

    def keep(run_id: str, timeout_s: float) -> bool:
        offered.append((run_id, timeout_s))
        return True

    (run_id,) = handle_events(
        event_ids=_record(sqlite_url, "one"),
        settings=settings,
        config=make_config(),
        publisher=publisher,
        keep=keep,
    )
    assert offered == [(run_id, offered[0][1])] and publisher.runs == []
    assert reconcile(settings=settings, publisher=publisher).runs == 0  # published, as far as it knows
    time.sleep(0.3)
    assert reconcile(settings=settings, publisher=publisher).runs == 1
    assert [r[0] for r in publisher.runs] == [run_id]


def test_of_several_runs_the_last_is_kept_and_the_others_sent(sqlite_url: str) -> None:
    """The others are sent, so free pool processes run them beside the one kept."""
    settings = Settings(database_url=sqlite_url)
    publisher = RecordingPublisher(settings)
    offered: list[str] = []

    def keep(run_id: str, _timeout_s: float) -> bool:
        offered.append(run_id)
        return True

    created = handle_events(
        event_ids=_record(sqlite_url, "a", "b", "c"),
        settings=settings,
        config=make_config(),
        publisher=publisher,
        keep=keep,
    )
    assert len(created) == 3 and offered == created[-1:]
    assert [r[0] for r in publisher.runs] == created[:-1]


def test_a_run_refused_by_the_offer_is_published(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url)
    publisher = RecordingPublisher(settings)
    created = handle_events(
        event_ids=_record(sqlite_url, "one"),
        settings=settings,
        config=make_config(),
        publisher=publisher,
        keep=lambda _run, _timeout: False,
    )
    assert [r[0] for r in publisher.runs] == created


def test_a_kept_run_that_cannot_finish_here_is_sent(
    sqlite_url: str, pool_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever stops the inline execution before its outcome is known (the ledger, the soft
    limit as the block ends) sends the run's message after all; its claim refuses it if the
    attempt had started."""
    from workers import runner, tasks

    settings = Settings(database_url=sqlite_url)
    publisher = RecordingPublisher(settings)
    for error in (OperationalError("claim", {}, Exception("database is locked")), SoftTimeLimitExceeded()):

        def fail(error: BaseException = error, **_: object) -> None:
            raise error

        monkeypatch.setattr(runner, "execute", fail)
        tasks._run_here(
            "run-1",
            10.0,
            task_id="task-1",
            settings=settings,
            config=make_config(),
            guards=cast(GuardState, None),
            publisher=publisher,
        )
    assert [(r[0], r[1]) for r in publisher.runs] == [("run-1", 10.0), ("run-1", 10.0)]
