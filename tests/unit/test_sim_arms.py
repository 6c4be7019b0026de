"""Unit tests for the simulated SO101 leader and follower (services/sim).

All timing runs on an injected fake clock; these tests must never sleep for real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sim import (
    SO101_JOINTS,
    SO101_KEYS,
    SO101_LIMITS,
    SO101_REST,
    DeviceAlreadyConnectedError,
    DeviceNotConnectedError,
    SimFollowerConfig,
    SimLeaderConfig,
    SimSO101Follower,
    SimSO101Leader,
    read_trajectory,
    record_trajectory,
    write_trajectory,
)
from services.sim.leader import SweepMotion


class FakeClock:
    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make_follower(clock: FakeClock, **overrides: Any) -> SimSO101Follower:
    config = SimFollowerConfig(**{"noise_std": 0.0, "seed": 0, **overrides})
    follower = SimSO101Follower(config, clock=clock)
    follower.connect()
    return follower


def make_leader(clock: FakeClock, **overrides: Any) -> SimSO101Leader:
    leader = SimSO101Leader(SimLeaderConfig(**overrides), clock=clock)
    leader.connect()
    return leader


def within_limits(pose: dict[str, float]) -> bool:
    return all(SO101_LIMITS[k][0] <= pose[k] <= SO101_LIMITS[k][1] for k in SO101_KEYS)


def sample(t: float, value: float) -> dict[str, float]:
    return {"t": t, **{key: value for key in SO101_KEYS}}


# --- constants and device interface ---------------------------------------------------------


def test_keys_follow_lerobot_order() -> None:
    assert SO101_KEYS == (
        "shoulder_pan.pos",
        "shoulder_lift.pos",
        "elbow_flex.pos",
        "wrist_flex.pos",
        "wrist_roll.pos",
        "gripper.pos",
    )
    assert tuple(k.removesuffix(".pos") for k in SO101_KEYS) == SO101_JOINTS
    assert tuple(SO101_LIMITS) == SO101_KEYS
    assert tuple(SO101_REST) == SO101_KEYS
    assert within_limits(SO101_REST)


def test_features_and_returned_dicts_use_so101_keys_in_order() -> None:
    clock = FakeClock()
    follower = make_follower(clock, noise_std=0.05)
    leader = make_leader(clock)
    expected = {key: float for key in SO101_KEYS}
    assert follower.observation_features == expected
    assert follower.action_features == expected
    assert leader.action_features == expected
    assert leader.feedback_features == {}
    for result in (follower.get_observation(), follower.true_position(), leader.get_action()):
        assert tuple(result) == SO101_KEYS
        assert all(type(value) is float for value in result.values())


def test_follower_connect_and_disconnect_errors() -> None:
    clock = FakeClock()
    follower = SimSO101Follower(SimFollowerConfig(), clock=clock)
    assert not follower.is_connected
    assert follower.is_calibrated
    assert follower.name == "sim_so101_follower"
    assert follower.id == "sim_follower"
    for call in (
        follower.get_observation,
        lambda: follower.send_action({}),
        lambda: follower.set_torque(True),
        follower.disconnect,
    ):
        with pytest.raises(DeviceNotConnectedError):
            call()
    follower.connect()
    assert follower.is_connected
    assert follower.torque_enabled
    with pytest.raises(DeviceAlreadyConnectedError):
        follower.connect()
    follower.disconnect()
    assert not follower.is_connected
    assert not follower.torque_enabled
    follower.connect(calibrate=False)
    assert follower.is_connected


def test_leader_connect_and_disconnect_errors() -> None:
    clock = FakeClock()
    leader = SimSO101Leader(SimLeaderConfig(), clock=clock)
    assert not leader.is_connected
    assert leader.is_calibrated
    assert leader.name == "sim_so101_leader"
    assert leader.id == "sim_leader"
    with pytest.raises(DeviceNotConnectedError):
        leader.get_action()
    with pytest.raises(DeviceNotConnectedError):
        leader.disconnect()
    leader.connect()
    with pytest.raises(DeviceAlreadyConnectedError):
        leader.connect()
    leader.send_feedback({})
    leader.disconnect()
    with pytest.raises(DeviceNotConnectedError):
        leader.get_action()


def test_device_errors_are_connection_errors() -> None:
    assert issubclass(DeviceNotConnectedError, ConnectionError)
    assert issubclass(DeviceAlreadyConnectedError, ConnectionError)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_velocity": 0.0},
        {"max_velocity": math.nan},
        {"lag_tau_s": -0.1},
        {"noise_std": -1.0},
        {"limits": {"shoulder_pan.pos": (-1.0, 1.0)}},
        {"limits": {**SO101_LIMITS, "gripper.pos": (5.0, 5.0)}},
        {"start": {**SO101_REST, "gripper.pos": 150.0}},
        {"start": {"gripper.pos": 10.0}},
    ],
)
def test_follower_config_rejects_bad_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimFollowerConfig(**overrides)


@pytest.mark.parametrize(
    "overrides", [{"period_s": 0.0}, {"amplitude": 1.5}, {"amplitude": -0.1}, {"motion": ""}]
)
def test_leader_config_rejects_bad_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimLeaderConfig(**overrides)


# --- follower physics -----------------------------------------------------------------------


def test_follower_starts_at_rest_or_configured_start() -> None:
    clock = FakeClock()
    assert make_follower(clock).true_position() == SO101_REST
    start = {**SO101_REST, "elbow_flex.pos": 42.0}
    follower = make_follower(clock, start=start)
    assert follower.true_position() == start
    assert follower.goal() == start


def test_goal_step_is_speed_limited_then_converges_with_lag() -> None:
    clock = FakeClock()
    follower = make_follower(clock)
    config = follower.config
    follower.send_action({"elbow_flex.pos": 90.0})
    dt = 0.001
    # Speed-limited until the error is down to max_velocity * tau, then exponential.
    saturated_s = (90.0 - config.max_velocity * config.lag_tau_s) / config.max_velocity
    previous = follower.true_position()["elbow_flex.pos"]
    speeds = []
    for _ in range(round((saturated_s + 5 * config.lag_tau_s) / dt) + 1):
        clock.advance(dt)
        position = follower.true_position()["elbow_flex.pos"]
        speeds.append((position - previous) / dt)
        assert position <= 90.0
        previous = position
    assert max(speeds) <= config.max_velocity * (1 + 1e-9)
    assert min(speeds) >= 0.0
    # The velocity-limited phase really runs at the limit.
    assert speeds[round(saturated_s / dt) // 2] == pytest.approx(config.max_velocity)
    # After 5 time constants of lag only e^-5 of the knee error is left.
    assert 90.0 - previous < config.max_velocity * config.lag_tau_s * math.exp(-5) * 1.1
    assert previous == pytest.approx(90.0, abs=0.05)
    other = follower.true_position()
    assert all(other[k] == SO101_REST[k] for k in SO101_KEYS if k != "elbow_flex.pos")


def test_zero_lag_is_pure_speed_limit() -> None:
    clock = FakeClock()
    follower = make_follower(clock, lag_tau_s=0.0, max_velocity=100.0)
    follower.send_action({"shoulder_pan.pos": 50.0})
    clock.advance(0.25)
    assert follower.true_position()["shoulder_pan.pos"] == pytest.approx(25.0)
    clock.advance(0.26)
    assert follower.true_position()["shoulder_pan.pos"] == 50.0


def test_send_action_clamps_to_limits_and_returns_applied_values() -> None:
    clock = FakeClock()
    follower = make_follower(clock)
    applied = follower.send_action({"gripper.pos": 250.0, "shoulder_pan.pos": -1000})
    assert applied == {"shoulder_pan.pos": -110.0, "gripper.pos": 100.0}
    assert tuple(applied) == ("shoulder_pan.pos", "gripper.pos")
    assert follower.goal()["gripper.pos"] == 100.0
    assert follower.goal()["shoulder_pan.pos"] == -110.0
    clock.advance(10.0)
    position = follower.true_position()
    assert position["gripper.pos"] == pytest.approx(100.0)
    assert position["shoulder_pan.pos"] == pytest.approx(-110.0)
    assert within_limits(position)


def test_missing_keys_keep_their_goal() -> None:
    clock = FakeClock()
    follower = make_follower(clock)
    follower.send_action({"wrist_flex.pos": 30.0})
    follower.send_action({"wrist_roll.pos": -20.0})
    goal = follower.goal()
    assert goal["wrist_flex.pos"] == 30.0
    assert goal["wrist_roll.pos"] == -20.0
    assert goal["gripper.pos"] == SO101_REST["gripper.pos"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "12", None, True])
def test_bad_values_are_rejected_and_leave_goal_unchanged(bad: Any) -> None:
    clock = FakeClock()
    follower = make_follower(clock)
    follower.send_action({"elbow_flex.pos": 20.0})
    before = follower.goal()
    with pytest.raises(ValueError):
        follower.send_action({"shoulder_pan.pos": 5.0, "elbow_flex.pos": bad})
    assert follower.goal() == before


def test_unknown_key_is_rejected() -> None:
    follower = make_follower(FakeClock())
    before = follower.goal()
    with pytest.raises(ValueError, match="shoulder_pan"):
        follower.send_action({"shoulder_pan": 5.0})
    assert follower.goal() == before


def test_torque_off_holds_position_and_torque_on_does_not_jump() -> None:
    clock = FakeClock()
    follower = make_follower(clock)
    follower.send_action({"shoulder_lift.pos": 80.0})
    clock.advance(0.1)
    follower.set_torque(False)
    assert not follower.torque_enabled
    held = follower.true_position()
    assert 0.0 < held["shoulder_lift.pos"] < 80.0
    clock.advance(5.0)
    follower.send_action({"shoulder_lift.pos": -80.0})  # stored, but the joint is not driven
    clock.advance(5.0)
    assert follower.true_position() == held
    follower.set_torque(True)
    assert follower.goal() == held
    clock.advance(5.0)
    assert follower.true_position() == pytest.approx(held)


def test_disconnected_arm_does_not_move() -> None:
    clock = FakeClock()
    follower = make_follower(clock)
    follower.send_action({"wrist_roll.pos": 100.0})
    clock.advance(0.05)
    follower.disconnect()
    held = follower.true_position()
    clock.advance(10.0)
    follower.connect()
    assert follower.true_position() == held
    assert follower.goal() == held


def test_observation_noise_has_configured_std() -> None:
    clock = FakeClock()
    follower = make_follower(clock, noise_std=0.5, seed=1)
    observations = [follower.get_observation() for _ in range(4000)]
    readings = np.array([[obs[k] for k in SO101_KEYS] for obs in observations])
    rest = np.array([SO101_REST[k] for k in SO101_KEYS])
    assert np.abs(readings.mean(axis=0) - rest).max() < 0.05
    assert readings.std(axis=0) == pytest.approx([0.5] * len(SO101_KEYS), rel=0.1)


def test_noise_is_reproducible_with_a_seed_and_off_when_zero() -> None:
    clock = FakeClock()
    first = make_follower(clock, noise_std=0.05, seed=7)
    second = make_follower(clock, noise_std=0.05, seed=7)
    assert [first.get_observation() for _ in range(5)] == [
        second.get_observation() for _ in range(5)
    ]
    quiet = make_follower(clock, noise_std=0.0)
    assert quiet.get_observation() == quiet.true_position()


def test_noisy_observations_stay_within_limits() -> None:
    clock = FakeClock()
    follower = make_follower(clock, noise_std=5.0, start={**SO101_REST, "gripper.pos": 0.0})
    for _ in range(200):
        assert within_limits(follower.get_observation())


def run_goal_script(call_spacing_s: float) -> list[dict[str, float]]:
    clock = FakeClock()
    follower = make_follower(clock)
    script = {0.0: {"elbow_flex.pos": 90.0, "gripper.pos": 60.0}, 0.2: {"elbow_flex.pos": -40.0}}
    snapshots = []
    for step in range(round(1.0 / 0.01) + 1):
        t = step * 0.01
        if round(t, 6) in script:
            follower.send_action(script[round(t, 6)])
        # Poll at the requested spacing in between snapshots.
        for _ in range(round(0.01 / call_spacing_s)):
            clock.advance(call_spacing_s)
            follower.get_observation()
        snapshots.append(follower.true_position())
    return snapshots


def test_results_do_not_depend_on_call_rate() -> None:
    fine = run_goal_script(0.001)
    coarse = run_goal_script(0.01)
    for a, b in zip(fine, coarse, strict=True):
        assert [a[k] for k in SO101_KEYS] == pytest.approx([b[k] for k in SO101_KEYS], abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(SO101_KEYS),
            st.floats(min_value=-1e4, max_value=1e4),
            st.floats(min_value=0.0, max_value=2.0),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_positions_never_leave_limits(steps: list[tuple[str, float, float]]) -> None:
    clock = FakeClock()
    follower = make_follower(clock, noise_std=1.0)
    for key, value, wait_s in steps:
        applied = follower.send_action({key: value})
        low, high = SO101_LIMITS[key]
        assert low <= applied[key] <= high
        clock.advance(wait_s)
        assert within_limits(follower.true_position())
        assert within_limits(follower.get_observation())


# --- leader sweep ---------------------------------------------------------------------------


def sweep_positions(
    clock: FakeClock, leader: SimSO101Leader, seconds: float, dt: float
) -> np.ndarray:
    positions = []
    for _ in range(round(seconds / dt) + 1):
        positions.append([leader.get_action()[k] for k in SO101_KEYS])
        clock.advance(dt)
    return np.array(positions)


def test_sweep_starts_at_rest_without_a_jump() -> None:
    clock = FakeClock()
    leader = make_leader(clock)
    assert leader.get_action() == pytest.approx(SO101_REST)
    clock.advance(0.01)
    after = leader.get_action()
    assert max(abs(after[k] - SO101_REST[k]) for k in SO101_KEYS) < 0.05


def test_sweep_stays_within_limits_and_moves_every_joint() -> None:
    clock = FakeClock()
    config = SimLeaderConfig()
    leader = make_leader(clock)
    positions = sweep_positions(clock, leader, 3 * config.period_s, 0.01)
    low = np.array([SO101_LIMITS[k][0] for k in SO101_KEYS])
    high = np.array([SO101_LIMITS[k][1] for k in SO101_KEYS])
    assert (positions >= low).all() and (positions <= high).all()
    amplitude = config.amplitude * (high - low) / 2
    per_period = round(config.period_s / 0.01)
    first_period = positions[:per_period]
    later_period = positions[per_period : 2 * per_period]
    assert (np.ptp(first_period, axis=0) > 0.5 * amplitude).all()
    assert (np.ptp(later_period, axis=0) > 1.9 * amplitude).all()
    # Steady state sweeps around each joint's mid-point.
    assert later_period.mean(axis=0) == pytest.approx((low + high) / 2, abs=1.0)


def test_sweep_joints_are_not_in_lockstep() -> None:
    clock = FakeClock()
    leader = make_leader(clock)
    positions = sweep_positions(clock, leader, 12.0, 0.01)[600:]
    centered = positions - positions.mean(axis=0)
    correlation = np.corrcoef(centered.T)
    off_diagonal = correlation[~np.eye(len(SO101_KEYS), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.9


def test_sweep_peak_speed_is_well_below_follower_limit() -> None:
    clock = FakeClock()
    leader = make_leader(clock)
    dt = 0.001
    positions = sweep_positions(clock, leader, 2 * SimLeaderConfig().period_s, dt)
    peak = np.abs(np.diff(positions, axis=0)).max() / dt
    follower_limit = SimFollowerConfig().max_velocity
    assert peak < 0.75 * follower_limit
    config = SimLeaderConfig()
    bound = SweepMotion(config.limits, SO101_REST, config.period_s, config.amplitude)
    assert peak <= bound.peak_speed_bound()
    assert bound.peak_speed_bound() < follower_limit


def test_leader_reconnect_restarts_the_motion() -> None:
    clock = FakeClock()
    leader = make_leader(clock)
    clock.advance(2.0)
    assert leader.get_action() != pytest.approx(SO101_REST)
    leader.disconnect()
    leader.connect()
    assert leader.get_action() == pytest.approx(SO101_REST)


# --- trajectory files -----------------------------------------------------------------------


def test_trajectory_round_trip(tmp_path: Path) -> None:
    samples = [
        {"t": 0.0, **{k: float(i) + 0.1 for i, k in enumerate(SO101_KEYS)}},
        {"t": 0.5, **{k: -1.0 / 3.0 for k in SO101_KEYS}},
        {"t": 1.25, **{k: 42.0 for k in SO101_KEYS}},
    ]
    path = tmp_path / "motion.jsonl"
    write_trajectory(path, samples)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert list(json.loads(lines[0])) == ["t", *SO101_KEYS]
    assert read_trajectory(path) == samples
    assert read_trajectory(str(path)) == samples


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replay_interpolates_between_samples(tmp_path: Path) -> None:
    path = tmp_path / "motion.jsonl"
    write_trajectory(path, [sample(0.0, 0.0), sample(1.0, 10.0), sample(3.0, 50.0)])
    clock = FakeClock()
    leader = make_leader(clock, motion=str(path))
    assert leader.get_action() == {key: 0.0 for key in SO101_KEYS}
    clock.advance(0.5)
    assert leader.get_action()["elbow_flex.pos"] == pytest.approx(5.0)
    clock.advance(1.5)
    assert leader.get_action()["elbow_flex.pos"] == pytest.approx(30.0)
    clock.advance(1.0)
    assert leader.get_action()["gripper.pos"] == pytest.approx(50.0)


def test_replay_loops_smoothly_back_to_the_start(tmp_path: Path) -> None:
    path = tmp_path / "motion.jsonl"
    # Mean interval is 1.5 s, so the way back from the last sample to the first takes 1.5 s.
    write_trajectory(path, [sample(2.0, 0.0), sample(3.0, 10.0), sample(5.0, 40.0)])
    clock = FakeClock()
    leader = make_leader(clock, motion=str(path))
    loop_s = 3.0 + 1.5
    clock.advance(3.0 + 0.75)
    assert leader.get_action()["wrist_flex.pos"] == pytest.approx(20.0)
    clock.advance(0.75)
    assert leader.get_action()["wrist_flex.pos"] == pytest.approx(0.0, abs=1e-9)
    clock.advance(0.5)
    assert leader.get_action()["wrist_flex.pos"] == pytest.approx(5.0)
    clock.advance(2 * loop_s)
    assert leader.get_action()["wrist_flex.pos"] == pytest.approx(5.0)


def test_replay_clamps_recorded_values_to_limits(tmp_path: Path) -> None:
    path = tmp_path / "motion.jsonl"
    write_trajectory(path, [sample(0.0, 0.0), sample(1.0, 500.0)])
    clock = FakeClock()
    leader = make_leader(clock, motion=str(path))
    clock.advance(1.0)
    action = leader.get_action()
    assert within_limits(action)
    assert action["wrist_roll.pos"] == 160.0


def test_missing_trajectory_file_fails_on_connect(tmp_path: Path) -> None:
    leader = SimSO101Leader(SimLeaderConfig(motion=str(tmp_path / "nope.jsonl")), FakeClock())
    with pytest.raises(FileNotFoundError):
        leader.connect()
    assert not leader.is_connected


def good_line(t: float) -> str:
    return json.dumps(sample(t, 1.0))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([good_line(0.0), "{not json", good_line(2.0)], r"line 2: invalid JSON"),
        (
            [good_line(0.0), good_line(1.0), json.dumps({"t": 2.0, "gripper.pos": 1.0})],
            r"line 3: missing key 'shoulder_pan.pos'",
        ),
        ([json.dumps({k: 1.0 for k in SO101_KEYS}), good_line(1.0)], r"line 1: missing key 't'"),
        ([good_line(0.0), good_line(1.0).replace("1.0}", "NaN}")], r"line 2: .* not finite"),
        ([good_line(0.0), good_line(1.0).replace('"t": 1.0', '"t": Infinity')], r"line 2: .*"),
        ([good_line(0.0), good_line(1.0), good_line(1.0)], r"line 3: t = 1.0 is not greater"),
        ([good_line(1.0), good_line(0.5)], r"line 2: t = 0.5 is not greater"),
        ([good_line(0.0), json.dumps([1, 2, 3])], r"line 2: expected a JSON object"),
        ([good_line(0.0), good_line(1.0).replace("1.0}", '"x"}')], r"line 2: .* not a number"),
        ([good_line(0.0)], r"at least 2 samples, found 1"),
        ([], r"at least 2 samples, found 0"),
    ],
)
def test_read_trajectory_reports_errors_with_line_numbers(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        read_trajectory(path)


def test_read_trajectory_skips_blank_lines_but_counts_them(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "gaps.jsonl", [good_line(0.0), "", good_line(1.0), "", "{"])
    with pytest.raises(ValueError, match="line 5"):
        read_trajectory(path)
    path = write_lines(tmp_path / "ok.jsonl", [good_line(0.0), "", good_line(1.0), ""])
    assert len(read_trajectory(path)) == 2


def test_write_trajectory_validates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="not finite"):
        write_trajectory(path, [sample(0.0, 0.0), sample(1.0, math.nan)])
    with pytest.raises(ValueError, match="not greater"):
        write_trajectory(path, [sample(1.0, 0.0), sample(1.0, 0.0)])
    with pytest.raises(ValueError, match="at least 2"):
        write_trajectory(path, [sample(0.0, 0.0)])
    assert not path.exists()


def test_record_trajectory_samples_a_leader_and_replays_it(tmp_path: Path) -> None:
    clock = FakeClock()
    leader = make_leader(clock)
    recorded = record_trajectory(leader, seconds=2.0, rate_hz=50.0, clock=clock, sleep=clock.sleep)
    assert len(recorded) == 101
    assert recorded[0]["t"] == 0.0
    assert recorded[-1]["t"] == pytest.approx(2.0)
    assert [key for key in recorded[0]] == ["t", *SO101_KEYS]
    assert {key: recorded[0][key] for key in SO101_KEYS} == pytest.approx(SO101_REST)

    path = tmp_path / "recorded.jsonl"
    write_trajectory(path, recorded)
    replay_clock = FakeClock()
    replay = make_leader(replay_clock, motion=str(path))
    sweep_clock = FakeClock()
    sweep = make_leader(sweep_clock)
    for _ in range(40):
        replay_clock.advance(0.037)
        sweep_clock.advance(0.037)
        expected = sweep.get_action()
        assert replay.get_action() == pytest.approx(expected, abs=0.05)


def test_record_trajectory_rejects_bad_arguments_and_incomplete_actions() -> None:
    clock = FakeClock()

    class Partial:
        def get_action(self) -> dict[str, float]:
            return {"gripper.pos": 1.0}

    with pytest.raises(ValueError, match=r"missing key 'shoulder_pan\.pos'"):
        record_trajectory(Partial(), seconds=1.0, rate_hz=10.0, clock=clock, sleep=clock.sleep)
    with pytest.raises(ValueError):
        record_trajectory(Partial(), seconds=0.05, rate_hz=10.0, clock=clock, sleep=clock.sleep)
    with pytest.raises(ValueError):
        record_trajectory(Partial(), seconds=1.0, rate_hz=0.0, clock=clock, sleep=clock.sleep)
