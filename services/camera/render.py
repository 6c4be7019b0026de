"""The sim camera's picture: the simulated SO101 follower drawn from its joints.

Forward kinematics of a simplified SO101 (link lengths close to the real arm), seen from a fixed
three-quarter view, drawn with OpenCV: links, joints, the gripper's two jaws opening with
`gripper.pos`, a floor grid, the camera name and the capture time. A viewer must see the arm
move when the leader moves. Pure drawing: this module never reads a device or the bus.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

# Metres, close to the SO101's: base to shoulder, upper arm, forearm, wrist to gripper, jaws.
BASE_HEIGHT = 0.10
UPPER_ARM = 0.116
FOREARM = 0.135
WRIST = 0.06
JAW = 0.045
MAX_JAW_OPENING_DEG = 35.0
VIEW_YAW_DEG = 35.0
VIEW_PITCH_DEG = 20.0
REACH = 0.45  # metres the view must hold around the base

BACKGROUND = (38, 32, 28)
GRID = (70, 62, 55)
LINKS = ((60, 170, 255), (80, 200, 120), (230, 160, 60), (200, 120, 220))
JOINT = (240, 240, 240)
TEXT = (235, 235, 235)


@dataclass(frozen=True)
class ArmPose:
    """Joint positions in LeRobot's SO101 units: body joints in degrees, gripper 0..100."""

    shoulder_pan: float = 0.0
    shoulder_lift: float = 0.0
    elbow_flex: float = 0.0
    wrist_flex: float = 0.0
    wrist_roll: float = 0.0
    gripper: float = 10.0

    @classmethod
    def from_positions(cls, positions: tuple[float, ...]) -> ArmPose:
        return cls(*positions[:6])


def arm_points(pose: ArmPose) -> dict[str, np.ndarray]:
    """3-D points (metres, z up) of the base, shoulder, elbow, wrist, gripper and jaw tips."""
    a1 = math.radians(pose.shoulder_lift)  # from vertical: 0 = upper arm straight up
    a2 = a1 + math.radians(90.0 + pose.elbow_flex)  # 0 = forearm level, forward
    a3 = a2 + math.radians(pose.wrist_flex)
    roll = math.radians(pose.wrist_roll)
    opening = math.radians(MAX_JAW_OPENING_DEG * min(max(pose.gripper, 0.0), 100.0) / 100.0)

    def in_plane(angle: float) -> np.ndarray:  # unit vector in the arm's plane (x fwd, z up)
        return np.array([math.sin(angle), 0.0, math.cos(angle)])

    shoulder = np.array([0.0, 0.0, BASE_HEIGHT])
    elbow = shoulder + UPPER_ARM * in_plane(a1)
    wrist = elbow + FOREARM * in_plane(a2)
    axis = in_plane(a3)
    grip = wrist + WRIST * axis
    normal = np.array([math.cos(a3), 0.0, -math.sin(a3)])
    side = math.cos(roll) * normal + math.sin(roll) * np.array([0.0, 1.0, 0.0])
    jaw_a = grip + JAW * (math.cos(opening) * axis + math.sin(opening) * side)
    jaw_b = grip + JAW * (math.cos(opening) * axis - math.sin(opening) * side)

    pan = math.radians(pose.shoulder_pan)
    turn = np.array(
        [[math.cos(pan), -math.sin(pan), 0.0], [math.sin(pan), math.cos(pan), 0.0], [0, 0, 1.0]]
    )
    points = {
        "base": np.zeros(3),
        "shoulder": shoulder,
        "elbow": elbow,
        "wrist": wrist,
        "grip": grip,
        "jaw_a": jaw_a,
        "jaw_b": jaw_b,
    }
    return {name: turn @ point for name, point in points.items()}


class ArmRenderer:
    """Draws poses into BGR frames of one size; the static floor is drawn once."""

    def __init__(self, width: int, height: int, label: str) -> None:
        self.width, self.height, self.label = width, height, label
        yaw, pitch = math.radians(VIEW_YAW_DEG), math.radians(VIEW_PITCH_DEG)
        view_yaw = np.array(
            [[math.cos(yaw), math.sin(yaw), 0.0], [-math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1]]
        )
        cos_p, sin_p = math.cos(pitch), math.sin(pitch)
        view_pitch = np.array([[1.0, 0, 0], [0, cos_p, -sin_p], [0, sin_p, cos_p]])
        self._view = view_pitch @ view_yaw
        self._scale = 0.9 * min(width, height) / REACH
        self._origin = np.array([width * 0.5, height * 0.78])
        self._floor = np.full((height, width, 3), BACKGROUND, np.uint8)
        self._draw_floor()

    def project(self, point: np.ndarray) -> tuple[int, int]:
        x, _depth, z = self._view @ point
        u, v = self._origin + self._scale * np.array([x, -z])
        return round(float(u)), round(float(v))

    def render(self, pose: ArmPose, capture_ns: int, frame_no: int) -> np.ndarray:
        image = self._floor.copy()
        p = {name: self.project(point) for name, point in arm_points(pose).items()}
        thick = max(2, self.width // 80)
        chain = ("base", "shoulder", "elbow", "wrist", "grip")
        for i, (a, b) in enumerate(itertools.pairwise(chain)):
            cv2.line(image, p[a], p[b], LINKS[i % len(LINKS)], thick, cv2.LINE_AA)
        for jaw in ("jaw_a", "jaw_b"):
            cv2.line(image, p["grip"], p[jaw], LINKS[3], max(2, thick // 2), cv2.LINE_AA)
        for name in chain:
            cv2.circle(image, p[name], thick, JOINT, -1, cv2.LINE_AA)
        stamp = time.strftime("%H:%M:%S", time.localtime(capture_ns / 1e9))
        millis = (capture_ns // 1_000_000) % 1000
        text = f"{self.label}  sim  {stamp}.{millis:03d}  #{frame_no}"
        scale = max(0.4, self.width / 1280)
        cv2.putText(image, text, (8, int(22 * scale / 0.5)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    TEXT, 1, cv2.LINE_AA)  # fmt: skip
        return image

    def _draw_floor(self) -> None:
        step = 0.05
        count = int(REACH / step)
        for i in range(-count, count + 1):
            a = self.project(np.array([i * step, -REACH, 0.0]))
            b = self.project(np.array([i * step, REACH, 0.0]))
            cv2.line(self._floor, a, b, GRID, 1, cv2.LINE_AA)
            a = self.project(np.array([-REACH, i * step, 0.0]))
            b = self.project(np.array([REACH, i * step, 0.0]))
            cv2.line(self._floor, a, b, GRID, 1, cv2.LINE_AA)
