"""Unit tests for the arm driver's flags (services/arm_driver/config.py) and device factory
(services/arm_driver/devices.py).

Covers parse_driver_args (role from --robot.*/--teleop.*, LeRobot-style device options in both
`=` and space forms, argparse errors with exit code 2 for conflicting or invalid flags,
--joint-limits JSON), argv_with_environment (RDV_<PROCESS>_ARGS), and make_device / joint_keys /
joint_limits with the built-in sim arms and without LeRobot installed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from services.arm_driver.config import (
    DeviceSpec,
    DriverConfig,
    argv_with_environment,
    parse_driver_args,
)
from services.arm_driver.devices import DeviceError, joint_keys, joint_limits, make_device
from services.sim import (
    SO101_KEYS,
    SO101_LIMITS,
    SimFollowerConfig,
    SimLeaderConfig,
    SimSO101Follower,
    SimSO101Leader,
)


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Parse argv expecting an argparse error; returns its stderr."""
    with pytest.raises(SystemExit) as exited:
        parse_driver_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


# --- parse_driver_args: roles and device flags --------------------------------------------------


def test_robot_type_makes_a_follower() -> None:
    config = parse_driver_args(["--robot.type=sim"])
    assert isinstance(config, DriverConfig)
    assert (config.role, config.process) == ("follower", "follower_arm")
    assert config.device == DeviceSpec(kind="robot", type="sim")


def test_teleop_type_makes_a_leader() -> None:
    config = parse_driver_args(["--teleop.type=sim_so101_leader", "--teleop.id=x"])
    assert (config.role, config.process) == ("leader", "leader_arm")
    assert config.device == DeviceSpec(kind="teleop", type="sim_so101_leader", id="x")


def test_extra_device_fields_land_in_options() -> None:
    leader = parse_driver_args(["--teleop.type=sim_so101_leader", "--teleop.period_s=4"])
    assert leader.device.options == {"period_s": "4"}
    follower = parse_driver_args(
        ["--robot.type", "sim", "--robot.noise_std", "0", "--robot.seed=3", "--rate", "50"]
    )
    assert follower.device.type == "sim"
    assert follower.device.options == {"noise_std": "0", "seed": "3"}
    assert follower.rate_hz == 50.0  # the space form did not swallow the next flag


def test_port_and_id_are_fields_of_the_spec_not_options() -> None:
    config = parse_driver_args(
        ["--robot.type=so101_follower", "--robot.port", "/dev/ttyACM0", "--robot.id=arm_1"]
    )
    assert config.device == DeviceSpec(
        kind="robot", type="so101_follower", port="/dev/ttyACM0", id="arm_1"
    )


def test_control_flags_are_parsed() -> None:
    config = parse_driver_args(
        [
            "--robot.type=sim",
            "--rate=50",
            "--max-step=3",
            "--ramp-step=0.5",
            "--ramp-done=1",
            "--max-command-age=0.05",
            "--command-timeout=0.5",
            "--torque-policy=release",
            "--station=lab7",
        ]
    )
    assert (config.rate_hz, config.max_step, config.ramp_step, config.ramp_done) == (
        50.0,
        3.0,
        0.5,
        1.0,
    )
    assert (config.max_command_age_s, config.command_timeout_s) == (0.05, 0.5)
    assert (config.torque_policy, config.station) == ("release", "lab7")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--robot.port=/dev/ttyACM0"],
        ["--robot.type=sim", "--teleop.type=sim"],
    ],
    ids=["neither", "no_type", "both"],
)
def test_exactly_one_device_kind(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert "exactly one of --robot.type" in parse_error(argv, capsys)


@pytest.mark.parametrize(
    "extra",
    ["--teleop.port=x", "--teleop.id=x", "--teleop.period_s=4"],
)
def test_flags_of_the_other_kind_are_an_error(
    extra: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--teleop.* flags given to a robot driver" in parse_error(
        ["--robot.type=sim", extra], capsys
    )


def test_robot_option_given_to_a_leader_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(["--teleop.type=sim", "--robot.noise_std=0"], capsys)
    assert "--robot.* flags given to a teleop driver" in err


def test_device_option_without_a_value_is_an_argparse_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "--robot.noise_std needs a value" in parse_error(
        ["--robot.type=sim", "--robot.noise_std"], capsys
    )


@pytest.mark.parametrize("rate", ["0", "-5", "1001", "abc", "nan", "inf"])
def test_bad_rate_is_an_error(rate: str, capsys: pytest.CaptureFixture[str]) -> None:
    parse_error(["--robot.type=sim", f"--rate={rate}"], capsys)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-step=1", "--ramp-step=2"], "ramp_step must not exceed max_step"),
        (["--max-step=0"], "max_step must be positive"),
        (["--ramp-done=-1"], "ramp_done must be positive"),
        (["--max-command-age=0.5", "--command-timeout=0.25"], "max_command_age_s"),
        (["--command-timeout=0"], "command_timeout_s must be positive"),
        (["--max-step=inf"], "max_step must be positive and finite"),
        (["--command-timeout=inf"], "command_timeout_s must be positive and finite"),
    ],
)
def test_inconsistent_safety_flags_are_an_error(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in parse_error(["--robot.type=sim", *flags], capsys)


def test_bad_torque_policy_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--torque-policy" in parse_error(["--robot.type=sim", "--torque-policy=limp"], capsys)


def test_joint_limits_json_is_parsed() -> None:
    text = json.dumps({"shoulder_pan.pos": [-10, 10], "gripper.pos": [5, 50.5]})
    config = parse_driver_args(["--robot.type=sim", "--joint-limits", text])
    assert config.joint_limits == {"shoulder_pan.pos": (-10.0, 10.0), "gripper.pos": (5.0, 50.5)}
    assert parse_driver_args(["--robot.type=sim"]).joint_limits is None


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[[-10, 10]]",
        '{"shoulder_pan.pos": [10]}',
        '{"shoulder_pan.pos": 10}',
        '{"shoulder_pan.pos": ["a", "b"]}',
        '{"shoulder_pan.pos": [10, -10]}',
        '{"shoulder_pan.pos": [5, 5]}',
    ],
)
def test_bad_joint_limits_are_an_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--joint-limits" in parse_error(["--robot.type=sim", f"--joint-limits={text}"], capsys)


