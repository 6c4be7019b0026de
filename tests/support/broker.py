"""Real MQTT brokers for tests: Mosquitto (what deploy/mosquitto/ configures) and amqtt.

Each broker is its own process on 127.0.0.1 and a free port, started from a config file written
into its own temp dir (`rdv-mq-*`), so nothing lands in the checkout. `stop()` ends exactly the
process this started (by its pid: SIGTERM, then SIGKILL after 5 s), reaps it and removes the
temp dir. `restart()` keeps the dir (config, persistence) and the port; `kill()` crashes the
broker (SIGKILL) keeping both; `pause()`/`resume()` hang and wake it (SIGSTOP/SIGCONT).

Mosquitto runs the SHIPPED `deploy/mosquitto/acl` when it has users, mirrors the shipped
limits, and builds its TLS listener from the shipped (commented) TLS block; with
`shipped_config=True` it runs `deploy/mosquitto/mosquitto.conf` itself, only its port changed.

Also here: `mqtt_client()` and helpers (paho-mqtt 2.x) that connect, subscribe and publish with
deadlines and hand back the broker's reason codes for tests to assert on.

This module must never touch the system mosquitto service or its files, listen anywhere but
loopback, or signal a process it did not start.

AmqttBroker runs the product's own embedded broker, `python -m services.local_broker --kind amqtt`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "mosquitto"
SHIPPED_CONF = DEPLOY_DIR / "mosquitto.conf"
SHIPPED_ACL = DEPLOY_DIR / "acl"

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
# Limits copied from the shipped config, so tests meet the broker production runs.
_MIRRORED_DIRECTIVES = (
    "max_packet_size",
    "max_inflight_messages",
    "max_queued_messages",
    "persistent_client_expiration",
    "set_tcp_nodelay",
)
# Broker users (owners) with their passwords, for brokers with an ACL in tests.
ACL_USERS = {"alice": "alice-secret", "bob": "bob-secret"}
_START_ATTEMPTS = 5
_STOP_GRACE_S = 5.0

B = TypeVar("B", bound="_BrokerProcess")


class BrokerError(RuntimeError):
    """A broker did not start (the message carries its log)."""


class _AddressInUse(BrokerError):
    pass


def free_port() -> int:
    """A port free on 127.0.0.1 right now (another process may still take it: retry on bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tool(name: str) -> str:
    path = shutil.which(name, path=_SBIN_PATH)
    if path is None:
        raise BrokerError(f"{name} not found (Debian: apt-get install mosquitto mosquitto-clients)")
    return path


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class _BrokerProcess:
    """One broker process and its temp dir; subclasses say how to configure and run it."""

    name = "broker"
    protocol = 5  # highest MQTT version it speaks, as paho numbers them: 4 = 3.1.1, 5 = 5.0
    _ready_pattern = re.compile("")
    _scheme = "mqtt"

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.ca_file: Path | None = None
        self._port: int | None = None
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    # --- what subclasses provide -----------------------------------------------------------

    def _prepare(self, directory: Path) -> None:
        """Write what stays the same across restarts (passwords, certificates)."""

    def _write_config(self, directory: Path, port: int) -> None:
        raise NotImplementedError

    def _command(self, directory: Path) -> tuple[list[str], Path, dict[str, str] | None]:
        """argv, working directory, environment (None: inherit)."""
        raise NotImplementedError

    # --- properties -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.dir / "broker.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except (OSError, RuntimeError):
            return "(no log)"

    # --- life cycle -------------------------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the broker and wait until it accepts connections.

        The first start picks a free port (a new one if another process takes it first); a
        start after kill() or restart() reuses the same dir and port, or fails.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        first = self._dir is None
        if first:
            self._dir = Path(tempfile.mkdtemp(prefix="rdv-mq-"))
        try:
            if first:
                self._prepare(self._dir)
            for _ in range(_START_ATTEMPTS):
                if first:
                    self._port = free_port()
                try:
                    self._write_config(self._dir, self.port)
                    self._spawn_and_wait(timeout_s)
                    return
                except _AddressInUse:
                    if not first:
                        raise
            raise BrokerError(f"{self.name}: no free port in {_START_ATTEMPTS} attempts")
        except BaseException:
            if first:
                self.stop()
            raise

    def stop(self) -> None:
        """End the process this started (SIGTERM, SIGKILL after 5 s) and remove the temp dir."""
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._port = None

    def restart(self, timeout_s: float = 15.0) -> None:
        """Clean stop (Mosquitto saves its persistence), then start on the same port."""
        self._terminate()
        self.start(timeout_s)

    def kill(self) -> None:
        """Crash it (SIGKILL), keeping dir and port: start() brings it back on the same port."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._paused = False

    def pause(self) -> None:
        """Hang the broker (SIGSTOP): the kernel still accepts TCP connections, nothing answers."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def __enter__(self: B) -> B:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:  # pytest shows this with the failure
            print(f"--- {self!r} log (tail) ---\n{self.log_text()}", file=sys.stderr)
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"<{type(self).__name__} {where}>"

    # --- internals --------------------------------------------------------------------------

    def _accepting(self) -> bool:
        """Whether the broker takes TCP connections (a broker in another netns probes there)."""
        return _accepts(self.host, self.port)

    def _signal(self, signum: int) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"{self.name} is not running")
        self._process.send_signal(signum)  # Popen never signals a pid it has already reaped

    def _terminate(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            if self._paused:
                process.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only now
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        self._paused = False

    def _spawn_and_wait(self, timeout_s: float) -> None:
        directory = self.dir
        argv, cwd, env = self._command(directory)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        while True:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                new_log = log.read().decode(errors="replace")
            returncode = self._process.poll()
            if returncode is not None:
                self._process = None
                if "address already in use" in new_log.lower():
                    raise _AddressInUse(f"{self.name}: port {self.port} taken")
                raise BrokerError(
                    f"{self.name} exited with code {returncode} on start; its log:\n{new_log}"
                )
            if self._ready_pattern.search(new_log) and self._accepting():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"{self.name} did not accept connections on {self.host}:{self.port} within "
                    f"{timeout_s} s; its log:\n{new_log}"
                )
            time.sleep(0.02)


