"""Simulated SO101 follower arm with the device interface of LeRobot's `SO101Follower`.

Stands in for the real arm in tests, demos and CI: goals are clamped to joint limits, each joint
follows its goal with a first-order lag and a speed limit, observations carry sensor noise. The
physics advances lazily to `clock()` on every call, so there is no thread and a fake clock makes
it fully deterministic. This module must never import LeRobot, open a serial port or sleep.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from services.sim.so101 import (
    SO101_KEYS,
    SO101_LIMITS,
    SO101_REST,
    DeviceAlreadyConnectedError,
    DeviceNotConnectedError,
    validate_limits,
    validate_pose,
)


@dataclass
class SimFollowerConfig:
    id: str = "sim_follower"
    port: str | None = None  # accepted for CLI symmetry with LeRobot, unused
    limits: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(SO101_LIMITS))
    max_velocity: float = 180.0  # units/s per joint (deg/s; gripper %/s)
    lag_tau_s: float = 0.03  # first-order lag time constant toward the goal; 0 = speed limit only
    noise_std: float = 0.05  # sensor noise on observations (units)
    start: dict[str, float] | None = None  # initial pose, default SO101_REST
    seed: int | None = None

    def __post_init__(self) -> None:
        validate_limits(self.limits)
        # `not (x > 0)` also rejects NaN, which would silently freeze or explode the physics.
        if not (self.max_velocity > 0 and math.isfinite(self.max_velocity)):
            raise ValueError(f"max_velocity must be finite and > 0, got {self.max_velocity}")
        if not (self.lag_tau_s >= 0 and math.isfinite(self.lag_tau_s)):
            raise ValueError(f"lag_tau_s must be finite and >= 0, got {self.lag_tau_s}")
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ValueError(f"noise_std must be finite and >= 0, got {self.noise_std}")
        if self.start is not None:
            validate_pose(self.start, self.limits, "start")


def lagged_move(
    position: np.ndarray, goal: np.ndarray, dt: float, max_velocity: float, lag_tau_s: float
) -> np.ndarray:
    """Exact solution after `dt` seconds of d(pos)/dt = clip((goal - pos) / tau, ±max_velocity).

    Solved in closed form rather than by sub-stepping, so the result is the same whether the arm
    is polled every millisecond or once a minute, and a long idle gap costs nothing. Far from the
    goal a joint moves at max_velocity until its error shrinks to max_velocity * tau (the knee,
    where both laws give the same speed), then the error decays as exp(-t / tau).
    """
    error = goal - position
    distance = np.abs(error)
    knee = max_velocity * lag_tau_s
    saturated_s = np.minimum(dt, np.maximum(distance - knee, 0.0) / max_velocity)
    remaining = np.maximum(distance - max_velocity * saturated_s, 0.0)
    lag_s = dt - saturated_s
    if lag_tau_s > 0:
        remaining = remaining * np.exp(-lag_s / lag_tau_s)
    else:
        remaining = np.where(lag_s > 0, 0.0, remaining)
    return goal - np.sign(error) * remaining


class SimSO101Follower:
    """Simulated SO101 follower: same keys, units and call contract as LeRobot's SO101Follower."""

    config_class = SimFollowerConfig
    name = "sim_so101_follower"

    def __init__(
        self, config: SimFollowerConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._lower = np.array([config.limits[key][0] for key in SO101_KEYS], dtype=float)
        self._upper = np.array([config.limits[key][1] for key in SO101_KEYS], dtype=float)
        start = config.start if config.start is not None else SO101_REST
        # SO101_REST may sit outside custom limits; the arm can only ever be inside them.
        self._position = np.clip(
            np.array([float(start[key]) for key in SO101_KEYS]), self._lower, self._upper
        )
        self._goal = self._position.copy()
        self._rng = np.random.default_rng(config.seed)
        self._connected = False
        self._torque_enabled = False
        self._last_update_s = clock()

    def __str__(self) -> str:
        return f"{self.id} {self.__class__.__name__}"

    @property
    def config(self) -> SimFollowerConfig:
        return self._config

    @property
    def id(self) -> str:
        return self._config.id

    @property
    def observation_features(self) -> dict[str, type]:
        return {key: float for key in SO101_KEYS}

    @property
    def action_features(self) -> dict[str, type]:
        return {key: float for key in SO101_KEYS}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True

    @property
    def torque_enabled(self) -> bool:
        return self._torque_enabled

    def connect(self, calibrate: bool = True) -> None:
        if self._connected:
            raise DeviceAlreadyConnectedError(f"{self} already connected")
        # Time spent disconnected is unpowered time: the arm must not catch up on it.
        self._last_update_s = self._clock()
        self._connected = True
        if not self.is_calibrated and calibrate:
            self.calibrate()
        self.configure()
        # Like the real arm after configure(): torque on, holding wherever it happens to be.
        self.set_torque(True)

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def get_observation(self) -> dict[str, float]:
        self._require_connected()
        self._advance()
        observed = self._position
        if self._config.noise_std > 0:
            observed = observed + self._rng.normal(0.0, self._config.noise_std, observed.shape)
        # Keep even noisy readings inside the declared limits so consumers can treat the limits
        # as a hard contract.
        return _as_dict(np.clip(observed, self._lower, self._upper))

    def send_action(self, action: Mapping[str, float]) -> dict[str, float]:
        """Clamp each given key to its limits, make it the joint's goal, return what was applied.

        Validation happens before anything changes, so a rejected action leaves every goal as it
        was. While torque is off the goal is stored but has no effect (see `set_torque`).
        """
        self._require_connected()
        requested = _parse_action(action)
        # Integrate up to now under the old goal before the new one takes effect.
        self._advance()
        applied: dict[str, float] = {}
        for index, key in enumerate(SO101_KEYS):
            if key in requested:
                value = min(max(requested[key], self._lower[index]), self._upper[index])
                self._goal[index] = value
                applied[key] = float(value)
        return applied

    def set_torque(self, enabled: bool) -> None:
        """Torque off: the joints are not driven and stay where they are. Torque on: the goal is
        reset to the current position, so re-enabling never makes the arm jump to a stale goal."""
        self._require_connected()
        self._advance()
        if enabled and not self._torque_enabled:
            self._goal = self._position.copy()
        self._torque_enabled = enabled

    def true_position(self) -> dict[str, float]:
        """Noise-free joint positions now, for tests and the sim camera; no connection needed."""
        self._advance()
        return _as_dict(self._position)

    def goal(self) -> dict[str, float]:
        return _as_dict(self._goal)

    def disconnect(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(f"{self} is not connected.")
        # LeRobot disables torque on disconnect by default; mirror it so the arm goes limp.
        self.set_torque(False)
        self._connected = False

    def _require_connected(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(f"{self} is not connected.")

    def _advance(self) -> None:
        now = self._clock()
        dt = now - self._last_update_s
        self._last_update_s = now
        if dt <= 0 or not self._torque_enabled:
            return
        moved = lagged_move(
            self._position, self._goal, dt, self._config.max_velocity, self._config.lag_tau_s
        )
        # Goals are already inside the limits; the clip only absorbs floating-point rounding.
        self._position = np.clip(moved, self._lower, self._upper)


def _parse_action(action: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(key for key in action if key not in SO101_KEYS)
    if unknown:
        raise ValueError(f"unknown action keys {unknown}; expected a subset of {list(SO101_KEYS)}")
    parsed: dict[str, float] = {}
    for key, raw in action.items():
        # Strings and bools would convert silently with float(); neither is a joint position.
        if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
            raise ValueError(f"action[{key!r}] = {raw!r} is not a number")
        value = float(raw)
        # A real driver must never forward NaN or inf to a servo; the sim enforces the same rule.
        if not math.isfinite(value):
            raise ValueError(f"action[{key!r}] = {raw!r} is not finite")
        parsed[key] = value
    return parsed


def _as_dict(values: np.ndarray) -> dict[str, float]:
    return dict(zip(SO101_KEYS, values.tolist(), strict=True))
