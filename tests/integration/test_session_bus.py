"""The session manager's bus contract with its gateway, between two real stations on Mosquitto.

The WebRTC gateway does not exist yet, so the test stands where it will stand: it binds the
gateway's endpoint on each station's bus, listens to `session.control` and answers on
`session.status`. Checked: connect events on pairing, `connected` -> live, the signaling relay
(offer and answer cross MQTT, signed, and come out on the peer's bus) and `closed` -> the
session ends and both stations pair again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from services.bus import MessageFrame, Publisher, Subscriber, load_bus_map
from tests.support.broker import Mosquitto
from tests.support.rendezvous import StationProcess, Stations, wait_until

pytestmark = pytest.mark.integration


class FakeGatewaySide:
    """The gateway's two bus sockets on one station: it hears control, it says status."""

    def __init__(self, station: StationProcess) -> None:
        bus = load_bus_map(run_dir=station.run_dir)
        self.station = station
        self.control = Subscriber(bus, ["session.control"])
        self.status = Publisher(bus, "gateway")
        self.events: list[dict[str, Any]] = []

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            received = self.control.recv(timeout_ms=remaining * 1000)
            if received is not None and isinstance(received.frame, MessageFrame):
                self.events.append(received.frame.fields)

    def say(self, **fields: Any) -> None:
        frame = MessageFrame(self.status.next_seq(), time.time_ns(), self.station.id, fields)
        self.status.send("session.status", frame)

    def last(self, event: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == event), None)

    def close(self) -> None:
        self.control.close()
        self.status.close()


@pytest.fixture
def pair() -> Iterator[tuple[Stations, FakeGatewaySide, FakeGatewaySide]]:
    broker = Mosquitto()
    broker.start()
    stations = Stations(broker.url)
    sides: list[FakeGatewaySide] = []
    try:
        robot = stations.add("robot-a", "robot")
        teleop = stations.add("teleop-a", "teleop")
        stations.trust_all()
        sides = [FakeGatewaySide(robot), FakeGatewaySide(teleop)]
        stations.start_all()
        yield stations, sides[0], sides[1]
    finally:
        for side in sides:
            side.close()
        stations.stop_all()
        broker.stop()


def pump_both(robot: FakeGatewaySide, teleop: FakeGatewaySide):
    def pump(seconds: float) -> None:
        robot.pump(seconds / 2)
        teleop.pump(seconds / 2)

    return pump


def test_session_events_live_signaling_relay_and_close(pair) -> None:
    stations, robot, teleop = pair
    pump = pump_both(robot, teleop)
    assert wait_until(lambda: robot.last("connect") and teleop.last("connect"), 20, pump=pump), (
        stations.logs()
    )
    robot_connect, teleop_connect = robot.last("connect"), teleop.last("connect")
    session = robot_connect["session"]
    assert teleop_connect["session"] == session
    assert (robot_connect["peer"], teleop_connect["peer"]) == ("teleop-a", "robot-a")
    assert (robot_connect["initiator"], teleop_connect["initiator"]) == (False, True)

    # The teleop's gateway offers; the offer crosses MQTT signed and reaches the robot's gateway.
    teleop.say(event="signal", kind="signal.offer", session=session, sdp="v=0 offer")
    assert wait_until(lambda: robot.last("signal"), 10, pump=pump), stations.logs()
    assert robot.last("signal") == {
        "event": "signal", "kind": "signal.offer", "session": session, "sdp": "v=0 offer",
    }  # fmt: skip
    robot.say(event="signal", kind="signal.answer", session=session, sdp="v=0 answer")
    assert wait_until(lambda: teleop.last("signal"), 10, pump=pump), stations.logs()
    assert teleop.last("signal")["sdp"] == "v=0 answer"

    robot_station = stations.stations["robot-a"]
    for side in (robot, teleop):
        side.say(event="connected", session=session)
    assert wait_until(
        lambda: robot_station.metric("rdv_session_state", {"state": "live"}) == 1, 10, pump=pump
    ), stations.logs()

    # The gateway closes (link lost for good): the session ends on both sides and they re-pair.
    robot.say(event="closed", session=session)
    assert wait_until(lambda: robot.last("disconnect"), 10, pump=pump), stations.logs()
    assert robot.last("disconnect")["session"] == session
    assert robot_station.metric("rdv_sessions_total", {"outcome": "gateway_closed"}) == 1
    assert wait_until(
        lambda: (c := teleop.last("connect")) is not None and c["session"] != session,
        20,
        pump=pump,
    ), stations.logs()
    assert teleop.last("disconnect")["session"] == session  # told by the robot's session.end
