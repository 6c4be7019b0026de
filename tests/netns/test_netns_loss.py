"""Robot and teleop stations in separate network namespaces, with loss and a cut on the link.

deploy/robot.conf and deploy/teleop.conf run unchanged under supervisord, each in its own
namespace, meeting on a "public" segment with the broker (tests/support/netns_site.py). The
robot's link is where iptables acts: `-m statistic --mode random` drops each UDP packet that
crosses it (either way) with probability p, which is every WebRTC packet: commands on the
unordered channel, pings and follower state on the reliable one. MQTT (TCP) is left alone: its
behaviour under loss is TCP's, and the peer link is what is under test here.

Tracking bound under loss, derived: the follower holds its last goal while commands are lost, so
a run of k lost commands lets the leader move PEAK_SPEED * k / rate further before the next one
repairs the goal (the step clamp, 2 units a tick, exceeds the leader's peak speed, ~1.05 units
a tick, so it catches up). Over N commands the chance of any run of k or more is at most
N * p**k; k is the smallest run with that chance below FLAKE_CHANCE, so the loss adds
PEAK_SPEED * k / rate to TRACKING_BOUND (the clean link's). On a zero-retransmit channel loss
never delays a command that does arrive; one can be late only by queuing (a CPU-starved
process on a shared machine, or SCTP's congestion window holding chunks back). That lateness
is measured (commands on the robot's bus, arrival minus origin) and its worst case added as
PEAK_SPEED * late, so a slow machine is not mistaken for loss; it is printed. What loss must
not do is also checked directly: about 1 - p of the commands arrive (5 standard deviations
either way: more would mean lost commands were sent again), the follower never stops tracking
(the deadman, 250 ms = 25 commands, never trips) and the session never ends.

A full cut (every packet, both ways) must make the follower hold within the DESIGN's 500 ms
(the deadman trips after 250 ms without a command), the robot's gateway must declare the link
lost (ping/pong, 500 ms), and when the link returns the stations pair again and the follower
re-engages with a ramp, never a jump.

Nothing here may touch the root namespace's network or leave a namespace, rule or process
behind (the Site removes them, failure or not).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.bus import MessageFrame, Subscriber
from tests.support.arm_checks import (
    DEFAULTS,
    PEAK_SPEED,
    PERIOD_S,
    RATE_HZ,
    TRACKING_BOUND,
    Sample,
    collect,
    followers,
    max_goal_step,
    tracking_errors,
    wait_for_state,
)
from tests.support.netns_site import Site

pytestmark = pytest.mark.integration
WINDOW_S = 6.0  # measured per loss rate
FLAKE_CHANCE = 1e-4  # accepted chance that a correct system exceeds the derived bound
DESIGN_HOLD_S = 0.5  # DESIGN: link loss -> follower holding within 500 ms
# Scheduling slack on a shared 2-core machine: a follower tick (10 ms) plus the time for the
# gateway's loop and the test's reader to run; the measurement starts before the cut is in.
SLACK_S = 0.1


def longest_credible_run(p: float, n: int) -> int:
    """Smallest k with n * p**k <= FLAKE_CHANCE: runs of k lost commands are not to be expected."""
    return math.ceil(math.log(n / FLAKE_CHANCE) / math.log(1 / p))


def loss_bound(p: float, late_s: float = 0.0) -> float:
    """TRACKING_BOUND plus the leader's motion over the longest credible run of lost commands,
    plus over `late_s`, the worst delivery delay measured (see the module docstring)."""
    k = longest_credible_run(p, int(WINDOW_S * RATE_HZ))
    return TRACKING_BOUND + PEAK_SPEED * (k * PERIOD_S + late_s)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    lan = Site(nat=False)
    lan.start()
    try:
        yield lan
    except BaseException:
        print(lan.logs())
        raise
    finally:
        lan.close()


@dataclass
class Buses:
    leader: Subscriber  # joints.leader on the teleop's bus
    follower: Subscriber  # joints.follower on the robot's bus
    commands: Subscriber  # joints.command on the robot's bus: what crossed the link
    status: Subscriber  # session.status on the robot's bus: the gateway's link events


@pytest.fixture
def buses(site: Site) -> Iterator[Buses]:
    """The stations' buses, once the follower tracks the leader."""
    buses = Buses(
        site.subscribe("teleop", ["joints.leader"]),
        site.subscribe("robot", ["joints.follower"]),
        site.subscribe("robot", ["joints.command"]),
        site.subscribe("robot", ["session.status"]),
    )
    try:
        wait_for_state([buses.leader, buses.follower], "tracking", timeout_s=60)
        yield buses
    except AssertionError:
        print(site.logs())
        raise
    finally:
        for subscriber in (buses.leader, buses.follower, buses.commands, buses.status):
            subscriber.close()


