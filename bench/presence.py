"""Presence and pairing at fleet scale on one real Mosquitto: `python -m bench.presence`.

DESIGN.md's target: "presence: 1,000 stations on one broker, all discovered <= 2 s".

discover_ms
    `--stations` simulated stations (half robots, half teleops, SO101 joints) run as MqttLink
    clients, several hundred per worker process. Each has its station id as client id, a
    retained offline Last Will, publishes its retained online `Presence(...).encode()` at QoS 1
    and refreshes it every `--interval` s. Once every station's first presence is acknowledged
    by the broker and the fleet has run a while, a fresh `services.fleet.FleetWatcher` (the
    code of `rdv fleet`: a read-only client subscribing to `rdv/v1/<owner>/+/presence` from its
    on_connect, and a PresenceBoard) is started. discover_ms runs from the call to its
    `start()` (TCP connect, CONNECT, SUBSCRIBE) until its board first holds all N stations
    `online`: discovery of an existing fleet, from the retained messages. Median of
    `--repeat` watchers, each new; the board is checked every ~5 ms.
announce_ms (extra)
    A watcher is subscribed first, then all stations connect at once (t0 = the go signal):
    until its board holds all N online. This is mostly how fast N clients can connect.
pair_ms
    `--couples` robot/teleop pairs, each station with a real identity (`identity.register` in
    a temp dir) and a trusted.json listing every other station (the owner trusts all of its
    stations), running the REAL session manager: `services.session_manager.__main__
    .SessionManager` with its MqttLink, SessionMachine, Verifier and sign_envelope; only the
    local ZeroMQ bus is stubbed (nothing listens to session.control here) and paho's network
    thread is replaced by the worker's epoll loop. Each station handles its MQTT events and
    ticks its machine every `--poll-ms` (20 ms: SessionManager.run() waits up to 20 ms on the
    gateway's bus socket before draining MQTT events), as the real loop does. Once every
    station and a watcher (FleetWatcher) see all 2M stations online, the machines start
    ticking (t0); pair_ms runs until the watcher's board shows every robot busy with M
    distinct session ids, each the session of exactly one busy teleop. The machines are then
    frozen and checked: every teleop `paired` with a distinct robot that is `paired` with it,
    sessions equal to what the presences show.
    Presence fan-out: 2M stations each subscribing to the wildcard at 1 Hz is (2M)^2 msg/s
    (40k/s for 100 couples), beyond one Mosquitto and Python subscribers on 2 cores. By default
    (`--pair-boards worker`) each worker process keeps ONE presence subscription and
    PresenceBoard that all of its stations read (fan-out: workers x 2M msg/s); each station
    still has its own client, will, inbox subscription and presence. `--pair-boards station`
    gives every station its own wildcard subscription and board, with a presence interval of
    5 s unless `--pair-interval` says otherwise.
    Sockets are as MqttLink sets them: TCP_NODELAY on when the socket opens (paho itself does not
    set it, and without it a small publish following the PUBACK of a message just received waits
    for the broker's delayed ACK, ~40 ms on Linux: 100 couples paired in ~580 ms instead of
    ~210 ms). `--tcp-nodelay` also sets it here, after connect; for MqttLink's sockets it is a
    no-op.

Everything runs on 127.0.0.1: a Mosquitto of its own (tests.support.broker, shipped limits),
worker processes forked here and stopped by pid, identities in a temp dir removed at the end.
Exit status: 0 all figures measured and checked, 1 a time-out or a failed check, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY

import services.session_manager.__main__ as session_main
from bench import common
from services import __version__
from services.fleet import FleetWatcher
from services.session_manager.identity import (
    BrokerConfig,
    TrustRoster,
    encode_public_key,
    load_identity,
    register,
    write_private_json,
)
from services.session_manager.mqtt_link import (
    Connected,
    Disconnected,
    Incoming,
    MqttLink,
    broker_address,
)
from services.session_manager.presence import (
    CLOCK_SKEW_S,
    Presence,
    PresenceBoard,
    presence_topic,
)
from services.session_manager.signing import REJECT_REASONS
from services.sim import SO101_KEYS
from tests.support.broker import Mosquitto

# DESIGN.md, "Performance targets": presence, 1,000 stations on one broker, all discovered.
TARGET_DISCOVER_MS = 2000
# DESIGN.md has no pairing target; the nearest is "session setup, both stations online ->
# first command applied <= 1 s", which also includes WebRTC.
RELATED_SESSION_SETUP_MS = 1000
FLEET_OWNER = "bench-fleet"
PAIR_OWNER = "bench-pair"
ROBOT_TYPES = {"robot": "sim_so101_follower", "teleop": "sim_so101_leader"}
KEEPALIVE_S = 10  # MqttLink's default
CLEANUP_RESERVE_S = 12.0  # of --budget, kept for stopping workers and the broker
CHECK_EVERY_S = 0.005  # how often a watcher's board is checked


class BenchError(RuntimeError):
    """The run cannot give a figure (a worker failed, a check failed)."""


class BenchTimeout(BenchError):
    """Something did not happen in time."""


# --- many paho clients on one thread ---------------------------------------------------------


class EventBuffer(collections.deque):
    """Stands in for MqttLink's queue.Queue (it only calls .put) on a single-threaded loop."""

    put = collections.deque.append


