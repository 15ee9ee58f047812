"""The admission guards with real processes: grace periods in the ledger, pause and resume.

Counts what the target saw: a grace period acts once on an alert still firing after it (a
worker killed meanwhile loses nothing) and never on one that resolved; a pause records every
alert and acts on none, and resume replays nothing.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import alert_payload
from tests.stack import OPERATOR_TOKEN, Stack, wait_for

pytestmark = [pytest.mark.redis]


def grace_stack(stack_factory: type[Stack], ledger_url: str, tmp_path: Path) -> Stack:
    hook = "http://127.0.0.1:{port}/{path}/{{{{ labels.instance }}}}"
    return stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "graceful",
                "match": ['alertname="ResponderGrace"'],
                "remediation": "http_request",
                "for": "3s",
                "params": {"url": hook.format(port="{{ annotations.port }}", path="grace")},
                "on_resolved": {
                    "remediation": "http_request",
                    "params": {"url": hook.format(port="{{ annotations.port }}", path="resolved")},
                },
            }
        ],
        overrides={"RESPONDER_DISPATCH_INTERVAL_S": "0.5"},
    )


def grace_alert(stack: Stack, instance: str, status: str = "firing") -> dict[str, Any]:
    payload = alert_payload("ResponderGrace", status=status, instance=instance)
    payload["alerts"][0]["annotations"]["port"] = str(stack.target.port)
    return payload


def test_grace_period_acts_only_if_still_firing(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """for: 3s. Resolved after 1 s: nothing runs (cancelled), its on_resolved runs. Still firing:
    it runs once, 3 s or more after it was recorded, though the worker was killed while it waited."""
    stack = grace_stack(stack_factory, ledger_url, tmp_path)
    stack.start_all()

    def run_of(instance: str, trigger: str = "alert") -> dict[str, Any] | None:
        return next(
            (
                r
                for r in stack.runs(rule="graceful")
                if r["trigger"] == trigger and instance in r["params"]["url"]
            ),
            None,
        )

    assert stack.post(grace_alert(stack, "brief")).status_code == 202
    wait_for(lambda: (run_of("brief") or {}).get("status") == "waiting", timeout=20, what="a waiting run")
    assert stack.post(grace_alert(stack, "brief", status="resolved")).status_code == 202
    brief = stack.wait_run("cancelled", timeout=20, rule="graceful")
    assert brief["skip_reason"] == "resolved" and brief["attempts"] == []
    wait_for(
        lambda: (run_of("brief", "resolved") or {}).get("status") == "succeeded",
        timeout=20,
        what="the on_resolved run to succeed",
    )

    assert stack.post(grace_alert(stack, "lasting")).status_code == 202
    wait_for(lambda: (run_of("lasting") or {}).get("status") == "waiting", timeout=20, what="a waiting run")
    worker = stack.procs.pop("worker")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert (run_of("lasting") or {})["status"] == "waiting"
    stack.start_worker("worker2")
    lasting = wait_for(
        lambda: (found := run_of("lasting")) and found["status"] == "succeeded" and found,
        timeout=40,
        what="the lasting alert's run to succeed",
    )
    started = datetime.fromisoformat(lasting["attempts"][0]["started_at"])
    assert (started - datetime.fromisoformat(lasting["created_at"])).total_seconds() >= 3
    assert lasting["not_before"] is not None
    stack.wait_reconcile_passes(2, worker="worker2")
    calls = sorted(c.path for c in stack.target.calls)
    print(f"GRACE [{ledger_url.split(':')[0]}]: target calls {calls}")
    assert calls == ["/grace/lasting", "/resolved/brief"]


def responder(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``responder`` CLI against the stack's API, as an operator would run it."""
    env = {**stack.env, "RESPONDER_API_URL": stack.base_url, "RESPONDER_API_TOKEN": OPERATOR_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_pause_records_and_skips_and_resume_replays_nothing(stack: Stack) -> None:
    """responder pause: alerts are recorded and skipped (paused), nothing runs; responder resume:
    the next alert runs, and what was skipped stays skipped."""
    paused = responder(stack, "pause", "--reason", "planned failover", "--by", "alice")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith("PAUSED since ") and "by alice: planned failover" in paused.stdout
    assert "PAUSED" in responder(stack, "pause", "--show").stdout
    for instance in ("p1", "p2", "p3"):
        assert stack.post(alert_payload("ResponderProbe", instance=instance)).status_code == 202
    wait_for(
        lambda: len([r for r in stack.runs(rule="probe-http") if r["skip_reason"] == "paused"]) == 3,
        timeout=20,
        what="three runs skipped while paused",
    )
    resumed = responder(stack, "resume", "--reason", "failover done", "--by", "bob")
    assert resumed.returncode == 0 and resumed.stdout.startswith("running (resumed "), resumed.stderr
    stack.post(alert_payload("ResponderProbe", instance="after"))
    stack.wait_run("succeeded", timeout=30, rule="probe-http")
    stack.wait_reconcile_passes(2)
    assert [c.path for c in stack.target.calls] == ["/hook/after"]
    statuses = sorted((r["status"], r["skip_reason"]) for r in stack.runs(rule="probe-http"))
    assert statuses == [("skipped", "paused")] * 3 + [("succeeded", None)]
    refused = responder(stack, "pause")
    assert refused.returncode == 2 and "--reason is required" in refused.stderr


def slot_stack(stack_factory: type[Stack], ledger_url: str, tmp_path: Path, cooldown: str = "5s") -> Stack:
    """Rules with a budget and a cooldown, and an escalation, all aimed at the target server."""
    return stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "budgeted",
                "match": ['alertname="ResponderBudget"'],
                "remediation": "http_request",
                "max_runs": {"count": 3, "per": "1h"},
                "params": {"url": "http://127.0.0.1:{target}/budget/{{ labels.instance }}"},
            },
            {
                "name": "cooled",
                "match": ['alertname="ResponderFlap"', 'instance!=""'],
                "remediation": "http_request",
                "cooldown": cooldown,
                "group_by": ["instance"],
                "params": {"url": "http://127.0.0.1:{target}/flap/{{ labels.instance }}"},
            },
        ],
        extra_config={
            "escalation": {
                "remediation": "http_request",
                "params": {
                    "url": "http://127.0.0.1:{target}/page",
                    "json": {"text": "{{ escalation.detail }}"},
                },
            }
        },
    )


