"""Unit tests for presence documents and the discovery board (services/session_manager/presence.py).

Covers the encode/decode round trip, every way a payload can be refused (always PresenceError,
never anything else, which hypothesis checks on random bytes and random JSON), the topic helpers
and `station_of`, and `PresenceBoard`: online/offline/stale/unknown from silence (monotonic) and
from the age of a retained `ts` (wall clock), removal by an empty retained message, role filters.
Wall-clock time is always passed in or pinned; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.session_manager import presence as presence_module
from services.session_manager.presence import (
    CLOCK_SKEW_S,
    MAX_PRESENCE_BYTES,
    Presence,
    PresenceBoard,
    PresenceError,
    decode_presence,
    inbox_topic,
    presence_topic,
    station_of,
)

WALL = 1_795_433_390.0  # a fixed wall-clock time, seconds
NOW = 500.0  # a fixed monotonic time, seconds
JOINTS = ("shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "gripper.pos")
FIELDS = (
    "status",
    "role",
    "robot_type",
    "joints",
    "cameras",
    "busy",
    "session",
    "version",
    "pubkey",
    "ts",
)


def make_presence(**changes: Any) -> Presence:
    base = Presence(
        status="online",
        role="robot",
        robot_type="sim_so101_follower",
        joints=JOINTS,
        cameras=("front",),
        busy=False,
        session=None,
        version="0.1.0",
        pubkey="a2V5",
        ts=WALL,
    )
    return replace(base, **changes)


def good_doc() -> dict[str, Any]:
    return json.loads(make_presence().encode())


def encode_doc(doc: object) -> bytes:
    return json.dumps(doc).encode()


# --- encode / decode ---------------------------------------------------------------------------


def test_round_trip_keeps_every_field() -> None:
    original = make_presence(busy=True, session="s-1", cameras=("front", "wrist"), ts=WALL + 0.25)
    decoded = decode_presence(original.encode())
    assert decoded == original
    assert isinstance(decoded.joints, tuple) and isinstance(decoded.cameras, tuple)


def test_encoding_is_the_documented_json() -> None:
    doc = json.loads(make_presence().encode())
    assert set(doc) == set(FIELDS)
    assert doc["joints"] == list(JOINTS)
    assert doc["session"] is None and doc["busy"] is False


def test_decode_accepts_int_ts_and_teleop_role() -> None:
    doc = good_doc()
    doc["ts"] = 1_795_433_390
    doc["role"] = "teleop"
    decoded = decode_presence(encode_doc(doc))
    assert decoded.ts == 1_795_433_390.0 and isinstance(decoded.ts, float)
    assert decoded.role == "teleop"


def test_decode_accepts_missing_session_as_none() -> None:
    doc = good_doc()
    del doc["session"]
    assert decode_presence(encode_doc(doc)).session is None


def test_offline_keeps_identity_and_clears_the_session() -> None:
    busy = make_presence(busy=True, session="s-1")
    offline = busy.offline(ts=WALL + 5)
    assert offline.status == "offline" and offline.busy is False and offline.session is None
    assert offline.ts == WALL + 5
    assert offline.joints == busy.joints and offline.pubkey == busy.pubkey
    assert decode_presence(offline.encode()) == offline


def test_offline_honours_an_explicit_zero_ts() -> None:
    assert make_presence().offline(ts=0.0).ts == 0.0


def test_offline_defaults_to_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presence_module, "time", types.SimpleNamespace(time=lambda: WALL + 9))
    assert make_presence().offline().ts == WALL + 9


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b"\xff\xfe\xfa", b"{'status': 'online'}", b"[" * 5000, b"NaN x"],
    ids=["empty", "text", "truncated", "bad-utf8", "single-quotes", "deep-nesting", "garbage"],
)
def test_not_json_is_refused(payload: bytes) -> None:
    with pytest.raises(PresenceError):
        decode_presence(payload)


@pytest.mark.parametrize("value", [[], [1, 2], "online", 3, 1.5, True, None])
def test_a_json_value_that_is_not_an_object_is_refused(value: object) -> None:
    with pytest.raises(PresenceError, match="object"):
        decode_presence(encode_doc(value))


@pytest.mark.parametrize("missing", [f for f in FIELDS if f != "session"])
def test_each_missing_field_is_refused(missing: str) -> None:
    doc = good_doc()
    del doc[missing]
    with pytest.raises(PresenceError, match=missing):
        decode_presence(encode_doc(doc))


BAD_VALUES: list[tuple[str, object]] = [
    ("status", "away"),
    ("status", None),
    ("status", 1),
    ("status", ["online"]),
    ("role", "viewer"),
    ("role", None),
    ("role", {"robot": True}),
    ("robot_type", 7),
    ("robot_type", None),
    ("robot_type", "x" * 257),
    ("joints", "shoulder_pan.pos"),
    ("joints", None),
    ("joints", [1, 2]),
    ("joints", [""]),
    ("joints", ["x" * 65]),
    ("joints", [f"j{i}" for i in range(65)]),
    ("joints", {"a": 1}),
    ("cameras", "front"),
    ("cameras", [None]),
    ("cameras", [f"c{i}" for i in range(65)]),
    ("busy", 0),
    ("busy", 1),
    ("busy", "false"),
    ("busy", None),
    ("session", 5),
    ("session", ["s"]),
    ("session", "s" * 257),
    ("version", 1),
    ("version", None),
    ("pubkey", None),
    ("pubkey", ["k"]),
    ("ts", True),
    ("ts", False),
    ("ts", "1795433390"),
    ("ts", None),
    ("ts", [1.0]),
]


@pytest.mark.parametrize(
    ("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}"[:40] for k, v in BAD_VALUES]
)
def test_each_wrongly_typed_field_is_refused(key: str, value: object) -> None:
    doc = good_doc()
    doc[key] = value
    with pytest.raises(PresenceError):
        decode_presence(encode_doc(doc))


def test_limits_are_inclusive() -> None:
    doc = good_doc()
    doc["joints"] = [f"{i:02d}" + "x" * 62 for i in range(64)]  # 64 names of 64 characters
    doc["robot_type"] = "r" * 256
    assert len(decode_presence(encode_doc(doc)).joints) == 64


@pytest.mark.parametrize(
    "literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1" + b"0" * 400]
)
def test_non_finite_or_overflowing_ts_is_refused(literal: bytes) -> None:
    payload = json.dumps({**good_doc(), "ts": 0}).encode().replace(b'"ts": 0', b'"ts": ' + literal)
    assert literal in payload
    with pytest.raises(PresenceError, match="ts"):
        decode_presence(payload)


def test_oversize_payload_is_refused_even_if_valid() -> None:
    doc = good_doc()
    doc["padding"] = ""
    doc["padding"] = "p" * (MAX_PRESENCE_BYTES + 1 - len(encode_doc(doc)))
    payload = encode_doc(doc)
    assert len(payload) == MAX_PRESENCE_BYTES + 1
    with pytest.raises(PresenceError, match="bytes"):
        decode_presence(payload)
    doc["padding"] = doc["padding"][:-1]  # exactly at the cap: accepted, unknown keys ignored
    assert decode_presence(encode_doc(doc)) == make_presence()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_PRESENCE_BYTES + 64))
def test_random_bytes_raise_only_presence_error(payload: bytes) -> None:
    with contextlib.suppress(PresenceError):
        decode_presence(payload)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json_raises_only_presence_error(value: object) -> None:
    with contextlib.suppress(PresenceError):
        decode_presence(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_good_payloads_raise_only_presence_error(data: st.DataObject) -> None:
    """Near-valid bytes reach the field checks, which random bytes almost never do."""
    payload = bytearray(make_presence(busy=True, session="s-1").encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(st.sampled_from([b"[", b"{", b"]", b"}", b",", b'"', b"1e999", b"\\"]))
        if action == "insert":
            payload[at:at] = chunk
        elif action == "delete":
            del payload[at : at + len(chunk)]
        else:
            payload[at : at + len(chunk)] = chunk
    with contextlib.suppress(PresenceError):
        decode_presence(bytes(payload))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS)))
def test_random_field_values_over_a_good_document(overrides: dict[str, Any]) -> None:
    doc = {**good_doc(), **overrides}
    try:
        decoded = decode_presence(json.dumps(doc).encode())
    except PresenceError:
        return
    # Whatever got through is a well-typed presence.
    assert decoded.status in ("online", "offline") and decoded.role in ("robot", "teleop")
    assert isinstance(decoded.busy, bool) and math.isfinite(decoded.ts)
    assert all(isinstance(name, str) for name in decoded.joints + decoded.cameras)


# --- topics -------------------------------------------------------------------------------------


def test_topic_helpers() -> None:
    assert presence_topic("alice", "robot-3f9a2c") == "rdv/v1/alice/robot-3f9a2c/presence"
    assert inbox_topic("alice", "robot-3f9a2c") == "rdv/v1/alice/robot-3f9a2c/inbox"


def test_station_of_reads_back_the_helpers() -> None:
    assert station_of(presence_topic("alice", "robot-1"), "alice", "presence") == "robot-1"
    assert station_of(inbox_topic("alice", "teleop_a1"), "alice", "inbox") == "teleop_a1"
    assert station_of("rdv/v1/alice/" + "a" * 48 + "/presence", "alice", "presence") == "a" * 48


@pytest.mark.parametrize(
    "topic",
    [
        "rdv/v1/bob/robot-1/presence",  # another owner
        "rdv/v1/alicex/robot-1/presence",
        "rdv/v2/alice/robot-1/presence",
        "xdv/v1/alice/robot-1/presence",
        "rdv/v1/alice/robot-1/inbox",  # wrong leaf
        "rdv/v1/alice/robot-1/presence/extra",  # extra level
        "rdv/v1/alice/robot-1",  # too few levels
        "rdv/v1/alice/x/robot-1/presence",
        "/rdv/v1/alice/robot-1/presence",
        "rdv/v1/alice//presence",  # bad ids
        "rdv/v1/alice/Robot-1/presence",
        "rdv/v1/alice/-robot/presence",
        "rdv/v1/alice/robot 1/presence",
        "rdv/v1/alice/+/presence",
        "rdv/v1/alice/#/presence",
        "rdv/v1/alice/robot-1\n/presence",
        "rdv/v1/alice/" + "a" * 49 + "/presence",
    ],
)
def test_station_of_rejects_other_topics(topic: str) -> None:
    assert station_of(topic, "alice", "presence") is None


# --- the board ----------------------------------------------------------------------------------


def board_with(
    presence: Presence, received_s: float = NOW, interval_s: float = 1.0
) -> PresenceBoard:
    board = PresenceBoard(interval_s=interval_s)
    board.update("robot-1", presence, received_s)
    return board


def test_unknown_station() -> None:
    assert PresenceBoard().status("robot-1", NOW, WALL) == "unknown"


def test_fresh_online_station_is_online() -> None:
    assert board_with(make_presence()).status("robot-1", NOW, WALL) == "online"


def test_offline_status_wins_even_when_fresh() -> None:
    board = board_with(make_presence(status="offline"))
    assert board.status("robot-1", NOW, WALL) == "offline"
    assert board.status("robot-1", NOW + 100, WALL + 100) == "offline"  # not "stale"


def test_silence_beyond_three_intervals_is_stale() -> None:
    board = board_with(make_presence(), interval_s=2.0)
    assert board.stale_after_s == 6.0
    assert board.status("robot-1", NOW + 6.0, WALL) == "online"  # exactly 3 x: still online
    assert board.status("robot-1", NOW + 6.01, WALL) == "stale"


def test_a_refresh_brings_a_stale_station_back() -> None:
    board = board_with(make_presence())
    assert board.status("robot-1", NOW + 10, WALL + 10) == "stale"
    board.update("robot-1", make_presence(ts=WALL + 10), NOW + 10)
    assert board.status("robot-1", NOW + 10, WALL + 10) == "online"


def test_retained_presence_with_an_old_ts_is_stale_at_once() -> None:
    limit = 3 * 1.0 + CLOCK_SKEW_S
    just_ok = board_with(make_presence(ts=WALL - limit))  # received right now
    assert just_ok.status("robot-1", NOW, WALL) == "online"
    too_old = board_with(make_presence(ts=WALL - limit - 0.01))
    assert too_old.status("robot-1", NOW, WALL) == "stale"


def test_the_tolerated_clock_skew_is_configurable() -> None:
    board = PresenceBoard(interval_s=1.0, skew_s=5.0)
    board.update("robot-1", make_presence(ts=WALL - 8.0), NOW)
    assert board.status("robot-1", NOW, WALL) == "online"
    board.update("robot-1", make_presence(ts=WALL - 8.01), NOW)
    assert board.status("robot-1", NOW, WALL) == "stale"
    assert PresenceBoard().skew_s == CLOCK_SKEW_S


def test_a_ts_from_the_future_is_not_stale() -> None:
    board = board_with(make_presence(ts=WALL + CLOCK_SKEW_S))
    assert board.status("robot-1", NOW, WALL) == "online"


def test_status_reads_the_wall_clock_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    board = board_with(make_presence(ts=WALL))
    monkeypatch.setattr(presence_module, "time", types.SimpleNamespace(time=lambda: WALL + 1))
    assert board.status("robot-1", NOW) == "online"
    monkeypatch.setattr(presence_module, "time", types.SimpleNamespace(time=lambda: WALL + 40))
    assert board.status("robot-1", NOW) == "stale"


def test_empty_retained_message_removes_the_station() -> None:
    board = board_with(make_presence())
    board.update("robot-1", None, NOW + 1)
    assert board.status("robot-1", NOW + 1, WALL) == "unknown"
    assert "robot-1" not in board.stations
    board.update("never-seen", None, NOW + 1)  # removing an unknown station is harmless
    assert board.stations == {}


def test_update_replaces_the_previous_sighting() -> None:
    board = board_with(make_presence())
    board.update("robot-1", make_presence(busy=True, session="s"), NOW + 2)
    sighting = board.stations["robot-1"]
    assert sighting.presence.busy and sighting.received_s == NOW + 2


def test_online_lists_only_online_stations_and_filters_by_role(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(presence_module, "time", types.SimpleNamespace(time=lambda: WALL))
    board = PresenceBoard()
    board.update("robot-1", make_presence(), NOW)
    board.update("robot-2", make_presence(busy=True, session="s"), NOW)  # busy is still online
    board.update("robot-off", make_presence(status="offline"), NOW)
    board.update("robot-silent", make_presence(), NOW - 10)
    board.update("robot-old", make_presence(ts=WALL - 100), NOW)
    board.update("teleop-1", make_presence(role="teleop", robot_type="sim_so101_leader"), NOW)
    assert set(board.online(NOW)) == {"robot-1", "robot-2", "teleop-1"}
    robots = board.online(NOW, role="robot")
    assert set(robots) == {"robot-1", "robot-2"}
    assert robots["robot-2"].busy is True
    assert set(board.online(NOW, role="teleop")) == {"teleop-1"}
    assert board.online(NOW + 10) == {}  # everyone silent for 10 s
