"""Simulated SO101 leader arm with the device interface of LeRobot's `SO101Leader`, plus the
trajectory file format (JSON Lines) it can replay and the recorder that produces such files.

The leader plays a scripted motion against `clock()`: a smooth sweep of every joint, or a
recorded trajectory looped forever. This module must never import LeRobot, open a serial port or
sleep outside `record_trajectory` (whose sleep is injectable).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from services.sim.so101 import (
    SO101_KEYS,
    SO101_LIMITS,
    SO101_REST,
    DeviceAlreadyConnectedError,
    DeviceNotConnectedError,
    validate_limits,
)

SWEEP = "sweep"
TIME_KEY = "t"


@dataclass
class SimLeaderConfig:
    id: str = "sim_leader"
    port: str | None = None  # accepted for CLI symmetry with LeRobot, unused
    motion: str = SWEEP  # "sweep" or a path to a trajectory file (.jsonl)
    period_s: float = 6.0  # sweep period
    amplitude: float = 0.5  # fraction of each joint's half-range swept around its mid-point
    limits: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(SO101_LIMITS))

    def __post_init__(self) -> None:
        validate_limits(self.limits)
        if not self.motion:
            raise ValueError(f"motion must be {SWEEP!r} or a trajectory file path, got ''")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"period_s must be finite and > 0, got {self.period_s}")
        if not (0 <= self.amplitude <= 1):
            raise ValueError(f"amplitude must be in [0, 1], got {self.amplitude}")


class ActionSource(Protocol):
    """Anything with LeRobot's teleoperator `get_action()`: this sim leader or a real one."""

    def get_action(self) -> Mapping[str, Any]: ...


class SweepMotion:
    """Every joint swings sinusoidally around the mid-point of its range, each with its own phase.

    The sweep is blended in from the rest pose over the first period with a raised-cosine
    weight, so it starts exactly at rest with zero velocity instead of jumping to the sinusoid.
    Position is a convex mix of the rest pose and a point inside the limits, so it can never
    leave them and needs no clipping (clipping would put corners into the motion).
    """

    def __init__(
        self,
        limits: Mapping[str, tuple[float, float]],
        rest: Mapping[str, float],
        period_s: float,
        amplitude: float,
    ) -> None:
        lower = np.array([limits[key][0] for key in SO101_KEYS], dtype=float)
        upper = np.array([limits[key][1] for key in SO101_KEYS], dtype=float)
        self._mid = (lower + upper) / 2
        self._amplitude = amplitude * (upper - lower) / 2
        self._rest = np.clip(np.array([rest[key] for key in SO101_KEYS], dtype=float), lower, upper)
        # Phases spread over half a turn, not a full one: a full turn would put joint pairs in
        # exact antiphase, which moves them just as rigidly together as being in phase.
        self._phase = math.pi * np.arange(len(SO101_KEYS)) / len(SO101_KEYS)
        self._period_s = period_s

    def position_at(self, t: float) -> np.ndarray:
        t = max(t, 0.0)
        swing = self._mid + self._amplitude * np.sin(2 * math.pi * t / self._period_s + self._phase)
        blend = 0.5 * (1 - math.cos(math.pi * min(t / self._period_s, 1.0)))
        return self._rest + blend * (swing - self._rest)

    def peak_speed_bound(self) -> float:
        """Upper bound on any joint's speed (units/s): sinusoid speed plus the blend-in term."""
        omega = 2 * math.pi / self._period_s
        farthest = np.abs(self._mid - self._rest) + self._amplitude
        blend_rate = math.pi / (2 * self._period_s)
        return float(np.max(self._amplitude * omega + farthest * blend_rate))


class TrajectoryMotion:
    """Linear interpolation through recorded samples, looped forever.

    Playback starts at the first sample. After the last sample the motion returns to the first
    one over the mean sample interval, so the loop closes without a jump.
    """

    def __init__(
        self, samples: Sequence[Mapping[str, float]], limits: Mapping[str, tuple[float, float]]
    ) -> None:
        if len(samples) < 2:
            raise ValueError(f"a trajectory needs at least 2 samples, got {len(samples)}")
        lower = np.array([limits[key][0] for key in SO101_KEYS], dtype=float)
        upper = np.array([limits[key][1] for key in SO101_KEYS], dtype=float)
        times = np.array([float(sample[TIME_KEY]) for sample in samples])
        poses = np.array([[float(sample[key]) for key in SO101_KEYS] for sample in samples])
        # A recording from a real arm may stray past the sim's limits; the leader never reports
        # a position the arm could not take.
        poses = np.clip(poses, lower, upper)
        wrap_s = (times[-1] - times[0]) / (len(times) - 1)
        self._times = np.append(times, times[-1] + wrap_s)
        self._poses = np.vstack([poses, poses[:1]])
        self._loop_s = float(self._times[-1] - self._times[0])

    @property
    def loop_s(self) -> float:
        return self._loop_s

    def position_at(self, t: float) -> np.ndarray:
        playback_t = self._times[0] + math.fmod(max(t, 0.0), self._loop_s)
        return np.array(
            [np.interp(playback_t, self._times, self._poses[:, j]) for j in range(len(SO101_KEYS))]
        )


