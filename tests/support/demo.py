"""deploy/demo.conf as tests run it: a local broker and two stations under one real supervisord.

`start_demo()` prepares the demo identities as `rdv demo` does, starts the config in a temp dir
on free ports, and waits until every program supervisord lists is running (the list comes from
supervisord, so a service added to demo.conf is waited for without editing a test). `buses()`
subscribes to the leader on the teleop station's bus and the follower on the robot's. Helpers
here only read a station from outside (bus, /metrics, supervisord's XML-RPC); they must never
signal a process.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.bus import Subscriber, load_bus_map
from services.demo import prepare_demo_identities
from services.station_runner import RPC_ERRORS
from tests.support.broker import free_port
from tests.support.station import Station

# demo.conf's RDV_STATION_PORT_OFFSET per station: the teleop serves metrics 100 ports up.
STATION_PORT_SHIFT = {"robot": 0, "teleop": 100}
STATIONS = tuple(STATION_PORT_SHIFT)


def demo_station(env: dict[str, str] | None = None) -> Station:
    """A demo Station (not started) on a free broker port, MQTT 5 (the demo runs Mosquitto)."""
    broker_port = free_port()
    return Station(
        "demo.conf",
        env={"RDV_BROKER_PORT": str(broker_port), "RDV_MQTT_VERSION": "5", **(env or {})},
    )


def start_demo(station: Station, timeout_s: float = 60.0) -> None:
    prepare_demo_identities(station.run_dir, station.env_broker_url)
    station.start([])  # returns at once: wait for what supervisord itself lists
    wait_all_running(station, timeout_s)


def program_infos(station: Station) -> dict[str, dict[str, Any]]:
    """name -> supervisord's process info, for every program of the running supervisord."""
    infos = {info["name"]: info for info in station.call("getAllProcessInfo")}
    station.child_pids.update(int(info["pid"]) for info in infos.values() if info["pid"])
    return infos


def wait_all_running(station: Station, timeout_s: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    infos: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        try:
            infos = program_infos(station)
        except RPC_ERRORS:  # supervisord's socket is not up yet
            infos = {}
        if infos and all(info["statename"] == "RUNNING" for info in infos.values()):
            return infos
        time.sleep(0.2)
    raise AssertionError(f"not every program is running: {station.status_text()}\n{station.logs()}")


def station_of_program(program: str) -> str | None:
    """robot_gateway -> robot; the demo's broker belongs to no station."""
    prefix = program.split("_", 1)[0]
    return prefix if prefix in STATIONS else None


def buses(station: Station) -> tuple[Subscriber, Subscriber]:
    """The leader as the teleop station publishes it, the follower as the robot does."""
    leader = Subscriber(load_bus_map(run_dir=station.run_dir / "teleop"), ["joints.leader"])
    follower = Subscriber(load_bus_map(run_dir=station.run_dir / "robot"), ["joints.follower"])
    return leader, follower


def metric_or_none(
    station: Station,
    which: str,
    process: str,
    name: str,
    labels: dict[str, str] | None = None,
    timeout_s: float = 1.0,
) -> float | None:
    """One sample of a demo station's process metrics; None when the process does not answer
    (restarting, or paused: a short time-out, so a SIGSTOPped process cannot stall a test)."""
    port = station.bus.metrics_port(process) + STATION_PORT_SHIFT[which]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(key) == value for key, value in (labels or {}).items()
            ):
                return sample.value
    return 0.0
