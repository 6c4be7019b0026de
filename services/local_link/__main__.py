"""Local link: republish `joints.leader` as `joints.command` on one station, no network.

It stands where the two WebRTC gateways stand in a real session, so the arm path (leader
driver -> bus -> follower driver) can be run and tested alone. It forwards frames untouched
(same seq, origin time and src) and never invents or edits a command.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from services import metrics
from services.bus import BusConfigError, Publisher, Subscriber, load_bus_map
from services.bus.health import HealthBeat
from services.logs import setup_logging

PROCESS = "local_link"
log = logging.getLogger("rdv.local_link")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.local_link",
        description="Forward joints.leader to joints.command on this station (local teleop).",
    )
    parser.add_argument("--station", default="local", help="station id (default: %(default)s)")
    parser.add_argument("--bus-config", default=None, help="bus map file (default: bus_config)")
    parser.add_argument("--run-dir", default=None, help="bus socket directory (default: run/)")
    parser.add_argument("--metrics-port", type=int, default=None, help="default: the bus map's")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level, PROCESS)
    try:
        bus = load_bus_map(args.bus_config, run_dir=args.run_dir)
    except BusConfigError as exc:
        log.error("%s", exc)
        return 78
    metrics.serve_metrics(args.metrics_port or bus.metrics_port(PROCESS))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    subscriber = Subscriber(bus, ["joints.leader"])
    publisher = Publisher(bus, PROCESS)
    health = HealthBeat(publisher, args.station, PROCESS)
    forwarded = 0
    log.info("forwarding joints.leader -> joints.command")
    while not stop.is_set():
        received = subscriber.recv(timeout_ms=100)
        if received is not None:
            publisher.send("joints.command", received.frame)
            forwarded += 1
        health.maybe_send(state="forwarding", forwarded=forwarded)
    subscriber.close()
    publisher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
