"""Unit and fuzz tests for the bus frame codec (services/bus/frames.py).

Covers: encode/decode round trips of every frame type (video's pixels as the raw third part),
one FrameError with the right `reason` per validation rule, header-key collisions in message
frames, and hypothesis fuzzing (random parts, random msgpack bodies, valid round trips, byte
mutations of valid frames): `decode` raises nothing but FrameError and never returns a frame
that breaks the invariants.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.bus.frames import (
    FOLLOWER_STATES,
    HEADER_KEYS,
    MAX_ABS_POSITION,
    MAX_JOINTS,
    MAX_SEQ,
    MAX_SRC_LEN,
    MAX_VIDEO_SIDE,
    REASONS,
    SCHEMA_VERSION,
    VIDEO_ENCODINGS,
    FollowerFrame,
    Frame,
    FrameEncoder,
    FrameError,
    JointFrame,
    MessageFrame,
    VideoFrame,
    decode,
)

SCHEMAS = ("joints", "follower", "video", "message")
BIG = 1 << 24  # a max_bytes that never gets in the way
FUZZ = settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T0 = 1_700_000_000_000_000_000


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def header(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "seq": 7, "t": T0, "src": "station-a"}
    body.update(overrides)
    return body


def joints_body(**overrides: Any) -> dict[str, Any]:
    return {**header(), "pos": [0.5, -12.25, 90.0, 3, 0.0, 100.0], **overrides}


def follower_body(**overrides: Any) -> dict[str, Any]:
    body = {
        **header(),
        "pos": [1.0, 2.0, 3.0],
        "goal": [1.5, 2.5, 3.5],
        "state": "tracking",
        "cmd_seq": 41,
        "cmd_t": T0 - 5,
    }
    body.update(overrides)
    return body


def video_body(**overrides: Any) -> dict[str, Any]:
    return {**header(), "w": 4, "h": 2, "enc": "bgr24", **overrides}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    assert key in body
    return {k: v for k, v in body.items() if k != key}


def reason_of(
    parts: list[bytes], schema: str, *, max_bytes: int = BIG, joint_count: int | None = None
) -> str:
    with pytest.raises(FrameError) as info:
        decode(parts, schema, max_bytes=max_bytes, joint_count=joint_count)
    assert info.value.reason in REASONS
    return info.value.reason


def check_invariants(
    frame: Frame, parts: list[bytes], schema: str, joint_count: int | None = None
) -> None:
    """Everything a receiver may rely on for a frame that `decode` returned."""
    body = msgpack.unpackb(parts[1], raw=False)
    assert type(body["v"]) is int and body["v"] == SCHEMA_VERSION
    assert type(frame.seq) is int and 0 <= frame.seq <= MAX_SEQ
    assert type(frame.t) is int and 1 <= frame.t <= MAX_SEQ
    assert isinstance(frame.src, str) and 1 <= len(frame.src) <= MAX_SRC_LEN

    def positions_ok(values: tuple[float, ...], count: int | None) -> None:
        assert isinstance(values, tuple) and 1 <= len(values) <= MAX_JOINTS
        if count is not None:
            assert len(values) == count
        for value in values:
            assert type(value) is float
            assert math.isfinite(value) and abs(value) <= MAX_ABS_POSITION

    if schema == "joints":
        assert isinstance(frame, JointFrame)
        positions_ok(frame.pos, joint_count)
    elif schema == "follower":
        assert isinstance(frame, FollowerFrame)
        positions_ok(frame.pos, joint_count)
        positions_ok(frame.goal, len(frame.pos))
        assert frame.state in FOLLOWER_STATES
        assert type(frame.cmd_seq) is int and -1 <= frame.cmd_seq <= MAX_SEQ
        assert type(frame.cmd_t) is int and 0 <= frame.cmd_t <= MAX_SEQ
    elif schema == "video":
        assert isinstance(frame, VideoFrame)
        assert type(frame.width) is int and 1 <= frame.width <= MAX_VIDEO_SIDE
        assert type(frame.height) is int and 1 <= frame.height <= MAX_VIDEO_SIDE
        assert frame.encoding in VIDEO_ENCODINGS
        assert isinstance(frame.data, bytes) and frame.data
        bytes_per_pixel = VIDEO_ENCODINGS[frame.encoding]
        if bytes_per_pixel:
            assert len(frame.data) == frame.width * frame.height * bytes_per_pixel
    else:
        assert isinstance(frame, MessageFrame)
        assert all(isinstance(key, str) for key in frame.fields)
        assert not set(frame.fields) & set(HEADER_KEYS)


# --- round trips ---------------------------------------------------------------------------


def test_joint_frame_round_trip() -> None:
    frame = JointFrame(seq=3, t=T0, src="station-a", pos=(0.0, -1.5, 45.25, 100.0, -0.0, 7.0))
    parts = FrameEncoder().encode("joints.leader", frame)
    assert parts[0] == b"joints.leader" and len(parts) == 2
    assert decode(parts, "joints", max_bytes=4096, joint_count=6) == frame


def test_joint_frame_int_positions_decode_as_floats() -> None:
    parts = [b"joints.command", pack(joints_body(pos=[1, -2, 3]))]
    frame = decode(parts, "joints", max_bytes=4096)
    assert isinstance(frame, JointFrame)
    assert frame.pos == (1.0, -2.0, 3.0)
    assert all(type(value) is float for value in frame.pos)


def test_follower_frame_round_trip() -> None:
    frame = FollowerFrame(
        seq=MAX_SEQ,
        t=T0,
        src="robot",
        pos=(1.0, 2.0),
        goal=(1.25, 2.5),
        state="stale",
        cmd_seq=-1,
        cmd_t=0,
    )
    parts = FrameEncoder().encode("joints.follower", frame)
    assert decode(parts, "follower", max_bytes=4096, joint_count=2) == frame


@pytest.mark.parametrize("encoding", sorted(VIDEO_ENCODINGS))
def test_video_frame_round_trip_with_raw_third_part(encoding: str) -> None:
    width, height = 16, 8
    bytes_per_pixel = VIDEO_ENCODINGS[encoding] or 1
    data = bytes(range(256)) * (width * height * bytes_per_pixel // 256 + 1)
    data = data[: width * height * bytes_per_pixel]
    frame = VideoFrame(seq=1, t=T0, src="cam", width=width, height=height, encoding=encoding,
                       data=data)  # fmt: skip
    parts = FrameEncoder().encode("video.front", frame)
    assert len(parts) == 3
    assert parts[2] == data  # pixels travel raw, not inside the msgpack body
    body = msgpack.unpackb(parts[1], raw=False)
    assert body == {"v": 1, "seq": 1, "t": T0, "src": "cam", "w": 16, "h": 8, "enc": encoding}
    decoded = decode(parts, "video", max_bytes=1 << 20)
    assert decoded == frame
    assert isinstance(decoded, VideoFrame) and decoded.data == data


def test_message_frame_round_trip() -> None:
    fields = {
        "cmd": "estop",
        "reason": "button",
        "nested": {"a": [1, 2.5, None, True], "b": b"\x00\xff"},
        "count": -3,
    }
    frame = MessageFrame(seq=0, t=T0, src="viewer", fields=fields)
    parts = FrameEncoder().encode("session.control", frame)
    decoded = decode(parts, "message", max_bytes=4096)
    assert decoded == frame


def test_encoder_is_reusable_across_frames() -> None:
    encoder = FrameEncoder()
    frames = [JointFrame(seq, T0 + seq, "s", (float(seq), 1.0)) for seq in range(5)]
    decoded = [decode(encoder.encode("joints.leader", f), "joints", max_bytes=4096) for f in frames]
    assert decoded == frames


@pytest.mark.parametrize("key", HEADER_KEYS)
def test_message_field_colliding_with_header_is_refused(key: str) -> None:
    frame = MessageFrame(seq=1, t=T0, src="s", fields={"ok": 1, key: 99})
    with pytest.raises(ValueError, match=repr(key)) as info:
        FrameEncoder().encode("session.status", frame)
    assert not isinstance(info.value, FrameError)


# --- validation: one rule, one reason ------------------------------------------------------


def test_frame_error_carries_reason_and_detail() -> None:
    error = FrameError("length", "pos has 5 values, expected 6")
    assert error.reason == "length"
    assert error.detail == "pos has 5 values, expected 6"
    assert str(error) == "length: pos has 5 values, expected 6"
    assert isinstance(error, ValueError)


@pytest.mark.parametrize(
    ("schema", "n_parts"),
    [("joints", 0), ("joints", 1), ("joints", 3), ("follower", 4), ("message", 1),
     ("message", 3), ("video", 2), ("video", 4)],
)  # fmt: skip
def test_wrong_number_of_parts(schema: str, n_parts: int) -> None:
    body = {"joints": joints_body(), "follower": follower_body(), "message": header(),
            "video": video_body()}[schema]  # fmt: skip
    parts = [b"topic", pack(body), b"\x00" * 24, b"x"][:n_parts]
    assert reason_of(parts, schema) == "parts"


def test_too_large_counts_every_part_and_allows_the_cap() -> None:
    parts = [b"joints.leader", pack(joints_body())]
    size = sum(map(len, parts))
    assert isinstance(decode(parts, "joints", max_bytes=size), JointFrame)
    assert reason_of(parts, "joints", max_bytes=size - 1) == "too_large"
    video = [b"video.front", pack(video_body()), b"\x01" * 24]
    video_size = sum(map(len, video))
    assert isinstance(decode(video, "video", max_bytes=video_size), VideoFrame)
    assert reason_of(video, "video", max_bytes=video_size - 1) == "too_large"


def test_too_large_is_checked_before_parsing() -> None:
    assert reason_of([b"joints.leader", b"\xc1" * 5000], "joints", max_bytes=4096) == "too_large"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used in msgpack
        pack(joints_body())[:-3],  # truncated
        pack(joints_body()) + b"\x00",  # trailing bytes
        pack([1, 2, 3]),  # not a map
        pack("text"),
        pack(12),
        pack(None),
        pack(b"\x80"),
        pack({1: "int key"}),
        pack({b"v": 1, b"seq": 1, b"t": 1, b"src": b"s", b"pos": [1.0]}),  # bytes keys
        pack({**joints_body(), 5: 1}),  # one non-text key among valid ones
        b"\x81\x92\x01\x02\x03",  # an array as a map key
        b"\x81\xa1v\xa2\xff\xfe",  # invalid UTF-8 in a str
    ],
    ids=lambda b: b[:12].hex() or "empty",
)
def test_malformed(body: bytes) -> None:
    for schema in SCHEMAS:
        parts = [b"t", body, b"\x00\x00\x00"] if schema == "video" else [b"t", body]
        assert reason_of(parts, schema) == "malformed", schema


@pytest.mark.parametrize(
    "version", ["missing", 0, 2, -1, 2**40, True, False, 1.0, "1", None, [1], b"\x01"]
)
def test_version(version: Any) -> None:
    body = without(joints_body(), "v") if version == "missing" else joints_body(v=version)
    assert reason_of([b"joints.leader", pack(body)], "joints") == "version"
    message = without(header(), "v") if version == "missing" else header(v=version)
    assert reason_of([b"health", pack(message)], "message") == "version"


HEADER_CASES: list[tuple[str, Any]] = [
    ("seq", -1),
    ("seq", True),
    ("seq", False),
    ("seq", 1.0),
    ("seq", "3"),
    ("seq", None),
    ("seq", MAX_SEQ + 1),
    ("t", 0),
    ("t", -5),
    ("t", True),
    ("t", 1.5),
    ("t", "now"),
    ("t", 2**64 - 1),
    ("src", ""),
    ("src", "x" * (MAX_SRC_LEN + 1)),
    ("src", b"station"),
    ("src", 5),
    ("src", None),
    ("src", ["a"]),
]


@pytest.mark.parametrize(("key", "value"), HEADER_CASES)
def test_header_bad_value(key: str, value: Any) -> None:
    for schema, body in (("joints", joints_body()), ("message", header()),
                         ("follower", follower_body())):  # fmt: skip
        body[key] = value
        assert reason_of([b"x", pack(body)], schema) == "header", schema
    body = video_body()
    body[key] = value
    assert reason_of([b"video.front", pack(body), b"\x00" * 24], "video") == "header"


@pytest.mark.parametrize("key", ["seq", "t", "src"])
def test_header_missing_key(key: str) -> None:
    assert reason_of([b"joints.leader", pack(without(joints_body(), key))], "joints") == "header"
    assert reason_of([b"health", pack(without(header(), key))], "message") == "header"


def test_header_boundaries_are_accepted() -> None:
    body = joints_body(seq=0, t=1, src="x" * MAX_SRC_LEN)
    frame = decode([b"joints.leader", pack(body)], "joints", max_bytes=BIG)
    assert (frame.seq, frame.t, frame.src) == (0, 1, "x" * MAX_SRC_LEN)
    body = joints_body(seq=MAX_SEQ, t=MAX_SEQ, src="é")
    frame = decode([b"joints.leader", pack(body)], "joints", max_bytes=BIG)
    assert (frame.seq, frame.t, frame.src) == (MAX_SEQ, MAX_SEQ, "é")


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        ("joints", without(joints_body(), "pos")),
        ("joints", joints_body(pos="1,2,3")),
        ("joints", joints_body(pos={"a": 1.0})),
        ("joints", joints_body(pos=1.0)),
        ("joints", joints_body(pos=[1.0, "2.0"])),
        ("joints", joints_body(pos=[1.0, None])),
        ("joints", joints_body(pos=[1.0, True])),
        ("joints", joints_body(pos=[1.0, [2.0]])),
        ("follower", without(follower_body(), "goal")),
        ("follower", without(follower_body(), "state")),
        ("follower", follower_body(state="dancing")),
        ("follower", follower_body(state=None)),
        ("follower", follower_body(state=["tracking"])),
        ("follower", follower_body(state={"tracking": 1})),
        ("follower", without(follower_body(), "cmd_seq")),
        ("follower", follower_body(cmd_seq=-2)),
        ("follower", follower_body(cmd_seq=True)),
        ("follower", follower_body(cmd_seq=1.0)),
        ("follower", without(follower_body(), "cmd_t")),
        ("follower", follower_body(cmd_t=-1)),
        ("follower", follower_body(goal=[1.0, "x", 3.0])),
        ("video", without(video_body(), "w")),
        ("video", video_body(w=0)),
        ("video", video_body(h=MAX_VIDEO_SIDE + 1)),
        ("video", video_body(w=True)),
        ("video", video_body(h=2.0)),
        ("video", video_body(enc="h264")),
        ("video", video_body(enc=None)),
        ("video", video_body(enc=["bgr24"])),  # unhashable: must not raise TypeError
        ("video", video_body(enc={"bgr24": 3})),
        ("video", without(video_body(), "enc")),
        ("nope", header()),  # unknown schema name
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema(schema: str, body: dict[str, Any]) -> None:
    parts = [b"topic", pack(body)] + ([b"\x00" * 24] if schema == "video" else [])
    assert reason_of(parts, schema) == "schema"


@pytest.mark.parametrize(
    ("schema", "body", "joint_count"),
    [
        ("joints", joints_body(pos=[]), None),
        ("joints", joints_body(pos=[0.0] * (MAX_JOINTS + 1)), None),
        ("joints", joints_body(pos=[0.0] * 5), 6),
        ("joints", joints_body(pos=[0.0] * 7), 6),
        ("joints", joints_body(pos=[0.0]), 0),
        ("follower", follower_body(pos=[1.0, 2.0]), 3),
        ("follower", follower_body(goal=[1.0, 2.0]), None),
        ("follower", follower_body(goal=[1.0, 2.0, 3.0, 4.0]), 3),
        ("follower", follower_body(pos=[], goal=[]), None),
    ],
)
def test_length_of_positions(schema: str, body: dict[str, Any], joint_count: int | None) -> None:
    assert reason_of([b"t", pack(body)], schema, joint_count=joint_count) == "length"


def test_joint_count_boundaries_are_accepted() -> None:
    frame = decode([b"t", pack(joints_body(pos=[0.0] * MAX_JOINTS))], "joints", max_bytes=BIG)
    assert isinstance(frame, JointFrame) and len(frame.pos) == MAX_JOINTS
    frame = decode([b"t", pack(joints_body(pos=[2.0]))], "joints", max_bytes=BIG, joint_count=1)
    assert isinstance(frame, JointFrame) and frame.pos == (2.0,)


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (video_body(), b"\x00" * 23),  # 4x2 bgr24 wants 24
        (video_body(), b"\x00" * 25),
        (video_body(enc="gray8"), b"\x00" * 24),  # 4x2 gray8 wants 8
        (video_body(enc="jpeg"), b""),
        (video_body(enc="rgb24", w=1, h=1), b""),
    ],
)
def test_length_of_video(body: dict[str, Any], data: bytes) -> None:
    assert reason_of([b"video.front", pack(body), data], "video") == "length"


@pytest.mark.parametrize(
    "bad",
    [math.nan, -math.nan, math.inf, -math.inf, 1e300, -1e300, MAX_ABS_POSITION * 1.0001,
     2**63, -(2**63)],
    ids=repr,
)  # fmt: skip
def test_non_finite(bad: float) -> None:
    body = joints_body(pos=[0.0, bad, 1.0])
    assert reason_of([b"joints.leader", pack(body)], "joints") == "non_finite"
    for key in ("pos", "goal"):
        body = follower_body(**{key: [1.0, 2.0, bad]})
        assert reason_of([b"joints.follower", pack(body)], "follower") == "non_finite", key


def test_non_finite_single_precision_float() -> None:
    # msgpack float32 NaN (0xca) must be caught just like float64.
    nan32 = b"\xca\x7f\xc0\x00\x00"
    body = pack(without(joints_body(), "pos"))
    # Append the "pos" key by hand: bump the fixmap size and add pos: [nan32].
    assert body[0] == 0x84
    raw = bytes([0x85]) + body[1:] + b"\xa3pos\x91" + nan32
    assert reason_of([b"joints.leader", raw], "joints") == "non_finite"


def test_position_limit_is_inclusive() -> None:
    body = joints_body(pos=[MAX_ABS_POSITION, -MAX_ABS_POSITION])
    frame = decode([b"joints.leader", pack(body)], "joints", max_bytes=BIG)
    assert isinstance(frame, JointFrame) and frame.pos == (MAX_ABS_POSITION, -MAX_ABS_POSITION)


def test_message_drops_header_keys_from_fields() -> None:
    frame = decode([b"health", pack(header(process="camera", ok=True))], "message", max_bytes=BIG)
    assert isinstance(frame, MessageFrame)
    assert frame.fields == {"process": "camera", "ok": True}


# --- property and fuzz tests ---------------------------------------------------------------

joint_counts = st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_JOINTS + 1))


@FUZZ
@given(
    parts=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    schema=st.sampled_from(SCHEMAS),
    joint_count=joint_counts,
    max_bytes=st.sampled_from([16, 256, 4096, BIG]),
)
def test_fuzz_random_parts_only_raise_frame_error(
    parts: list[bytes], schema: str, joint_count: int | None, max_bytes: int
) -> None:
    try:
        frame = decode(parts, schema, max_bytes=max_bytes, joint_count=joint_count)
    except FrameError as error:
        assert error.reason in REASONS
        event(f"rejected: {error.reason}")
        return
    event(f"accepted: {schema}")
    check_invariants(frame, parts, schema, joint_count)


msgpack_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0, 0.5, MAX_ABS_POSITION + 1]),
    st.text(max_size=80),
    st.binary(max_size=40),
)


def msgpack_structures(keys: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        msgpack_leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=8), st.dictionaries(keys, children, max_size=6)
        ),
        max_leaves=40,
    )


# Anything msgpack can carry (non-text map keys included), and the same with text keys only.
msgpack_values = msgpack_structures(
    st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1))
)
text_keyed_values = msgpack_structures(st.text(max_size=8))


def near(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes anything at all: reaches the deeper checks."""
    return st.integers(0, 7).flatmap(lambda pick: valid if pick else text_keyed_values)


