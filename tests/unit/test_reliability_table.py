"""scripts/reliability_table.py: the fault suite's results become docs/reliability.md rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from services.bus.config import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "reliability_table", REPO_ROOT / "scripts" / "reliability_table.py"
)
assert _spec is not None and _spec.loader is not None
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

DOCUMENT = {
    "machine": {"host": "box", "cpus": 2, "cpu_model": "Xeon", "kernel": "6.1", "python": "3.11"},
    "rows": [
        {
            "fault": "SIGKILL",
            "target": "robot_gateway",
            "behaviour": "follower held | re-paired",
            "figures": {
                "hold_s": 0.25,
                "restarted_s": 0.2,
                "session_s": 1.5,
                "tracking_s": 2.0,
                "max_step_ratio": 0.81,
                "presence_s": None,
            },
            "test": "t",
            "passed": True,
        },
        {
            "fault": "disk",
            "target": "demo",
            "behaviour": "x",
            "figures": {"spawns": 1},
            "test": "t",
            "passed": False,
        },
    ],
}


def test_every_row_becomes_a_table_line_with_its_figures_and_result() -> None:
    page = table.render(DOCUMENT)
    rows = [line for line in page.splitlines() if line.startswith("| SIGKILL") or "| disk" in line]
    assert len(rows) == 2
    assert "| `robot_gateway` | follower held \\| re-paired |" in rows[0]
    assert "| 0.25 s | 0.20 s | 1.50 s | 2.00 s | 0.81 | passed |" in rows[0]
    assert "x (1 start(s))" in rows[1] and rows[1].endswith("| - | **failed** |")
    assert "box: 2 x Xeon" in page


def test_results_without_rows_are_refused(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"machine": {}, "rows": []}))
    out = tmp_path / "reliability.md"
    assert table.main([str(results), "--out", str(out)]) == 1
    assert not out.exists()
    results.write_text(json.dumps(DOCUMENT))
    assert table.main([str(results), "--out", str(out)]) == 0
    assert "robot_gateway" in out.read_text()


def test_regenerating_keeps_the_hand_kept_network_section(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps(DOCUMENT))
    out = tmp_path / "reliability.md"
    out.write_text("# old page\n| old row |\n\n## Network: from tests/netns\nits figures\n")
    assert table.main([str(results), "--out", str(out)]) == 0
    page = out.read_text()
    assert "| old row |" not in page and "| SIGKILL" in page
    assert page.endswith("\n## Network: from tests/netns\nits figures\n")
