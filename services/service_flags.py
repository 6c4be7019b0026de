"""Flags every station service shares: station id, bus map, run dir, metrics port, log level.

One definition, so `--help` reads the same for every service and a default changes in one
place. Parsing only: this module never opens a socket or a file.
"""

from __future__ import annotations

import argparse
import os


def add_station_flags(parser: argparse.ArgumentParser, *, station: bool = True) -> None:
    """station=False for a service whose station id comes from elsewhere (its identity)."""
    group = parser.add_argument_group("station")
    if station:
        group.add_argument(
            "--station",
            default=os.environ.get("RDV_STATION", "local"),
            help="station id, carried as `src` in every frame (default: $RDV_STATION or "
            "%(default)s)",
        )
    group.add_argument(
        "--bus-config",
        default=None,
        help="bus map file (default: $RDV_BUS_CONFIG or bus_config/bus.toml)",
    )
    group.add_argument(
        "--run-dir",
        default=None,
        help="directory for bus sockets and logs (default: $RDV_RUN_DIR or run/local)",
    )
    group.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics port on 127.0.0.1 "
        "(default: the bus map's, plus $RDV_PORT_OFFSET)",
    )
    group.add_argument(
        "--log-level",
        default=os.environ.get("RDV_LOG_LEVEL", "INFO").upper(),
        type=str.upper,  # `info` as well as `INFO`, as in $RDV_LOG_LEVEL
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log verbosity (default: $RDV_LOG_LEVEL or %(default)s)",
    )