# --- argv_with_environment ----------------------------------------------------------------------


def test_environment_flags_are_appended(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDV_FOLLOWER_ARM_ARGS", "--rate 50 --robot.noise_std '0.5' --station 'a b'")
    monkeypatch.setenv("RDV_LEADER_ARM_ARGS", "--rate 7")
    argv = argv_with_environment(["--robot.type=sim", "--rate=20"], "follower_arm")
    assert argv == [
        "--robot.type=sim",
        "--rate=20",
        "--rate",
        "50",
        "--robot.noise_std",
        "0.5",
        "--station",
        "a b",
    ]
    config = parse_driver_args(argv)
    assert config.rate_hz == 50.0  # appended after the command line, so it wins
    assert config.device.options == {"noise_std": "0.5"}
    assert config.station == "a b"


def test_without_environment_argv_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RDV_LEADER_ARM_ARGS", raising=False)
    monkeypatch.setenv("RDV_FOLLOWER_ARM_ARGS", "--rate 50")
    assert argv_with_environment(["--teleop.type=sim"], "leader_arm") == ["--teleop.type=sim"]


# --- make_device ----------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["sim", "sim_so101_follower"])
def test_sim_follower_options_are_typed(type_: str) -> None:
    spec = DeviceSpec(
        kind="robot",
        type=type_,
        id="arm_7",
        port="/dev/null",
        options={"noise_std": "0", "seed": "3", "max_velocity": "90.5"},
    )
    device = make_device(spec)
    assert type(device) is SimSO101Follower
    config = device.config
    assert isinstance(config, SimFollowerConfig)
    assert config.noise_std == 0.0 and type(config.noise_std) is float
    assert config.seed == 3 and type(config.seed) is int
    assert config.max_velocity == 90.5
    assert (config.id, config.port) == ("arm_7", "/dev/null")


def test_sim_follower_optional_and_json_fields() -> None:
    start = {key: 1.0 for key in SO101_KEYS}
    spec = DeviceSpec(
        kind="robot", type="sim", options={"seed": "none", "start": json.dumps(start)}
    )
    config = make_device(spec).config
    assert config.seed is None
    assert config.start == start


@pytest.mark.parametrize("type_", ["sim", "sim_so101_leader"])
def test_sim_leader_options_are_typed(type_: str) -> None:
    spec = DeviceSpec(kind="teleop", type=type_, id="x", options={"period_s": "4"})
    device = make_device(spec)
    assert type(device) is SimSO101Leader
    assert isinstance(device.config, SimLeaderConfig)
    assert device.config.period_s == 4.0 and type(device.config.period_s) is float
    assert device.config.id == "x"


def test_unknown_sim_field_names_the_known_fields() -> None:
    spec = DeviceSpec(kind="robot", type="sim", options={"noise": "0"})
    with pytest.raises(DeviceError) as raised:
        make_device(spec)
    message = str(raised.value)
    assert "'noise'" in message
    for field in ("noise_std", "max_velocity", "seed"):
        assert field in message


def test_bad_sim_field_value_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="noise_std"):
        make_device(DeviceSpec(kind="robot", type="sim", options={"noise_std": "lots"}))