class Pump:
    """Drives many paho clients from one thread: their sockets in one epoll, no paho thread.

    paho's external-loop API: loop_read() when a socket is readable, loop_write() while a client
    has bytes to send, loop_misc() for keepalive. publish() outside paho's callbacks writes at
    once; what is left (queued inside callbacks, such as SUBSCRIBE in on_connect and PUBACKs,
    or a full socket buffer) goes out on flush() of the clients touched, and on EVENT_WRITE.
    """

    def __init__(self, nodelay: bool = False) -> None:
        self.nodelay = nodelay
        self.selector = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self._writing: dict[int, mqtt.Client] = {}  # registered for EVENT_WRITE too

    def connect(self, client: mqtt.Client, host: str, port: int) -> None:
        client.on_socket_close = self._on_socket_close
        client.connect(host, port, keepalive=KEEPALIVE_S)  # TCP connect, then CONNECT is sent
        sock = client.socket()
        if self.nodelay:  # MqttLink already sets it on socket open; kept to compare runs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.selector.register(sock, selectors.EVENT_READ, client)
        self.clients.append(client)

    def _on_socket_close(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._writing.pop(id(client), None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def poll(self, timeout_s: float) -> None:
        touched = []
        for key, mask in self.selector.select(max(0.0, timeout_s)):
            client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            touched.append(client)
        self.flush(touched)

    def flush(self, clients: Iterable[mqtt.Client] | None = None) -> None:
        """Write what the clients (default: all) have queued; watch for writability if stuck."""
        pending = list(self._writing.values())
        for client in [*(self.clients if clients is None else clients), *pending]:
            if client.socket() is not None and client.want_write():
                client.loop_write()
            sock = client.socket()
            if sock is None:
                continue
            wants = client.want_write()
            if wants != (id(client) in self._writing):
                mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if wants else 0)
                self.selector.modify(sock, mask, client)
                if wants:
                    self._writing[id(client)] = client
                else:
                    self._writing.pop(id(client), None)

    def misc(self) -> None:
        for client in self.clients:
            if client.socket() is not None:
                client.loop_misc()

    def close(self) -> None:
        self.selector.close()


def stop_links(pump: Pump, last: list[tuple[MqttLink, str, bytes]], timeout_s: float) -> int:
    """MqttLink.stop() for links driven by a Pump: the last retained message (offline
    presence) at QoS 1, waiting for its ack, then a clean disconnect. Returns unacked count."""
    infos = [
        link.client.publish(topic, payload, qos=1, retain=True)
        for link, topic, payload in last
        if link.client.is_connected()
    ]
    pump.flush()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not all(info.is_published() for info in infos):
        pump.poll(0.02)
    for link, _topic, _payload in last:
        link.client.disconnect()
    pump.flush()
    return sum(not info.is_published() for info in infos)


# --- worker processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    url: str
    owner: str
    interval_s: float
    parent_pid: int
    give_up_at: float  # monotonic (system-wide on Linux): a worker never outlives this
    poll_s: float = 0.0
    nodelay: bool = False
    shared_board: bool = True
    all_ids: tuple[str, ...] = ()


def _guard(cfg: WorkerConfig) -> None:
    if os.getppid() != cfg.parent_pid:
        raise SystemExit("the benchmark process is gone")
    if time.monotonic() > cfg.give_up_at:
        raise TimeoutError("worker ran past the benchmark's budget")


def _wait_event(event: Any, stop: Any, cfg: WorkerConfig) -> bool:
    """True when `event` is set, False when stop is set first."""
    while not event.wait(0.05):
        if stop.is_set():
            return False
        _guard(cfg)
    return True


def _worker_entry(
    body: Callable[..., None],
    index: int,
    part: list[Any],
    cfg: WorkerConfig,
    events: dict[str, Any],
    out: Any,
) -> None:
    # The main process stops workers itself (events, then by pid): Ctrl-C must not hit them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        body(index, part, cfg, events, out)
    except BaseException as exc:
        detail = "".join(traceback.format_exception(exc, limit=-6)).strip()
        out.put(("error", index, f"{type(exc).__name__}: {exc}\n{detail}"))
        out.close()
        out.join_thread()
        os._exit(1)
    out.close()
    out.join_thread()


@dataclass
class FleetStation:
    """A presence-only station: the session manager's MqttLink and presence, no machine."""

    sid: str
    link: MqttLink
    events: EventBuffer
    presence: Presence
    topic: str
    next_presence: float = float("inf")
    first: Any = None  # MQTTMessageInfo of the first online presence
    connected: bool = False


def _fleet_station(sid: str, cfg: WorkerConfig) -> FleetStation:
    role = "robot" if sid.startswith("robot") else "teleop"
    presence = Presence(
        status="online",
        role=role,
        robot_type=ROBOT_TYPES[role],
        joints=tuple(SO101_KEYS),
        cameras=("front",) if role == "robot" else (),
        busy=False,
        session=None,
        version=__version__,
        pubkey=encode_public_key(Ed25519PrivateKey.generate().public_key()),
        ts=time.time(),
    )
    topic = presence_topic(cfg.owner, sid)
    events = EventBuffer()
    link = MqttLink(
        client_id=sid,  # fixed: a reconnect replaces the old session, no ghost will
        url=cfg.url,
        username=None,
        password=None,
        ca_file=None,
        protocol="5",
        will_topic=topic,
        will_payload=presence.offline().encode(),
        subscriptions=[],
        events=events,
    )
    return FleetStation(sid, link, events, presence, topic)


def _fleet_worker(
    index: int, ids: list[str], cfg: WorkerConfig, ev: dict[str, Any], out: Any
) -> None:
    stations = [_fleet_station(sid, cfg) for sid in ids]
    out.put(("ready", index, len(stations)))
    if not _wait_event(ev["go"], ev["stop"], cfg):
        return
    pump = Pump(cfg.nodelay)
    began = time.monotonic()
    slowest = 0.0
    for station in stations:
        before = time.monotonic()
        pump.connect(station.link.client, station.link.host, station.link.port)
        slowest = max(slowest, time.monotonic() - before)
    connects = {"connect_ms": (time.monotonic() - began) * 1000, "slowest_ms": slowest * 1000}
    publishes = 0
    reported = False
    next_misc = time.monotonic() + 1.0
    while not ev["stop"].is_set():
        now = time.monotonic()
        wake = min(now + 0.05, min(station.next_presence for station in stations))
        pump.poll(wake - now)
        now = time.monotonic()
        touched = []
        for station in stations:
            if station.events:
                touched.append(station.link.client)
            while station.events:
                event = station.events.popleft()
                if isinstance(event, Connected):
                    station.connected = True
                    station.next_presence = 0.0  # announce at once, as SessionManager.handle
                elif isinstance(event, Disconnected):
                    raise BenchError(f"station {station.sid} lost the broker: {event.reason}")
            if station.connected and now >= station.next_presence:
                document = replace(station.presence, ts=time.time())
                info = station.link.publish(station.topic, document.encode(), retain=True)
                station.first = station.first or info
                station.next_presence = time.monotonic() + cfg.interval_s
                publishes += 1
                touched.append(station.link.client)
        pump.flush(touched)
        if not reported and all(s.first is not None and s.first.is_published() for s in stations):
            out.put(("online", index, {"t": time.monotonic(), **connects}))
            reported = True
        if now >= next_misc:
            pump.misc()
            _guard(cfg)
            next_misc = now + 1.0
    last = [
        (s.link, s.topic, replace(s.presence, ts=time.time()).offline().encode()) for s in stations
    ]
    unacked = stop_links(pump, last, timeout_s=3.0)
    pump.close()
    out.put(("stopped", index, {"publishes": publishes, "offline_unacked": unacked}))


class _BusPublisher:
    """The station's bus publisher, stubbed: nothing listens to session.control here."""

    def __init__(self, _bus: Any, _process: str) -> None:
        self.frames = 0
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq - 1

    def send(self, _topic: str, _frame: Any) -> None:
        self.frames += 1

    def close(self) -> None:
        pass


class _NoGateway:
    """The gateway's session.status subscription, stubbed: no gateway in this benchmark."""

    def __init__(self, _bus: Any, _topics: list[str]) -> None:
        pass

    def recv(self, timeout_ms: float = 0.0) -> None:
        return None

    def close(self) -> None:
        pass


class BenchStation(session_main.SessionManager):
    """The real SessionManager, counting what it does; its run() loop is the worker's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.last_state = self.machine.state
        self.paired_at: float | None = None
        self.poll_at = 0.0
        self.subacks = 0
        self.suback_failures: list[str] = []

    def apply(self, actions: Any) -> None:
        self.sent.update(send.kind for send in actions.sends)
        if actions.outcome is not None:
            self.outcomes[actions.outcome] += 1
        super().apply(actions)
        state = self.machine.state
        if state != self.last_state:
            if state == "paired":
                self.paired_at = time.monotonic()
            self.last_state = state

    def on_suback(
        self, _client: Any, _userdata: Any, _mid: int, codes: list[Any], _properties: Any = None
    ) -> None:
        self.subacks += 1
        self.suback_failures += [str(code) for code in codes if code.is_failure]

    def step(self, ticking: bool) -> None:
        """One pass of SessionManager.run()'s loop, after its 20 ms wait on the bus."""
        while self.events:
            event = self.events.popleft()
            if isinstance(event, Disconnected):
                raise BenchError(f"station {self.me} lost the broker: {event.reason}")
            self.handle(event, time.monotonic())
        now = time.monotonic()
        if ticking:
            self.apply(self.machine.on_tick(now, self.board))
        if now >= self.next_presence:
            self.publish_presence()
            self.export_board(now)
        self.health.maybe_send(
            state=self.machine.state, session=self.machine.session, peer=self.machine.peer
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.me,
            "role": self.role,
            "state": self.machine.state,
            "session": self.machine.session,
            "peer": self.machine.peer,
            "paired_at": self.paired_at,
            "sent": dict(self.sent),
            "outcomes": dict(self.outcomes),
        }


class BoardFeeder:
    """One presence subscription for all the stations of a worker (--pair-boards worker)."""

    def __init__(self, name: str, owner: str, url: str) -> None:
        self.host, self.port, _tls = broker_address(url)
        self.topic = presence_topic(owner, "+")
        self.events = EventBuffer()
        self.subscribed = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = lambda _c, _u, _f, reason, _p=None: self.events.put(
            Disconnected(str(reason))
        )
        client.on_message = lambda _c, _u, message: self.events.put(
            Incoming(message.topic, message.payload, message.retain)
        )
        self.client = client

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None
    ) -> None:
        if reason.is_failure:
            self.events.put(Disconnected(f"refused: {reason}"))
            return
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any = None) -> None:
        if any(code.is_failure for code in codes):
            self.events.put(Disconnected(f"subscription refused: {codes}"))
        self.subscribed = True