good_number = st.one_of(
    st.floats(min_value=-MAX_ABS_POSITION, max_value=MAX_ABS_POSITION),
    st.integers(min_value=-1000, max_value=1000),
)
positions = st.integers(0, 2).flatmap(
    lambda pick: (
        st.lists(good_number, min_size=1, max_size=8)
        if pick
        else st.lists(st.one_of(good_number, msgpack_leaves), min_size=0, max_size=MAX_JOINTS + 2)
    )
)
small_side = st.one_of(st.integers(min_value=1, max_value=4), st.integers(-1, MAX_VIDEO_SIDE + 1))
header_fields: dict[str, st.SearchStrategy[Any]] = {
    "v": near(st.just(SCHEMA_VERSION)),
    "seq": near(st.one_of(st.integers(0, 2**20), st.integers(-2, 2**64 - 1))),
    "t": near(st.one_of(st.integers(1, 2**62), st.integers(-1, 2**64 - 1))),
    "src": near(st.text(min_size=0, max_size=MAX_SRC_LEN + 2)),
}
payload_fields: dict[str, st.SearchStrategy[Any]] = {
    "pos": near(positions),
    "goal": near(positions),
    "state": near(st.sampled_from([*FOLLOWER_STATES, "bogus"])),
    "cmd_seq": near(st.one_of(st.integers(-1, 2**20), st.integers(-3, 2**64 - 1))),
    "cmd_t": near(st.one_of(st.integers(0, 2**62), st.integers(-3, 2**64 - 1))),
    "w": near(small_side),
    "h": near(small_side),
    "enc": near(st.sampled_from([*VIDEO_ENCODINGS, "h264"])),
    "extra": text_keyed_values,
}
# Bodies with a (mostly valid) header, bodies with any subset of the known keys, and anything.
bodies = st.integers(0, 4).flatmap(
    lambda pick: (
        (
            msgpack_values,
            st.fixed_dictionaries({}, optional={**header_fields, **payload_fields}),
        )[pick]
        if pick < 2
        else st.fixed_dictionaries(header_fields, optional=payload_fields)
    )
)


