"""Pub/sub tests over real ZeroMQ sockets (services/bus/pubsub.py, services/bus/health.py).

Covers: Publisher/Subscriber round trips over ipc (under tmp_path) and tcp (127.0.0.1, free
port offset); exact-topic filtering; a flood of garbage interleaved with valid frames (every
valid frame arrives, no invalid one does, rdv_frames_dropped_total{stream,reason} and on_drop
count each drop); DropLog's once-per-burst logging; drain(limit); ipc socket file cleanup;
640x480 video frames; health beats. ZeroMQ's slow joiner is handled by publishing until the
subscriber hears something, bounded by a deadline, before any assertion.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from prometheus_client import REGISTRY

from services.bus import (
    BusConfigError,
    BusMap,
    FrameError,
    JointFrame,
    MessageFrame,
    Publisher,
    Received,
    Subscriber,
    VideoFrame,
    load_bus_map,
)
from services.bus.frames import REASONS, FrameEncoder
from services.bus.health import HealthBeat
from services.bus.pubsub import DropLog

DEADLINE_S = 10.0  # only to stop a hang; nothing here asserts on time
JOINTS = 6
PUBSUB_LOGGER = "services.bus.pubsub"


class Sockets:
    """A private zmq context whose publishers, subscribers and raw sockets close at teardown."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self._closers: list[Callable[[], None]] = []

    def publisher(self, bus: BusMap, process: str) -> Publisher:
        publisher = Publisher(bus, process, context=self.context)
        self._closers.append(publisher.close)
        return publisher

    def subscriber(self, bus: BusMap, topics: list[str], **kwargs: object) -> Subscriber:
        subscriber = Subscriber(bus, topics, context=self.context, **kwargs)  # type: ignore[arg-type]
        self._closers.append(subscriber.close)
        return subscriber

    def raw_pub(self, endpoint: str) -> zmq.Socket:
        """A bare PUB bound where a publisher would be: it sends whatever multipart we like."""
        sock = self.context.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        self._closers.append(lambda: sock.close(linger=0))
        if endpoint.startswith("ipc://"):
            Path(endpoint.removeprefix("ipc://")).parent.mkdir(parents=True, exist_ok=True)
        sock.bind(endpoint)
        return sock

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        # pyzmq tracks the sockets of a context; a socket still open here was leaked.
        leaked = [sock for sock in list(self.context._sockets) if not sock.closed]
        self.context.destroy(linger=0)
        assert not leaked, f"{len(leaked)} zmq socket(s) left open"


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    owned = Sockets()
    yield owned
    owned.close()


def ipc_bus(tmp_path: Path) -> BusMap:
    return load_bus_map(run_dir=tmp_path / "run", transport="ipc", port_offset=0, environ={})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tcp_bus(process: str) -> BusMap:
    """A tcp bus map whose port offset puts `process`'s bus port on a currently free port."""
    base = load_bus_map(transport="tcp", port_offset=0, environ={})
    for _ in range(50):
        offset = free_port() - base.process(process).bus_port
        if all(
            0 < spec.metrics_port + offset < 65536 and 0 < spec.bus_port + offset < 65536
            for spec in base.processes.values()
        ):
            return load_bus_map(transport="tcp", port_offset=offset, environ={})
    raise AssertionError("no usable port offset found")


