"""`rdv`: the one command-line front of rdv. Stations run under supervisord, as in production.

`rdv robot` / `rdv teleop` run a station in the foreground from deploy/*.conf with your device
flags; `rdv local` runs a sim leader driving a sim follower on one machine and shows live status;
`rdv demo` is the quick-start demo. This module starts and stops processes; it must never talk
to an arm itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from services import estop_cli
from services.arm_driver.config import (
    add_control_flags,
    add_device_flags,
    add_station_flags,
    parse_driver_args,
)
from services.bus.config import REPO_ROOT
from services.camera.config import CAMERAS_ENV, CameraConfigError, parse_cameras
from services.session_manager.trust_cli import (
    add_identity_parser,
    add_register_parser,
    add_trust_parser,
    run_identity,
    run_register,
    run_trust,
)
from services.status import watch

DEPLOY_DIR = REPO_ROOT / "deploy"
# A sim arm gets a sim camera that draws it, so a viewer sees it move.
SIM_CAMERAS = '{"front": {"type": "sim", "width": 640, "height": 480, "fps": 30}}'
# `rdv bench NAME` -> the module under bench/ that runs it (issue 7).
BENCHMARKS = {
    "control": "bench.control",
    "setup": "bench.session_setup",
    "failover": "bench.failover",
    "presence": "bench.presence",
    "video": "bench.video",
}
STATIONS = {
    # command: (supervisord config, run dir name, device kind, process)
    "robot": ("robot.conf", "robot", "robot", "follower_arm"),
    "teleop": ("teleop.conf", "teleop", "teleop", "leader_arm"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdv",
        description="rdv (robot rendez-vous): teleoperate LeRobot arms. Each station is a set of "
        "small processes run by supervisord and joined by a local ZeroMQ bus.",
        epilog="Run `rdv COMMAND --help` for a command's flags. Every service also runs alone as "
        "`python -m services.<name> --help`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, (conf, _, kind, _) in STATIONS.items():
        what = "follower arm" if kind == "robot" else "leader arm"
        commands.add_parser(
            name,
            parents=[station_flags(kind)],
            help=f"run the {name} station ({what}) in the foreground",
            description=f"Run the {name} station in the foreground under supervisord "
            f"(deploy/{conf}); Ctrl-C stops it. The device defaults to the built-in sim; the "
            f"flags below go to its arm driver. Logs: run/{name}/.",
        )

    for name, summary in (
        ("local", "run a sim leader driving a sim follower on this machine, with live status"),
        ("demo", "the quick-start demo: a broker and two stations on this machine that pair"),
    ):
        local = commands.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}. The station runs under supervisord "
            "(deploy/local.conf, logs in run/local/); the status line compares what the leader "
            "sent with what the follower did. Ctrl-C stops everything.",
        )
        local.add_argument(
            "--seconds",
            type=float,
            default=None,
            help="stop after this many seconds (default: run until Ctrl-C)",
        )
        _add_port_offset(local)

    add_register_parser(commands)
    add_trust_parser(commands)
    add_identity_parser(commands)
    commands.add_parser(
        "calibrate",
        add_help=False,  # --help and the device flags go to services.arm_driver.calibrate
        help="calibrate a LeRobot arm (LeRobot's interactive flow) before a station uses it",
    )

    fleet = commands.add_parser(
        "fleet",
        help="list this owner's stations as the MQTT broker sees them",
        description="List the stations of this station's owner (role, type, status, busy, "
        "session, last seen) from their retained presence on the broker, then exit. Uses the "
        "identity and broker of `rdv register`.",
    )
    fleet.add_argument(
        "--config-dir",
        default=None,
        help="identity to use (default: $RDV_CONFIG_DIR, else ~/.config/rdv)",
    )
    fleet.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    fleet.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="instead of printing, keep watching and export the fleet as Prometheus metrics "
        "on 127.0.0.1 at this port (monitoring/prometheus.yml scrapes 9799) (default: off)",
    )
    fleet.add_argument(
        "--watch", action="store_true", help="keep updating until Ctrl-C (default: print once)"
    )
    fleet.add_argument(
        "--wait",
        type=float,
        default=1.0,
        help="seconds to collect presence before printing (default: %(default)s)",
    )
    fleet.add_argument(
        "--presence-interval",
        type=float,
        default=1.0,
        help="the stations' presence refresh interval; silent for 3 of them = stale "
        "(default: %(default)s)",
    )
    fleet.add_argument(
        "--clock-skew",
        type=float,
        default=2.0,
        help="seconds of wall-clock difference tolerated when judging a presence's age "
        "(default: %(default)s)",
    )
    fleet.add_argument(
        "--mqtt-version",
        choices=("5", "3.1.1"),
        default=os.environ.get("RDV_MQTT_VERSION", "5"),
        help="MQTT protocol (default: $RDV_MQTT_VERSION or %(default)s)",
    )

    bench = commands.add_parser(
        "bench",
        help="run a benchmark that prints measured figures beside DESIGN.md's targets",
        description="Run a benchmark from bench/. Each starts and stops everything it needs "
        "and prints the machine it ran on. Flags after the name go to the benchmark; "
        "`rdv bench NAME --help` lists them.",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")

    status = commands.add_parser(
        "watch",
        help="show live status of a running station's arms",
        description="Subscribe to a running station's bus and print the leader/follower status "
        "once a second.",
    )
    status.add_argument(
        "--station",
        default="local",
        help="which station under run/ to watch: local, robot, teleop or demo "
        "(default: %(default)s)",
    )
    status.add_argument(
        "--seconds", type=float, default=None, help="stop after this many seconds (default: never)"
    )
    estop_cli.add_parsers(commands)
    return parser


def station_flags(kind: str) -> argparse.ArgumentParser:
    """The flags of `rdv robot`/`rdv teleop`: the arm driver's, plus the port offset."""
    flags = argparse.ArgumentParser(add_help=False)
    add_device_flags(flags, kind, default_type="sim")
    if kind == "robot":
        flags.add_argument(
            "--robot.cameras",
            dest="cameras",
            default=None,
            help='the station\'s cameras, LeRobot-style JSON, e.g. \'{"front": {"type": '
            '"opencv", "index_or_path": 0, "width": 640, "height": 480, "fps": 30}}\'; run by '
            "rdv's camera service, not the arm driver (default: $RDV_CAMERAS, else one sim "
            "camera with a sim arm, none with a real one)",
        )
    add_control_flags(flags)
    add_station_flags(flags)
    _add_port_offset(flags)
    return flags


