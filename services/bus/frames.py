"""Bus frames: dataclasses, msgpack encoding and strict validation of everything received.

Wire format: multipart `[topic, msgpack body]`, video adds a third raw part. Every body is a
map carrying `v` (schema version), `seq` (per-publisher counter), `t` (origin time, ns since
the epoch) and `src` (station id). `decode` must never return a frame that fails validation
and must never raise anything but `FrameError`, whatever bytes it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

SCHEMA_VERSION = 1
HEADER_KEYS = ("v", "seq", "t", "src")
MAX_SRC_LEN = 64
MAX_TOPIC_LEN = 64
MAX_JOINTS = 32
# No joint of any arm reads beyond this; larger numbers are corrupt frames, not positions.
MAX_ABS_POSITION = 100_000.0
MAX_SEQ = 2**63 - 1
FOLLOWER_STATES = ("waiting", "ramping", "tracking", "stale", "estop", "fault")
VIDEO_ENCODINGS = {"bgr24": 3, "rgb24": 3, "gray8": 1, "jpeg": 0}  # bytes per pixel, 0: compressed
MAX_VIDEO_SIDE = 8192

# Drop reasons, a closed set so the metric label stays low-cardinality.
REASONS = (
    "parts",  # wrong number of multipart parts
    "topic",  # topic not subscribed or not valid text
    "too_large",
    "malformed",  # not msgpack, or not a map with text keys
    "version",
    "header",  # seq/t/src missing or of the wrong type or range
    "schema",  # payload fields missing or of the wrong type
    "length",  # wrong number of joints or wrong video size
    "non_finite",  # NaN or inf, or absurdly large
)


class FrameError(ValueError):
    """A received frame is invalid; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class JointFrame:
    """Joint positions in the device's own key order and units (joints.leader, joints.command)."""

    seq: int
    t: int
    src: str
    pos: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class FollowerFrame:
    """What the follower measured and did on one control tick (joints.follower)."""

    seq: int
    t: int
    src: str
    pos: tuple[float, ...]  # measured
    goal: tuple[float, ...]  # sent to the device this tick
    state: str  # one of FOLLOWER_STATES
    cmd_seq: int  # seq of the last applied command, -1 before the first
    cmd_t: int  # origin time of the last applied command, 0 before the first


@dataclass(frozen=True, slots=True)
class VideoFrame:
    seq: int
    t: int  # capture time
    src: str
    width: int
    height: int
    encoding: str  # key of VIDEO_ENCODINGS
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MessageFrame:
    """Session control/status and health: a small map of named fields beside the header."""

    seq: int
    t: int
    src: str
    fields: dict[str, Any]


Frame = JointFrame | FollowerFrame | VideoFrame | MessageFrame


def body_of(frame: Frame) -> dict[str, Any]:
    """The msgpack map for a frame (video's pixels travel as the third part, not here)."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "seq": frame.seq, "t": frame.t, "src": frame.src}
    if isinstance(frame, JointFrame):
        body["pos"] = list(frame.pos)
    elif isinstance(frame, FollowerFrame):
        body["pos"] = list(frame.pos)
        body["goal"] = list(frame.goal)
        body["state"] = frame.state
        body["cmd_seq"] = frame.cmd_seq
        body["cmd_t"] = frame.cmd_t
    elif isinstance(frame, VideoFrame):
        body["w"] = frame.width
        body["h"] = frame.height
        body["enc"] = frame.encoding
    else:
        for key, value in frame.fields.items():
            if key in HEADER_KEYS:
                raise ValueError(f"message field {key!r} collides with the frame header")
            body[key] = value
    return body


class FrameEncoder:
    """Packs frames for one publisher; keeps one msgpack Packer (it halves the packing cost)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, topic: str, frame: Frame) -> list[bytes]:
        parts = [topic.encode(), self._packer.pack(body_of(frame))]
        if isinstance(frame, VideoFrame):
            parts.append(frame.data)
        return parts


