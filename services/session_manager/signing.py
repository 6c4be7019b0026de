"""Signed inbox envelopes: what stations send each other through the broker, and their checks.

The format is docs/rendezvous.md's "Signed envelope" section. `sign_envelope` makes one;
`Verifier.verify` turns received bytes into an `Envelope` only when they are well-formed JSON,
addressed to this station, signed by a key its owner trusts, fresh and not seen before. The
signature covers the canonical JSON of the parsed object, so how a message was serialised does
not matter, but any changed value does. verify must never raise anything but SignatureRejected,
whatever the bytes: they come from the network. Never log message bodies (they carry SDP).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.metrics import SIGNALING_REJECTED
from services.session_manager.identity import (
    KEY_BYTES,
    Identity,
    IdentityError,
    TrustRoster,
    decode_key_bytes,
    encode_public_key,
    fingerprint,
    public_key_bytes,
    valid_id,
)

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
KINDS = (
    "session.request",
    "session.accept",
    "session.reject",
    "session.end",
    "signal.offer",
    "signal.answer",
)
FIELDS = frozenset({"v", "kind", "from", "to", "ts", "nonce", "body", "sig"})
MAX_ENVELOPE_BYTES = 65536
MAX_SKEW_S = 30.0
MAX_SEEN = 100_000  # replay cache entries: some tens of MB at worst, far above honest rates
REJECT_REASONS = ("malformed", "not_for_me", "untrusted", "bad_signature", "stale", "replay")
SIGNATURE_BYTES = 64
NONCE_PATTERN = re.compile(r"[0-9a-f]{32}")
BURST_WINDOW_S = 5.0

for _reason in REJECT_REASONS:  # every series exists from the start, so dashboards show zeros
    SIGNALING_REJECTED.labels(_reason)


class SignatureRejected(Exception):
    """An envelope refused on receipt; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Envelope:
    kind: str
    sender: str  # the envelope's "from"
    to: str
    ts: float
    nonce: str
    body: dict[str, Any]


def canonical(obj: Any) -> bytes:
    """The bytes that are signed: docs/rendezvous.md's json.dumps call. allow_nan=False only
    refuses NaN and infinities (not JSON, so no peer could parse them back); it never changes
    the bytes of anything else."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sign_envelope(
    identity: Identity, kind: str, to: str, body: dict[str, Any], now: float | None = None
) -> bytes:
    """A signed envelope from this station to `to`, as the bytes to publish on its inbox.

    ValueError/TypeError for an unknown kind, an invalid `to`, a body JSON cannot carry, or an
    envelope over MAX_ENVELOPE_BYTES (the receiver would refuse it).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown envelope kind {kind!r}; known: {', '.join(KINDS)}")
    if not valid_id(to):
        raise ValueError(f"invalid station id {to!r} for `to`")
    if not isinstance(body, dict):
        raise TypeError(f"body must be a dict, not {type(body).__name__}")
    ts = time.time() if now is None else float(now)
    if not math.isfinite(ts):
        raise ValueError(f"ts must be finite, not {ts}")
    unsigned = {
        "v": ENVELOPE_VERSION,
        "kind": kind,
        "from": identity.station_id,
        "to": to,
        "ts": ts,
        "nonce": secrets.token_hex(16),
        "body": body,
    }
    # Sign exactly what the receiver will rebuild: JSON turns tuples into lists and int keys
    # into strings, and would merge keys that collide once they are strings.
    unsigned = _loads(canonical(unsigned).decode())
    sig = base64.b64encode(identity.sign(canonical(unsigned))).decode("ascii")
    payload = canonical({**unsigned, "sig": sig})
    if len(payload) > MAX_ENVELOPE_BYTES:
        raise ValueError(
            f"envelope of {len(payload)} bytes is over the {MAX_ENVELOPE_BYTES}-byte limit"
        )
    return payload


