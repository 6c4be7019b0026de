"""Control latency across stations whose clocks disagree: the gateway's offset estimate corrects it.

Two stations, each under its own supervisord as on two machines (the shipped deploy/robot.conf
and deploy/teleop.conf, unchanged), a real Mosquitto between them, WebRTC on loopback. The
teleop station's whole process tree runs with RDV_CLOCK_SKEW_MS (services/clock.py), so every
time it stamps is off by that much; the robot's clock is true. On one machine the true offset
is therefore known exactly: it is the skew.

Once the estimator has a full window of pings (5 s into the session), each command the
follower applies is matched (by seq) to the leader frame it came from:
- `t` of the leader frame on the teleop bus: the leader's read time on the teleop clock;
- `cmd_t` of the follower frame on the robot bus: the same time after the robot's gateway moved
  it to the robot clock with its estimate (what the follower judges age and latency by).
So error = cmd_t - (t - skew) is the estimate's error, and the follower's
rdv_control_latency_seconds is off by exactly -error. Every error must be within 1 ms (issue 5).
Without the correction a 250 ms skew could not even track: max_command_age (100 ms) would refuse
every command as too_old or future, which is asserted not to happen.
The figures are printed per run (pytest -s); the robot station runs without a camera, so only
the control path loads the machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.bus import FollowerFrame, JointFrame, Subscriber
from services.webrtc_gateway.link import OFFSET_WINDOW, PING_INTERVAL_S
from tests.support.arm_checks import collect, wait_for_state
from tests.support.station import Station
from tests.support.two_stations import Pair, two_stations

pytestmark = pytest.mark.integration
BOUND_NS = 1_000_000  # issue 5: the corrected latency stays within 1 ms


@dataclass
class Skewed:
    stations: Pair
    skew_ms: int

    @property
    def robot(self) -> Station:
        return self.stations.robot

    @property
    def teleop(self) -> Station:
        return self.stations.teleop

    def logs(self) -> str:
        return self.stations.logs()


@pytest.fixture(params=[0, 250, -250], ids=lambda ms: f"teleop clock {ms:+d} ms")
def pair(request: pytest.FixtureRequest) -> Iterator[Skewed]:
    skew_ms: int = request.param
    with two_stations(
        robot_env={"RDV_CLOCK_SKEW_MS": "0"}, teleop_env={"RDV_CLOCK_SKEW_MS": str(skew_ms)}
    ) as stations:
        yield Skewed(stations, skew_ms)


def control_latency(station: Station) -> tuple[float, float]:
    """The follower's rdv_control_latency_seconds (sum, count) now."""
    return (
        station.metric("follower_arm", "rdv_control_latency_seconds_sum"),
        station.metric("follower_arm", "rdv_control_latency_seconds_count"),
    )


def refused(station: Station, reason: str) -> float:
    return station.metric("follower_arm", "rdv_commands_rejected_total", {"reason": reason})


def test_offset_estimate_corrects_a_skewed_station_clock_within_1_ms(pair: Skewed) -> None:
    leader = Subscriber(pair.teleop.bus, ["joints.leader"])
    follower = Subscriber(pair.robot.bus, ["joints.follower"])
    try:
        wait_for_state([leader, follower], "tracking", timeout_s=40)
        # Steady state: the estimate is the best ping of a full window. In a session's first
        # seconds it rests on a few pings, and on a loaded machine one of those can be off by
        # more (measured once: 1.5 ms at a 3 ms mean control latency).
        collect([leader, follower], OFFSET_WINDOW * PING_INTERVAL_S)
        refused_before = {reason: refused(pair.robot, reason) for reason in ("too_old", "future")}
        sum_before, count_before = control_latency(pair.robot)
        samples = collect([leader, follower], 3.0)
        sum_after, count_after = control_latency(pair.robot)
    except AssertionError:
        print(pair.logs())
        raise
    finally:
        leader.close()
        follower.close()

    sent = {s.frame.seq: s.frame.t for s in samples if isinstance(s.frame, JointFrame)}
    applied = {
        s.frame.cmd_seq: s.frame.cmd_t
        for s in samples
        if isinstance(s.frame, FollowerFrame) and s.frame.cmd_seq in sent
    }
    assert len(applied) > 100, f"only {len(applied)} applied commands matched a leader frame"
    skew_ns = pair.skew_ms * 1_000_000
    errors = [cmd_t - (sent[seq] - skew_ns) for seq, cmd_t in applied.items()]
    applied_count = count_after - count_before
    assert applied_count > 100, "the follower applied (and timed) too few commands"
    mean_latency_ms = (sum_after - sum_before) / applied_count * 1e3
    median_ms, worst_ms = statistics.median(errors) / 1e6, max(errors, key=abs) / 1e6
    print(
        f"teleop clock {pair.skew_ms:+d} ms: offset estimate error over {len(errors)} commands "
        f"median {median_ms:+.3f} ms, worst {worst_ms:+.3f} ms; follower control latency "
        f"mean {mean_latency_ms:.3f} ms over {applied_count:.0f} applied"
    )
    assert max(abs(error) for error in errors) <= BOUND_NS, errors
    for reason, before in refused_before.items():
        assert refused(pair.robot, reason) == before, f"commands refused as {reason}"
