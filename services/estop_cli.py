"""`rdv estop` and `rdv rearm`: latch or clear the follower's emergency stop from a shell.

`rdv estop` works on either station: on the robot station the follower hears it on the bus; on
the teleop station the gateway carries it over the link to the paired robot. Either way it
repeats the stop until the follower itself reports `estop` (its frames reach the teleop too), so
a printed "latched" is the arm's word, not a hope. `rdv rearm` works only on the robot station:
nothing carries a re-arm over the network. This tool publishes nothing but these two events.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from services import clock
from services.bus import FollowerFrame, MessageFrame, Publisher, Subscriber, load_bus_map
from services.bus.config import REPO_ROOT, BusConfigError

PROCESS = "control"
RESEND_S = 0.2  # a stop is repeated until the follower shows it held
# Where the stations started by `rdv robot`, `rdv teleop` and `rdv demo` keep their buses,
# robot stations first: a stop delivered on the robot's own bus needs no link.
STATION_DIRS = ("run/robot", "run/demo/robot", "run/teleop", "run/demo/teleop")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    for action, summary in (
        ("estop", "latch the follower's emergency stop (robot or teleop station)"),
        ("rearm", "clear a latched emergency stop (robot station only)"),
    ):
        parser = commands.add_parser(action, help=summary, description=summary + ".")
        parser.add_argument(
            "--run-dir",
            default=os.environ.get("RDV_RUN_DIR"),
            help="the station's bus dir (default: $RDV_RUN_DIR, else the first running station "
            f"of {', '.join(STATION_DIRS)})",
        )
        parser.add_argument(
            "--timeout", type=float, default=5.0,
            help="seconds to wait for the follower to confirm (default: %(default)s)",
        )  # fmt: skip


def run(action: str, args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else running_station()
    if run_dir is None:
        print(f"rdv {action}: no running station found under {', '.join(STATION_DIRS)}; "
              "give --run-dir")  # fmt: skip
        return 2
    robot_side = (run_dir / "follower_arm.sock").exists()
    if action == "rearm" and not robot_side:
        print(f"rdv rearm: {run_dir} is not a robot station; re-arm on the robot station, "
              "where someone can see the arm")  # fmt: skip
        return 2
    try:
        bus = load_bus_map(run_dir=run_dir)
        publisher = Publisher(bus, PROCESS)
    except BusConfigError as exc:  # no bus map, or the control endpoint cannot be bound
        print(f"rdv {action}: cannot publish on {run_dir}: {exc}")
        return 1
    follower = Subscriber(bus, ["joints.follower"])
    try:
        return _until_confirmed(action, publisher, follower, args.timeout, run_dir)
    finally:
        follower.close()
        publisher.close()


def _until_confirmed(action: str, publisher: Publisher, follower: Subscriber, timeout_s: float,
                     run_dir: Path) -> int:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    next_send = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            fields = {"event": action, "by": f"rdv {action}"}
            publisher.send("session.control", MessageFrame(publisher.next_seq(), clock.now_ns(),
                                                           "cli", fields))  # fmt: skip
            next_send = time.monotonic() + RESEND_S
        for received in follower.drain():
            frame = received.frame
            if not isinstance(frame, FollowerFrame):
                continue
            if action == "estop" and frame.state == "estop":
                print(f"rdv estop: EMERGENCY STOP latched; follower {frame.src} is holding. "
                      "`rdv rearm` on the robot station clears it.")  # fmt: skip
                return 0
            if action == "rearm" and frame.state != "estop":
                print(f"rdv rearm: follower {frame.src} re-armed ({frame.state}); it will ramp "
                      "to the leader from where it is")  # fmt: skip
                return 0
        time.sleep(0.01)
    print(f"rdv {action}: no follower confirmed within {timeout_s:g} s on {run_dir} "
          "(is a session live, and the robot station running?)")  # fmt: skip
    return 1


def running_station() -> Path | None:
    for name in STATION_DIRS:
        directory = REPO_ROOT / name
        if any(directory.glob("*.sock")):
            return directory
    return None
