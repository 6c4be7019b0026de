"""Frame sources for the camera service: OpenCV devices and video files, the sim arm render,
and LeRobot's own camera classes.

A source is opened, read and closed on its camera's capture thread only. `read()` returns one
picture (H x W x 3, uint8) in the source's `encoding` at the configured size, or raises
CameraFailure; the service then closes it and retries. Sources never publish, never sleep to
pace themselves (the service's ticker does) and never block longer than one device read.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from services import clock
from services.bus import BusMap, FollowerFrame, Subscriber
from services.camera.config import CameraConfig
from services.camera.render import ArmPose, ArmRenderer

log = logging.getLogger(__name__)


class CameraFailure(RuntimeError):
    """The camera cannot deliver a frame now (unplugged, busy, unreadable file)."""


class Source(Protocol):
    encoding: str  # "bgr24" or "rgb24", as the bus codec names them

    def read(self) -> np.ndarray: ...

    def close(self) -> None: ...


class OpenCVSource:
    """A V4L2 device (index or /dev path) or a video file, which loops at its end."""

    encoding = "bgr24"

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        target = config.index_or_path
        self.is_file = isinstance(target, str) and not target.startswith("/dev/")
        if self.is_file and not Path(str(target)).is_file():
            raise CameraFailure(f"{config.name}: no video file at {target}")
        self.capture = cv2.VideoCapture(target)
        if not self.capture.isOpened():
            self.capture.release()
            raise CameraFailure(f"{config.name}: OpenCV cannot open {target!r}")
        if not self.is_file:
            # Ask the device for the configured mode; what it grants is resized below.
            self.capture.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
            self.capture.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
            self.capture.set(cv2.CAP_PROP_FPS, config.fps)

    def read(self) -> np.ndarray:
        ok, image = self.capture.read()
        if not ok and self.is_file:
            self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # loop the file
            ok, image = self.capture.read()
        if not ok or image is None:
            raise CameraFailure(f"{self.config.name}: no frame from {self.config.index_or_path!r}")
        return fit(image, self.config)

    def close(self) -> None:
        self.capture.release()


class SimArmSource:
    """Renders the station's simulated follower from the joints it publishes on the bus."""

    encoding = "bgr24"

    def __init__(self, config: CameraConfig, bus: BusMap) -> None:
        self.config = config
        self.renderer = ArmRenderer(config.width, config.height, config.name)
        self.subscriber = Subscriber(bus, ["joints.follower"])
        self.pose = ArmPose()
        self.frames = 0

    def read(self) -> np.ndarray:
        for received in self.subscriber.drain(limit=1000):
            if isinstance(received.frame, FollowerFrame):
                self.pose = ArmPose.from_positions(received.frame.pos)
        self.frames += 1
        return self.renderer.render(self.pose, clock.now_ns(), self.frames)

    def close(self) -> None:
        self.subscriber.close()


class LeRobotSource:
    """Any camera type LeRobot knows (opencv, intelrealsense, ...), through LeRobot's factory.

    Imported lazily: rdv never needs LeRobot unless a camera of a LeRobot-only type is given.
    """

    encoding = "rgb24"  # LeRobot cameras return RGB by default

    def __init__(self, config: CameraConfig) -> None:
        try:
            cameras = importlib.import_module("lerobot.cameras")
            utils = importlib.import_module("lerobot.cameras.utils")
        except ImportError as exc:
            raise CameraFailure(
                f"{config.name}: camera type {config.type!r} needs LeRobot "
                f"(pip install 'rdv[lerobot]'): {exc}"
            ) from None
        settings: dict[str, Any] = dict(config.extra)
        if config.index_or_path is not None:
            settings["index_or_path"] = config.index_or_path
        settings.update(width=config.width, height=config.height, fps=int(config.fps))
        try:
            config_class = cameras.CameraConfig.get_choice_class(config.type)
            device = utils.make_cameras_from_configs({config.name: config_class(**settings)})
            self.camera = device[config.name]
            self.camera.connect()
        except Exception as exc:  # LeRobot raises many kinds; each means "not available now"
            raise CameraFailure(f"{config.name}: LeRobot camera failed to connect: {exc}") from exc
        self.config = config

    def read(self) -> np.ndarray:
        try:
            image = self.camera.read()
        except Exception as exc:
            raise CameraFailure(f"{self.config.name}: LeRobot read failed: {exc}") from exc
        return fit(np.asarray(image), self.config)

    def close(self) -> None:
        try:
            self.camera.disconnect()
        except Exception as exc:
            log.warning("%s: disconnect failed: %s", self.config.name, exc)


def open_source(config: CameraConfig, bus: BusMap) -> Source:
    if config.type == "sim":
        return SimArmSource(config, bus)
    if config.type == "opencv":
        return OpenCVSource(config)
    return LeRobotSource(config)


def fit(image: np.ndarray, config: CameraConfig) -> np.ndarray:
    """The picture at the configured size, 3 channels, contiguous (what the bus frame holds)."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[1] != config.width or image.shape[0] != config.height:
        image = cv2.resize(image, (config.width, config.height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[:, :, :3])