def _board_complete(board: PresenceBoard, ids: Iterable[str], now: float) -> bool:
    ids = tuple(ids)
    if len(board.stations) < len(ids):
        return False
    online = board.online(now)
    return all(sid in online for sid in ids)


def _pair_worker(
    index: int, specs: list[tuple[str, str, str]], cfg: WorkerConfig, ev: dict[str, Any], out: Any
) -> None:
    # This process only: the session manager's bus is stubbed (no gateway, no bus sockets).
    session_main.Publisher = _BusPublisher  # type: ignore[misc]
    session_main.Subscriber = _NoGateway  # type: ignore[misc]
    shared = PresenceBoard(interval_s=cfg.interval_s) if cfg.shared_board else None
    stations: list[BenchStation] = []
    for _sid, role, config_dir in specs:
        args = session_main.build_parser().parse_args(
            [
                "--role",
                role,
                "--config-dir",
                config_dir,
                "--mqtt-version",
                "5",
                "--presence-interval",
                str(cfg.interval_s),
            ]
        )
        directory = Path(config_dir)
        station = BenchStation(args, load_identity(directory), TrustRoster.load(directory), None)
        station.events = station.link._events = EventBuffer()
        if shared is not None:
            station.board = shared
            station.link._subscriptions = [station.inbox]  # presence comes via the feeder
        station.link.client.on_subscribe = station.on_suback
        station.poll_at = time.monotonic() + random.uniform(0.0, cfg.poll_s)  # own loop phase
        stations.append(station)
    pump = Pump(cfg.nodelay)
    feeder = None
    if shared is not None:
        feeder = BoardFeeder(f"bench-board-{index}", cfg.owner, cfg.url)
        pump.connect(feeder.client, feeder.host, feeder.port)
    for station in stations:
        pump.connect(station.link.client, station.link.host, station.link.port)

    ticking = frozen = discovered = False
    next_check = next_misc = time.monotonic()
    while not ev["stop"].is_set():
        now = time.monotonic()
        if frozen:
            wake = now + 0.05
        elif cfg.poll_s > 0:
            wake = min(now + 0.05, min(station.poll_at for station in stations))
        else:
            wake = now + 0.02
        pump.poll(wake - now)
        if not frozen:
            ticking = ticking or ev["go"].is_set()
            if feeder is not None:
                while feeder.events:
                    event = feeder.events.popleft()
                    if isinstance(event, Disconnected):
                        raise BenchError(f"presence feeder {index}: {event.reason}")
                    stations[0].handle(event, time.monotonic())  # all share its board
            now = time.monotonic()
            stepped = []
            for station in stations:
                if now >= station.poll_at:
                    station.step(ticking)
                    station.poll_at = now + cfg.poll_s
                    stepped.append(station.link.client)
            pump.flush(stepped)
        now = time.monotonic()
        if not discovered and now >= next_check:
            next_check = now + 0.02
            boards = [shared] if shared is not None else [s.board for s in stations]
            subscribed = all(s.subacks >= len(s.link._subscriptions) for s in stations) and (
                feeder is None or feeder.subscribed
            )
            failures = [f for s in stations for f in s.suback_failures]
            if failures:
                raise BenchError(f"subscriptions refused: {failures[:3]}")
            if subscribed and all(_board_complete(b, cfg.all_ids, now) for b in boards):
                discovered = True
                out.put(("discovered", index, now))
        if not frozen and ev["freeze"].is_set():
            frozen = True
            rejected = {
                reason: REGISTRY.get_sample_value(
                    "rdv_signaling_rejected_total", {"reason": reason}
                )
                or 0.0
                for reason in REJECT_REASONS
            }
            bus_events = sum(s.publisher.frames for s in stations)
            snapshot = [s.snapshot() for s in stations]
            out.put(
                (
                    "snapshot",
                    index,
                    {"stations": snapshot, "rejected": rejected, "bus_events": bus_events},
                )
            )
        if now >= next_misc:
            pump.misc()
            _guard(cfg)
            next_misc = now + 1.0
    # SessionManager.run()'s finally: end sessions (tell the peer), offline presence, disconnect.
    for station in stations:
        station.apply(station.machine.shutdown(time.monotonic()))
    last = [
        (s.link, presence_topic(s.owner, s.me), s.presence().offline().encode()) for s in stations
    ]
    unacked = stop_links(pump, last, timeout_s=3.0)
    if feeder is not None:
        feeder.client.disconnect()
        pump.flush()
    pump.close()
    out.put(("stopped", index, {"offline_unacked": unacked}))