@pytest.fixture
def without_lerobot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import lerobot...` fail even where LeRobot happens to be installed."""
    for name in list(sys.modules):
        if name == "lerobot" or name.startswith("lerobot."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lerobot", None)


@pytest.mark.usefixtures("without_lerobot")
@pytest.mark.parametrize(
    ("kind", "type_", "sims"),
    [
        ("robot", "so101_follower", ("sim", "sim_so101_follower")),
        ("teleop", "so101_leader", ("sim", "sim_so101_leader")),
        ("teleop", "sim_so101_follower", ("sim", "sim_so101_leader")),  # wrong kind for a sim
    ],
)
def test_lerobot_type_without_lerobot_says_how_to_install(
    kind: str, type_: str, sims: tuple[str, ...]
) -> None:
    with pytest.raises(DeviceError) as raised:
        make_device(DeviceSpec(kind=kind, type=type_, port="/dev/ttyACM0"))
    message = str(raised.value)
    assert "pip install 'rdv[lerobot]'" in message
    assert f"--{kind}.type={type_}" in message
    for sim in sims:
        assert sim in message


# --- joint_keys and joint_limits ---------------------------------------------------------------


def test_joint_keys_follow_the_device_order() -> None:
    follower = make_device(DeviceSpec(kind="robot", type="sim"))
    leader = make_device(DeviceSpec(kind="teleop", type="sim"))
    assert joint_keys(follower) == SO101_KEYS
    assert joint_keys(leader) == SO101_KEYS


class BareDevice:
    """A device with only action_features, as a LeRobot device without a `limits` config."""

    def __init__(self, features: dict[str, type]) -> None:
        self.action_features = features


def test_joint_keys_skip_non_float_features() -> None:
    device = BareDevice({"b.pos": float, "camera": tuple, "a.pos": float})
    assert joint_keys(device) == ("b.pos", "a.pos")


def test_joint_limits_default_to_so101_nominal() -> None:
    device = BareDevice(dict.fromkeys(reversed(SO101_KEYS), float))
    keys = joint_keys(device)
    assert joint_limits(device, keys, None) == tuple(SO101_LIMITS[k] for k in reversed(SO101_KEYS))


def test_joint_limits_precedence_override_then_device_then_nominal() -> None:
    device_limits: dict[str, Any] = dict(SO101_LIMITS)
    device_limits["shoulder_pan.pos"] = (-50.0, 50.0)
    device_limits["elbow_flex.pos"] = (-40.0, 40.0)
    device = SimSO101Follower(SimFollowerConfig(limits=device_limits))
    keys = joint_keys(device)
    override = {"elbow_flex.pos": (-10.0, 10.0)}
    limits = dict(zip(keys, joint_limits(device, keys, override), strict=True))
    assert limits["elbow_flex.pos"] == (-10.0, 10.0)  # the flag
    assert limits["shoulder_pan.pos"] == (-50.0, 50.0)  # the device's own
    assert limits["gripper.pos"] == SO101_LIMITS["gripper.pos"]
    assert dict(zip(keys, joint_limits(device, keys, None), strict=True)) == device_limits


def test_joint_limits_missing_for_unknown_keys() -> None:
    device = BareDevice({"shoulder_pan.pos": float, "extra_joint.pos": float})
    keys = joint_keys(device)
    with pytest.raises(DeviceError, match=r"extra_joint\.pos"):
        joint_limits(device, keys, None)
    limits = joint_limits(device, keys, {"extra_joint.pos": (0.0, 1.0)})
    assert limits == (SO101_LIMITS["shoulder_pan.pos"], (0.0, 1.0))


def test_joint_limits_override_for_a_key_the_device_lacks_is_an_error() -> None:
    """A typo in --joint-limits must not be silently ignored, leaving wider limits in force."""
    device = make_device(DeviceSpec(kind="robot", type="sim"))
    keys = joint_keys(device)
    with pytest.raises(DeviceError, match="shoulder_pan'"):
        joint_limits(device, keys, {"shoulder_pan": (-10.0, 10.0)})


def test_role_comes_from_the_environment_when_the_command_line_names_no_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.arm_driver.__main__ import role_of

    monkeypatch.delenv("RDV_FOLLOWER_ARM_ARGS", raising=False)
    assert role_of(["--teleop.type=sim"]) == "leader"
    assert role_of(["--robot.type=sim"]) == "follower"
    monkeypatch.setenv("RDV_FOLLOWER_ARM_ARGS", "--robot.type=sim --robot.noise_std=0")
    assert role_of([]) == "follower"
    assert role_of(["--teleop.type=sim"]) == "leader"


@pytest.mark.parametrize("text", ['{"gripper.pos": [0, Infinity]}', '{"gripper.pos": [NaN, 1]}'])
def test_non_finite_joint_limits_are_a_flag_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parse_error(["--robot.type=sim", f"--joint-limits={text}"], capsys)
