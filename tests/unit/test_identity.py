"""Unit tests for station identities and trusted keys (services/session_manager/identity.py).

Covers config_dir's resolution order; station id / owner validation (MQTT-safe topic levels);
broker url parsing (mqtt/mqtts, default ports, IPv6, clear ValueErrors); register's create /
unchanged (nothing written) / update (same key) / reset (new key and id), its errors for missing
or bad flags, and its file modes (identity.json 0600, new dir 0700, written atomically);
load_identity's refusals (missing, group/other permissions, malformed content); and TrustRoster
(add/remove/items, 0600 persistence, one base64 spelling per key, conflicting keys, re-reading
the file when another process changes it). Every config dir is under tmp_path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.session_manager.identity import (
    BrokerConfig,
    Identity,
    IdentityError,
    TrustRoster,
    canonical_public_key,
    config_dir,
    encode_public_key,
    fingerprint,
    load_identity,
    parse_broker_url,
    register,
    valid_id,
)

BROKER = "mqtt://127.0.0.1:1883"


@pytest.fixture(autouse=True)
def no_real_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever a test forgets, the real ~/.config/rdv is never the default here."""
    monkeypatch.setenv("RDV_CONFIG_DIR", str(tmp_path / "env-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make(directory: Path, **kwargs: object) -> tuple[Identity, str]:
    options: dict[str, object] = {"owner": "alice", "broker_url": BROKER, **kwargs}
    return register(directory, **options)  # type: ignore[arg-type]


def new_key_b64() -> str:
    return encode_public_key(Ed25519PrivateKey.generate().public_key())


# --- config_dir -----------------------------------------------------------------------------


def test_config_dir_resolution_order(tmp_path: Path) -> None:
    env = {"RDV_CONFIG_DIR": "/env/rdv", "XDG_CONFIG_HOME": "/xdg", "HOME": "/home/u"}
    assert config_dir(tmp_path / "flag", env) == tmp_path / "flag"
    assert config_dir(None, env) == Path("/env/rdv")
    assert config_dir(None, {**env, "RDV_CONFIG_DIR": ""}) == Path("/xdg/rdv")
    assert config_dir(None, {"HOME": "/home/u"}) == Path("/home/u/.config/rdv")
    # XDG says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    assert config_dir(None, {"XDG_CONFIG_HOME": "rel", "HOME": "/home/u"}) == Path(
        "/home/u/.config/rdv"
    )


def test_config_dir_expands_user_and_uses_the_process_environment(tmp_path: Path) -> None:
    assert config_dir("~/x", {"HOME": str(tmp_path)}) == Path("~/x").expanduser()
    assert config_dir() == tmp_path / "env-config"  # from the autouse fixture
    assert config_dir("") == tmp_path / "env-config"  # an empty flag counts as unset


# --- ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a", "robot-3f9a2c", "0", "a_b-c", "x" * 48, "9lives"])
def test_valid_ids(text: str) -> None:
    assert valid_id(text)


@pytest.mark.parametrize(
    "text",
    ["", "-a", "_a", "A", "Robot", "a/b", "a+b", "a#", "x" * 49, "a b", "abc\n", "é", "a.b", 5],
)
def test_invalid_ids(text: object) -> None:
    assert not valid_id(text)


# --- broker urls ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,scheme,host,port,tls",
    [
        ("mqtt://127.0.0.1", "mqtt", "127.0.0.1", 1883, False),
        ("mqtt://127.0.0.1:1884", "mqtt", "127.0.0.1", 1884, False),
        ("mqtts://broker.example.com", "mqtts", "broker.example.com", 8883, True),
        ("mqtts://broker.example.com:443/", "mqtts", "broker.example.com", 443, True),
        ("MQTT://Host", "mqtt", "host", 1883, False),
        ("mqtt://[::1]:1883", "mqtt", "::1", 1883, False),
    ],
)
def test_broker_url_parsing(url: str, scheme: str, host: str, port: int, tls: bool) -> None:
    broker = BrokerConfig(url=url)
    assert (broker.address.scheme, broker.host, broker.port, broker.tls) == (
        scheme,
        host,
        port,
        tls,
    )


