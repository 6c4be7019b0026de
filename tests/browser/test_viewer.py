"""The viewer page in real headless Chromium against the running demo, and the emergency stop
end to end: page button and `rdv estop` on the teleop, latch kept through a gateway restart,
re-arm only on the robot station.

deploy/demo.conf runs under real supervisord (identities as `rdv demo` prepares them); the
teleop's page is at 8080 + the test's port offset, the robot's at 8081 + offset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.bus import FollowerFrame, MessageFrame, Subscriber, load_bus_map
from tests.support.arm_checks import PERIOD_S, collect, wait_for_state
from tests.support.browser import Chromium
from tests.support.demo import demo_station, start_demo
from tests.support.rendezvous import wait_until
from tests.support.station import Station

# No skip without Chromium: the README's setup installs it, and a missing browser must fail
# loudly (tests.support.browser says how to get it), not pass as "skipped".
pytestmark = pytest.mark.integration
RDV = str(Path(sys.executable).parent / "rdv")
SCHEDULING_SLACK_S = 0.1  # a loaded 2-core machine may run a process late by this much


@pytest.fixture(scope="module")
def demo() -> Iterator[Station]:
    station = demo_station()
    try:
        start_demo(station)
        yield station
    finally:
        station.stop()


def page_url(demo: Station, station: str) -> str:
    return f"http://127.0.0.1:{(8080 if station == 'teleop' else 8081) + demo.port_offset}/"


def state(demo: Station, station: str) -> dict:
    with urllib.request.urlopen(page_url(demo, station) + "state", timeout=5) as reply:
        return json.load(reply)


def live(demo: Station) -> bool:
    try:
        view = state(demo, "teleop")
    except OSError:
        return False
    return view["session_state"] == "live" and view["follower_state"] == "tracking"


def test_page_plays_the_robot_camera_and_updates_its_figures(demo: Station) -> None:
    assert wait_until(lambda: live(demo), 90), demo.logs()
    browser = Chromium(page_url(demo, "teleop"))
    try:
        page = browser.page(page_url(demo, "teleop"))
        frames = "document.querySelector('video')?.getVideoPlaybackQuality().totalVideoFrames ?? 0"
        assert wait_until(lambda: page.js(frames) > 10, 60), "no decoded frames in the page"
        first = page.js(frames)
        rtt_before = page.js("document.getElementById('rtt').textContent")
        first_shot = page.screenshot()
        time.sleep(1.0)
        second_shot = page.screenshot()
        time.sleep(1.0)
        assert page.js(frames) > first + 20, "the video element stopped decoding"
        assert page.js("!document.querySelector('video').paused")
        assert page.js("document.querySelector('video').videoWidth") == 640
        assert page.js("document.getElementById('badge').textContent") == "live"
        assert page.js("document.getElementById('fstate').textContent") == "tracking"
        assert "demo-robot" in page.js("document.getElementById('who').textContent")
        rtt_after = page.js("document.getElementById('rtt').textContent")
        assert rtt_after.endswith(" ms") and rtt_after != "–"
        assert rtt_after != rtt_before or page.js("document.getElementById('video').textContent")
        for name in ("control", "video", "fps"):
            assert page.js(f"document.getElementById('{name}').textContent") != "–", name

        assert first_shot.std() > 10, "blank page"
        video_box = page.js(
            "(() => { const r = document.querySelector('video')"
            ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
        )
        x, y, w, h = (int(v) for v in video_box)
        crop = (slice(y, y + h), slice(x, x + w))
        assert first_shot[crop].std() > 5, "the video area is blank"
        changed = np.any(first_shot[crop] != second_shot[crop], axis=2).mean()
        print(f"viewer: {page.js(frames)} frames decoded in the page, {changed:.1%} of the video "
              "area changed in 1 s")  # fmt: skip
        assert changed > 0.002, "the arm does not move in the page's video"
        page.close()
    except AssertionError:
        print(demo.logs())
        raise
    finally:
        browser.close()


def follower_states(subscriber: Subscriber, seconds: float) -> list[FollowerFrame]:
    return [s.frame for s in collect(subscriber, seconds) if isinstance(s.frame, FollowerFrame)]


def rdv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RDV, *args], capture_output=True, text=True, timeout=60)


def test_stop_button_latches_within_a_tick_survives_a_gateway_restart_rearms_only_on_robot(
    demo: Station,
) -> None:
    assert wait_until(lambda: live(demo), 90), demo.logs()
    robot_bus = load_bus_map(run_dir=demo.run_dir / "robot")
    follower = Subscriber(robot_bus, ["joints.follower"])
    control = Subscriber(robot_bus, ["session.control"])
    try:
        # The teleop's page: the stop crosses the link and the robot's gateway puts it on the
        # robot's bus, where the follower latches it.
        request = urllib.request.Request(page_url(demo, "teleop") + "estop", method="POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert "sent to demo-robot" in json.load(reply)["note"]
        stop = next(
            s.frame for s in collect(control, 5.0, until=lambda s: s.frame.fields.get("event")
                                     == "estop") if isinstance(s.frame, MessageFrame)
        )  # fmt: skip
        frames = follower_states(follower, 1.0)
        late = [f for f in frames if f.t > stop.t + PERIOD_S + SCHEDULING_SLACK_S]
        assert late and all(f.state == "estop" for f in late), {f.state for f in late}
        first = next(f for f in frames if f.state == "estop")
        print(f"estop: follower holding {(first.t - stop.t) / 1e6:.1f} ms after the robot "
              "gateway published the stop")  # fmt: skip
        assert wait_until(lambda: state(demo, "teleop")["follower_state"] == "estop", 10)

        # A restarted gateway (and re-established session) does not clear the latch.
        gateway_pid = demo.pid("robot_gateway")
        os.kill(gateway_pid, signal.SIGKILL)
        demo.wait_for_new_pid("robot_gateway", gateway_pid, timeout_s=20)
        assert wait_until(lambda: state(demo, "teleop")["session_state"] == "live", 30)
        assert {f.state for f in follower_states(follower, 2.0)} == {"estop"}

        # Re-arm: refused on the teleop (page and CLI), accepted on the robot station.
        request = urllib.request.Request(page_url(demo, "teleop") + "rearm", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404
        teleop_dir = str(demo.run_dir / "teleop")
        result = rdv("rearm", "--run-dir", teleop_dir)
        assert result.returncode == 2 and "not a robot station" in result.stdout
        assert {f.state for f in follower_states(follower, 0.5)} == {"estop"}
        assert state(demo, "robot")["can_rearm"] and not state(demo, "teleop")["can_rearm"]

        result = rdv("rearm", "--run-dir", str(demo.run_dir / "robot"))
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for_state(follower, "tracking", timeout_s=20)

        # `rdv estop` on the teleop station goes the same way and says when the arm holds.
        result = rdv("estop", "--run-dir", teleop_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "EMERGENCY STOP latched" in result.stdout
        assert follower_states(follower, 0.5)[-1].state == "estop"
        result = rdv("rearm", "--run-dir", str(demo.run_dir / "robot"))
        assert result.returncode == 0, result.stdout + result.stderr
    except AssertionError:
        print(demo.logs())
        raise
    finally:
        follower.close()
        control.close()
