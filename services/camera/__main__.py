"""Camera service: capture each configured camera on its own thread, publish `video.<name>`.

Each camera runs at its configured fps on a fixed-rate ticker and publishes raw frames (the
pixels as the third multipart part, the capture time as `t`). A camera that fails to open or
stops delivering is reported (health, rdv_camera_up, rdv_camera_failures_total) and reopened
with backoff; the other cameras keep going. This process never touches an arm, and a camera
never blocks another: one thread each, and the bus drops frames a slow reader cannot take.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from services import clock, exits, metrics
from services.arm_driver.ticker import Ticker
from services.bus import BusConfigError, BusMap, Publisher, VideoFrame, load_bus_map
from services.bus.health import HealthBeat
from services.camera.config import (
    CAMERAS_ENV,
    CameraConfig,
    CameraConfigError,
    cameras_from_env,
    parse_cameras,
)
from services.camera.sources import CameraFailure, Source, open_source
from services.logs import setup_logging
from services.service_flags import add_station_flags

log = logging.getLogger("camera")
PROCESS = "camera"
EXIT_CONFIG = exits.EXIT_CONFIG  # supervisord must not restart a process that cannot work
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.camera",
        description="Capture the station's cameras and publish their frames on the bus "
        "(video.<name>), each on its own thread at its own fps.",
        epilog='Example: --robot.cameras=\'{"front": {"type": "opencv", "index_or_path": 0, '
        '"width": 640, "height": 480, "fps": 30}}\'. Types: opencv (device index, /dev path '
        "or video file, which loops), sim (draws the simulated follower), or any LeRobot "
        "camera type when LeRobot is installed.",
    )
    parser.add_argument(
        "--robot.cameras",
        dest="cameras",
        default=cameras_from_env(),
        help=f"cameras as LeRobot takes them, a JSON object name -> settings (default: "
        f"${CAMERAS_ENV}, else none)",
    )
    add_station_flags(parser)
    return parser


class LockedPublisher:
    """One bus socket shared by the capture threads: ZeroMQ sockets are not thread-safe."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._lock = threading.Lock()

    def next_seq(self) -> int:
        with self._lock:
            return self._publisher.next_seq()

    def send(self, topic: str, frame: Any) -> None:
        with self._lock:
            self._publisher.send(topic, frame)


@dataclass
class CameraStatus:
    up: bool = False
    frames: int = 0
    failures: int = 0
    error: str | None = None

    def as_health(self) -> dict[str, Any]:
        return {"up": self.up, "frames": self.frames, "failures": self.failures,
                "error": self.error}  # fmt: skip


class CameraThread(threading.Thread):
    def __init__(
        self,
        config: CameraConfig,
        bus: BusMap,
        publisher: LockedPublisher,
        station: str,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"camera-{config.name}", daemon=True)
        self.config, self.bus, self.publisher = config, bus, publisher
        self.station, self.stop = station, stop
        self.status = CameraStatus()
        metrics.CAMERA_UP.labels(camera=config.name).set(0)
        # Born at 0, so the first failure shows in rate()/increase() (a series born at 1 hides it).
        metrics.CAMERA_FAILURES.labels(camera=config.name)

    def run(self) -> None:
        retry_s = RETRY_FIRST_S
        while not self.stop.is_set():
            try:
                source = open_source(self.config, self.bus)
            except CameraFailure as exc:
                self.failed(str(exc))
                self.stop.wait(retry_s)
                retry_s = min(RETRY_MAX_S, retry_s * 2)
                continue
            config = self.config
            log.info("%s: capturing %dx%d at %g fps (%s)",
                     config.name, config.width, config.height, config.fps, config.type)  # fmt: skip
            try:
                if self.capture(source):
                    retry_s = RETRY_FIRST_S  # it delivered: the next failure starts afresh
            finally:
                source.close()

    def capture(self, source: Source) -> bool:
        """Publish frames until the source fails or the service stops; True if any arrived."""
        ticker = Ticker(self.config.fps)
        delivered = False
        while not self.stop.is_set():
            ticker.sleep()
            try:
                image = source.read()
            except CameraFailure as exc:
                self.failed(str(exc))
                self.stop.wait(RETRY_FIRST_S)
                return delivered
            captured_ns = clock.now_ns()
            height, width = image.shape[:2]
            frame = VideoFrame(self.publisher.next_seq(), captured_ns, self.station,
                               width, height, source.encoding, image.tobytes())  # fmt: skip
            self.publisher.send(self.config.topic, frame)
            if not self.status.up:
                metrics.CAMERA_UP.labels(camera=self.config.name).set(1)
                log.info("%s: delivering frames", self.config.name)
            self.status.up, self.status.error = True, None
            self.status.frames += 1
            delivered = True
        return delivered

    def failed(self, why: str) -> None:
        metrics.CAMERA_UP.labels(camera=self.config.name).set(0)
        metrics.CAMERA_FAILURES.labels(camera=self.config.name).inc()
        # Log the first failure of a run, then every 10th: an unplugged camera must not flood.
        if self.status.failures % 10 == 0:
            log.warning("%s (failure %d; retrying)", why, self.status.failures + 1)
        self.status.up, self.status.error = False, why
        self.status.failures += 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level, PROCESS)
    try:
        cameras = parse_cameras(args.cameras)
        bus = load_bus_map(args.bus_config, run_dir=args.run_dir)
    except (CameraConfigError, BusConfigError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    if not cameras:
        log.error(f"no cameras configured: give --robot.cameras or ${CAMERAS_ENV}")
        return EXIT_CONFIG
    metrics.serve_metrics(args.metrics_port or bus.metrics_port(PROCESS))
    try:
        publisher = Publisher(bus, PROCESS, send_hwm=bus.video_hwm)
    except BusConfigError as exc:  # its bus endpoint cannot be bound (run dir, port)
        log.error("%s", exc)
        return EXIT_CONFIG
    shared = LockedPublisher(publisher)
    health = HealthBeat(shared, args.station, PROCESS)  # type: ignore[arg-type]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threads = [CameraThread(config, bus, shared, args.station, stop) for config in cameras]
    for thread in threads:
        thread.start()
    try:
        while not stop.wait(0.2):
            health.maybe_send(cameras={t.config.name: t.status.as_health() for t in threads})
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=2.0)
        publisher.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(exits.final(main()))
