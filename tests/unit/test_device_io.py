"""DeviceReader (services/arm_driver/device_io.py): a failed read of the arm is retried within the
tick's budget, never beyond it; a failure that lasts `fault_after_s` is a fault until a read
works. Time is a fake clock that each read advances by what that read "took"."""

from __future__ import annotations

import pytest

from services.arm_driver.device_io import DeviceReader

KEYS = ("a.pos", "b.pos")


class FlakyArm:
    """Each read takes `took_s` on the fake clock, then fails if the script says so."""

    def __init__(self, script: list[str], took_s: float = 0.001) -> None:
        self.now = 0.0
        self.script = list(script)  # "ok", "corrupt" (fails fast), "timeout" (fails slowly)
        self.took_s = took_s
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def read(self) -> dict[str, float]:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else "ok"
        self.now += 0.05 if outcome == "timeout" else self.took_s
        if outcome == "corrupt":
            raise ConnectionError("Failed to sync read: Incorrect status packet!")
        if outcome == "timeout":
            raise ConnectionError("Failed to sync read: There is no status packet!")
        if outcome == "nan":
            return {"a.pos": float("nan"), "b.pos": 0.0}
        return {"a.pos": 1.0, "b.pos": 2.0, "ignored.pos": 3.0}


def reader_for(arm: FlakyArm, fault_after_s: float = 0.25) -> DeviceReader:
    return DeviceReader(arm.read, KEYS, fault_after_s, "test", clock=arm.clock)


def test_a_fast_failure_is_retried_within_the_tick() -> None:
    arm = FlakyArm(["corrupt", "corrupt", "ok"])
    reader = reader_for(arm)
    assert reader.read(budget_s=0.01) == (1.0, 2.0)
    assert (arm.calls, reader.errors, reader.retries, reader.failed_reads) == (3, 2, 2, 0)
    assert reader.state == "ok"


def test_a_slow_failure_is_not_retried_past_the_budget() -> None:
    arm = FlakyArm(["timeout", "ok"])
    reader = reader_for(arm)
    assert reader.read(budget_s=0.01) is None  # the 50 ms timeout already used the tick
    assert (arm.calls, reader.retries, reader.failed_reads, reader.state) == (1, 0, 1, "retrying")
    assert reader.read(budget_s=0.01) == (1.0, 2.0)
    assert reader.state == "ok"


def test_attempts_are_capped_even_when_failures_take_no_time() -> None:
    arm = FlakyArm(["corrupt"] * 10, took_s=0.0)
    reader = DeviceReader(arm.read, KEYS, 0.25, "test", max_attempts=4, clock=arm.clock)
    assert reader.read(budget_s=1.0) is None
    assert arm.calls == 4


def test_non_finite_and_missing_values_count_as_failed_reads() -> None:
    arm = FlakyArm(["nan", "ok"])
    reader = reader_for(arm)
    assert reader.read(budget_s=0.01) == (1.0, 2.0)
    assert reader.errors == 1
    broken = DeviceReader(lambda: {"a.pos": 1.0}, KEYS, 0.25, "test", clock=arm.clock)
    assert broken.read(budget_s=0.0) is None


def test_fault_after_a_lasting_failure_and_cleared_by_a_good_read() -> None:
    arm = FlakyArm(["timeout"] * 100)
    reader = reader_for(arm, fault_after_s=0.25)
    states = []
    while arm.script:
        assert reader.read(budget_s=0.01) is None
        states.append(reader.state)
        arm.now += 0.01  # the rest of the tick
        if reader.state == "fault":
            break
    # 50 ms per failed tick + 10 ms: the fault comes with the first read at or after 250 ms.
    assert states[:-1] == ["retrying"] * (len(states) - 1) and states[-1] == "fault"
    assert 0.25 <= arm.now <= 0.25 + 0.06 + 0.01
    assert reader.faults == 1
    reader.read(budget_s=0.01)
    assert reader.faults == 1, "a fault is counted once, however long it lasts"
    arm.script = []
    assert reader.read(budget_s=0.01) == (1.0, 2.0)
    assert reader.state == "ok"


def test_fault_after_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DeviceReader(lambda: {}, KEYS, 0.0, "test")
