"""The pure parts of services/fleet_exporter.py: a PresenceBoard counted into gauge values.

No broker and no network here: boards are filled by hand, gauges read back from the exporter's
own registry. The live exporter (broker, HTTP, Prometheus) is tests/integration/test_monitoring.py.
"""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

from prometheus_client import generate_latest

from services import metrics
from services.fleet_exporter import (
    EXIT_UNAVAILABLE,
    FleetGauges,
    fleet_registry,
    last_seen,
    presence_counts,
    run_fleet_exporter,
)
from services.session_manager.presence import Presence, PresenceBoard

WALL = 1_700_000_000.0
NOW = 500.0


def presence(role: str, status: str = "online", ts: float = WALL) -> Presence:
    return Presence(
        status=status,
        role=role,
        robot_type="so101_follower" if role == "robot" else "so101_leader",
        joints=("shoulder_pan.pos",),
        cameras=(),
        busy=False,
        session=None,
        version="0.1.0",
        pubkey="k",
        ts=ts,
    )


def board_of_four() -> PresenceBoard:
    board = PresenceBoard(interval_s=1.0, skew_s=2.0)
    board.update("robot-a", presence("robot", ts=WALL - 0.5), NOW - 0.5)  # online
    board.update("robot-b", presence("robot", "offline", ts=WALL - 60), NOW - 60)  # clean stop
    board.update("robot-c", presence("robot", ts=WALL - 10), NOW - 10)  # silent: stale
    board.update("teleop-a", presence("teleop", ts=WALL - 1), NOW - 1)  # online
    return board


def test_counts_every_role_and_status_including_zeros() -> None:
    counts = presence_counts(board_of_four(), NOW, WALL)
    assert counts == {
        ("robot", "online"): 1,
        ("robot", "offline"): 1,
        ("robot", "stale"): 1,
        ("teleop", "online"): 1,
        ("teleop", "offline"): 0,
        ("teleop", "stale"): 0,
    }


def test_empty_board_counts_zero_everywhere() -> None:
    counts = presence_counts(PresenceBoard(), NOW, WALL)
    assert len(counts) == 6 and set(counts.values()) == {0}


def test_stale_by_wall_clock_age_even_when_messages_arrive() -> None:
    """A retained presence whose `ts` stopped moving is stale, however recently it arrived."""
    board = PresenceBoard(interval_s=1.0, skew_s=2.0)
    board.update("robot-z", presence("robot", ts=WALL - 30), NOW)
    assert presence_counts(board, NOW, WALL)[("robot", "stale")] == 1


def test_last_seen_is_seconds_since_ts_and_never_negative() -> None:
    board = board_of_four()
    board.update("teleop-b", presence("teleop", ts=WALL + 5), NOW)  # clock ahead of ours
    seen = last_seen(board, WALL)
    assert seen[("robot-a", "robot")] == 0.5
    assert seen[("robot-b", "robot")] == 60.0
    assert seen[("teleop-b", "teleop")] == 0.0
    assert len(seen) == 5


def test_gauges_follow_the_board_and_drop_departed_stations() -> None:
    registry = fleet_registry()
    gauges = FleetGauges()
    board = board_of_four()
    gauges.update(board, NOW, WALL)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("rdv_presence_stations", role="robot", status="stale") == 1
    assert value("rdv_presence_stations", role="teleop", status="offline") == 0
    assert value("rdv_station_last_seen_seconds", station="robot-b", role="robot") == 60.0

    board.update("robot-b", None, NOW)  # empty retained presence: the station is gone
    gauges.update(board, NOW, WALL)
    assert value("rdv_station_last_seen_seconds", station="robot-b", role="robot") is None
    assert value("rdv_presence_stations", role="robot", status="offline") == 0
    assert value("rdv_station_last_seen_seconds", station="robot-a", role="robot") == 0.5


def test_registry_serves_only_fleet_families() -> None:
    """No meaningless zeros from the station metrics a process gets by importing them."""
    assert metrics.WATCHDOG_TRIPS is not None  # registered in the default registry, not here
    text = generate_latest(fleet_registry()).decode()
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE rdv_")}
    assert families == {
        "rdv_presence_stations",
        "rdv_station_last_seen_seconds",
        "rdv_mqtt_connected",
    }


def test_a_taken_metrics_port_is_an_exit_not_a_hang() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = SimpleNamespace(
            metrics_port=taken.getsockname()[1],
            mqtt_version="5",
            presence_interval=1.0,
            clock_skew=2.0,
        )
        identity = SimpleNamespace(owner="nobody")  # never reached: the port fails first
        code = run_fleet_exporter(args, identity, stop=threading.Event())
    assert code == EXIT_UNAVAILABLE
