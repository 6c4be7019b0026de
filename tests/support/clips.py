"""Generated video files for camera tests: each frame its own flat colour, so a frame read back
(after the camera service, or a lossy codec) can be told from the others."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_clip(path: Path, width: int, height: int, frames: int = 12) -> list[np.ndarray]:
    """Write an MJPG .avi clip at 30 fps and return its frames (BGR)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    images = []
    for n in range(frames):
        image = np.full((height, width, 3), (20 * n % 256, 255 - 20 * n % 256, 128), np.uint8)
        writer.write(image)
        images.append(image)
    writer.release()
    return images
