"""The LeRobot tier: LeRobot's real SO101Follower/SO101Leader over emulated Feetech buses.

These tests need LeRobot, which pulls torch (GBs), so they run in their own cached virtualenv:
`make test-lerobot` (part of `make test`) builds it with scripts/lerobot_venv.sh and runs this
directory with it. In a venv without LeRobot they are not collected, and the header says so;
`make test` always runs them in the venv that has it.
"""

from __future__ import annotations

import importlib.util

HAVE_LEROBOT = importlib.util.find_spec("lerobot") is not None

if not HAVE_LEROBOT:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config) -> str:
    if HAVE_LEROBOT:
        from importlib.metadata import version

        return f"LeRobot tier: lerobot {version('lerobot')}, torch {version('torch')}"
    return "LeRobot tier: not collected (no LeRobot here); `make test-lerobot` runs it"