class SimSO101Leader:
    """Simulated SO101 leader: same keys, units and call contract as LeRobot's SO101Leader."""

    config_class = SimLeaderConfig
    name = "sim_so101_leader"

    def __init__(
        self, config: SimLeaderConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._motion: SweepMotion | TrajectoryMotion | None = None
        self._connected = False
        self._start_s = 0.0

    def __str__(self) -> str:
        return f"{self.id} {self.__class__.__name__}"

    @property
    def config(self) -> SimLeaderConfig:
        return self._config

    @property
    def id(self) -> str:
        return self._config.id

    @property
    def action_features(self) -> dict[str, type]:
        return {key: float for key in SO101_KEYS}

    @property
    def feedback_features(self) -> dict[str, type]:
        return {}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True

    def connect(self, calibrate: bool = True) -> None:
        """Load the motion (reading the trajectory file if any) and restart it from t = 0."""
        if self._connected:
            raise DeviceAlreadyConnectedError(f"{self} already connected")
        # The file is read here, not in __init__, so it may be written after the config is made;
        # a bad file still fails before the leader reports itself connected.
        self._motion = self._load_motion()
        if not self.is_calibrated and calibrate:
            self.calibrate()
        self.configure()
        self._start_s = self._clock()
        self._connected = True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def get_action(self) -> dict[str, float]:
        if not self._connected or self._motion is None:
            raise DeviceNotConnectedError(f"{self} is not connected.")
        position = self._motion.position_at(self._clock() - self._start_s)
        return dict(zip(SO101_KEYS, position.tolist(), strict=True))

    def send_feedback(self, feedback: dict[str, Any]) -> None:
        pass

    def disconnect(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(f"{self} is not connected.")
        self._connected = False

    def _load_motion(self) -> SweepMotion | TrajectoryMotion:
        if self._config.motion == SWEEP:
            return SweepMotion(
                self._config.limits, SO101_REST, self._config.period_s, self._config.amplitude
            )
        return TrajectoryMotion(read_trajectory(self._config.motion), self._config.limits)


def read_trajectory(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Read and validate a JSON Lines trajectory; errors name the file and line.

    Each non-blank line is an object with "t" (seconds, strictly increasing) and all six SO101
    keys as finite numbers. Other fields are ignored so the format can grow.
    """
    samples: list[dict[str, float]] = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
            samples.append(_parse_sample(record, where, samples[-1] if samples else None))
    if len(samples) < 2:
        raise ValueError(
            f"{os.fspath(path)}: a trajectory needs at least 2 samples, found {len(samples)}"
        )
    return samples


def write_trajectory(path: str | os.PathLike[str], samples: Sequence[Mapping[str, float]]) -> None:
    """Write samples as JSON Lines ("t" first, then SO101 keys), validated exactly as on read."""
    checked: list[dict[str, float]] = []
    for index, sample in enumerate(samples):
        where = f"sample {index} (line {index + 1})"
        checked.append(_parse_sample(sample, where, checked[-1] if checked else None))
    if len(checked) < 2:
        raise ValueError(f"a trajectory needs at least 2 samples, got {len(checked)}")
    with open(path, "w", encoding="utf-8") as file:
        for sample in checked:
            file.write(json.dumps(sample, allow_nan=False) + "\n")


def record_trajectory(
    device: ActionSource,
    seconds: float,
    rate_hz: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, float]]:
    """Sample `device.get_action()` at `rate_hz` for `seconds` (both ends included).

    Samples follow an absolute schedule so timing errors do not accumulate; "t" is the clock time
    actually read, which is what replay should reproduce. Works with any connected LeRobot-style
    leader.
    """
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be finite and > 0, got {seconds}")
    if not (rate_hz > 0 and math.isfinite(rate_hz)):
        raise ValueError(f"rate_hz must be finite and > 0, got {rate_hz}")
    count = math.floor(seconds * rate_hz + 1e-9) + 1
    if count < 2:
        raise ValueError(f"{seconds} s at {rate_hz} Hz gives fewer than 2 samples")
    samples: list[dict[str, float]] = []
    start_s = clock()
    for index in range(count):
        wait_s = start_s + index / rate_hz - clock()
        if wait_s > 0:
            sleep(wait_s)
        t = clock() - start_s
        action = device.get_action()
        # A coarse clock can return the same time twice; a trajectory needs strictly rising t.
        if samples and t <= samples[-1][TIME_KEY]:
            continue
        samples.append(_parse_sample({TIME_KEY: t, **action}, f"sample {index}", None))
    return samples


def _parse_sample(
    record: object, where: str, previous: Mapping[str, float] | None
) -> dict[str, float]:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    sample: dict[str, float] = {}
    for key in (TIME_KEY, *SO101_KEYS):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where}: {key!r} = {value!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{where}: {key!r} = {value!r} is not finite")
        sample[key] = float(value)
    if previous is not None and sample[TIME_KEY] <= previous[TIME_KEY]:
        raise ValueError(
            f"{where}: t = {sample[TIME_KEY]} is not greater than the previous t = "
            f"{previous[TIME_KEY]}"
        )
    return sample
