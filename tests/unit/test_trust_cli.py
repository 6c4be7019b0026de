"""Unit tests for `rdv register`, `rdv identity` and `rdv trust` (session_manager/trust_cli.py).

The commands are built with add_*_parser into a throwaway `rdv` parser, as services/cli.py
does, and run with run_*. Covers: every flag's help states its default; register's first run,
missing flags, no-op re-runs, updates and --reset (new id, role prefix kept, hint to remove
the old id); the password from $RDV_BROKER_PASSWORD, never printed; --ca-file checks; identity's
table and --json without secrets; trust add/list/remove and their refusals; and two stations
set up entirely through these commands exchanging a signed message. Config dirs are under
tmp_path.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

import pytest

from services.session_manager.identity import TrustRoster, load_identity
from services.session_manager.signing import Verifier, sign_envelope
from services.session_manager.trust_cli import (
    add_identity_parser,
    add_register_parser,
    add_trust_parser,
    run_identity,
    run_register,
    run_trust,
)

BROKER = "mqtt://127.0.0.1:1883"
RUNNERS = {"register": run_register, "identity": run_identity, "trust": run_trust}


@pytest.fixture(autouse=True)
def no_real_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever a test forgets, the real ~/.config/rdv is never the default here."""
    monkeypatch.setenv("RDV_CONFIG_DIR", str(tmp_path / "env-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("RDV_BROKER_PASSWORD", raising=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdv")
    commands = parser.add_subparsers(dest="command", required=True)
    add_register_parser(commands)
    add_identity_parser(commands)
    add_trust_parser(commands)
    return parser


def rdv(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return RUNNERS[args.command](args)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rdv(*argv)
    out, err = capsys.readouterr()
    return code, out, err


def secrets_of(directory: Path) -> list[str]:
    document = json.loads((directory / "identity.json").read_text())
    return [value for value in (document["private_key"], document["broker"]["password"]) if value]


# --- help -----------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in subcommands(sub).items()})
    return found


def test_every_flag_states_its_default() -> None:
    commands = subcommands(build_parser())
    assert set(commands) == {
        "register",
        "identity",
        "trust",
        "trust add",
        "trust list",
        "trust remove",
    }
    for name, parser in commands.items():
        assert parser.description, name
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help and "default" in action.help, (
                    f"rdv {name} {action.option_strings[0]}: help does not state its default"
                )
    register_flags = {
        flag for action in commands["register"]._actions for flag in action.option_strings
    }
    assert {
        "--owner",
        "--broker",
        "--username",
        "--password",
        "--ca-file",
        "--station-id",
        "--role",
        "--config-dir",
        "--reset",
    } <= register_flags


def test_help_mentions_the_password_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["register", "--help"])
    assert "$RDV_BROKER_PASSWORD" in " ".join(capsys.readouterr().out.split())


# --- rdv register ---------------------------------------------------------------------------


def test_first_register_prints_the_key_and_the_trust_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "robot"
    code, out, err = run(
        capsys, "register", "--owner", "alice", "--broker", BROKER, "--role", "robot",
        "--config-dir", str(directory),
    )  # fmt: skip
    assert code == 0, err
    identity = load_identity(directory)
    assert identity.station_id.startswith("robot-")
    assert "created" in out
    assert identity.public_key_b64 in out and identity.fingerprint in out
    assert f"rdv trust add {identity.station_id} {identity.public_key_b64}" in out
    assert stat.S_IMODE(os.stat(directory / "identity.json").st_mode) == 0o600
    for secret in secrets_of(directory):
        assert secret not in out + err


def test_register_without_owner_or_broker_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "register", "--broker", BROKER, "--config-dir", str(tmp_path))
    assert code == 1 and "--owner" in err and "rdv register: error:" in err
    code, _, err = run(capsys, "register", "--owner", "alice", "--config-dir", str(tmp_path))
    assert code == 1 and "--broker" in err
    assert not (tmp_path / "identity.json").exists()


@pytest.mark.parametrize(
    "flags,says",
    [
        (["--owner", "Alice"], "owner"),
        (["--station-id", "a/b"], "station id"),
        (["--broker", "http://x"], "mqtt://"),
    ],
)
def test_register_refuses_bad_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], says: str
) -> None:
    argv = ["register", "--owner", "alice", "--broker", BROKER, *flags]
    code, _, err = run(capsys, *argv, "--config-dir", str(tmp_path))
    assert code == 1 and says in err


def test_register_rejects_an_unknown_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        rdv("register", "--role", "drone")
    assert exited.value.code == 2


