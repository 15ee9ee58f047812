"""The run state machine: one table, final states final, every status reachable."""

from __future__ import annotations

from workers.ledger.states import FINISHED, INITIAL, RUN_TRANSITIONS, RunStatus, allowed, sources


def test_final_states_have_no_way_out() -> None:
    """succeeded, failed, skipped and cancelled are final."""
    assert {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.SKIPPED, RunStatus.CANCELLED} == FINISHED
    assert not any(allowed(final, to) for final in FINISHED for to in RunStatus)


def test_every_status_is_reachable_from_admission() -> None:
    """Every status can be reached from one a run is admitted in."""
    seen = set(INITIAL)
    frontier = list(INITIAL)
    while frontier:
        for nxt in RUN_TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(RunStatus)


def test_sources_invert_the_table() -> None:
    """sources(x) is exactly the set of statuses allowed to move to x."""
    assert sources(RunStatus.RUNNING) == {RunStatus.QUEUED}
    assert sources(RunStatus.CANCELLED) == {RunStatus.WAITING, RunStatus.QUEUED, RunStatus.RUNNING}
    assert sources(RunStatus.QUEUED) - {RunStatus.RUNNING} == {RunStatus.WAITING}
