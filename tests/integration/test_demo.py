"""deploy/demo.conf under real supervisord: local broker + robot and teleop stations pair.

This is what `make demo` runs (identities prepared as `rdv demo` prepares them), checked from
outside: presence on the demo's broker, `rdv fleet` as a user types it, and both station buses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.bus import FollowerFrame, JointFrame, Subscriber, load_bus_map
from services.demo import prepare_demo_identities
from services.fleet import FleetWatcher
from tests.support.broker import free_port
from tests.support.rendezvous import wait_until
from tests.support.station import Station

pytestmark = pytest.mark.integration
RDV = str(Path(sys.executable).parent / "rdv")
PROGRAMS = ["broker", "robot_arm", "robot_session", "teleop_session", "teleop_arm"]


@pytest.fixture
def demo() -> Iterator[Station]:
    broker_port = free_port()
    station = Station(
        "demo.conf", env={"RDV_BROKER_PORT": str(broker_port), "RDV_MQTT_VERSION": "5"}
    )
    try:
        prepare_demo_identities(station.run_dir, f"mqtt://127.0.0.1:{broker_port}")
        station.start(PROGRAMS)
        yield station
    finally:
        station.stop()


def test_demo_stations_pair_and_fleet_lists_both(demo: Station) -> None:
    identities = prepare_demo_identities(demo.run_dir, demo.env_broker_url)
    watcher = FleetWatcher(identities["teleop"], mqtt_version="5", interval_s=1.0, skew_s=2.0)
    watcher.start()
    try:

        def paired() -> bool:
            stations = watcher.board.stations
            if set(stations) != {"demo-robot", "demo-teleop"}:
                return False
            robot, teleop = (stations[s].presence for s in ("demo-robot", "demo-teleop"))
            return robot.busy and robot.session is not None and robot.session == teleop.session

        assert wait_until(paired, 30, pump=watcher.pump), demo.logs()
    finally:
        watcher.stop()

    listing = subprocess.run(
        [RDV, "fleet", "--json", "--config-dir", str(demo.run_dir / "teleop" / "config")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    rows = {row["station"]: row for row in json.loads(listing.stdout)}
    assert set(rows) == {"demo-robot", "demo-teleop"}
    assert {rows["demo-robot"]["role"], rows["demo-teleop"]["role"]} == {"robot", "teleop"}
    assert all(row["status"] == "online" for row in rows.values())

    # Each station has its own bus: the leader on the teleop's, the follower on the robot's.
    robot_bus = Subscriber(load_bus_map(run_dir=demo.run_dir / "robot"), ["joints.follower"])
    teleop_bus = Subscriber(load_bus_map(run_dir=demo.run_dir / "teleop"), ["joints.leader"])
    try:
        deadline = time.monotonic() + 10
        seen: set[type] = set()
        while time.monotonic() < deadline and len(seen) < 2:
            for subscriber in (robot_bus, teleop_bus):
                received = subscriber.recv(timeout_ms=50)
                if received is not None:
                    seen.add(type(received.frame))
        assert seen == {FollowerFrame, JointFrame}
    finally:
        robot_bus.close()
        teleop_bus.close()
