"""The station's local ZeroMQ bus: bus map, frames and PUB/SUB helpers."""

from services.bus.config import BusConfigError, BusMap, load_bus_map
from services.bus.frames import (
    SCHEMA_VERSION,
    FollowerFrame,
    Frame,
    FrameError,
    JointFrame,
    MessageFrame,
    VideoFrame,
)
from services.bus.pubsub import Publisher, Received, Subscriber

__all__ = [
    "SCHEMA_VERSION",
    "BusConfigError",
    "BusMap",
    "FollowerFrame",
    "Frame",
    "FrameError",
    "JointFrame",
    "MessageFrame",
    "Publisher",
    "Received",
    "Subscriber",
    "VideoFrame",
    "load_bus_map",
]
