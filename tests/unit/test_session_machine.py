"""Unit tests for the session state machine (services/session_manager/session.py).

Several SessionMachine instances, robots and teleops, are wired together by a tiny in-test
network: every `Send` a machine emits is delivered to the addressed machine's `on_message` with
the sender's id, and a shared PresenceBoard is kept in step with each machine's `busy` flag
whenever it reports `presence_changed`, the way the session manager republishes presence.
Monotonic time is a plain number the tests move; presence `ts` is the real wall clock, so the
board only goes stale when a test stops refreshing a station. Nothing sleeps.

Covers the happy path to `live` and back, joints/--peer/busy filtering, races at one robot and
between several, every time-out, late and forged answers, re-pairing with the last partner,
robot idempotence and `not_ready`, the signaling relay and shutdown.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.session_manager.presence import Presence, PresenceBoard, inbox_topic
from services.session_manager.session import (
    OUTCOMES,
    Actions,
    Send,
    SessionMachine,
    Timeouts,
)

OWNER = "alice"
JOINTS = ("shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "gripper.pos")
OTHER_JOINTS = ("joint_1.pos", "joint_2.pos")
START = 1000.0
T = Timeouts()


@dataclass
class Station:
    machine: SessionMachine
    status: str = "online"  # what this station's presence says
    silent: bool = False  # stops refreshing its presence (a hung station)
    presence_joints: tuple[str, ...] | None = None  # announce these instead of the machine's
    bus: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    sent: list[Send] = field(default_factory=list)


class Net:
    """Stations, their shared presence board and the messages in flight between them."""

    def __init__(self) -> None:
        self.board = PresenceBoard(interval_s=1.0)
        self.stations: dict[str, Station] = {}
        self.now = START
        self.in_flight: list[tuple[str, Send]] = []

    def add(
        self,
        me: str,
        role: str,
        joints: tuple[str, ...] = JOINTS,
        *,
        seed: int = 0,
        peer: str | None = None,
    ) -> SessionMachine:
        machine = SessionMachine(
            me, role, joints, inbox=inbox_topic(OWNER, me), peer=peer, rng=random.Random(seed)
        )
        self.stations[me] = Station(machine)
        self.announce(me)
        return machine

    def m(self, me: str) -> SessionMachine:
        return self.stations[me].machine

    def announce(self, me: str) -> None:
        station = self.stations[me]
        machine = station.machine
        presence = Presence(
            status=station.status,
            role=machine.role,
            robot_type=f"sim_so101_{'follower' if machine.role == 'robot' else 'leader'}",
            joints=station.presence_joints or machine.joints,
            cameras=("front",) if machine.role == "robot" else (),
            busy=machine.busy and station.status == "online",
            session=machine.session if machine.busy else None,
            version="0.1.0",
            pubkey="a2V5",
            ts=time.time(),
        )
        self.board.update(me, presence, self.now)

    def go_offline(self, me: str) -> None:
        self.stations[me].status = "offline"
        self.announce(me)

    def apply(self, me: str, actions: Actions) -> Actions:
        station = self.stations[me]
        station.bus += actions.bus
        station.sent += actions.sends
        if actions.outcome is not None:
            station.outcomes.append(actions.outcome)
        self.in_flight += [(me, send) for send in actions.sends]
        if actions.presence_changed:
            self.announce(me)
        return actions

    def tick(self, *ids: str) -> None:
        for me in ids or tuple(self.stations):
            self.apply(me, self.m(me).on_tick(self.now, self.board))

    def gateway(self, me: str, event: dict[str, Any]) -> Actions:
        return self.apply(me, self.m(me).on_gateway(event, self.now))

    def receive(self, to: str, kind: str, sender: str, body: dict[str, Any]) -> Actions:
        """Hand one message to a machine, as if it had arrived verified from `sender`."""
        return self.apply(to, self.m(to).on_message(kind, sender, body, self.now, self.board))

    def deliver(self, rng: random.Random | None = None) -> int:
        """Deliver everything in flight, and whatever that provokes, until nothing is left."""
        count = 0
        while self.in_flight:
            batch, self.in_flight = self.in_flight, []
            if rng is not None:
                rng.shuffle(batch)
            for sender, send in batch:
                if send.to in self.stations:
                    self.receive(send.to, send.kind, sender, send.body)
                    count += 1
        return count

    def drop(self) -> list[tuple[str, Send]]:
        """Lose everything in flight; returns it for a later (late) delivery."""
        lost, self.in_flight = self.in_flight, []
        return lost

    def advance(self, dt: float) -> None:
        """Move the clock; every station that is not silent refreshes its presence."""
        self.now += dt
        for me, station in self.stations.items():
            if not station.silent:
                self.announce(me)

    def run(self, seconds: float, step: float = 0.25, rng: random.Random | None = None) -> None:
        for _ in range(round(seconds / step)):
            self.advance(step)
            ids = list(self.stations)
            if rng is not None:
                rng.shuffle(ids)
            self.tick(*ids)
            self.deliver(rng)

    def pairs(self) -> set[tuple[str, str]]:
        """(teleop, robot) pairs, checked to be mutual and to share one session."""
        found = set()
        for me, station in self.stations.items():
            machine = station.machine
            if machine.role != "teleop" or machine.peer is None:
                continue
            robot = self.m(machine.peer)
            assert robot.role == "robot"
            assert robot.peer == me and robot.session == machine.session
            assert robot.state == machine.state or {robot.state, machine.state} <= {
                "paired",
                "live",
            }
            found.add((me, machine.peer))
        robots_paired = {me for me, s in self.stations.items() if s.machine.role == "robot"}
        robots_paired = {r for r in robots_paired if self.m(r).peer is not None}
        assert robots_paired == {robot for _, robot in found}, "a robot paired one-sidedly"
        return found


def sends_of(actions: Actions, kind: str) -> list[Send]:
    return [send for send in actions.sends if send.kind == kind]


def pair(net: Net, teleop: str, robot: str) -> str:
    """Bring an idle teleop and a free robot to `paired`; returns the session id."""
    net.tick(teleop)
    assert net.in_flight and net.in_flight[-1][1].to == robot, "asked the wrong robot"
    net.deliver()
    assert net.m(teleop).state == net.m(robot).state == "paired"
    session = net.m(teleop).session
    assert session is not None
    return session


def go_live(net: Net, teleop: str, robot: str) -> str:
    session = pair(net, teleop, robot)
    for me in (teleop, robot):
        net.gateway(me, {"event": "connected", "session": session})
    assert net.m(teleop).state == net.m(robot).state == "live"
    return session


def two_stations() -> Net:
    net = Net()
    net.add("teleop-1", "teleop")
    net.add("robot-1", "robot")
    return net


# --- construction -----------------------------------------------------------------------------


def test_role_must_be_robot_or_teleop() -> None:
    with pytest.raises(ValueError, match="role"):
        SessionMachine("viewer-1", "viewer", JOINTS, inbox="x")


def test_fresh_machine_is_idle_and_not_busy() -> None:
    machine = SessionMachine("robot-1", "robot", JOINTS, inbox="x")
    assert machine.state == "idle" and not machine.busy
    assert machine.session is None and machine.peer is None


def test_robot_never_asks_on_its_own() -> None:
    net = Net()
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    net.run(5)
    assert net.stations["robot-1"].sent == [] and net.stations["robot-2"].sent == []
    assert net.m("robot-1").state == net.m("robot-2").state == "idle"


# --- happy path -------------------------------------------------------------------------------


def test_happy_path_request_accept_live_and_gateway_closed() -> None:
    net = two_stations()
    teleop, robot = net.m("teleop-1"), net.m("robot-1")

    asked = net.apply("teleop-1", teleop.on_tick(net.now, net.board))
    assert teleop.state == "requesting"
    assert not teleop.busy  # only asking: its presence still says free
    (request,) = asked.sends
    assert request.kind == "session.request" and request.to == "robot-1"
    assert set(request.body) == {"session", "joints", "reply_to", "corr"}
    assert request.body["session"] == teleop.session
    assert request.body["joints"] == list(JOINTS)
    assert request.body["reply_to"] == teleop.inbox == inbox_topic(OWNER, "teleop-1")
    assert isinstance(request.body["corr"], str) and request.body["corr"]
    net.drop()

    answer = net.receive("robot-1", "session.request", "teleop-1", request.body)
    assert robot.state == "paired" and robot.peer == "teleop-1"
    assert robot.session == request.body["session"]
    assert answer.sends[0] == Send(
        "session.accept",
        "teleop-1",
        {"session": request.body["session"], "corr": request.body["corr"]},
    )
    assert answer.presence_changed
    assert answer.bus == [
        {
            "event": "connect",
            "session": robot.session,
            "peer": "teleop-1",
            "role": "robot",
            "initiator": False,
            "peer_cameras": [],  # a teleop announces none
        }
    ]
    assert net.board.stations["robot-1"].presence.busy is True
    assert net.board.stations["robot-1"].presence.session == robot.session

    paired = net.receive("teleop-1", "session.accept", "robot-1", answer.sends[0].body)
    assert teleop.state == "paired" and teleop.peer == "robot-1"
    assert paired.sends == [] and paired.presence_changed
    assert paired.bus == [
        {
            "event": "connect",
            "session": teleop.session,
            "peer": "robot-1",
            "role": "teleop",
            "initiator": True,
            "peer_cameras": ["front"],  # the robot's, from its presence: one stream each
        }
    ]
    net.drop()

    session = teleop.session
    for me in ("teleop-1", "robot-1"):
        live = net.gateway(me, {"event": "connected", "session": session})
        assert live.presence_changed and net.m(me).state == "live"

    closed = net.gateway("teleop-1", {"event": "closed", "session": session})
    assert closed.outcome == "gateway_closed" and closed.presence_changed
    assert closed.sends == [
        Send("session.end", "robot-1", {"session": session, "reason": "gateway_closed"})
    ]
    assert {"event": "disconnect", "session": session, "reason": "gateway_closed"} in closed.bus
    assert teleop.state == "idle" and teleop.session is None and teleop.peer is None

    net.deliver()
    assert robot.state == "idle" and robot.session is None and robot.peer is None
    assert net.stations["robot-1"].outcomes == ["ended"]
    assert net.stations["robot-1"].sent[-1].kind == "session.accept"  # no end sent back
    assert net.board.stations["robot-1"].presence.busy is False


def test_gateway_failed_ends_with_gateway_failed() -> None:
    net = two_stations()
    session = pair(net, "teleop-1", "robot-1")
    failed = net.gateway("robot-1", {"event": "failed", "session": session})
    assert failed.outcome == "gateway_failed"
    assert sends_of(failed, "session.end")[0].to == "teleop-1"
    net.deliver()
    assert net.m("teleop-1").state == "idle"
    assert net.stations["teleop-1"].outcomes == ["ended"]


def test_gateway_events_for_another_session_are_ignored() -> None:
    net = two_stations()
    session = pair(net, "teleop-1", "robot-1")
    for event in ("connected", "closed", "failed"):
        assert net.gateway("teleop-1", {"event": event, "session": "other"}) == Actions()
        assert net.gateway("teleop-1", {"event": event}) == Actions()
    assert net.m("teleop-1").state == "paired"
    net.gateway("teleop-1", {"event": "connected", "session": session})
    assert net.m("teleop-1").state == "live"
    # "connected" again while live changes nothing
    assert net.gateway("teleop-1", {"event": "connected", "session": session}) == Actions()


def test_gateway_events_while_idle_are_ignored() -> None:
    net = two_stations()
    for event in ("connected", "closed", "failed", "signal"):
        assert net.gateway("robot-1", {"event": event, "session": None}) == Actions()
    assert net.m("robot-1").state == "idle"


def test_live_has_no_time_out() -> None:
    net = two_stations()
    go_live(net, "teleop-1", "robot-1")
    net.run(T.paired_s * 4, step=0.5)
    assert net.m("teleop-1").state == net.m("robot-1").state == "live"


def test_session_end_ends_a_live_session_on_the_peer() -> None:
    net = two_stations()
    session = go_live(net, "teleop-1", "robot-1")
    net.apply("robot-1", net.m("robot-1").shutdown(net.now))
    net.deliver()
    assert net.m("teleop-1").state == "idle"
    assert net.stations["teleop-1"].outcomes == ["ended"]
    assert net.stations["teleop-1"].bus[-1] == {
        "event": "disconnect",
        "session": session,
        "reason": "ended",
    }


def test_session_end_from_a_stranger_or_for_another_session_is_ignored() -> None:
    net = two_stations()
    net.add("teleop-2", "teleop")
    session = go_live(net, "teleop-1", "robot-1")
    body = {"session": session, "reason": "ended"}
    assert net.receive("robot-1", "session.end", "teleop-2", body) == Actions()
    assert net.receive("robot-1", "session.end", "teleop-1", {**body, "session": "x"}) == Actions()
    assert net.m("robot-1").state == "live"


# --- who gets asked ---------------------------------------------------------------------------


def test_joints_mismatch_is_never_asked_for_and_never_paired() -> None:
    net = Net()
    net.add("teleop-1", "teleop")
    net.add("robot-odd", "robot", OTHER_JOINTS)
    net.run(10)
    assert net.stations["teleop-1"].sent == []
    assert net.m("teleop-1").state == "idle" and net.m("robot-odd").state == "idle"


def test_robot_rejects_a_request_with_other_joints() -> None:
    net = Net()
    net.add("teleop-1", "teleop")
    net.add("robot-odd", "robot", OTHER_JOINTS)
    net.stations["robot-odd"].presence_joints = JOINTS  # its presence claims the teleop's joints
    net.announce("robot-odd")
    net.tick("teleop-1")
    ((_, request),) = net.in_flight
    net.deliver()
    reject = net.stations["robot-odd"].sent[0]
    assert reject == Send(
        "session.reject",
        "teleop-1",
        {"session": request.body["session"], "corr": request.body["corr"], "reason": "joints"},
    )
    assert net.m("teleop-1").state == "idle"
    assert net.stations["teleop-1"].outcomes == ["rejected"]
    net.run(10)
    assert net.m("robot-odd").state == "idle" and net.m("teleop-1").peer is None
    assert all(s.kind == "session.reject" for s in net.stations["robot-odd"].sent)


@pytest.mark.parametrize("joints", [None, 5, True, "shoulder_pan.pos", {"a": 1}, []])
def test_robot_rejects_a_request_with_malformed_joints(joints: object) -> None:
    net = two_stations()
    body = {"session": "s-1", "corr": "c-1", "joints": joints, "reply_to": "x"}
    answer = net.receive("robot-1", "session.request", "teleop-1", body)
    assert answer.sends == [
        Send("session.reject", "teleop-1", {"session": "s-1", "corr": "c-1", "reason": "joints"})
    ]
    assert net.m("robot-1").state == "idle"


@pytest.mark.parametrize("field_name", ["session", "corr"])
def test_robot_ignores_a_request_without_session_or_corr(field_name: str) -> None:
    net = two_stations()
    body: dict[str, Any] = {"session": "s-1", "corr": "c-1", "joints": list(JOINTS)}
    for bad in (None, 5):
        body[field_name] = bad
        assert net.receive("robot-1", "session.request", "teleop-1", body) == Actions()
    assert net.m("robot-1").state == "idle"


@pytest.mark.parametrize("seed", range(8))
def test_peer_option_restricts_the_candidates(seed: int) -> None:
    net = Net()
    net.add("teleop-1", "teleop", seed=seed, peer="robot-2")
    for name in ("robot-1", "robot-2", "robot-3"):
        net.add(name, "robot")
    net.tick("teleop-1")
    assert [send.to for _, send in net.in_flight] == ["robot-2"]
    net.deliver()
    assert net.pairs() == {("teleop-1", "robot-2")}


def test_peer_option_waits_while_that_robot_is_busy() -> None:
    net = Net()
    net.add("teleop-1", "teleop", peer="robot-1")
    net.add("teleop-2", "teleop", peer="robot-1")
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    pair(net, "teleop-1", "robot-1")
    net.run(5)
    assert net.stations["teleop-2"].sent == []  # robot-1 is busy and robot-2 not wanted
    assert net.m("teleop-2").state == "idle" and net.m("robot-2").state == "idle"


@pytest.mark.parametrize("seed", range(8))
def test_busy_robots_are_skipped(seed: int) -> None:
    net = Net()
    net.add("teleop-1", "teleop", seed=seed)
    net.add("robot-busy", "robot")
    net.add("robot-free", "robot")
    net.add("teleop-other", "teleop", peer="robot-busy")
    pair(net, "teleop-other", "robot-busy")
    assert net.board.stations["robot-busy"].presence.busy
    net.tick("teleop-1")
    assert [send.to for _, send in net.in_flight] == ["robot-free"]


def test_offline_stale_and_unknown_robots_are_not_asked() -> None:
    net = Net()
    net.add("teleop-1", "teleop")
    net.add("robot-off", "robot")
    net.add("robot-hung", "robot")
    net.go_offline("robot-off")
    net.stations["robot-hung"].silent = True
    net.board.update("robot-ghost", None, net.now)
    net.advance(net.board.stale_after_s + 0.1)  # robot-hung has now been silent too long
    net.run(10)
    assert net.stations["teleop-1"].sent == []


# --- races ------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_three_teleops_race_for_one_robot(order: tuple[int, ...]) -> None:
    net = Net()
    teleops = [f"teleop-{i}" for i in range(3)]
    for i, name in enumerate(teleops):
        net.add(name, "teleop", seed=i)
    net.add("robot-1", "robot")
    net.tick(*teleops)
    requests = net.drop()
    assert sorted(sender for sender, _ in requests) == teleops
    assert all(send.kind == "session.request" for _, send in requests)
    net.in_flight = [requests[i] for i in order]
    net.deliver()

    winner = teleops[order[0]]
    assert net.pairs() == {(winner, "robot-1")}
    robot_sent = net.stations["robot-1"].sent
    assert [(s.kind, s.to) for s in robot_sent] == [("session.accept", winner)] + [
        ("session.reject", teleops[i]) for i in order[1:]
    ]
    assert all(s.body["reason"] == "busy" for s in robot_sent[1:])
    for loser in set(teleops) - {winner}:
        assert net.m(loser).state == "idle" and net.m(loser).peer is None
        assert net.stations[loser].outcomes == ["rejected"]

    # The losers wait (the robot's presence says busy) and get their turn when it frees up.
    net.run(3)
    assert net.pairs() == {(winner, "robot-1")}
    net.gateway(winner, {"event": "closed", "session": net.m(winner).session})
    net.deliver()
    net.run(3)
    (pair_after,) = net.pairs()
    assert pair_after[1] == "robot-1"


@settings(max_examples=40, deadline=None)
@given(st.permutations(range(3)), st.integers(0, 2**32 - 1))
def test_racing_requests_in_any_order_give_exactly_one_pair(order: list[int], seed: int) -> None:
    net = Net()
    teleops = [f"teleop-{i}" for i in range(3)]
    for i, name in enumerate(teleops):
        net.add(name, "teleop", seed=seed + i)
    net.add("robot-1", "robot")
    net.tick(*teleops)
    requests = net.drop()
    net.in_flight = [requests[i] for i in order]
    net.deliver()
    assert len(net.pairs()) == 1
    net.run(2, rng=random.Random(seed))
    assert len(net.pairs()) == 1


@pytest.mark.parametrize("seed", range(25))
def test_two_robots_two_teleops_end_in_two_disjoint_pairs(seed: int) -> None:
    net = Net()
    rng = random.Random(seed)
    net.add("teleop-a", "teleop", seed=rng.randrange(1 << 30))
    net.add("teleop-b", "teleop", seed=rng.randrange(1 << 30))
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    net.tick("teleop-a", "teleop-b")  # both ask before either hears back: maybe the same robot
    net.deliver(rng)
    net.run(3, rng=rng)
    pairs = net.pairs()
    assert len(pairs) == 2
    assert {t for t, _ in pairs} == {"teleop-a", "teleop-b"}
    assert {r for _, r in pairs} == {"robot-1", "robot-2"}


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_any_fleet_settles_into_disjoint_pairs(robots: int, teleops: int, seed: int) -> None:
    net = Net()
    rng = random.Random(seed)
    for i in range(teleops):
        net.add(f"teleop-{i}", "teleop", seed=rng.randrange(1 << 30))
    for i in range(robots):
        net.add(f"robot-{i}", "robot")
    net.run(6, rng=rng)
    assert len(net.pairs()) == min(robots, teleops)


def test_first_choice_is_random_so_racing_teleops_spread_out() -> None:
    first_choices = set()
    for seed in range(20):
        net = Net()
        net.add("teleop-1", "teleop", seed=seed)
        for i in range(4):
            net.add(f"robot-{i}", "robot")
        net.tick("teleop-1")
        ((_, request),) = net.in_flight
        first_choices.add(request.to)
    assert len(first_choices) >= 3


# --- time-outs --------------------------------------------------------------------------------


def test_unanswered_request_moves_on_to_the_next_candidate() -> None:
    net = Net()
    net.add("teleop-1", "teleop")
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    net.tick("teleop-1")
    ((_, first),) = net.drop()
    net.advance(T.requesting_s - 0.01)
    net.tick("teleop-1")
    assert net.in_flight == [] and net.m("teleop-1").state == "requesting"
    net.advance(0.02)
    net.tick("teleop-1")
    ((_, second),) = net.in_flight
    assert second.kind == "session.request"
    assert second.to != first.to and second.to in ("robot-1", "robot-2")
    assert second.body["session"] != first.body["session"]
    assert second.body["corr"] != first.body["corr"]
    net.deliver()
    assert net.pairs() == {("teleop-1", second.to)}


def test_unanswered_request_to_the_only_robot_returns_to_idle_and_retries() -> None:
    net = two_stations()
    net.tick("teleop-1")
    net.drop()
    net.advance(T.requesting_s + 0.1)
    net.tick("teleop-1")
    teleop = net.m("teleop-1")
    assert teleop.state == "idle" and teleop.session is None
    assert net.stations["teleop-1"].outcomes == ["rejected"]
    assert net.in_flight == []
    net.tick("teleop-1")  # too soon to retry
    assert net.in_flight == []
    net.advance(2 * T.retry_s + 0.01)  # the retry waits retry_s x (1..2)
    net.tick("teleop-1")
    ((_, again),) = net.in_flight
    assert again.kind == "session.request" and again.to == "robot-1"


def test_robot_that_went_away_while_asked_is_not_asked_again() -> None:
    net = Net()
    net.add("teleop-1", "teleop", seed=3)
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    net.tick("teleop-1")
    ((_, first),) = net.drop()
    other = "robot-2" if first.to == "robot-1" else "robot-1"
    net.go_offline(other)
    net.advance(T.requesting_s + 0.1)
    net.tick("teleop-1")
    assert net.in_flight == [] and net.m("teleop-1").state == "idle"


@pytest.mark.parametrize("who", ["teleop-1", "robot-1"])
def test_paired_without_gateway_times_out_and_sends_end(who: str) -> None:
    net = two_stations()
    session = pair(net, "teleop-1", "robot-1")
    other = "robot-1" if who == "teleop-1" else "teleop-1"
    net.advance(T.paired_s - 0.1)
    net.tick(who)
    assert net.m(who).state == "paired"
    net.advance(0.2)
    net.tick(who)
    assert net.m(who).state == "idle"
    assert net.stations[who].outcomes == ["timeout"]
    ((_, end),) = net.in_flight
    assert end == Send("session.end", other, {"session": session, "reason": "timeout"})
    net.deliver()
    assert net.m(other).state == "idle"
    assert net.stations[other].outcomes == ["ended"]


# Live and stale or offline is not here: test_live_session_outlives_stale_or_offline_presence.
@pytest.mark.parametrize(
    ("state", "how"),
    [("paired", "stale"), ("paired", "offline"), ("paired", "removed"), ("live", "removed")],
)
@pytest.mark.parametrize("lost", ["teleop-1", "robot-1"])
def test_peer_presence_lost_ends_with_peer_lost(state: str, how: str, lost: str) -> None:
    net = two_stations()
    (go_live if state == "live" else pair)(net, "teleop-1", "robot-1")
    watcher = "robot-1" if lost == "teleop-1" else "teleop-1"
    if how == "stale":
        net.stations[lost].silent = True
        net.advance(net.board.stale_after_s)  # exactly 3 intervals of silence: not yet
        net.tick(watcher)
        assert net.m(watcher).state == state
        net.advance(0.1)
    elif how == "offline":
        net.go_offline(lost)
    else:
        net.board.update(lost, None, net.now)
    net.tick(watcher)
    assert net.m(watcher).state == "idle"
    assert net.stations[watcher].outcomes == ["peer_lost"]
    assert net.in_flight == []  # no session.end to a peer that is gone
    assert net.stations[watcher].bus[-1]["event"] == "disconnect"
    assert net.board.stations[watcher].presence.busy is False


@pytest.mark.parametrize("how", ["stale", "offline"])
@pytest.mark.parametrize("lost", ["teleop-1", "robot-1"])
def test_live_session_outlives_stale_or_offline_presence(how: str, lost: str) -> None:
    """Broker down, restarting (Mosquitto publishes every Last Will as it stops) or the peer's
    session manager paused: presence says stale or offline while the gateways' link may be fine,
    so a live session (and control) goes on. The peer's session manager coming back without the
    session (restarted: online, idle) ends it."""
    net = two_stations()
    session = go_live(net, "teleop-1", "robot-1")
    watcher = "robot-1" if lost == "teleop-1" else "teleop-1"
    if how == "stale":
        net.stations[lost].silent = True
        net.advance(net.board.stale_after_s * 10)
    else:
        net.go_offline(lost)
        net.advance(1.0)
    net.tick(watcher)
    assert net.board.status(lost, net.now) == how
    assert net.m(watcher).state == "live" and net.m(watcher).session == session
    assert net.stations[watcher].outcomes == []

    # The lost station's presence comes back in the session: nothing to do.
    net.stations[lost].silent = False
    net.stations[lost].status = "online"
    net.advance(1.0)
    net.tick(watcher)
    assert net.m(watcher).state == "live" and net.stations[watcher].outcomes == []

    # Its session manager restarted: online, idle, no session.
    role = net.m(lost).role
    net.stations[lost].machine = SessionMachine(lost, role, JOINTS, inbox=inbox_topic(OWNER, lost))
    net.advance(1.0)
    net.tick(watcher)
    assert net.m(watcher).state == "idle"
    assert net.stations[watcher].outcomes == ["peer_lost"]
    assert net.stations[watcher].bus[-1] == {
        "event": "disconnect",
        "session": session,
        "reason": "peer_lost",
    }


def test_presence_from_before_live_does_not_end_the_session() -> None:
    """The robot's board may still hold the teleop's idle presence from before pairing when the
    gateway says connected: only presence sent after going live can say the peer forgot it."""
    net = two_stations()
    session = pair(net, "teleop-1", "robot-1")
    idle = net.board.stations["teleop-1"].presence
    net.board.update("teleop-1", replace(idle, busy=False, session=None), net.now)
    for me in ("teleop-1", "robot-1"):
        net.gateway(me, {"event": "connected", "session": session})
    net.tick("robot-1")
    assert net.m("robot-1").state == "live"


# --- late and forged answers ------------------------------------------------------------------


def requesting(net: Net) -> Send:
    """Make teleop-1 ask; returns its request, kept out of the network."""
    net.tick("teleop-1")
    ((_, request),) = net.drop()
    assert net.m("teleop-1").state == "requesting"
    return request


def three_stations() -> Net:
    net = Net()
    net.add("teleop-1", "teleop", peer="robot-1")
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    return net


@pytest.mark.parametrize("kind", ["session.accept", "session.reject"])
def test_answer_from_a_station_that_was_not_asked_is_ignored(kind: str) -> None:
    net = three_stations()
    request = requesting(net)
    body = {"session": request.body["session"], "corr": request.body["corr"], "reason": "busy"}
    answer = net.receive("teleop-1", kind, "robot-2", body)
    if kind == "session.accept":
        assert abandons(answer, "robot-2", request.body["session"])
    else:
        assert answer == Actions()
    assert net.m("teleop-1").state == "requesting" and net.m("teleop-1").peer is None


def abandons(actions: Actions, robot: str, session: str) -> bool:
    """The only action is telling `robot` to drop `session` (an accept this teleop never uses)."""
    return actions == Actions(
        sends=[Send("session.end", robot, {"session": session, "reason": "abandoned"})]
    )


@pytest.mark.parametrize("kind", ["session.accept", "session.reject"])
@pytest.mark.parametrize("forged", ["corr", "session"])
def test_answer_with_wrong_corr_or_session_is_ignored(kind: str, forged: str) -> None:
    net = three_stations()
    request = requesting(net)
    body = {"session": request.body["session"], "corr": request.body["corr"], "reason": "busy"}
    body[forged] = "f" * 32
    answer = net.receive("teleop-1", kind, "robot-1", body)
    if kind == "session.accept" and forged == "session":
        assert abandons(answer, "robot-1", "f" * 32)  # not ours: the robot is told to drop it
    else:
        assert answer == Actions()
    assert net.m("teleop-1").state == "requesting"
    body.pop(forged)  # missing altogether: ignored too
    assert net.receive("teleop-1", kind, "robot-1", body) == Actions()
    assert net.m("teleop-1").state == "requesting"
    # the genuine answer still works
    good = {"session": request.body["session"], "corr": request.body["corr"], "reason": "busy"}
    net.receive("teleop-1", kind, "robot-1", good)
    assert net.m("teleop-1").state == ("paired" if kind == "session.accept" else "idle")


def test_accept_after_the_request_timed_out_is_ignored() -> None:
    net = Net()
    net.add("teleop-1", "teleop", seed=1)
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    request = requesting(net)
    net.advance(T.requesting_s + 0.1)
    net.tick("teleop-1")  # gives up on the first robot and asks the other
    ((_, second),) = net.drop()
    assert second.to != request.to
    late = net.receive(request.to, "session.request", "teleop-1", request.body)
    (accept,) = late.sends
    assert accept.kind == "session.accept"
    net.drop()
    answer = net.receive("teleop-1", "session.accept", request.to, accept.body)
    assert abandons(answer, request.to, request.body["session"])
    assert net.m("teleop-1").state == "requesting" and net.m("teleop-1").peer is None
    # ... and the late robot is free at once, not after its paired time-out
    ((_, end),) = net.drop()
    net.receive(request.to, end.kind, "teleop-1", end.body)
    assert net.m(request.to).state == "idle"
    assert net.stations[request.to].outcomes == ["ended"]


def test_accept_after_giving_up_altogether_is_ignored() -> None:
    net = two_stations()
    request = requesting(net)
    net.advance(T.requesting_s + 0.1)
    net.tick("teleop-1")
    assert net.m("teleop-1").state == "idle"
    body = {"session": request.body["session"], "corr": request.body["corr"]}
    answer = net.receive("teleop-1", "session.accept", "robot-1", body)
    assert abandons(answer, "robot-1", request.body["session"])
    assert net.m("teleop-1").state == "idle"


def test_answers_when_nothing_was_asked_or_already_paired_are_ignored() -> None:
    net = two_stations()
    body = {"session": "s", "corr": "c"}
    assert abandons(net.receive("teleop-1", "session.accept", "robot-1", body), "robot-1", "s")
    assert net.m("teleop-1").state == "idle"
    session = pair(net, "teleop-1", "robot-1")
    accept = net.stations["robot-1"].sent[0]
    assert net.receive("teleop-1", "session.accept", "robot-1", accept.body) == Actions()
    reject = {**accept.body, "reason": "busy"}
    assert net.receive("teleop-1", "session.reject", "robot-1", reject) == Actions()
    assert net.m("teleop-1").state == "paired" and net.m("teleop-1").session == session


def test_messages_for_the_other_role_are_ignored() -> None:
    net = two_stations()
    body = {"session": "s", "corr": "c", "joints": list(JOINTS), "reply_to": "x"}
    assert net.receive("teleop-1", "session.request", "robot-1", body) == Actions()
    assert net.receive("robot-1", "session.accept", "teleop-1", body) == Actions()
    assert net.receive("robot-1", "session.reject", "teleop-1", body) == Actions()
    assert net.receive("robot-1", "no.such.kind", "teleop-1", body) == Actions()
    assert net.m("teleop-1").state == net.m("robot-1").state == "idle"


# --- re-pairing -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_re_pair_prefers_the_last_partner(seed: int) -> None:
    net = Net()
    net.add("teleop-1", "teleop", seed=seed)
    robots = [f"robot-{i}" for i in range(5)]
    for name in robots:
        net.add(name, "robot")
    net.tick("teleop-1")
    net.deliver()
    ((_, first),) = net.pairs()
    for _ in range(3):
        session = net.m("teleop-1").session
        net.gateway("teleop-1", {"event": "closed", "session": session})
        net.deliver()
        assert net.m(first).state == "idle"
        net.advance(T.retry_s + 0.01)
        net.tick("teleop-1")
        ((_, again),) = net.in_flight
        assert again.to == first
        net.deliver()
        assert net.pairs() == {("teleop-1", first)}


def test_last_partner_busy_means_another_robot() -> None:
    net = Net()
    net.add("teleop-1", "teleop")
    net.add("teleop-2", "teleop", peer="robot-1")
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    net.go_offline("robot-2")  # so teleop-1's first partner is robot-1
    session = pair(net, "teleop-1", "robot-1")
    net.gateway("teleop-1", {"event": "closed", "session": session})
    net.deliver()
    # robot-2 comes back, and teleop-2 takes robot-1 before teleop-1 retries
    net.stations["robot-2"].status = "online"
    net.announce("robot-2")
    pair(net, "teleop-2", "robot-1")
    net.advance(T.retry_s + 0.01)
    net.tick("teleop-1")
    ((_, request),) = net.in_flight
    assert request.to == "robot-2"
    net.deliver()
    assert net.pairs() == {("teleop-1", "robot-2"), ("teleop-2", "robot-1")}


# --- robot side -------------------------------------------------------------------------------


def test_repeated_request_for_the_current_session_is_re_accepted() -> None:
    net = two_stations()
    request = requesting(net)
    first = net.receive("robot-1", "session.request", "teleop-1", request.body)
    robot = net.m("robot-1")
    session, bus_before = robot.session, list(net.stations["robot-1"].bus)
    again = net.receive("robot-1", "session.request", "teleop-1", request.body)
    assert again.sends == [first.sends[0]]
    assert again.bus == [] and not again.presence_changed
    assert robot.state == "paired" and robot.session == session
    assert net.stations["robot-1"].bus == bus_before
    net.gateway("robot-1", {"event": "connected", "session": session})
    live_again = net.receive("robot-1", "session.request", "teleop-1", request.body)
    assert [s.kind for s in live_again.sends] == ["session.accept"]
    assert robot.state == "live"


def test_robot_rejects_others_and_new_sessions_as_busy() -> None:
    net = two_stations()
    net.add("teleop-2", "teleop")
    request = requesting(net)
    net.receive("robot-1", "session.request", "teleop-1", request.body)
    other = {**request.body, "session": "s-other", "corr": "c-other"}
    for sender, body in (("teleop-2", request.body), ("teleop-2", other), ("teleop-1", other)):
        answer = net.receive("robot-1", "session.request", sender, body)
        assert answer.sends == [
            Send(
                "session.reject",
                sender,
                {"session": body["session"], "corr": body["corr"], "reason": "busy"},
            )
        ]
    assert net.m("robot-1").peer == "teleop-1"
    assert net.m("robot-1").session == request.body["session"]


@pytest.mark.parametrize("how", ["unknown", "offline", "stale"])
def test_robot_rejects_a_requester_it_cannot_see_as_not_ready(how: str) -> None:
    net = two_stations()
    request = requesting(net)
    if how == "unknown":
        net.board.update("teleop-1", None, net.now)
    elif how == "offline":
        net.go_offline("teleop-1")
    else:
        net.stations["teleop-1"].silent = True
        net.advance(net.board.stale_after_s + 0.1)
    answer = net.receive("robot-1", "session.request", "teleop-1", request.body)
    assert answer.sends == [
        Send(
            "session.reject",
            "teleop-1",
            {
                "session": request.body["session"],
                "corr": request.body["corr"],
                "reason": "not_ready",
            },
        )
    ]
    assert net.m("robot-1").state == "idle"
    assert not answer.presence_changed


# --- signaling relay --------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["paired", "live"])
def test_signal_is_relayed_both_ways(state: str) -> None:
    net = two_stations()
    session = (go_live if state == "live" else pair)(net, "teleop-1", "robot-1")
    offer = net.gateway(
        "teleop-1", {"event": "signal", "kind": "signal.offer", "session": session, "sdp": "x"}
    )
    assert offer.sends == [Send("signal.offer", "robot-1", {"session": session, "sdp": "x"})]
    net.deliver()
    assert net.stations["robot-1"].bus[-1] == {
        "event": "signal",
        "kind": "signal.offer",
        "session": session,
        "sdp": "x",
    }
    answer = net.gateway(
        "robot-1", {"event": "signal", "kind": "signal.answer", "session": session, "sdp": "y"}
    )
    assert answer.sends == [Send("signal.answer", "teleop-1", {"session": session, "sdp": "y"})]
    net.deliver()
    assert net.stations["teleop-1"].bus[-1] == {
        "event": "signal",
        "kind": "signal.answer",
        "session": session,
        "sdp": "y",
    }
    assert net.m("teleop-1").state == net.m("robot-1").state == state


def test_gateway_signal_that_is_malformed_or_not_ours_is_not_sent() -> None:
    net = two_stations()
    session = pair(net, "teleop-1", "robot-1")
    bad_events: list[dict[str, Any]] = [
        {"event": "signal", "kind": "signal.offer", "session": "other", "sdp": "x"},
        {"event": "signal", "kind": "signal.offer", "sdp": "x"},
        {"event": "signal", "kind": "signal.bogus", "session": session, "sdp": "x"},
        {"event": "signal", "kind": "session.end", "session": session, "sdp": "x"},
        {"event": "signal", "session": session, "sdp": "x"},
        {"event": "signal", "kind": "signal.offer", "session": session, "sdp": 5},
        {"event": "signal", "kind": "signal.offer", "session": session},
    ]
    for event in bad_events:
        assert net.gateway("teleop-1", event) == Actions(), event
    assert net.in_flight == []


def test_gateway_signal_while_requesting_is_not_sent() -> None:
    net = two_stations()
    request = requesting(net)
    event = {
        "event": "signal",
        "kind": "signal.offer",
        "session": request.body["session"],
        "sdp": "x",
    }
    assert net.gateway("teleop-1", event) == Actions()


def test_signal_from_a_non_peer_or_for_another_session_is_ignored() -> None:
    net = two_stations()
    net.add("teleop-2", "teleop")
    session = pair(net, "teleop-1", "robot-1")
    body = {"session": session, "sdp": "evil"}
    assert net.receive("robot-1", "signal.offer", "teleop-2", body) == Actions()
    other = {"session": "other", "sdp": "x"}
    assert net.receive("robot-1", "signal.offer", "teleop-1", other) == Actions()
    assert net.receive("robot-1", "signal.offer", "teleop-1", {"sdp": "x"}) == Actions()
    assert not any(e["event"] == "signal" for e in net.stations["robot-1"].bus)


def test_signal_while_idle_is_ignored() -> None:
    net = two_stations()
    body = {"session": None, "sdp": "x"}
    assert net.receive("robot-1", "signal.offer", "teleop-1", body) == Actions()


def test_signal_body_cannot_rename_the_bus_event() -> None:
    net = two_stations()
    session = pair(net, "teleop-1", "robot-1")
    body = {"session": session, "sdp": "x", "event": "disconnect", "kind": "session.end"}
    relayed = net.receive("robot-1", "signal.offer", "teleop-1", body)
    (event,) = relayed.bus
    assert event["event"] == "signal" and event["kind"] == "signal.offer"
    assert net.m("robot-1").state == "paired"


# --- shutdown ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["paired", "live"])
@pytest.mark.parametrize("who", ["teleop-1", "robot-1"])
def test_shutdown_while_in_a_session_sends_end(state: str, who: str) -> None:
    net = two_stations()
    session = (go_live if state == "live" else pair)(net, "teleop-1", "robot-1")
    other = "robot-1" if who == "teleop-1" else "teleop-1"
    stop = net.apply(who, net.m(who).shutdown(net.now))
    assert stop.sends == [Send("session.end", other, {"session": session, "reason": "ended"})]
    assert stop.outcome == "ended" and stop.presence_changed
    assert {"event": "disconnect", "session": session, "reason": "ended"} in stop.bus
    assert net.m(who).state == "idle"
    net.deliver()
    assert net.m(other).state == "idle"


@pytest.mark.parametrize("role", ["teleop", "robot"])
def test_shutdown_while_idle_sends_nothing(role: str) -> None:
    net = two_stations()
    name = f"{role}-1"
    assert net.m(name).shutdown(net.now) == Actions()
    assert net.m(name).state == "idle"


def test_shutdown_while_requesting_sends_nothing() -> None:
    net = two_stations()
    requesting(net)
    assert net.m("teleop-1").shutdown(net.now).sends == []


# --- bookkeeping ------------------------------------------------------------------------------


def test_every_outcome_seen_is_a_known_outcome() -> None:
    net = Net()
    rng = random.Random(7)
    for i in range(3):
        net.add(f"teleop-{i}", "teleop", seed=i)
    for i in range(2):
        net.add(f"robot-{i}", "robot")
    net.run(20, rng=rng)  # paired without a gateway: time-outs, then re-pairing
    seen = {o for s in net.stations.values() for o in s.outcomes}
    assert seen and seen <= set(OUTCOMES)
    assert "timeout" in seen


def test_actions_extend_merges() -> None:
    first = Actions(sends=[Send("a", "x", {})], bus=[{"event": "e"}], outcome="timeout")
    first.extend(Actions(sends=[Send("b", "y", {})], presence_changed=True))
    assert [s.kind for s in first.sends] == ["a", "b"]
    assert first.presence_changed and first.outcome == "timeout" and first.bus == [{"event": "e"}]
    first.extend(Actions(outcome="ended"))
    assert first.outcome == "ended"


def test_robot_refuses_a_session_request_signed_by_another_robot() -> None:
    net = Net()
    net.add("robot-1", "robot")
    net.add("robot-2", "robot")
    body = {"session": "s" * 32, "joints": list(JOINTS), "reply_to": "x", "corr": "c"}
    answer = net.receive("robot-1", "session.request", "robot-2", body)
    assert [(a.kind, a.to, a.body["reason"]) for a in answer.sends] == [
        ("session.reject", "robot-2", "role")
    ]
    assert net.m("robot-1").state == "idle" and not net.m("robot-1").busy


def test_an_idle_teleop_asks_a_robot_as_soon_as_it_appears_not_after_its_retry() -> None:
    net = Net()
    teleop = net.add("teleop-1", "teleop")
    net.tick("teleop-1")  # nobody there: the next look would be retry_s later
    assert teleop.state == "idle"
    robot = net.add("robot-1", "robot")  # its presence arrives
    net.now += 0.01
    net.tick("teleop-1")
    assert teleop.state == "idle"  # without being told, it waits out the retry
    teleop.robot_became_free(net.board.stations["robot-1"].presence)
    net.tick("teleop-1")
    assert teleop.state == "requesting" and robot.state == "idle"


def test_a_robot_appearing_does_not_cut_short_the_spread_after_refusals() -> None:
    net = Net()
    teleop = net.add("teleop-1", "teleop")
    net.add("robot-1", "robot")
    net.tick("teleop-1")
    (request,) = [send for _, send in net.in_flight]
    net.drop()
    net.receive("teleop-1", "session.reject", "robot-1",
                {"session": request.body["session"], "corr": request.body["corr"],
                 "reason": "busy"})  # fmt: skip
    assert teleop.state == "idle"
    net.add("robot-2", "robot")
    teleop.robot_became_free(net.board.stations["robot-2"].presence)
    net.now += 0.01
    net.tick("teleop-1")
    assert teleop.state == "idle"  # racing teleops keep their randomised retry
