"""`rdv bench NAME --json` as a user runs it: each benchmark, short, end to end.

Every run starts its own stations (real supervisord, Mosquitto, aiortc peers) and processes and
must stop them. These tests hold the output contract (one JSON object on the last stdout line,
the keys issue 7 names, figures that are numbers a measurement can give) and the clean-up; they
never judge a latency against a target: figures go to docs/performance.md, not to asserts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.failover import IptablesCut

pytestmark = pytest.mark.integration
RDV = str(Path(sys.executable).parent / "rdv")
HANG_GUARD_S = 180  # not a timing assertion: only stops a hung run


def run_bench(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [RDV, "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    document = json.loads(lines[-1])
    assert document["ok"] is True and document["errors"] == [], document["errors"]
    assert document["bench"] == args[0]
    machine = document["machine"]
    assert machine["cores"] >= 1 and machine["python"].count(".") == 2
    assert machine["libraries"]["aiortc"] and machine["libraries"]["pyzmq"]
    # The human-readable table went to stderr, with the machine on it.
    assert "machine:" in result.stderr
    return document


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_latency(figures: dict[str, Any]) -> None:
    assert set(figures) == {"p50", "p99", "max", "loss"}
    assert all(positive(figures[key]) for key in ("p50", "p99", "max")), figures
    assert figures["p50"] <= figures["p99"] <= figures["max"], figures
    assert 0.0 <= figures["loss"] <= 1.0, figures


def test_control_gives_rdv_floor_and_both_baselines() -> None:
    document = run_bench("control", "--seconds", "4")
    assert document["rate_hz"] == 100
    check_latency(document["rdv"])
    check_latency(document["floor"])
    assert set(document["baselines"]) == {"lekiwi_style", "lrvd_style"}
    for figures in document["baselines"].values():
        check_latency(figures)
    # The figures rest on real traffic: every path applied commands in its window.
    assert all(counts["samples"] > 0 for counts in document["samples"].values())
    assert document["details"]["rdv"]["follower_histogram"]["applied"]["count"] > 0


def test_setup_times_each_new_session() -> None:
    document = run_bench("setup", "--sessions", "2")
    assert set(document["rdv"]) == {"p50", "max"}
    assert positive(document["rdv"]["p50"]) and positive(document["rdv"]["max"])
    assert document["rdv"]["p50"] <= document["rdv"]["max"]
    assert len(document["trials"]) == 2
    assert all(positive(trial["setup_ms"]) for trial in document["trials"])


CUTS = ["sigstop", *(["iptables"] if IptablesCut.available() else [])]


@pytest.mark.parametrize("cut", CUTS)
def test_failover_holds_and_resumes(cut: str) -> None:
    document = run_bench("failover", "--trials", "1", "--cut", cut)
    assert document["cut"] == cut
    figures = document["rdv"]
    assert set(figures) == {"hold_ms_max", "resume_ms_p50", "resume_ms_max"}
    assert all(positive(value) for value in figures.values()), figures
    # Resuming includes holding first: tracking comes back only after the follower held.
    assert figures["resume_ms_max"] > document["trials"]["resume"][0]["hold_ms"]
    if cut == "iptables":
        rules = subprocess.run(
            ["iptables", "-w", "5", "-S", "INPUT"], capture_output=True, text=True, check=True
        ).stdout
        assert "rdv-bench-failover" not in rules, "the bench left its iptables rule behind"


def test_presence_reports_discovery_and_pairing() -> None:
    document = run_bench("presence", "--stations", "40", "--couples", "4", "--processes", "2")
    assert set(document["rdv"]) == {"discover_ms", "pair_ms"}
    assert all(positive(value) for value in document["rdv"].values())


@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_video_gives_rdv_and_stock_aiortc(codec: str) -> None:
    document = run_bench("video", "--codec", codec, "--seconds", "3")
    assert (document["codec"], document["size"], document["fps"]) == (codec, "640x480", 30)
    assert set(document["baselines"]) == {"aiortc_stock"}
    for variant, figures in (("rdv", document["rdv"]),
                             ("aiortc_stock", document["baselines"]["aiortc_stock"])):  # fmt: skip
        assert set(figures) == {"p50", "p99", "fps", "cpu_sender_pct", "cpu_receiver_pct"}
        assert all(positive(value) for value in figures.values()), (variant, figures)
        assert figures["p50"] <= figures["p99"], (variant, figures)
        details = document["details"][variant]
        # Real decoded video, in the codec asked for, each frame matched with its capture time.
        assert details["negotiated_codec"] == codec
        assert details["decoded"] > 0 and details["samples"] >= details["decoded"] / 2, details
