"""Live status of a station's arms, read from its bus: what `rdv watch` and `rdv local` print.

A read-only subscriber: it must never publish on the bus it watches.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.bus import FollowerFrame, JointFrame, MessageFrame, Subscriber, load_bus_map

SEEN_MEMORY = 2000  # frame keys remembered for de-duplication: seconds of every stream


@dataclass
class ArmStatus:
    leader: JointFrame | None = None
    follower: FollowerFrame | None = None
    leader_frames: int = 0
    follower_frames: int = 0
    worst_error: float = 0.0  # largest |leader - follower| seen in this window, any joint
    states: set[str] = field(default_factory=set)
    sessions: dict[str, str] = field(default_factory=dict)  # station -> session summary
    seen: dict[tuple[str, str, int], None] = field(default_factory=dict)
    pages: dict[str, str] = field(default_factory=dict)  # viewer page of a live gateway, by role

    def take_health(self, frame: MessageFrame) -> None:
        fields = frame.fields
        page = fields.get("viewer")
        if fields.get("process") == "gateway" and fields.get("state") == "live" and page:
            self.pages[str(fields.get("role"))] = str(page)
        if fields.get("process") != "session_manager":
            return
        state, peer = fields.get("state"), fields.get("peer")
        self.sessions[frame.src] = f"{state} with {peer}" if peer else str(state)

    def take(self, topic: str, frame: object) -> None:
        # The demo's follower frames appear on both stations' buses (the teleop gateway
        # republishes them): count each frame once.
        key = (topic, getattr(frame, "src", ""), getattr(frame, "seq", -1))
        if key in self.seen:
            return
        self.seen[key] = None
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
        if self.follower is None and self.leader is None and not self.sessions:
            return "waiting for the station's arms on the bus..."
        parts = [f"{station}: {text}" for station, text in sorted(self.sessions.items())]
        parts += [
            f"leader {self.leader_frames / window_s:5.1f} Hz",
            f"follower {self.follower_frames / window_s:5.1f} Hz",
        ]
        if self.follower is not None:
            parts.append(f"state {'/'.join(sorted(self.states)):<9}")
            parts.append("pos " + " ".join(f"{value:7.1f}" for value in self.follower.pos))
        following = self.states & {"ramping", "tracking"}
        if self.leader is not None and self.follower is not None and following:
            parts.append(f"max error {self.worst_error:5.1f}")
        return " | ".join(parts)


def watch(
    run_dirs: list[Path],
    *,
    seconds: float | None = None,
    interval_s: float = 1.0,
    alive: Callable[[], bool] = lambda: True,
) -> int:
    """Print one status line per interval from the buses of one or more stations."""
    subscribers = [
        Subscriber(load_bus_map(run_dir=run_dir), ["joints.leader", "joints.follower", "health"])
        for run_dir in run_dirs
    ]
    in_place = sys.stdout.isatty()
    deadline = None if seconds is None else time.monotonic() + seconds
    announced: set[str] = set()
    seen: dict[tuple[str, str, int], None] = {}  # insertion-ordered: oldest dropped first
    try:
        while alive() and (deadline is None or time.monotonic() < deadline):
            status = ArmStatus()
            window_end = time.monotonic() + interval_s
            status.seen = seen  # across windows: a relayed copy may land in the next one
            while window_end > time.monotonic():
                for subscriber in subscribers:
                    first = subscriber.recv(timeout_ms=10)
                    if first is None:
                        continue
                    # Everything queued, every turn: one frame per bus per turn would let the
                    # busier bus fall behind and pair a fresh leader with an old follower.
                    for received in [first, *subscriber.drain()]:
                        if isinstance(received.frame, MessageFrame):
                            status.take_health(received.frame)
                        else:
                            status.take(received.topic, received.frame)
            while len(seen) > SEEN_MEMORY:
                seen.pop(next(iter(seen)))
            for role, page in sorted(status.pages.items()):
                if page not in announced:
                    announced.add(page)
                    what = "to watch and stop" if role == "teleop" else "to watch, stop, re-arm"
                    print("\r\x1b[2K" if in_place else "", end="")
                    print(f"Open {page} {what} ({role} station)")
            text = status.line(interval_s)
            print(f"\r\x1b[2K{text}" if in_place else text, end="" if in_place else "\n")
            sys.stdout.flush()
    finally:
        if in_place:
            print()
        for subscriber in subscribers:
            subscriber.close()
    return 0