def pixels_for(body: Any) -> bytes | None:
    """The pixel part a body claims, when it claims a plausible one."""
    if not isinstance(body, dict):
        return None
    width, height, encoding = body.get("w"), body.get("h"), body.get("enc")
    if type(width) is not int or type(height) is not int or not isinstance(encoding, str):
        return None
    if not (0 < width <= 64 and 0 < height <= 64):
        return None
    return b"\x07" * (width * height * VIDEO_ENCODINGS.get(encoding, 1) or 5)


@FUZZ
@given(
    body=bodies,
    schema=st.sampled_from(SCHEMAS),
    joint_count=joint_counts,
    pixels=st.one_of(st.none(), st.none(), st.binary(max_size=64)),
)
def test_fuzz_msgpack_bodies_are_rejected_or_valid(
    body: Any, schema: str, joint_count: int | None, pixels: bytes | None
) -> None:
    if pixels is None:
        pixels = pixels_for(body) or b""
    try:
        raw = pack(body)
    except (ValueError, OverflowError, TypeError):
        return  # not representable in msgpack (e.g. int key out of range): nothing to send
    parts = [b"topic", raw, pixels] if schema == "video" else [b"topic", raw]
    try:
        frame = decode(parts, schema, max_bytes=BIG, joint_count=joint_count)
    except FrameError as error:
        assert error.reason in REASONS
        event(f"rejected: {error.reason}")
        return
    event(f"accepted: {schema}")
    check_invariants(frame, parts, schema, joint_count)


