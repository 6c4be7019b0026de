"""The other side of `rdv bench control`: the transport floor and the re-created baselines, each
side its own process.

floor
    The hops rdv's control path takes, with no rdv code on them: a ZeroMQ PUB/SUB hop (ipc),
    a bare aiortc data channel between two processes (unordered, zero retransmits, negotiated id
    0, host candidates on 127.0.0.1 only, as rdv's `cmd` channel), and a second ZeroMQ hop. The
    body is the same msgpack map rdv sends (v, seq, t, src, six positions); nothing validates,
    dates or gates it. Four processes: source -> relay (teleop) ==DC==> relay (robot) -> sink.
lekiwi_style
    Re-created from LeRobot's LeKiwi (lekiwi_host.py, lekiwi_client.py and its teleoperate
    example): the client loop at 30 Hz polls observations (<= 15 ms), reads the leader and sends
    the action as JSON on a ZeroMQ PUSH socket over TCP (CONFLATE set after connect, as there:
    no effect); the host loop at 30 Hz takes at most one command per pass from a CONFLATE PULL
    socket, applies it, reads and sends an observation as JSON, sleeps out the period.
lrvd_style
    Re-created from lrvd 0.3.0 (lrv/daemon.py, the session handler): the teleop loop reads the
    leader, sends `{"action", "timestamp"}` as JSON on an unordered, zero-retransmit aiortc data
    channel only when the action changed, sleeps 40 ms (~25 Hz); the robot loop drains its
    message queue until 10 ms pass without a message, applies only the newest, sleeps 40 ms.
    lrvd lists Google/Twilio STUN servers; here no ICE server is contacted (loopback only).

The baselines read a sim leader and drive a sim follower, like the rdv stations in the same run;
two measurement fields ride along in their JSON (`seq`, and `t`: the leader read, ns). A command
counts as applied when the follower's send_action() returned; one superseded before the robot
took it, or lost, is not applied. Processes talk to the parent over a Pipe ("ready", "go",
"stop", results) and never outlive it (daemonic). This module must never contact anything but
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import zmq

from bench.common import CpuWindow
from services.arm_driver.ticker import Ticker
from services.bus.frames import SCHEMA_VERSION
from services.sim import SimFollowerConfig, SimLeaderConfig, SimSO101Follower, SimSO101Leader

POSITIONS = (1.5, -98.0, 96.0, 70.0, 2.0, 1.0)  # a real SO101 pose: the body size rdv sends
LEKIWI_HZ = 30.0
LEKIWI_POLL_MS = 15  # LeKiwiClientConfig.polling_timeout_ms
LRVD_INTERVAL_S = 0.04
LRVD_DRAIN_TIMEOUT_S = 0.01
LRVD_BUFFER_LIMIT = 500
Sent = tuple[int, int]  # seq, leader read (ns)
Applied = tuple[int, int, int]  # seq, leader read (ns), applied (ns)


# --- process plumbing -------------------------------------------------------------------------


def _entry(target: Callable[..., dict[str, Any]], conn: Connection, kwargs: dict[str, Any]) -> None:
    """Runs one side; its result (or its traceback) goes back on `conn`."""
    try:
        result = target(conn, **kwargs)
        conn.send(("result", result))
    except Exception:
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send(("error", traceback.format_exc()))


class Control:
    """The child's view of its parent: wait for "go", notice "stop" without polling."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stop = threading.Event()
        self.go = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def start(self) -> None:
        self.conn.send(("ready", None))
        self._thread.start()

    def _listen(self) -> None:
        while not self.stop.is_set():
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = "stop"  # the parent is gone
            if message == "go":
                self.go.set()
            elif message == "stop":
                self.go.set()
                self.stop.set()


def _wait_go(control: Control) -> bool:
    control.go.wait()
    return not control.stop.is_set()


async def _until_stopped(control: Control) -> None:
    # Waited for on a worker thread: the event loop gets no extra wake-ups while it relays.
    await asyncio.get_running_loop().run_in_executor(None, control.stop.wait)


