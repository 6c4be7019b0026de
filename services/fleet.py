"""`rdv fleet`: the owner's stations as the broker sees them, once, as JSON, or live.

A read-only watcher: it subscribes to `rdv/v1/<owner>/+/presence` with this station's broker
credentials and never publishes anything.
"""

from __future__ import annotations

import json
import queue
import ssl
import sys
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from services.session_manager.mqtt_link import broker_address, disable_nagle
from services.session_manager.presence import (
    PresenceBoard,
    PresenceError,
    decode_presence,
    presence_topic,
    station_of,
)

COLUMNS = ("station", "role", "type", "status", "busy", "session", "last seen")


def fleet_rows(board: PresenceBoard, now_s: float, wall_s: float) -> list[dict[str, Any]]:
    rows = []
    for station in sorted(board.stations):
        presence = board.stations[station].presence
        rows.append(
            {
                "station": station,
                "role": presence.role,
                "type": presence.robot_type,
                "status": board.status(station, now_s, wall_s),
                "busy": presence.busy,
                "session": presence.session,
                "last_seen_s": round(max(0.0, wall_s - presence.ts), 1),
                "joints": list(presence.joints),
                "cameras": list(presence.cameras),
                "version": presence.version,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], owner: str) -> str:
    if not rows:
        return f"no stations of owner {owner!r} on the broker"
    cells = [
        (
            row["station"],
            row["role"],
            row["type"],
            row["status"],
            "yes" if row["busy"] else "no",
            (row["session"] or "-")[:8],
            f"{row['last_seen_s']:.1f}s ago",
        )
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(COLUMNS, *cells, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


class FleetWatcher:
    @classmethod
    def from_flags(cls, identity: Any, args: Any) -> FleetWatcher:
        """From the flags `rdv fleet` (and its exporter) take."""
        return cls(
            identity,
            mqtt_version=args.mqtt_version,
            interval_s=args.presence_interval,
            skew_s=args.clock_skew,
        )

    def __init__(self, identity: Any, *, mqtt_version: str, interval_s: float, skew_s: float):
        self.owner = identity.owner
        self.board = PresenceBoard(interval_s=interval_s, skew_s=skew_s)
        self.events: queue.Queue = queue.Queue()
        host, port, tls = broker_address(identity.broker.url)
        protocol = mqtt.MQTTv5 if mqtt_version == "5" else mqtt.MQTTv311
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"rdv-fleet-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )  # fmt: skip
        if identity.broker.username:
            client.username_pw_set(identity.broker.username, identity.broker.password)
        if tls:
            client.tls_set(ca_certs=identity.broker.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.on_socket_open = disable_nagle
        client.on_connect = self._on_connect
        # Ready only once the broker confirms the subscription: retained presence follows it.
        client.on_subscribe = lambda *_args: self.events.put(("connected",))
        client.on_message = lambda _c, _u, message: self.events.put(
            ("message", message.topic, message.payload)
        )
        self.client = client
        self.address = (host, port)

    def _on_connect(self, client, _userdata, _flags, reason, _properties=None) -> None:
        if reason.is_failure:
            self.events.put(("refused", str(reason)))
            return
        client.subscribe(presence_topic(self.owner, "+"), qos=1)

    def start(self, timeout_s: float = 10.0) -> None:
        self.client.connect_async(*self.address, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if event[0] == "connected":
                return
            if event[0] == "refused":
                raise ConnectionError(f"broker {self.address[0]}:{self.address[1]}: {event[1]}")
        raise ConnectionError(f"no answer from broker {self.address[0]}:{self.address[1]}")

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                return
            if event[0] != "message":
                continue
            station = station_of(event[1], self.owner, "presence")
            if station is None:
                continue
            if not event[2]:
                self.board.update(station, None, time.monotonic())
                continue
            try:
                self.board.update(station, decode_presence(event[2]), time.monotonic())
            except PresenceError:
                continue  # the session managers log bad presence; a listing just skips it

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_fleet(args: Any, identity: Any) -> int:
    watcher = FleetWatcher.from_flags(identity, args)
    try:
        watcher.start()
    except ConnectionError as exc:
        print(f"rdv fleet: {exc}", file=sys.stderr)
        return 69
    try:
        watcher.pump(args.wait)  # retained presence of every station arrives right away
        if not args.watch:
            rows = fleet_rows(watcher.board, time.monotonic(), time.time())
            print(json.dumps(rows, indent=2) if args.json else format_table(rows, watcher.owner))
            return 0
        in_place = sys.stdout.isatty()
        while True:
            rows = fleet_rows(watcher.board, time.monotonic(), time.time())
            text = json.dumps(rows) if args.json else format_table(rows, watcher.owner)
            if in_place and not args.json:
                print("\x1b[H\x1b[2J" + text, flush=True)
            else:
                print(text, flush=True)
            watcher.pump(1.0)
    except KeyboardInterrupt:
        return 0
    finally:
        watcher.stop()