@pytest.fixture(params=["ipc", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def make_bus(transport: str, tmp_path: Path, process: str) -> BusMap:
    return ipc_bus(tmp_path) if transport == "ipc" else tcp_bus(process)


def dropped(stream: str, reason: str) -> float:
    labels = {"stream": stream, "reason": reason}
    return REGISTRY.get_sample_value("rdv_frames_dropped_total", labels) or 0.0


def received_total(stream: str) -> float:
    return REGISTRY.get_sample_value("rdv_frames_total", {"stream": stream}) or 0.0


def joint(seq: int, src: str = "test", value: float = 0.0) -> JointFrame:
    return JointFrame(seq, time.time_ns(), src, tuple(value + i for i in range(JOINTS)))


def sync(send: Callable[[int], None], subscriber: Subscriber) -> None:
    """Beat ZeroMQ's slow joiner: send marker frames (send(n)) until one arrives, then read up
    to the last one sent, so the subscriber's queue is known to be empty of markers."""
    deadline = time.monotonic() + DEADLINE_S
    sent = 0
    while time.monotonic() < deadline:
        send(sent)
        sent += 1
        got = subscriber.recv(timeout_ms=20)
        if got is not None:
            break
    else:
        raise AssertionError("the subscriber never heard the publisher")
    last = sent - 1
    while got is None or got.frame.seq != last:
        assert time.monotonic() < deadline, "markers stopped arriving"
        got = subscriber.recv(timeout_ms=100)


def collect_until(subscriber: Subscriber, done: Callable[[Received], bool]) -> list[Received]:
    """Every valid frame received up to and including the first one for which done() holds."""
    out: list[Received] = []
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert time.monotonic() < deadline, f"end marker not received; got {len(out)} frames"
        got = subscriber.recv(timeout_ms=100)
        if got is not None:
            out.append(got)
            if done(got):
                return out


# --- round trips ----------------------------------------------------------------------------


def test_joint_frames_round_trip(transport: str, tmp_path: Path, sockets: Sockets) -> None:
    bus = make_bus(transport, tmp_path, "leader_arm")
    publisher = sockets.publisher(bus, "leader_arm")
    assert publisher.endpoint == bus.endpoint("leader_arm")
    subscriber = sockets.subscriber(bus, ["joints.leader"], joint_count=JOINTS)
    sync(lambda n: publisher.send("joints.leader", joint(n, src="sync")), subscriber)
    before = received_total("joints.leader")

    sent = [joint(publisher.next_seq(), value=10.0 * i) for i in range(20)]
    for frame in sent:
        publisher.send("joints.leader", frame)
    got = collect_until(subscriber, lambda r: r.frame == sent[-1])

    assert [r.frame for r in got] == sent
    assert all(r.topic == "joints.leader" for r in got)
    assert all(r.recv_ns >= r.frame.t for r in got)  # one machine, one wall clock
    assert [f.seq for f in sent] == list(range(20))  # next_seq counts from 0 per publisher
    assert received_total("joints.leader") - before == 20


def test_tcp_endpoint_is_loopback_only(sockets: Sockets) -> None:
    bus = tcp_bus("leader_arm")
    publisher = sockets.publisher(bus, "leader_arm")
    host = publisher.endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    assert host == "127.0.0.1"


def test_every_message_topic_round_trips(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    publisher = sockets.publisher(bus, "gateway")  # publishes both session topics and health
    subscriber = sockets.subscriber(bus, ["session.control", "session.status", "health"])
    sync(
        lambda n: publisher.send("health", MessageFrame(n, time.time_ns(), "s", {"sync": 1})),
        subscriber,
    )
    frames = {
        "session.control": MessageFrame(1, time.time_ns(), "viewer", {"cmd": "estop"}),
        "session.status": MessageFrame(2, time.time_ns(), "robot", {"state": "tracking"}),
        "health": MessageFrame(3, time.time_ns(), "robot", {"process": "gateway", "ok": True}),
    }
    for topic, frame in frames.items():
        publisher.send(topic, frame)
    got = collect_until(subscriber, lambda r: r.topic == "health")
    assert {r.topic: r.frame for r in got} == frames


def test_subscriber_hears_every_publisher_of_a_topic(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    gateway = sockets.publisher(bus, "gateway")
    local_link = sockets.publisher(bus, "local_link")
    subscriber = sockets.subscriber(bus, ["joints.command"], joint_count=JOINTS)
    sync(lambda n: gateway.send("joints.command", joint(n, src="gateway")), subscriber)
    sync(lambda n: local_link.send("joints.command", joint(n, src="local")), subscriber)
    gateway.send("joints.command", joint(1000, src="gateway"))
    local_link.send("joints.command", joint(2000, src="local"))
    got = collect_until(subscriber, lambda r: r.frame.seq in (1000, 2000))
    got += collect_until(subscriber, lambda r: r.frame.seq in (1000, 2000))
    assert {(r.frame.src, r.frame.seq) for r in got} >= {("gateway", 1000), ("local", 2000)}


def test_video_640x480_round_trip(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    publisher = sockets.publisher(bus, "camera")
    subscriber = sockets.subscriber(bus, ["video.*"])

    def marker(n: int) -> None:
        publisher.send("video.front", VideoFrame(n, time.time_ns(), "cam", 2, 2, "gray8", b"abcd"))

    sync(marker, subscriber)
    pixels = random.Random(7).randbytes(640 * 480 * 3)
    frames = [
        VideoFrame(100, time.time_ns(), "cam", 640, 480, "bgr24", pixels),
        VideoFrame(101, time.time_ns(), "cam", 640, 480, "rgb24", pixels[::-1]),
    ]
    publisher.send("video.front", frames[0])
    publisher.send("video.wrist", frames[1])
    got = collect_until(subscriber, lambda r: r.frame.seq == 101)
    assert [(r.topic, r.frame) for r in got] == [
        ("video.front", frames[0]),
        ("video.wrist", frames[1]),
    ]
    assert got[0].frame.data == pixels  # every pixel byte, in order


# --- filtering and garbage ------------------------------------------------------------------


def test_only_exact_subscribed_topics_are_delivered(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    raw = sockets.raw_pub(bus.endpoint("leader_arm"))
    drops: list[tuple[str, FrameError]] = []
    subscriber = sockets.subscriber(
        bus, ["joints.leader"], joint_count=JOINTS, on_drop=lambda s, e: drops.append((s, e))
    )
    encoder = FrameEncoder()
    sync(lambda n: raw.send_multipart(encoder.encode("joints.leader", joint(n))), subscriber)
    before = dropped("unknown", "topic")

    # Valid bodies under topics that share the subscribed prefix: ZeroMQ lets them through.
    impostors = [b"joints.leaderX", b"joints.leader.extra", b"joints.leader\xff", b"joints.leader "]
    for i, topic in enumerate(impostors):
        body = encoder.encode("joints.leader", joint(500 + i))[1]
        raw.send_multipart([topic, body])
    # Not matching the prefix at all: filtered by ZeroMQ, never seen, never counted.
    raw.send_multipart(encoder.encode("joints.leade", joint(600)))
    raw.send_multipart(encoder.encode("joints.follower", joint(601)))
    raw.send_multipart(encoder.encode("joints.leader", joint(999)))

    got = collect_until(subscriber, lambda r: r.frame.seq == 999)
    assert [(r.topic, r.frame.seq) for r in got] == [("joints.leader", 999)]
    assert dropped("unknown", "topic") - before == len(impostors)
    assert [(stream, error.reason) for stream, error in drops] == [("unknown", "topic")] * 4


def test_wildcard_topics_drop_empty_and_unprintable_names(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    raw = sockets.raw_pub(bus.endpoint("camera"))
    drops: list[tuple[str, str]] = []
    subscriber = sockets.subscriber(
        bus, ["video.*"], on_drop=lambda s, e: drops.append((s, e.reason))
    )
    encoder = FrameEncoder()

    def video(n: int) -> VideoFrame:
        return VideoFrame(n, time.time_ns(), "cam", 1, 1, "gray8", b"x")

    sync(lambda n: raw.send_multipart(encoder.encode("video.front", video(n))), subscriber)
    before = dropped("unknown", "topic")
    for topic in (b"video.", b"video.\x01", b"video.caf\xc3\xa9", b"video." + b"x" * 60):
        raw.send_multipart([topic, *encoder.encode("video.front", video(7))[1:]])
    raw.send_multipart(encoder.encode("video.side", video(999)))
    got = collect_until(subscriber, lambda r: r.frame.seq == 999)  # must not raise
    assert [(r.topic, r.frame.seq) for r in got] == [("video.side", 999)]
    assert drops == [("unknown", "topic")] * 4
    assert dropped("unknown", "topic") - before == 4


def garbage_flood(
    encoder: FrameEncoder, rng: random.Random
) -> tuple[list[list[bytes]], list[JointFrame], collections.Counter[tuple[str, str]]]:
    """Valid joint frames shuffled among every kind of bad one: the messages in sending
    order, the valid frames in that order, and the drops to expect by (stream, reason)."""
    topic = b"joints.leader"

    def body(**fields: object) -> bytes:
        base: dict[str, object] = {"v": 1, "seq": 1, "t": time.time_ns(), "src": "bad"}
        base["pos"] = [0.0] * JOINTS
        base.update(fields)
        return msgpack.packb(base, use_bin_type=True)

    bad_kinds: list[tuple[str, Callable[[], list[bytes]]]] = [
        # random bytes that can never be msgpack (0xc1 is unused by the format)
        ("malformed", lambda: [topic, b"\xc1" + rng.randbytes(rng.randint(0, 200))]),
        ("malformed", lambda: [topic, msgpack.packb([1.0] * JOINTS)]),
        ("parts", lambda: [topic]),
        ("parts", lambda: [topic, body(), rng.randbytes(rng.randint(0, 50))]),
        ("parts", lambda: [topic] + [rng.randbytes(8) for _ in range(rng.randint(3, 6))]),
        ("too_large", lambda: [topic, rng.randbytes(5000)]),
        ("too_large", lambda: [topic, body(pad="x" * 4200)]),
        ("non_finite", lambda: [topic, body(pos=[0.0, float("nan"), 0.0, 0.0, 0.0, 0.0])]),
        ("non_finite", lambda: [topic, body(pos=[float("inf")] * JOINTS)]),
        ("non_finite", lambda: [topic, body(pos=[0.0] * (JOINTS - 1) + [-float("inf")])]),
        ("non_finite", lambda: [topic, body(pos=[0.0] * (JOINTS - 1) + [1e300])]),
        ("length", lambda: [topic, body(pos=[0.0] * (JOINTS - 1))]),
        ("length", lambda: [topic, body(pos=[0.0] * (JOINTS + 1))]),
        ("version", lambda: [topic, body(v=2)]),
        ("version", lambda: [topic, body(v=True)]),
        ("header", lambda: [topic, body(seq=-1)]),
        ("header", lambda: [topic, body(seq=True)]),
        ("header", lambda: [topic, body(src="")]),
        ("schema", lambda: [topic, body(pos="six joints")]),
    ]
    flood: list[tuple[list[bytes], JointFrame | None, tuple[str, str] | None]] = []
    for seq in range(60):
        frame = joint(seq, value=float(seq))
        flood.append((encoder.encode("joints.leader", frame), frame, None))
    for _ in range(120):
        reason, make = rng.choice(bad_kinds)
        flood.append((make(), None, ("joints.leader", reason)))
    for _ in range(5):  # impostor topics sharing the subscribed prefix
        flood.append(([b"joints.leaderZ", body()], None, ("unknown", "topic")))
    rng.shuffle(flood)
    end = joint(10**6)
    flood.append((encoder.encode("joints.leader", end), end, None))
    messages = [parts for parts, _, _ in flood]
    valid = [frame for _, frame, _ in flood if frame is not None]
    expected = collections.Counter(label for _, _, label in flood if label is not None)
    return messages, valid, expected


def test_garbage_flood_drops_and_counts_every_bad_frame(
    transport: str, tmp_path: Path, sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus(transport, tmp_path, "leader_arm")
    raw = sockets.raw_pub(bus.endpoint("leader_arm"))
    drops: list[tuple[str, FrameError]] = []
    subscriber = sockets.subscriber(
        bus, ["joints.leader"], joint_count=JOINTS, on_drop=lambda s, e: drops.append((s, e))
    )
    encoder = FrameEncoder()
    sync(lambda n: raw.send_multipart(encoder.encode("joints.leader", joint(n))), subscriber)
    messages, valid, expected = garbage_flood(encoder, random.Random(20240611))
    assert {reason for _, reason in expected} == set(REASONS), "every drop reason exercised"
    labels = {*expected, ("unknown", "topic"), *(("joints.leader", r) for r in REASONS)}
    before = {label: dropped(*label) for label in labels}

    caplog.set_level(logging.WARNING, logger=PUBSUB_LOGGER)
    started = time.monotonic()
    for parts in messages:
        raw.send_multipart(parts)
    got = collect_until(subscriber, lambda r: r.frame.seq == 10**6)
    elapsed = time.monotonic() - started

    # Every valid frame arrived, in the order sent, and nothing invalid got through.
    assert [r.frame for r in got] == valid
    assert all(r.topic == "joints.leader" for r in got)

    # The metric and the callback both counted every drop, by stream and reason.
    increases = {label: dropped(*label) - before[label] for label in labels}
    assert increases == {label: float(expected[label]) for label in labels}
    assert collections.Counter((s, e.reason) for s, e in drops) == expected
    assert len(drops) == sum(expected.values())

    # Logged once per burst: never one line per bad frame.
    warnings = [r for r in caplog.records if r.name == PUBSUB_LOGGER]
    windows = int(elapsed // 5.0) + 1  # DropLog's default window
    assert 1 <= len(warnings) <= 2 * windows < len(drops)
    assert warnings[0].getMessage().startswith("dropped bad frame on ")


def test_hard_ceiling_does_not_kill_the_connection_for_capped_frames(
    tmp_path: Path, sockets: Sockets
) -> None:
    # A frame over the per-topic cap but under the libzmq ceiling is dropped and counted, and
    # the connection survives: the next valid frame still arrives.
    bus = ipc_bus(tmp_path)
    raw = sockets.raw_pub(bus.endpoint("leader_arm"))
    subscriber = sockets.subscriber(bus, ["joints.leader"], joint_count=JOINTS)
    encoder = FrameEncoder()
    sync(lambda n: raw.send_multipart(encoder.encode("joints.leader", joint(n))), subscriber)
    before = dropped("joints.leader", "too_large")
    raw.send_multipart([b"joints.leader", b"\x00" * (bus.max_frame_bytes * 8)])
    raw.send_multipart(encoder.encode("joints.leader", joint(4242)))
    got = collect_until(subscriber, lambda r: r.frame.seq == 4242)
    assert [r.frame.seq for r in got] == [4242]
    assert dropped("joints.leader", "too_large") - before == 1


# --- drop logging ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pubsub_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PUBSUB_LOGGER]


def test_drop_log_logs_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=PUBSUB_LOGGER)
    clock = FakeClock()
    log = DropLog(window_s=5.0, clock=clock)

    for i in range(50):  # a burst inside one window
        clock.now += 0.01
        log.drop("joints.leader", FrameError("non_finite", f"pos holds nan #{i}"))
    assert pubsub_warnings(caplog) == [
        "dropped bad frame on joints.leader: non_finite: pos holds nan #0"
    ]

    clock.now += 5.0  # next window: summary of the suppressed ones, then the new first one
    log.drop("health", FrameError("version", "v 2"))
    assert pubsub_warnings(caplog)[1:] == [
        "dropped 49 more bad frames in the last burst",
        "dropped bad frame on health: version: v 2",
    ]

    clock.now += 60.0  # a lone drop after a quiet spell: no empty summary
    log.drop("health", FrameError("header", "seq -1"))
    assert pubsub_warnings(caplog)[3:] == ["dropped bad frame on health: header: seq -1"]


def test_drop_log_window_is_measured_from_the_first_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=PUBSUB_LOGGER)
    clock = FakeClock()
    log = DropLog(window_s=1.0, clock=clock)
    for _ in range(30):  # a steady trickle, one drop every 0.1 s for 3 s
        log.drop("joints.leader", FrameError("length", "5 values"))
        clock.now += 0.1
    firsts = [m for m in pubsub_warnings(caplog) if m.startswith("dropped bad frame")]
    summaries = [m for m in pubsub_warnings(caplog) if m.startswith("dropped ") and "more" in m]
    assert len(firsts) == 3  # at 0.0, 1.0 and 2.0 s
    assert summaries == ["dropped 9 more bad frames in the last burst"] * 2


# --- drain ----------------------------------------------------------------------------------


def test_drain_returns_queued_frames_in_order(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    raw = sockets.raw_pub(bus.endpoint("leader_arm"))
    subscriber = sockets.subscriber(bus, ["joints.leader"], joint_count=JOINTS)
    encoder = FrameEncoder()
    sync(lambda n: raw.send_multipart(encoder.encode("joints.leader", joint(n))), subscriber)
    assert subscriber.drain() == []  # nothing queued

    sent = [joint(100 + i) for i in range(30)]
    for i, frame in enumerate(sent):
        raw.send_multipart(encoder.encode("joints.leader", frame))
        if i % 3 == 0:  # bad frames count against the limit but are never returned
            raw.send_multipart([b"joints.leader", b"\xc1"])

    got: list[Received] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < len(sent):
        assert time.monotonic() < deadline, f"only {len(got)} of {len(sent)} frames drained"
        batch = subscriber.drain(limit=4)
        assert len(batch) <= 4
        got += batch
        if not batch:
            time.sleep(0.005)
    assert [r.frame for r in got] == sent
    assert subscriber.drain(limit=4) == []


# --- publisher lifecycle --------------------------------------------------------------------


def test_publisher_close_removes_its_ipc_socket_file(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    assert not bus.run_dir.exists()
    publisher = sockets.publisher(bus, "camera")
    path = Path(bus.endpoint("camera").removeprefix("ipc://"))
    assert bus.run_dir.is_dir()  # created on demand
    assert path.exists()
    publisher.close()
    assert not path.exists()
    publisher.close()  # idempotent: closing twice neither raises nor touches anything


def test_publisher_close_keeps_a_newer_socket_file(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    old = sockets.publisher(bus, "camera")
    path = Path(bus.endpoint("camera").removeprefix("ipc://"))
    old_inode = path.stat().st_ino
    new = sockets.publisher(bus, "camera")  # a restarted process binds the same path
    assert path.stat().st_ino != old_inode
    old.close()
    assert path.exists(), "closing the old publisher deleted the new one's socket"

    # And the newer publisher still works.
    subscriber = sockets.subscriber(bus, ["video.*"])
    sync(
        lambda n: new.send("video.front", VideoFrame(n, time.time_ns(), "c", 1, 1, "gray8", b"x")),
        subscriber,
    )


def test_publisher_binds_its_own_process_endpoint(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    publisher = sockets.publisher(bus, "follower_arm")
    assert publisher.endpoint == f"ipc://{bus.run_dir}/follower_arm.sock"
    assert os.path.exists(publisher.endpoint.removeprefix("ipc://"))


def test_publisher_that_cannot_bind_raises_and_leaks_no_socket(sockets: Sockets) -> None:
    tcp = tcp_bus("gateway")
    sockets.publisher(tcp, "gateway")
    with pytest.raises(BusConfigError, match="cannot bind the bus endpoint") as info:
        Publisher(tcp, "gateway", context=sockets.context)  # the port is taken by the first one
    # `info` keeps the failed constructor's frame (and its socket) alive, so garbage
    # collection cannot close the socket for it: only Publisher itself can have.
    still_open = [sock for sock in list(sockets.context._sockets) if not sock.closed]
    assert len(still_open) == 1, "the publisher that failed to bind left its socket open"
    cause = info.value.__cause__
    assert isinstance(cause, zmq.ZMQError) and cause.errno == zmq.EADDRINUSE


# --- health ---------------------------------------------------------------------------------


def test_health_beat_is_received(tmp_path: Path, sockets: Sockets) -> None:
    bus = ipc_bus(tmp_path)
    publisher = sockets.publisher(bus, "camera")
    subscriber = sockets.subscriber(bus, ["health"])
    beat = HealthBeat(publisher, station="station-a", process="camera", period_s=0.0)
    deadline = time.monotonic() + DEADLINE_S
    got = None
    while got is None:
        assert time.monotonic() < deadline, "no health frame received"
        beat.maybe_send(fps=30)
        got = subscriber.recv(timeout_ms=20)
    assert got.topic == "health"
    assert isinstance(got.frame, MessageFrame)
    assert got.frame.src == "station-a"
    assert got.frame.fields == {"process": "camera", "fps": 30}


def test_health_beat_respects_its_period(tmp_path: Path, sockets: Sockets) -> None:
    publisher = sockets.publisher(ipc_bus(tmp_path), "camera")
    beat = HealthBeat(publisher, station="s", process="camera", period_s=3600.0)
    for _ in range(10):
        beat.maybe_send()
    assert publisher.next_seq() == 1  # exactly one beat took a sequence number


def test_pattern_topics_cannot_mint_unbounded_metric_labels(
    tmp_path: Path, sockets: Sockets
) -> None:
    """Garbage on video.* is labelled by the pattern; valid cameras get their own label, capped."""
    bus = ipc_bus(tmp_path)
    publisher = sockets.publisher(bus, "camera")
    subscriber = sockets.subscriber(bus, ["video.*"])

    def frame(n: int) -> VideoFrame:
        return VideoFrame(n, time.time_ns(), "cam", 2, 2, "gray8", b"abcd")

    sync(lambda n: publisher.send("video.sync", frame(n)), subscriber)
    pattern_before = received_total("video.*")
    drops_before = dropped("video.*", "length")
    cameras = [f"video.cam{i:02d}" for i in range(40)]
    for n, topic in enumerate(cameras):
        publisher.send(topic, VideoFrame(n, time.time_ns(), "cam", 2, 2, "gray8", b"abc"))
        publisher.send(topic, frame(1000 + n))
    got = collect_until(subscriber, lambda r: r.frame.seq == 1039)
    assert [r.topic for r in got if r.frame.seq >= 1000] == cameras  # delivery is unaffected
    labelled = [topic for topic in cameras if received_total(topic) > 0]
    assert len(labelled) == 15  # 16 labels in all, one went to video.sync
    assert received_total("video.*") - pattern_before == 40 - 15
    assert dropped("video.*", "length") - drops_before == 40
    assert all(dropped(topic, "length") == 0 for topic in cameras)


def test_publisher_in_an_unwritable_run_dir_says_which_dir(tmp_path: Path) -> None:
    """A read-only (or missing and uncreatable) run dir is a configuration error with a message
    naming the dir, not a ZeroMQ traceback. A regular file where the run dir should be fails the
    same way for root, whom permissions would not stop."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    bus = ipc_bus(blocker)  # run dir: not-a-dir/run
    with pytest.raises(BusConfigError, match=r"run dir .*not-a-dir/run must be a writable"):
        Publisher(bus, "follower_arm")
