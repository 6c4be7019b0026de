"""`rdv fleet --metrics-port N`: the owner's fleet presence as Prometheus metrics.

A long-running, read-only watcher: `services.fleet.FleetWatcher` subscribes to the owner's
retained presence with this station's broker credentials, and once a second the exporter turns
its PresenceBoard into gauges served on 127.0.0.1:N:

- `rdv_presence_stations{role,status}`: how many stations of each role are online, offline
  (said so themselves, or their Last Will did) or stale (went silent); the same Gauge the session
  managers export (services.metrics.PRESENCE_STATIONS).
- `rdv_station_last_seen_seconds{station,role}`: seconds since each station's presence `ts`.
- `rdv_mqtt_connected`: 1 while the exporter itself is connected to the broker (when it is 0,
  every station turns stale here: the exporter, not the fleet, lost its view).

It serves its own registry, so the other rdv_* families a process gets by importing
services.metrics (control latency, watchdog trips...) are never exported from here with
meaningless zeros. It must never publish to the broker, bind anything but loopback, or
export a label value that is not a station id, a role or a status.

Also runnable alone: `python -m services.fleet_exporter --metrics-port 9799 --config-dir DIR`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from services import metrics
from services.fleet import FleetWatcher
from services.session_manager.presence import ROLES, PresenceBoard

log = logging.getLogger(__name__)

PROCESS = "fleet_exporter"
DEFAULT_METRICS_PORT = 9799  # monitoring/prometheus.yml scrapes the fleet exporter here
# What PresenceBoard.status() says of a station it has heard of ("unknown" is for absent ones).
STATUSES = ("online", "offline", "stale")
UPDATE_INTERVAL_S = 1.0
EXIT_UNAVAILABLE = 69  # broker unreachable or metrics port taken (sysexits EX_UNAVAILABLE)
EXIT_CONFIG = 78

# One series per station of ONE owner (the exporter only sees its owner's subtree of the
# broker), so the `station` label is bounded by the size of that owner's fleet: acceptable
# cardinality, unlike per-frame or per-session labels. Series of stations that disappear from
# the broker (empty retained presence) are removed, not left behind.
STATION_LAST_SEEN = Gauge(
    "rdv_station_last_seen_seconds",
    "Seconds since the station's last presence timestamp (its own wall clock), by station.",
    ["station", "role"],
    registry=None,
)


def fleet_registry() -> CollectorRegistry:
    """The exporter's registry: fleet gauges and process stats, nothing else from rdv."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics.PRESENCE_STATIONS)
    registry.register(STATION_LAST_SEEN)
    registry.register(metrics.MQTT_CONNECTED)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def presence_counts(
    board: PresenceBoard, now_s: float, wall_s: float
) -> dict[tuple[str, str], int]:
    """Stations per (role, status), every combination present (zeros included)."""
    counts = {(role, status): 0 for role in ROLES for status in STATUSES}
    for station, sighting in board.stations.items():
        key = (sighting.presence.role, board.status(station, now_s, wall_s))
        if key in counts:  # decode_presence only lets known roles in; never mint new labels
            counts[key] += 1
    return counts


def last_seen(board: PresenceBoard, wall_s: float) -> dict[tuple[str, str], float]:
    """Seconds since each station's presence `ts`, keyed by (station, role); never negative."""
    return {
        (station, sighting.presence.role): max(0.0, wall_s - sighting.presence.ts)
        for station, sighting in board.stations.items()
    }


class FleetGauges:
    """Writes a PresenceBoard into the fleet gauges, removing series of departed stations."""

    def __init__(self) -> None:
        self._exported: set[tuple[str, str]] = set()

    def update(self, board: PresenceBoard, now_s: float, wall_s: float) -> None:
        for (role, status), count in presence_counts(board, now_s, wall_s).items():
            metrics.PRESENCE_STATIONS.labels(role=role, status=status).set(count)
        seen = last_seen(board, wall_s)
        for (station, role), seconds in seen.items():
            STATION_LAST_SEEN.labels(station=station, role=role).set(seconds)
        for station, role in self._exported - seen.keys():
            STATION_LAST_SEEN.remove(station, role)
        self._exported = set(seen)


def run_fleet_exporter(args: Any, identity: Any, *, stop: threading.Event | None = None) -> int:
    """Serve the fleet gauges on 127.0.0.1:args.metrics_port until SIGTERM/SIGINT.

    Call it from the main thread: it installs the SIGTERM/SIGINT handlers, unless a caller
    passes its own `stop` event (then signals are left alone and setting `stop` ends it).

    `args` needs metrics_port, mqtt_version, presence_interval and clock_skew (the flags of
    `rdv fleet`). Returns 0 on a clean stop, 69 when the port is taken or the broker does not
    answer at start (after start, the MQTT client reconnects by itself).
    """
    if stop is None:  # the command itself: SIGTERM (supervisord) or Ctrl-C ends it
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        server, thread = start_http_server(
            args.metrics_port, addr="127.0.0.1", registry=fleet_registry()
        )
    except OSError as exc:
        where = f"127.0.0.1:{args.metrics_port}"
        print(f"rdv fleet: cannot serve metrics on {where}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    watcher = FleetWatcher.from_flags(identity, args)
    try:
        try:
            watcher.start()
        except ConnectionError as exc:
            print(f"rdv fleet: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        log.info(
            "fleet of owner %r: metrics on http://127.0.0.1:%d/metrics",
            watcher.owner,
            args.metrics_port,
        )
        gauges = FleetGauges()
        next_update = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_update:
                metrics.MQTT_CONNECTED.set(1 if watcher.client.is_connected() else 0)
                gauges.update(watcher.board, now, time.time())
                next_update = now + UPDATE_INTERVAL_S
            # Short slices: a signal is noticed within 0.2 s.
            watcher.pump(min(0.2, max(0.0, next_update - time.monotonic())))
        return 0
    finally:
        watcher.stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def build_parser() -> argparse.ArgumentParser:
    """The flags `rdv fleet --metrics-port` takes, for running this module alone."""
    parser = argparse.ArgumentParser(
        prog="python -m services.fleet_exporter",
        description="Export this owner's fleet presence as Prometheus metrics on 127.0.0.1.",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT + int(os.environ.get("RDV_PORT_OFFSET") or 0),
        help="serve /metrics on 127.0.0.1 at this port (default: %(default)s: 9799 plus "
        "$RDV_PORT_OFFSET, where monitoring/prometheus.yml scrapes the demo's)",
    )
    parser.add_argument(
        "--config-dir",
        default=None,
        help="identity to use (default: $RDV_CONFIG_DIR, else ~/.config/rdv)",
    )
    parser.add_argument(
        "--presence-interval",
        type=float,
        default=1.0,
        help="the stations' presence refresh interval; silent for 3 of them = stale "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--clock-skew",
        type=float,
        default=2.0,
        help="seconds of wall-clock difference tolerated when judging a presence's age "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--mqtt-version",
        choices=("5", "3.1.1"),
        default=os.environ.get("RDV_MQTT_VERSION", "5"),
        help="MQTT protocol (default: $RDV_MQTT_VERSION or %(default)s)",
    )
    parser.add_argument("--log-level", default="info", help="(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from services.logs import setup_logging
    from services.session_manager.identity import IdentityError, config_dir, load_identity

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level, PROCESS)
    try:
        identity = load_identity(config_dir(args.config_dir))
    except IdentityError as exc:
        print(f"rdv fleet: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_fleet_exporter(args, identity)


if __name__ == "__main__":
    sys.exit(main())
