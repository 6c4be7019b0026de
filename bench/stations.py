"""Two full stations for a benchmark: deploy/demo.conf under real supervisord, and taps on
their buses.

`DemoStations` runs the demo config unchanged through the shared runner
(services.station_runner.Station): its own Mosquitto on a free port (the config's `broker`
program), a robot station (sim follower, session manager, WebRTC gateway) and a teleop station
(sim leader, session manager, gateway) that pair over MQTT and talk over aiortc. `BusTap`
records frames from the stations' buses, each stamped by the receiving thread the moment it
arrives. Nothing here may signal a process the runner did not start.
"""

from __future__ import annotations

import queue
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.bus import BusMap, FollowerFrame, Subscriber, load_bus_map
from services.demo import prepare_demo_identities
from services.fleet import FleetWatcher
from services.session_manager.presence import (
    Presence,
    PresenceError,
    decode_presence,
    station_of,
)
from services.station_runner import Station, StationError
from tests.support.broker import free_port

# The programs a bench relies on; others demo.conf runs (a camera) are started and waited for too.
PROGRAMS = (
    "broker",
    "robot_arm",
    "robot_session",
    "robot_gateway",
    "teleop_session",
    "teleop_gateway",
    "teleop_arm",
)
TELEOP_METRICS_OFFSET = 100  # demo.conf: RDV_STATION_PORT_OFFSET of the teleop station


class DemoStations:
    """A broker plus a robot and a teleop station, as `rdv demo` runs them, in a temp dir."""

    def __init__(self, rate_hz: float | None = None, log_level: str = "WARNING") -> None:
        self.broker_port = free_port()
        env = {
            "RDV_BROKER_PORT": str(self.broker_port),
            "RDV_MQTT_VERSION": "5",
            # INFO logs a line per state change; a bench keeps the services' own I/O small.
            "RDV_LOG_LEVEL": log_level,
        }
        if rate_hz is not None:
            # Both arm drivers read RDV_<PROCESS>_ARGS after their command line: the leader is
            # read, and the follower ticked, at this rate (`rdv robot/teleop --rate`).
            flags = shlex.join(["--rate", f"{rate_hz:g}"])
            env["RDV_LEADER_ARM_ARGS"] = flags
            env["RDV_FOLLOWER_ARM_ARGS"] = flags
        self.station = Station("demo.conf", env=env)
        self.broker_url = f"mqtt://127.0.0.1:{self.broker_port}"
        self.identities: dict[str, Any] = {}

    @property
    def run_dir(self) -> Path:
        return self.station.run_dir

    def bus(self, side: str) -> BusMap:
        """The bus map of one station ("robot" or "teleop"), as its services load it."""
        return load_bus_map(run_dir=self.run_dir / side, port_offset=self.station.port_offset)

    def start(self, timeout_s: float, cameras: bool = True) -> dict[str, int]:
        """Start every program of demo.conf and wait until all run; returns name -> pid.
        cameras=False stops the camera programs (no video on the link) once they run."""
        self.identities = prepare_demo_identities(self.run_dir, self.broker_url)
        self.station.start([])
        infos = self.station.wait_all_running(timeout_s)
        missing = [name for name in PROGRAMS if name not in infos]
        if missing:
            raise StationError(f"demo.conf has no program {missing}")
        if not cameras:
            for name in infos:
                if name.endswith("_camera"):
                    self.station.call("stopProcess", name, True)
        return {name: int(info["pid"]) for name, info in infos.items() if info["pid"]}

    def metrics(self, side: str, process: str, prefix: str) -> dict[str, float]:
        offset = TELEOP_METRICS_OFFSET if side == "teleop" else 0
        return self.station.metric_samples(process, prefix, station_offset=offset)

    def stop(self) -> None:
        self.station.stop()


@dataclass(frozen=True, slots=True)
class Seen:
    side: str  # which station's bus
    topic: str
    frame: Any
    recv_ns: int  # wall clock at receipt, same clock as the frames' `t` on one machine


class Recorder:
    """Things seen, in arrival order, with waiting for the first that matches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.seen: list[Any] = []

    def add(self, item: Any) -> None:
        with self._cond:
            self.seen.append(item)
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.seen)

    def since(self, index: int) -> list[Seen]:
        with self._cond:
            return self.seen[index:]

    def wait_for(
        self, predicate: Callable[[Any], bool], timeout_s: float, start: int | None = None
    ) -> Any:
        """The first frame from `start` (default: now) on that satisfies predicate, or None."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            index = len(self.seen) if start is None else start
            while True:
                while index < len(self.seen):
                    item = self.seen[index]
                    index += 1
                    if predicate(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(timeout=min(left, 0.1))


class BusTap(Recorder):
    """Subscribes to station buses, one thread per bus (a ZeroMQ socket stays on the thread
    that made it), so a frame on one bus is never stamped late while the tap waits on another."""

    def __init__(self, feeds: dict[str, tuple[BusMap, list[str]]]) -> None:
        super().__init__()
        self._feeds = feeds
        self._stop = threading.Event()
        self._ready = threading.Barrier(len(feeds) + 1)
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> BusTap:
        for side, (bus, topics) in self._feeds.items():
            thread = threading.Thread(
                target=self._run, args=(side, bus, topics), name=f"tap-{side}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._ready.wait(timeout=10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self, side: str, bus: BusMap, topics: list[str]) -> None:
        subscriber = Subscriber(bus, topics)
        try:
            self._ready.wait(timeout=10)
            while not self._stop.is_set():
                received = subscriber.recv(timeout_ms=50)
                if received is not None:
                    self.add(Seen(side, received.topic, received.frame, received.recv_ns))
        finally:
            subscriber.close()


@dataclass(frozen=True, slots=True)
class Sighting:
    station: str
    presence: Presence | None  # None: the retained presence was cleared
    recv_ns: int


class PresenceLog(Recorder):
    """Every presence message of the demo's stations as a read-only watcher receives it: the
    FleetWatcher `rdv fleet` runs, with the teleop's identity (same owner)."""

    def __init__(self, identity: Any) -> None:
        super().__init__()
        self.watcher = FleetWatcher(identity, mqtt_version="5", interval_s=1.0, skew_s=2.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)

    def __enter__(self) -> PresenceLog:
        self.watcher.start()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.watcher.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.watcher.events.get(timeout=0.05)
            except queue.Empty:
                continue
            now_ns = time.time_ns()
            if event[0] != "message":
                continue
            station = station_of(event[1], self.watcher.owner, "presence")
            if station is None:
                continue
            try:
                presence = decode_presence(event[2]) if event[2] else None
            except PresenceError:
                continue
            self.add(Sighting(station, presence, now_ns))


def online_since(station: str, since_ns: int) -> Callable[[Sighting], bool]:
    """Predicate: `station` announced itself online at or after since_ns (its own `ts`)."""

    def check(item: Sighting) -> bool:
        p = item.presence
        return (
            item.station == station
            and p is not None
            and p.status == "online"
            and (p.ts * 1e9 >= since_ns)
        )

    return check


def follower_state(side: str, state: str) -> Callable[[Seen], bool]:
    """Predicate: a follower frame in `state` on `side`'s bus."""

    def check(seen: Seen) -> bool:
        return (
            seen.side == side
            and isinstance(seen.frame, FollowerFrame)
            and seen.frame.state == state
        )

    return check