def status_events(status: Subscriber, event: str) -> list[MessageFrame]:
    """The gateway's `event` frames queued on the robot's session.status since the last read."""
    return [
        r.frame
        for r in status.drain()
        if isinstance(r.frame, MessageFrame) and r.frame.fields.get("event") == event
    ]


def wait_for_event(status: Subscriber, event: str, timeout_s: float) -> MessageFrame | None:
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        received = status.recv(timeout_ms=remaining * 1000)
        frame = received.frame if received is not None else None
        if isinstance(frame, MessageFrame) and frame.fields.get("event") == event:
            return frame
    return None


@dataclass
class Delivery:
    """Commands that crossed the link, against what the leader published meanwhile."""

    fraction: float  # of the leader's frames in the window that reached the robot's bus
    longest_lost_run: int
    age_ms: list[float]  # arrival on the robot's bus minus origin (robot clock), sorted

    @classmethod
    def of(cls, samples: list[Sample]) -> Delivery:
        # The leader's last max_command_age of frames is left out: their commands may still
        # be on their way when the window closes, and older ones are of no use to the arm.
        # (The leader's seq also counts its health beats: only the joint frames seen count.)
        leaders = [s.frame for s in samples if s.topic == "joints.leader"]
        last_t = max(f.t for f in leaders) - DEFAULTS.max_command_age_s * 1e9
        got = {s.frame.seq for s in samples if s.topic == "joints.command"}
        arrived = [f.seq in got for f in sorted(leaders, key=lambda f: f.seq) if f.t <= last_t]
        runs = [len(list(run)) for came, run in itertools.groupby(arrived) if not came]
        ages = sorted((s.recv_ns - s.frame.t) / 1e6 for s in samples if s.topic == "joints.command")
        return cls(sum(arrived) / len(arrived), max(runs, default=0), ages)

    def age(self, q: float) -> float:
        return self.age_ms[min(len(self.age_ms) - 1, int(q * len(self.age_ms)))]


