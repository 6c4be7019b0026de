"""Command-line flags of the arm driver, parsed into one `DriverConfig`.

Device flags follow LeRobot's conventions (`--robot.type=so101_follower --robot.port=...
--robot.id=...`, `--teleop.type=...`); any other `--robot.<field>=<value>` is handed to the
device's own config. `rdv robot` and `rdv teleop` reuse these parsers so their --help shows the
same flags. This module must never touch a device or a socket.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from dataclasses import dataclass, field

from services.arm_driver.safety import SafetyConfig
from services.service_flags import add_station_flags

DEFAULTS = SafetyConfig(limits=((0.0, 1.0),))
TORQUE_POLICIES = ("hold", "release")


@dataclass
class DeviceSpec:
    kind: str  # "robot" (follower) or "teleop" (leader)
    type: str
    port: str | None = None
    id: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # other --robot.<field>=<value>


@dataclass
class DriverConfig:
    device: DeviceSpec
    station: str = "local"
    rate_hz: float = 100.0
    max_step: float = DEFAULTS.max_step
    ramp_step: float = DEFAULTS.ramp_step
    ramp_done: float = DEFAULTS.ramp_done
    max_command_age_s: float = DEFAULTS.max_command_age_s
    command_timeout_s: float = DEFAULTS.command_timeout_s
    torque_policy: str = "hold"
    fault_after_s: float = 0.25
    joint_limits: dict[str, tuple[float, float]] | None = None
    bus_config: str | None = None
    run_dir: str | None = None
    metrics_port: int | None = None
    log_level: str = "INFO"

    @property
    def role(self) -> str:
        return "follower" if self.device.kind == "robot" else "leader"

    @property
    def process(self) -> str:
        """This driver's name in the bus map."""
        return f"{self.role}_arm"

    def safety_config(self, limits: tuple[tuple[float, float], ...]) -> SafetyConfig:
        """The follower's safety rules from these flags; ValueError names a bad value."""
        return SafetyConfig(
            limits=limits,
            rate_hz=self.rate_hz,
            max_step=self.max_step,
            ramp_step=self.ramp_step,
            ramp_done=self.ramp_done,
            max_command_age_s=self.max_command_age_s,
            command_timeout_s=self.command_timeout_s,
        )


def add_device_flags(
    parser: argparse.ArgumentParser, kind: str, default_type: str | None = None
) -> None:
    """--<kind>.type/.port/.id. With default_type None the type is required (the driver)."""
    what = "follower arm (robot side)" if kind == "robot" else "leader arm (teleop side)"
    sim = "sim_so101_follower" if kind == "robot" else "sim_so101_leader"
    lerobot = "so101_follower" if kind == "robot" else "so101_leader"
    example = (
        "--robot.max_relative_target=5 (LeRobot) or --robot.noise_std=0 (sim)"
        if kind == "robot"
        else "--teleop.motion=trajectory.jsonl or --teleop.period_s=4 (sim)"
    )
    group = parser.add_argument_group(
        f"{kind} device ({what}), LeRobot-style",
        description=f"Any other --{kind}.<field>=<value> sets that field of the device's own "
        f"config, e.g. {example}.",
    )
    group.add_argument(
        f"--{kind}.type",
        dest=f"{kind}_type",
        metavar="TYPE",
        default=default_type,
        help=f"device type: 'sim' or '{sim}' (built in, no LeRobot needed), or a LeRobot type "
        f"such as '{lerobot}' (needs `pip install rdv[lerobot]`) "
        + (f"(default: {default_type})" if default_type else "(no default: give it)"),
    )
    group.add_argument(
        f"--{kind}.port",
        dest=f"{kind}_port",
        metavar="PORT",
        help="serial port, e.g. /dev/ttyACM0 (default: none; sims need none)",
    )
    group.add_argument(
        f"--{kind}.id",
        dest=f"{kind}_id",
        metavar="ID",
        help="device id; LeRobot picks the calibration file by it (default: the type's own id)",
    )


def add_control_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("control and safety")
    group.add_argument(
        "--rate",
        dest="rate_hz",
        type=float,
        default=100.0,
        help="control loop rate in Hz: the leader is read, and the follower ticked, this often "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-step",
        type=float,
        default=DEFAULTS.max_step,
        help="follower: largest goal change per tick, in joint units (degrees; gripper 0..100) "
        "(default: %(default)s, i.e. 200 deg/s at 100 Hz)",
    )
    group.add_argument(
        "--ramp-step",
        type=float,
        default=DEFAULTS.ramp_step,
        help="follower: goal change per tick while (re)engaging toward the leader "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--ramp-done",
        type=float,
        default=DEFAULTS.ramp_done,
        help="follower: the ramp ends once every joint is this close to the leader "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-command-age",
        dest="max_command_age_s",
        type=float,
        default=DEFAULTS.max_command_age_s,
        help="follower: ignore commands older than this many seconds (default: %(default)s)",
    )
    group.add_argument(
        "--command-timeout",
        dest="command_timeout_s",
        type=float,
        default=DEFAULTS.command_timeout_s,
        help="follower deadman: hold position when no fresh command came for this many seconds "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--torque-policy",
        choices=TORQUE_POLICIES,
        default="hold",
        help="follower: on deadman or e-stop, 'hold' keeps torque on and holds position; "
        "'release' turns torque off (default: %(default)s)",
    )
    group.add_argument(
        "--fault-after",
        dest="fault_after_s",
        type=float,
        default=0.25,
        help="a failed read of the arm is retried within the tick; when no read has worked for "
        "this many seconds the device is in fault: the follower holds (state 'fault'), the "
        "leader stops publishing, both say so in health and rdv_device_fault "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--joint-limits",
        type=_parse_limits,
        default=None,
        metavar="JSON",
        help='follower: joint limits as JSON {"shoulder_pan.pos": [-110, 110], ...}; commands '
        "outside them are refused (default: the device's own, or SO101 nominal limits)",
    )


