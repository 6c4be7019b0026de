"""`rdv register`, `rdv identity` and `rdv trust {add,list,remove}`: a station's identity and the
keys its owner trusts, from the command line.

services/cli.py adds these subcommands with the add_*_parser functions and runs them with the
run_* ones (each returns an exit code: 0 done, 1 refused, with the reason on stderr). The files
and their rules live in identity.py. This module must never print a private key or a broker
password.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.session_manager.identity import (
    ROLE_HINTS,
    Identity,
    IdentityError,
    TrustRoster,
    config_dir,
    fingerprint,
    load_identity,
    register,
)

CONFIG_DIR_HELP = (
    "directory of identity.json and trusted.json (default: $RDV_CONFIG_DIR, else "
    "$XDG_CONFIG_HOME/rdv, else ~/.config/rdv)"
)
PASSWORD_ENV = "RDV_BROKER_PASSWORD"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _add_config_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", default=None, metavar="DIR", help=CONFIG_DIR_HELP)


# --- rdv register ---------------------------------------------------------------------------


def add_register_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "register",
        help="create or update this station's identity (key pair, owner, broker)",
        description="Create this station's identity: an Ed25519 key pair, a station id, its "
        "owner and the MQTT broker it meets its peers on, saved in identity.json (mode 0600). "
        "Running it again with the same flags changes nothing; with other flags it updates the "
        "owner and broker and keeps the key; --reset makes a new key and a new station id.",
        epilog="Then, on each other station of yours that should talk to this one, run the "
        "`rdv trust add ...` line this prints.",
    )
    parser.add_argument(
        "--owner",
        help="owner name, the broker's user subtree rdv/v1/<owner>/; 1-48 of a-z 0-9 _ - "
        "(default: the registered one; needed the first time)",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="MQTT broker: mqtt://HOST[:PORT] (plain, port 1883) or mqtts://HOST[:PORT] (TLS, "
        "port 8883) (default: the registered one; needed the first time)",
    )
    parser.add_argument(
        "--username",
        help="broker user name; '' clears it (default: the registered one, none the first time)",
    )
    parser.add_argument(
        "--password",
        help=f"broker password; '' clears it. Prefer ${PASSWORD_ENV}, which stays out of your "
        f"shell history (default: ${PASSWORD_ENV}, else the registered one, none the first time)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PATH",
        help="CA certificate (PEM) to check an mqtts:// broker with; '' clears it (default: the "
        "registered one; none the first time, i.e. the system's CA store)",
    )
    parser.add_argument(
        "--station-id",
        metavar="ID",
        help="this station's id; 1-48 of a-z 0-9 _ - (default: the registered one; the first "
        "time or with --reset, ROLE-<6 random hex>)",
    )
    parser.add_argument(
        "--role",
        choices=ROLE_HINTS,
        default=None,
        help="prefix of a generated station id (default: station; with --reset, the current "
        "id's prefix if it is robot or teleop)",
    )
    _add_config_dir(parser)
    parser.add_argument(
        "--reset",
        action="store_true",
        help="make a new key and a new station id; peers must then trust the new key "
        "(default: off, keep the key)",
    )
    return parser


def run_register(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    password = args.password
    if password is None:
        password = os.environ.get(PASSWORD_ENV) or None
    elif password:
        _note("a password on the command line stays in your shell history; prefer "
              f"${PASSWORD_ENV}")  # fmt: skip
    ca_file = args.ca_file
    if ca_file:
        path = Path(ca_file).expanduser().absolute()  # the station runs from another directory
        if not path.is_file():
            return _fail("register", f"--ca-file {path}: no such file")
        ca_file = str(path)
    previous = _current_id(directory) if args.reset else None
    role = args.role or _role_of(previous) or "station"
    try:
        identity, status = register(
            directory,
            owner=args.owner,
            broker_url=args.broker,
            username=args.username,
            password=password,
            ca_file=ca_file,
            station_id=args.station_id,
            role_hint=role,
            reset=args.reset,
        )
    except IdentityError as exc:
        return _fail("register", str(exc))
    except OSError as exc:
        return _fail("register", f"cannot write {directory}: {exc.strerror}")

    done = {
        "created": "created",
        "unchanged": "unchanged (nothing written)",
        "updated": "updated (same key and station id)",
        "reset": "reset: new key and station id",
    }[status]
    print(f"rdv: identity {done} in {directory / 'identity.json'}")
    _print_identity(identity)
    if status == "reset" and previous and previous != identity.station_id:
        print(
            f"The old key is gone: on stations that trusted {previous}, run "
            f"`rdv trust remove {previous}`."
        )
    print("To let one of your other stations talk to this one, run there:")
    print(f"  rdv trust add {identity.station_id} {identity.public_key_b64}")
    broker = identity.broker
    if broker.password and not broker.tls and broker.host not in LOOPBACK_HOSTS:
        _note(f"the broker password travels unencrypted to {broker.host}: consider mqtts://")
    return 0


def _current_id(directory: Path) -> str | None:
    try:
        return load_identity(directory).station_id
    except IdentityError:
        return None


def _role_of(station_id: str | None) -> str | None:
    prefix = (station_id or "").split("-", 1)[0]
    return prefix if prefix in ("robot", "teleop") else None


# --- rdv identity ---------------------------------------------------------------------------


def add_identity_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "identity",
        help="show this station's id, owner, broker and public key",
        description="Show this station's identity from identity.json: station id, owner, "
        "broker, public key and its fingerprint. Never shows the private key or the broker "
        "password.",
    )
    _add_config_dir(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object, for scripts (default: off, a table for humans)",
    )
    return parser


def run_identity(args: argparse.Namespace) -> int:
    try:
        identity = load_identity(config_dir(args.config_dir))
    except IdentityError as exc:
        return _fail("identity", str(exc))
    if args.json:
        print(
            json.dumps(
                {
                    "station_id": identity.station_id,
                    "owner": identity.owner,
                    "broker_url": identity.broker.url,
                    "username": identity.broker.username,
                    "public_key": identity.public_key_b64,
                    "fingerprint": identity.fingerprint,
                }
            )
        )
    else:
        _print_identity(identity)
    return 0


def _print_identity(identity: Identity) -> None:
    broker = identity.broker
    login = [f"user {broker.username}"] if broker.username else []
    login += ["password set"] if broker.password else []
    login += [f"CA {broker.ca_file}"] if broker.ca_file else []
    rows = (
        ("station id", identity.station_id),
        ("owner", identity.owner),
        ("broker", broker.url + (f" ({', '.join(login)})" if login else "")),
        ("public key", identity.public_key_b64),
        ("fingerprint", identity.fingerprint),
    )
    for name, value in rows:
        print(f"  {name:<12} {value}")


# --- rdv trust ------------------------------------------------------------------------------


def add_trust_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "trust",
        help="list, add or remove the stations whose signed messages this one accepts",
        description="Manage trusted.json: the public keys, by station id, that this station "
        "accepts signed messages from. Get a station's id and key with `rdv identity` (or the "
        "line `rdv register` prints) on that station. A running station picks changes up "
        "without a restart.",
    )
    actions = parser.add_subparsers(dest="trust_action", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="trust a station's public key",
        description="Trust a station's public key. A station already trusted with another key "
        "is refused: remove it first if it was re-registered.",
    )
    add.add_argument("station_id", metavar="ID", help="the station's id, as `rdv identity` shows")
    add.add_argument("key", metavar="KEY", help="its public key, base64, as `rdv identity` shows")
    _add_config_dir(add)
    listing = actions.add_parser(
        "list", help="show the trusted stations", description="Show the trusted stations."
    )
    _add_config_dir(listing)
    remove = actions.add_parser(
        "remove",
        help="stop trusting a station",
        description="Stop trusting a station: its messages are rejected from now on.",
    )
    remove.add_argument("station_id", metavar="ID", help="the station's id")
    _add_config_dir(remove)
    return parser


def run_trust(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    command = f"trust {args.trust_action}"
    try:
        roster = TrustRoster.load(directory)
        if args.trust_action == "add":
            added = roster.add(args.station_id, args.key)
            key = roster.key_b64_for(args.station_id) or args.key
            what = "now trusted" if added else "already trusted"
            print(f"rdv: {args.station_id} {what} (fingerprint {fingerprint(key)})")
        elif args.trust_action == "remove":
            if not roster.remove(args.station_id):
                return _fail(command, f"{args.station_id} is not trusted in {roster.path}")
            print(f"rdv: {args.station_id} no longer trusted")
        else:
            items = roster.items()
            if not items:
                print(f"rdv: no trusted stations in {roster.path}")
            width = max((len(station_id) for station_id, _ in items), default=0)
            for station_id, key in items:
                print(f"{station_id:<{width}}  {fingerprint(key)}  {key}")
    except IdentityError as exc:
        return _fail(command, str(exc))
    except OSError as exc:
        return _fail(command, f"cannot write {directory}: {exc.strerror}")
    return 0


def _fail(command: str, message: str) -> int:
    print(f"rdv {command}: error: {message}", file=sys.stderr)
    return 1


def _note(message: str) -> None:
    print(f"rdv: note: {message}", file=sys.stderr)
