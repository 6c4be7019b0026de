"""ZeroMQ PUB/SUB helpers for the local bus: one bound PUB per process, SUBs connect to it.

Socket options are set before bind/connect (they are ignored after). Receiving never raises
on bad input: every invalid frame is dropped, counted in rdv_frames_dropped_total and logged
once per burst. A publisher never blocks: ZeroMQ drops at the high-water mark instead. A
publisher that cannot bind (run dir not writable, port taken) raises BusConfigError, which every
service treats as a configuration error (exit 78) rather than a crash to restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import zmq

from services import clock, metrics
from services.bus.config import BusConfigError, BusMap
from services.bus.frames import REASONS, Frame, FrameEncoder, FrameError, decode

log = logging.getLogger(__name__)
HARD_CEILING_FACTOR = 16
MAX_LOGGED = 40  # bytes of a bad topic worth quoting in a log line
MAX_LABELS_PER_PATTERN = 16  # cameras per station, far above any real rig


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    frame: Frame
    recv_ns: int  # wall clock at receipt, comparable with frame.t on one machine


class DropLog:
    """Logs the first bad frame of a burst, then one summary per window: never a log flood."""

    def __init__(self, window_s: float = 5.0, clock=time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._window_start: float | None = None
        self._suppressed = 0

    def drop(self, topic: str, error: FrameError) -> None:
        now = self._clock()
        if self._window_start is None or now - self._window_start >= self._window_s:
            if self._suppressed:
                log.warning("dropped %d more bad frames in the last burst", self._suppressed)
            log.warning("dropped bad frame on %s: %s", topic, error)
            self._window_start = now
            self._suppressed = 0
        else:
            self._suppressed += 1


class Publisher:
    """Binds this process's endpoint and sends frames; owns the per-publisher `seq` counter."""

    def __init__(
        self,
        bus: BusMap,
        process: str,
        *,
        context: zmq.Context | None = None,
        send_hwm: int | None = None,
    ) -> None:
        self.endpoint = bus.endpoint(process)
        if bus.transport == "ipc":
            try:
                bus.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BusConfigError(_cannot_bind(self.endpoint, exc.strerror, bus)) from exc
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, bus.send_hwm if send_hwm is None else send_hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)  # a failed bind must not leak the socket
            reason = zmq.strerror(exc.errno)  # exc.strerror repeats the address
            raise BusConfigError(_cannot_bind(self.endpoint, reason, bus)) from exc
        self._ipc_path, self._ipc_inode = None, None
        if bus.transport == "ipc":
            self._ipc_path = self.endpoint.removeprefix("ipc://")
            self._ipc_inode = os.stat(self._ipc_path).st_ino
        self._encoder = FrameEncoder()
        self._seq = 0

    def next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def send(self, topic: str, frame: Frame) -> None:
        self._socket.send_multipart(self._encoder.encode(topic, frame), copy=False)

    def close(self) -> None:
        self._socket.close(linger=0)
        # libzmq leaves ipc socket files behind; remove ours unless a restarted instance of
        # this process has already bound a new one at the same path.
        if self._ipc_path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self._ipc_path).st_ino == self._ipc_inode:
                    os.unlink(self._ipc_path)


def _cannot_bind(endpoint: str, reason: str | None, bus: BusMap) -> str:
    """One line that says what to fix: where the run dir is, or which variable moves ports."""
    if bus.transport == "ipc":
        fix = f"the run dir {bus.run_dir} must be a writable directory (RDV_RUN_DIR)"
    else:
        fix = "another process holds the port (RDV_PORT_OFFSET moves a station's ports)"
    return f"cannot bind the bus endpoint {endpoint}: {reason}; {fix}"


