"""The arm driver's calibration checks (services/arm_driver/devices.py) without LeRobot: the
`rdv calibrate` line they print, a missing file refused before the port is touched, a mismatch
refused before the device is connected (configured, torqued). The LeRobot tier
(tests/lerobot) runs the same checks against LeRobot's real classes on an emulated bus."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.arm_driver.config import DeviceSpec
from services.arm_driver.devices import (
    CalibrationError,
    _typed_fields,
    calibrate_command,
    connect_device,
)

SPEC = DeviceSpec("robot", "so101_follower", port="/dev/tty ACM0", id="my_arm")


class Bus:
    def __init__(self, matches: bool) -> None:
        self.matches = matches
        self.calls: list[str] = []

    def connect(self) -> None:
        self.calls.append("connect")

    @property
    def is_calibrated(self) -> bool:
        return self.matches

    def read_calibration(self) -> dict:
        return {}

    def disconnect(self, disable_torque: bool = True) -> None:
        self.calls.append(f"disconnect(disable_torque={disable_torque})")


class Device:
    def __init__(self, calibration_fpath: Path, matches: bool = True) -> None:
        self.calibration_fpath = calibration_fpath
        self.bus = Bus(matches)
        self.connected = False
        self.is_calibrated = matches

    def connect(self, calibrate: bool = True) -> None:
        assert calibrate is False, "the daemon must never let LeRobot prompt"
        self.connected = True


def test_the_command_repeats_the_users_flags_shell_quoted() -> None:
    assert calibrate_command(SPEC) == (
        "rdv calibrate --robot.type=so101_follower '--robot.port=/dev/tty ACM0' --robot.id=my_arm"
    )
    leader = DeviceSpec("teleop", "so101_leader", port=None, id=None)
    assert calibrate_command(leader) == "rdv calibrate --teleop.type=so101_leader"


def test_a_missing_file_is_refused_before_the_port_is_opened(tmp_path: Path) -> None:
    device = Device(tmp_path / "robots" / "so_follower" / "my_arm.json")
    with pytest.raises(CalibrationError) as raised:
        connect_device(device, SPEC)
    assert calibrate_command(SPEC) in str(raised.value)
    assert str(device.calibration_fpath) in str(raised.value)
    assert device.bus.calls == [] and not device.connected


def test_a_mismatch_is_refused_before_the_device_is_connected(tmp_path: Path) -> None:
    path = tmp_path / "my_arm.json"
    path.write_text("{}")
    device = Device(path, matches=False)
    with pytest.raises(CalibrationError, match="does not match the motors"):
        connect_device(device, SPEC)
    assert device.bus.calls == ["connect", "disconnect(disable_torque=False)"]
    assert not device.connected


def test_a_matching_calibration_connects_without_a_prompt(tmp_path: Path) -> None:
    path = tmp_path / "my_arm.json"
    path.write_text("{}")
    device = Device(path)
    connect_device(device, SPEC)
    assert device.connected


def test_path_fields_from_flags_become_paths() -> None:
    from dataclasses import dataclass

    @dataclass
    class Config:
        calibration_dir: Path | None = None

    assert _typed_fields(Config, {"calibration_dir": "/x/y"}) == {"calibration_dir": Path("/x/y")}
    assert _typed_fields(Config, {"calibration_dir": "none"}) == {"calibration_dir": None}