def _add_port_offset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port-offset",
        type=int,
        default=int(os.environ.get("RDV_PORT_OFFSET", "0")),
        help="added to every metrics and tcp bus port of the station, so two stations can "
        "share a machine (default: $RDV_PORT_OFFSET or %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if args.command in STATIONS:
        return run_station(args.command, argv[1:], args.port_offset)
    if args.command == "bench":
        return run_bench(args.name, extra)
    if args.command == "calibrate":
        # Its own process: this module never talks to an arm. stdin stays the user's terminal.
        command = [sys.executable, "-m", "services.arm_driver.calibrate", *argv[1:]]
        return subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "local":
        return run_local(args.seconds, args.port_offset)
    if args.command == "demo":
        return run_demo(args.seconds, args.port_offset)
    if args.command == "fleet":
        return run_fleet_command(args)
    if args.command == "register":
        return run_register(args)
    if args.command == "trust":
        return run_trust(args)
    if args.command == "identity":
        return run_identity(args)
    if args.command == "watch":
        return watch(station_run_dirs(args.station), seconds=args.seconds)
    if args.command in ("estop", "rearm"):
        return estop_cli.run(args.command, args)
    parser.error(f"unknown command {args.command}")
    return 2


def run_bench(name: str, flags: list[str]) -> int:
    """Benchmarks live in bench/ beside the package; they run from the checkout."""
    command = [sys.executable, "-m", BENCHMARKS[name], *flags]
    return subprocess.run(command, cwd=REPO_ROOT, check=False).returncode


def run_fleet_command(args: argparse.Namespace) -> int:
    from services.fleet import run_fleet
    from services.fleet_exporter import run_fleet_exporter
    from services.session_manager.identity import IdentityError, config_dir, load_identity

    if args.metrics_port is not None and (args.json or args.watch):
        print(
            "rdv fleet: --metrics-port exports metrics; it takes no --json/--watch", file=sys.stderr
        )
        return 2
    try:
        identity = load_identity(config_dir(args.config_dir))
    except IdentityError as exc:
        print(f"rdv fleet: {exc}", file=sys.stderr)
        return 78
    if args.metrics_port is not None:
        from services.logs import setup_logging

        setup_logging("info", "fleet_exporter")  # a long-running exporter says where it serves
        return run_fleet_exporter(args, identity)
    return run_fleet(args, identity)