def test_budget_runs_three_of_ten_and_escalates_once(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """max_runs 3 per hour, 10 matching alerts at once: 3 run, 7 are skipped (budget), and one
    escalation pages, whichever worker process decided which alert."""
    stack = slot_stack(stack_factory, ledger_url, tmp_path)
    stack.start_receiver()
    stack.start_worker(concurrency=2)
    stack.start_beat()
    with ThreadPoolExecutor(max_workers=5) as pool:
        codes = list(
            pool.map(
                lambda i: stack.post(alert_payload("ResponderBudget", instance=f"b{i}")).status_code,
                range(10),
            )
        )
    assert codes == [202] * 10

    def settled() -> list[dict[str, Any]] | None:
        runs = stack.runs(rule="budgeted", limit="50")
        done = [r for r in runs if r["status"] in ("succeeded", "skipped")]
        return runs if len(done) == 11 else None

    runs = wait_for(settled, timeout=40, what="10 alert runs and an escalation to finish")
    stack.wait_reconcile_passes(2)
    alert_runs = [r for r in runs if r["trigger"] == "alert"]
    outcomes = sorted((r["status"], r["skip_reason"] or "") for r in alert_runs)
    assert outcomes == [("skipped", "budget")] * 7 + [("succeeded", "")] * 3
    (escalation,) = [r for r in runs if r["trigger"] == "escalation"]
    assert escalation["status"] == "succeeded"
    assert escalation["parent_run_id"] in {r["id"] for r in alert_runs if r["status"] == "skipped"}
    calls = [c.path for c in stack.target.calls]
    print(
        f"BUDGET [{ledger_url.split(':')[0]}]: 10 alerts, runs {len(calls) - 1}, skipped 7, pages {calls.count('/page')}"
    )
    assert sorted(calls)[-1] == "/page" and len(calls) == 4 and calls.count("/page") == 1


def test_flapping_alert_acts_as_often_as_the_cooldown_allows(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """One instance firing and resolving every second for 12 s (a new episode each time) under a
    5 s cooldown: runs at least 5 s apart, every other episode skipped (cooldown)."""
    stack = slot_stack(stack_factory, ledger_url, tmp_path)
    stack.start_all()
    episodes = 12
    for n in range(episodes):
        firing = alert_payload("ResponderFlap", instance="flappy")
        firing["alerts"][0]["startsAt"] = f"2026-11-23T06:00:{n:02d}Z"
        assert stack.post(firing).status_code == 202
        time.sleep(0.5)
        resolved = alert_payload("ResponderFlap", status="resolved", instance="flappy")
        resolved["alerts"][0]["startsAt"] = f"2026-11-23T06:00:{n:02d}Z"
        assert stack.post(resolved).status_code == 202
        time.sleep(0.5)

    def decided() -> list[dict[str, Any]] | None:
        runs = stack.runs(rule="cooled", limit="100")
        return (
            runs
            if len(runs) == episodes and all(r["status"] not in ("queued", "running") for r in runs)
            else None
        )

    runs = wait_for(decided, timeout=30, what="every episode decided")
    stack.wait_reconcile_passes(2)
    acted = sorted(datetime.fromisoformat(r["created_at"]) for r in runs if r["skip_reason"] != "cooldown")
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(acted)]
    cooled = sum(r["skip_reason"] == "cooldown" for r in runs)
    calls = len(stack.target.calls)
    print(
        f"FLAP [{ledger_url.split(':')[0]}]: {episodes} episodes in {episodes} s, took a slot {len(acted)}, "
        f"skipped for cooldown {cooled}, target calls {calls}, gaps {[round(g, 1) for g in gaps]}"
    )
    assert 2 <= len(acted) <= 3 and all(gap >= 4.9 for gap in gaps)
    assert cooled == episodes - len(acted)
    assert calls == sum(r["status"] == "succeeded" for r in runs) <= len(acted)


def test_redis_emptied_keeps_a_cooldown_from_the_ledger(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """Redis restarted empty during a cooldown: the next episode is refused all the same (the
    state is rebuilt from the ledger first), never run unguarded."""
    stack = slot_stack(stack_factory, ledger_url, tmp_path, cooldown="10m")
    stack.start_all()
    first = alert_payload("ResponderFlap", instance="keep")
    assert stack.post(first).status_code == 202
    stack.wait_run("succeeded", timeout=30, rule="cooled")
    stack.restart_redis_empty()
    second = alert_payload("ResponderFlap", instance="keep")
    second["alerts"][0]["startsAt"] = "2026-11-23T07:00:00Z"
    assert stack.post(second).status_code == 202
    skipped = stack.wait_run("skipped", timeout=60, rule="cooled")
    assert skipped["skip_reason"] == "cooldown"
    assert stack.count("worker", "guard_state_rebuilt") >= 1
    stack.wait_reconcile_passes(2)
    assert [c.path for c in stack.target.calls] == ["/flap/keep"]


def test_breaker_shared_by_two_workers_opens_probes_once_and_closes(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """Two worker processes, one target behind one breaker (3 failures, 3 s cool-down): three
    failing calls open it (one page), the next alerts are refused; in half-open exactly one probe
    reaches the target while five other runs are refused; its success closes the breaker."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "breaking",
                "match": ['alertname="ResponderBreak"'],
                "remediation": "http_request",
                "target": "svc-restart",
                "breaker": {"failures": 3, "cool_down": "3s"},
                "params": {"url": "http://127.0.0.1:{target}/break/{{ labels.instance }}"},
            }
        ],
        extra_config={
            "escalation": {
                "remediation": "http_request",
                "params": {
                    "url": "http://127.0.0.1:{target}/page",
                    "json": {"text": "{{ escalation.detail }}"},
                },
            }
        },
        overrides={"RESPONDER_MAX_ATTEMPTS": "1"},
    )
    stack.start_receiver()
    stack.start_worker(concurrency=1)
    stack.start_worker("worker2", queues="remediations", concurrency=1)
    stack.start_beat()
    stack.target.status = 503
    stack.target.path_status["/page"] = 200  # the pager works; the service does not

    def runs() -> list[dict[str, Any]]:
        return [r for r in stack.runs(rule="breaking", limit="100") if r["trigger"] == "alert"]

    def finished() -> int:
        return len([r for r in runs() if r["status"] in ("failed", "skipped")])

    for n in range(5):  # one at a time, so that each sees the failures before it
        stack.post(alert_payload("ResponderBreak", instance=f"f{n}"))

        def past(done: int = n) -> bool:
            return finished() > done

        wait_for(past, timeout=30, what=f"run {n} to finish")
    first = sorted((r["status"], r["skip_reason"] or "") for r in runs())
    assert first == [("failed", "")] * 3 + [("skipped", "breaker_open")] * 2
    failing_calls = len([c for c in stack.target.calls if c.path.startswith("/break/")])
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    (breaker,) = httpx.get(f"{stack.base_url}/api/v1/breakers", headers=headers, timeout=10).json()[
        "breakers"
    ]
    assert (breaker["state"], breaker["failures"], breaker["target"]) == ("open", 3, "svc-restart")
    wait_for(lambda: [c.path for c in stack.target.calls].count("/page") == 1, timeout=30, what="the page")

    stack.target.status = 200
    stack.target.delay_s = 2.0  # the probe is still in flight while the others ask
    probe_after = datetime.fromisoformat(breaker["probe_after"])
    wait_for(lambda: datetime.now(probe_after.tzinfo) > probe_after, timeout=10, what="the cool-down")
    burst = alert_payload("ResponderBreak", instance="h0")
    burst["alerts"] = [alert_payload("ResponderBreak", instance=f"h{i}")["alerts"][0] for i in range(6)]
    assert stack.post(burst).status_code == 202
    wait_for(
        lambda: len([r for r in runs() if r["status"] in ("succeeded", "skipped", "failed")]) == 11,
        timeout=30,
        what="the six half-open runs to finish",
    )
    half_open = [r for r in runs() if r["params"]["url"].rsplit("/", 1)[1].startswith("h")]
    probes = [c for c in stack.target.calls if c.path.startswith("/break/h")]
    # Each process's deliveries: attempts it started, and runs it refused at the claim.
    per_worker = {
        name: stack.count(name, "attempt_started") + stack.count(name, "run_not_attempted")
        for name in ("worker", "worker2")
    }
    print(
        f"BREAKER [{ledger_url.split(':')[0]}]: failures to open 3 (failing calls {failing_calls}); "
        f"half-open runs 6, probes {len(probes)}, refused "
        f"{sum(r['skip_reason'] == 'breaker_open' for r in half_open)}; deliveries per worker {per_worker}"
    )
    assert len(probes) == 1 and all(per_worker.values())
    assert sorted(r["status"] for r in half_open) == ["skipped"] * 5 + ["succeeded"]
    stack.target.delay_s = 0.0
    stack.post(alert_payload("ResponderBreak", instance="after"))
    wait_for(
        lambda: any(c.path == "/break/after" for c in stack.target.calls),
        timeout=30,
        what="a run after closing",
    )
    (closed,) = httpx.get(f"{stack.base_url}/api/v1/breakers", headers=headers, timeout=10).json()["breakers"]
    assert (closed["state"], closed["failures"]) == ("closed", 0)
    assert failing_calls == 3 and [c.path for c in stack.target.calls].count("/page") == 1
    logged = {
        event: stack.count("worker", event) + stack.count("worker2", event)
        for event in ("breaker_opened", "breaker_half_opened", "breaker_reopened", "breaker_closed")
    }
    assert logged == {
        "breaker_opened": 1,
        "breaker_half_opened": 1,
        "breaker_reopened": 0,
        "breaker_closed": 1,
    }


def test_one_run_at_a_time_per_target_skips_or_waits(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """Two alerts at once for one target (a 3 s command) with two workers free: by default the
    second is skipped (locked) while the first acts; with lock_wait it waits its turn. Never two
    at once."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "slow-queued",
                "match": ['alertname="ResponderSlowQueued"'],
                "remediation": "run_command",
                "lock_wait": "20s",
                "params": {"command": "slow"},
            }
        ],
    )
    stack.start_receiver()
    stack.start_worker(concurrency=2)
    stack.start_beat()
    both = alert_payload("ResponderSlow", instance="a")
    both["alerts"].append(alert_payload("ResponderSlow", instance="b")["alerts"][0])
    assert stack.post(both).status_code == 202
    skipped = stack.wait_run("skipped", timeout=30, rule="probe-slow")
    assert skipped["skip_reason"] == "locked" and skipped["target"] == "slow"
    stack.wait_run("succeeded", timeout=30, rule="probe-slow")
    queued = alert_payload("ResponderSlowQueued", instance="a")
    queued["alerts"].append(alert_payload("ResponderSlowQueued", instance="b")["alerts"][0])
    assert stack.post(queued).status_code == 202
    wait_for(
        lambda: [r["status"] for r in stack.runs(rule="slow-queued")] == ["succeeded", "succeeded"],
        timeout=40,
        what="both queued runs to succeed, one after the other",
    )
    lines = stack.lines("slow")
    print(f"LOCK [{ledger_url.split(':')[0]}]: command log {lines}")
    assert lines == ["start", "done"] * 3


