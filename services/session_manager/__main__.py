"""Session manager process: presence, discovery, pairing and the signaling relay over MQTT.

One thread decides everything: it takes MQTT events from a queue (paho's thread fills it),
gateway status from the bus, and the clock, feeds them to `SessionMachine`, and carries out
its actions. Every inbox message is verified (signature, trust, freshness, replay) before the
machine sees it. It must never act on an unverified message and never block on the network.

Exit codes: 0 clean stop, 2 bad flags, 78 configuration error (identity, bus map).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from typing import Any

from services import __version__, clock, exits, metrics
from services.bus import BusConfigError, MessageFrame, Publisher, Subscriber, load_bus_map
from services.bus.health import HealthBeat
from services.camera.config import CAMERAS_ENV, camera_names, cameras_from_env
from services.logs import setup_logging
from services.service_flags import add_station_flags
from services.session_manager.identity import IdentityError, TrustRoster, config_dir, load_identity
from services.session_manager.mqtt_link import Connected, Disconnected, Incoming, MqttLink
from services.session_manager.presence import (
    Presence,
    PresenceBoard,
    PresenceError,
    decode_presence,
    inbox_topic,
    presence_topic,
    station_of,
)
from services.session_manager.session import (
    OUTCOMES,
    STATES,
    Actions,
    SessionMachine,
    Timeouts,
)
from services.session_manager.signing import SignatureRejected, Verifier, sign_envelope
from services.sim import SO101_KEYS

# A gateway that subscribed after the first `connect` (ZeroMQ's reconnect takes ~100 ms) hears
# it again this soon; the bus is local, repeats are cheap, and the paired state is short.
CONNECT_REPEAT_S = 0.25
PROCESS = "session_manager"
EXIT_CONFIG = exits.EXIT_CONFIG
log = logging.getLogger("rdv.session_manager")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.session_manager",
        description="Announce this station on the MQTT broker, discover the owner's other "
        "stations and pair: a teleop pairs with a free robot whose joints match its leader; a "
        "robot serves one session at a time. Needs an identity from `rdv register`.",
    )
    parser.add_argument("--role", choices=("robot", "teleop"), required=True,
                        help="which side this station is (no default: give it)")  # fmt: skip
    parser.add_argument(
        "--config-dir",
        default=None,
        help="identity and trusted keys (default: $RDV_CONFIG_DIR, else ~/.config/rdv)",
    )
    parser.add_argument(
        "--robot-type",
        default=None,
        help="device type announced in presence (default: sim_so101_follower for a robot, "
        "sim_so101_leader for a teleop)",
    )
    parser.add_argument(
        "--joints",
        default=",".join(SO101_KEYS),
        help="comma-separated joint keys of the arm, in LeRobot's order; a teleop pairs only "
        "with robots announcing the same (default: SO101's six)",
    )
    parser.add_argument(
        "--cameras",
        default=",".join(camera_names(cameras_from_env())),
        help=f"comma-separated camera names announced (default: the names in ${CAMERAS_ENV}, "
        "the station's camera settings, else none)",
    )
    parser.add_argument(
        "--peer", default=None, help="teleop: pair only with this robot id (default: any)"
    )
    parser.add_argument(
        "--presence-interval",
        type=float,
        default=1.0,
        help="seconds between presence refreshes; a peer silent for 3 of them is offline "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=Timeouts().paired_s,
        help="seconds a paired session may wait for the gateway to connect (default: %(default)s)",
    )
    parser.add_argument(
        "--mqtt-version",
        choices=("5", "3.1.1"),
        default=os.environ.get("RDV_MQTT_VERSION", "5"),
        help="MQTT protocol; 3.1.1 for brokers without v5 such as amqtt "
        "(default: $RDV_MQTT_VERSION or %(default)s)",
    )
    parser.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="trust an unknown station of this owner the first time it signs a message, and log "
        "its key fingerprint (default: off, only keys in trusted.json)",
    )
    parser.add_argument("--station", default=None, help="ignored: the id comes from the identity")
    add_station_flags(parser, station=False)
    return parser


class SessionManager:
    def __init__(self, args: argparse.Namespace, identity: Any, roster: TrustRoster, bus) -> None:
        self.args = args
        self.identity = identity
        self.owner = identity.owner
        self.me = identity.station_id
        self.role = args.role
        self.joints = tuple(key for key in args.joints.split(",") if key)
        self.cameras = tuple(name for name in args.cameras.split(",") if name)
        self.robot_type = args.robot_type or (
            "sim_so101_follower" if self.role == "robot" else "sim_so101_leader"
        )
        self.inbox = inbox_topic(self.owner, self.me)
        self.board = PresenceBoard(interval_s=args.presence_interval)
        self.machine = SessionMachine(
            self.me,
            self.role,
            self.joints,
            inbox=self.inbox,
            peer=args.peer,
            timeouts=Timeouts(paired_s=args.connect_timeout),
            rng=random.Random(),
        )
        self.verifier = Verifier(self.me, roster, trust_on_first_use=args.trust_on_first_use)
        self.events: queue.Queue = queue.Queue()
        self.link = MqttLink(
            client_id=self.me,
            url=identity.broker.url,
            username=identity.broker.username,
            password=identity.broker.password,
            ca_file=identity.broker.ca_file,
            protocol=args.mqtt_version,
            will_topic=presence_topic(self.owner, self.me),
            will_payload=self.presence().offline().encode(),
            subscriptions=[presence_topic(self.owner, "+"), self.inbox],
            events=self.events,
        )
        self.publisher = Publisher(bus, PROCESS)
        self.gateway = Subscriber(bus, ["session.status"])
        self.health = HealthBeat(self.publisher, self.me, PROCESS)
        self.next_presence = 0.0
        self.connect_event: dict[str, Any] | None = None
        self.peer_signals: list[dict[str, Any]] = []  # the peer's SDP for the current session
        self.next_connect_repeat = 0.0
        self._set_state_gauge()
        # Every outcome exported at 0: a series born at 1 hides its first session from rate().
        for outcome in OUTCOMES:
            if outcome != "rejected":  # refusals are not sessions (not counted here)
                metrics.SESSIONS.labels(outcome=outcome)

    def presence(self) -> Presence:
        return Presence(
            status="online",
            role=self.role,
            robot_type=self.robot_type,
            joints=self.joints,
            cameras=self.cameras,
            busy=self.machine.busy,
            # A teleop that is only asking holds no session yet, whatever id its request has.
            session=self.machine.session if self.machine.busy else None,
            version=__version__,
            pubkey=self.identity.public_key_b64,
            ts=time.time(),
        )

    def run(self, stop: threading.Event) -> None:
        log.info("station %s (%s) of owner %s; broker %s", self.me, self.role, self.owner,
                 self.identity.broker.url)  # fmt: skip
        self.link.start()
        try:
            while not stop.is_set():
                received = self.gateway.recv(timeout_ms=20)
                now = time.monotonic()
                if received is not None and isinstance(received.frame, MessageFrame):
                    self.apply(self.machine.on_gateway(received.frame.fields, now))
                while True:
                    try:
                        event = self.events.get_nowait()
                    except queue.Empty:
                        break
                    self.handle(event, time.monotonic())
                now = time.monotonic()
                self.apply(self.machine.on_tick(now, self.board))
                self.repeat_connect(now)
                if now >= self.next_presence:
                    self.publish_presence()
                    self.export_board(now)
                self.health.maybe_send(
                    state=self.machine.state, session=self.machine.session, peer=self.machine.peer
                )
        finally:
            self.apply(self.machine.shutdown(time.monotonic()))
            self.link.stop(presence_topic(self.owner, self.me), self.presence().offline().encode())
            self.gateway.close()
            self.publisher.close()

    def handle(self, event: object, now: float) -> None:
        if isinstance(event, Connected):
            self.publish_presence()
        elif isinstance(event, Disconnected):
            log.warning("broker connection lost (%s); paho reconnects with backoff", event.reason)
        elif isinstance(event, Incoming):
            station = station_of(event.topic, self.owner, "presence")
            if station is not None:
                self.on_presence(station, event.payload, now)
            elif event.topic == self.inbox:
                self.on_inbox(event.payload, now)

    def on_presence(self, station: str, payload: bytes, now: float) -> None:
        if not payload:
            self.board.update(station, None, now)  # retained presence cleared
            return
        try:
            presence = decode_presence(payload)
        except PresenceError as exc:
            log.warning("ignoring bad presence of %s: %s", station, exc)
            return
        before = self.board.stations.get(station)
        was_free = before is not None and before.presence.status == "online" and not (
            before.presence.busy)  # fmt: skip
        self.board.update(station, presence, now)
        free = presence.role == "robot" and presence.status == "online" and not presence.busy
        if free and not was_free:
            self.machine.robot_became_free(presence)

    def on_inbox(self, payload: bytes, now: float) -> None:
        try:
            envelope = self.verifier.verify(payload, presented_key_b64=self.presented_key(payload))
        except SignatureRejected:
            return  # counted and logged by the verifier
        self.apply(
            self.machine.on_message(envelope.kind, envelope.sender, envelope.body, now, self.board)
        )

    def presented_key(self, payload: bytes) -> str | None:
        """The key a sender announces in its presence: only used for trust on first use."""
        try:
            sender = json.loads(payload).get("from")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None
        sighting = self.board.stations.get(sender) if isinstance(sender, str) else None
        return None if sighting is None else sighting.presence.pubkey

    def apply(self, actions: Actions) -> None:
        for send in actions.sends:
            payload = sign_envelope(self.identity, send.kind, send.to, send.body)
            corr = send.body.get("corr")
            self.link.publish(
                inbox_topic(self.owner, send.to),
                payload,
                response_topic=self.inbox if send.kind == "session.request" else None,
                correlation=corr if isinstance(corr, str) else None,
                expiry_s=10,
            )
        for event in actions.bus:
            self.send_control(event)
            if event.get("event") == "connect":
                self.connect_event = event
                self.peer_signals = []
            elif event.get("event") == "signal":
                # Kept to be said again with `connect`: a gateway that joined the bus late
                # (restarted, or slower than a fast pairing) must not miss the peer's offer.
                self.peer_signals.append(event)
        if actions.outcome is not None and actions.outcome != "rejected":
            metrics.SESSIONS.labels(outcome=actions.outcome).inc()
        if actions.presence_changed:
            self.publish_presence()
            self._set_state_gauge()

    def send_control(self, event: dict[str, Any]) -> None:
        frame = MessageFrame(self.publisher.next_seq(), clock.now_ns(), self.me, event)
        self.publisher.send("session.control", frame)

    def repeat_connect(self, now: float) -> None:
        """While paired, say `connect` (and the peer's signals) again every CONNECT_REPEAT_S:
        a gateway that (re)started after the first one, or subscribed after a fast pairing, must
        not wait out its connect time-out. The gateway ignores repeats it has already acted on."""
        if self.machine.state != "paired" or self.connect_event is None:
            return
        if self.connect_event.get("session") != self.machine.session:
            return
        if now >= self.next_connect_repeat:
            self.send_control(self.connect_event)
            for signal_event in self.peer_signals:
                if signal_event.get("session") == self.machine.session:
                    self.send_control(signal_event)
            self.next_connect_repeat = now + CONNECT_REPEAT_S

    def publish_presence(self) -> None:
        self.link.publish(
            presence_topic(self.owner, self.me), self.presence().encode(), retain=True
        )
        self.next_presence = time.monotonic() + self.args.presence_interval

    def export_board(self, now: float) -> None:
        counts: dict[tuple[str, str], int] = {}
        for station, sighting in self.board.stations.items():
            key = (sighting.presence.role, self.board.status(station, now))
            counts[key] = counts.get(key, 0) + 1
        for role in ("robot", "teleop"):
            for status in ("online", "offline", "stale"):
                metrics.PRESENCE_STATIONS.labels(role=role, status=status).set(
                    counts.get((role, status), 0)
                )

    def _set_state_gauge(self) -> None:
        for state in STATES:
            metrics.SESSION_STATE.labels(state=state).set(1 if state == self.machine.state else 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level, PROCESS)
    try:
        directory = config_dir(args.config_dir)
        identity = load_identity(directory)
        roster = TrustRoster.load(directory)
        bus = load_bus_map(args.bus_config, run_dir=args.run_dir)
    except (IdentityError, BusConfigError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    metrics.serve_metrics(args.metrics_port or bus.metrics_port(PROCESS))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        manager = SessionManager(args, identity, roster, bus)
    except BusConfigError as exc:  # the bus endpoint cannot be bound (run dir, port)
        log.error("%s", exc)
        return EXIT_CONFIG
    manager.run(stop)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(exits.final(main()))