# --- the main process ------------------------------------------------------------------------


class Workers:
    """The worker processes of one phase, the events that steer them and what they report."""

    def __init__(
        self,
        ctx: Any,
        body: Callable[..., None],
        parts: list[list[Any]],
        cfg: WorkerConfig,
        names: tuple[str, ...],
    ) -> None:
        self.out = ctx.Queue()
        self.events = {name: ctx.Event() for name in (*names, "stop")}
        self.processes = [
            ctx.Process(
                target=_worker_entry,
                args=(body, index, part, cfg, self.events, self.out),
                name=f"bench-{body.__name__.strip('_')}-{index}",
                daemon=True,
            )
            for index, part in enumerate(parts)
        ]
        self.reports: dict[str, dict[int, Any]] = collections.defaultdict(dict)
        self.closed = False

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def drain(self, timeout_s: float = 0.0) -> None:
        """Collect reports; raise BenchError when a worker failed or died."""
        block = timeout_s > 0
        while True:
            try:
                kind, index, data = self.out.get(block, timeout_s if block else None)
            except (queue.Empty, ValueError, OSError):  # nothing more, or closed
                break
            if kind == "error":
                raise BenchError(f"worker {index} failed: {data}")
            self.reports[kind][index] = data
            block = False
        for index, process in enumerate(self.processes):
            if process.exitcode not in (None, 0) and index not in self.reports["stopped"]:
                raise BenchError(f"worker {index} (pid {process.pid}) died: {process.exitcode}")

    def wait_all(self, kind: str, deadline: float, what: str) -> list[Any]:
        while len(self.reports[kind]) < len(self.processes):
            left = deadline - time.monotonic()
            if left <= 0:
                got = len(self.reports[kind])
                raise BenchTimeout(f"{what}: {got} of {len(self.processes)} workers in time")
            self.drain(min(0.05, left))
        return [self.reports[kind][index] for index in range(len(self.processes))]

    def set(self, name: str) -> None:
        self.events[name].set()

    def close(self, grace_s: float = 6.0) -> None:
        """Stop every worker: the stop event, then SIGTERM and SIGKILL by pid if need be."""
        if self.closed:
            return
        self.closed = True
        self.events["stop"].set()
        end = time.monotonic() + grace_s
        for process in self.processes:
            if process.pid is not None:
                process.join(max(0.0, end - time.monotonic()))
        with contextlib.suppress(BenchError):
            self.drain()
        for process in self.processes:
            if process.pid is not None and process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.pid is not None and process.is_alive():
                process.kill()
                process.join(2.0)
        self.out.cancel_join_thread()
        self.out.close()


