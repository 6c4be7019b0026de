"""Unit tests for the follower's safety rules (services/arm_driver/safety.py).

Covers every rule of DESIGN.md "Control path and safety" that `FollowerSafety` enforces: the
per-tick step clamp (and its scaling when stepped faster than the tick), command age and future
bounds, the deadman, ordering by `seq` and source, joint limits, the ramp on (re)engage, the
e-stop latch, `Step.applied`, `SafetyConfig` validation, and a hypothesis property test over
random command/step sequences. Time is passed in as `now_ns`: nothing here sleeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.arm_driver.safety import REJECT_REASONS, FollowerSafety, SafetyConfig, Step
from services.bus.frames import JointFrame
from services.sim import SO101_KEYS, SO101_LIMITS, SO101_REST

Pose = tuple[float, ...]

LIMITS: tuple[tuple[float, float], ...] = tuple(SO101_LIMITS[key] for key in SO101_KEYS)
CONFIG = SafetyConfig(limits=LIMITS)  # 100 Hz, max_step 2, ramp_step 1, ramp_done 2
PERIOD = CONFIG.period_ns
MAX_AGE = round(CONFIG.max_command_age_s * 1e9)
TIMEOUT = round(CONFIG.command_timeout_s * 1e9)
T0 = 1_700_000_000_000_000_000  # ns since the epoch, like the frames' `t`
REST: Pose = tuple(SO101_REST[key] for key in SO101_KEYS)
STATES = ("waiting", "ramping", "tracking", "stale", "estop")
EPS = 1e-9


def cmd(seq: int, t: int, pos: Pose, src: str = "leader") -> JointFrame:
    return JointFrame(seq=seq, t=t, src=src, pos=tuple(pos))


def moved(pose: Pose, joint: int, delta: float) -> Pose:
    return tuple(value + delta if i == joint else value for i, value in enumerate(pose))


def change(a: Pose, b: Pose) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def clip(pose: Pose) -> Pose:
    return tuple(min(high, max(low, v)) for v, (low, high) in zip(pose, LIMITS, strict=True))


def within_limits(pose: Pose) -> bool:
    return all(low <= v <= high for v, (low, high) in zip(pose, LIMITS, strict=True))


def tracking_at(pose: Pose, now: int, src: str = "leader", seq: int = 0) -> FollowerSafety:
    """A follower engaged on a command equal to where the arm is, hence tracking at once."""
    safety = FollowerSafety(CONFIG, pose)
    assert safety.offer(cmd(seq, now, pose, src), now) is None
    step = safety.step(pose, now)
    assert step.state == "tracking"
    assert step.goal == pytest.approx(pose)
    return safety


# --- max_step: the per-tick clamp -----------------------------------------------------------------


def test_jump_of_90_degrees_moves_goal_by_max_step_per_tick() -> None:
    safety = tracking_at(REST, T0)
    target = moved(REST, 0, 90.0)
    previous = safety.goal
    changes: list[float] = []
    now = T0
    for seq in range(1, 200):
        now += PERIOD
        assert safety.offer(cmd(seq, now, target), now) is None  # keep the stream alive
        step = safety.step(REST, now)
        assert step.state == "tracking"
        assert within_limits(step.goal)
        changes.append(change(step.goal, previous))
        # Only the commanded joint moves, and only toward the target.
        assert step.goal[1:] == REST[1:]
        assert previous[0] <= step.goal[0] <= target[0]
        previous = step.goal
        if step.goal == pytest.approx(target):
            break
    assert changes[0] == pytest.approx(CONFIG.max_step)
    assert all(c <= CONFIG.max_step + EPS for c in changes)
    # 90 units at 2 per tick: 45 ticks, each a full step, none larger.
    assert len(changes) == 45
    assert changes == pytest.approx([CONFIG.max_step] * 45)


def test_stepping_at_half_period_halves_each_step() -> None:
    safety = tracking_at(REST, T0)
    target = moved(REST, 0, -90.0)
    now = T0
    previous = safety.goal
    changes: list[float] = []
    for seq in range(1, 21):
        now += PERIOD // 2
        assert safety.offer(cmd(seq, now, target), now) is None
        step = safety.step(REST, now)
        changes.append(change(step.goal, previous))
        previous = step.goal
    assert changes == pytest.approx([CONFIG.max_step / 2] * 20)
    # Velocity over any whole period stays at max_step * rate.
    for i in range(len(changes) - 1):
        assert changes[i] + changes[i + 1] <= CONFIG.max_step + EPS
    assert safety.goal[0] == pytest.approx(REST[0] - 10 * CONFIG.max_step)


def test_long_gap_between_steps_still_allows_one_tick_only() -> None:
    safety = tracking_at(REST, T0)
    target = moved(REST, 2, 50.0)
    now = T0 + 20 * PERIOD  # 200 ms: longer than a tick, shorter than the deadman
    assert safety.offer(cmd(1, now, target), now) is None
    step = safety.step(REST, now)
    assert step.state == "tracking"
    assert change(step.goal, REST) == pytest.approx(CONFIG.max_step)


def test_step_with_no_elapsed_time_does_not_move() -> None:
    safety = tracking_at(REST, T0)
    now = T0 + PERIOD
    assert safety.offer(cmd(1, now, moved(REST, 0, 30.0)), now) is None
    first = safety.step(REST, now)
    second = safety.step(REST, now)  # e.g. a command arrived and the tick fired at once
    assert change(first.goal, REST) == pytest.approx(CONFIG.max_step)
    assert second.goal == first.goal


# --- command age ----------------------------------------------------------------------------------


def test_command_older_than_max_age_is_ignored() -> None:
    safety = tracking_at(REST, T0)
    now = T0 + PERIOD
    old = cmd(1, now - MAX_AGE - 1, moved(REST, 0, 30.0))
    assert safety.offer(old, now) == "too_old"
    step = safety.step(REST, now)
    assert step.goal == pytest.approx(REST)
    assert step.applied is None
    assert safety.last_applied is not None and safety.last_applied.seq == 0


def test_command_exactly_max_age_old_is_accepted() -> None:
    safety = tracking_at(REST, T0)
    now = T0 + PERIOD
    assert safety.offer(cmd(1, now - MAX_AGE, moved(REST, 0, 30.0)), now) is None


def test_command_from_the_future_beyond_max_age_is_rejected() -> None:
    safety = tracking_at(REST, T0)
    now = T0 + PERIOD
    assert safety.offer(cmd(1, now + MAX_AGE + 1, moved(REST, 0, 30.0)), now) == "future"
    assert safety.step(REST, now).goal == pytest.approx(REST)
    # A small clock offset the other way is tolerated.
    assert safety.offer(cmd(2, now + MAX_AGE // 2, moved(REST, 0, 30.0)), now) is None


# --- deadman --------------------------------------------------------------------------------------


def test_deadman_holds_measured_position_and_trips_once() -> None:
    safety = tracking_at(REST, T0)
    target = moved(REST, 0, 40.0)
    now = T0
    for seq in range(1, 6):
        now += PERIOD
        assert safety.offer(cmd(seq, now, target), now) is None
        safety.step(REST, now)
    last_accept = now
    assert safety.goal[0] == pytest.approx(REST[0] + 5 * CONFIG.max_step)

    # The arm lags behind its goal; its gripper reads slightly beyond the limit.
    measured = (3.0, -4.0, 5.0, -6.0, 7.0, 100.5)
    step = safety.step(measured, last_accept + TIMEOUT)
    assert step.state == "tracking"  # exactly at the timeout the command is still fresh
    step = safety.step(measured, last_accept + TIMEOUT + 1)
    assert step == Step(goal=clip(measured), state="stale", applied=None, tripped=True)
    assert step.goal[5] == 100.0

    later = last_accept + TIMEOUT
    for k in range(1, 50):
        later += 7 * PERIOD
        other = (float(k), -1.0, 2.0, 3.0, 4.0, 50.0)
        step = safety.step(other, later)
        assert step.state == "stale"
        assert step.tripped is False
        assert step.goal == clip(measured)
    later += 3600 * 10**9  # an hour later, still holding
    step = safety.step(REST, later)
    assert (step.state, step.tripped, step.goal) == ("stale", False, clip(measured))


def test_rejected_commands_do_not_refresh_the_deadman() -> None:
    safety = tracking_at(REST, T0)
    trips: list[int] = []
    for k in range(1, 40):
        now = T0 + k * PERIOD
        assert safety.offer(cmd(k, now - 2 * MAX_AGE, REST), now) == "too_old"
        assert safety.offer(cmd(k, now + 2 * MAX_AGE, REST), now) == "future"
        assert safety.offer(cmd(k, now, moved(REST, 0, 500.0)), now) == "out_of_limits"
        step = safety.step(REST, now)
        if step.tripped:
            trips.append(k)
    # Only the engaging command at T0 counted: the deadman trips on the first step past 250 ms.
    assert trips == [TIMEOUT // PERIOD + 1]
    assert safety.state == "stale"


def test_deadman_before_any_step_does_not_trip_but_reports_stale() -> None:
    safety = FollowerSafety(CONFIG, REST)
    assert safety.offer(cmd(0, T0, moved(REST, 0, 30.0)), T0) is None
    step = safety.step(moved(REST, 1, 5.0), T0 + TIMEOUT + 1)
    assert step.state == "stale"
    assert step.tripped is False  # never engaged, nothing to trip
    assert step.applied is None
    assert step.goal == REST  # never moved


def test_deadman_expired_without_a_step_still_reengages_with_a_ramp() -> None:
    """A stalled control loop must not let a command after a dead gap skip the trip and ramp."""
    safety = tracking_at(REST, T0)
    far = moved(REST, 0, 60.0)
    now = T0 + TIMEOUT + 5 * PERIOD  # no step ran during the whole gap
    measured = moved(REST, 1, -10.0)  # the arm sagged meanwhile
    assert safety.offer(cmd(0, now, far, src="restarted"), now) is None
    step = safety.step(measured, now)
    assert step.tripped is True
    assert step.state == "ramping"
    assert step.applied is not None and step.applied.src == "restarted"
    assert change(step.goal, measured) <= CONFIG.ramp_step + EPS


# --- ordering and sources -------------------------------------------------------------------------


def test_reordered_and_duplicated_frames_are_not_applied() -> None:
    safety = FollowerSafety(CONFIG, REST)
    now = T0
    assert safety.offer(cmd(5, now, moved(REST, 0, 1.0)), now) is None
    # Pending (accepted, not yet stepped) commands count as the latest too.
    assert safety.offer(cmd(4, now, moved(REST, 0, -1.0)), now) == "not_newer"
    assert safety.offer(cmd(5, now, moved(REST, 0, -1.0)), now) == "not_newer"
    step = safety.step(REST, now)
    assert step.applied is not None and step.applied.seq == 5
    now += PERIOD
    assert safety.offer(cmd(4, now, moved(REST, 0, -1.0)), now) == "not_newer"
    assert safety.offer(cmd(5, now, moved(REST, 0, -1.0)), now) == "not_newer"
    assert safety.offer(cmd(6, now, moved(REST, 0, 2.0), src="intruder"), now) == "other_source"
    step = safety.step(REST, now)
    assert step.applied is None
    assert step.goal[0] == pytest.approx(REST[0] + 1.0)  # toward seq 5's target only
    assert safety.last_applied is not None and safety.last_applied.seq == 5
    assert safety.offer(cmd(6, now, moved(REST, 0, 2.0)), now) is None


@pytest.mark.parametrize("src", ["leader", "other_station"])
def test_restarted_leader_is_accepted_after_the_deadman_tripped(src: str) -> None:
    safety = tracking_at(REST, T0, seq=1000)
    trip_time = T0 + TIMEOUT + 1
    measured = moved(REST, 0, 3.0)
    assert safety.step(measured, trip_time).tripped is True

    now = trip_time + PERIOD
    far = moved(REST, 0, 45.0)
    assert safety.offer(cmd(0, now, far, src=src), now) is None  # seq restarted at 0
    step = safety.step(measured, now)
    assert step.state == "ramping"
    assert step.applied is not None and (step.applied.seq, step.applied.src) == (0, src)
    assert step.goal[0] == pytest.approx(measured[0] + CONFIG.ramp_step)
    # The new stream now owns the follower: the old one's seq is no longer comparable.
    other = "x" if src == "leader" else "leader"
    assert safety.offer(cmd(1001, now, far, src=other), now) == "other_source"


# --- joint limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("joint", range(len(SO101_KEYS)))
def test_any_joint_outside_limits_rejects_the_command(joint: int) -> None:
    safety = tracking_at(REST, T0)
    low, high = LIMITS[joint]
    now = T0 + PERIOD
    above = tuple(high + 0.01 if i == joint else v for i, v in enumerate(REST))
    below = tuple(low - 0.01 if i == joint else v for i, v in enumerate(REST))
    assert safety.offer(cmd(1, now, above), now) == "out_of_limits"
    assert safety.offer(cmd(2, now, below), now) == "out_of_limits"
    assert safety.step(REST, now).goal == REST
    at_limit = tuple(high if i == joint else v for i, v in enumerate(REST))
    assert safety.offer(cmd(3, now, at_limit), now) is None


@pytest.mark.parametrize(
    "pos",
    [
        REST[:-1],
        (*REST, 0.0),
        (math.nan, *REST[1:]),
        (math.inf, *REST[1:]),
    ],
    ids=["too_few", "too_many", "nan", "inf"],
)
def test_malformed_positions_are_out_of_limits(pos: Pose) -> None:
    safety = FollowerSafety(CONFIG, REST)
    assert safety.offer(cmd(0, T0, pos), T0) == "out_of_limits"
    assert safety.step(REST, T0).state == "waiting"


def test_goal_stays_within_limits() -> None:
    low_start = tuple(low - 10.0 for low, _ in LIMITS)
    safety = FollowerSafety(CONFIG, low_start)
    assert safety.goal == tuple(low for low, _ in LIMITS)
    high = tuple(high for _, high in LIMITS)
    now = T0
    for seq in range(400):
        assert safety.offer(cmd(seq, now, high), now) is None
        measured = tuple(low - 5.0 for low, _ in LIMITS)  # readings beyond the limits
        step = safety.step(measured, now)
        assert within_limits(step.goal)
        now += PERIOD
    assert safety.goal == pytest.approx(high)


# --- ramp on (re)engage ---------------------------------------------------------------------------


def test_first_command_far_from_the_arm_ramps_then_tracks() -> None:
    safety = FollowerSafety(CONFIG, REST)
    target = (30.0, 0.0, -20.0, 0.0, 0.0, 10.0)
    now = T0
    previous = REST
    states: list[str] = []
    for seq in range(100):
        assert safety.offer(cmd(seq, now, target), now) is None
        step = safety.step(REST, now)
        states.append(step.state)
        if step.state == "ramping":
            assert change(step.goal, previous) == pytest.approx(CONFIG.ramp_step)
            assert change(step.goal, target) > CONFIG.ramp_done
        else:
            assert step.state == "tracking"
            assert change(step.goal, previous) <= CONFIG.max_step + EPS
        previous = step.goal
        now += PERIOD
        if step.goal == pytest.approx(target):
            break
    # 30 units at 1 per tick until within 2: 28 ramping steps, the 28th already tracking.
    assert states.index("tracking") == 27
    assert set(states[:27]) == {"ramping"}
    assert set(states[27:]) == {"tracking"}
    assert len(states) == 29  # the last 2 units in one max_step tick


def test_engage_starts_from_measured_not_from_the_start_goal() -> None:
    safety = FollowerSafety(CONFIG, REST)
    measured = moved(REST, 0, 40.0)  # the arm was moved by hand since the start
    assert safety.offer(cmd(0, T0, REST), T0) is None
    step = safety.step(measured, T0)
    assert step.state == "ramping"
    assert step.goal[0] == pytest.approx(measured[0] - CONFIG.ramp_step)


def test_reengage_after_stale_ramps_from_measured_and_never_jumps() -> None:
    target = moved(REST, 0, 30.0)
    safety = tracking_at(target, T0)
    sagged = moved(moved(target, 0, -20.0), 1, -15.0)  # torque released, the arm fell
    trip = T0 + TIMEOUT + 1
    step = safety.step(sagged, trip)
    assert step.tripped and step.goal == sagged

    now = trip + 5 * PERIOD
    previous = step.goal
    for seq in range(100):
        assert safety.offer(cmd(seq, now, target, src="new"), now) is None
        step = safety.step(sagged, now)
        if seq == 0:
            assert step.state == "ramping"
            assert change(step.goal, sagged) == pytest.approx(CONFIG.ramp_step)
            assert change(step.goal, target) > 10.0  # not back at the old goal
        limit = CONFIG.ramp_step if step.state == "ramping" else CONFIG.max_step
        assert change(step.goal, previous) <= limit + EPS
        previous = step.goal
        now += PERIOD
        if step.goal == pytest.approx(target):
            break
    assert step.state == "tracking"
    assert step.goal == pytest.approx(target)


# --- e-stop ---------------------------------------------------------------------------------------


def test_estop_holds_measured_rejects_commands_until_rearmed() -> None:
    safety = tracking_at(REST, T0)
    now = T0 + PERIOD
    assert safety.offer(cmd(1, now, moved(REST, 0, 50.0)), now) is None
    safety.step(REST, now)
    assert safety.offer(cmd(2, now, moved(REST, 0, 50.0)), now) is None  # pending
    safety.latch_estop()
    assert safety.offer(cmd(3, now, moved(REST, 0, 50.0)), now) == "estop"

    measured = (1.0, 2.0, 3.0, 4.0, 5.0, -1.0)
    now += PERIOD
    step = safety.step(measured, now)
    assert step == Step(goal=clip(measured), state="estop", applied=None, tripped=False)
    for k in range(1, 40):  # well past the deadman: still estop, same goal
        now += 10 * PERIOD
        assert safety.offer(cmd(3 + k, now, REST), now) == "estop"
        step = safety.step(moved(measured, 2, float(k)), now)
        assert (step.state, step.goal, step.tripped) == ("estop", clip(measured), False)

    safety.rearm()
    now += PERIOD
    step = safety.step(measured, now)
    assert (step.state, step.goal, step.applied) == ("waiting", clip(measured), None)
    # The command pending at the latch was dropped, it does not come back after the rearm.
    now += PERIOD
    assert safety.step(measured, now).state == "waiting"

    far = moved(REST, 0, 60.0)
    assert safety.offer(cmd(0, now, far, src="anyone"), now) is None
    step = safety.step(measured, now + PERIOD)
    assert step.state == "ramping"
    assert change(step.goal, clip(measured)) == pytest.approx(CONFIG.ramp_step)


def test_estop_while_waiting_and_rearm_without_estop() -> None:
    safety = FollowerSafety(CONFIG, REST)
    safety.rearm()  # nothing latched: no effect
    assert safety.step(REST, T0).state == "waiting"
    safety.latch_estop()
    measured = moved(REST, 3, 7.0)
    assert safety.step(measured, T0 + PERIOD).goal == measured
    assert safety.state == "estop"

    tracking = tracking_at(REST, T0)
    tracking.rearm()
    assert tracking.state == "tracking"
    assert tracking.offer(cmd(0, T0, REST), T0) == "not_newer"  # stream state kept


# --- applied --------------------------------------------------------------------------------------


def test_applied_is_set_only_on_the_step_that_first_applies_a_command() -> None:
    safety = FollowerSafety(CONFIG, REST)
    assert safety.step(REST, T0).applied is None  # waiting
    first = cmd(1, T0, moved(REST, 0, 10.0))
    assert safety.offer(first, T0) is None
    assert safety.step(REST, T0 + 1).applied is first
    assert safety.step(REST, T0 + PERIOD).applied is None
    assert safety.last_applied is first

    now = T0 + 2 * PERIOD
    second, third = cmd(2, now, REST), cmd(3, now, moved(REST, 1, 1.0))
    assert safety.offer(second, now) is None
    assert safety.offer(third, now) is None
    assert safety.step(REST, now).applied is third  # only the newest is applied
    assert safety.offer(cmd(4, now - 2 * MAX_AGE, REST), now) == "too_old"
    assert safety.step(REST, now + PERIOD).applied is None
    assert safety.last_applied is third


# --- SafetyConfig validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limits": ()}, "at least one joint"),
        ({"limits": ((1.0, 1.0),)}, "must be below"),
        ({"limits": ((0.0, 1.0), (2.0, -2.0))}, "must be below"),
        ({"limits": ((math.nan, 1.0),)}, "must be below"),
        ({"rate_hz": 0.0}, "rate_hz must be positive"),
        ({"rate_hz": -100.0}, "rate_hz must be positive"),
        ({"rate_hz": math.nan}, "rate_hz must be positive"),
        ({"max_step": 0.0}, "max_step must be positive"),
        ({"ramp_step": -1.0}, "ramp_step must be positive"),
        ({"ramp_done": 0.0}, "ramp_done must be positive"),
        ({"max_command_age_s": 0.0}, "max_command_age_s"),
        ({"max_command_age_s": -0.1}, "max_command_age_s"),
        ({"command_timeout_s": 0.0}, "command_timeout_s must be positive"),
        ({"limits": ((-math.inf, 1.0),)}, "both finite"),
        ({"limits": ((0.0, math.inf),)}, "both finite"),
        ({"max_step": math.inf}, "max_step must be positive and finite"),
        ({"max_step": math.inf, "ramp_step": math.inf}, "max_step must be positive and finite"),
        ({"command_timeout_s": math.inf}, "command_timeout_s must be positive and finite"),
        ({"max_command_age_s": 0.3, "command_timeout_s": 0.25}, "at most command_timeout_s"),
        ({"max_step": 2.0, "ramp_step": 2.5}, "ramp_step must not exceed max_step"),
    ],
)
def test_safety_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"limits": LIMITS, **kwargs}
    with pytest.raises(ValueError, match=message):
        SafetyConfig(**values)  # type: ignore[arg-type]


def test_safety_config_accepts_edge_values_and_computes_period() -> None:
    config = SafetyConfig(
        limits=LIMITS, rate_hz=30.0, ramp_step=2.0, max_command_age_s=0.25, command_timeout_s=0.25
    )
    assert config.period_ns == 33_333_333
    assert CONFIG.period_ns == 10_000_000


def test_start_pose_must_match_the_joint_count() -> None:
    with pytest.raises(ValueError, match="5 joints"):
        FollowerSafety(CONFIG, REST[:5])


# --- property test --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    dt_ns: int
    seq_delta: int
    age_ns: int
    pos: Pose
    src: str


@dataclass(frozen=True)
class StepAt:
    dt_ns: int
    measured: Pose


@dataclass(frozen=True)
class Latch:
    pass


@dataclass(frozen=True)
class Rearm:
    pass


inside = st.tuples(*(st.floats(low, high) for low, high in LIMITS))
anywhere = st.tuples(*(st.floats(low - 20.0, high + 20.0) for low, high in LIMITS))
slightly_outside = st.tuples(*(st.floats(low - 2.0, high + 2.0) for low, high in LIMITS))
# Hypothesis favours small integers; mix in round tick-like spacings so time really passes.
ms50 = st.one_of(
    st.integers(0, 50_000_000),
    st.sampled_from([0, 5, 10, 10, 10, 20, 30, 50]).map(lambda ms: ms * 1_000_000),
)
ages = st.one_of(
    st.integers(-150_000_000, 150_000_000),
    st.sampled_from([0, 1, 5, 20, 50, 99, 100, 101, 140, -101, -50]).map(lambda ms: ms * 1_000_000),
)
nudges = st.tuples(*(st.floats(-3.0, 3.0) for _ in LIMITS))
KINDS = ["offer"] * 24 + ["step"] * 24 + ["latch", "rearm"]


def nudged(pose: Pose, delta: Pose) -> Pose:
    return clip(tuple(p + d for p, d in zip(pose, delta, strict=True)))


@st.composite
def scripts(draw: st.DrawFn) -> list[Offer | StepAt | Latch | Rearm]:
    """Mostly offers and steps; targets and the arm often near the previous target, so ramps end
    and the follower tracks, while far targets, rejections and gaps still occur."""
    script: list[Offer | StepAt | Latch | Rearm] = []
    target = draw(inside)
    for _ in range(draw(st.integers(10, 120))):
        kind = draw(st.sampled_from(KINDS))
        near = nudges.map(partial(nudged, target))
        if kind == "offer":
            pos = draw(st.one_of(near, near, near, inside, anywhere))
            target = clip(pos)
            offer = Offer(
                dt_ns=draw(ms50),
                seq_delta=draw(st.sampled_from([1, 1, 1, 2, 0, -1, 3, -2])),
                age_ns=draw(ages),
                pos=pos,
                src=draw(st.sampled_from(["a", "a", "a", "b"])),
            )
            script.append(offer)
        elif kind == "step":
            script.append(StepAt(draw(ms50), draw(st.one_of(near, inside, slightly_outside))))
        else:
            script.append(Latch() if kind == "latch" else Rearm())
    return script


def between(value: float, a: float, b: float) -> bool:
    return min(a, b) - EPS <= value <= max(a, b) + EPS


@settings(max_examples=250, deadline=None)
@given(start=inside, script=scripts())
def test_invariants_hold_for_any_sequence(
    start: Pose, script: list[Offer | StepAt | Latch | Rearm]
) -> None:
    safety = FollowerSafety(CONFIG, start)
    now = T0
    seq = 0
    estop = False
    last_accepted: JointFrame | None = None
    last_accept_ns: int | None = None
    accepted_since_step = False
    dead_gap = False  # a command was accepted after the stream had been dead for a while
    previous_step_ns: int | None = None
    goal = safety.goal
    assert within_limits(goal)

    for action in script:
        if isinstance(action, Offer):
            now += action.dt_ns
            seq = max(0, seq + action.seq_delta)
            frame = cmd(seq, now - action.age_ns, action.pos, action.src)
            reason = safety.offer(frame, now)
            # The rules, modelled independently: every reason that applies to the frame.
            alive = last_accept_ns is not None and now - last_accept_ns <= TIMEOUT
            applicable = {
                "estop": estop,
                "too_old": action.age_ns > MAX_AGE,
                "future": -action.age_ns > MAX_AGE,
                "other_source": alive
                and last_accepted is not None
                and frame.src != last_accepted.src,
                "not_newer": alive
                and last_accepted is not None
                and frame.src == last_accepted.src
                and frame.seq <= last_accepted.seq,
                "out_of_limits": not within_limits(frame.pos),
            }
            if any(applicable.values()):
                assert reason in REJECT_REASONS
                assert applicable[reason]
            else:
                assert reason is None
            if estop:
                assert reason == "estop"
            if reason is None:
                if last_accept_ns is not None and not alive:
                    dead_gap = True
                last_accepted, last_accept_ns, accepted_since_step = frame, now, True
        elif isinstance(action, Latch):
            safety.latch_estop()
            estop, accepted_since_step = True, False
        elif isinstance(action, Rearm):
            safety.rearm()
            if estop:
                estop, last_accept_ns = False, None
        else:
            assert isinstance(action, StepAt)
            now += action.dt_ns
            dt = CONFIG.period_ns if previous_step_ns is None else now - previous_step_ns
            previous_step_ns = now
            fraction = min(1.0, dt / CONFIG.period_ns)
            before = safety.state
            step = safety.step(action.measured, now)
            held = clip(action.measured)

            assert step.state in STATES
            assert (step.state, step.goal) == (safety.state, safety.goal)
            assert within_limits(step.goal)
            # Which state the rules demand, from the model of time and accepted commands.
            if estop:
                assert step.state == "estop"
            elif last_accept_ns is None:
                assert step.state == "waiting"
            elif now - last_accept_ns > TIMEOUT:
                assert step.state == "stale"
            else:
                assert step.state in ("ramping", "tracking")

            if step.tripped:
                assert before in ("ramping", "tracking")
            trip_hold = step.tripped and step.state == "stale"
            estop_hold = step.state == "estop" and before != "estop"
            if trip_hold or estop_hold:
                assert step.goal == held
            elif step.state in ("ramping", "tracking"):
                assert last_accepted is not None
                # A (re)engage, also right after a dead gap no step saw, starts from the arm.
                engage = before in ("waiting", "stale") or step.tripped
                if dead_gap:
                    assert engage
                base = held if engage else goal
                per_tick = CONFIG.ramp_step if engage or before == "ramping" else CONFIG.max_step
                assert change(step.goal, base) <= per_tick * fraction + EPS
                assert change(step.goal, base) <= CONFIG.max_step * fraction + EPS
                for new, old, target in zip(step.goal, base, last_accepted.pos, strict=True):
                    assert between(new, old, target)
            else:  # waiting, stale after the trip, estop after its first step: frozen
                assert step.goal == goal

            if step.applied is not None:
                assert step.applied is last_accepted
                assert accepted_since_step
                assert step.state in ("ramping", "tracking")
            elif accepted_since_step:
                assert step.state not in ("ramping", "tracking")
            accepted_since_step = dead_gap = False
            goal = step.goal


# --- device fault: the arm cannot be read -----------------------------------------------------


def test_device_fault_holds_the_last_goal_refuses_commands_and_reengages_with_a_ramp() -> None:
    safety = tracking_at(REST, T0)
    now = T0 + PERIOD
    assert safety.offer(cmd(1, now, moved(REST, 0, 1.5)), now) is None
    goal = safety.step(REST, now).goal
    assert safety.offer(cmd(2, now, moved(REST, 0, 40.0)), now) is None  # pending at the fault
    safety.device_fault()
    assert safety.offer(cmd(3, now, moved(REST, 0, 40.0)), now) == "device_fault"
    stale_reading = moved(REST, 1, 30.0)  # what the failing reads last said: not used
    for _ in range(1, 40):  # well past the deadman: still fault, the same goal, never a trip
        now += 10 * PERIOD
        step = safety.step(stale_reading, now)
        assert (step.state, step.goal, step.applied, step.tripped) == ("fault", goal, None, False)

    safety.device_ok()
    measured = moved(REST, 2, 5.0)
    now += PERIOD
    assert safety.step(measured, now).state == "waiting"  # the pending command did not return
    assert safety.offer(cmd(0, now, moved(REST, 0, 60.0), src="restarted"), now) is None
    step = safety.step(measured, now + PERIOD)
    assert step.state == "ramping"
    assert change(step.goal, measured) == pytest.approx(CONFIG.ramp_step)


def test_estop_outranks_a_device_fault_and_device_ok_without_fault_does_nothing() -> None:
    safety = tracking_at(REST, T0)
    safety.device_ok()
    assert safety.step(REST, T0 + PERIOD).state == "tracking"
    safety.device_fault()
    safety.latch_estop()
    assert safety.offer(cmd(5, T0 + PERIOD, REST), T0 + PERIOD) == "estop"
    assert safety.step(REST, T0 + 2 * PERIOD).state == "estop"