# --- Mosquitto -------------------------------------------------------------------------------


def shipped_directives(names: tuple[str, ...], conf: Path = SHIPPED_CONF) -> list[str]:
    """The active (uncommented) lines of the shipped config that set one of `names`."""
    lines = []
    for line in conf.read_text().splitlines():
        words = line.split()
        if words and words[0] in names:
            lines.append(line.strip())
    return lines


def shipped_tls_block(conf: Path = SHIPPED_CONF) -> list[str]:
    """The directive lines of the shipped config's commented TLS block, uncommented.

    The block runs from the line containing `BEGIN TLS` to the one containing `END TLS`;
    directives are the lines `#word ...` (comments are `# ...`, with a space).
    """
    directives: list[str] = []
    inside = False
    for line in conf.read_text().splitlines():
        if "BEGIN TLS" in line:
            inside = True
        elif "END TLS" in line:
            break
        elif inside and re.match(r"#\w", line):
            directives.append(line[1:].strip())
    if not inside or not directives:
        raise BrokerError(f"{conf} has no `BEGIN TLS` ... `END TLS` block of #directives")
    return directives


def write_test_pki(directory: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Path:
    """A throwaway CA and a server certificate for `names`: ca.crt, server.crt, server.key.

    Returns the path of ca.crt. Made with the `cryptography` library; valid for one day.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rdv test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.crt").write_bytes(server_cert.public_bytes(pem))
    key_file = directory / "server.key"
    key_file.write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return directory / "ca.crt"


def _write_passwd(path: Path, users: dict[str, str]) -> None:
    """A mosquitto password file: plain `user:password` lines, hashed in place by the tool."""
    path.write_text("".join(f"{user}:{password}\n" for user, password in users.items()))
    subprocess.run(
        [_tool("mosquitto_passwd"), "-U", str(path)], check=True, capture_output=True, timeout=30
    )


class Mosquitto(_BrokerProcess):
    """A real Mosquitto 2.0 on 127.0.0.1 and a free port.

    - no users: anonymous clients allowed, no ACL;
    - `acl_users={"alice": "pw", ...}`: a password file with them and the shipped ACL
      (deploy/mosquitto/acl), anonymous refused;
    - `tls=True`: the listener is the shipped TLS block (uncommented; port and file paths
      changed) with a throwaway CA (`ca_file`) and a server certificate for 127.0.0.1/localhost;
    - `shipped_config=True`: deploy/mosquitto/mosquitto.conf itself (needs `acl_users`), see
      `_write_shipped_config`.
    """

    name = "mosquitto"
    protocol = 5
    _ready_pattern = re.compile(r"mosquitto version \S+ running")

    def __init__(
        self,
        *,
        acl_users: dict[str, str] | None = None,
        tls: bool = False,
        shipped_config: bool = False,
    ) -> None:
        super().__init__()
        if shipped_config and (tls or not acl_users):
            raise ValueError("shipped_config needs acl_users and cannot add TLS")
        self.users: dict[str, str] = dict(acl_users or {})
        self.tls = tls
        self.shipped_config = shipped_config
        self._scheme = "mqtts" if tls else "mqtt"

    @property
    def config_path(self) -> Path:
        if self.shipped_config:
            return self.dir / "deploy" / "mosquitto" / "mosquitto.conf"
        return self.dir / "mosquitto.conf"

    @property
    def persistence_dir(self) -> Path:
        return self.dir / ("run/mosquitto" if self.shipped_config else "data")

    def reload(self) -> None:
        """SIGHUP: re-read config, password file and ACL (as an admin does after adding a user)."""
        self._signal(signal.SIGHUP)

    def set_password(self, user: str, password: str | None) -> None:
        """Add a user or change its password (None: remove it) in the password file; reload()."""
        passwd = self.dir / ("deploy/mosquitto/passwd" if self.shipped_config else "passwd")
        argv = (
            ["-D", str(passwd), user] if password is None else ["-b", str(passwd), user, password]
        )
        subprocess.run([_tool("mosquitto_passwd"), *argv], check=True, capture_output=True)
        if password is None:
            self.users.pop(user, None)
        else:
            self.users[user] = password

    def _prepare(self, directory: Path) -> None:
        if self.shipped_config:
            self._prepare_shipped(directory)
            return
        self.persistence_dir.mkdir()
        if self.users:
            _write_passwd(directory / "passwd", self.users)
        if self.tls:
            self.ca_file = write_test_pki(directory)

    def _write_config(self, directory: Path, port: int) -> None:
        if self.shipped_config:
            self._write_shipped_config(port)
            return
        lines = [
            "# Written by tests/support/broker.py for one test (see deploy/mosquitto/).",
            "per_listener_settings false",
            # As root, stay root (this is a throwaway dir); as anyone else this does nothing.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        ]
        if self.users:
            lines += [
                "allow_anonymous false",
                f"password_file {directory / 'passwd'}",
                f"acl_file {SHIPPED_ACL}",
            ]
        else:
            lines.append("allow_anonymous true")
        lines += [
            "persistence true",
            f"persistence_location {self.persistence_dir}",
            *shipped_directives(_MIRRORED_DIRECTIVES),
        ]
        if self.tls:
            files = {
                "cafile": directory / "ca.crt",
                "certfile": directory / "server.crt",
                "keyfile": directory / "server.key",
            }
            for directive in shipped_tls_block():
                key = directive.split()[0]
                if key == "listener":
                    directive = f"listener {port} {self.host}"
                elif key in files:
                    directive = f"{key} {files[key]}"
                lines.append(directive)
        else:
            lines.append(f"listener {port} {self.host}")
        lines += [
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _prepare_shipped(self, directory: Path) -> None:
        """The layout a user has in a checkout: deploy/mosquitto/{conf,acl,passwd}, run/mosquitto.

        Done as README.md says, including, when root, letting the user mosquitto drops to read
        passwd and write run/mosquitto (mkdtemp makes the dir 0700: open it to that user).
        """
        deploy = directory / "deploy" / "mosquitto"
        deploy.mkdir(parents=True)
        shutil.copy(SHIPPED_ACL, deploy / "acl")
        _write_passwd(deploy / "passwd", self.users)
        self.persistence_dir.mkdir(parents=True)
        if os.geteuid() == 0:
            try:
                drop_to = pwd.getpwnam("mosquitto")
            except KeyError:  # mosquitto then drops to nobody
                drop_to = pwd.getpwnam("nobody")
            directory.chmod(0o755)
            os.chown(self.persistence_dir, drop_to.pw_uid, drop_to.pw_gid)

    def _write_shipped_config(self, port: int) -> None:
        """The shipped file, with its loopback listener moved to `port`: nothing else changes.

        The port must change because 1883 may be in use (a system broker, another test) and
        tests run in parallel; the address must stay loopback.
        """
        text = SHIPPED_CONF.read_text()
        pattern = re.compile(r"^listener 1883 127\.0\.0\.1$", re.MULTILINE)
        if len(pattern.findall(text)) != 1:
            raise BrokerError(
                f"{SHIPPED_CONF} must have exactly one active `listener 1883 127.0.0.1` line"
            )
        self.config_path.write_text(pattern.sub(f"listener {port} 127.0.0.1", text))

    def _command(self, directory: Path) -> tuple[list[str], Path, dict[str, str] | None]:
        if self.shipped_config:  # as README.md says: from the checkout root, relative path
            return [_tool("mosquitto"), "-c", "deploy/mosquitto/mosquitto.conf"], directory, None
        return [_tool("mosquitto"), "-c", str(self.config_path)], directory, None


# --- amqtt -----------------------------------------------------------------------------------


class AmqttBroker(_BrokerProcess):
    """amqtt (a Python broker, MQTT 3.1.1 only) in its own process, anonymous clients allowed.

    It keeps nothing across restart() (no persistence) and never fires the Last Will of a hung
    client (no keepalive enforcement); a dead socket does fire it.
    """

    name = "amqtt"
    protocol = 4
    _ready_pattern = re.compile(r"local_broker: amqtt")

    def _write_config(self, directory: Path, port: int) -> None:
        self._amqtt_port = port  # the product's own runner takes it as a flag; no config file

    def _command(self, directory: Path) -> tuple[list[str], Path, dict[str, str] | None]:
        # The same embedded broker `rdv demo` falls back to, not a test-only copy.
        argv = [
            sys.executable, "-m", "services.local_broker",
            "--kind", "amqtt", "--port", str(self._amqtt_port),
        ]  # fmt: skip
        return argv, directory, None


Broker = Mosquitto | AmqttBroker


# --- paho clients ----------------------------------------------------------------------------


class MqttConnectError(ConnectionError):
    """The broker refused the connection (`reason_code`) or did not answer in time (None)."""

    def __init__(self, message: str, reason_code: ReasonCode | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


@dataclass
class Will:
    topic: str
    payload: bytes | str
    qos: int = 1
    retain: bool = True


@dataclass
class _ClientState:
    """What a test client has seen; the client's userdata (guarded by `cond`)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    connack: ReasonCode | None = None
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    disconnects: list[ReasonCode] = field(default_factory=list)


def _state(client: mqtt.Client) -> _ClientState:
    state = client.user_data_get()
    if not isinstance(state, _ClientState):
        raise TypeError("not a client made by mqtt_client()")
    return state


def _wait(state: _ClientState, ready: Callable[[], Any], timeout_s: float) -> Any:
    with state.cond:
        state.cond.wait_for(ready, timeout=timeout_s)
        return ready()


def mqtt_client(
    url: str,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | Path | None = None,
    protocol: int = 5,
    client_id: str | None = None,
    *,
    will: Will | None = None,
    keepalive: int = 60,
    clean: bool = True,
    reconnect: bool = False,
    timeout_s: float = 5.0,
) -> mqtt.Client:
    """A paho client connected to `url` (mqtt:// or mqtts://) with its network loop running.

    mqtts:// checks the broker against `ca_file`, else the system's CA store. Raises what the
    TCP or TLS connect raises (e.g. ssl.SSLCertVerificationError), or MqttConnectError when
    the CONNACK refuses (its `reason_code`: "Not authorized" is 135 on MQTT 5 and 3.1.1 alike)
    or does not come within `timeout_s`. Close it with close_client().
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"not an mqtt:// or mqtts:// URL: {url!r}")
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    version = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
    state = _ClientState()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"rdv-test-{uuid.uuid4().hex[:12]}",
        clean_session=None if version == mqtt.MQTTv5 else clean,
        userdata=state,
        protocol=version,
        reconnect_on_failure=reconnect,
    )
    client.connect_timeout = timeout_s
    if username is not None:
        client.username_pw_set(username, password)
    if parts.scheme == "mqtts":
        client.tls_set(ca_certs=str(ca_file) if ca_file else None)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def on_connect(_c: mqtt.Client, s: _ClientState, _flags: Any, rc: ReasonCode, _p: Any) -> None:
        with s.cond:
            s.connack = rc
            s.cond.notify_all()

    def on_disconnect(_c: mqtt.Client, s: _ClientState, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with s.cond:
            s.disconnects.append(rc)
            s.cond.notify_all()

    def on_subscribe(
        _c: mqtt.Client, s: _ClientState, mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        with s.cond:
            s.subacks[mid] = codes
            s.cond.notify_all()

    def on_publish(_c: mqtt.Client, s: _ClientState, mid: int, rc: ReasonCode, _p: Any) -> None:
        with s.cond:
            s.pubacks[mid] = rc
            s.cond.notify_all()

    def on_message(_c: mqtt.Client, s: _ClientState, message: mqtt.MQTTMessage) -> None:
        with s.cond:
            s.messages.append(message)
            s.cond.notify_all()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    if version == mqtt.MQTTv5:
        client.connect(parts.hostname, port, keepalive, clean_start=clean)
    else:
        client.connect(parts.hostname, port, keepalive)
    client.loop_start()
    connack = _wait(state, lambda: state.connack, timeout_s)
    if connack is None or connack.is_failure:
        close_client(client)
        if connack is None:
            raise MqttConnectError(f"no CONNACK from {url} within {timeout_s} s")
        raise MqttConnectError(f"{url} refused the connection: {connack}", connack)
    return client


def close_client(client: mqtt.Client) -> None:
    """Disconnect cleanly (no Last Will) and stop the network loop."""
    client.disconnect()
    client.loop_stop()


def subscribe(
    client: mqtt.Client, topic: str, qos: int = 1, timeout_s: float = 5.0
) -> list[ReasonCode]:
    """Subscribe and wait for the SUBACK; returns its reason codes (granted QoS or failure)."""
    state = _state(client)
    result, mid = client.subscribe(topic, qos)
    if result != mqtt.MQTT_ERR_SUCCESS:
        raise ConnectionError(f"subscribe {topic!r} failed: {mqtt.error_string(result)}")
    codes = _wait(state, lambda: state.subacks.get(mid), timeout_s)
    if codes is None:
        raise TimeoutError(f"no SUBACK for {topic!r} within {timeout_s} s")
    return codes


def publish(
    client: mqtt.Client,
    topic: str,
    payload: bytes | str,
    qos: int = 1,
    retain: bool = False,
    properties: Properties | None = None,
    timeout_s: float = 5.0,
) -> ReasonCode | None:
    """Publish; with QoS 1/2 wait for the broker's ack and return its reason code.

    MQTT 5 brokers say why in the ack (e.g. 135 Not authorized, 16 No matching subscribers:
    below 128 is success); on MQTT 3.1.1 the ack always reads Success. QoS 0 returns None
    once the message is written to the socket.
    """
    state = _state(client)
    info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise ConnectionError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
    if qos == 0:
        info.wait_for_publish(timeout_s)
        return None
    code = _wait(state, lambda: state.pubacks.get(info.mid), timeout_s)
    if code is None:
        raise TimeoutError(f"no ack for the publish to {topic!r} within {timeout_s} s")
    return code


def received(client: mqtt.Client, topic_filter: str = "#") -> list[mqtt.MQTTMessage]:
    """Messages received so far on topics matching `topic_filter`, oldest first."""
    state = _state(client)
    with state.cond:
        return [m for m in state.messages if mqtt.topic_matches_sub(topic_filter, m.topic)]


def wait_for_message(
    client: mqtt.Client,
    topic_filter: str,
    predicate: Callable[[mqtt.MQTTMessage], bool] = lambda _m: True,
    timeout_s: float = 5.0,
) -> mqtt.MQTTMessage:
    """The first received message (already or within `timeout_s`) matching filter and predicate."""
    state = _state(client)

    def first() -> mqtt.MQTTMessage | None:
        for message in state.messages:
            if mqtt.topic_matches_sub(topic_filter, message.topic) and predicate(message):
                return message
        return None

    message = _wait(state, first, timeout_s)
    if message is None:
        with state.cond:
            seen = [(m.topic, m.payload[:60]) for m in state.messages]
        raise AssertionError(f"no message on {topic_filter!r} within {timeout_s} s; got {seen}")
    return message


def disconnects(client: mqtt.Client) -> list[ReasonCode]:
    """Reason codes of the disconnections the client has seen."""
    state = _state(client)
    with state.cond:
        return list(state.disconnects)


def wait_for_disconnect(client: mqtt.Client, timeout_s: float = 5.0) -> ReasonCode:
    """The reason code of the client's first disconnection (already or within `timeout_s`)."""
    state = _state(client)
    code = _wait(state, lambda: state.disconnects[0] if state.disconnects else None, timeout_s)
    if code is None:
        raise AssertionError(f"the client was not disconnected within {timeout_s} s")
    return code