class Verifier:
    """Checks received envelopes for one station (`me`) against its owner's trusted keys.

    Remembers every accepted (from, nonce) for 2 * max_skew_s, the longest a message can stay
    fresh at this end, so a replayed copy is refused. Thread-safe.
    """

    def __init__(
        self,
        me: str,
        roster: TrustRoster,
        *,
        trust_on_first_use: bool = False,
        clock: Callable[[], float] = time.time,
        max_skew_s: float = MAX_SKEW_S,
        max_seen: int = MAX_SEEN,
    ) -> None:
        if not valid_id(me):
            raise ValueError(f"invalid station id {me!r}")
        if not (math.isfinite(max_skew_s) and max_skew_s > 0):
            raise ValueError(f"max_skew_s must be positive and finite, not {max_skew_s}")
        self.me = me
        self.roster = roster
        self.trust_on_first_use = trust_on_first_use
        self.max_skew_s = max_skew_s
        self._clock = clock
        self._max_seen = max(1, max_seen)
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> forget after
        self._lock = threading.Lock()
        self._log = _BurstLog()
        self._evicted = _BurstLog()

    def verify(self, payload: bytes, presented_key_b64: str | None = None) -> Envelope:
        """The envelope in payload, or SignatureRejected (counted and logged once per burst).

        presented_key_b64 is the key the sender shows in its presence. It is only used to trust
        an unknown station on first use (when enabled), and to say clearly that a station now
        shows a key other than the trusted one.
        """
        try:
            with self._lock:
                return self._verify(payload, presented_key_b64)
        except SignatureRejected as rejected:
            SIGNALING_REJECTED.labels(rejected.reason).inc()
            self._log.note(f"rejected signed message: {rejected}")
            raise
        except Exception as exc:  # a bug here must not become a crash on network input
            rejected = SignatureRejected("malformed", f"internal error {type(exc).__name__}")
            SIGNALING_REJECTED.labels(rejected.reason).inc()
            self._log.note(f"rejected signed message: {rejected}", exc_info=exc)
            raise rejected from exc

    def seen_count(self) -> int:
        return len(self._seen)

    def _verify(self, payload: object, presented_key_b64: str | None) -> Envelope:
        parsed = _parse(payload)
        obj = parsed.obj
        sender, nonce = obj["from"], obj["nonce"]
        if obj["to"] != self.me:
            raise SignatureRejected("not_for_me", f"from {sender} to {obj['to']}, I am {self.me}")

        key, learned = self._key_for(sender, presented_key_b64)
        try:
            key.verify(parsed.sig, parsed.signed)
        except InvalidSignature:
            raise SignatureRejected(
                "bad_signature", f"{obj['kind']} from {sender} (key {fingerprint(key)})"
            ) from None

        # Freshness and replay are judged only on authentic messages: a forgery is a
        # bad_signature, and cannot fill the replay cache.
        now = self._clock()
        if not abs(now - parsed.ts) <= self.max_skew_s:  # `not <=` also catches a NaN clock
            raise SignatureRejected(
                "stale",
                f"{obj['kind']} from {sender} is {parsed.ts - now:+.1f} s off this clock "
                f"(limit ±{self.max_skew_s:g} s; are both clocks synchronised?)",
            )
        self._forget_expired(now)
        if (sender, nonce) in self._seen:
            raise SignatureRejected("replay", f"{obj['kind']} from {sender} nonce {nonce} again")

        if learned:
            try:
                self.roster.add(sender, encode_public_key(key))
            except (IdentityError, OSError) as exc:
                raise SignatureRejected(
                    "untrusted", f"could not trust {sender} on first use: {exc}"
                ) from None
            log.warning(
                "trusting %s on first use: key fingerprint %s, from its presence; compare it "
                "with `rdv identity` on that station",
                sender,
                fingerprint(key),
            )
        self._remember((sender, nonce), now)
        return Envelope(
            kind=obj["kind"],
            sender=sender,
            to=obj["to"],
            ts=parsed.ts,
            nonce=nonce,
            body=obj["body"],
        )

    def _key_for(self, sender: str, presented_key_b64: str | None) -> tuple[Ed25519PublicKey, bool]:
        """The key to check sender's signature with, and whether it is being learned (TOFU)."""
        presented: Ed25519PublicKey | None = None
        if presented_key_b64 is not None:
            try:
                raw = decode_key_bytes(presented_key_b64, KEY_BYTES, "presented key")
                presented = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                presented = None
        trusted = self.roster.key_for(sender)
        if trusted is not None:
            if presented is not None and public_key_bytes(presented) != public_key_bytes(trusted):
                # A re-registered station, or someone posing as it: never switch keys silently.
                raise SignatureRejected(
                    "untrusted",
                    f"{sender} presents key {fingerprint(presented)} but its trusted key is "
                    f"{fingerprint(trusted)}; if it was re-registered, run `rdv trust remove "
                    f"{sender}` and `rdv trust add {sender} KEY`",
                )
            return trusted, False
        if self.trust_on_first_use and presented is not None:
            return presented, True
        why = " (trust on first use needs its presence key)" if self.trust_on_first_use else ""
        raise SignatureRejected(
            "untrusted", f"no trusted key for {sender}{why}: run `rdv trust add {sender} KEY`"
        )

    def _forget_expired(self, now: float) -> None:
        while self._seen:
            forget_at = next(iter(self._seen.values()))
            if forget_at > now:
                break
            self._seen.popitem(last=False)

    def _remember(self, key: tuple[str, str], now: float) -> None:
        self._seen[key] = now + 2 * self.max_skew_s
        while len(self._seen) > self._max_seen:
            # Only authentic messages get here, so this takes a trusted peer gone mad; memory
            # stays bounded and the oldest nonces, the nearest to stale anyway, go first.
            self._seen.popitem(last=False)
            self._evicted.note(f"replay cache full ({self._max_seen}): forgetting oldest nonces")


