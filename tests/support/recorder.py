"""Records two stations' buses in the background while a test breaks something.

A `BusRecorder` thread subscribes to the leader (teleop bus), the follower (robot bus) and both
`health` topics, and keeps every frame with the time it arrived, so a test can act (signal a
process, stop a broker) while nothing is missed, then judge the whole timeline afterwards. The
subscribers live and die on the recorder's own thread (ZeroMQ sockets are not shared). It only
reads buses; it must never publish or signal anything.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import clock
from services.bus import FollowerFrame, MessageFrame, Subscriber, load_bus_map
from tests.support.arm_checks import Sample


@dataclass(frozen=True)
class Health:
    station: str  # robot or teleop (which bus it came from)
    process: str
    fields: dict[str, Any]
    recv_ns: int


class BusRecorder:
    def __init__(self, run_dirs: dict[str, Path]) -> None:
        """run_dirs: station -> its bus run dir; the leader comes from "teleop", the follower
        from "robot"."""
        self._run_dirs = run_dirs
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._health: list[Health] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-recorder", daemon=True)

    def __enter__(self) -> BusRecorder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        subscribers = {
            "teleop": Subscriber(
                load_bus_map(run_dir=self._run_dirs["teleop"]), ["joints.leader", "health"]
            ),
            "robot": Subscriber(
                load_bus_map(run_dir=self._run_dirs["robot"]), ["joints.follower", "health"]
            ),
        }
        self._ready.set()
        try:
            while not self._stop.is_set():
                got = False
                for station, subscriber in subscribers.items():
                    received = subscriber.recv(timeout_ms=5)
                    batch = [] if received is None else [received, *subscriber.drain()]
                    got |= bool(batch)
                    for item in batch:
                        self._keep(station, item.topic, item.frame, item.recv_ns)
                if not got:
                    time.sleep(0.002)
        finally:
            for subscriber in subscribers.values():
                subscriber.close()

    def _keep(self, station: str, topic: str, frame: Any, recv_ns: int) -> None:
        with self._lock:
            if topic == "health" and isinstance(frame, MessageFrame):
                fields = dict(frame.fields)
                self._health.append(Health(station, str(fields.get("process")), fields, recv_ns))
            elif topic != "health":
                self._samples.append(Sample(topic, frame, recv_ns))

    # --- reading ---------------------------------------------------------------------------

    def samples(self, since_ns: int = 0) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples if s.recv_ns >= since_ns]

    def followers(self, since_ns: int = 0) -> list[tuple[int, FollowerFrame]]:
        """(received at, frame) of every follower frame since `since_ns`."""
        return [
            (s.recv_ns, s.frame)
            for s in self.samples(since_ns)
            if isinstance(s.frame, FollowerFrame)
        ]

    def latest_health(self, station: str, process: str, since_ns: int = 0) -> Health | None:
        with self._lock:
            for beat in reversed(self._health):
                if beat.recv_ns < since_ns:
                    return None
                if beat.station == station and beat.process == process:
                    return beat
        return None

    def health_since(self, since_ns: int, process: str) -> list[Health]:
        with self._lock:
            return [b for b in self._health if b.recv_ns >= since_ns and b.process == process]

    def session(self, since_ns: int = 0) -> str | None:
        """The session both session managers report live, from health sent since `since_ns`."""
        beats = [self.latest_health(s, "session_manager", since_ns) for s in ("robot", "teleop")]
        if any(beat is None or beat.fields.get("state") != "live" for beat in beats):
            return None
        sessions = {beat.fields.get("session") for beat in beats if beat is not None}
        return sessions.pop() if len(sessions) == 1 else None

    def tracking_since(self, hold_s: float) -> int | None:
        """Start (received at) of the current unbroken run of `tracking` follower frames, if it
        has lasted `hold_s`: no other state and no gap of more than 5 ticks in it."""
        frames = self.followers(clock.now_ns() - int((hold_s + 5) * 1e9))
        if not frames or frames[-1][1].state != "tracking":
            return None
        start = frames[-1][0]
        for (before_ns, before), (after_ns, _after) in zip(
            reversed(frames[:-1]), reversed(frames[1:]), strict=True
        ):
            if before.state != "tracking" or after_ns - before_ns > 50_000_000:
                break
            start = before_ns
        if frames[-1][0] - start < hold_s * 1e9:
            return None
        return start