finite_positions = st.lists(
    st.floats(min_value=-MAX_ABS_POSITION, max_value=MAX_ABS_POSITION, allow_subnormal=True),
    min_size=1,
    max_size=MAX_JOINTS,
).map(tuple)
seqs = st.integers(min_value=0, max_value=MAX_SEQ)
times = st.integers(min_value=1, max_value=MAX_SEQ)
srcs = st.text(min_size=1, max_size=MAX_SRC_LEN)
joint_frames = st.builds(JointFrame, seq=seqs, t=times, src=srcs, pos=finite_positions)


@settings(max_examples=300, deadline=None, database=None)
@given(frame=joint_frames, topic=st.sampled_from(["joints.leader", "joints.command"]))
def test_valid_joint_frames_round_trip_exactly(frame: JointFrame, topic: str) -> None:
    parts = FrameEncoder().encode(topic, frame)
    decoded = decode(parts, "joints", max_bytes=4096, joint_count=len(frame.pos))
    assert decoded == frame
    # Bit-exact, not just ==: -0.0 stays -0.0.
    assert [math.copysign(1.0, p) for p in decoded.pos] == [
        math.copysign(1.0, p) for p in frame.pos
    ]


@st.composite
def follower_frames(draw: st.DrawFn) -> FollowerFrame:
    pos = draw(finite_positions)
    goal = draw(st.lists(st.floats(-1000.0, 1000.0), min_size=len(pos), max_size=len(pos)))
    return FollowerFrame(
        seq=draw(seqs),
        t=draw(times),
        src=draw(srcs),
        pos=pos,
        goal=tuple(goal),
        state=draw(st.sampled_from(FOLLOWER_STATES)),
        cmd_seq=draw(st.integers(min_value=-1, max_value=MAX_SEQ)),
        cmd_t=draw(st.integers(min_value=0, max_value=MAX_SEQ)),
    )