@pytest.mark.parametrize(
    "url,says",
    [
        ("", "empty"),
        ("http://h", "scheme"),
        ("127.0.0.1:1883", "scheme"),
        ("tcp://h:1883", "scheme"),
        ("mqtt://", "host"),
        ("mqtt://:1883", "host"),
        ("mqtt://h:0", "port"),
        ("mqtt://h:70000", "port"),
        ("mqtt://h:abc", "port"),
        ("mqtt://user:secret@h", "--password"),
        ("mqtt://h/topic", "only scheme"),
        ("mqtt://h?x=1", "only scheme"),
        ("mqtt://h\n", "whitespace"),
        ("mqtt://h ost", "whitespace"),
    ],
)
def test_bad_broker_urls_say_why(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as raised:
        parse_broker_url(url)
    assert says in str(raised.value)
    assert "secret" not in str(raised.value)  # the error must not echo a password


def test_broker_config_refuses_a_ca_file_without_tls_and_hides_its_password() -> None:
    with pytest.raises(ValueError, match="not TLS"):
        BrokerConfig(url="mqtt://h", ca_file="/etc/ca.pem")
    assert BrokerConfig(url="mqtts://h", ca_file="/etc/ca.pem").tls
    assert "hunter2" not in repr(BrokerConfig(url="mqtt://h", username="u", password="hunter2"))


# --- register: create -----------------------------------------------------------------------


def test_first_registration_creates_a_private_identity(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "rdv"
    identity, status = make(directory, role_hint="robot", username="alice", password="pw")
    assert status == "created"
    assert mode(directory) == 0o700
    assert mode(directory / "identity.json") == 0o600
    assert identity.station_id.startswith("robot-") and len(identity.station_id) == 12
    int(identity.station_id[6:], 16)  # 6 random hex digits
    assert identity.owner == "alice"
    assert identity.broker == BrokerConfig(url=BROKER, username="alice", password="pw")

    document = json.loads((directory / "identity.json").read_text())
    assert set(document) == {
        "version",
        "station_id",
        "owner",
        "broker",
        "private_key",
        "public_key",
    }
    assert document["version"] == 1
    assert document["broker"] == {
        "url": BROKER,
        "username": "alice",
        "password": "pw",
        "ca_file": None,
    }
    seed = base64.b64decode(document["private_key"])
    raw_public = base64.b64decode(document["public_key"])
    assert len(seed) == 32 and len(raw_public) == 32
    assert document["public_key"] == identity.public_key_b64
    # The key pair works, and the fingerprint is the first 16 hex of sha256(raw public key).
    identity.public_key.verify(identity.sign(b"hello"), b"hello")
    assert identity.fingerprint == hashlib.sha256(raw_public).hexdigest()[:16]
    assert fingerprint(identity.public_key_b64) == identity.fingerprint
    assert not [p for p in directory.iterdir() if p.name != "identity.json"]  # no temp files left


def test_dir_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make(tmp_path / "open")
    finally:
        os.umask(old)
    assert mode(tmp_path / "open") == 0o700
    assert mode(tmp_path / "open" / "identity.json") == 0o600


def test_an_existing_dir_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    make(shared)
    assert mode(shared) == 0o755  # never chmod a dir we did not create (--config-dir /tmp/x)
    assert mode(shared / "identity.json") == 0o600


def test_default_station_id_uses_the_role_hint_and_an_explicit_one_wins(tmp_path: Path) -> None:
    assert make(tmp_path / "a")[0].station_id.startswith("station-")
    assert make(tmp_path / "b", role_hint="teleop")[0].station_id.startswith("teleop-")
    assert make(tmp_path / "c", station_id="arm-1")[0].station_id == "arm-1"


@pytest.mark.parametrize(
    "owner,broker_url,missing",
    [
        (None, BROKER, "--owner"),
        ("alice", None, "--broker"),
        (None, None, "--owner and --broker"),
        ("", BROKER, "--owner"),
    ],
)
def test_first_registration_names_missing_flags(
    tmp_path: Path, owner: str | None, broker_url: str | None, missing: str
) -> None:
    with pytest.raises(IdentityError) as raised:
        register(tmp_path / "x", owner=owner, broker_url=broker_url)
    assert str(raised.value).startswith(f"{missing} missing")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "kwargs,says",
    [
        ({"owner": "Alice"}, "owner 'Alice' is not valid"),
        ({"owner": "al/ice"}, "owner"),
        ({"station_id": "robot/1"}, "station id"),
        ({"station_id": "x" * 49}, "station id"),
        ({"role_hint": "Robot"}, "--role"),
        ({"broker_url": "http://h"}, "scheme"),
        ({"broker_url": BROKER, "ca_file": "/ca.pem"}, "not TLS"),
    ],
)
def test_bad_values_are_refused_and_nothing_is_written(
    tmp_path: Path, kwargs: dict[str, str], says: str
) -> None:
    with pytest.raises(IdentityError, match=None) as raised:
        make(tmp_path / "x", **kwargs)
    assert says in str(raised.value)
    assert not (tmp_path / "x" / "identity.json").exists()


# --- register: again --------------------------------------------------------------------------


def test_registering_again_unchanged_writes_nothing(tmp_path: Path) -> None:
    first, _ = make(tmp_path, username="u", password="p")
    before = os.stat(tmp_path / "identity.json")
    for kwargs in ({}, {"owner": None, "broker_url": None}, {"username": "u", "password": "p"}):
        again, status = make(tmp_path, **kwargs)
        assert status == "unchanged"
        assert again.public_key_b64 == first.public_key_b64
        assert again.station_id == first.station_id
    after = os.stat(tmp_path / "identity.json")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_new_flags_update_and_keep_the_key_and_id(tmp_path: Path) -> None:
    first, _ = make(tmp_path, username="u", password="p", role_hint="robot")
    updated, status = make(tmp_path, owner="bob", broker_url="mqtts://broker.example.com")
    assert status == "updated"
    assert (updated.station_id, updated.public_key_b64) == (
        first.station_id,
        first.public_key_b64,
    )
    assert updated.owner == "bob"
    # Unnamed values are kept; "" clears one.
    assert updated.broker == BrokerConfig("mqtts://broker.example.com", "u", "p")
    cleared, status = make(tmp_path, owner="bob", broker_url=None, password="")
    assert status == "updated"
    assert cleared.broker == BrokerConfig("mqtts://broker.example.com", "u", None)
    assert load_identity(tmp_path) == cleared
    assert mode(tmp_path / "identity.json") == 0o600


def test_another_station_id_needs_reset(tmp_path: Path) -> None:
    first, _ = make(tmp_path)
    assert make(tmp_path, station_id=first.station_id)[1] == "unchanged"
    with pytest.raises(IdentityError, match="--reset"):
        make(tmp_path, station_id="other")
    assert load_identity(tmp_path).station_id == first.station_id


def test_reset_makes_a_new_key_and_id_and_keeps_owner_and_broker(tmp_path: Path) -> None:
    first, _ = make(tmp_path, username="u", role_hint="robot")
    reset, status = register(tmp_path, owner=None, broker_url=None, reset=True, role_hint="robot")
    assert status == "reset"
    assert reset.station_id != first.station_id and reset.station_id.startswith("robot-")
    assert reset.public_key_b64 != first.public_key_b64
    assert (reset.owner, reset.broker) == (first.owner, first.broker)
    assert load_identity(tmp_path) == reset
    named, status = make(tmp_path, reset=True, station_id=reset.station_id)
    assert status == "reset"
    assert named.station_id == reset.station_id  # same id asked for, still a new key
    assert named.public_key_b64 != reset.public_key_b64


def test_reset_on_an_empty_dir_creates(tmp_path: Path) -> None:
    assert make(tmp_path, reset=True)[1] == "created"


def test_reset_replaces_an_unreadable_identity(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text("{broken")
    os.chmod(tmp_path / "identity.json", 0o600)
    with pytest.raises(IdentityError, match="not valid JSON"):
        make(tmp_path)
    with pytest.raises(IdentityError, match="--owner and --broker missing"):
        register(tmp_path, owner=None, broker_url=None, reset=True)
    identity, status = make(tmp_path, reset=True)
    assert status == "reset"
    assert load_identity(tmp_path) == identity
    assert mode(tmp_path / "identity.json") == 0o600


# --- load_identity --------------------------------------------------------------------------


def test_load_round_trips_and_never_shows_the_private_key(tmp_path: Path) -> None:
    identity, _ = make(tmp_path, password="hunter2")
    loaded = load_identity(tmp_path)
    assert loaded == identity  # equal ids, owners, brokers and keys
    seed = json.loads((tmp_path / "identity.json").read_text())["private_key"]
    for text in (repr(loaded), str(loaded)):
        assert seed not in text and "hunter2" not in text


def test_load_without_identity_names_rdv_register(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="rdv register"):
        load_identity(tmp_path / "nothing")


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o700])
def test_load_refuses_a_file_others_can_touch(tmp_path: Path, bad_mode: int) -> None:
    make(tmp_path)
    path = tmp_path / "identity.json"
    os.chmod(path, bad_mode)
    if bad_mode & 0o077:
        with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
            load_identity(tmp_path)
        os.chmod(path, 0o600)
    load_identity(tmp_path)  # 0600, or owner-only bits, is fine


