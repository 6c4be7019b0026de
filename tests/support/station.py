"""The station runner for tests: real deploy/*.conf stations under real supervisord.

It lives in services/station_runner.py because the benchmarks (bench/) run whole stations too;
this module only re-exports it, so there is one runner.
"""

from services.station_runner import Station, StationError, free_port_offset

__all__ = ["Station", "StationError", "free_port_offset"]