@st.composite
def video_frames(draw: st.DrawFn) -> VideoFrame:
    encoding = draw(st.sampled_from(sorted(VIDEO_ENCODINGS)))
    width, height = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    size = width * height * VIDEO_ENCODINGS[encoding] or draw(st.integers(1, 64))
    data = draw(st.binary(min_size=size, max_size=size))
    return VideoFrame(draw(seqs), draw(times), draw(srcs), width, height, encoding, data)


message_frames = st.builds(
    MessageFrame,
    seq=seqs,
    t=times,
    src=srcs,
    fields=st.dictionaries(
        st.text(max_size=10).filter(lambda key: key not in HEADER_KEYS),
        text_keyed_values,
        max_size=5,
    ),
)

SCHEMA_OF = {JointFrame: "joints", FollowerFrame: "follower", VideoFrame: "video",
             MessageFrame: "message"}  # fmt: skip
valid_frames = st.one_of(joint_frames, follower_frames(), video_frames(), message_frames)


@settings(max_examples=200, deadline=None, database=None)
@given(frame=st.one_of(follower_frames(), video_frames()))
def test_valid_follower_and_video_frames_round_trip(frame: Frame) -> None:
    parts = FrameEncoder().encode("x", frame)
    assert decode(parts, SCHEMA_OF[type(frame)], max_bytes=BIG) == frame


