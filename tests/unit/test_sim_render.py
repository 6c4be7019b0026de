"""The sim camera's drawing: forward kinematics that keep the arm's shape, pictures that move."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from services.camera.render import FOREARM, UPPER_ARM, WRIST, ArmPose, ArmRenderer, arm_points

angles = st.floats(-150, 150, allow_nan=False)


@given(angles, angles, angles, angles, angles, st.floats(0, 100))
def test_links_keep_their_lengths_in_every_pose(pan, lift, elbow, wrist, roll, grip) -> None:
    p = arm_points(ArmPose(pan, lift, elbow, wrist, roll, grip))
    assert math.isclose(np.linalg.norm(p["elbow"] - p["shoulder"]), UPPER_ARM, rel_tol=1e-9)
    assert math.isclose(np.linalg.norm(p["wrist"] - p["elbow"]), FOREARM, rel_tol=1e-9)
    assert math.isclose(np.linalg.norm(p["grip"] - p["wrist"]), WRIST, rel_tol=1e-9)


def test_pan_turns_the_arm_about_the_vertical_axis() -> None:
    ahead = arm_points(ArmPose())["grip"]
    turned = arm_points(ArmPose(shoulder_pan=90.0))["grip"]
    assert math.isclose(turned[2], ahead[2], abs_tol=1e-12)  # same height
    assert math.isclose(turned[1], ahead[0], abs_tol=1e-12)  # forward became sideways


def test_gripper_opens_its_jaws() -> None:
    def gap(gripper: float) -> float:
        p = arm_points(ArmPose(gripper=gripper))
        return float(np.linalg.norm(p["jaw_a"] - p["jaw_b"]))

    assert gap(0.0) < 1e-9 < gap(50.0) < gap(100.0)


def test_a_moved_arm_changes_the_picture_and_the_picture_is_not_blank() -> None:
    renderer = ArmRenderer(640, 480, "front")
    rest = renderer.render(ArmPose(), 0, 0)
    moved = renderer.render(ArmPose(shoulder_pan=40.0, elbow_flex=-30.0), 0, 0)
    assert rest.shape == (480, 640, 3) and rest.dtype == np.uint8
    assert rest.std() > 5  # a drawing, not a flat fill
    changed = np.any(rest != moved, axis=2).mean()
    assert changed > 0.002, changed  # the arm's links moved across the picture