def test_register_again_is_a_no_op_and_flags_update(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["register", "--config-dir", str(tmp_path)]
    assert rdv(*base, "--owner", "alice", "--broker", BROKER) == 0
    first = load_identity(tmp_path)
    capsys.readouterr()
    code, out, _ = run(capsys, *base)
    assert code == 0 and "unchanged" in out
    code, out, _ = run(capsys, *base, "--owner", "bob", "--username", "bob")
    assert code == 0 and "updated" in out
    updated = load_identity(tmp_path)
    assert (updated.station_id, updated.public_key_b64) == (first.station_id, first.public_key_b64)
    assert (updated.owner, updated.broker.username) == ("bob", "bob")


def test_register_reset_keeps_the_role_and_says_to_untrust_the_old_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["register", "--config-dir", str(tmp_path)]
    assert rdv(*base, "--owner", "alice", "--broker", BROKER, "--role", "teleop") == 0
    old = load_identity(tmp_path)
    capsys.readouterr()
    code, out, _ = run(capsys, *base, "--reset")
    new = load_identity(tmp_path)
    assert code == 0 and "reset" in out
    assert new.station_id.startswith("teleop-") and new.station_id != old.station_id
    assert new.public_key_b64 != old.public_key_b64
    assert f"rdv trust remove {old.station_id}" in out
    assert f"rdv trust add {new.station_id} {new.public_key_b64}" in out
    # An explicit --role wins over the old prefix.
    assert rdv(*base, "--reset", "--role", "robot") == 0
    assert load_identity(tmp_path).station_id.startswith("robot-")


def test_password_from_the_environment_is_stored_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RDV_BROKER_PASSWORD", "s3cret-from-env")
    base = ["register", "--config-dir", str(tmp_path)]
    code, out, err = run(capsys, *base, "--owner", "alice", "--broker", BROKER, "--username", "al")
    assert code == 0
    assert load_identity(tmp_path).broker.password == "s3cret-from-env"
    assert "s3cret-from-env" not in out + err
    assert "password set" in out
    assert "shell history" not in err  # only a password on the command line earns the note
    code, out, err = run(capsys, *base, "--password", "on-the-command-line")
    assert code == 0 and load_identity(tmp_path).broker.password == "on-the-command-line"
    assert "shell history" in err and "on-the-command-line" not in out + err


def test_password_to_a_remote_plain_broker_earns_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RDV_BROKER_PASSWORD", "pw")
    argv = ["register", "--owner", "a", "--broker", "mqtt://broker.example.com"]
    code, _, err = run(capsys, *argv, "--config-dir", str(tmp_path))
    assert code == 0 and "unencrypted" in err


def test_ca_file_must_exist_and_is_stored_absolute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["register", "--owner", "a", "--broker", "mqtts://broker.example.com"]
    base += ["--config-dir", str(tmp_path / "cfg")]
    code, _, err = run(capsys, *base, "--ca-file", str(tmp_path / "missing.pem"))
    assert code == 1 and "no such file" in err
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *base, "--ca-file", "ca.pem")
    assert code == 0, err
    assert load_identity(tmp_path / "cfg").broker.ca_file == str(tmp_path / "ca.pem")
    assert rdv(*base, "--ca-file", "") == 0  # '' clears it
    assert load_identity(tmp_path / "cfg").broker.ca_file is None


def test_register_uses_the_environment_config_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rdv("register", "--owner", "alice", "--broker", BROKER) == 0
    assert (tmp_path / "env-config" / "identity.json").exists()


def test_register_refuses_an_identity_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["register", "--owner", "alice", "--broker", BROKER, "--config-dir", str(tmp_path)]
    assert rdv(*base) == 0
    os.chmod(tmp_path / "identity.json", 0o644)
    code, _, err = run(capsys, *base)
    assert code == 1 and "chmod 600" in err


# --- rdv identity ---------------------------------------------------------------------------


def test_identity_shows_public_facts_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RDV_BROKER_PASSWORD", "pw-never-shown")
    rdv("register", "--owner", "alice", "--broker", BROKER, "--username", "alice",
        "--config-dir", str(tmp_path))  # fmt: skip
    capsys.readouterr()
    identity = load_identity(tmp_path)
    code, out, _ = run(capsys, "identity", "--config-dir", str(tmp_path))
    assert code == 0
    for fact in (
        identity.station_id,
        "alice",
        BROKER,
        identity.public_key_b64,
        identity.fingerprint,
    ):
        assert fact in out
    code, text, _ = run(capsys, "identity", "--json", "--config-dir", str(tmp_path))
    assert code == 0
    assert json.loads(text) == {
        "station_id": identity.station_id,
        "owner": "alice",
        "broker_url": BROKER,
        "username": "alice",
        "public_key": identity.public_key_b64,
        "fingerprint": identity.fingerprint,
    }
    for secret in secrets_of(tmp_path):
        assert secret not in out + text


