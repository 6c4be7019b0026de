"""deploy/demo.conf under real supervisord: local broker + robot and teleop stations pair.

This is what `make demo` runs (identities prepared as `rdv demo` prepares them), checked from
outside: presence on the demo's broker, `rdv fleet` as a user types it, and both station buses.
What happens when a part of it is killed or paused is the fault suite's (tests/faults/).
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
from tests.support.arm_checks import (
    TRACKING_BOUND,
    collect,
    tracking_errors,
    wait_for_state,
)
from tests.support.demo import STATION_PORT_SHIFT, buses, demo_station, start_demo
from tests.support.rendezvous import wait_until
from tests.support.station import Station
from tests.support.video_checks import video_window

pytestmark = pytest.mark.integration
TELEOP_PORT_SHIFT = STATION_PORT_SHIFT["teleop"]
RDV = str(Path(sys.executable).parent / "rdv")


@pytest.fixture
def demo() -> Iterator[Station]:
    station = demo_station()
    try:
        start_demo(station)  # waits for every program supervisord lists
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


def test_video_reaches_the_teleop_at_camera_rate_with_measured_latency(demo: Station) -> None:
    """The robot's sim camera -> bus -> robot gateway -> WebRTC video -> decoded at the teleop."""

    try:
        video = video_window(demo, "front", station_offset=TELEOP_PORT_SHIFT)
        print(f"video at the teleop: {video.fps:.1f} fps, mean glass-to-glass "
              f"{video.mean_ms:.1f} ms over {video.timed:.0f} frames")  # fmt: skip
        assert video.fps >= 25.0, video.fps  # issue 4: >= 25 fps from a 30 fps camera
        # Every decoded frame is matched with its capture time (a few at the start may not be).
        assert video.timed >= 0.9 * video.fps * video.seconds, video
        assert 0 < video.mean_ms < 1000.0, "capture-to-decode latency is not plausible"
    except AssertionError:
        print(demo.logs())
        raise
