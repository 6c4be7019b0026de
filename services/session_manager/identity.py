"""A station's identity and the keys its owner trusts: `identity.json` and `trusted.json`.

The formats are docs/rendezvous.md's "Identity" section. `rdv register` creates and updates the
identity; the session manager loads it to sign its messages and reads the roster to check its
peers'. Both files live in the config dir, are written atomically with mode 0600, and are
refused when other users could read (identity) or change (either) them. This module must never
log or print a private key or a broker password.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
TRUSTED_FILE = "trusted.json"
FORMAT_VERSION = 1
# Station ids and owners are MQTT topic levels: no '/', '+' or '#'. Always used with fullmatch,
# because `$` in a Python regex also matches before a trailing newline.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
ID_RULE = "1 to 48 of a-z, 0-9, '_' and '-', starting with a letter or digit"
ROLE_HINTS = ("robot", "teleop", "station")
BROKER_SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}  # scheme: (default port, TLS)
KEY_BYTES = 32
MAX_FILE_BYTES = 1 << 20  # both files are tiny; a huge one is not ours


class IdentityError(ValueError):
    """A missing, unsafe or malformed identity or roster, or a bad value for one.

    The message says what to do about it, so the CLI prints it as it is.
    """


def valid_id(text: object) -> bool:
    """Whether text is a valid station id or owner (docs/rendezvous.md)."""
    return isinstance(text, str) and ID_PATTERN.fullmatch(text) is not None


def check_id(text: object, what: str) -> str:
    if not valid_id(text):
        raise IdentityError(f"{what} {text!r} is not valid: use {ID_RULE}")
    return text  # type: ignore[return-value]


def config_dir(
    explicit: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The config dir: `--config-dir`, else $RDV_CONFIG_DIR, else $XDG_CONFIG_HOME/rdv, else
    ~/.config/rdv. Empty values count as unset; XDG_CONFIG_HOME must be absolute (XDG spec)."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit).expanduser().absolute()
    if env.get("RDV_CONFIG_DIR"):
        return Path(env["RDV_CONFIG_DIR"]).expanduser().absolute()
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "rdv"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".config" / "rdv"


# --- broker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str  # "mqtt" or "mqtts"
    host: str
    port: int
    tls: bool


def parse_broker_url(url: object) -> BrokerAddress:
    """mqtt://HOST[:PORT] (plain, 1883) or mqtts://HOST[:PORT] (TLS, 8883); else ValueError."""
    example = "e.g. mqtt://127.0.0.1:1883 or mqtts://broker.example.com"
    if not isinstance(url, str) or not url:
        raise ValueError(f"the broker url is empty: give one, {example}")
    # urlsplit quietly drops tabs and newlines; a url carrying them is a paste error, not a host.
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError(f"broker url {url!r} contains whitespace or control characters")
    if "@" in url:
        # The url is shown by `rdv identity` and in logs, and so would a password inside it;
        # this message does not repeat the url for the same reason.
        raise ValueError(
            "the broker url must not hold a user name or password: give them with --username "
            "and --password (or $RDV_BROKER_PASSWORD)"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in BROKER_SCHEMES:
        raise ValueError(
            f"broker url {url!r}: the scheme must be mqtt:// (plain, default port 1883) or "
            f"mqtts:// (TLS, default port 8883), {example}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker url {url!r}: only scheme, host and port are allowed, {example}")
    host = parts.hostname
    if not host or not re.fullmatch(r"[A-Za-z0-9._:%-]+", host):
        raise ValueError(f"broker url {url!r} has no valid host, {example}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker url {url!r}: the port must be a number in 1-65535") from None
    if port == 0:
        raise ValueError(f"broker url {url!r}: the port must be a number in 1-65535")
    default_port, tls = BROKER_SCHEMES[scheme]
    return BrokerAddress(scheme=scheme, host=host, port=port or default_port, tls=tls)


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to reach the MQTT broker. A BrokerConfig always holds a valid url."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs
    ca_file: str | None = None  # None with mqtts: the system's CA store

    def __post_init__(self) -> None:
        address = self.address  # raises ValueError for a bad url
        if self.ca_file and not address.tls:
            raise ValueError(
                f"a CA file ({self.ca_file}) is set but broker url {self.url!r} is not TLS: use "
                "mqtts://, or clear the CA file with --ca-file ''"
            )

    @property
    def address(self) -> BrokerAddress:
        return parse_broker_url(self.url)

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port

    @property
    def tls(self) -> bool:
        return self.address.tls


# --- keys -----------------------------------------------------------------------------------


def decode_key_bytes(text: object, length: int, what: str) -> bytes:
    """Strict base64 of exactly `length` bytes; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:  # binascii.Error and UnicodeEncodeError are both ValueErrors
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != length:
        raise ValueError(f"{what} must be {length} bytes, not {len(raw)}")
    return raw


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def encode_public_key(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_key_bytes(key)).decode("ascii")


def decode_public_key(text: object) -> Ed25519PublicKey:
    """An Ed25519 public key from its base64 raw 32 bytes; ValueError otherwise."""
    return Ed25519PublicKey.from_public_bytes(decode_key_bytes(text, KEY_BYTES, "public key"))


def canonical_public_key(text: object) -> str:
    """The one base64 spelling of a key: base64 ignores the spare bits of the last character,
    so two different strings can hold the same key. Compare and store this form only."""
    return encode_public_key(decode_public_key(text))


def fingerprint(public_key: str | Ed25519PublicKey) -> str:
    """What humans compare: the first 16 hex digits of the SHA-256 of the raw public key."""
    if not isinstance(public_key, Ed25519PublicKey):
        public_key = decode_public_key(public_key)
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    station_id: str
    owner: str
    broker: BrokerConfig
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)  # public_key_b64 compares
    public_key_b64: str

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key_b64)

    def to_json(self) -> dict[str, Any]:
        """The identity.json document, private key and password included: for the file only."""
        seed = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return {
            "version": FORMAT_VERSION,
            "station_id": self.station_id,
            "owner": self.owner,
            "broker": {
                "url": self.broker.url,
                "username": self.broker.username,
                "password": self.broker.password,
                "ca_file": self.broker.ca_file,
            },
            "private_key": base64.b64encode(seed).decode("ascii"),
            "public_key": self.public_key_b64,
        }


def _make_identity(
    station_id: str, owner: str, broker: BrokerConfig, key: Ed25519PrivateKey
) -> Identity:
    return Identity(
        station_id=station_id,
        owner=owner,
        broker=broker,
        private_key=key,
        public_key_b64=encode_public_key(key.public_key()),
    )


# --- identity.json --------------------------------------------------------------------------


def register(
    dir: Path,
    *,
    owner: str | None,
    broker_url: str | None,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    station_id: str | None = None,
    role_hint: str = "station",
    reset: bool = False,
) -> tuple[Identity, str]:
    """Create or update the identity in dir; returns it and "created", "unchanged", "updated"
    or "reset".

    None keeps a value (an existing identity's), "" clears username, password or ca_file.
    A first registration needs owner and broker_url. Without reset the key and station id are
    kept; asking for another station id needs reset, which makes a new key and a new id (a
    random `<role_hint>-<6 hex>` unless station_id is given). Unchanged means nothing was
    written.
    """
    dir = Path(dir)
    path = dir / IDENTITY_FILE
    existed = os.path.lexists(path)
    current: Identity | None = None
    if existed:
        try:
            current = load_identity(dir)
        except IdentityError:
            if not reset:
                raise
            # --reset is the way out of an unreadable or unsafe identity: keep nothing of it.

    if current is not None:
        owner = current.owner if owner is None else owner
        broker_url = current.broker.url if broker_url is None else broker_url
    missing = [flag for flag, value in (("--owner", owner), ("--broker", broker_url)) if not value]
    if missing or owner is None or broker_url is None:
        raise IdentityError(
            f"{' and '.join(missing)} missing: a first registration needs both, e.g. `rdv register "
            "--owner alice --broker mqtt://127.0.0.1:1883`"
        )
    owner = check_id(owner, "owner")
    old = current.broker if current else BrokerConfig(url="mqtt://localhost")
    try:
        broker = BrokerConfig(
            url=broker_url,
            username=_pick(username, old.username),
            password=_pick(password, old.password),
            ca_file=_pick(ca_file, old.ca_file),
        )
    except ValueError as exc:
        raise IdentityError(str(exc)) from None

    if current is not None and not reset:
        if station_id is not None and station_id != current.station_id:
            raise IdentityError(
                f"this station is registered as {current.station_id!r}; another id needs --reset, "
                "which also makes a new key (stations that trusted the old one must trust the new)"
            )
        identity = _make_identity(current.station_id, owner, broker, current.private_key)
        if (identity.owner, identity.broker) == (current.owner, current.broker):
            return current, "unchanged"
        status = "updated"
    else:
        if station_id is None:
            avoid = current.station_id if current else None
            station_id = _new_station_id(role_hint, avoid)
        station_id = check_id(station_id, "station id")
        identity = _make_identity(station_id, owner, broker, Ed25519PrivateKey.generate())
        status = "reset" if existed else "created"
    write_private_json(path, identity.to_json())
    return identity, status


def _pick(new: str | None, old: str | None) -> str | None:
    """None keeps the old value, "" clears it."""
    return old if new is None else (new or None)


def _new_station_id(role_hint: str, avoid: str | None) -> str:
    check_id(f"{role_hint}-000000", "--role")  # a bad hint is named as such, not as a bad id
    while True:
        station_id = f"{role_hint}-{secrets.token_hex(3)}"
        if station_id != avoid:  # --reset must change the id, even against 1 in 16 million
            return station_id


def load_identity(dir: Path) -> Identity:
    """The identity in dir, or IdentityError naming the fix (`rdv register`, `chmod 600`)."""
    path = Path(dir) / IDENTITY_FILE
    if not os.path.lexists(path):
        raise IdentityError(
            f"no station identity in {Path(dir)}: run `rdv register --owner NAME --broker "
            f"mqtt://HOST:1883` first (with --config-dir {Path(dir)} if that is not the default)"
        )
    # 0o077: nobody but the owner may read the private key (like ssh's private key files).
    data = read_private_json(path, forbidden_bits=0o077, what="the station's private key")
    try:
        return _identity_from_json(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise IdentityError(
            f"{path} is malformed ({exc}): fix it, or make a new identity with "
            "`rdv register --reset --owner NAME --broker URL`"
        ) from None


def _identity_from_json(data: Any) -> Identity:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != FORMAT_VERSION or isinstance(data.get("version"), bool):
        raise ValueError(f"unknown version {data.get('version')!r}, expected {FORMAT_VERSION}")
    station_id = check_id(data.get("station_id"), "station_id")
    owner = check_id(data.get("owner"), "owner")
    raw_broker = data.get("broker")
    if not isinstance(raw_broker, dict):
        raise ValueError("broker must be an object")
    for name in ("username", "password", "ca_file"):
        if raw_broker.get(name) is not None and not isinstance(raw_broker[name], str):
            raise ValueError(f"broker.{name} must be a string or null")
    broker = BrokerConfig(
        url=raw_broker.get("url"),  # type: ignore[arg-type]  # checked by BrokerConfig
        username=raw_broker.get("username") or None,
        password=raw_broker.get("password") or None,
        ca_file=raw_broker.get("ca_file") or None,
    )
    seed = decode_key_bytes(data.get("private_key"), KEY_BYTES, "private_key")
    key = Ed25519PrivateKey.from_private_bytes(seed)
    identity = _make_identity(station_id, owner, broker, key)
    # public_key is written for humans and peers; it must be the private key's own.
    if canonical_public_key(data.get("public_key")) != identity.public_key_b64:
        raise ValueError("public_key does not belong to private_key")
    return identity


# --- trusted.json ---------------------------------------------------------------------------


class TrustRoster:
    """The public keys this station's owner trusts, by station id, over `trusted.json`.

    The file is read again whenever it changes on disk, so `rdv trust add` takes effect on a
    running station. Writes start from what is on disk, so two writers (the CLI and a session
    manager trusting on first use) do not undo each other short of racing within milliseconds.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._keys: dict[str, str] = {}  # station id -> canonical base64 key
        self._objects: dict[str, Ed25519PublicKey] = {}
        self._stamp: tuple[int, int, int] | None = None  # what the file was when last read

    @classmethod
    def load(cls, dir: Path) -> TrustRoster:
        """The roster in dir (empty when trusted.json does not exist); IdentityError if unsafe
        or malformed."""
        roster = cls(Path(dir) / TRUSTED_FILE)
        roster._read()
        return roster

    def key_for(self, station_id: str) -> Ed25519PublicKey | None:
        self.refresh()
        encoded = self._keys.get(station_id)
        if encoded is None:
            return None
        key = self._objects.get(station_id)
        if key is None:
            key = self._objects[station_id] = decode_public_key(encoded)
        return key

    def key_b64_for(self, station_id: str) -> str | None:
        self.refresh()
        return self._keys.get(station_id)

    def items(self) -> list[tuple[str, str]]:
        """(station id, base64 key), sorted by id."""
        self.refresh()
        return sorted(self._keys.items())

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, station_id: str, public_key_b64: str, *, replace: bool = False) -> bool:
        """Trust this key for this station and save; False if it already was. A different key
        already trusted for the station is an IdentityError unless replace."""
        check_id(station_id, "station id")
        try:
            encoded = canonical_public_key(public_key_b64)
        except ValueError as exc:
            raise IdentityError(f"key for {station_id}: {exc}") from None
        self._read()
        current = self._keys.get(station_id)
        if current == encoded:
            return False
        if current is not None and not replace:
            raise IdentityError(
                f"{station_id} is already trusted with another key (fingerprint "
                f"{fingerprint(current)}, this one {fingerprint(encoded)}); if it was "
                f"re-registered, run `rdv trust remove {station_id}` and add it again"
            )
        self._write({**self._keys, station_id: encoded})
        return True

    def remove(self, station_id: str) -> bool:
        """Stop trusting this station and save; False if it was not trusted."""
        self._read()
        if station_id not in self._keys:
            return False
        self._write({sid: key for sid, key in self._keys.items() if sid != station_id})
        return True

    def refresh(self) -> None:
        """Re-read the file if it changed. A broken file keeps the last good keys (logged):
        a running station must not lose or crash on a half-edited roster."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            self._read()
        except (IdentityError, OSError) as exc:
            self._stamp = stamp  # log once per change of the file, not once per message
            log.error("keeping the previously trusted keys: %s", exc)

    def _read(self) -> None:
        if not os.path.lexists(self.path):
            self._set({}, None)
            return
        # 0o022: public keys are no secret, but whoever can change this file decides who we trust.
        data = read_private_json(self.path, forbidden_bits=0o022, what="who this station trusts")
        try:
            keys = _roster_from_json(data)
        except ValueError as exc:
            raise IdentityError(
                f"{self.path} is malformed ({exc}): fix it, or remove it and add the stations "
                "again with `rdv trust add ID KEY`"
            ) from None
        self._set(keys, _stamp(self.path))

    def _write(self, keys: dict[str, str]) -> None:
        document = {"version": FORMAT_VERSION, "stations": dict(sorted(keys.items()))}
        write_private_json(self.path, document)
        self._set(keys, _stamp(self.path))

    def _set(self, keys: dict[str, str], stamp: tuple[int, int, int] | None) -> None:
        # Parsed keys are cached; drop those whose base64 changed.
        self._objects = {
            sid: key for sid, key in self._objects.items() if keys.get(sid) == self._keys.get(sid)
        }
        self._keys = dict(keys)
        self._stamp = stamp


def _roster_from_json(data: Any) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != FORMAT_VERSION or isinstance(data.get("version"), bool):
        raise ValueError(f"unknown version {data.get('version')!r}, expected {FORMAT_VERSION}")
    stations = data.get("stations")
    if not isinstance(stations, dict):
        raise ValueError("stations must be an object")
    keys = {}
    for station_id, key in stations.items():
        check_id(station_id, "station id")
        keys[station_id] = canonical_public_key(key)
    return keys


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, -1, -1)  # unreadable now: try again to report it, never crash here
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --- private files --------------------------------------------------------------------------


def read_private_json(path: Path, *, forbidden_bits: int, what: str) -> Any:
    """JSON from a regular file of ours none of whose `forbidden_bits` mode bits are set."""
    try:
        # O_NONBLOCK: a FIFO planted here must fail the check below, not hang the station.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    st = os.fstat(fd)  # of the file we read, not of whatever the path is now
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise IdentityError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise IdentityError(
                f"{path} belongs to another user (uid {st.st_uid}), who controls {what}: "
                f"run `chown $(id -u) {path}` if that is fine"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & forbidden_bits:
            raise IdentityError(
                f"{path} has mode {mode:04o}, so other users can get at {what}: run "
                f"`chmod 600 {path}`"
            )
        raw = file.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise IdentityError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not an rdv file")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise IdentityError(f"{path} is not valid JSON ({exc}): fix or remove it") from None


def write_private_json(path: Path, document: Any) -> None:
    """Atomically replace path with document as JSON, mode 0600, creating its dir with 0700.

    The temporary file is created 0600 before anything is written to it, so no other user can
    ever read a key, and renamed over the old file, so a crash leaves the old or the new one.
    """
    path = Path(path)
    _make_private_dir(path.parent)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only take bits away; be exact anyway
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _make_private_dir(dir: Path) -> None:
    """Create dir with mode 0700. An existing dir is left as it is: it may be shared (e.g.
    --config-dir /tmp/x), and the files in it carry their own 0600."""
    if dir.is_dir():
        return
    try:
        dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    os.chmod(dir, 0o700)  # mkdir's mode goes through the umask


def _fsync_dir(dir: Path) -> None:
    """Make the rename durable: a power cut must not lose a freshly registered key."""
    try:
        fd = os.open(dir, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)
