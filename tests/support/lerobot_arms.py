"""SO101 arms on emulated Feetech buses, calibrated as LeRobot would have left them, for the
LeRobot tier (tests/lerobot).

A calibration is two things that must agree: the JSON file LeRobot reads
(`$HF_LEROBOT_CALIBRATION/<robots|teleoperators>/<name>/<id>.json`) and the servos' EEPROM
registers (Homing_Offset, Min/Max_Position_Limit). `calibrate()` writes both, as
`lerobot-calibrate` does. `to_units()` is LeRobot's normalisation (degrees for the body,
0..100 for the gripper), written out here so a test can read the emulated registers in the
units rdv's frames carry. This module never imports LeRobot at import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.support.feetech_bus import RESOLUTION, BusControl

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


@dataclass(frozen=True)
class MotorCalibration:
    id: int
    homing_offset: int
    range_min: int
    range_max: int

    def as_lerobot(self) -> dict[str, int]:
        return {"id": self.id, "drive_mode": 0, "homing_offset": self.homing_offset,
                "range_min": self.range_min, "range_max": self.range_max}  # fmt: skip


# What a calibration of a real SO101 looks like: offsets both ways (sign-magnitude on the
# wire), each joint's recorded range, wrist_roll the full turn as LeRobot sets it.
CALIBRATION = {
    "shoulder_pan": MotorCalibration(1, -120, 800, 3300),
    "shoulder_lift": MotorCalibration(2, 85, 700, 3400),
    "elbow_flex": MotorCalibration(3, 30, 900, 3200),
    "wrist_flex": MotorCalibration(4, -45, 850, 3250),
    "wrist_roll": MotorCalibration(5, 0, 0, RESOLUTION - 1),
    "gripper": MotorCalibration(6, 210, 1900, 3300),
}


def calibration_path(root: Path, kind: str, device_type: str, device_id: str) -> Path:
    """Where LeRobot (the installed version) keeps this device's calibration under root."""
    from services.arm_driver.config import DeviceSpec
    from services.arm_driver.devices import make_device

    # A throw-away instance with calibration_dir inside root tells the class's `name`
    # (so_follower in 0.4.3+, so101_follower before) without touching LeRobot's default dir.
    scratch = root / ".probe"
    spec = DeviceSpec(kind, device_type, port="/dev/null", id=device_id,
                      options={"calibration_dir": str(scratch)})  # fmt: skip
    device = make_device(spec)
    folder = "robots" if kind == "robot" else "teleoperators"
    for item in scratch.iterdir():
        item.unlink()
    scratch.rmdir()
    return root / folder / device.name / f"{device_id}.json"


def calibrate(
    control: BusControl,
    path: Path | None,
    calibration: dict[str, MotorCalibration] = CALIBRATION,
) -> None:
    """Write the calibration to the servos' registers and (unless path is None) to the file;
    put every shaft at the middle of its range, as the arm rests after calibrating."""
    for motor in calibration.values():
        control.registers(motor.id, Homing_Offset=motor.homing_offset,
                          Min_Position_Limit=motor.range_min,
                          Max_Position_Limit=motor.range_max)  # fmt: skip
    control.hand({m.id: (m.range_min + m.range_max) / 2 + m.homing_offset
                  for m in calibration.values()})  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({name: m.as_lerobot() for name, m in calibration.items()}))


def to_units(joint: str, raw: int, calibration: dict[str, MotorCalibration] = CALIBRATION) -> float:
    """A Present/Goal_Position register value in LeRobot units (use_degrees=True)."""
    motor = calibration[joint]
    if joint == "gripper":
        bounded = min(motor.range_max, max(motor.range_min, raw))
        return (bounded - motor.range_min) / (motor.range_max - motor.range_min) * 100
    middle = (motor.range_min + motor.range_max) / 2
    return (raw - middle) * 360 / (RESOLUTION - 1)


def to_shaft(joint: str, units: float, calibration: dict[str, MotorCalibration] = CALIBRATION
             ) -> float:  # fmt: skip
    """The shaft angle (raw steps, before the homing offset) that reads as `units`."""
    motor = calibration[joint]
    if joint == "gripper":
        raw = motor.range_min + units / 100 * (motor.range_max - motor.range_min)
    else:
        raw = (motor.range_min + motor.range_max) / 2 + units * (RESOLUTION - 1) / 360
    return raw + motor.homing_offset


def units_of(state: dict, register: str) -> dict[str, float]:
    """Every joint's `register` (goal_position, present_position) from a bus state, in units."""
    motors = state["motors"]
    return {joint: to_units(joint, motors[str(CALIBRATION[joint].id)][register])
            for joint in JOINTS}  # fmt: skip
