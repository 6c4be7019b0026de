"""Video as the teleop's gateway reports it on /metrics: decoded frames and glass-to-glass
latency over a window, read from outside. Read-only: it never touches a station."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tests.support.rendezvous import wait_until
from tests.support.station import Station

DECODED = "rdv_video_frames_decoded_total"


@dataclass(frozen=True)
class VideoWindow:
    seconds: float
    fps: float  # frames decoded per second at the teleop
    timed: float  # decoded frames matched with their capture time
    latency_sum_s: float

    @property
    def mean_ms(self) -> float:
        return self.latency_sum_s / self.timed * 1e3 if self.timed else float("nan")


def video_samples(station: Station, camera: str, station_offset: int = 0) -> dict[str, float]:
    """The gateway's rdv_video_* samples for one camera; {} while it has no /metrics yet."""
    try:
        return station.metric_samples("gateway", "rdv_video", {"camera": camera}, station_offset)
    except OSError:  # the gateway is still starting (or restarting)
        return {}


def video_window(
    station: Station, camera: str, station_offset: int = 0, seconds: float = 5.0
) -> VideoWindow:
    """Once video flows (30 frames decoded, within 60 s), what `seconds` more of it measure."""
    assert wait_until(
        lambda: video_samples(station, camera, station_offset).get(DECODED, 0) > 30, 60
    ), f"no video from camera {camera!r} at the teleop"
    before, start = video_samples(station, camera, station_offset), time.monotonic()
    time.sleep(seconds)
    after, elapsed = video_samples(station, camera, station_offset), time.monotonic() - start
    return VideoWindow(
        seconds=elapsed,
        fps=(after[DECODED] - before[DECODED]) / elapsed,
        timed=after["rdv_video_latency_seconds_count"] - before["rdv_video_latency_seconds_count"],
        latency_sum_s=after["rdv_video_latency_seconds_sum"]
        - before["rdv_video_latency_seconds_sum"],
    )
