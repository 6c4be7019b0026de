"""Low-latency video over the station link: the robot's camera tracks, the teleop's receive path,
and capture times matched to decoded frames.

Three things stock aiortc does that cost latency, and what rdv does instead (DESIGN.md targets
25 ms p50 glass-to-glass at 640x480@30):
- The H264 encoder uses x264's default preset: too slow for 30 fps on two cores. rdv's encoder
  is the same packetizer with `preset=ultrafast` (and zerolatency, as stock).
- The receiver releases a frame only when the NEXT frame's first packet arrives (it ignores the
  RTP marker bit): one frame interval of delay. rdv's jitter buffer releases a frame at its
  marker packet once all its packets are in, and falls back to the stock rule if a marker is lost.
- A track paces itself to a wall clock and queues frames. rdv's camera track hands the encoder
  the newest bus frame when one arrives, never a backlog.

aiortc has no public hooks for these, so this module sets three of its internals: the sender
module's encoder factory, and each video receiver's jitter buffer and timestamp mapper.
`check_aiortc()` proves they exist at start-up, so an aiortc upgrade that renames them fails
loudly instead of silently losing the fix. Capture times: the robot tells the teleop, on the
reliable channel, the capture time of each frame keyed by its RTP timestamp, which is what the
teleop's decoded frame carries as pts (the mapper keeps raw RTP timestamps). This module must
never block the event loop on encoding or decoding (aiortc runs both on worker threads) and
never queue more than one frame per camera.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiortc.rtcrtpsender
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs import get_encoder as stock_get_encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import TimestampMapper

from services.bus.frames import VideoFrame

log = logging.getLogger(__name__)
VIDEO_CLOCK_HZ = 90_000  # RTP clock rate of every video codec
CODEC_MIME = {"vp8": "video/VP8", "h264": "video/H264"}
RTP_WRAP = 1 << 32
PTS_NEAR = (0, -1, 1, -2, 2)  # RTP ticks (1/90000 s) a decoded pts may be off by
CAPTURE_MEMORY = 120  # frames per camera: 4 s at 30 fps, far beyond any real decode delay
_RECEIVER_JITTER = "_RTCRtpReceiver__jitter_buffer"
_RECEIVER_MAPPER = "_RTCRtpReceiver__timestamp_mapper"
_SENDER_RTP_TIMESTAMP = "_RTCRtpSender__rtp_timestamp"


# --- sending ---------------------------------------------------------------------------------


class LowLatencyH264Encoder(H264Encoder):
    """aiortc's H264 encoder with x264's fastest preset: holds 30 fps at 640x480 on 2 cores."""

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool):  # type: ignore[override]
        codec = self.codec
        if codec is None or (
            frame.width != codec.width
            or frame.height != codec.height
            or abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate > 0.1
        ):
            # Open the context the stock encoder would open, plus the preset; the stock code
            # then finds it matching and only encodes.
            self.buffer_data, self.buffer_pts = b"", None
            codec = av.CodecContext.create("libx264", "w")
            codec.width, codec.height = frame.width, frame.height
            codec.bit_rate = self.target_bitrate
            codec.pix_fmt = "yuv420p"
            codec.framerate = fractions.Fraction(30, 1)
            codec.time_base = fractions.Fraction(1, 30)
            codec.options = {"level": "31", "tune": "zerolatency", "preset": "ultrafast"}
            codec.profile = "Baseline"
            self.codec = codec
        return super()._encode_frame(frame, force_keyframe)


def rdv_get_encoder(codec: Any) -> Any:
    if codec.mimeType.lower() == "video/h264":
        return LowLatencyH264Encoder()
    return stock_get_encoder(codec)


def install_encoders() -> None:
    """Make this process's RTP senders use rdv's encoders (aiortc reads the name per sender)."""
    aiortc.rtcrtpsender.get_encoder = rdv_get_encoder


class RtpOrigin:
    """The RTP timestamp a frame will carry, once the sender's random origin is known.

    The sender adds a random origin to each pts and keeps the last RTP timestamp it sent. When
    the last frame we gave it was sent, that timestamp minus its pts is the origin; seeing the
    same value for two frames in a row rules out a frame the encoder skipped.
    """

    def __init__(self) -> None:
        self.value: int | None = None
        self._guess: int | None = None
        self._last_pts: int | None = None

    def rtp_ts(self, sender: RTCRtpSender | None, pts: int) -> int | None:
        """Call once per frame handed to `sender`, before it is sent."""
        if self.value is None and self._last_pts is not None and sender is not None:
            last_sent = getattr(sender, _SENDER_RTP_TIMESTAMP, None)
            if isinstance(last_sent, int) and last_sent != 0:
                guess = (last_sent - self._last_pts) % RTP_WRAP
                if guess == self._guess:
                    self.value = guess
                self._guess = guess
        self._last_pts = pts
        return None if self.value is None else (self.value + pts) % RTP_WRAP


class CameraTrack(MediaStreamTrack):
    """One robot camera as a WebRTC track: always the newest bus frame, never a queue.

    `offer()` is called for every frame the camera publishes; `recv()` (aiortc's sender loop)
    waits for a frame newer than the one it last took. Frames that arrive while the encoder is
    busy are replaced, not queued. Capture times go to `on_capture(camera, rtp_ts, t)` once the
    sender's RTP timestamp origin is known (after its first frame is sent).
    """

    kind = "video"

    def __init__(self, camera: str, on_capture: Callable[[str, int, int], None]) -> None:
        super().__init__()
        self.camera = camera
        self.sender: RTCRtpSender | None = None
        self._on_capture = on_capture
        self._latest: VideoFrame | None = None
        self._fresh = asyncio.Event()
        self._first_t: int | None = None
        self._last_pts: int | None = None
        self._origin = RtpOrigin()
        self.frames_replaced = 0

    def offer(self, frame: VideoFrame) -> None:
        if self._fresh.is_set():
            self.frames_replaced += 1
        self._latest = frame
        self._fresh.set()

    async def recv(self) -> av.VideoFrame:
        await self._fresh.wait()
        self._fresh.clear()
        frame = self._latest
        assert frame is not None
        if self._first_t is None:
            self._first_t = frame.t
        pts = (frame.t - self._first_t) * VIDEO_CLOCK_HZ // 1_000_000_000
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # RTP timestamps must rise, even if a clock stepped back
        self._last_pts = pts
        rtp_ts = self._origin.rtp_ts(self.sender, pts)
        if rtp_ts is not None:
            self._on_capture(self.camera, rtp_ts, frame.t)
        return to_av_frame(frame, pts)


def to_av_frame(frame: VideoFrame, pts: int) -> av.VideoFrame:
    pixels = np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, 3)
    out = av.VideoFrame.from_ndarray(pixels, format=frame.encoding)
    out.pts = pts
    out.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
    return out


def prefer_codec(transceiver: RTCRtpTransceiver, codec: str) -> None:
    """Offer only `codec` (plus its retransmission format) on this transceiver."""
    mime = CODEC_MIME[codec].lower()
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    chosen = [c for c in capabilities if c.mimeType.lower() in (mime, "video/rtx")]
    transceiver.setCodecPreferences(chosen)


# --- receiving -------------------------------------------------------------------------------


class MarkerJitterBuffer(JitterBuffer):
    """Releases a video frame as soon as its last packet (RTP marker bit) is in, not when the
    next frame starts. With a lost marker it falls back to the stock rule (the next frame's
    first packet closes the frame), so a frame is never released incomplete."""

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        timestamp = None
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                return self._release(packets, count)  # marker lost: closed by the next frame
            packets.append(packet)
            if packet.marker:
                return self._release(packets, count + 1)
        return None

    def _release(self, packets: list, count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)
        self.remove(count)
        return frame


class RtpTimestamps(TimestampMapper):
    """Keeps the sender's RTP timestamps as pts (unwrapped), instead of counting from the first
    frame received, so a decoded frame can be matched with the capture time sent for it."""

    def map(self, timestamp: int) -> int:
        if self._origin is None:
            self._origin = 0
        elif (
            self._last is not None
            and timestamp < self._last
            and self._last - timestamp > (RTP_WRAP // 2)
        ):
            self._origin -= RTP_WRAP  # wrapped
        self._last = timestamp
        return timestamp - self._origin


def fix_receive_path(receiver: RTCRtpReceiver) -> None:
    """Swap in the marker-aware jitter buffer and raw RTP timestamps on a video receiver."""
    setattr(receiver, _RECEIVER_JITTER, MarkerJitterBuffer(capacity=512, is_video=True))
    keep_rtp_timestamps(receiver)


def keep_rtp_timestamps(receiver: RTCRtpReceiver) -> None:
    """Only the measurement part: decoded frames keep their RTP timestamp as pts (no latency
    change; what a benchmark of stock aiortc's receive path uses)."""
    setattr(receiver, _RECEIVER_MAPPER, RtpTimestamps())


def check_aiortc() -> None:
    """Fail at start-up, with the reason, if this aiortc lacks the internals rdv sets."""
    if not callable(getattr(aiortc.rtcrtpsender, "get_encoder", None)):
        raise RuntimeError("aiortc.rtcrtpsender.get_encoder is gone: rdv's video encoders need it")
    # Private attributes are assigned in __init__ under their mangled names.
    needed = [(RTCRtpReceiver, _RECEIVER_JITTER), (RTCRtpReceiver, _RECEIVER_MAPPER),
              (RTCRtpSender, _SENDER_RTP_TIMESTAMP)]  # fmt: skip
    for cls, name in needed:
        if name not in cls.__init__.__code__.co_names:
            raise RuntimeError(
                f"this aiortc's {cls.__name__} has no {name}: rdv's low-latency video needs it "
                "(tested with aiortc 1.16)"
            )


class CaptureTimes:
    """Teleop side: capture times (robot clock) by camera and RTP timestamp, matched with
    decoded frames whichever of the two arrives first; bounded per camera.

    A decoder may hand back a pts one tick off the RTP timestamp (libavcodec rescales it), so
    keys within two ticks match; frames are ~3000 ticks apart at 30 fps.
    """

    def __init__(self, memory: int = CAPTURE_MEMORY) -> None:
        self._memory = memory
        self._captured: dict[str, OrderedDict[int, int]] = {}
        self._decoded: dict[str, OrderedDict[int, int]] = {}

    def captured(self, camera: str, rtp_ts: int, t_peer: int) -> int | None:
        """Record a capture time; returns the decode time (local) if that frame already came."""
        decoded = _pop_near(self._decoded.get(camera), rtp_ts)
        if decoded is None:
            self._remember(self._captured, camera, rtp_ts, t_peer)
        return decoded

    def decoded(self, camera: str, rtp_ts: int, t_local: int) -> int | None:
        """Record a decode time; returns the capture time (peer clock) if it was sent already."""
        captured = _pop_near(self._captured.get(camera), rtp_ts)
        if captured is None:
            self._remember(self._decoded, camera, rtp_ts, t_local)
        return captured

    def _remember(self, table: dict[str, OrderedDict[int, int]], camera: str, key: int,
                  value: int) -> None:  # fmt: skip
        entries = table.setdefault(camera, OrderedDict())
        entries[key] = value
        while len(entries) > self._memory:
            entries.popitem(last=False)


def _pop_near(entries: OrderedDict[int, int] | None, key: int) -> int | None:
    if not entries:
        return None
    for delta in PTS_NEAR:
        value = entries.pop((key + delta) % RTP_WRAP, None)
        if value is not None:
            return value
    return None
