"""Live status of a station's arms, read from its bus: what `rdv watch` and `rdv local` print.

A read-only subscriber: it must never publish on the bus it watches.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.bus import FollowerFrame, JointFrame, Subscriber, load_bus_map


@dataclass
class ArmStatus:
    leader: JointFrame | None = None
    follower: FollowerFrame | None = None
    leader_frames: int = 0
    follower_frames: int = 0
    worst_error: float = 0.0  # largest |leader - follower| seen in this window, any joint
    states: set[str] = field(default_factory=set)

    def take(self, topic: str, frame: object) -> None:
        if topic == "joints.leader" and isinstance(frame, JointFrame):
            self.leader = frame
            self.leader_frames += 1
        elif topic == "joints.follower" and isinstance(frame, FollowerFrame):
            self.follower = frame
            self.follower_frames += 1
            self.states.add(frame.state)
            if self.leader is not None and len(self.leader.pos) == len(frame.pos):
                error = max(abs(a - b) for a, b in zip(self.leader.pos, frame.pos, strict=True))
                self.worst_error = max(self.worst_error, error)

    def line(self, window_s: float) -> str:
        if self.follower is None and self.leader is None:
            return "waiting for the station's arms on the bus..."
        parts = [
            f"leader {self.leader_frames / window_s:5.1f} Hz",
            f"follower {self.follower_frames / window_s:5.1f} Hz",
        ]
        if self.follower is not None:
            parts.append(f"state {'/'.join(sorted(self.states)):<9}")
            parts.append("pos " + " ".join(f"{value:7.1f}" for value in self.follower.pos))
        if self.leader is not None and self.follower is not None:
            parts.append(f"max error {self.worst_error:5.1f}")
        return " | ".join(parts)


def watch(
    run_dir: Path,
    *,
    seconds: float | None = None,
    interval_s: float = 1.0,
    alive: Callable[[], bool] = lambda: True,
) -> int:
    bus = load_bus_map(run_dir=run_dir)
    subscriber = Subscriber(bus, ["joints.leader", "joints.follower"])
    in_place = sys.stdout.isatty()
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while alive() and (deadline is None or time.monotonic() < deadline):
            status = ArmStatus()
            window_end = time.monotonic() + interval_s
            while (remaining := window_end - time.monotonic()) > 0:
                received = subscriber.recv(timeout_ms=remaining * 1000)
                if received is not None:
                    status.take(received.topic, received.frame)
            text = status.line(interval_s)
            print(f"\r\x1b[2K{text}" if in_place else text, end="" if in_place else "\n")
            sys.stdout.flush()
    finally:
        if in_place:
            print()
        subscriber.close()
    return 0