def decode(
    parts: list[bytes],
    schema: str,
    *,
    max_bytes: int,
    joint_count: int | None = None,
) -> Frame:
    """Validate and decode one received frame of a known schema, or raise FrameError."""
    want_parts = 3 if schema == "video" else 2
    if len(parts) != want_parts:
        raise FrameError("parts", f"{len(parts)} parts, expected {want_parts}")
    size = sum(len(part) for part in parts)
    if size > max_bytes:
        raise FrameError("too_large", f"{size} bytes, cap {max_bytes}")
    body = _unpack_map(parts[1])
    seq, t, src = _header(body)
    if schema == "joints":
        return JointFrame(seq, t, src, _positions(body, "pos", joint_count))
    if schema == "follower":
        pos = _positions(body, "pos", joint_count)
        goal = _positions(body, "goal", len(pos))
        state = body.get("state")
        if state not in FOLLOWER_STATES:
            raise FrameError("schema", f"state {state!r} is not one of {FOLLOWER_STATES}")
        cmd_seq = _int_field(body, "cmd_seq", -1, MAX_SEQ)
        cmd_t = _int_field(body, "cmd_t", 0, MAX_SEQ)
        return FollowerFrame(seq, t, src, pos, goal, state, cmd_seq, cmd_t)
    if schema == "video":
        return _video(seq, t, src, body, parts[2])
    if schema == "message":
        fields = {key: value for key, value in body.items() if key not in HEADER_KEYS}
        return MessageFrame(seq, t, src, fields)
    raise FrameError("schema", f"unknown schema {schema!r}")


def _unpack_map(raw: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on corrupt input; all mean the same
        raise FrameError("malformed", f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise FrameError("malformed", f"body is {type(body).__name__}, expected a map")
    if not all(isinstance(key, str) for key in body):
        raise FrameError("malformed", "map keys must be text")
    return body


def _header(body: dict[str, Any]) -> tuple[int, int, str]:
    version = body.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise FrameError(
            "version", f"schema version {version!r}, this build speaks {SCHEMA_VERSION}"
        )
    seq = _int_field(body, "seq", 0, MAX_SEQ, reason="header")
    t = _int_field(body, "t", 1, MAX_SEQ, reason="header")
    src = body.get("src")
    if not isinstance(src, str) or not 0 < len(src) <= MAX_SRC_LEN:
        raise FrameError("header", f"src must be text of 1..{MAX_SRC_LEN} characters")
    return seq, t, src


def _int_field(
    body: dict[str, Any], key: str, low: int, high: int, *, reason: str = "schema"
) -> int:
    value = body.get(key)
    # bool is an int subclass in Python; a True seq is a corrupt frame, not 1.
    if type(value) is not int or not low <= value <= high:
        raise FrameError(reason, f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _positions(body: dict[str, Any], key: str, joint_count: int | None) -> tuple[float, ...]:
    values = body.get(key)
    if not isinstance(values, list):
        raise FrameError("schema", f"{key} must be a list of numbers")
    expected = joint_count if joint_count is not None else len(values)
    if len(values) != expected or not 0 < len(values) <= MAX_JOINTS:
        raise FrameError("length", f"{key} has {len(values)} values, expected {expected}")
    out = []
    for value in values:
        if type(value) not in (float, int):
            raise FrameError("schema", f"{key} holds a {type(value).__name__}, expected numbers")
        number = float(value)
        if not math.isfinite(number) or abs(number) > MAX_ABS_POSITION:
            raise FrameError("non_finite", f"{key} holds {value!r}")
        out.append(number)
    return tuple(out)


def _video(seq: int, t: int, src: str, body: dict[str, Any], data: bytes) -> VideoFrame:
    width = _int_field(body, "w", 1, MAX_VIDEO_SIDE)
    height = _int_field(body, "h", 1, MAX_VIDEO_SIDE)
    encoding = body.get("enc")
    if not isinstance(encoding, str) or encoding not in VIDEO_ENCODINGS:
        raise FrameError(
            "schema", f"video encoding {encoding!r} is not one of {list(VIDEO_ENCODINGS)}"
        )
    bytes_per_pixel = VIDEO_ENCODINGS[encoding]
    if bytes_per_pixel and len(data) != width * height * bytes_per_pixel:
        raise FrameError("length", f"{len(data)} pixel bytes for {width}x{height} {encoding}")
    if not data:
        raise FrameError("length", "empty video frame")
    return VideoFrame(seq, t, src, width, height, encoding, bytes(data))