def _body(packer: msgpack.Packer, seq: int, t: int) -> bytes:
    return packer.pack({"v": SCHEMA_VERSION, "seq": seq, "t": t, "src": "bench", "pos": POSITIONS})


def _pub(endpoint: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)
    return socket


def _sub(endpoint: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)
    return socket


def _loopback_ice(host: str) -> None:
    # aioice never offers loopback by itself; rdv's gateway restricts candidates the same way.
    from services.webrtc_gateway.peer import restrict_host_candidates

    restrict_host_candidates([host])


async def _connect_pair(pc: Any, peer: Connection, offerer: bool) -> None:
    """Offer/answer over a Pipe between the two peer processes (the signaling is not timed)."""
    from aiortc import RTCSessionDescription

    loop = asyncio.get_running_loop()
    if offerer:
        await pc.setLocalDescription(await pc.createOffer())
        peer.send(pc.localDescription.sdp)
        answer = await loop.run_in_executor(None, peer.recv)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    else:
        offer = await loop.run_in_executor(None, peer.recv)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        peer.send(pc.localDescription.sdp)


# --- floor ------------------------------------------------------------------------------------


def floor_source(conn: Connection, endpoint: str, rate_hz: float) -> dict[str, Any]:
    """The leader without a leader: a msgpack joint body on a PUB socket at a fixed rate."""
    pub = _pub(endpoint)
    packer = msgpack.Packer(use_bin_type=True)
    control = Control(conn)
    control.start()
    sent: list[Sent] = []
    if _wait_go(control):
        ticker = Ticker(rate_hz)
        seq = 0
        while not control.stop.is_set():
            ticker.sleep()
            t = time.time_ns()
            pub.send_multipart([b"joints.leader", _body(packer, seq, t)])
            sent.append((seq, t))
            seq += 1
    pub.close()
    return {"sent": sent}


def floor_relay(
    conn: Connection, peer: Connection, role: str, endpoint_in: str, endpoint_out: str, host: str
) -> dict[str, Any]:
    """teleop: SUB -> data channel; robot: data channel -> PUB. Nothing else on the way."""
    _loopback_ice(host)
    from aiortc import RTCConfiguration, RTCPeerConnection

    async def run() -> None:
        loop = asyncio.get_running_loop()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel(
            "cmd", ordered=False, maxRetransmits=0, negotiated=True, id=0
        )
        opened = asyncio.Event()
        channel.on("open", opened.set)
        sub = pub = None
        if role == "teleop":
            sub = _sub(endpoint_in)

            def forward() -> None:
                # The ZeroMQ fd is edge-triggered: read everything pending on every wake-up.
                while sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    parts = sub.recv_multipart(zmq.NOBLOCK)
                    if channel.readyState == "open":
                        channel.send(parts[1])

            loop.add_reader(sub.getsockopt(zmq.FD), forward)
        else:
            pub = _pub(endpoint_out)
            channel.on("message", lambda message: pub.send_multipart([b"joints.command", message]))
        await _connect_pair(pc, peer, offerer=role == "teleop")
        await asyncio.wait_for(opened.wait(), 20)
        if sub is not None:
            forward()
        control = Control(conn)
        control.start()
        await _until_stopped(control)
        if sub is not None:
            loop.remove_reader(sub.getsockopt(zmq.FD))
            sub.close()
        await pc.close()
        if pub is not None:
            pub.close()

    asyncio.run(run())
    return {}


def floor_sink(conn: Connection, endpoint: str) -> dict[str, Any]:
    """The follower without a follower: the time each body arrives."""
    sub = _sub(endpoint)
    control = Control(conn)
    control.start()
    applied: list[Applied] = []
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    while not control.stop.is_set():
        if not poller.poll(50):
            continue
        while True:
            try:
                parts = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = time.time_ns()
            body = msgpack.unpackb(parts[1], raw=False)
            applied.append((body["seq"], body["t"], now))
    sub.close()
    return {"applied": applied}


# --- LeKiwi-style ----------------------------------------------------------------------------


