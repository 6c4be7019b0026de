"""Camera configuration, given the way LeRobot users give it: `--robot.cameras='{...}'`.

    {"front": {"type": "opencv", "index_or_path": 0, "width": 640, "height": 480, "fps": 30},
     "arm":   {"type": "sim", "width": 640, "height": 480, "fps": 30}}

One JSON object, camera name -> settings. `type` is "opencv" (a device index or a video file
path; files loop), "sim" (renders the station's simulated follower from its joints) or any
LeRobot camera type (built through LeRobot's own factory when LeRobot is installed). Parsing
never touches a device; it only refuses what cannot work, with a message that says why.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

CAMERAS_ENV = "RDV_CAMERAS"  # the station's cameras; the session manager announces their names
BUILTIN_TYPES = ("opencv", "sim")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # it becomes the bus topic video.<name>
MAX_SIDE = 4096
MAX_FPS = 120.0


class CameraConfigError(ValueError):
    """The camera settings cannot work; the message names the camera and the field."""


@dataclass(frozen=True)
class CameraConfig:
    name: str
    type: str
    width: int = 640
    height: int = 480
    fps: float = 30.0
    index_or_path: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # passed through to LeRobot's config

    @property
    def topic(self) -> str:
        return f"video.{self.name}"


def parse_cameras(text: str) -> list[CameraConfig]:
    """Cameras from LeRobot-style JSON text; "" or "{}" means none."""
    if not text.strip():
        return []
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CameraConfigError(f"cameras are not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(raw, dict):
        raise CameraConfigError('cameras must be a JSON object: {"name": {"type": ...}, ...}')
    return [_camera(name, settings) for name, settings in raw.items()]


def cameras_from_env() -> str:
    return os.environ.get(CAMERAS_ENV, "")


def camera_names(text: str) -> list[str]:
    """The names only, in the order given (what presence announces and the gateway offers).

    Settings that cannot be parsed give no names here: the camera service refuses them with
    the full reason (and exit 78), so other processes need not repeat it.
    """
    try:
        return [camera.name for camera in parse_cameras(text)]
    except CameraConfigError:
        return []


def _camera(name: Any, settings: Any) -> CameraConfig:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise CameraConfigError(
            f"camera name {name!r}: use lower-case letters, digits and _ (it becomes the bus "
            "topic video.<name>), at most 32 characters, starting with a letter"
        )
    if not isinstance(settings, dict):
        raise CameraConfigError(f"camera {name!r}: settings must be a JSON object")
    settings = dict(settings)
    kind = settings.pop("type", None)
    if not isinstance(kind, str) or not kind:
        raise CameraConfigError(f'camera {name!r}: give its "type" ({", ".join(BUILTIN_TYPES)})')
    width = _int(name, settings.pop("width", 640), "width", 16, MAX_SIDE)
    height = _int(name, settings.pop("height", 480), "height", 16, MAX_SIDE)
    fps = settings.pop("fps", 30)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:
        raise CameraConfigError(f"camera {name!r}: fps must be a number in (0, {MAX_FPS:g}]")
    source = settings.pop("index_or_path", None)
    if kind == "opencv":
        if isinstance(source, bool) or not isinstance(source, (int, str)) or source == "":
            raise CameraConfigError(
                f'camera {name!r}: an opencv camera needs "index_or_path": a device index '
                "such as 0, or a path such as /dev/video0 or a video file"
            )
        if settings:
            raise CameraConfigError(f"camera {name!r}: unknown settings {sorted(settings)}")
    elif kind == "sim" and (source is not None or settings):
        unknown = sorted(settings) + (["index_or_path"] if source is not None else [])
        raise CameraConfigError(f"camera {name!r}: a sim camera takes no {unknown}")
    if width % 2 or height % 2:
        # Video encoders work on 4:2:0 pictures: odd sizes would be cropped or refused.
        raise CameraConfigError(f"camera {name!r}: width and height must be even")
    return CameraConfig(name, kind, width, height, float(fps), source, settings)


def _int(name: str, value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CameraConfigError(f"camera {name!r}: {key} must be an integer in [{lo}, {hi}]")
    return value
