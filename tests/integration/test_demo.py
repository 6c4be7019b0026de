"""deploy/demo.conf under real supervisord: local broker + robot and teleop stations pair.

This is what `make demo` runs (identities prepared as `rdv demo` prepares them), checked from
outside: presence on the demo's broker, `rdv fleet` as a user types it, and both station buses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.bus import FollowerFrame, JointFrame, Subscriber, load_bus_map
from services.demo import prepare_demo_identities
from services.fleet import FleetWatcher
from tests.support.arm_checks import (
    TRACKING_BOUND,
    collect,
    followers,
    max_goal_step,
    tracking_errors,
    wait_for_state,
)
from tests.support.broker import free_port
from tests.support.rendezvous import wait_until
from tests.support.station import Station

pytestmark = pytest.mark.integration
TELEOP_PORT_SHIFT = 100  # RDV_STATION_PORT_OFFSET of the teleop programs in deploy/demo.conf
RDV = str(Path(sys.executable).parent / "rdv")
PROGRAMS = [
    "broker",
    "robot_arm",
    "robot_camera",
    "robot_session",
    "robot_gateway",
    "teleop_session",
    "teleop_gateway",
    "teleop_arm",
]


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


def buses(demo: Station) -> tuple[Subscriber, Subscriber]:
    """The leader as the teleop station publishes it, the follower as the robot does."""
    leader = Subscriber(load_bus_map(run_dir=demo.run_dir / "teleop"), ["joints.leader"])
    follower = Subscriber(load_bus_map(run_dir=demo.run_dir / "robot"), ["joints.follower"])
    return leader, follower


def robot_metric(demo: Station, process: str, name: str, labels=None) -> float:
    return demo.metric(process, name, labels)  # robot station: base ports (+ machine offset)


def test_follower_tracks_the_leader_across_stations_over_webrtc(demo: Station) -> None:
    leader, follower = buses(demo)
    try:
        wait_for_state([leader, follower], "tracking", timeout_s=40)
        steady = collect([leader, follower], 3.0)
        errors = tracking_errors(steady)
        assert len(errors) > 100, "too few follower frames to judge tracking"
        # The same bound as one station: the WebRTC hop adds ~1 ms, 0.1 degree at peak speed.
        assert max(errors) <= TRACKING_BOUND, (max(errors), TRACKING_BOUND)
        applied = robot_metric(demo, "follower_arm", "rdv_control_latency_seconds_count")
        assert applied > 100, "commands did not reach the follower's apply step"
        print(f"cross-station tracking: max error {max(errors):.2f} (bound {TRACKING_BOUND:.2f})")
    except AssertionError:
        print(demo.logs())
        raise
    finally:
        leader.close()
        follower.close()


def test_robot_gateway_sigkill_holds_then_resumes_without_a_jump(demo: Station) -> None:
    leader, follower = buses(demo)
    try:
        wait_for_state([leader, follower], "tracking", timeout_s=40)
        collect([leader, follower], 1.0)
        gateway_pid = demo.pid("robot_gateway")
        killed_ns = time.time_ns()
        os.kill(gateway_pid, signal.SIGKILL)
        held = wait_for_state(follower, "stale", timeout_s=5)
        first_stale = next(f for f in followers(held) if f.state == "stale")
        hold_after_s = (first_stale.t - killed_ns) / 1e9
        print(f"robot gateway SIGKILL -> follower holding after {hold_after_s * 1000:.0f} ms")
        assert hold_after_s <= 0.5, hold_after_s  # DESIGN: link loss -> holding <= 500 ms

        demo.wait_for_new_pid("robot_gateway", gateway_pid, timeout_s=20)
        resumed = wait_for_state([leader, follower], "tracking", timeout_s=30)
        resumed_after_s = (time.time_ns() - killed_ns) / 1e9
        print(f"robot gateway SIGKILL -> tracking again after {resumed_after_s:.1f} s")
        assert resumed_after_s <= 10.0, resumed_after_s  # issue 4: re-established within 10 s
        resumed += collect([leader, follower], 1.0)
        frames = followers(held + resumed)
        assert max_goal_step(frames) <= 1.0, "the goal jumped by more than max_step per tick"
        states = [f.state for f in frames]
        assert "ramping" in states[states.index("stale") :], "re-engage did not ramp"
    except AssertionError:
        print(demo.logs())
        raise
    finally:
        leader.close()
        follower.close()


def test_video_reaches_the_teleop_at_camera_rate_with_measured_latency(demo: Station) -> None:
    """The robot's sim camera -> bus -> robot gateway -> WebRTC video -> decoded at the teleop."""

    def video() -> dict[str, float]:
        try:
            return demo.metric_samples(
                "gateway", "rdv_video", {"camera": "front"}, station_offset=TELEOP_PORT_SHIFT
            )
        except OSError:  # the gateway is still starting (or restarting): no /metrics yet
            return {}

    try:
        assert wait_until(lambda: video().get("rdv_video_frames_decoded_total", 0) > 30, 60)
        before, start = video(), time.monotonic()
        time.sleep(5.0)
        after, seconds = video(), time.monotonic() - start
        fps = after["rdv_video_frames_decoded_total"] - before["rdv_video_frames_decoded_total"]
        fps /= seconds
        count = after["rdv_video_latency_seconds_count"] - before["rdv_video_latency_seconds_count"]
        total = after["rdv_video_latency_seconds_sum"] - before["rdv_video_latency_seconds_sum"]
        print(f"video at the teleop: {fps:.1f} fps, mean glass-to-glass {total / count * 1e3:.1f} "
              f"ms over {count:.0f} frames")  # fmt: skip
        assert fps >= 25.0, fps  # issue 4: >= 25 fps from a 30 fps camera
        # Every decoded frame is matched with its capture time (a few at the start may not be).
        assert count >= 0.9 * fps * seconds, (count, fps * seconds)
        assert 0 < total / count < 1.0, "capture-to-decode latency is not plausible"
    except AssertionError:
        print(demo.logs())
        raise
