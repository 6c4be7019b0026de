"""The arm driver as a real process: configuration errors exit 78 with a clear message.

supervisord treats 78 as final (deploy/*.conf: exitcodes=78), so a typo stays down with its
message in the log instead of restarting in a storm.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--robot.type=so101_follower"], "pip install 'rdv[lerobot]'"),
        (["--robot.type=sim", "--robot.no_such_field=1"], "has no field 'no_such_field'"),
        (["--robot.type=sim", '--joint-limits={"shoulder_pan": [-1, 1]}'], "not joints of"),
    ],
)
def test_configuration_errors_exit_78_with_a_message(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.arm_driver", *flags, "--metrics-port=0"],
        env={"RDV_RUN_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert message in result.stderr
    assert not list(tmp_path.glob("*.sock")), "a failed start left a bus socket behind"


def test_bad_flags_exit_2_with_usage(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.arm_driver", "--robot.type=sim", "--rate=fast"],
        env={"RDV_RUN_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--rate" in result.stderr