@st.composite
def mutated(draw: st.DrawFn) -> tuple[list[bytes], str]:
    frame = draw(valid_frames)
    parts = [bytearray(part) for part in FrameEncoder().encode("topic", frame)]
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        # Mostly the body (where the parser lives), sometimes any part.
        index = draw(st.sampled_from([1, 1, 1, len(parts) - 1]))
        part = parts[index]
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if op == "insert" or not part:
            where = draw(st.integers(0, len(part)))
            part[where:where] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            where = draw(st.integers(0, len(part) - 1))
            del part[where : where + draw(st.integers(1, 4))]
        elif op == "flip":
            where = draw(st.integers(0, len(part) - 1))
            part[where] ^= 1 << draw(st.integers(0, 7))
        else:
            where = draw(st.integers(0, len(part) - 1))
            part[where] = draw(st.integers(0, 255))
    return [bytes(part) for part in parts], SCHEMA_OF[type(frame)]


@FUZZ
@given(case=mutated(), joint_count=joint_counts)
def test_fuzz_mutated_valid_frames(case: tuple[list[bytes], str], joint_count: int | None) -> None:
    parts, schema = case
    try:
        frame = decode(parts, schema, max_bytes=BIG, joint_count=joint_count)
    except FrameError as error:
        assert error.reason in REASONS
        event(f"rejected: {error.reason}")
        return
    event(f"accepted: {schema}")
    check_invariants(frame, parts, schema, joint_count)
