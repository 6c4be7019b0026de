"""Camera settings as LeRobot users write them: what parses, and the errors for what cannot work."""

from __future__ import annotations

import pytest

from services.camera.config import CameraConfigError, camera_names, parse_cameras


def test_lerobot_style_settings_parse_in_order() -> None:
    cameras = parse_cameras(
        '{"front": {"type": "opencv", "index_or_path": 0, "width": 640, "height": 480, '
        '"fps": 30}, "arm": {"type": "sim"}, "wrist": {"type": "opencv", '
        '"index_or_path": "/data/clip.mp4", "fps": 15}}'
    )
    assert [c.name for c in cameras] == ["front", "arm", "wrist"]
    front, arm, wrist = cameras
    assert (front.type, front.index_or_path, front.width, front.height, front.fps) == (
        "opencv", 0, 640, 480, 30.0,
    )  # fmt: skip
    assert (arm.type, arm.width, arm.height, arm.fps) == ("sim", 640, 480, 30.0)
    assert wrist.index_or_path == "/data/clip.mp4" and wrist.topic == "video.wrist"


def test_lerobot_types_keep_their_own_settings() -> None:
    (camera,) = parse_cameras('{"top": {"type": "intelrealsense", "serial_number_or_name": "12"}}')
    assert camera.type == "intelrealsense" and camera.extra == {"serial_number_or_name": "12"}


@pytest.mark.parametrize("text", ["", "  ", "{}"])
def test_nothing_given_means_no_cameras(text: str) -> None:
    assert parse_cameras(text) == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{front", "not valid JSON"),
        ('["front"]', "JSON object"),
        ('{"Front": {"type": "sim"}}', "lower-case"),
        ('{"video.x": {"type": "sim"}}', "lower-case"),
        ('{"front": 3}', "settings must be a JSON object"),
        ('{"front": {}}', '"type"'),
        ('{"front": {"type": "opencv"}}', "index_or_path"),
        ('{"front": {"type": "opencv", "index_or_path": true}}', "index_or_path"),
        ('{"front": {"type": "opencv", "index_or_path": 0, "exposure": 3}}', "unknown"),
        ('{"front": {"type": "sim", "index_or_path": 0}}', "sim camera takes no"),
        ('{"front": {"type": "sim", "width": 641}}', "even"),
        ('{"front": {"type": "sim", "width": 0}}', "width"),
        ('{"front": {"type": "sim", "height": "480"}}', "height"),
        ('{"front": {"type": "sim", "fps": 0}}', "fps"),
        ('{"front": {"type": "sim", "fps": 1000}}', "fps"),
        ('{"front": {"type": "sim", "fps": true}}', "fps"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(CameraConfigError, match=says):
        parse_cameras(text)


def test_names_for_presence_are_empty_when_the_settings_are_bad() -> None:
    assert camera_names('{"front": {"type": "sim"}, "side": {"type": "sim"}}') == ["front", "side"]
    assert camera_names("{broken") == []
