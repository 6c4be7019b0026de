"""Presence documents and the discovery board: who is online, by what the broker retained.

A station is online only while its presence says so AND keeps being refreshed: a hung peer
(SIGSTOP, cut cable) is noticed by its silence, not by the broker, whose keepalive is slow and
on some brokers absent. Decoding never raises anything but PresenceError, whatever the bytes.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

TOPIC_ROOT = "rdv/v1"
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
ROLES = ("robot", "teleop")
STATUSES = ("online", "offline")
MAX_PRESENCE_BYTES = 8192
# Allowed disagreement between two stations' wall clocks when judging a retained `ts`.
CLOCK_SKEW_S = 30.0


class PresenceError(ValueError):
    """A presence payload is not a valid presence document."""


def presence_topic(owner: str, station: str) -> str:
    return f"{TOPIC_ROOT}/{owner}/{station}/presence"


def inbox_topic(owner: str, station: str) -> str:
    return f"{TOPIC_ROOT}/{owner}/{station}/inbox"


def station_of(topic: str, owner: str, leaf: str) -> str | None:
    """The station id in `rdv/v1/<owner>/<station>/<leaf>`, or None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{TOPIC_ROOT}/{owner}" or parts[4] != leaf:
        return None
    # fullmatch: `$` in ID_PATTERN also matches before a trailing newline ("robot\n").
    return parts[3] if ID_PATTERN.fullmatch(parts[3]) else None


@dataclass(frozen=True)
class Presence:
    status: str
    role: str
    robot_type: str
    joints: tuple[str, ...]
    cameras: tuple[str, ...]
    busy: bool
    session: str | None
    version: str
    pubkey: str
    ts: float

    def encode(self) -> bytes:
        body = asdict(self)
        body["joints"] = list(self.joints)
        body["cameras"] = list(self.cameras)
        return json.dumps(body, separators=(",", ":")).encode()

    def offline(self, ts: float | None = None) -> Presence:
        ts = time.time() if ts is None else ts  # not `ts or ...`: 0.0 is a valid time
        return replace(self, status="offline", busy=False, session=None, ts=ts)


def decode_presence(payload: bytes) -> Presence:
    if len(payload) > MAX_PRESENCE_BYTES:
        raise PresenceError(f"{len(payload)} bytes, cap {MAX_PRESENCE_BYTES}")
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep [[[[ nesting
        raise PresenceError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PresenceError("not a JSON object")
    try:
        presence = Presence(
            status=_choice(raw, "status", STATUSES),
            role=_choice(raw, "role", ROLES),
            robot_type=_text(raw, "robot_type"),
            joints=_texts(raw, "joints"),
            cameras=_texts(raw, "cameras"),
            busy=_bool(raw, "busy"),
            session=None if raw.get("session") is None else _text(raw, "session"),
            version=_text(raw, "version"),
            pubkey=_text(raw, "pubkey"),
            ts=_number(raw, "ts"),
        )
    except KeyError as exc:
        raise PresenceError(f"missing field {exc}") from None
    return presence


def _choice(raw: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = raw[key]
    if value not in allowed or not isinstance(value, str):
        raise PresenceError(f"{key} must be one of {allowed}, got {value!r}")
    return value


def _text(raw: dict[str, Any], key: str, limit: int = 256) -> str:
    value = raw[key]
    if not isinstance(value, str) or len(value) > limit:
        raise PresenceError(f"{key} must be text of at most {limit} characters")
    return value


def _texts(raw: dict[str, Any], key: str) -> tuple[str, ...]:
    value = raw[key]
    if not isinstance(value, list) or len(value) > 64:
        raise PresenceError(f"{key} must be a list of at most 64 names")
    if not all(isinstance(item, str) and 0 < len(item) <= 64 for item in value):
        raise PresenceError(f"{key} must hold names of 1..64 characters")
    return tuple(value)


def _bool(raw: dict[str, Any], key: str) -> bool:
    value = raw[key]
    if not isinstance(value, bool):
        raise PresenceError(f"{key} must be true or false")
    return value


def _number(raw: dict[str, Any], key: str) -> float:
    value = raw[key]
    try:
        number = float(value) if type(value) in (int, float) else math.nan
    except OverflowError:  # an int literal too large for a float
        number = math.nan
    if not math.isfinite(number):
        raise PresenceError(f"{key} must be a finite number")
    return number


@dataclass
class Sighting:
    presence: Presence
    received_s: float  # monotonic time of the last message about this station


@dataclass
class PresenceBoard:
    """What one station knows of its owner's stations, from their presence messages."""

    interval_s: float = 1.0
    skew_s: float = CLOCK_SKEW_S  # tolerated wall-clock disagreement when judging a `ts`
    stations: dict[str, Sighting] = field(default_factory=dict)

    @property
    def stale_after_s(self) -> float:
        return 3 * self.interval_s

    def update(self, station: str, presence: Presence | None, received_s: float) -> None:
        """Record a presence message; None is an empty retained message (station removed)."""
        if presence is None:
            self.stations.pop(station, None)
        else:
            self.stations[station] = Sighting(presence, received_s)

    def status(self, station: str, now_s: float, wall_s: float | None = None) -> str:
        """online, offline, stale (was online, has gone silent) or unknown."""
        sighting = self.stations.get(station)
        if sighting is None:
            return "unknown"
        if sighting.presence.status == "offline":
            return "offline"
        wall_s = time.time() if wall_s is None else wall_s
        silent_s = now_s - sighting.received_s
        age_s = wall_s - sighting.presence.ts
        if silent_s > self.stale_after_s or age_s > self.stale_after_s + self.skew_s:
            return "stale"
        return "online"

    def online(self, now_s: float, role: str | None = None) -> dict[str, Presence]:
        wall_s = time.time()
        return {
            station: sighting.presence
            for station, sighting in self.stations.items()
            if self.status(station, now_s, wall_s) == "online"
            and (role is None or sighting.presence.role == role)
        }
