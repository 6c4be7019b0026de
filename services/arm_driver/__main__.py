"""Arm driver process: `python -m services.arm_driver --robot.type=... | --teleop.type=...`.

Builds the device, connects it without prompting, serves metrics and runs the role's control
loop on a dedicated thread until SIGTERM/SIGINT. Exit codes: 0 clean stop, 2 bad flags,
78 configuration error (bus map, device config, missing or mismatched calibration, bus endpoint
not bindable: final under supervisord, see services/exits.py), 69 device unavailable, 70 loop
crashed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from services import exits, metrics
from services.arm_driver.config import argv_with_environment, parse_driver_args
from services.arm_driver.devices import (
    CalibrationError,
    DeviceError,
    connect_device,
    joint_keys,
    joint_limits,
    make_device,
)
from services.arm_driver.follower import run_follower
from services.arm_driver.leader import run_leader
from services.bus import BusConfigError, load_bus_map
from services.logs import setup_logging

EXIT_CONFIG = exits.EXIT_CONFIG
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
log = logging.getLogger("rdv.arm_driver")


def role_of(argv: list[str]) -> str:
    """The role named on the command line, else by which RDV_*_ARM_ARGS holds a device."""
    for flag, role in (("--robot.", "follower"), ("--teleop.", "leader")):
        if any(arg.startswith(flag) for arg in argv):
            return role
    if "--robot." in os.environ.get("RDV_FOLLOWER_ARM_ARGS", ""):
        return "follower"
    return "leader"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = parse_driver_args(argv_with_environment(argv, f"{role_of(argv)}_arm"))
    setup_logging(config.log_level, config.process)
    try:
        bus = load_bus_map(config.bus_config, run_dir=config.run_dir)
        device = make_device(config.device)
    except (BusConfigError, DeviceError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    try:
        connect_device(device, config.device)
    except CalibrationError as exc:  # a person must act: restarting cannot help
        log.error("%s", exc)
        return EXIT_CONFIG
    except DeviceError as exc:
        log.error("%s", exc)
        return EXIT_UNAVAILABLE
    log.info("%s connected as %s (station %s)", config.device.type, config.role, config.station)
    if config.role == "follower":
        try:  # a wrong limit is a configuration error, not a crash to restart forever
            config.safety_config(joint_limits(device, joint_keys(device), config.joint_limits))
        except (DeviceError, ValueError) as exc:
            log.error("%s", exc)
            device.disconnect()
            return EXIT_CONFIG
    metrics.serve_metrics(config.metrics_port or bus.metrics_port(config.process))

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    loop = run_follower if config.role == "follower" else run_leader
    failure: list[BaseException] = []

    def control() -> None:
        try:
            loop(config, device, bus, stop)
        except BusConfigError as exc:  # its bus endpoint cannot be bound (run dir, port)
            failure.append(exc)
            log.error("%s", exc)
        except BaseException as exc:
            failure.append(exc)
            log.exception("control loop crashed")
        finally:
            stop.set()

    thread = threading.Thread(target=control, name=f"{config.role}-control")
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short joins keep the main thread responsive to signals
    try:
        device.disconnect()
    except Exception as exc:
        log.warning("disconnect failed: %s", exc)
    log.info("stopped")
    if failure:
        return EXIT_CONFIG if isinstance(failure[0], BusConfigError) else EXIT_SOFTWARE
    return 0


if __name__ == "__main__":
    sys.exit(exits.final(main()))