def run_station(name: str, argv: list[str], port_offset: int) -> int:
    conf, run_name, kind, process = STATIONS[name]
    flags = _without_port_offset(argv)
    # Validate now so a typo fails here, not in a restart loop; later flags win over the
    # config's own defaults (--robot.type=sim) because they are appended after them.
    checker = argparse.ArgumentParser(prog=f"rdv {name}", parents=[station_flags(kind)])
    flags, cameras = _split_cameras(flags)
    driver = parse_driver_args(flags, checker)
    env = {f"RDV_{process.upper()}_ARGS": shlex.join(flags), "RDV_PORT_OFFSET": str(port_offset)}
    if kind == "robot":
        if cameras is None:
            cameras = os.environ.get(CAMERAS_ENV) or (
                SIM_CAMERAS if driver.device.type == "sim" else ""
            )
        try:
            parse_cameras(cameras)
        except CameraConfigError as exc:
            checker.error(f"--robot.cameras: {exc}")
        env[CAMERAS_ENV] = cameras
    print(f"rdv: {name} station starting (deploy/{conf}); logs in run/{run_name}/; Ctrl-C stops")
    supervisord = start_supervisord(DEPLOY_DIR / conf, env)
    return _wait_foreground(supervisord, seconds=None)


def _split_cameras(flags: list[str]) -> tuple[list[str], str | None]:
    """The station's --robot.cameras (for the camera service), and the arm driver's flags."""
    rest: list[str] = []
    cameras = None
    values = iter(flags)
    for flag in values:
        if flag.startswith("--robot.cameras="):
            cameras = flag.split("=", 1)[1]
        elif flag == "--robot.cameras":
            cameras = next(values, "")
        else:
            rest.append(flag)
    return rest, cameras


def station_run_dirs(station: str) -> list[Path]:
    """Bus run dirs of a station under run/; the demo holds two stations."""
    base = REPO_ROOT / "run" / station
    return [base / "robot", base / "teleop"] if station == "demo" else [base]


def run_local(seconds: float | None, port_offset: int) -> int:
    print("rdv: local station starting (deploy/local.conf): sim leader -> bus -> sim follower")
    print(f"rdv: logs in run/local/, metrics on http://127.0.0.1:{9702 + port_offset}/metrics")
    supervisord = start_supervisord(
        DEPLOY_DIR / "local.conf", {"RDV_PORT_OFFSET": str(port_offset)}
    )
    return _watch_then_stop(supervisord, station_run_dirs("local"), seconds)


def run_demo(seconds: float | None, port_offset: int) -> int:
    from services.demo import prepare_demo_identities
    from services.local_broker.__main__ import find_mosquitto

    broker_port = int(os.environ.get("RDV_BROKER_PORT", "18830"))
    mqtt_version = "5" if find_mosquitto() else "3.1.1"  # the embedded amqtt speaks 3.1.1 only
    run_dir = REPO_ROOT / "run" / "demo"
    prepare_demo_identities(run_dir, f"mqtt://127.0.0.1:{broker_port}")
    broker = "Mosquitto" if mqtt_version == "5" else "embedded amqtt (no Mosquitto installed)"
    print(f"rdv: demo starting (deploy/demo.conf): {broker} on 127.0.0.1:{broker_port},")
    print("rdv:   a robot station (sim follower) and a teleop station (sim leader) that pair")
    print("rdv: see both stations:  .venv/bin/rdv fleet --config-dir run/demo/teleop/config")
    print("rdv: logs in run/demo/; the arm path alone runs with `rdv local`")
    env = {
        "RDV_PORT_OFFSET": str(port_offset),
        "RDV_BROKER_PORT": str(broker_port),
        "RDV_MQTT_VERSION": mqtt_version,
    }
    supervisord = start_supervisord(DEPLOY_DIR / "demo.conf", env)
    return _watch_then_stop(supervisord, station_run_dirs("demo"), seconds)


def _watch_then_stop(
    supervisord: subprocess.Popen, run_dirs: list[Path], seconds: float | None
) -> int:
    try:
        watch(run_dirs, seconds=seconds, alive=lambda: supervisord.poll() is None)
    except KeyboardInterrupt:
        pass
    finally:
        stop_supervisord(supervisord)
    return 0 if supervisord.returncode in (0, -signal.SIGTERM) else 1


def start_supervisord(conf: Path, env: dict[str, str]) -> subprocess.Popen:
    (REPO_ROOT / "run" / conf.stem).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [supervisord_path(), "-c", str(conf)],
        env={**os.environ, **env},
        # The status line is the foreground output of local and demo; supervisord logs to run/.
        stdout=subprocess.DEVNULL if conf.stem in ("local", "demo") else None,
        stderr=subprocess.STDOUT if conf.stem in ("local", "demo") else None,
    )


def stop_supervisord(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def supervisord_path() -> str:
    beside = Path(sys.executable).parent / "supervisord"
    found = str(beside) if beside.exists() else shutil.which("supervisord")
    if not found:
        raise SystemExit("rdv: supervisord not found; run `make setup` (it installs supervisor)")
    return found


def _wait_foreground(process: subprocess.Popen, seconds: float | None) -> int:
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while process.poll() is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop_supervisord(process)
    return 0


def _without_port_offset(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--port-offset":
            skip = True
        elif not item.startswith("--port-offset="):
            out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