@pytest.mark.parametrize("loss", [0.01, 0.05, 0.20], ids=["1%", "5%", "20%"])
def test_control_flows_and_tracking_stays_bounded_under_loss(
    site: Site, buses: Buses, loss: float
) -> None:
    net, ns, link = site.network, site.namespaces["robot"], site.links["robot"]
    odds = ("-m", "statistic", "--mode", "random", "--probability", str(loss))
    rules = [
        net.iptables(ns, "-A", "INPUT", "-i", link, "-p", "udp"),  # counts what arrives
        net.iptables(ns, "-A", "INPUT", "-i", link, "-p", "udp", *odds, "-j", "DROP"),
        net.iptables(ns, "-A", "OUTPUT", "-o", link, "-p", "udp", *odds, "-j", "DROP"),
    ]
    arms = [buses.leader, buses.follower]
    try:
        collect([*arms, buses.commands], 0.5)  # the loss settles in (SCTP, pings)
        buses.status.drain()
        samples = collect([*arms, buses.commands], WINDOW_S)
        closed = status_events(buses.status, "closed")
        arrived, dropped_in = net.packets(rules[0]), net.packets(rules[1])
        dropped_out = net.packets(rules[2])
    finally:
        for rule in reversed(rules):
            net.delete(rule)

    frames = followers(samples)
    errors = tracking_errors([s for s in samples if s.topic != "joints.command"])
    delivery = Delivery.of(samples)
    n = WINDOW_S * RATE_HZ
    # About 1 - p of the commands arrive, within 5 standard deviations: more means lost ones
    # were sent again (not a zero-retransmit channel), fewer that control stopped flowing.
    spread = 5 * math.sqrt(loss * (1 - loss) / n)
    least, most = 1 - loss - spread, 1 - loss + spread
    bound = loss_bound(loss, delivery.age_ms[-1] / 1000)
    states = {f.state for f in frames}
    print(
        f"loss {loss:.0%} each way on the robot's link (measured {dropped_in / max(arrived, 1):.1%}"
        f" of {arrived} packets in, {dropped_out} out): commands delivered "
        f"{delivery.fraction:.1%} (expected {least:.1%}..{min(most, 1):.1%}), longest lost run "
        f"{delivery.longest_lost_run} (derived k {longest_credible_run(loss, int(n))}), age on "
        f"arrival p50 {delivery.age(0.5):.1f} p99 {delivery.age(0.99):.1f} max "
        f"{delivery.age_ms[-1]:.1f} ms; tracking error max {max(errors, default=0):.2f} p50 "
        f"{statistics.median(errors) if errors else 0:.2f} (bound {bound:.2f}, of which loss "
        f"{loss_bound(loss):.2f}); follower states "
        f"{sorted(states)}"
    )
    assert dropped_in > 0 and dropped_out > 0, "the loss rules dropped nothing: not tested"
    assert len(errors) > 0.8 * n, "too few follower frames to judge tracking"
    assert delivery.fraction >= least, "commands stopped flowing on the unordered channel"
    if most < 1:  # at 1 % a window may well lose nothing
        assert delivery.fraction <= most, "lost commands were sent again: not zero-retransmit"
    assert states == {"tracking"}, f"the follower stopped tracking: states {states}"
    assert not closed, f"the session ended under loss: {[c.fields for c in closed]}"
    assert max(errors) <= bound, (max(errors), bound)


def test_full_cut_holds_within_500ms_then_recovers_with_a_ramp(site: Site, buses: Buses) -> None:
    leader, follower, status = buses.leader, buses.follower, buses.status
    net, ns, link = site.network, site.namespaces["robot"], site.links["robot"]
    collect([leader, follower], 0.5)
    status.drain()
    cut_ns = time.time_ns()  # before the rules: the hold measured is never shorter than real
    rules = [
        net.iptables(ns, "-A", "INPUT", "-i", link, "-j", "DROP"),
        net.iptables(ns, "-A", "OUTPUT", "-o", link, "-j", "DROP"),
    ]
    cut_in_s = (time.time_ns() - cut_ns) / 1e9
    try:
        during = collect(follower, 5.0, until=lambda s: s.frame.state == "stale")
        closed = wait_for_event(status, "closed", timeout_s=5.0)
    finally:
        for rule in reversed(rules):
            net.delete(rule)
    restored_ns = time.time_ns()

    stale = next((f for f in followers(during) if f.state == "stale"), None)
    assert stale is not None, f"the follower never held: {[f.state for f in followers(during)]}"
    assert closed is not None, "the robot's gateway never declared the link lost"
    hold_s = (stale.t - cut_ns) / 1e9
    lost_s = (closed.t - cut_ns) / 1e9
    print(
        f"full cut (rules in within {cut_in_s * 1000:.0f} ms): follower holding after "
        f"{hold_s * 1000:.0f} ms, robot gateway declared the link lost after "
        f"{lost_s * 1000:.0f} ms ({closed.fields.get('reason')})"
    )
    assert hold_s <= DESIGN_HOLD_S + SLACK_S, hold_s
    assert closed.fields.get("reason") == "link_lost", closed.fields
    assert lost_s <= DESIGN_HOLD_S + SLACK_S, lost_s

    resumed = wait_for_state([leader, follower], "tracking", timeout_s=60)
    resumed_s = (time.time_ns() - restored_ns) / 1e9
    print(f"link restored -> pair again and tracking after {resumed_s:.1f} s")
    frames = followers(during + resumed)
    assert max_goal_step(frames) <= 1.0, "the goal jumped by more than max_step per tick"
    states = [f.state for f in frames]
    assert "ramping" in states[states.index("stale") :], "re-engage did not ramp"