def build_parser(prog: str = "python -m services.arm_driver") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Drive one arm on the station bus. With --robot.* it is the follower: it "
        "applies joints.command under every safety rule and publishes joints.follower. With "
        "--teleop.* it is the leader: it reads the arm at a fixed rate and publishes "
        "joints.leader.",
        epilog="Extra flags may also come from the environment: RDV_FOLLOWER_ARM_ARGS or "
        "RDV_LEADER_ARM_ARGS (shell-quoted), appended after the command line; this is how "
        "supervisord configs are overridden.",
    )
    add_device_flags(parser, "robot")
    add_device_flags(parser, "teleop")
    add_control_flags(parser)
    add_station_flags(parser)
    return parser


def parse_driver_args(
    argv: list[str], parser: argparse.ArgumentParser | None = None
) -> DriverConfig:
    """Parse flags (plus the RDV_<PROCESS>_ARGS environment) into a DriverConfig, or exit 2."""
    parser = parser or build_parser()
    try:
        device_options, rest = _split_device_options(argv)
    except ValueError as exc:
        parser.error(str(exc))
    args = parser.parse_args(rest)
    kinds = [kind for kind in ("robot", "teleop") if getattr(args, f"{kind}_type", None)]
    if len(kinds) != 1:
        parser.error("give exactly one of --robot.type (follower) or --teleop.type (leader)")
    kind = kinds[0]
    other = "teleop" if kind == "robot" else "robot"
    if device_options[other] or any(
        getattr(args, f"{other}_{name}", None) for name in ("type", "port", "id")
    ):
        parser.error(f"--{other}.* flags given to a {kind} driver")
    if args.rate_hz <= 0 or args.rate_hz > 1000:
        parser.error("--rate must be in (0, 1000] Hz")
    if not (math.isfinite(args.fault_after_s) and args.fault_after_s > 0):
        parser.error("--fault-after must be a positive number of seconds")
    config = DriverConfig(
        device=DeviceSpec(
            kind=kind,
            type=getattr(args, f"{kind}_type"),
            port=getattr(args, f"{kind}_port"),
            id=getattr(args, f"{kind}_id"),
            options=device_options[kind],
        ),
        station=args.station,
        rate_hz=args.rate_hz,
        max_step=args.max_step,
        ramp_step=args.ramp_step,
        ramp_done=args.ramp_done,
        max_command_age_s=args.max_command_age_s,
        command_timeout_s=args.command_timeout_s,
        torque_policy=args.torque_policy,
        fault_after_s=args.fault_after_s,
        joint_limits=args.joint_limits,
        bus_config=args.bus_config,
        run_dir=args.run_dir,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
    )
    try:
        config.safety_config(limits=((0.0, 1.0),))  # the joints' limits come with the device
    except ValueError as exc:
        parser.error(str(exc))
    return config


def argv_with_environment(argv: list[str], process: str) -> list[str]:
    """argv followed by the shell-quoted flags in RDV_<PROCESS>_ARGS, if set."""
    extra = os.environ.get(f"RDV_{process.upper()}_ARGS", "")
    return [*argv, *shlex.split(extra)]


def _split_device_options(argv: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Pull `--robot.<field>=<value>` for fields other than type/port/id out of argv."""
    options: dict[str, dict[str, str]] = {"robot": {}, "teleop": {}}
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        kind, _, tail = item[2:].partition(".") if item.startswith("--") else ("", "", "")
        if kind in options and tail and tail.split("=")[0] not in ("type", "port", "id"):
            name, has_value, value = tail.partition("=")
            if not has_value:
                value = next(items, None)
                if value is None:
                    raise ValueError(f"{item} needs a value")
            options[kind][name] = value
        else:
            rest.append(item)
    return options, rest


def _parse_limits(text: str) -> dict[str, tuple[float, float]]:
    try:
        raw = json.loads(text)
        limits = {str(k): (float(v[0]), float(v[1])) for k, v in raw.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise argparse.ArgumentTypeError(
            'expected JSON like {"shoulder_pan.pos": [-110, 110]}'
        ) from None
    for key, (low, high) in limits.items():
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise argparse.ArgumentTypeError(
                f"{key}: low {low} must be below high {high}, both finite"
            )
    return limits
