"""SO101 arm facts shared by the simulated leader and follower: joint names, LeRobot action keys,
joint limits, a rest pose and LeRobot-compatible device errors.

Keys, order and units are LeRobot's (0.4, `use_degrees=True`): body joints in degrees, gripper in
0..100. This module must never import LeRobot or any hardware library; it is loaded on machines
that have neither.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

SO101_JOINTS: tuple[str, ...] = (
    "shoulder_pan",
    "shoulder_lift",
    "elbow_flex",
    "wrist_flex",
    "wrist_roll",
    "gripper",
)
SO101_KEYS: tuple[str, ...] = tuple(f"{joint}.pos" for joint in SO101_JOINTS)

SO101_LIMITS: dict[str, tuple[float, float]] = {
    "shoulder_pan.pos": (-110.0, 110.0),
    "shoulder_lift.pos": (-100.0, 100.0),
    "elbow_flex.pos": (-97.0, 97.0),
    "wrist_flex.pos": (-95.0, 95.0),
    "wrist_roll.pos": (-160.0, 160.0),
    "gripper.pos": (0.0, 100.0),
}

# Slightly open gripper so that a sweep or a first command visibly moves it in both directions.
SO101_REST: dict[str, float] = {
    "shoulder_pan.pos": 0.0,
    "shoulder_lift.pos": 0.0,
    "elbow_flex.pos": 0.0,
    "wrist_flex.pos": 0.0,
    "wrist_roll.pos": 0.0,
    "gripper.pos": 10.0,
}


class DeviceNotConnectedError(ConnectionError):
    """Same meaning as LeRobot's: the device was used before `connect()` or after `disconnect()`."""

    def __init__(
        self, message: str = "This device is not connected. Try calling `connect()` first."
    ) -> None:
        self.message = message
        super().__init__(self.message)


class DeviceAlreadyConnectedError(ConnectionError):
    """Same meaning as LeRobot's: `connect()` was called on a connected device."""

    def __init__(
        self, message: str = "This device is already connected. Try not calling `connect()` twice."
    ) -> None:
        self.message = message
        super().__init__(self.message)


def validate_limits(limits: Mapping[str, tuple[float, float]]) -> None:
    """Raise ValueError unless `limits` has exactly the SO101 keys, each finite with lo < hi."""
    missing = [key for key in SO101_KEYS if key not in limits]
    unknown = sorted(key for key in limits if key not in SO101_KEYS)
    if missing or unknown:
        raise ValueError(
            f"limits must have exactly the SO101 keys: missing {missing}, unknown {unknown}"
        )
    for key in SO101_KEYS:
        try:
            lo, hi = (float(bound) for bound in limits[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"limits[{key!r}] must be a (lo, hi) pair of numbers") from exc
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"limits[{key!r}] = {limits[key]!r} must be finite with lo < hi")


def validate_pose(
    pose: Mapping[str, float], limits: Mapping[str, tuple[float, float]], what: str
) -> None:
    """Raise ValueError unless `pose` has every SO101 key, only those, finite and within limits."""
    missing = [key for key in SO101_KEYS if key not in pose]
    unknown = sorted(key for key in pose if key not in SO101_KEYS)
    if missing or unknown:
        raise ValueError(
            f"{what} must have exactly the SO101 keys: missing {missing}, unknown {unknown}"
        )
    for key in SO101_KEYS:
        value = pose[key]
        lo, hi = limits[key]
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (is_number and math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{what}[{key!r}] = {value!r} must be a finite number in [{lo}, {hi}]")
