"""The worker health state machine: out after failures, back after successes, slower when flapping."""

from __future__ import annotations

from rbees.orchestrator.health_poller import HealthRules, HealthState, observe

RULES = HealthRules(fail_threshold=2, recover_threshold=2, flap_window_s=60)


def run(state: HealthState, results: str, start: float = 0.0) -> list[bool]:
    """Feed ``results`` ("o" good, "x" failed), one per second; return ``up`` after each."""
    out = []
    for i, r in enumerate(results):
        state = observe(state, None if r == "o" else "down", start + i, RULES)
        out.append(state.up)
    return out


def test_one_failure_is_tolerated_two_take_it_out() -> None:
    assert run(HealthState(up=True), "xoxxoo") == [True, True, True, False, False, True]


def test_flapping_worker_needs_longer_to_come_back_each_time() -> None:
    state = HealthState(up=True)
    ups = run(state, "xx" + "oo" + "xx" + "oooo" + "xx" + "oooooooo")
    # first recovery after 2 good polls, second after 4, third after 8
    assert ups[:4] == [True, False, False, True]
    assert ups[4:10] == [True, False, False, False, False, True]
    assert ups[10:] == [True, False] + [False] * 7 + [True]


def test_old_flaps_are_forgotten_after_the_window() -> None:
    state = HealthState(up=True)
    for t, r in enumerate("xxooxx"):
        state = observe(state, None if r == "o" else "down", t, RULES)
    assert not state.up and len(state.downs) == 2
    state = observe(state, None, 1000.0, RULES)
    state = observe(state, None, 1001.0, RULES)
    assert state.up


def test_a_worker_remembered_from_a_previous_run_joins_on_its_first_good_poll() -> None:
    state = observe(HealthState(up=False, unpolled=True), None, 0.0, RULES)
    assert state.up
    state = observe(HealthState(up=False, unpolled=True), "refused", 0.0, RULES)
    assert not state.up and not state.unpolled
