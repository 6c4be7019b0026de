"""`rdv calibrate` (= `python -m services.arm_driver.calibrate`): LeRobot's own interactive
calibration of one arm, from the same device flags the stations take.

It does what `lerobot-calibrate` does (connect without calibrating, `calibrate()`, disconnect),
through rdv's device factory, so the file lands where the arm driver will look for it
(`$HF_LEROBOT_CALIBRATION/<robots|teleoperators>/<name>/<id>.json`). A person must be at the
arm: LeRobot asks them to move it and press ENTER. This is the only place in rdv that lets
LeRobot prompt; it must never be run by supervisord or a daemon.
"""

from __future__ import annotations

import argparse
import sys

from services.arm_driver.config import DeviceSpec, _split_device_options, add_device_flags
from services.arm_driver.devices import SIM_TYPES, DeviceError, make_device

EXIT_CONFIG = 78
EXIT_UNAVAILABLE = 69


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdv calibrate",
        description="Calibrate a LeRobot arm with LeRobot's interactive flow (move the arm, "
        "press ENTER), saving the file the arm driver reads. Give the same --robot.* or "
        "--teleop.* flags as for `rdv robot` / `rdv teleop`.",
        epilog="Example: rdv calibrate --robot.type=so101_follower --robot.port=/dev/ttyACM0 "
        "--robot.id=my_arm",
    )
    add_device_flags(parser, "robot")
    add_device_flags(parser, "teleop")
    return parser


def parse_spec(argv: list[str]) -> DeviceSpec:
    parser = build_parser()
    try:
        options, rest = _split_device_options(argv)
    except ValueError as exc:
        parser.error(str(exc))
    args = parser.parse_args(rest)
    kinds = [kind for kind in ("robot", "teleop") if getattr(args, f"{kind}_type")]
    if len(kinds) != 1:
        parser.error("give exactly one of --robot.type or --teleop.type")
    kind = kinds[0]
    return DeviceSpec(
        kind=kind,
        type=getattr(args, f"{kind}_type"),
        port=getattr(args, f"{kind}_port"),
        id=getattr(args, f"{kind}_id"),
        options=options[kind],
    )


def main(argv: list[str] | None = None) -> int:
    spec = parse_spec(sys.argv[1:] if argv is None else argv)
    if spec.type in SIM_TYPES[spec.kind]:
        print(f"{spec.type} is a built-in sim: it needs no calibration.")
        return 0
    try:
        device = make_device(spec)
    except (DeviceError, ValueError) as exc:
        print(f"rdv calibrate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        device.connect(calibrate=False)
    except Exception as exc:
        print(f"rdv calibrate: cannot connect {spec.type} on {spec.port}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        device.calibrate()
    finally:
        device.disconnect()
    print(f"Calibration of {spec.type} {device.id} saved to {device.calibration_fpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