def corrupt(path: Path, change: dict[str, object]) -> None:
    document = json.loads(path.read_text())
    document.update(change)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    "change,says",
    [
        ({"version": 2}, "version"),
        ({"version": True}, "version"),
        ({"station_id": "Bad/Id"}, "station_id"),
        ({"owner": None}, "owner"),
        ({"broker": "mqtt://h"}, "broker"),
        ({"broker": {"url": "http://h"}}, "scheme"),
        ({"broker": {"url": BROKER, "password": 5}}, "password"),
        ({"private_key": "not base64!"}, "private_key"),
        ({"private_key": base64.b64encode(b"short").decode()}, "32 bytes"),
        ({"public_key": None}, "public key"),
    ],
)
def test_load_refuses_malformed_content(
    tmp_path: Path, change: dict[str, object], says: str
) -> None:
    make(tmp_path)
    corrupt(tmp_path / "identity.json", change)
    with pytest.raises(IdentityError) as raised:
        load_identity(tmp_path)
    assert "malformed" in str(raised.value) and says in str(raised.value)
    assert "rdv register --reset" in str(raised.value)


def test_load_refuses_a_public_key_of_another_private_key(tmp_path: Path) -> None:
    make(tmp_path)
    corrupt(tmp_path / "identity.json", {"public_key": new_key_b64()})
    with pytest.raises(IdentityError, match="does not belong"):
        load_identity(tmp_path)