def lekiwi_host(conn: Connection, cmd_port: int, obs_port: int) -> dict[str, Any]:
    context = zmq.Context.instance()
    cmd = context.socket(zmq.PULL)
    cmd.setsockopt(zmq.CONFLATE, 1)  # before bind, as LeKiwiHost does: only the newest is kept
    cmd.bind(f"tcp://127.0.0.1:{cmd_port}")
    obs = context.socket(zmq.PUSH)
    obs.setsockopt(zmq.SNDHWM, 2)
    obs.bind(f"tcp://127.0.0.1:{obs_port}")
    follower = SimSO101Follower(SimFollowerConfig())
    follower.connect()
    control = Control(conn)
    control.start()
    applied: list[Applied] = []
    while not control.stop.is_set():
        loop_start = time.time()
        try:
            data = dict(json.loads(cmd.recv_string(zmq.NOBLOCK)))
            follower.send_action({key: data[key] for key in follower.action_features})
            applied.append((data["seq"], data["t"], time.time_ns()))
        except zmq.Again:
            pass
        observation = follower.get_observation()
        with contextlib.suppress(zmq.Again):
            obs.send_string(json.dumps(observation), zmq.NOBLOCK)
        time.sleep(max(1 / LEKIWI_HZ - (time.time() - loop_start), 0))
    for socket in (cmd, obs):
        socket.close(linger=0)
    return {"applied": applied}


def lekiwi_client(conn: Connection, cmd_port: int, obs_port: int) -> dict[str, Any]:
    context = zmq.Context.instance()
    cmd = context.socket(zmq.PUSH)
    cmd.setsockopt(zmq.LINGER, 0)
    cmd.connect(f"tcp://127.0.0.1:{cmd_port}")
    cmd.setsockopt(zmq.CONFLATE, 1)  # after connect, as LeKiwiClient does: it has no effect
    obs = context.socket(zmq.PULL)
    obs.setsockopt(zmq.LINGER, 0)
    obs.connect(f"tcp://127.0.0.1:{obs_port}")
    obs.setsockopt(zmq.CONFLATE, 1)
    poller = zmq.Poller()
    poller.register(obs, zmq.POLLIN)
    leader = SimSO101Leader(SimLeaderConfig())
    leader.connect()
    control = Control(conn)
    control.start()
    sent: list[Sent] = []
    if _wait_go(control):
        seq = 0
        while not control.stop.is_set():
            t0 = time.perf_counter()
            if poller.poll(LEKIWI_POLL_MS):  # get_observation(): poll, then keep the newest
                with contextlib.suppress(zmq.Again):
                    while True:
                        json.loads(obs.recv_string(zmq.NOBLOCK))
            action = leader.get_action()
            t = time.time_ns()
            cmd.send_string(json.dumps({**{k: float(v) for k, v in action.items()},
                                        "seq": seq, "t": t}))  # fmt: skip
            sent.append((seq, t))
            seq += 1
            time.sleep(max(1 / LEKIWI_HZ - (time.perf_counter() - t0), 0))
    for socket in (cmd, obs):
        socket.close(linger=0)
    return {"sent": sent}


# --- lrvd-style ------------------------------------------------------------------------------


def lrvd_teleop(conn: Connection, peer: Connection, host: str) -> dict[str, Any]:
    _loopback_ice(host)
    from aiortc import RTCConfiguration, RTCPeerConnection

    sent: list[Sent] = []

    async def run() -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel("control", ordered=False, maxRetransmits=0)
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await _connect_pair(pc, peer, offerer=True)
        await asyncio.wait_for(opened.wait(), 20)
        leader = SimSO101Leader(SimLeaderConfig())
        leader.connect()
        control = Control(conn)
        control.start()
        await asyncio.get_running_loop().run_in_executor(None, control.go.wait)
        last = None
        seq = 0
        while not control.stop.is_set():
            action = leader.get_action()
            t = time.time_ns()
            if action and action != last and channel.bufferedAmount < LRVD_BUFFER_LIMIT:
                message = {"action": action, "timestamp": time.time(), "seq": seq, "t": t}
                channel.send(json.dumps(message))
                sent.append((seq, t))
                seq += 1
                last = action
            await asyncio.sleep(LRVD_INTERVAL_S)
        await pc.close()

    asyncio.run(run())
    return {"sent": sent}


