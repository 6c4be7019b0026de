"""One side of the station-to-station WebRTC link: data channels, pings, link loss, video.

Two negotiated data channels (same ids on both sides, no in-band announcement):
- `cmd` (id 0): unordered, zero retransmits, teleop -> robot leader joint frames. A lost frame
  is repaired by the next one; a retransmitted one would only arrive stale.
- `state` (id 1): reliable, both ways: ping/pong (clock offset, RTT, liveness), the follower's
  frames back to the teleop, and each video frame's capture time (robot -> teleop).
Video: the teleop asks for one stream per robot camera (recvonly, the chosen codec) and receives
it through rdv's low-latency receive path (media.py); the robot answers with one CameraTrack per
camera, fed the newest bus frame. Every frame received on a channel is validated by the bus
codec before it is handed on, and command times are converted to this station's clock. Nothing
reaches the public internet unasked: no ICE servers unless configured. This module must never
hand on a frame that failed validation.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aioice.ice
import av
import msgpack
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from services import clock, metrics
from services.bus.frames import (
    REASONS,
    FollowerFrame,
    FrameEncoder,
    FrameError,
    JointFrame,
    VideoFrame,
    body_of,
    decode,
)
from services.webrtc_gateway.link import LOST_AFTER_S, PING_INTERVAL_S, LinkMonitor
from services.webrtc_gateway.media import (
    RTP_WRAP,
    CameraTrack,
    CaptureTimes,
    fix_receive_path,
    prefer_codec,
)

log = logging.getLogger(__name__)
CMD_CHANNEL_ID = 0
STATE_CHANNEL_ID = 1
MAX_CHANNEL_MESSAGE = 4096  # the bus's frame cap: a joint frame is ~100 bytes
MAX_NOTE = 100  # characters of who-stopped-it text carried with an e-stop
TELEMETRY_KEYS = ("control_ms",)
VIDEO_LATENCY_MEMORY = 10_000
RECENT_VIDEO_FRAMES = 30  # recent glass-to-glass samples kept for benchmarks and tests


def restrict_host_candidates(addresses: list[str]) -> None:
    """Offer only these local addresses as ICE host candidates (e.g. ["127.0.0.1"]).

    aioice never offers loopback on its own; two stations on one machine, and tests that must
    keep their traffic on loopback, set this. It changes aioice's module-level address lookup
    for this process, which is the gateway's only peer connection.
    """
    chosen = list(addresses)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [
        a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)
    ]


@dataclass
class PeerConfig:
    initiator: bool  # the teleop offers; the robot answers
    ice_servers: list[RTCIceServer] = field(default_factory=list)
    ping_interval_s: float = PING_INTERVAL_S
    lost_after_s: float = LOST_AFTER_S
    joint_count: int | None = None
    # Robot: its own cameras, one track each. Teleop: the robot's cameras, one stream asked each.
    cameras: tuple[str, ...] = ()
    video_codec: str = "vp8"  # the teleop's choice; the robot answers with what is offered


class GatewayPeer:
    def __init__(
        self,
        config: PeerConfig,
        *,
        on_command: Callable[[JointFrame], None] = lambda _frame: None,
        on_follower: Callable[[FollowerFrame], None] = lambda _frame: None,
        on_video: Callable[[str, av.VideoFrame], None] = lambda _camera, _frame: None,
        on_estop: Callable[[str], None] = lambda _by: None,
        on_telemetry: Callable[[dict[str, float]], None] = lambda _fields: None,
        clock: Callable[[], int] = clock.now_ns,
        track_factory: Callable[[str, Callable[[str, int, int], None]], Any] = CameraTrack,
        receive_path: Callable[[RTCRtpReceiver], None] = fix_receive_path,
    ) -> None:
        """track_factory and receive_path are rdv's media path; `rdv bench video` swaps in
        stock aiortc's to measure it beside rdv's."""
        self.config = config
        self._on_command = on_command
        self._on_follower = on_follower
        self._on_video = on_video
        self._on_estop = on_estop
        self._on_telemetry = on_telemetry
        self._clock = clock
        self._track_factory = track_factory
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(config.ice_servers)))
        self.cmd = self.pc.createDataChannel(
            "cmd", ordered=False, maxRetransmits=0, negotiated=True, id=CMD_CHANNEL_ID
        )
        self.state = self.pc.createDataChannel("state", negotiated=True, id=STATE_CHANNEL_ID)
        self.cmd.on("message", self._on_cmd_message)
        self.state.on("message", self._on_state_message)
        self.monitor: LinkMonitor | None = None
        self.answer_pings = True  # tests pause this to play a hung peer
        self._encoder = FrameEncoder()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._opened = asyncio.Event()
        self.state.on("open", self._opened.set)
        self.commands_dropped = 0
        for stream in ("dc.cmd", "dc.state"):  # exported at 0, as the bus's streams are
            for reason in REASONS:
                metrics.FRAMES_DROPPED.labels(stream=stream, reason=reason)
        self.camera_tracks: dict[str, CameraTrack] = {}  # robot: camera -> outgoing track
        self.capture_times = CaptureTimes()  # teleop: capture times waiting for their frames
        self.video_latency_ns: deque[int] = deque(maxlen=VIDEO_LATENCY_MEMORY)
        self.recent_video_latency_ns: dict[str, deque[int]] = {
            camera: deque(maxlen=RECENT_VIDEO_FRAMES) for camera in config.cameras
        }  # the last second per camera, for the viewer page
        self._video_tasks: list[asyncio.Task] = []
        self._asked_video: list[tuple[RTCRtpTransceiver, str]] = []
        if config.initiator:
            for camera in config.cameras:
                transceiver = self.pc.addTransceiver("video", direction="recvonly")
                prefer_codec(transceiver, config.video_codec)
                receive_path(transceiver.receiver)
                self._asked_video.append((transceiver, camera))
            self.pc.on("track", self._on_track)

    # --- signaling ------------------------------------------------------------------------

    async def make_offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept_offer(self, sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        # One track per camera, in the order the teleop asked for them (the robot's presence
        # order); streams beyond what the offer asks for are not sent.
        offered = sum(1 for t in self.pc.getTransceivers() if t.kind == "video")
        for camera in self.config.cameras[:offered]:
            track = self._track_factory(camera, self._send_capture)
            track.sender = self.pc.addTrack(track)
            self.camera_tracks[camera] = track
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def wait_open(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._opened.wait(), timeout_s)
        self.monitor = LinkMonitor(
            self._clock(),
            ping_interval_s=self.config.ping_interval_s,
            lost_after_s=self.config.lost_after_s,
        )

    # --- sending ----------------------------------------------------------------------------

    def send_command(self, frame: JointFrame) -> None:
        if self.cmd.readyState == "open":
            self.cmd.send(self._packer.pack(body_of(frame)))

    def send_follower(self, frame: FollowerFrame) -> None:
        if self.state.readyState == "open":
            self.state.send(self._packer.pack({"k": "follower", **body_of(frame)}))

    def send_estop(self, by: str) -> bool:
        """Teleop: ask the robot to latch its emergency stop. False if there is no link."""
        if self.state.readyState != "open":
            return False
        self.state.send(self._packer.pack({"k": "estop", "by": by[:MAX_NOTE]}))
        return True

    def send_telemetry(self, fields: dict[str, float]) -> None:
        """Robot: figures only the robot knows (e.g. control latency), for the teleop's page."""
        if self.state.readyState == "open":
            self.state.send(self._packer.pack({"k": "telemetry", **fields}))

    def send_video(self, camera: str, frame: VideoFrame) -> None:
        track = self.camera_tracks.get(camera)
        if track is not None:
            track.offer(frame)

    def _send_capture(self, camera: str, rtp_ts: int, captured_ns: int) -> None:
        if self.state.readyState == "open":
            capture = {"k": "vcap", "cam": camera, "rtp": rtp_ts, "t": captured_ns}
            self.state.send(self._packer.pack(capture))

    # --- video, teleop side ----------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        for transceiver, camera in self._asked_video:
            if transceiver.receiver.track is track:
                self._watch_video(camera, track)

    def _watch_video(self, camera: str, track: MediaStreamTrack) -> None:
        async def consume() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                now = self._clock()
                metrics.VIDEO_FRAMES_DECODED.labels(camera=camera).inc()
                captured = self.capture_times.decoded(camera, frame.pts % RTP_WRAP, now)
                if captured is not None:
                    self._video_latency(camera, captured, now)
                self._on_video(camera, frame)

        self._video_tasks.append(asyncio.ensure_future(consume()))

    def _on_capture(self, body: dict[str, Any]) -> None:
        camera, rtp_ts, captured = body.get("cam"), body.get("rtp"), body.get("t")
        if camera not in self.config.cameras or not self.config.initiator:
            return self._drop("state", "schema")
        if type(rtp_ts) is not int or type(captured) is not int or not 0 <= rtp_ts < RTP_WRAP:
            return self._drop("state", "schema")
        decoded = self.capture_times.captured(camera, rtp_ts, captured)
        if decoded is not None:
            self._video_latency(camera, captured, decoded)
        return None

    def _video_latency(self, camera: str, captured_peer_ns: int, decoded_ns: int) -> None:
        captured = None if self.monitor is None else self.monitor.offset.to_local(captured_peer_ns)
        if captured is None:
            return  # no clock offset yet: an age we cannot judge is not reported
        latency_ns = decoded_ns - captured
        self.video_latency_ns.append(latency_ns)
        if camera in self.recent_video_latency_ns:
            self.recent_video_latency_ns[camera].append(latency_ns)
        metrics.VIDEO_LATENCY.labels(camera=camera).observe(max(0.0, latency_ns / 1e9))

    # --- link health ------------------------------------------------------------------------

    async def watch_link(self, poll_s: float = 0.01) -> str:
        """Ping until the link is lost or the connection fails; returns why it ended."""
        if self.monitor is None:
            raise RuntimeError("watch_link() before wait_open()")
        while True:
            now = self._clock()
            due = self.monitor.ping_due(now)
            if due is not None and self.state.readyState == "open":
                ping_id, t1 = due
                self.state.send(self._packer.pack({"k": "ping", "id": ping_id, "t1": t1}))
            if not self.monitor.alive(now):
                return "link_lost"
            if self.pc.connectionState in ("failed", "closed"):
                return f"connection_{self.pc.connectionState}"
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        for task in self._video_tasks:
            task.cancel()
        await self.pc.close()

    # --- receiving --------------------------------------------------------------------------

    def _on_cmd_message(self, message: Any) -> None:
        frame = self._decode(message, "joints", "cmd")
        if not isinstance(frame, JointFrame):
            return
        local_t = None if self.monitor is None else self.monitor.offset.to_local(frame.t)
        if local_t is None:
            # No clock offset yet (first pong pending, <= one ping interval): a command whose
            # age cannot be judged is not handed to the arm.
            self.commands_dropped += 1
            return
        self._on_command(replace(frame, t=local_t))

    def _on_state_message(self, message: Any) -> None:
        now = self._clock()
        if not isinstance(message, bytes) or len(message) > MAX_CHANNEL_MESSAGE:
            return self._drop("state", "too_large" if isinstance(message, bytes) else "schema")
        try:
            body = msgpack.unpackb(message, raw=False, strict_map_key=True)
        except Exception:  # corrupt input: many exception types, one meaning
            return self._drop("state", "malformed")
        if not isinstance(body, dict):
            return self._drop("state", "malformed")
        kind = body.get("k")
        if kind == "ping" and self.answer_pings:
            if type(body.get("id")) is int and type(body.get("t1")) is int:
                pong = {"k": "pong", "id": body["id"], "t2": now, "t3": self._clock()}
                self.state.send(self._packer.pack(pong))
        elif kind == "pong" and self.monitor is not None:
            ping_id, t2, t3 = body.get("id"), body.get("t2"), body.get("t3")
            if all(type(v) is int for v in (ping_id, t2, t3)):
                sample = self.monitor.on_pong(ping_id, t2, t3, now)
                if sample is not None:
                    metrics.LINK_RTT.observe(sample.rtt_ns / 1e9)
        elif kind == "vcap":
            self._on_capture(body)
        elif kind == "estop" and not self.config.initiator:
            by = body.get("by")
            self._on_estop(by[:MAX_NOTE] if isinstance(by, str) else "peer")
        elif kind == "telemetry" and self.config.initiator:
            figures = {
                key: float(value)
                for key, value in body.items()
                if key in TELEMETRY_KEYS and type(value) in (int, float) and math.isfinite(value)
            }
            if figures:
                self._on_telemetry(figures)
        elif kind == "follower":
            frame = self._decode(message, "follower", "state", body=body)
            if isinstance(frame, FollowerFrame):
                self._on_follower(frame)
        return None

    def _decode(self, message: Any, schema: str, stream: str, body: dict | None = None):
        if not isinstance(message, bytes):
            return self._drop(stream, "schema")
        topic = b"joints.command" if schema == "joints" else b"joints.follower"
        try:
            return decode(
                [topic, message],
                schema,
                max_bytes=MAX_CHANNEL_MESSAGE,
                joint_count=self.config.joint_count,
            )
        except FrameError as error:
            return self._drop(stream, error.reason)

    def _drop(self, stream: str, reason: str) -> None:
        metrics.FRAMES_DROPPED.labels(stream=f"dc.{stream}", reason=reason).inc()
        return None
