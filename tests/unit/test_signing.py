"""Unit tests for signed inbox envelopes (services/session_manager/signing.py).

Covers canonical() (docs/rendezvous.md's exact bytes); sign_envelope/Verifier round trips, also
after the JSON is re-serialised (whitespace, key order, escapes); every reject reason (tampered
body, kind, sender or ts; wrong `to`; unknown sender; a presented key that differs from the
trusted one; stale in both directions; replay; garbage, oversize, wrongly typed fields);
rdv_signaling_rejected_total{reason} and once-per-burst logging; the replay cache's expiry and
bound; trust on first use (only with a verifying signature, a fresh message and a presented
key; once; never over a different key). Hypothesis fuzzes random bytes, random JSON, random
envelope-shaped objects (signed or not) and mutations of a valid envelope's bytes: verify raises
nothing but SignatureRejected, never from an internal error, and accepts a mutation only when
its meaning is unchanged.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.session_manager.identity import (
    Identity,
    TrustRoster,
    encode_public_key,
    register,
)
from services.session_manager.signing import (
    KINDS,
    MAX_ENVELOPE_BYTES,
    MAX_SKEW_S,
    REJECT_REASONS,
    Envelope,
    SignatureRejected,
    Verifier,
    canonical,
    sign_envelope,
)

T0 = 1_795_433_390.12
BODY = {
    "session": "s-1",
    "joints": ["shoulder_pan.pos", "gripper.pos"],
    "reply_to": "x",
    "corr": "c",
}
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SIGNING_LOGGER = "services.session_manager.signing"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Stations:
    """A robot and a teleop, each with its own config dir; the robot trusts the teleop."""

    def __init__(self, root: Path) -> None:
        self.robot_dir, self.teleop_dir, self.stranger_dir = (
            root / "robot",
            root / "teleop",
            root / "stranger",
        )
        self.robot = self._make(self.robot_dir, "robot-aaaaaa")
        self.teleop = self._make(self.teleop_dir, "teleop-bbbbbb")
        self.stranger = self._make(self.stranger_dir, "teleop-cccccc")
        self.roster = TrustRoster.load(self.robot_dir)
        self.roster.add(self.teleop.station_id, self.teleop.public_key_b64)

    @staticmethod
    def _make(directory: Path, station_id: str) -> Identity:
        identity, _ = register(
            directory, owner="alice", broker_url="mqtt://127.0.0.1", station_id=station_id
        )
        return identity

    def verifier(self, clock: Callable[[], float] | None = None, **kwargs: Any) -> Verifier:
        return Verifier(self.robot.station_id, self.roster, clock=clock or Clock(), **kwargs)

    def request(self, **overrides: Any) -> bytes:
        """A valid session.request from the teleop to the robot, at T0."""
        options: dict[str, Any] = {
            "identity": self.teleop,
            "kind": "session.request",
            "to": self.robot.station_id,
            "body": BODY,
            "now": T0,
            **overrides,
        }
        return sign_envelope(**options)


@pytest.fixture
def stations(tmp_path: Path) -> Stations:
    return Stations(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Stations:
    """For hypothesis tests, which must not use function-scoped fixtures; read-only."""
    return Stations(tmp_path_factory.mktemp("stations"))


def rejected(verifier: Verifier, payload: Any, presented: str | None = None) -> SignatureRejected:
    with pytest.raises(SignatureRejected) as raised:
        verifier.verify(payload, presented_key_b64=presented)
    assert raised.value.reason in REJECT_REASONS
    assert not raised.value.detail.startswith("internal error"), raised.value.detail
    return raised.value


def resign(identity: Identity, obj: dict[str, Any]) -> bytes:
    """obj (with any sig dropped) signed by identity, as the sender would."""
    unsigned = {name: value for name, value in obj.items() if name != "sig"}
    sig = base64.b64encode(identity.sign(canonical(unsigned))).decode()
    return canonical({**unsigned, "sig": sig})


def rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("rdv_signaling_rejected_total", {"reason": reason}) or 0.0


# --- canonical and signing ------------------------------------------------------------------


def test_canonical_is_the_contract_json() -> None:
    obj = {"b": [1, 2.5, None, True], "a": {"z": "é", "y": "\u2603"}, "c": 'q"\n'}
    expected = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical(obj) == expected.encode("utf-8")
    assert canonical(obj) == '{"a":{"y":"☃","z":"é"},"b":[1,2.5,null,true],"c":"q\\"\\n"}'.encode()
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})  # not JSON: no peer could parse it back


def test_sign_then_verify_round_trip(stations: Stations) -> None:
    payload = stations.request()
    envelope = stations.verifier().verify(payload)
    assert envelope == Envelope(
        kind="session.request",
        sender=stations.teleop.station_id,
        to=stations.robot.station_id,
        ts=T0,
        nonce=envelope.nonce,
        body=BODY,
    )
    wire = json.loads(payload)
    assert payload == canonical(wire)  # the wire form is itself canonical
    assert set(wire) == {"v", "kind", "from", "to", "ts", "nonce", "body", "sig"}
    assert wire["v"] == 1 and len(wire["nonce"]) == 32 and int(wire["nonce"], 16) >= 0
    assert len(base64.b64decode(wire["sig"])) == 64


def test_every_kind_round_trips_and_nonces_are_fresh(stations: Stations) -> None:
    verifier = stations.verifier()
    nonces = set()
    for kind in KINDS:
        envelope = verifier.verify(stations.request(kind=kind, body={"session": "s"}))
        assert envelope.kind == kind
        nonces.add(envelope.nonce)
    assert len(nonces) == len(KINDS)


def test_now_defaults_to_the_wall_clock(stations: Stations) -> None:
    payload = sign_envelope(stations.teleop, "session.end", stations.robot.station_id, {})
    assert Verifier(stations.robot.station_id, stations.roster).verify(payload).ts == pytest.approx(
        time.time(), abs=5
    )


def test_the_body_arrives_as_json_would_carry_it(stations: Stations) -> None:
    body = {"sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n", "t": (1, 2), "n": {4: 0.1}, "u": "日本"}
    envelope = stations.verifier().verify(stations.request(body=body))
    assert envelope.body == {"sdp": body["sdp"], "t": [1, 2], "n": {"4": 0.1}, "u": "日本"}


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"kind": "session.hijack"}, ValueError),
        ({"to": "Robot/1"}, ValueError),
        ({"body": ["not", "a", "dict"]}, TypeError),
        ({"body": {"x": float("inf")}}, ValueError),
        ({"body": {"sdp": "x" * MAX_ENVELOPE_BYTES}}, ValueError),
        ({"now": float("nan")}, ValueError),
    ],
)
def test_sign_envelope_refuses_what_no_receiver_would_accept(
    stations: Stations, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        stations.request(**kwargs)


@pytest.mark.parametrize(
    "reserialise",
    [
        lambda obj: json.dumps(obj, indent=2),
        lambda obj: json.dumps(dict(reversed(list(obj.items())))),
        lambda obj: json.dumps(obj, ensure_ascii=True),
        lambda obj: "\n  " + json.dumps(obj, separators=(" , ", " : ")) + " \n",
    ],
)
def test_serialisation_does_not_matter_only_values_do(
    stations: Stations, reserialise: Callable[[dict[str, Any]], str]
) -> None:
    payload = stations.request(body={**BODY, "note": "café ☃"})
    original = stations.verifier().verify(payload)
    again = stations.verifier().verify(reserialise(json.loads(payload)).encode())
    assert again == original


# --- reject reasons -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("body", {**BODY, "joints": ["shoulder_pan.pos"]}),
        ("body", {**BODY, "reply_to": "rdv/v1/mallory/inbox"}),
        ("kind", "session.end"),
        ("from", "teleop-cccccc"),
        ("ts", T0 + 1),
        ("nonce", "0" * 32),
    ],
)
def test_a_changed_value_breaks_the_signature(stations: Stations, field: str, value: Any) -> None:
    stations.roster.add("teleop-cccccc", stations.teleop.public_key_b64)  # so `from` gets that far
    obj = json.loads(stations.request())
    obj[field] = value
    assert rejected(stations.verifier(), json.dumps(obj).encode()).reason == "bad_signature"


def test_signed_by_another_key_is_a_bad_signature(stations: Stations) -> None:
    obj = json.loads(stations.request())
    forged = resign(stations.stranger, obj)  # claims to be the teleop, signed by someone else
    assert rejected(stations.verifier(), forged).reason == "bad_signature"


def test_not_for_me(stations: Stations) -> None:
    payload = stations.request(to="robot-zzzzzz")
    error = rejected(stations.verifier(), payload)
    assert error.reason == "not_for_me" and "robot-zzzzzz" in error.detail


def test_unknown_sender_is_untrusted_and_named(stations: Stations) -> None:
    payload = sign_envelope(stations.stranger, "session.request", "robot-aaaaaa", BODY, now=T0)
    error = rejected(stations.verifier(), payload)
    assert error.reason == "untrusted"
    assert "rdv trust add teleop-cccccc" in error.detail


def test_a_presented_key_other_than_the_trusted_one_is_untrusted(stations: Stations) -> None:
    verifier = stations.verifier(trust_on_first_use=True)
    error = rejected(verifier, stations.request(), stations.stranger.public_key_b64)
    assert error.reason == "untrusted"
    assert (
        stations.stranger.fingerprint in error.detail
        and stations.teleop.fingerprint in error.detail
    )
    # The same key as trusted, or none, or an unreadable one: the trusted key decides.
    verifier.verify(stations.request(), presented_key_b64=stations.teleop.public_key_b64)
    verifier.verify(stations.request())
    verifier.verify(stations.request(), presented_key_b64="garbage")


@pytest.mark.parametrize("offset", [MAX_SKEW_S + 0.01, -(MAX_SKEW_S + 0.01), 3600.0, -1e9])
def test_stale_either_way(stations: Stations, offset: float) -> None:
    error = rejected(stations.verifier(Clock(T0 + offset)), stations.request())
    assert error.reason == "stale"


@pytest.mark.parametrize("offset", [MAX_SKEW_S - 0.01, -(MAX_SKEW_S - 0.01), 0.0])
def test_fresh_within_the_skew_either_way(stations: Stations, offset: float) -> None:
    stations.verifier(Clock(T0 + offset)).verify(stations.request())


def test_a_custom_skew(stations: Stations) -> None:
    assert rejected(stations.verifier(Clock(T0 + 6), max_skew_s=5), stations.request()).reason == (
        "stale"
    )
    stations.verifier(Clock(T0 + 4), max_skew_s=5).verify(stations.request())


def test_replay_within_the_window_then_stale(stations: Stations) -> None:
    clock = Clock()
    verifier = stations.verifier(clock)
    payload = stations.request()
    verifier.verify(payload)
    assert rejected(verifier, payload).reason == "replay"
    clock.now += MAX_SKEW_S  # the last instant the copy is still fresh: still remembered
    assert rejected(verifier, payload).reason == "replay"
    clock.now += 0.1
    assert rejected(verifier, payload).reason == "stale"


def test_the_same_nonce_from_another_sender_is_no_replay(stations: Stations) -> None:
    stations.roster.add(stations.stranger.station_id, stations.stranger.public_key_b64)
    verifier = stations.verifier()
    first = json.loads(stations.request())
    verifier.verify(resign(stations.teleop, first))
    other = {**first, "from": stations.stranger.station_id}
    verifier.verify(resign(stations.stranger, other))


def test_a_forgery_does_not_burn_a_nonce(stations: Stations) -> None:
    verifier = stations.verifier()
    payload = stations.request()
    obj = json.loads(payload)
    forged = json.dumps({**obj, "sig": base64.b64encode(b"\0" * 64).decode()}).encode()
    assert rejected(verifier, forged).reason == "bad_signature"
    verifier.verify(payload)  # the genuine message still gets through


MALFORMED = [
    b"",
    b"not json",
    b"\xff\xfe{}",
    b"\xef\xbb\xbf{}",  # a UTF-8 BOM
    b"[]",
    b"null",
    b'"string"',
    b"{}",
    b"[" * 70_000,
    b"[" * 60_000 + b"]" * 60_000,
    b"{" * 30_000,
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_garbage_is_malformed(stations: Stations, payload: bytes) -> None:
    assert rejected(stations.verifier(), payload).reason == "malformed"


@pytest.mark.parametrize("payload", ["a str", None, 5, {"v": 1}, ["x"]])
def test_non_bytes_are_malformed(stations: Stations, payload: object) -> None:
    assert rejected(stations.verifier(), payload).reason == "malformed"


def test_oversize_is_malformed_before_parsing(stations: Stations) -> None:
    obj = json.loads(stations.request())
    padded = json.dumps(obj).encode() + b" " * MAX_ENVELOPE_BYTES  # valid JSON, too large
    error = rejected(stations.verifier(), padded)
    assert error.reason == "malformed" and str(MAX_ENVELOPE_BYTES) in error.detail
    ok = json.dumps(obj).encode()
    stations.verifier().verify(ok + b" " * (MAX_ENVELOPE_BYTES - len(ok)))  # exactly at the limit
    assert rejected(stations.verifier(), bytearray(padded)).reason == "malformed"
    stations.verifier().verify(memoryview(ok))


@pytest.mark.parametrize(
    "field,value",
    [
        ("v", 2),
        ("v", "1"),
        ("v", True),
        ("v", 1.0),
        ("kind", "session.hijack"),
        ("kind", 5),
        ("from", "Teleop"),
        ("from", None),
        ("to", "robot/aaaaaa"),
        ("to", ["robot-aaaaaa"]),
        ("ts", "1795433390.12"),
        ("ts", True),
        ("ts", None),
        ("ts", 10**400),
        ("nonce", "abc"),
        ("nonce", "A" * 32),
        ("nonce", 12345),
        ("body", []),
        ("body", "x"),
        ("body", None),
        ("sig", "not base64!"),
        ("sig", base64.b64encode(b"x" * 63).decode()),
        ("sig", None),
    ],
)
def test_wrong_types_are_malformed_even_when_signed(
    stations: Stations, field: str, value: Any
) -> None:
    obj = json.loads(stations.request())
    obj[field] = value
    payloads = [json.dumps(obj).encode()]
    if field != "sig":
        payloads.append(resign(stations.teleop, obj))  # a valid signature does not help
    for payload in payloads:
        assert rejected(stations.verifier(), payload).reason == "malformed"


@pytest.mark.parametrize("drop", ["v", "kind", "from", "to", "ts", "nonce", "body", "sig"])
def test_a_missing_field_is_malformed(stations: Stations, drop: str) -> None:
    obj = json.loads(stations.request())
    del obj[drop]
    error = rejected(stations.verifier(), json.dumps(obj).encode())
    assert error.reason == "malformed" and drop in error.detail


def test_an_unknown_field_is_malformed_even_when_signed(stations: Stations) -> None:
    obj = {**json.loads(stations.request()), "extra": 1}
    assert rejected(stations.verifier(), resign(stations.teleop, obj)).reason == "malformed"


@pytest.mark.parametrize(
    "splice",
    [
        lambda text: text.replace('"v":1', '"v":1,"v":1'),  # duplicate keys: parsers disagree
        lambda text: text.replace('"body":{', '"body":{"session":"evil",'),
        lambda text: text.replace('"body":{', '"body":{"n":NaN,'),
        lambda text: text.replace('"body":{', '"body":{"n":1e999,'),  # parses as inf
        lambda text: text.replace('"body":{', '"body":{"s":"\\ud800",'),  # lone surrogate
        lambda text: text.replace('"body":{', '"body":{"d":' + "[" * 5000 + "]" * 5000 + ","),
    ],
)
def test_json_edge_cases_are_malformed(stations: Stations, splice: Callable[[str], str]) -> None:
    text = splice(stations.request().decode())
    assert rejected(stations.verifier(), text.encode()).reason == "malformed"


# --- metrics and logging --------------------------------------------------------------------


def test_rejections_are_counted_by_reason(stations: Stations) -> None:
    verifier = stations.verifier()
    before = {reason: rejections(reason) for reason in REJECT_REASONS}
    payload = stations.request()
    verifier.verify(payload)
    rejected(verifier, payload)  # replay
    rejected(verifier, b"junk")  # malformed
    rejected(verifier, b"junk")
    rejected(verifier, stations.request(to="robot-zzzzzz"))  # not_for_me
    after = {reason: rejections(reason) for reason in REJECT_REASONS}
    assert {r: after[r] - before[r] for r in REJECT_REASONS} == {
        "malformed": 2,
        "not_for_me": 1,
        "untrusted": 0,
        "bad_signature": 0,
        "stale": 0,
        "replay": 1,
    }


def test_every_reason_series_exists_from_the_start() -> None:
    for reason in REJECT_REASONS:
        assert (
            REGISTRY.get_sample_value("rdv_signaling_rejected_total", {"reason": reason})
            is not None
        )


def test_rejections_are_logged_once_per_burst(
    stations: Stations, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = stations.verifier()
    with caplog.at_level(logging.WARNING, logger=SIGNING_LOGGER):
        for _ in range(50):
            rejected(verifier, b"junk")
    lines = [r.message for r in caplog.records if r.name == SIGNING_LOGGER]
    assert len(lines) == 1 and lines[0].startswith("rejected signed message: malformed: ")


def test_bodies_are_never_logged(stations: Stations, caplog: pytest.LogCaptureFixture) -> None:
    secret_sdp = "a=fingerprint:sha-256 AB:CD:EF:0123456789"
    for to, now in (("robot-zzzzzz", T0), ("robot-aaaaaa", T0 + 999)):
        verifier = stations.verifier()
        payload = stations.request(kind="signal.offer", to=to, body={"sdp": secret_sdp}, now=now)
        with caplog.at_level(logging.DEBUG, logger=SIGNING_LOGGER):
            rejected(verifier, payload)
    assert caplog.records and secret_sdp not in caplog.text


def test_an_internal_error_is_still_only_a_rejection(
    stations: Stations, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(station_id: str) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(stations.roster, "key_for", broken)
    with pytest.raises(SignatureRejected) as raised:
        stations.verifier().verify(stations.request())
    assert raised.value.reason == "malformed" and "internal error" in raised.value.detail


def test_reject_reasons_are_a_closed_set() -> None:
    with pytest.raises(ValueError):
        SignatureRejected("other", "x")
    assert REJECT_REASONS == (
        "malformed",
        "not_for_me",
        "untrusted",
        "bad_signature",
        "stale",
        "replay",
    )


# --- replay cache ---------------------------------------------------------------------------


def test_the_replay_cache_forgets_after_twice_the_skew(stations: Stations) -> None:
    clock = Clock()
    verifier = stations.verifier(clock)
    for _ in range(5):
        verifier.verify(stations.request())
    assert verifier.seen_count() == 5
    clock.now += 2 * MAX_SKEW_S + 0.1
    verifier.verify(stations.request(now=clock.now))
    assert verifier.seen_count() == 1


def test_the_replay_cache_is_bounded(stations: Stations, caplog: pytest.LogCaptureFixture) -> None:
    verifier = stations.verifier(max_seen=10)
    payloads = [stations.request() for _ in range(25)]
    with caplog.at_level(logging.WARNING, logger=SIGNING_LOGGER):
        for payload in payloads:
            verifier.verify(payload)
    assert verifier.seen_count() == 10
    assert sum("replay cache full" in r.message for r in caplog.records) == 1
    assert rejected(verifier, payloads[-1]).reason == "replay"  # the newest are remembered


# --- trust on first use ---------------------------------------------------------------------


def test_tofu_trusts_a_new_station_once_and_warns(
    stations: Stations, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = stations.verifier(trust_on_first_use=True)
    payload = sign_envelope(stations.stranger, "session.request", "robot-aaaaaa", BODY, now=T0)
    key = stations.stranger.public_key_b64
    with caplog.at_level(logging.WARNING, logger=SIGNING_LOGGER):
        envelope = verifier.verify(payload, presented_key_b64=key)
    assert envelope.sender == "teleop-cccccc"
    warnings = [r.message for r in caplog.records if "first use" in r.message]
    assert len(warnings) == 1
    assert "teleop-cccccc" in warnings[0] and stations.stranger.fingerprint in warnings[0]
    # Persisted (0600), so a restarted station and `rdv trust list` know it.
    assert TrustRoster.load(stations.robot_dir).key_b64_for("teleop-cccccc") == key
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=SIGNING_LOGGER):
        verifier.verify(
            sign_envelope(stations.stranger, "session.end", "robot-aaaaaa", {}, now=T0)
        )  # later messages need no presented key
    assert not [r for r in caplog.records if "first use" in r.message]


def test_tofu_never_replaces_a_key(stations: Stations) -> None:
    verifier = stations.verifier(trust_on_first_use=True)
    stranger = stations.stranger
    first = sign_envelope(stranger, "session.request", "robot-aaaaaa", BODY, now=T0)
    verifier.verify(first, presented_key_b64=stranger.public_key_b64)
    # Someone else claims that station id with their own key: always untrusted.
    impostor, _ = register(
        stations.robot_dir.parent / "impostor",
        owner="alice",
        broker_url="mqtt://127.0.0.1",
        station_id=stranger.station_id,
    )
    forged = sign_envelope(impostor, "session.request", "robot-aaaaaa", BODY, now=T0)
    assert rejected(verifier, forged, impostor.public_key_b64).reason == "untrusted"
    assert rejected(verifier, forged).reason == "bad_signature"
    assert stations.roster.key_b64_for(stranger.station_id) == stranger.public_key_b64


def test_tofu_needs_a_verifying_signature(stations: Stations) -> None:
    verifier = stations.verifier(trust_on_first_use=True)
    obj = json.loads(sign_envelope(stations.stranger, "session.end", "robot-aaaaaa", {}, now=T0))
    obj["body"] = {"session": "tampered"}
    error = rejected(verifier, json.dumps(obj).encode(), stations.stranger.public_key_b64)
    assert error.reason == "bad_signature"
    assert stations.roster.key_for("teleop-cccccc") is None


def test_tofu_needs_a_fresh_message(stations: Stations) -> None:
    verifier = stations.verifier(Clock(T0 + 3600), trust_on_first_use=True)
    payload = sign_envelope(stations.stranger, "session.end", "robot-aaaaaa", {}, now=T0)
    assert rejected(verifier, payload, stations.stranger.public_key_b64).reason == "stale"
    assert stations.roster.key_for("teleop-cccccc") is None


def test_tofu_needs_a_presented_key_and_being_enabled(stations: Stations) -> None:
    payload = sign_envelope(stations.stranger, "session.end", "robot-aaaaaa", {}, now=T0)
    key = stations.stranger.public_key_b64
    assert rejected(stations.verifier(), payload, key).reason == "untrusted"  # off by default
    on = stations.verifier(trust_on_first_use=True)
    assert rejected(on, payload).reason == "untrusted"
    assert rejected(on, payload, "not a key").reason == "untrusted"
    assert stations.roster.key_for("teleop-cccccc") is None


def test_tofu_that_cannot_save_rejects(stations: Stations, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: Any, **kwargs: Any) -> bool:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(stations.roster, "add", read_only)
    payload = sign_envelope(stations.stranger, "session.end", "robot-aaaaaa", {}, now=T0)
    verifier = stations.verifier(trust_on_first_use=True)
    assert rejected(verifier, payload, stations.stranger.public_key_b64).reason == "untrusted"


def test_verifier_arguments_are_checked(stations: Stations) -> None:
    with pytest.raises(ValueError):
        Verifier("Bad/Id", stations.roster)
    with pytest.raises(ValueError):
        Verifier("robot-1", stations.roster, max_skew_s=0)


# --- fuzzing --------------------------------------------------------------------------------


def expect_rejection_only(verifier: Verifier, payload: Any, presented: str | None = None) -> None:
    try:
        verifier.verify(payload, presented_key_b64=presented)
    except SignatureRejected as error:
        assert error.reason in REJECT_REASONS
        assert not error.detail.startswith("internal error"), error.detail
        event(f"rejected: {error.reason}")
    else:
        event("accepted")


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)


@FUZZ
@given(payload=st.binary(max_size=512), presented=st.none() | st.text(max_size=50))
def test_fuzz_random_bytes(shared: Stations, payload: bytes, presented: str | None) -> None:
    expect_rejection_only(shared.verifier(trust_on_first_use=True), payload, presented)


@FUZZ
@given(value=json_values)
def test_fuzz_random_json(shared: Stations, value: Any) -> None:
    payload = json.dumps(value).encode()  # NaN and Infinity included, as Python writes them
    expect_rejection_only(shared.verifier(), payload)


def field_values(valid: Any, *others: Any) -> st.SearchStrategy[Any]:
    """Mostly the valid value, so that whole envelopes often get past the format checks, else
    one of `others` (well-formed but different), else anything."""

    def pick(n: int) -> st.SearchStrategy[Any]:
        if n < 16:
            return st.just(valid)
        if n < 18 and others:
            return st.sampled_from(others)
        return json_values

    return st.integers(0, 19).flatmap(pick)


@st.composite
def envelope_shaped(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """Envelope-like objects, each field valid or random, some fields missing or extra."""
    obj: dict[str, Any] = {
        "v": draw(field_values(1)),
        "kind": draw(field_values("session.request", *KINDS)),
        "from": draw(field_values("teleop-bbbbbb", "teleop-cccccc", "x")),
        "to": draw(field_values("robot-aaaaaa", "robot-zzzzzz")),
        "ts": draw(field_values(T0, T0 - 31, T0 + 31, T0 + 29.5, 0, 1e30)),
        "nonce": draw(field_values("0123456789abcdef" * 2, "0" * 32)),
        "body": draw(field_values(dict(BODY), {}, {"sdp": "v=0"})),
    }
    if draw(st.integers(0, 9)) == 0:
        obj.pop(draw(st.sampled_from(sorted(obj))))
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=5))] = draw(json_values)
    return obj, draw(st.booleans())


@FUZZ
@given(case=envelope_shaped())
def test_fuzz_envelope_shaped_objects(shared: Stations, case: tuple[dict[str, Any], bool]) -> None:
    obj, sign = case
    try:
        payload = resign(shared.teleop, obj) if sign else json.dumps(obj).encode()
    except (ValueError, TypeError):
        payload = json.dumps(obj).encode()  # not signable (NaN, ...): send it unsigned
    if not sign:
        payload = json.dumps({**obj, "sig": base64.b64encode(b"\1" * 64).decode()}).encode()
    try:
        envelope = shared.verifier().verify(payload, shared.teleop.public_key_b64)
    except SignatureRejected as error:
        assert error.reason in REJECT_REASONS
        assert not error.detail.startswith("internal error"), error.detail
        event(f"rejected: {error.reason}")
        return
    event("accepted")
    assert sign  # only the trusted key's own signature gets a message through
    assert envelope == Envelope(
        kind=obj["kind"],
        sender=obj["from"],
        to=obj["to"],
        ts=obj["ts"],
        nonce=obj["nonce"],
        body=obj["body"],
    )


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "char"]))
        where = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[where] = draw(st.integers(0, 255))
        elif op == "insert":
            data[where:where] = draw(
                st.binary(min_size=1, max_size=4) | st.sampled_from([b" ", b"\n"])
            )
        elif op == "delete" and data:
            del data[where : where + draw(st.integers(1, 4))]
        elif data:  # a printable, JSON-looking character
            data[where] = ord(draw(st.sampled_from(list('0123456789abcdef"{}[],:. -+eE\\'))))
    return bytes(data)


@FUZZ
@given(data=st.data())
def test_fuzz_mutations_verify_only_when_meaning_is_unchanged(
    shared: Stations, data: st.DataObject
) -> None:
    original = shared.request()
    expected = shared.verifier().verify(original)
    mutated = data.draw(mutations(original))
    try:
        envelope = shared.verifier().verify(mutated)
    except SignatureRejected as error:
        assert error.reason in REJECT_REASONS
        assert not error.detail.startswith("internal error"), error.detail
        event(f"rejected: {error.reason}")
        return
    # Accepted: only a change in form (whitespace, an escape, the spare bits of the base64
    # signature), never in any value.
    event("accepted: same meaning" if mutated != original else "accepted: unchanged")
    assert envelope == expected
    reparsed = json.loads(mutated)
    assert {k: v for k, v in reparsed.items() if k != "sig"} == {
        k: v for k, v in json.loads(original).items() if k != "sig"
    }


def test_a_presented_key_is_compared_as_bytes(stations: Stations) -> None:
    """A presented key is compared as bytes: another base64 spelling is the same key."""
    key = stations.teleop.public_key_b64
    raw = base64.b64decode(key)
    assert encode_public_key(stations.teleop.public_key) == key
    spare = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = key[:-2] + spare[spare.index(key[-2]) ^ 1] + "="
    assert base64.b64decode(other) == raw and other != key
    stations.verifier(trust_on_first_use=True).verify(stations.request(), presented_key_b64=other)
