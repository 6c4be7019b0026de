"""The camera service as a real process: a generated video file as a camera, a broken camera
beside it, frames on the bus, health and metrics, a clean stop, and refused settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.bus import MessageFrame, Subscriber, VideoFrame, load_bus_map
from services.station_runner import free_port_offset
from tests.support.clips import write_clip

pytestmark = pytest.mark.integration
FILE_FRAMES = 12  # the clip is shorter than the test: it must loop


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rdv-camera-") as name:
        yield Path(name)


def start_camera(workdir: Path, cameras: dict, offset: int) -> subprocess.Popen:
    env = {**os.environ, "RDV_RUN_DIR": str(workdir / "run"), "RDV_PORT_OFFSET": str(offset)}
    log = open(workdir / "camera.log", "wb")  # noqa: SIM115 - closed with the process below
    process = subprocess.Popen(
        [sys.executable, "-m", "services.camera", f"--robot.cameras={json.dumps(cameras)}",
         "--station", "cam-test"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    return process


def metric(port: int, name: str, labels: dict[str, str]) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_video_file_camera_loops_while_a_broken_camera_is_retried(workdir: Path) -> None:
    clip = write_clip(workdir / "clip.avi", 320, 240, FILE_FRAMES)
    cameras = {
        "clip": {"type": "opencv", "index_or_path": str(workdir / "clip.avi"),
                 "width": 320, "height": 240, "fps": 30},
        "gone": {"type": "opencv", "index_or_path": str(workdir / "unplugged.avi")},
    }  # fmt: skip
    offset = free_port_offset([9704])
    bus = load_bus_map(run_dir=workdir / "run", port_offset=offset)
    process = start_camera(workdir, cameras, offset)
    subscriber = Subscriber(bus, ["video.*", "health"], recv_hwm=50)
    try:
        frames: list[VideoFrame] = []
        health: list[dict] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(frames) < 3 * FILE_FRAMES or len(health) < 2):
            received = subscriber.recv(timeout_ms=100)
            if received is None:
                continue
            if isinstance(received.frame, VideoFrame):
                assert received.topic == "video.clip"
                frames.append(received.frame)
            elif isinstance(received.frame, MessageFrame):
                health.append(received.frame.fields)
        log = (workdir / "camera.log").read_text()
        assert len(frames) >= 3 * FILE_FRAMES, log  # looped at least twice
        assert process.poll() is None, log

        frame = frames[-1]
        assert (frame.width, frame.height, frame.encoding, frame.src) == (320, 240, "bgr24",
                                                                           "cam-test")  # fmt: skip
        picture = np.frombuffer(frame.data, np.uint8).reshape(240, 320, 3).astype(int)
        assert min(np.abs(picture - image).mean() for image in clip) < 6  # one of the clip's
        times = [f.t for f in frames]
        assert times == sorted(times) and len({f.seq for f in frames}) == len(frames)

        latest = health[-1]["cameras"]
        assert latest["clip"]["up"] is True and latest["clip"]["frames"] > 0
        assert latest["gone"]["up"] is False and "unplugged.avi" in latest["gone"]["error"]
        port = bus.metrics_port("camera")
        assert metric(port, "rdv_camera_up", {"camera": "clip"}) == 1.0
        assert metric(port, "rdv_camera_up", {"camera": "gone"}) == 0.0
        assert metric(port, "rdv_camera_failures_total", {"camera": "gone"}) >= 2  # retried
        assert log.count("unplugged.avi") <= 3, "a missing camera must not flood the log"
    finally:
        subscriber.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("cameras", "says"),
    [
        ("{broken", "not valid JSON"),
        ('{"front": {"type": "opencv"}}', "index_or_path"),
        ("", "no cameras configured"),
    ],
)
def test_settings_that_cannot_work_exit_78_with_the_reason(cameras: str, says: str) -> None:
    with tempfile.TemporaryDirectory(prefix="rdv-camera-") as run_dir:
        result = subprocess.run(
            [sys.executable, "-m", "services.camera", f"--robot.cameras={cameras}"],
            env={**os.environ, "RDV_RUN_DIR": run_dir, "RDV_CAMERAS": ""},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert says in result.stderr + result.stdout
