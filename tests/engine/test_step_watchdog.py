"""The step watchdog's limit: the floor, the adaptive p99 bound, the start-up allowance for the
first steps and for steps that switch policy or move experts, and off at 0."""
from __future__ import annotations

import pytest

from server.core import step_watchdog
from server.core.step_watchdog import FIRST_STEPS, P99_FACTOR, StepWatchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(step_watchdog.time, "monotonic", c)
    return c


def run_steps(dog: StepWatchdog, clock: Clock, durations) -> None:
    for d in durations:
        dog.begin()
        clock.now += d
        dog.end()


def test_first_steps_get_the_start_up_allowance_then_the_floor(clock):
    dog = StepWatchdog(timeout_s=5, first_timeout_s=60)
    dog.begin()
    clock.now += 30
    assert dog.overdue() is None  # a first step compiling for 30 s is fine
    dog.end()
    run_steps(dog, clock, [0.01] * (FIRST_STEPS - 1))
    assert dog.limit_s() == 5
    dog.begin()
    clock.now += 4.9
    assert dog.overdue() is None
    clock.now += 0.2
    reason = dog.overdue()
    assert reason is not None and "hung" in reason and f"step {FIRST_STEPS + 1}" in reason
    dog.end()
    assert dog.overdue() is None  # no step in flight


def test_the_limit_follows_slow_steps(clock):
    dog = StepWatchdog(timeout_s=1, first_timeout_s=10)
    run_steps(dog, clock, [0.5] * 100)  # a slow machine: 0.5 s steps
    assert dog.limit_s() == pytest.approx(P99_FACTOR * 0.5)
    dog.begin()
    clock.now += P99_FACTOR * 0.5 - 0.1
    assert dog.overdue() is None
    clock.now += 0.2
    assert dog.overdue() is not None


def test_policy_switch_steps_get_the_start_up_allowance(clock):
    dog = StepWatchdog(timeout_s=1, first_timeout_s=30)
    run_steps(dog, clock, [0.01] * FIRST_STEPS)
    dog.begin()
    dog.expect_long()  # this step plans a routing switch: graphs are captured again
    clock.now += 20
    assert dog.overdue() is None
    dog.end()
    dog.begin()  # the next step waits for it (overlap): same allowance
    assert dog.limit_s() == 30
    dog.end()
    assert dog.limit_s() == 1


def test_zero_turns_it_off(clock):
    dog = StepWatchdog(timeout_s=0, first_timeout_s=0)
    run_steps(dog, clock, [0.01] * 20)
    dog.begin()
    clock.now += 1e6
    assert dog.overdue() is None
