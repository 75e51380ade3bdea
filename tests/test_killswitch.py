"""The kill switch state machine, with explicit times (no clock, no sleeps)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amqp_batch._killswitch import KillSwitch, KillSwitchState

CLOSED: KillSwitchState = "closed"
OPEN: KillSwitchState = "open"
HALF: KillSwitchState = "half_open"


def _switch(**overrides: float) -> KillSwitch:
    values = {"threshold": 0.5, "window": 10.0, "min_samples": 10, "cooldown": 30.0}
    values.update(overrides)
    return KillSwitch(
        threshold=values["threshold"],
        window=values["window"],
        min_samples=int(values["min_samples"]),
        cooldown=values["cooldown"],
    )


def test_trips_only_with_enough_samples_and_failures() -> None:
    switch = _switch()
    assert switch.record(0.0, ok=0, failed=9) is None  # 9 < min_samples
    assert switch.allows(0.0)
    transition = switch.record(1.0, ok=0, failed=1)
    assert transition is not None
    assert (transition.old, transition.new) == (CLOSED, OPEN)
    assert "10 of 10 results failed" in transition.reason
    assert not switch.allows(1.0)


def test_below_threshold_stays_closed() -> None:
    switch = _switch()
    for second in range(100):
        assert switch.record(float(second), ok=6, failed=4) is None
    assert switch.state == CLOSED


def test_old_results_leave_the_window() -> None:
    switch = _switch()
    switch.record(0.0, ok=0, failed=9)
    # 11 s later the nine failures are out of the 10 s window.
    assert switch.record(11.0, ok=0, failed=5) is None
    assert switch.state == CLOSED
    assert switch.record(12.0, ok=0, failed=5) is not None


def test_cooldown_then_one_probe_then_closed() -> None:
    switch = _switch()
    switch.record(0.0, ok=0, failed=10)
    assert switch.wait_time(5.0) == 25.0
    assert not switch.allows(29.9)
    # Results of batches that were already running while open are ignored.
    assert switch.record(10.0, ok=0, failed=100) is None
    assert switch.allows(30.0)
    assert switch.state == HALF
    switch.begin_batch(30.0)
    assert not switch.allows(30.1)  # only one probe batch
    assert math.isinf(switch.wait_time(30.1))
    transition = switch.record(31.0, ok=10, failed=0)
    assert transition is not None
    assert (transition.old, transition.new) == (HALF, CLOSED)
    assert switch.allows(31.0)
    # The window starts afresh: old failures do not count.
    assert switch.record(31.5, ok=0, failed=9) is None


def test_failed_probe_opens_again_for_another_cooldown() -> None:
    switch = _switch()
    switch.record(0.0, ok=0, failed=10)
    assert switch.allows(30.0)
    switch.begin_batch(30.0)
    transition = switch.record(30.5, ok=1, failed=9)
    assert transition is not None
    assert (transition.old, transition.new) == (HALF, OPEN)
    assert not switch.allows(60.0)
    assert switch.allows(60.5)
    states = [(t.old, t.new) for t in switch.transitions]
    assert states == [(CLOSED, OPEN), (OPEN, HALF), (HALF, OPEN), (OPEN, HALF)]


def test_a_batch_started_before_half_open_is_not_the_probe() -> None:
    switch = _switch()
    switch.record(0.0, ok=0, failed=10)
    assert switch.allows(30.0)
    assert switch.record(30.1, ok=5, failed=0) is None  # no probe began
    assert switch.state == HALF


def test_threshold_is_validated() -> None:
    with pytest.raises(ValueError, match="threshold"):
        _switch(threshold=0)


@given(
    batches=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=5, allow_nan=False),
            st.integers(0, 20),
            st.integers(0, 20),
        ),
        max_size=60,
    )
)
def test_never_allows_while_open_before_cooldown(
    batches: list[tuple[float, int, int]],
) -> None:
    """Whatever the results: while open, nothing starts before the cooldown
    ends, and at most one probe batch is out in half_open."""
    switch = _switch(cooldown=7.0)
    now = 0.0
    opened_at: float | None = None
    for step, ok, failed in batches:
        now += step
        if switch.allows(now):
            if opened_at is not None:
                assert now >= opened_at + 7.0
            probe = switch.state == HALF
            switch.begin_batch(now)
            if probe:
                assert not switch.allows(now)
        transition = switch.record(now, ok, failed)
        if transition is not None and transition.new == OPEN:
            opened_at = now
        elif transition is not None and transition.new == CLOSED:
            opened_at = None