def test_open_breaker_survives_redis_restarted_empty(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """A breaker opens; Redis restarts with nothing in it; the next alert for that target is
    refused (breaker_open, the state rebuilt from the ledger), and the target is not called."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "fragile",
                "match": ['alertname="ResponderFragile"'],
                "remediation": "http_request",
                "target": "fragile-svc",
                "breaker": {"failures": 1, "cool_down": "10m"},
                "params": {"url": "http://127.0.0.1:{target}/fragile/{{ labels.instance }}"},
            }
        ],
        overrides={"RESPONDER_MAX_ATTEMPTS": "1"},
    )
    stack.start_all()
    stack.target.status = 503
    stack.post(alert_payload("ResponderFragile", instance="one"))
    stack.wait_run("failed", timeout=30, rule="fragile")
    stack.restart_redis_empty()
    stack.post(alert_payload("ResponderFragile", instance="two"))
    refused = stack.wait_run("skipped", timeout=60, rule="fragile")
    assert refused["skip_reason"] == "breaker_open" and refused["destructive"] is True
    assert stack.count("worker", "guard_state_rebuilt") >= 1
    stack.wait_reconcile_passes(2)
    assert [c.path for c in stack.target.calls] == ["/fragile/one"]


def test_still_firing_after_success_repeats_or_escalates(
    stack_factory: type[Stack], ledger_url: str, tmp_path: Path
) -> None:
    """The flap measured in a real loop: the service is killed again right after the restart, so
    the alert keeps firing with the same startsAt. With repeat, a second run comes 2 s later and
    (the service now staying up) the alert resolves: effective, no page. Without repeat, the run
    is judged ineffective after verify_within: one page, one failure on its breaker."""
    stack = stack_factory(
        tmp=tmp_path,
        database_url=ledger_url,
        extra_rules=[
            {
                "name": "restorer",
                "match": ['alertname="ResponderFlapFix"'],
                "remediation": "http_request",
                "repeat": {"after": "2s", "max": 2},
                "verify_within": "3s",
                "params": {"url": "http://127.0.0.1:{target}/restore/{{ labels.instance }}"},
            },
            {
                "name": "stuck",
                "match": ['alertname="ResponderStuck"'],
                "remediation": "http_request",
                "verify_within": "2s",
                "params": {"url": "http://127.0.0.1:{target}/stuck/{{ labels.instance }}"},
            },
        ],
        extra_config={
            "escalation": {
                "remediation": "http_request",
                "params": {
                    "url": "http://127.0.0.1:{target}/page",
                    "json": {"text": "{{ escalation.detail }}"},
                },
            }
        },
        overrides={"RESPONDER_DISPATCH_INTERVAL_S": "0.5"},
    )
    stack.start_all()

    def calls(prefix: str) -> list[float]:
        return [c.at for c in stack.target.calls if c.path.startswith(prefix)]

    assert stack.post(alert_payload("ResponderFlapFix", instance="svc")).status_code == 202
    wait_for(lambda: len(calls("/restore/")) == 2, timeout=30, what="the repeat run's call")
    assert stack.post(alert_payload("ResponderFlapFix", status="resolved", instance="svc")).status_code == 202
    wait_for(
        lambda: [r["verdict"] for r in stack.runs(rule="restorer") if r["repeat"] == 1] == ["effective"],
        timeout=30,
        what="the repeat to be judged effective",
    )
    restores = calls("/restore/")

    assert stack.post(alert_payload("ResponderStuck", instance="x")).status_code == 202
    stuck = wait_for(
        lambda: next((r for r in stack.runs(rule="stuck") if r["verdict"] == "ineffective"), None),
        timeout=30,
        what="the run to be judged ineffective",
    )
    wait_for(lambda: len(calls("/page")) == 1, timeout=30, what="the page")
    stack.wait_reconcile_passes(2)
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    breakers = httpx.get(f"{stack.base_url}/api/v1/breakers", headers=headers, timeout=10).json()["breakers"]
    print(
        f"REPEAT [{ledger_url.split(':')[0]}]: with repeat: calls {len(restores)}, "
        f"{restores[1] - restores[0]:.1f} s apart, pages 0; without: calls {len(calls('/stuck/'))}, "
        f"pages {len(calls('/page'))}, breaker failures {[b['failures'] for b in breakers]}"
    )
    assert len(calls("/restore/")) == 2 and restores[1] - restores[0] >= 2
    assert len(calls("/stuck/")) == 1 and len(calls("/page")) == 1
    assert [(b["target"], b["failures"], b["state"]) for b in breakers] == [(stuck["target"], 1, "closed")]
