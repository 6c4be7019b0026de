"""Simulated SO101 leader and follower arms with LeRobot's device interface.

Lets every other service run, and be tested, without hardware. Nothing in this package may import
LeRobot or touch a serial port.
"""

from services.sim.follower import SimFollowerConfig, SimSO101Follower
from services.sim.leader import (
    SimLeaderConfig,
    SimSO101Leader,
    read_trajectory,
    record_trajectory,
    write_trajectory,
)
from services.sim.so101 import (
    SO101_JOINTS,
    SO101_KEYS,
    SO101_LIMITS,
    SO101_REST,
    DeviceAlreadyConnectedError,
    DeviceNotConnectedError,
)

__all__ = [
    "SO101_JOINTS",
    "SO101_KEYS",
    "SO101_LIMITS",
    "SO101_REST",
    "DeviceAlreadyConnectedError",
    "DeviceNotConnectedError",
    "SimFollowerConfig",
    "SimLeaderConfig",
    "SimSO101Follower",
    "SimSO101Leader",
    "read_trajectory",
    "record_trajectory",
    "write_trajectory",
]