class _BurstLog:
    """Logs the first line of a burst, then one summary per window: never a log flood."""

    def __init__(self, window_s: float = BURST_WINDOW_S, clock=time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._window_start: float | None = None
        self._suppressed = 0

    def note(self, message: str, exc_info: BaseException | None = None) -> None:
        now = self._clock()
        if self._window_start is None or now - self._window_start >= self._window_s:
            if self._suppressed:
                log.warning("%d more like this in the last burst", self._suppressed)
            log.warning("%s", message, exc_info=exc_info)
            self._window_start = now
            self._suppressed = 0
        else:
            self._suppressed += 1


@dataclass(frozen=True)
class _Parsed:
    obj: dict[str, Any]  # every field checked
    signed: bytes  # what the signature covers
    sig: bytes
    ts: float


def _parse(payload: object) -> _Parsed:
    """The envelope, checked field by field; SignatureRejected("malformed") otherwise."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise SignatureRejected("malformed", f"payload is {type(payload).__name__}, not bytes")
    data = bytes(payload)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SignatureRejected("malformed", f"{len(data)} bytes, over {MAX_ENVELOPE_BYTES}")
    try:
        obj = _loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise SignatureRejected("malformed", f"not UTF-8 JSON: {_short(exc)}") from None
    if not isinstance(obj, dict):
        raise SignatureRejected("malformed", f"a JSON {type(obj).__name__}, not an object")
    if obj.keys() != FIELDS:
        missing = sorted(FIELDS - obj.keys())
        extra = sorted(obj.keys() - FIELDS)
        raise SignatureRejected(
            "malformed", f"missing fields {missing}, unknown fields {_short(extra)}"
        )
    version = obj["v"]
    if type(version) is not int or version != ENVELOPE_VERSION:  # true == 1 in Python
        raise SignatureRejected("malformed", f"unknown version {_short(version)}")
    if not isinstance(obj["kind"], str) or obj["kind"] not in KINDS:
        raise SignatureRejected("malformed", f"unknown kind {_short(obj['kind'])}")
    for name in ("from", "to"):
        if not valid_id(obj[name]):
            raise SignatureRejected("malformed", f"`{name}` {_short(obj[name])} is no station id")
    try:
        if type(obj["ts"]) not in (int, float):
            raise OverflowError
        ts = float(obj["ts"])  # a huge int overflows here
    except OverflowError:
        ts = math.inf
    if not math.isfinite(ts):
        raise SignatureRejected("malformed", f"`ts` {_short(obj['ts'])} is not a finite number")
    if not isinstance(obj["nonce"], str) or not NONCE_PATTERN.fullmatch(obj["nonce"]):
        raise SignatureRejected("malformed", f"`nonce` {_short(obj['nonce'])} is not 32 hex")
    if not isinstance(obj["body"], dict):
        raise SignatureRejected("malformed", "`body` is not an object")
    try:
        sig = decode_key_bytes(obj["sig"], SIGNATURE_BYTES, "`sig`")
    except ValueError as exc:
        raise SignatureRejected("malformed", str(exc)) from None
    unsigned = {name: value for name, value in obj.items() if name != "sig"}
    try:
        signed = canonical(unsigned)
    except (ValueError, RecursionError) as exc:  # lone surrogates, 1e999 (= inf), deep nesting
        raise SignatureRejected("malformed", f"no canonical form: {_short(exc)}") from None
    return _Parsed(obj=obj, signed=signed, sig=sig, ts=ts)


def _loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, and no duplicate keys, which parsers resolve differently."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate keys")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _short(value: object, limit: int = 60) -> str:
    """A bounded repr: rejection details are logged, and their content is the sender's."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