def test_identity_without_one_names_rdv_register(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "identity", "--config-dir", str(tmp_path / "none"))
    assert code == 1 and "rdv register" in err


# --- rdv trust ------------------------------------------------------------------------------


def test_trust_add_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    rdv("register", "--owner", "a", "--broker", BROKER, "--config-dir", str(other))
    peer = load_identity(other)
    cfg = ["--config-dir", str(tmp_path / "me")]
    capsys.readouterr()

    code, out, _ = run(capsys, "trust", "list", *cfg)
    assert code == 0 and "no trusted stations" in out
    code, out, _ = run(capsys, "trust", "add", peer.station_id, peer.public_key_b64, *cfg)
    assert code == 0 and "now trusted" in out and peer.fingerprint in out
    code, out, _ = run(capsys, "trust", "add", peer.station_id, peer.public_key_b64, *cfg)
    assert code == 0 and "already trusted" in out
    assert stat.S_IMODE(os.stat(tmp_path / "me" / "trusted.json").st_mode) == 0o600
    code, out, _ = run(capsys, "trust", "list", *cfg)
    assert code == 0
    assert out.split() == [peer.station_id, peer.fingerprint, peer.public_key_b64]
    code, out, _ = run(capsys, "trust", "remove", peer.station_id, *cfg)
    assert code == 0 and "no longer trusted" in out
    code, _, err = run(capsys, "trust", "remove", peer.station_id, *cfg)
    assert code == 1 and "not trusted" in err


def test_trust_add_refuses_bad_input_and_a_second_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = ["--config-dir", str(tmp_path)]
    a, b = tmp_path / "a", tmp_path / "b"
    for directory in (a, b):
        rdv("register", "--owner", "x", "--broker", BROKER, "--config-dir", str(directory))
    key_a, key_b = load_identity(a).public_key_b64, load_identity(b).public_key_b64
    capsys.readouterr()
    code, _, err = run(capsys, "trust", "add", "robot-1", "not-a-key", *cfg)
    assert code == 1 and "base64" in err
    code, _, err = run(capsys, "trust", "add", "Robot/1", key_a, *cfg)
    assert code == 1 and "station id" in err
    assert rdv("trust", "add", "robot-1", key_a, *cfg) == 0
    code, _, err = run(capsys, "trust", "add", "robot-1", key_b, *cfg)
    assert code == 1 and "rdv trust remove robot-1" in err
    assert TrustRoster.load(tmp_path).key_b64_for("robot-1") == key_a


def test_trust_refuses_a_roster_others_can_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rdv("register", "--owner", "x", "--broker", BROKER, "--config-dir", str(tmp_path / "a"))
    key = load_identity(tmp_path / "a").public_key_b64
    assert rdv("trust", "add", "robot-1", key, "--config-dir", str(tmp_path)) == 0
    os.chmod(tmp_path / "trusted.json", 0o666)
    capsys.readouterr()
    code, _, err = run(capsys, "trust", "list", "--config-dir", str(tmp_path))
    assert code == 1 and "chmod 600" in err


# --- two stations, set up by hand ---------------------------------------------------------


def test_two_stations_registered_and_trusted_by_cli_exchange_a_signed_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    robot_dir, teleop_dir = tmp_path / "robot", tmp_path / "teleop"
    for directory, role in ((robot_dir, "robot"), (teleop_dir, "teleop")):
        assert rdv("register", "--owner", "alice", "--broker", BROKER, "--role", role,
                   "--config-dir", str(directory)) == 0  # fmt: skip
    out = capsys.readouterr().out
    # Paste each printed `rdv trust add` line on the other station, as the owner would.
    lines = [line.split() for line in out.splitlines() if line.strip().startswith("rdv trust add")]
    robot_line, teleop_line = lines
    assert rdv(*robot_line[1:], "--config-dir", str(teleop_dir)) == 0
    assert rdv(*teleop_line[1:], "--config-dir", str(robot_dir)) == 0

    robot, teleop = load_identity(robot_dir), load_identity(teleop_dir)
    to_robot = sign_envelope(teleop, "session.request", robot.station_id, {"session": "s"})
    envelope = Verifier(robot.station_id, TrustRoster.load(robot_dir)).verify(to_robot)
    assert envelope.sender == teleop.station_id
    to_teleop = sign_envelope(robot, "session.accept", teleop.station_id, {"session": "s"})
    assert Verifier(teleop.station_id, TrustRoster.load(teleop_dir)).verify(to_teleop).kind == (
        "session.accept"
    )
