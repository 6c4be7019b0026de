"""Prometheus metrics shared by every rdv process, named as DESIGN.md lists them.

Each process serves its own /metrics on 127.0.0.1 at the port the bus map gives it. Labels stay
low-cardinality: topic names, closed sets of reasons, never sequence numbers or station ids.
A metrics port that cannot be bound must never stop a process that moves an arm.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Sub-millisecond to seconds: control latency lives near 1 ms, stalls show up near 1 s.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

FRAMES = Counter("rdv_frames_total", "Valid frames received, by stream (bus topic).", ["stream"])
FRAMES_DROPPED = Counter(
    "rdv_frames_dropped_total",
    "Frames dropped on receipt, by stream and reason.",
    ["stream", "reason"],
)
BUS_LATENCY = Histogram(
    "rdv_bus_latency_seconds",
    "Origin time of a frame to its receipt on the local bus.",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)
CONTROL_LATENCY = Histogram(
    "rdv_control_latency_seconds",
    "Leader read to follower command applied.",
    buckets=LATENCY_BUCKETS,
)
COMMANDS_REJECTED = Counter(
    "rdv_commands_rejected_total", "Commands the follower refused to apply, by reason.", ["reason"]
)
WATCHDOG_TRIPS = Counter(
    "rdv_watchdog_trips_total", "Times the follower deadman tripped and the arm was held."
)
FOLLOWER_STATE = Gauge(
    "rdv_follower_state", "1 for the follower's current safety state, 0 for the others.", ["state"]
)
LOOP_OVERRUNS = Counter(
    "rdv_loop_overruns_total",
    "Fixed-rate loop ticks that started late by a whole period.",
    ["loop"],
)
DEVICE_ERRORS = Counter(
    "rdv_device_errors_total", "Failed reads or writes of an arm device.", ["op"]
)
DEVICE_READ_RETRIES = Counter(
    "rdv_device_read_retries_total",
    "Arm reads tried again within the same tick after a failed attempt.",
)
DEVICE_FAULT = Gauge(
    "rdv_device_fault",
    "1 while no read of the arm has worked for the fault time; the arm is held meanwhile.",
)


def serve_metrics(port: int) -> bool:
    """Serve /metrics on 127.0.0.1:port. Returns False (and logs why) when the port is taken."""
    try:
        start_http_server(port, addr="127.0.0.1")
    except OSError as exc:
        log.error("metrics not served: cannot bind 127.0.0.1:%d (%s)", port, exc)
        return False
    log.info("metrics on http://127.0.0.1:%d/metrics", port)
    return True


SESSION_STATE = Gauge(
    "rdv_session_state", "1 for the session manager's current state, 0 for the others.", ["state"]
)
SESSIONS = Counter("rdv_sessions_total", "Sessions ended, by outcome.", ["outcome"])
PRESENCE_STATIONS = Gauge(
    "rdv_presence_stations",
    "Stations of this owner seen through presence, by role and status.",
    ["role", "status"],
)
MQTT_CONNECTED = Gauge("rdv_mqtt_connected", "1 while connected to the MQTT broker.")
SIGNALING_REJECTED = Counter(
    "rdv_signaling_rejected_total",
    "Signed MQTT inbox messages rejected on receipt, by reason.",
    ["reason"],
)
LINK_RTT = Histogram(
    "rdv_link_rtt_seconds",
    "Round-trip time of the station-to-station link, from pings on the reliable channel.",
    buckets=LATENCY_BUCKETS,
)
VIDEO_LATENCY = Histogram(
    "rdv_video_latency_seconds",
    "Capture at the robot station to decoded at the teleop station, by camera; robot capture "
    "times are moved to the teleop clock with the link's offset estimate.",
    ["camera"],
    buckets=LATENCY_BUCKETS,
)
VIDEO_FRAMES_DECODED = Counter(
    "rdv_video_frames_decoded_total",
    "Video frames decoded at the receiving station, by camera (fps = rate of this).",
    ["camera"],
)
CAMERA_UP = Gauge(
    "rdv_camera_up", "1 while the camera delivers frames, 0 while it fails.", ["camera"]
)
CAMERA_FAILURES = Counter(
    "rdv_camera_failures_total", "Times a camera failed to open or deliver a frame.", ["camera"]
)
ESTOP_LATCHED = Gauge(
    "rdv_estop_latched", "1 while an emergency stop is latched on this follower, until re-armed."
)