@pytest.mark.parametrize("content", [b"", b"[]", b"\xff\xfe", b"null", b"[" * 100_000])
def test_load_refuses_non_json(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError):
        load_identity(tmp_path)


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "identity.json").mkdir()
    with pytest.raises(IdentityError):
        load_identity(tmp_path)


# --- TrustRoster ----------------------------------------------------------------------------


def test_empty_roster_when_no_file(tmp_path: Path) -> None:
    roster = TrustRoster.load(tmp_path)
    assert roster.items() == [] and len(roster) == 0
    assert roster.key_for("robot-1") is None
    assert not (tmp_path / "trusted.json").exists()  # reading never creates it


def test_add_persists_0600_and_verifies_signatures(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    key = encode_public_key(private.public_key())
    roster = TrustRoster.load(tmp_path / "cfg")
    assert roster.add("robot-1", key) is True
    assert roster.add("robot-1", key) is False  # already trusted
    assert mode(tmp_path / "cfg" / "trusted.json") == 0o600
    assert mode(tmp_path / "cfg") == 0o700
    assert json.loads((tmp_path / "cfg" / "trusted.json").read_text()) == {
        "version": 1,
        "stations": {"robot-1": key},
    }
    public = TrustRoster.load(tmp_path / "cfg").key_for("robot-1")
    assert public is not None
    public.verify(private.sign(b"m"), b"m")


def test_items_are_sorted_and_remove_persists(tmp_path: Path) -> None:
    roster = TrustRoster.load(tmp_path)
    keys = {name: new_key_b64() for name in ("teleop-b", "robot-a", "robot-c")}
    for name, key in keys.items():
        roster.add(name, key)
    assert roster.items() == sorted(keys.items())
    assert roster.remove("robot-a") is True
    assert roster.remove("robot-a") is False
    assert [name for name, _ in TrustRoster.load(tmp_path).items()] == ["robot-c", "teleop-b"]


def test_a_different_key_is_refused_unless_replaced(tmp_path: Path) -> None:
    roster = TrustRoster.load(tmp_path)
    first, second = new_key_b64(), new_key_b64()
    roster.add("robot-1", first)
    with pytest.raises(IdentityError, match="rdv trust remove robot-1"):
        roster.add("robot-1", second)
    assert roster.key_b64_for("robot-1") == first
    assert roster.add("robot-1", second, replace=True) is True
    assert TrustRoster.load(tmp_path).key_b64_for("robot-1") == second


def test_one_spelling_per_key(tmp_path: Path) -> None:
    # Base64 ignores the spare low bits of the last character before '=': same 32 bytes.
    key = new_key_b64()
    spare = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = spare.index(key[-2])
    other = key[:-2] + spare[last ^ 1] + "="
    assert other != key and base64.b64decode(other) == base64.b64decode(key)
    assert canonical_public_key(other) == key
    roster = TrustRoster.load(tmp_path)
    roster.add("robot-1", other)
    assert roster.key_b64_for("robot-1") == key
    assert roster.add("robot-1", key) is False


@pytest.mark.parametrize(
    "station_id,key,says",
    [
        ("Robot", None, "station id"),
        ("robot-1", "abc", "base64"),
        ("robot-1", base64.b64encode(b"x" * 31).decode(), "32 bytes"),
        ("robot-1", 5, "base64 string"),
    ],
)
def test_add_refuses_bad_ids_and_keys(
    tmp_path: Path, station_id: str, key: object, says: str
) -> None:
    with pytest.raises(IdentityError, match=None) as raised:
        TrustRoster.load(tmp_path).add(station_id, key or new_key_b64())  # type: ignore[arg-type]
    assert says in str(raised.value)
    assert not (tmp_path / "trusted.json").exists()


def test_a_running_roster_sees_changes_made_by_another_process(tmp_path: Path) -> None:
    running = TrustRoster.load(tmp_path)
    cli = TrustRoster.load(tmp_path)
    key = new_key_b64()
    cli.add("teleop-1", key)
    assert running.key_b64_for("teleop-1") == key
    # A write starts from the file, so it keeps what the other process added.
    other = new_key_b64()
    running.add("teleop-2", other)
    assert TrustRoster.load(tmp_path).items() == [("teleop-1", key), ("teleop-2", other)]
    cli.remove("teleop-1")
    assert running.key_for("teleop-1") is None


def test_a_broken_roster_keeps_the_last_good_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    roster = TrustRoster.load(tmp_path)
    key = new_key_b64()
    roster.add("teleop-1", key)
    path = tmp_path / "trusted.json"
    path.write_text('{"version": 1, "stations": {"teleop-1": ')  # half-written by an editor
    with caplog.at_level(logging.ERROR):
        assert roster.key_b64_for("teleop-1") == key
        assert roster.key_b64_for("teleop-1") == key
    assert sum("keeping the previously trusted keys" in r.message for r in caplog.records) == 1
    with pytest.raises(IdentityError, match="not valid JSON"):
        TrustRoster.load(tmp_path)
    with pytest.raises(IdentityError):  # and will not overwrite what the user is editing
        roster.add("teleop-2", new_key_b64())


@pytest.mark.parametrize(
    "document,says",
    [
        ({"version": 2, "stations": {}}, "version"),
        ({"version": 1}, "stations"),
        ({"version": 1, "stations": {"Bad": "x"}}, "station id"),
        ({"version": 1, "stations": {"robot-1": "short"}}, "public key"),
        ([], "object"),
    ],
)
def test_load_refuses_a_malformed_roster(tmp_path: Path, document: object, says: str) -> None:
    (tmp_path / "trusted.json").write_text(json.dumps(document))
    with pytest.raises(IdentityError, match="malformed") as raised:
        TrustRoster.load(tmp_path)
    assert says in str(raised.value)


def test_roster_writable_by_others_is_refused(tmp_path: Path) -> None:
    TrustRoster.load(tmp_path).add("robot-1", new_key_b64())
    path = tmp_path / "trusted.json"
    os.chmod(path, 0o644)  # readable is fine: public keys are no secret
    assert len(TrustRoster.load(tmp_path)) == 1
    os.chmod(path, 0o664)  # writable is not: whoever writes it decides whom we trust
    with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
        TrustRoster.load(tmp_path)
