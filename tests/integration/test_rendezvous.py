"""Presence, discovery and pairing between real session-manager processes on a real broker.

Run against Mosquitto (MQTT v5) and amqtt (the embedded Python broker, MQTT 3.1.1). The test
sees the stations only from outside: their retained presence on the broker (through the same
watcher `rdv fleet` uses), their /metrics, and `rdv fleet` itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.fleet import FleetWatcher
from services.session_manager.identity import register
from services.session_manager.presence import inbox_topic
from services.session_manager.signing import sign_envelope
from services.sim import SO101_KEYS
from tests.support.broker import AmqttBroker, Mosquitto
from tests.support.rendezvous import INTERVAL_S, Stations, wait_until

pytestmark = pytest.mark.integration
RDV = str(Path(sys.executable).parent / "rdv")


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> Iterator[Mosquitto | AmqttBroker]:
    broker = Mosquitto() if request.param == "mosquitto" else AmqttBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def stations_for(broker: Mosquitto | AmqttBroker) -> Stations:
    return Stations(broker.url, mqtt_version="3.1.1" if isinstance(broker, AmqttBroker) else "5")


def sessions(watcher: FleetWatcher, names: list[str]) -> dict[str, str | None]:
    out = {}
    for name in names:
        sighting = watcher.board.stations.get(name)
        out[name] = None if sighting is None else sighting.presence.session
    return out


def test_two_robots_and_two_teleops_pair_into_two_sessions(broker) -> None:
    stations = stations_for(broker)
    try:
        for name, role in [("robot-a", "robot"), ("robot-b", "robot"),
                           ("teleop-a", "teleop"), ("teleop-b", "teleop")]:  # fmt: skip
            stations.add(name, role)
        stations.trust_all()
        stations.start_all()
        watcher = stations.watcher()
        names = list(stations.stations)

        def paired() -> bool:
            now = sessions(watcher, names)
            robots = {now["robot-a"], now["robot-b"]}
            teleops = {now["teleop-a"], now["teleop-b"]}
            return None not in robots and len(robots) == 2 and robots == teleops

        assert wait_until(paired, 20, pump=watcher.pump), (
            sessions(watcher, names),
            stations.logs(),
        )
        # Stable: nobody re-pairs or steals while the sessions are up.
        before = sessions(watcher, names)
        watcher.pump(2.0)
        assert sessions(watcher, names) == before

        listing = subprocess.run(
            [RDV, "fleet", "--json", "--config-dir", str(stations.stations["robot-a"].config_dir),
             "--mqtt-version", stations.mqtt_version, "--presence-interval", str(INTERVAL_S)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listing.returncode == 0, listing.stderr
        rows = {row["station"]: row for row in json.loads(listing.stdout)}
        assert set(rows) == set(names)
        assert all(row["status"] == "online" and row["busy"] for row in rows.values())
        assert rows["robot-a"]["joints"] == list(SO101_KEYS)
        watcher.stop()
    finally:
        stations.stop_all()


def test_three_teleops_racing_for_one_robot_make_exactly_one_session(broker) -> None:
    stations = stations_for(broker)
    try:
        stations.add("robot-a", "robot")
        for index in range(3):
            stations.add(f"teleop-{index}", "teleop")
        stations.trust_all()
        stations.start_all()
        watcher = stations.watcher()
        teleops = [f"teleop-{index}" for index in range(3)]

        def one_session() -> bool:
            now = sessions(watcher, ["robot-a", *teleops])
            return (
                now["robot-a"] is not None and [now[t] for t in teleops].count(now["robot-a"]) == 1
            )

        assert wait_until(one_session, 20, pump=watcher.pump), stations.logs()
        for _ in range(20):  # for 2 s, never a second session on the robot
            watcher.pump(0.1)
            now = sessions(watcher, ["robot-a", *teleops])
            holders = [t for t in teleops if now[t] is not None]
            assert len(holders) == 1 and now[holders[0]] == now["robot-a"], now
        watcher.stop()
    finally:
        stations.stop_all()


def test_killed_session_manager_is_offline_within_a_second_and_peer_repairs(broker) -> None:
    stations = stations_for(broker)
    try:
        robot_a = stations.add("robot-a", "robot")
        stations.add("robot-b", "robot")
        stations.add("teleop-a", "teleop")
        stations.trust_all()
        stations.start(robot_a)
        stations.start(stations.stations["teleop-a"])
        watcher = stations.watcher()
        assert wait_until(
            lambda: sessions(watcher, ["teleop-a"])["teleop-a"] is not None, 20, pump=watcher.pump
        ), stations.logs()
        stations.start(stations.stations["robot-b"])
        assert wait_until(
            lambda: watcher.board.status("robot-b", time.monotonic()) == "online",
            10,
            pump=watcher.pump,
        )

        killed_at = time.monotonic()
        stations.stop(robot_a, signal.SIGKILL)
        assert wait_until(
            lambda: watcher.board.status("robot-a", time.monotonic()) == "offline",
            5,
            pump=watcher.pump,
            interval_s=0.02,
        )
        offline_after_s = time.monotonic() - killed_at
        assert watcher.board.stations["robot-a"].presence.status == "offline"  # the will fired
        print(f"SIGKILL -> offline seen after {offline_after_s * 1000:.0f} ms")
        assert offline_after_s <= 1.0, offline_after_s

        # The teleop notices, ends the session and pairs with the robot that is left.
        assert wait_until(
            lambda: (
                sessions(watcher, ["teleop-a", "robot-b"])["teleop-a"]
                == sessions(watcher, ["robot-b"])["robot-b"]
                is not None
            ),
            15,
            pump=watcher.pump,
        ), stations.logs()
        watcher.stop()
    finally:
        stations.stop_all()


def test_stopped_station_is_stale_within_three_intervals_then_comes_back(broker) -> None:
    stations = stations_for(broker)
    try:
        robot = stations.add("robot-a", "robot")
        stations.add("teleop-a", "teleop")
        stations.trust_all()
        stations.start_all()
        watcher = stations.watcher()
        assert wait_until(
            lambda: sessions(watcher, ["robot-a"])["robot-a"] is not None, 20, pump=watcher.pump
        ), stations.logs()
        first_session = sessions(watcher, ["robot-a"])["robot-a"]

        stopped_at = time.monotonic()
        robot.process.send_signal(signal.SIGSTOP)
        try:
            assert wait_until(
                lambda: watcher.board.status("robot-a", time.monotonic()) == "stale",
                10,
                pump=watcher.pump,
                interval_s=0.05,
            )
            stale_after_s = time.monotonic() - stopped_at
            print(f"SIGSTOP -> stale after {stale_after_s * 1000:.0f} ms (interval {INTERVAL_S} s)")
            # 3 intervals of silence, plus up to one interval since the last refresh.
            assert stale_after_s <= 4 * INTERVAL_S + 0.5, stale_after_s
            # The paired teleop gives the session up on its own (peer lost).
            assert wait_until(
                lambda: sessions(watcher, ["teleop-a"])["teleop-a"] is None, 10, pump=watcher.pump
            ), stations.logs()
        finally:
            robot.process.send_signal(signal.SIGCONT)
        # Back: both sides free up and pair again, the teleop preferring its last partner.
        assert wait_until(
            lambda: (
                (now := sessions(watcher, ["robot-a", "teleop-a"]))["robot-a"] is not None
                and now["robot-a"] == now["teleop-a"]
                and now["robot-a"] != first_session
            ),
            30,
            pump=watcher.pump,
        ), stations.logs()
        watcher.stop()
    finally:
        stations.stop_all()


def test_forged_replayed_tampered_and_stale_messages_are_rejected_and_counted(broker) -> None:
    stations = stations_for(broker)
    try:
        robot = stations.add("robot-a", "robot")
        friend = stations.add("teleop-a", "teleop")  # trusted, but not running: the test speaks
        stations.trust_all()
        stranger, _ = register(
            stations.root / "stranger", owner="alice", broker_url=broker.url, station_id="teleop-x"
        )
        stations.start(robot)
        watcher = stations.watcher()
        assert wait_until(
            lambda: watcher.board.status("robot-a", time.monotonic()) == "online",
            10,
            pump=watcher.pump,
        )
        topic = inbox_topic("alice", robot.id)
        request = {"session": "s1", "joints": list(SO101_KEYS), "reply_to": "x", "corr": "c1"}

        def rejected(reason: str) -> float:
            return robot.metric("rdv_signaling_rejected_total", {"reason": reason})

        valid = sign_envelope(friend.identity, "session.request", robot.id, request)
        tampered = valid.replace(b'"c1"', b'"c2"')
        forged = sign_envelope(stranger, "session.request", robot.id, request)
        stale = sign_envelope(
            friend.identity, "session.request", robot.id, request, now=time.time() - 120
        )
        cases = [
            (valid, None),
            (valid, "replay"),
            (tampered, "bad_signature"),
            (forged, "untrusted"),
            (stale, "stale"),
            (b"\x00garbage", "malformed"),
        ]
        for payload, reason in cases:
            before = rejected(reason) if reason else 0.0
            watcher.client.publish(topic, payload, qos=1)
            if reason:
                assert wait_until(lambda r=reason, b=before: rejected(r) > b, 10), (
                    reason,
                    robot.log(),
                )
            else:
                time.sleep(0.5)
        assert robot.process.poll() is None, "bad messages ended the session manager"
        watcher.pump(0.5)
        assert sessions(watcher, ["robot-a"])["robot-a"] is None, "a bad message paired the robot"
        watcher.stop()
    finally:
        stations.stop_all()