class Progress:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:5.1f} s] {message}", file=sys.stderr, flush=True)


def make_watcher(url: str, owner: str, interval_s: float) -> FleetWatcher:
    """`rdv fleet`'s watcher, with the identity fields it reads."""
    identity = SimpleNamespace(owner=owner, broker=BrokerConfig(url=url))
    return FleetWatcher(identity, mqtt_version="5", interval_s=interval_s, skew_s=CLOCK_SKEW_S)


def wait_board(
    watcher: FleetWatcher,
    done: Callable[[float], bool],
    deadline: float,
    workers: Workers,
    what: Callable[[], str],
) -> float:
    """Pump the watcher until done(now); the monotonic time it first was."""
    while True:
        watcher.pump(CHECK_EVERY_S)
        now = time.monotonic()
        if done(now):
            return now
        if now > deadline:
            raise BenchTimeout(what())
        workers.drain()


def online_count(board: PresenceBoard, ids: Iterable[str]) -> int:
    online = board.online(time.monotonic())
    return sum(sid in online for sid in ids)


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [chunk for chunk in (items[i::parts] for i in range(parts)) if chunk]


@dataclass
class Report:
    args: argparse.Namespace
    machine: dict[str, Any] = field(default_factory=dict)
    rdv: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def run_fleet(
    args: argparse.Namespace,
    broker: Mosquitto,
    ctx: Any,
    deadline: float,
    stack: contextlib.ExitStack,
    log: Progress,
    report: Report,
    _root: Path,
) -> None:
    n = args.stations
    robots = [f"robot-{i:04d}" for i in range((n + 1) // 2)]
    teleops = [f"teleop-{i:04d}" for i in range(n // 2)]
    ids = [sid for pair in zip(robots, [*teleops, None], strict=False) for sid in pair if sid]
    cfg = WorkerConfig(
        url=broker.url,
        owner=FLEET_OWNER,
        interval_s=args.interval,
        nodelay=args.tcp_nodelay,
        parent_pid=os.getpid(),
        give_up_at=deadline + CLEANUP_RESERVE_S,
    )
    workers = Workers(ctx, _fleet_worker, split(ids, args.processes), cfg, ("go",))
    stack.callback(workers.close)
    workers.start()
    workers.wait_all("ready", min(deadline, time.monotonic() + 20), "stations built")
    log(f"fleet: {n} stations built in {len(workers.processes)} worker processes")

    details = report.details.setdefault("discover", {})
    expected = set(ids)

    def complete(board: PresenceBoard) -> Callable[[float], bool]:
        return lambda now: _board_complete(board, expected, now)

    # announce (extra): the watcher is up, then every station connects and announces itself.
    watcher = make_watcher(broker.url, FLEET_OWNER, args.interval)
    stack.callback(watcher.stop)
    watcher.start()
    time.sleep(0.2)  # FleetWatcher.start() returns before the SUBACK
    t0 = time.monotonic()
    workers.set("go")
    t1 = wait_board(
        watcher,
        complete(watcher.board),
        min(deadline, t0 + 20),
        workers,
        lambda: (
            f"announce: {online_count(watcher.board, ids)} of {n} online after "
            f"{time.monotonic() - t0:.1f} s"
        ),
    )
    acked = workers.wait_all("online", min(deadline, t0 + 20), "first presences acknowledged")
    watcher.stop()
    details["announce_ms"] = round((t1 - t0) * 1000, 1)
    details["announce_acked_ms"] = round((max(a["t"] for a in acked) - t0) * 1000, 1)
    details["announce_connect_ms"] = round(max(a["connect_ms"] for a in acked), 1)
    details["announce_slowest_connect_ms"] = round(max(a["slowest_ms"] for a in acked), 1)
    log(f"announce: {n} stations connected and seen online in {details['announce_ms']:.0f} ms")

    samples = []
    time.sleep(max(0.5, args.interval))  # the fleet runs: every station has refreshed once
    for attempt in range(args.repeat):
        watcher = make_watcher(broker.url, FLEET_OWNER, args.interval)
        stack.callback(watcher.stop)
        t0 = time.monotonic()
        watcher.start(timeout_s=5.0)
        t1 = wait_board(
            watcher,
            complete(watcher.board),
            min(deadline, t0 + 10),
            workers,
            lambda w=watcher, t0=t0: (
                f"discover: {online_count(w.board, ids)} of {n} online "
                f"after {time.monotonic() - t0:.1f} s"
            ),
        )
        watcher.stop()
        samples.append(round((t1 - t0) * 1000, 1))
        log(f"discover {attempt + 1}/{args.repeat}: all {n} online after {samples[-1]:.0f} ms")
        time.sleep(0.3)
    report.rdv["discover_ms"] = round(statistics.median(samples), 1)
    details["discover_samples_ms"] = samples
    workers.close()
    details["workers"] = len(workers.processes)
    stopped = workers.reports["stopped"].values()
    details["presence_publishes"] = sum(s["publishes"] for s in stopped)


def run_pairing(
    args: argparse.Namespace,
    broker: Mosquitto,
    ctx: Any,
    deadline: float,
    stack: contextlib.ExitStack,
    log: Progress,
    report: Report,
    root: Path,
) -> None:
    m = args.couples
    width = len(str(m - 1))
    robots = [f"robot-{i:0{width}d}" for i in range(m)]
    teleops = [f"teleop-{i:0{width}d}" for i in range(m)]
    details = report.details.setdefault("pair", {})
    details["boards"] = args.pair_boards
    details["presence_interval_s"] = args.pair_interval
    details["poll_ms"] = args.poll_ms

    started = time.monotonic()
    keys = {}
    for sid in robots + teleops:
        identity, _status = register(
            root / sid, owner=PAIR_OWNER, broker_url=broker.url, station_id=sid
        )
        keys[sid] = identity.public_key_b64
    for sid in keys:  # the owner trusts all of its stations: `rdv trust add` for each other one
        stations = {other: key for other, key in keys.items() if other != sid}
        write_private_json(root / sid / "trusted.json", {"version": 1, "stations": stations})
    details["identities_s"] = round(time.monotonic() - started, 2)
    log(f"pairing: {2 * m} identities registered and trusted in {details['identities_s']} s")

    specs = [
        spec
        for robot, teleop in zip(robots, teleops, strict=True)
        for spec in ((robot, "robot", str(root / robot)), (teleop, "teleop", str(root / teleop)))
    ]
    cfg = WorkerConfig(
        url=broker.url,
        owner=PAIR_OWNER,
        interval_s=args.pair_interval,
        parent_pid=os.getpid(),
        give_up_at=deadline + CLEANUP_RESERVE_S,
        poll_s=args.poll_ms / 1000.0,
        nodelay=args.tcp_nodelay,
        shared_board=args.pair_boards == "worker",
        all_ids=tuple(robots + teleops),
    )
    workers = Workers(ctx, _pair_worker, split(specs, args.processes), cfg, ("go", "freeze"))
    stack.callback(workers.close)
    started = time.monotonic()
    workers.start()
    workers.wait_all(
        "discovered", min(deadline, started + 30), "pairing stations online and discovered"
    )
    watcher = make_watcher(broker.url, PAIR_OWNER, args.pair_interval)
    stack.callback(watcher.stop)
    watcher.start()
    everyone = set(robots + teleops)
    wait_board(
        watcher,
        lambda now: _board_complete(watcher.board, everyone, now),
        min(deadline, time.monotonic() + 10),
        workers,
        lambda: f"watcher sees {online_count(watcher.board, everyone)} of {2 * m} stations",
    )
    details["online_s"] = round(time.monotonic() - started, 2)
    log(f"pairing: {2 * m} stations online and discovered by all in {details['online_s']} s")

    def paired(_now: float) -> bool:
        stations = watcher.board.stations
        sessions = {}
        for sid in everyone:
            sighting = stations.get(sid)
            if sighting is None or not sighting.presence.busy or not sighting.presence.session:
                return False
            sessions[sid] = sighting.presence.session
        robot_sessions = {sessions[r] for r in robots}
        return len(robot_sessions) == m and robot_sessions == {sessions[t] for t in teleops}

    t0 = time.monotonic()
    workers.set("go")
    try:
        t1 = wait_board(
            watcher,
            paired,
            min(deadline, t0 + 20),
            workers,
            lambda: (
                f"pairing: {busy_robots(watcher.board, robots)} of {m} robots busy after "
                f"{time.monotonic() - t0:.1f} s"
            ),
        )
    except BenchError:
        workers.set("freeze")  # what the machines did, for the report
        with contextlib.suppress(BenchError):
            summarize_pairing(details, workers.wait_all("snapshot", time.monotonic() + 3, ""))
        raise
    workers.set("freeze")
    snapshots = workers.wait_all("snapshot", time.monotonic() + 5, "machine states")
    summarize_pairing(details, snapshots)
    report.rdv["pair_ms"] = round((t1 - t0) * 1000, 1)
    teleop_times = [
        s["paired_at"]
        for w in snapshots
        for s in w["stations"]
        if s["role"] == "teleop" and s["paired_at"] is not None
    ]
    if len(teleop_times) == m:
        details["machines_paired_ms"] = round((max(teleop_times) - t0) * 1000, 1)
    problems = check_pairing(snapshots, watcher.board, robots, teleops)
    if problems:
        report.rdv["pair_ms"] = None
        shown = "; ".join(problems[:5])
        raise BenchError(f"pairing check failed ({len(problems)} problems): {shown}")
    log(f"pairing: all {m} teleops paired after {report.rdv['pair_ms']:.0f} ms")
    watcher.stop()
    workers.close()


def busy_robots(board: PresenceBoard, robots: list[str]) -> int:
    return sum(1 for r in robots if (s := board.stations.get(r)) is not None and s.presence.busy)


def summarize_pairing(details: dict[str, Any], snapshots: list[dict[str, Any]]) -> None:
    sent: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    rejected: collections.Counter[str] = collections.Counter()
    for worker in snapshots:
        for station in worker["stations"]:
            sent.update(station["sent"])
            outcomes.update(station["outcomes"])
        rejected.update({k: int(v) for k, v in worker["rejected"].items() if v})
    details["requests"] = sent.get("session.request", 0)
    details["accepts"] = sent.get("session.accept", 0)
    details["rejects"] = sent.get("session.reject", 0)
    details["outcomes"] = dict(outcomes)
    details["envelopes_refused"] = dict(rejected)
    details["bus_frames"] = sum(worker["bus_events"] for worker in snapshots)


def check_pairing(
    snapshots: list[dict[str, Any]], board: PresenceBoard, robots: list[str], teleops: list[str]
) -> list[str]:
    """Every teleop paired with a distinct robot paired with it; presences agree."""
    states = {s["id"]: s for worker in snapshots for s in worker["stations"]}
    robot_set = set(robots)
    taken: dict[str, str] = {}
    problems = []
    for teleop in teleops:
        mine = states.get(teleop)
        if mine is None or mine["state"] != "paired":
            problems.append(f"{teleop} is {mine and mine['state']}, not paired")
            continue
        robot, session = mine["peer"], mine["session"]
        if robot not in robot_set:
            problems.append(f"{teleop} paired with {robot}, not one of the robots")
            continue
        if robot in taken:
            problems.append(f"{teleop} and {taken[robot]} both paired with {robot}")
        taken[robot] = teleop
        theirs = states.get(robot)
        if theirs is None or (theirs["state"], theirs["peer"], theirs["session"]) != (
            "paired",
            teleop,
            session,
        ):
            problems.append(f"{robot} does not agree it is paired with {teleop}")
        for sid in (teleop, robot):
            sighting = board.stations.get(sid)
            if (
                sighting is None
                or not sighting.presence.busy
                or sighting.presence.session != session
            ):
                problems.append(f"presence of {sid} does not show session {session[:8]}")
    return problems


def machine_info(broker: Mosquitto | None) -> dict[str, Any]:
    """bench.common's machine print-out (cores, CPU, Python, library versions, load), with the
    version of the Mosquitto this run started."""
    mosquitto = None
    if broker is not None:
        found = re.search(r"mosquitto version (\S+)", broker.log_text(100_000))
        mosquitto = found.group(1) if found else None
    info = common.machine_info(mosquitto)
    info["paho_mqtt"] = paho.mqtt.__version__
    return info


def broker_drop_notices(broker: Mosquitto) -> int:
    """Mosquitto's "Outgoing messages are being dropped for client X" lines: a subscriber's
    queue went over max_queued_messages (shipped: 1000) and QoS 1 messages were thrown away."""
    return len(re.findall(r"messages are being dropped", broker.log_text(50_000_000)))


def render(report: Report) -> str:
    args, rdv, details, machine = report.args, report.rdv, report.details, report.machine

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f} ms"

    lines = [
        f"rdv presence benchmark: {args.stations} stations, {args.couples} couples, "
        f"{args.processes} worker processes, one Mosquitto on 127.0.0.1",
        common.machine_line(machine),
        "",
        f"{'figure':<36}{'measured':>12}   target (DESIGN.md)",
    ]
    if args.stations:
        d = details.get("discover", {})
        value = rdv.get("discover_ms")
        verdict = "" if value is None else ("met" if value <= TARGET_DISCOVER_MS else "MISSED")
        lines.append(
            f"{f'discover_ms ({args.stations} stations)':<36}{ms(value):>12}   "
            f"<= {TARGET_DISCOVER_MS:,.0f} ms  {verdict}"
        )
        if d.get("discover_samples_ms"):
            samples = " / ".join(f"{s:,.0f}" for s in d["discover_samples_ms"])
            lines.append(f"{'  each watcher (median above)':<36}{samples + ' ms':>12}")
        if "announce_ms" in d:
            lines.append(
                f"{'  announce_ms (extra, all connect)':<36}{ms(d['announce_ms']):>12}   "
                f"(stations' own acks: {ms(d.get('announce_acked_ms'))})"
            )
    if args.couples:
        p = details.get("pair", {})
        lines.append(
            f"{f'pair_ms ({args.couples} couples)':<36}{ms(rdv.get('pair_ms')):>12}   "
            f"none; nearest: session setup <= {RELATED_SESSION_SETUP_MS:,.0f} ms (incl. WebRTC)"
        )
        if "machines_paired_ms" in p:
            lines.append(f"{'  last teleop machine paired':<36}{ms(p['machines_paired_ms']):>12}")
        if "requests" in p:
            lines.append(
                f"{'  requests / accepts / rejects':<36}"
                f"{p['requests']} / {p['accepts']} / {p['rejects']}"
                f"   outcomes {p.get('outcomes') or {}}, "
                f"refused envelopes {p.get('envelopes_refused') or {}}"
            )
    notes = []
    if args.stations:
        notes.append(
            "discover_ms: FleetWatcher.start() (connect + subscribe) until its board holds all "
            f"{args.stations} stations online; they announced themselves before (retained presence)"
        )
    if args.couples:
        notes.append(
            f"pair_ms: all {2 * args.couples} stations online and discovered, machines start "
            "ticking, until every robot's presence is busy with a distinct session shared by "
            f"one teleop. Real SessionManager per station, {args.poll_ms:g} ms loop poll, one "
            f"presence board per {args.pair_boards}, presence every {args.pair_interval:g} s, "
            "TCP_NODELAY on (MqttLink sets it)."
        )
    if details.get("broker_drop_notices"):
        notes.append(
            f"broker log: {details['broker_drop_notices']} 'Outgoing messages are being dropped' "
            "notices (a subscriber went over max_queued_messages)"
        )
    lines.append("")
    lines += [textwrap.fill(note, 100, subsequent_indent="  ") for note in notes]
    lines += [f"ERROR: {error}" for error in report.errors]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.presence",
        description="Presence discovery and pairing at fleet scale on a real Mosquitto of its "
        "own (127.0.0.1), beside DESIGN.md's target (1,000 stations all discovered <= 2 s).",
    )
    parser.add_argument(
        "--stations",
        type=int,
        default=1000,
        help="simulated stations for discover_ms; 0 skips it (default: 1000)",
    )
    parser.add_argument(
        "--couples",
        type=int,
        default=100,
        help="robot/teleop pairs for pair_ms; 0 skips it (default: 100)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="worker processes that run the stations (default: 4)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object as the last line of stdout (table: stderr)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="fresh watchers timed for discover_ms; the median is reported (default: 3)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="presence refresh of the fleet stations, s (default: 1.0)",
    )
    parser.add_argument(
        "--pair-boards",
        choices=("worker", "station"),
        default="worker",
        help="pairing: one presence subscription and board per worker process "
        "(default), or one per station (fan-out grows as stations squared)",
    )
    parser.add_argument(
        "--pair-interval",
        type=float,
        default=None,
        help="presence refresh while pairing, s (default: 1.0; 5.0 with --pair-boards station)",
    )
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=20.0,
        help="each station handles MQTT events and ticks every this many ms, as "
        "SessionManager.run() does; 0 handles events as they arrive (default: 20)",
    )
    parser.add_argument(
        "--tcp-nodelay",
        action="store_true",
        help="also set TCP_NODELAY after connect (MqttLink already sets it when its socket "
        "opens, so this changes nothing for the stations; default: off)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds the whole run may take, cleanup included (default: 60)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pair_interval is None:
        args.pair_interval = 5.0 if args.pair_boards == "station" else 1.0
    if args.stations < 0 or args.couples < 0 or not (args.stations or args.couples):
        parser.error("--stations and --couples must be >= 0, and one of them > 0")
    if args.processes < 1 or args.repeat < 1 or args.interval <= 0 or args.pair_interval <= 0:
        parser.error("--processes and --repeat must be >= 1, intervals > 0")
    if args.poll_ms < 0 or args.budget < CLEANUP_RESERVE_S + 5:
        parser.error(f"--poll-ms must be >= 0 and --budget >= {CLEANUP_RESERVE_S + 5:g}")

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # even when started with SIGINT ignored (`cmd &`)
    log = Progress()
    deadline = log.start + args.budget - CLEANUP_RESERVE_S
    report = Report(args)
    ctx = mp.get_context("fork")  # workers inherit the imports; nothing threaded runs yet
    interrupted = False
    broker = Mosquitto()
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="rdv-bench-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        try:
            broker.start()
            stack.callback(broker.stop)
            report.machine = machine_info(broker)
            m = report.machine
            log(
                f"machine: {m['cores']} cores, Python {m['python']}, paho-mqtt "
                f"{m['paho_mqtt']}, Mosquitto {m['mosquitto']} on {broker.url}"
            )
            phases: list[tuple[str, Callable[..., None]]] = []
            if args.stations:
                phases.append(("discover_ms", run_fleet))
            if args.couples:
                phases.append(("pair_ms", run_pairing))
            for figure, phase in phases:
                report.rdv.setdefault(figure, None)
                try:
                    if time.monotonic() >= deadline:
                        raise BenchTimeout("not run: the --budget was used up")
                    with contextlib.ExitStack() as phase_stack:  # its workers and watchers
                        phase(args, broker, ctx, deadline, phase_stack, log, report, root)
                except (BenchError, ConnectionError, OSError) as exc:
                    kind = "timed out" if isinstance(exc, BenchTimeout) else "failed"
                    report.errors.append(f"{figure} {kind}: {exc}")
                    log(f"{figure} {kind}: {exc}")
            report.details["broker_drop_notices"] = broker_drop_notices(broker)
        except KeyboardInterrupt:
            interrupted = True
            report.errors.append("interrupted")
            log("interrupted: stopping workers and the broker")
        except Exception as exc:  # the broker did not start, a bug: still clean up, then say so
            report.errors.append(f"{type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        finally:
            log("stopping workers and the broker")
    if not report.machine:
        report.machine = machine_info(None)
    for figure in ("discover_ms", "pair_ms"):
        report.rdv.setdefault(figure, None)
    table = render(report)
    if args.json:
        print(table, file=sys.stderr)
        document = {
            "bench": "presence",
            "stations": args.stations,
            "couples": args.couples,
            "rdv": {k: report.rdv[k] for k in ("discover_ms", "pair_ms")},
            "target": {"discover_ms": TARGET_DISCOVER_MS},
            "machine": report.machine,
            "details": report.details,
            "ok": not report.errors,
            "errors": report.errors,
        }
        print(json.dumps(document), flush=True)
    else:
        print(table, flush=True)
    if interrupted:
        return 130
    return 0 if not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
