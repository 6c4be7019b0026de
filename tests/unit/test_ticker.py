"""Unit tests for the fixed-rate Ticker (services/arm_driver/ticker.py), on an injected fake clock.

Covers absolute deadlines (no drift however late each tick runs), overruns counted and skipped
when a tick runs a whole period or more late, `remaining_s`/`due`, `sleep`, and rate validation.
Nothing here sleeps for real; the fake clock only moves when a test moves it.
"""

from __future__ import annotations

import random

import pytest

from services.arm_driver import ticker as ticker_module
from services.arm_driver.ticker import Ticker

START = 1000.0
# 8 Hz: a period of 0.125 s is exact in binary, so deadline arithmetic below is exact too.
RATE = 8.0
P = 1.0 / RATE


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def next_deadline(ticker: Ticker, clock: FakeClock, not_after: float) -> float:
    """The ticker's next deadline, read through remaining_s at a time known to be before it."""
    saved = clock.now
    clock.now = not_after
    deadline = not_after + ticker.remaining_s()
    clock.now = saved
    return deadline


def test_rate_must_be_positive() -> None:
    for rate in (0.0, -1.0):
        with pytest.raises(ValueError, match="rate_hz"):
            Ticker(rate, clock=FakeClock())


def test_first_deadline_is_now_then_one_period_apart() -> None:
    clock = FakeClock()
    ticker = Ticker(RATE, clock=clock)
    assert ticker.period_s == P
    assert ticker.due()
    assert ticker.remaining_s() == 0.0
    ticker.advance()
    assert not ticker.due()
    assert ticker.remaining_s() == P


def test_remaining_and_due_around_a_deadline() -> None:
    clock = FakeClock()
    ticker = Ticker(RATE, clock=clock)
    ticker.advance()  # next deadline: START + P
    clock.now = START + P - 0.03125
    assert not ticker.due()
    assert ticker.remaining_s() == 0.03125
    clock.now = START + P
    assert ticker.due()
    assert ticker.remaining_s() == 0.0
    clock.now = START + P + 0.0625
    assert ticker.due()
    assert ticker.remaining_s() == 0.0  # never negative


def test_deadlines_are_absolute_despite_jitter() -> None:
    """Every tick runs late by a random fraction of a period; deadlines stay on the grid."""
    rng = random.Random(1234)
    rate = 100.0  # 0.01 s is not exact in binary: also checks that rounding does not add up
    period = 1.0 / rate
    clock = FakeClock()
    ticker = Ticker(rate, clock=clock)
    ticks = 10_000
    for n in range(1, ticks + 1):
        # This tick's work ends somewhere in the period after its deadline, never a whole one late.
        clock.now = START + (n - 1) * period + rng.uniform(0.0, 0.95) * period
        ticker.advance()
        if n % 997 == 0:
            expected = START + n * period
            assert next_deadline(ticker, clock, clock.now) == pytest.approx(expected, abs=1e-9)
    assert ticker.overruns == 0
    deadline = next_deadline(ticker, clock, clock.now)
    assert deadline == pytest.approx(START + ticks * period, abs=1e-9)


def test_late_by_less_than_a_period_is_not_an_overrun() -> None:
    clock = FakeClock()
    ticker = Ticker(RATE, clock=clock)
    clock.now = START + 1.5 * P  # tick 0's work ran long, past deadline 1 but not deadline 2
    ticker.advance()
    assert ticker.overruns == 0
    assert ticker.due()  # deadline 1 is kept: run it at once, late
    assert next_deadline(ticker, clock, START) == START + P
    ticker.advance()
    assert not ticker.due()
    assert ticker.remaining_s() == 0.5 * P  # back on the grid: deadline 2


def test_a_whole_period_late_counts_and_skips_the_missed_deadline() -> None:
    clock = FakeClock()
    ticker = Ticker(RATE, clock=clock)
    clock.now = START + 2 * P  # deadline 1 was missed by exactly one whole period
    ticker.advance()
    assert ticker.overruns == 1
    assert next_deadline(ticker, clock, START) == START + 2 * P
    assert ticker.due()


def test_long_stall_skips_missed_deadlines_instead_of_bursting() -> None:
    clock = FakeClock()
    ticker = Ticker(RATE, clock=clock)
    clock.now = START + 10.5 * P
    ticker.advance()
    assert ticker.overruns == 9  # deadlines 1..9 are more than a period in the past
    # One tick runs now (deadline 10, half a period late), then the schedule is back on the grid.
    assert ticker.due()
    ticker.advance()
    assert not ticker.due()
    assert ticker.remaining_s() == 0.5 * P
    assert ticker.overruns == 9
    # Later deadlines are still START + n * P.
    clock.now = START + 11 * P
    assert ticker.due()
    ticker.advance()
    assert next_deadline(ticker, clock, clock.now) == START + 12 * P


def test_overruns_accumulate_over_several_stalls() -> None:
    clock = FakeClock()
    ticker = Ticker(RATE, clock=clock)
    clock.now = START + 3.5 * P
    ticker.advance()  # misses deadlines 1 and 2
    clock.now = START + 3.75 * P
    ticker.advance()  # runs deadline 3 late, on time for 4
    clock.now = START + 7.25 * P
    ticker.advance()  # at deadline 4's tick: misses 5 and 6
    assert ticker.overruns == 4
    assert ticker.due()  # deadline 7, a quarter period late
    assert next_deadline(ticker, clock, START) == START + 7 * P


def test_sleep_waits_for_the_deadline_then_advances(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    slept: list[float] = []

    def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(ticker_module.time, "sleep", fake_sleep)
    ticker = Ticker(RATE, clock=clock)
    ticker.sleep()  # first deadline is now: no sleep, just advance
    assert slept == []
    clock.now += 0.25 * P  # some work
    ticker.sleep()
    assert slept == [0.75 * P]
    assert clock.now == START + P
    assert ticker.remaining_s() == P
    clock.now += 1.5 * P  # a tick that ran too long: no sleep, no overrun yet
    ticker.sleep()
    assert slept == [0.75 * P]
    assert ticker.overruns == 0