def lrvd_robot(conn: Connection, peer: Connection, host: str) -> dict[str, Any]:
    _loopback_ice(host)
    from aiortc import RTCConfiguration, RTCPeerConnection

    applied: list[Applied] = []

    async def run() -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        queue: asyncio.Queue = asyncio.Queue()
        opened = asyncio.Event()

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            channel.on(
                "message",
                lambda message: asyncio.ensure_future(queue.put(json.loads(message))),
            )
            opened.set()

        await _connect_pair(pc, peer, offerer=False)
        await asyncio.wait_for(opened.wait(), 20)
        follower = SimSO101Follower(SimFollowerConfig())
        follower.connect()
        control = Control(conn)
        control.start()
        while not control.stop.is_set():
            latest = None
            while True:
                try:
                    latest = await asyncio.wait_for(queue.get(), timeout=LRVD_DRAIN_TIMEOUT_S)
                except asyncio.TimeoutError:
                    break
            if latest and "action" in latest:
                follower.send_action(latest["action"])
                applied.append((latest["seq"], latest["t"], time.time_ns()))
            await asyncio.sleep(LRVD_INTERVAL_S)
        await pc.close()

    asyncio.run(run())
    return {"applied": applied}


# --- the parent's side -------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    target: Callable[..., dict[str, Any]]
    kwargs: dict[str, Any]
    sends: bool = False  # a source: started by "go", stopped first
    process: Any = None
    conn: Connection | None = None
    result: dict[str, Any] = field(default_factory=dict)


class SideError(RuntimeError):
    pass


def _receive(side: Side, kind: str, deadline: float) -> Any:
    assert side.conn is not None
    while time.monotonic() < deadline:
        if side.conn.poll(0.05):
            try:
                got, payload = side.conn.recv()
            except EOFError:
                raise SideError(f"{side.name} exited") from None
            if got == "error":
                raise SideError(f"{side.name} failed:\n{payload}")
            if got == kind:
                return payload
        elif side.process is not None and not side.process.is_alive():
            raise SideError(f"{side.name} exited with status {side.process.exitcode}")
    raise SideError(f"{side.name}: no {kind!r} in time")


def run_sides(
    sides: list[Side], seconds: float, ready_timeout_s: float, settle_s: float = 0.3
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Start every side as its own (spawned) process, wait until all are ready, let the sources
    send for `seconds`, stop them, give in-flight messages `settle_s`, stop the rest. Returns
    each side's result, and the CPU the machine and each side used while the sources sent.
    Every process this starts is joined, or terminated by pid, before it returns."""
    ctx = mp.get_context("spawn")  # a fresh interpreter per side: no inherited threads or loops
    try:
        for side in sides:
            parent, child = ctx.Pipe()
            side.conn = parent
            side.process = ctx.Process(
                target=_entry, args=(side.target, child, side.kwargs), name=side.name, daemon=True
            )
            side.process.start()
            child.close()
        deadline = time.monotonic() + ready_timeout_s
        for side in sides:
            _receive(side, "ready", deadline)
        sources = [side for side in sides if side.sends]
        cpu = CpuWindow({side.name: side.process.pid for side in sides})
        for side in sources:
            side.conn.send("go")
        time.sleep(seconds)
        usage = cpu.result()
        for group, pause in ((sources, settle_s), ([s for s in sides if not s.sends], 0.0)):
            for side in group:
                side.conn.send("stop")
            for side in group:
                side.result = _receive(side, "result", time.monotonic() + 15)
            time.sleep(pause)
        return {side.name: side.result for side in sides}, usage
    finally:
        for side in sides:
            if side.conn is not None:
                with contextlib.suppress(OSError, BrokenPipeError):
                    side.conn.send("stop")
        for side in sides:
            if side.process is not None and side.process.pid is not None:  # started
                side.process.join(timeout=5)
                if side.process.is_alive():
                    side.process.terminate()
                    side.process.join(timeout=5)
                if side.process.is_alive():
                    side.process.kill()
                    side.process.join()
            if side.conn is not None:
                side.conn.close()
