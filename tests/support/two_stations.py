"""Two stations as on two machines: deploy/robot.conf and deploy/teleop.conf, unchanged, each
under its own real supervisord (separate process trees, separate bus dirs), one real Mosquitto
between them, WebRTC on loopback.

Identities are made as `rdv demo` makes them (owner "demo", trusting each other) in the robot's
temp dir, before either station starts: a session manager reads its trust roster at start.
`two_stations()` stops exactly what it started (both supervisords, the broker), even on failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.demo import prepare_demo_identities
from tests.support.broker import Mosquitto
from tests.support.station import Station

ROBOT_PROGRAMS = ["follower_arm", "session_manager", "gateway"]
TELEOP_PROGRAMS = ["leader_arm", "session_manager", "gateway"]


@dataclass
class Pair:
    robot: Station
    teleop: Station

    def logs(self) -> str:
        return f"{self.robot.logs()}\n{self.teleop.logs()}"


@contextmanager
def two_stations(
    *,
    robot_env: dict[str, str] | None = None,
    teleop_env: dict[str, str] | None = None,
    robot_programs: list[str] = ROBOT_PROGRAMS,
    teleop_programs: list[str] = TELEOP_PROGRAMS,
) -> Iterator[Pair]:
    """Both stations started and paired-to-be; no cameras unless robot_env gives RDV_CAMERAS."""
    stations: list[Station] = []
    with Mosquitto() as broker:
        try:
            common = {"RDV_MQTT_VERSION": "5", "RDV_ICE_HOSTS": "127.0.0.1", "RDV_CAMERAS": ""}
            robot = Station("robot.conf", env={**common, **(robot_env or {})})
            stations.append(robot)
            identities = robot.root / "identities"
            prepare_demo_identities(identities, broker.url)
            robot.env["RDV_CONFIG_DIR"] = str(identities / "robot" / "config")
            robot.start(robot_programs)
            # Made after the robot started, so its free port offset avoids the robot's ports.
            teleop = Station("teleop.conf", env={**common, **(teleop_env or {})})
            stations.append(teleop)
            teleop.env["RDV_CONFIG_DIR"] = str(identities / "teleop" / "config")
            teleop.start(teleop_programs)
            yield Pair(robot, teleop)
        finally:
            for station in reversed(stations):
                station.stop()