class Subscriber:
    """Connects to every publisher of the given topics and yields only valid frames."""

    def __init__(
        self,
        bus: BusMap,
        topics: Iterable[str],
        *,
        joint_count: int | None = None,
        context: zmq.Context | None = None,
        on_drop: Callable[[str, FrameError], None] | None = None,
        recv_hwm: int | None = None,
    ) -> None:
        self._bus = bus
        self._on_drop = on_drop
        self._topics = tuple(topics)
        if not self._topics:
            raise ValueError("a Subscriber needs at least one topic")
        self._labels: set[str] = set()  # concrete topics seen under pattern topics (video.*)
        self._joint_count = joint_count
        self._drop_log = DropLog()
        # Every (topic, reason) exported at 0: a series born at 1 hides the first bad frame
        # from rate()/increase(), so a dashboard would show nothing for a real drop.
        for topic in self._topics:
            for reason in REASONS:
                metrics.FRAMES_DROPPED.labels(stream=topic, reason=reason)
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, bus.recv_hwm if recv_hwm is None else recv_hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A hard memory guard only: libzmq drops the whole connection on a part above it, so
        # the per-topic caps are checked (and counted) in Python, well below this ceiling.
        largest = max(bus.max_bytes(topic) for topic in self._topics)
        self._socket.setsockopt(zmq.MAXMSGSIZE, HARD_CEILING_FACTOR * largest)
        publishers: list[str] = []
        for topic in self._topics:
            prefix = topic[:-1] if topic.endswith(".*") else topic
            self._socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())
            publishers += [p for p in bus.publishers_of(topic) if p not in publishers]
        for publisher in publishers:
            self._socket.connect(bus.endpoint(publisher))
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    def recv(self, timeout_ms: float = 0.0) -> Received | None:
        """Next valid frame within timeout_ms, or None. Bad frames are dropped on the way."""
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            remaining_ms = max(0.0, (deadline - time.monotonic()) * 1000.0)
            if not self._poller.poll(remaining_ms):
                return None
            received = self._accept(self._socket.recv_multipart(zmq.NOBLOCK))
            if received is not None:
                return received

    @property
    def fd(self) -> int:
        """A file descriptor an event loop can watch (edge-triggered: read until pending() is
        False after every wake-up, or wake-ups are lost)."""
        return self._socket.getsockopt(zmq.FD)

    def pending(self) -> bool:
        """A message (valid or not) is queued right now."""
        return bool(self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def drain(self, limit: int = 1000) -> list[Received]:
        """Every valid frame already queued, oldest first, at most `limit` raw messages read."""
        out = []
        for _ in range(limit):
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            received = self._accept(parts)
            if received is not None:
                out.append(received)
        return out

    def _accept(self, parts: list[bytes]) -> Received | None:
        recv_ns = clock.now_ns()
        topic = self._topic_of(parts[0])
        try:
            if topic is None:
                raise FrameError("topic", f"unexpected topic {parts[0][:MAX_LOGGED]!r}")
            spec = self._bus.topic(topic)
            frame = decode(
                parts,
                spec.schema,
                max_bytes=self._bus.max_bytes(topic),
                joint_count=self._joint_count if spec.schema in ("joints", "follower") else None,
            )
        except FrameError as error:
            # A pattern topic's drops are labelled by the pattern: whoever sends garbage must
            # not be able to mint new label values.
            stream = "unknown" if topic is None else self._bus.topic(topic).name
            metrics.FRAMES_DROPPED.labels(stream=stream, reason=error.reason).inc()
            self._drop_log.drop(stream, error)
            if self._on_drop is not None:
                self._on_drop(stream, error)
            return None
        label = self._label(topic, spec.name)
        metrics.FRAMES.labels(stream=label).inc()
        metrics.BUS_LATENCY.labels(topic=label).observe(max(0.0, (recv_ns - frame.t) / 1e9))
        return Received(topic, frame, recv_ns)

    def _label(self, topic: str, pattern: str) -> str:
        """Metric label of a valid frame: its topic, or the pattern once too many were seen."""
        if topic == pattern or topic in self._labels:
            return topic
        if len(self._labels) < MAX_LABELS_PER_PATTERN:
            self._labels.add(topic)
            return topic
        return pattern

    def _topic_of(self, raw: bytes) -> str | None:
        """The exact subscribed topic named by raw, or None (SUBSCRIBE matches prefixes only)."""
        try:
            topic = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        for wanted in self._topics:
            if wanted.endswith(".*"):
                prefix = wanted[:-1]
                if (
                    topic.startswith(prefix)
                    and len(prefix) < len(topic) <= 64
                    and topic.isprintable()
                ):
                    return topic
            elif topic == wanted:
                return topic
        return None

    def close(self) -> None:
        self._socket.close(linger=0)
