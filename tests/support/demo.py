"""deploy/demo.conf as tests run it: a local broker and two stations under one real supervisord.

`start_demo()` prepares the demo identities as `rdv demo` does, starts the config in a temp dir
on free ports, and waits until every program supervisord lists is running (the list comes from
supervisord, so a service added to demo.conf is waited for without editing a test). `buses()`
subscribes to the leader on the teleop station's bus and the follower on the robot's. Helpers
here only read a station from outside (bus, supervisord's XML-RPC); they must never signal a
process.
"""

from __future__ import annotations

from services.bus import Subscriber, load_bus_map
from services.demo import prepare_demo_identities
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
    station.wait_all_running(timeout_s)


def station_of_program(program: str) -> str | None:
    """robot_gateway -> robot; the demo's broker belongs to no station."""
    prefix = program.split("_", 1)[0]
    return prefix if prefix in STATIONS else None


def buses(station: Station) -> tuple[Subscriber, Subscriber]:
    """The leader as the teleop station publishes it, the follower as the robot does."""
    leader = Subscriber(load_bus_map(run_dir=station.run_dir / "teleop"), ["joints.leader"])
    follower = Subscriber(load_bus_map(run_dir=station.run_dir / "robot"), ["joints.follower"])
    return leader, follower
