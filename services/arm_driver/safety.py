"""The follower's safety rules (DESIGN.md, "Control path and safety"), as pure logic.

`FollowerSafety` decides, from commands offered and the time, which goal the arm may be sent.
It owns no I/O and reads no clock: the caller passes `now_ns`, so every rule is testable
without sleeping. It must never produce a goal outside the joint limits, a goal that moved
more than `max_step` since the previous one, or a goal from a command it rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.bus.frames import JointFrame

# Rejection reasons, a closed set (they label rdv_commands_rejected_total).
REJECT_REASONS = (
    "invalid",  # the frame itself failed validation on the bus
    "estop",
    "too_old",
    "future",
    "not_newer",
    "other_source",
    "out_of_limits",
    "device_fault",  # the arm cannot be read: nothing is applied until it can
)


@dataclass(frozen=True)
class SafetyConfig:
    limits: tuple[tuple[float, float], ...]  # (low, high) per joint, in the device's key order
    rate_hz: float = 100.0  # nominal control rate; max_step and ramp_step are per tick of it
    max_step: float = 2.0  # units per tick: at 100 Hz, 200 deg/s
    ramp_step: float = 1.0  # units per tick while (re)engaging: at 100 Hz, 100 deg/s
    ramp_done: float = 2.0  # units: the ramp ends once every joint is this close to the target
    max_command_age_s: float = 0.1
    command_timeout_s: float = 0.25

    def __post_init__(self) -> None:
        if not self.limits:
            raise ValueError("limits: at least one joint is needed")
        for low, high in self.limits:
            # An infinite limit, step or timeout would silently switch a safety rule off.
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"limits: low {low} must be below high {high}, both finite")
        for name in (
            "rate_hz",
            "max_step",
            "ramp_step",
            "ramp_done",
            "max_command_age_s",
            "command_timeout_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if not 0 < self.max_command_age_s <= self.command_timeout_s:
            raise ValueError("max_command_age_s must be positive and at most command_timeout_s")
        if self.ramp_step > self.max_step:
            raise ValueError("ramp_step must not exceed max_step: a ramp is the gentle case")

    @property
    def period_ns(self) -> int:
        return round(1e9 / self.rate_hz)


@dataclass(frozen=True)
class Step:
    goal: tuple[float, ...]
    state: str  # "waiting", "ramping", "tracking", "stale", "estop" or "fault"
    applied: JointFrame | None  # the command this step applied for the first time, if any
    tripped: bool  # the deadman tripped on this step


class FollowerSafety:
    """Gate for commands plus the goal they may move the arm to, one step at a time."""

    def __init__(self, config: SafetyConfig, start: tuple[float, ...]) -> None:
        if len(start) != len(config.limits):
            raise ValueError(f"start has {len(start)} joints, limits have {len(config.limits)}")
        self.config = config
        self.state = "waiting"
        self.goal = self._clip_to_limits(start)
        self._target: JointFrame | None = None
        self._fresh: JointFrame | None = None  # accepted, not yet applied
        self._last_accept_ns: int | None = None
        self._last_step_ns: int | None = None
        self._estop = False
        self._fault = False  # the arm cannot be read: hold the last goal, apply nothing
        self._lapsed = False  # the deadman expired with no step to notice it

    @property
    def last_applied(self) -> JointFrame | None:
        return self._target

    def offer(self, command: JointFrame, now_ns: int) -> str | None:
        """Accept `command` as the new target, or return why it is rejected."""
        config = self.config
        if self._estop:
            return "estop"
        if self._fault:
            return "device_fault"
        age_ns = now_ns - command.t
        if age_ns > config.max_command_age_s * 1e9:
            return "too_old"
        if -age_ns > config.max_command_age_s * 1e9:
            return "future"  # the sender's clock (or its offset estimate) is wrong
        latest = self._fresh or self._target
        if latest is not None and self._stream_alive(now_ns):
            # seq restarts with a new publisher; it may only take over once the old stream is
            # dead (deadman tripped), so a reordered or duplicated frame can never win.
            if command.src != latest.src:
                return "other_source"
            if command.seq <= latest.seq:
                return "not_newer"
        if len(command.pos) != len(config.limits):
            return "out_of_limits"
        for value, (low, high) in zip(command.pos, config.limits, strict=True):
            if not low <= value <= high:
                return "out_of_limits"
        if self.state in ("ramping", "tracking") and not self._stream_alive(now_ns):
            # No step ran while the stream was dead (a stalled loop): the next step must still
            # trip the deadman and re-engage with a ramp, not resume from the old goal.
            self._lapsed = True
        self._fresh = command
        self._last_accept_ns = now_ns
        return None

    def step(self, measured: tuple[float, ...], now_ns: int) -> Step:
        """Advance the goal to `now_ns`. `measured` is where the arm is, used to hold it."""
        config = self.config
        dt_ns = config.period_ns if self._last_step_ns is None else now_ns - self._last_step_ns
        self._last_step_ns = now_ns
        applied = None
        tripped = False

        if self._estop:
            if self.state != "estop":
                self.goal = self._clip_to_limits(measured)
                self.state = "estop"
            return Step(self.goal, self.state, None, False)

        if self._fault:
            # The last goal, not a measurement: the arm cannot be read, and the last goal sent is
            # within one step of where it was last seen.
            self.state = "fault"
            return Step(self.goal, self.state, None, False)

        if self._last_accept_ns is None:
            return Step(self.goal, "waiting", None, False)

        if not self._stream_alive(now_ns):
            if self.state in ("ramping", "tracking"):
                tripped = True
                self.goal = self._clip_to_limits(measured)
            self.state = "stale"
            self._fresh = None
            self._lapsed = False
            return Step(self.goal, self.state, None, tripped)

        if self._lapsed:
            self._lapsed = False
            tripped = True
            self.state = "stale"  # re-engaged below from where the arm is

        if self._fresh is not None:
            applied = self._fresh
            self._target = self._fresh
            self._fresh = None
        if self.state in ("waiting", "stale"):
            # (Re)engage from where the arm is now, which may differ from the old hold goal
            # when torque was released meanwhile.
            self.goal = self._clip_to_limits(measured)
            self.state = "ramping"

        assert self._target is not None
        per_tick = config.ramp_step if self.state == "ramping" else config.max_step
        # The allowance scales with elapsed time so that stepping on every command as well as on
        # every tick cannot exceed the velocity bound, and it never exceeds one whole tick's step.
        allowance = per_tick * min(1.0, max(0, dt_ns) / config.period_ns)
        self.goal = tuple(
            goal + min(allowance, max(-allowance, target - goal))
            for goal, target in zip(self.goal, self._target.pos, strict=True)
        )
        if self.state == "ramping":
            gap = max(abs(t - g) for t, g in zip(self._target.pos, self.goal, strict=True))
            if gap <= config.ramp_done:
                self.state = "tracking"
        return Step(self.goal, self.state, applied, tripped)

    def latch_estop(self) -> None:
        self._estop = True
        self._fresh = None
        self._lapsed = False

    def device_fault(self) -> None:
        """The arm has failed every read for too long: hold the last goal and end the stream."""
        self._fault = True
        self._fresh = None
        self._lapsed = False

    def device_ok(self) -> None:
        """Reads work again: like after a rearm, only a fresh command re-engages, with a ramp
        from where the arm is then."""
        if self._fault:
            self._fault = False
            self._target = None
            self._last_accept_ns = None
            self.state = "waiting"

    def rearm(self) -> None:
        """Clear a latched stop; the next fresh command starts a new ramp from where the arm is."""
        if self._estop:
            self._estop = False
            self._target = None
            self._last_accept_ns = None
            self.state = "waiting"

    def _stream_alive(self, now_ns: int) -> bool:
        return (
            self._last_accept_ns is not None
            and now_ns - self._last_accept_ns <= self.config.command_timeout_s * 1e9
        )

    def _clip_to_limits(self, values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(
            min(high, max(low, value))
            for value, (low, high) in zip(values, self.config.limits, strict=True)
        )
