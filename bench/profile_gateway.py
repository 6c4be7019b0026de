"""Where a gateway's time goes while it carries control: `python -m bench.profile_gateway`.

A diagnostic for docs/performance.md, not a benchmark: its figures are inflated by cProfile's
own overhead and are never compared with a target. deploy/demo.conf runs under real supervisord
(bench.stations) without cameras; once the follower tracks, one gateway program (`--side`) is
stopped through supervisord and the same service is started in its place under cProfile, with
the environment demo.conf gives that program. After `--seconds` of control at 100 Hz it is
stopped with SIGTERM (a clean exit writes the profile) and the functions that took the most
time are printed with the number of commands carried meanwhile. It must never signal a
process it did not start.
"""

from __future__ import annotations

import argparse
import configparser
import io
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor.datatypes import dict_of_key_value_pairs

from bench.stations import BusTap, DemoStations, follower_state
from services.bus.config import REPO_ROOT


def program_environment(conf: Path, program: str) -> dict[str, str]:
    """The environment= of one [program:x] of a supervisord config, %(here)s expanded."""
    parser = configparser.RawConfigParser()
    parser.read(conf)
    raw = parser.get(f"program:{program}", "environment", fallback="")
    return dict_of_key_value_pairs(raw.replace("%(here)s", str(conf.parent)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_gateway",
        description="Profile one WebRTC gateway (cProfile) while it carries control at 100 Hz "
        "between two demo stations; prints the top functions per command.",
    )
    parser.add_argument("--side", choices=("robot", "teleop"), default="robot",
                        help="which station's gateway (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds profiled while tracking (default: %(default)s)")  # fmt: skip
    parser.add_argument("--top", type=int, default=30,
                        help="functions printed (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    program = f"{args.side}_gateway"
    stations = DemoStations(rate_hz=100.0)
    with tempfile.TemporaryDirectory(prefix="rdv-prof-") as scratch:
        output = Path(scratch) / "gateway.prof"
        profiled = None
        try:
            stations.start(timeout_s=60, cameras=False)
            station = stations.station
            station.call("stopProcess", program, True)
            env = {**station.env, **program_environment(station.conf, program)}
            profiled = subprocess.Popen(
                [sys.executable, "-m", "cProfile", "-o", str(output),
                 "-m", "services.webrtc_gateway", "--role", args.side],
                env=env, cwd=REPO_ROOT,
            )  # fmt: skip
            feeds = {"robot": (stations.bus("robot"), ["joints.command", "joints.follower"])}
            with BusTap(feeds) as tap:
                if tap.wait_for(follower_state("robot", "tracking"), 60, start=0) is None:
                    raise SystemExit("the stations never paired with the profiled gateway")
                mark = tap.mark()
                time.sleep(args.seconds)
                commands = sum(1 for s in tap.since(mark) if s.topic == "joints.command")
        finally:
            if profiled is not None and profiled.poll() is None:
                profiled.send_signal(signal.SIGTERM)
                try:
                    profiled.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    profiled.kill()
                    profiled.wait()
            stations.stop()
        text = io.StringIO()
        stats = pstats.Stats(str(output), stream=text)
        stats.sort_stats("cumulative").print_stats(r"(aiortc|aioice|services|zmq)", args.top)
        print(f"{program} under cProfile, {args.seconds:g} s of tracking, {commands} commands")
        print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
