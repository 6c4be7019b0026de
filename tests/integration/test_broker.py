"""The rdv broker setup against real brokers: deploy/mosquitto/ and the test support for it.

What this proves: both brokers the project supports (Mosquitto, amqtt) start, serve retained
messages and Last Wills and stop without leaving a process or a temp dir; the SHIPPED ACL keeps
owners apart (reads, writes, wildcards, $SYS) and the shipped password setup refuses strangers;
the shipped TLS block serves mqtts:// to clients that trust its CA only; the shipped
mosquitto.conf itself starts as README.md says and persists retained presence across a
restart; and the fault tools (restart, kill, pause) do what later fault tests rely on.

Every broker and client here is real and runs on 127.0.0.1 on a free port; nothing touches
the system mosquitto service.
"""

from __future__ import annotations

import os
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import (
    ACL_USERS,
    REPO_ROOT,
    SHIPPED_CONF,
    AmqttBroker,
    Broker,
    Mosquitto,
    MqttConnectError,
    mqtt_client,
    publish,
    received,
    shipped_tls_block,
    subscribe,
    wait_for_disconnect,
    wait_for_message,
)

# The broker fixtures (mosquitto, mosquitto_acl, mosquitto_tls, amqtt_broker, broker,
# mqtt_connect); harmless if a conftest.py imports them too.
pytest_plugins = ["tests.support.fixtures"]
pytestmark = pytest.mark.integration

Connect = Callable[..., mqtt.Client]

PRESENCE = "rdv/v1/alice/robot-1/presence"
INBOX = "rdv/v1/alice/robot-1/inbox"
NOT_AUTHORIZED = 0x87


def _running(pid: int) -> bool:
    """The pid is still a live broker (not a zombie, not a recycled pid of something else)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read()
    except OSError:
        return False
    return b"mosquitto" in argv or b"tests.support.broker" in argv


def _login(broker: Mosquitto, user: str) -> dict[str, str]:
    return {"username": user, "password": broker.users[user]}


# --- both brokers ----------------------------------------------------------------------------


def test_broker_serves_retained_message_and_stops_clean(broker: Broker, mqtt_connect: Connect):
    publisher = mqtt_connect(broker.url, protocol=broker.protocol)
    code = publish(publisher, PRESENCE, b'{"status": "online"}', qos=1, retain=True)
    assert code is not None and not code.is_failure, code  # Mosquitto: 16 No matching subs

    later = mqtt_connect(broker.url, protocol=broker.protocol)
    assert [c.value for c in subscribe(later, "rdv/v1/alice/#", qos=1)] == [1]
    message = wait_for_message(later, PRESENCE)
    assert message.payload == b'{"status": "online"}'
    assert message.retain, "a retained message reaches a later subscriber flagged retained"

    pid, directory = broker.pid, broker.dir
    broker.stop()
    assert not _running(pid), f"{broker.name} pid {pid} still running after stop()"
    assert not directory.exists(), f"{directory} left behind"


WILL_CLIENT = """
import sys, time
from tests.support.broker import Will, mqtt_client, publish
url, protocol, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
will = Will(topic, b'{"status": "offline"}', qos=1, retain=True)
client = mqtt_client(url, protocol=protocol, client_id="robot-1", will=will, keepalive=60)
publish(client, topic, b'{"status": "online"}', qos=1, retain=True)
print("online", flush=True)
time.sleep(60)
"""


def test_last_will_fires_when_client_process_dies(broker: Broker, mqtt_connect: Connect):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    station = subprocess.Popen(
        [sys.executable, "-c", WILL_CLIENT, broker.url, str(broker.protocol), PRESENCE],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert station.stdout is not None
        ready, _, _ = select.select([station.stdout], [], [], 15)
        line = station.stdout.readline() if ready else b""
        assert line == b"online\n", f"will client did not come up: {station.stderr.read()!r}"

        watcher = mqtt_connect(broker.url, protocol=broker.protocol)
        subscribe(watcher, PRESENCE)
        wait_for_message(watcher, PRESENCE, lambda m: b"online" in m.payload)

        station.kill()  # SIGKILL: the socket dies without a DISCONNECT
        station.wait()
        killed_at = time.monotonic()
        will = wait_for_message(watcher, PRESENCE, lambda m: b"offline" in m.payload, 10)
        latency = time.monotonic() - killed_at
    finally:
        if station.poll() is None:
            station.kill()
            station.wait()
        for pipe in (station.stdout, station.stderr):
            if pipe is not None:
                pipe.close()
    print(f"{broker.name}: Last Will {latency * 1000:.0f} ms after the client's SIGKILL")
    assert will.payload == b'{"status": "offline"}'
    assert latency < 3.0, f"Last Will took {latency:.2f} s after the client's socket died"

    later = mqtt_connect(broker.url, protocol=broker.protocol)
    subscribe(later, PRESENCE)
    stored = wait_for_message(later, PRESENCE)
    assert stored.payload == b'{"status": "offline"}' and stored.retain, "the will is retained"


def test_restart_keeps_port_kill_and_pause(broker: Broker, mqtt_connect: Connect):
    publisher = mqtt_connect(broker.url, protocol=broker.protocol)
    publish(publisher, PRESENCE, b"online", qos=1, retain=True)
    port, first_pid = broker.port, broker.pid

    broker.restart()
    assert broker.port == port and broker.pid != first_pid
    client = mqtt_connect(broker.url, protocol=broker.protocol)
    subscribe(client, PRESENCE)
    if isinstance(broker, Mosquitto):  # persistence: saved on SIGTERM, loaded on start
        assert wait_for_message(client, PRESENCE).payload == b"online"
    else:  # amqtt keeps nothing across a restart
        time.sleep(0.5)
        assert received(client) == []

    broker.kill()  # a crash: SIGKILL, same dir and port for start()
    broker.start()
    assert broker.port == port
    mqtt_connect(broker.url, protocol=broker.protocol)

    broker.pause()
    try:
        with pytest.raises(MqttConnectError, match="no CONNACK") as refused:
            mqtt_client(broker.url, protocol=broker.protocol, timeout_s=1.0)
        assert refused.value.reason_code is None
    finally:
        broker.resume()
    mqtt_connect(broker.url, protocol=broker.protocol)


def test_amqtt_speaks_mqtt_311_only(amqtt_broker: AmqttBroker):
    with pytest.raises(MqttConnectError) as refused:
        mqtt_client(amqtt_broker.url, protocol=5)
    assert refused.value.reason_code is not None
    assert refused.value.reason_code.getName() == "Unsupported protocol version"


# --- owner isolation with the shipped ACL (Mosquitto) ----------------------------------------


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
def test_owner_reads_and_writes_own_subtree(
    mosquitto_acl: Mosquitto, mqtt_connect: Connect, protocol: int
):
    alice = mqtt_connect(mosquitto_acl.url, protocol=protocol, **_login(mosquitto_acl, "alice"))
    assert [c.value for c in subscribe(alice, "rdv/v1/alice/#")] == [1]
    code = publish(alice, PRESENCE, b"alice-online", qos=1, retain=True)
    assert code is not None and not code.is_failure, code
    assert publish(alice, INBOX, b"request", qos=1).value < 0x80  # type: ignore[union-attr]
    wait_for_message(alice, INBOX)
    assert [m.payload for m in received(alice)] == [b"alice-online", b"request"]


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
def test_other_owner_reads_nothing(mosquitto_acl: Mosquitto, mqtt_connect: Connect, protocol: int):
    alice = mqtt_connect(mosquitto_acl.url, protocol=protocol, **_login(mosquitto_acl, "alice"))
    publish(alice, PRESENCE, b"alice-online", qos=1, retain=True)
    subscribe(alice, "rdv/v1/alice/#")

    bob = mqtt_connect(mosquitto_acl.url, protocol=protocol, **_login(mosquitto_acl, "bob"))
    filters = ["rdv/v1/alice/#", PRESENCE, "rdv/v1/+/+/presence", "#", "$SYS/#"]
    codes = {topic: [c.value for c in subscribe(bob, topic)] for topic in filters}
    # Mosquitto 2.0.11 grants these (SUBACK 0x01, not 0x87 Not authorized) and then checks
    # every message against the ACL before delivering it.
    assert codes == {topic: [1] for topic in filters}

    # A live message after bob subscribed: alice gets it, bob must not.
    publish(alice, INBOX, b"live", qos=1)
    wait_for_message(alice, INBOX)
    # Bob's own message comes after both of alice's on bob's connection (one broker thread,
    # in order), so once it is in, anything of alice's would be too.
    publish(bob, "rdv/v1/bob/teleop-1/presence", b"bob-online", qos=1, retain=True)
    wait_for_message(bob, "rdv/v1/bob/teleop-1/presence")
    leaked = [m.topic for m in received(bob) if not m.topic.startswith("rdv/v1/bob/")]
    assert leaked == [], f"bob received other owners' topics: {leaked}"


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
def test_other_owner_cannot_write(mosquitto_acl: Mosquitto, mqtt_connect: Connect, protocol: int):
    alice = mqtt_connect(mosquitto_acl.url, protocol=protocol, **_login(mosquitto_acl, "alice"))
    publish(alice, PRESENCE, b"alice-online", qos=1, retain=True)
    subscribe(alice, "rdv/v1/alice/#")
    wait_for_message(alice, PRESENCE)

    bob = mqtt_connect(mosquitto_acl.url, protocol=protocol, **_login(mosquitto_acl, "bob"))
    request = publish(bob, INBOX, b"bob-request", qos=1)
    spoof = publish(bob, PRESENCE, b"spoofed-offline", qos=1, retain=True)
    assert request is not None and spoof is not None
    if protocol == 5:  # Mosquitto 2.0.11 says so in the v5 PUBACK
        assert (request.value, spoof.value) == (NOT_AUTHORIZED, NOT_AUTHORIZED)
    else:  # a 3.1.1 PUBACK has no reason code: the drop is silent
        assert (request.value, spoof.value) == (0, 0)
    assert bob.is_connected(), "a denied publish does not disconnect"

    sentinel = "rdv/v1/alice/robot-1/sentinel"
    publish(alice, sentinel, b"after bob", qos=1)
    wait_for_message(alice, sentinel)
    assert [m.payload for m in received(alice)] == [b"alice-online", b"after bob"]

    later = mqtt_connect(mosquitto_acl.url, protocol=protocol, **_login(mosquitto_acl, "alice"))
    subscribe(later, PRESENCE)
    assert wait_for_message(later, PRESENCE).payload == b"alice-online", "retained spoofed"


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize(
    "username,password",
    [("alice", "wrong"), ("mallory", "alice-secret"), (None, None)],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
def test_strangers_are_refused(
    mosquitto_acl: Mosquitto, protocol: int, username: str | None, password: str | None
):
    with pytest.raises(MqttConnectError) as refused:
        mqtt_client(mosquitto_acl.url, username, password, protocol=protocol)
    # v5 CONNACK 0x87 Not authorized (not 0x86 Bad user name or password); 3.1.1 return code 5,
    # which paho reports as the same reason code.
    assert refused.value.reason_code is not None
    assert refused.value.reason_code.value == NOT_AUTHORIZED


def test_owners_added_and_removed_on_reload(mosquitto_acl: Mosquitto, mqtt_connect: Connect):
    alice = mqtt_connect(mosquitto_acl.url, **_login(mosquitto_acl, "alice"))
    bob = mqtt_connect(mosquitto_acl.url, **_login(mosquitto_acl, "bob"))
    with pytest.raises(MqttConnectError):
        mqtt_client(mosquitto_acl.url, "carol", "carol-secret")

    # README.md "Add an owner": mosquitto_passwd, then SIGHUP. No ACL change is needed.
    mosquitto_acl.set_password("carol", "carol-secret")
    mosquitto_acl.set_password("bob", None)
    mosquitto_acl.reload()
    wait_for_disconnect(bob)  # a removed owner is cut off at once
    carol = mqtt_connect(mosquitto_acl.url, "carol", "carol-secret")
    subscribe(carol, "rdv/v1/carol/#")
    publish(carol, "rdv/v1/carol/robot-9/presence", b"carol-online", qos=1, retain=True)
    wait_for_message(carol, "rdv/v1/carol/#")
    assert alice.is_connected(), "other owners stay connected across the reload"
    with pytest.raises(MqttConnectError):
        mqtt_client(mosquitto_acl.url, "bob", "bob-secret")


# --- TLS (the shipped TLS block) -------------------------------------------------------------


def test_tls_listener_is_the_shipped_block(mosquitto_tls: Mosquitto):
    config = mosquitto_tls.config_path.read_text().splitlines()
    for directive in shipped_tls_block():
        key = directive.split()[0]
        if key in ("listener", "cafile", "certfile", "keyfile"):  # port and files: this test's
            assert any(line.split()[0] == key for line in config if line), key
        else:
            assert directive in config, directive
    assert "tls_version tlsv1.2" in config and "require_certificate false" in config


def test_tls_client_trusting_the_ca_connects(mosquitto_tls: Mosquitto, mqtt_connect: Connect):
    assert mosquitto_tls.url.startswith("mqtts://127.0.0.1:")
    alice = mqtt_connect(
        mosquitto_tls.url, ca_file=mosquitto_tls.ca_file, **_login(mosquitto_tls, "alice")
    )
    subscribe(alice, "rdv/v1/alice/#")
    publish(alice, INBOX, b"over tls", qos=1)
    assert wait_for_message(alice, INBOX).payload == b"over tls"
    assert alice.socket() is not None and isinstance(alice.socket(), ssl.SSLSocket)


def test_tls_client_without_the_ca_fails_verification(mosquitto_tls: Mosquitto):
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        mqtt_client(mosquitto_tls.url, **_login(mosquitto_tls, "alice"))  # system CA store


def test_tls_still_needs_a_password(mosquitto_tls: Mosquitto):
    with pytest.raises(MqttConnectError) as refused:
        mqtt_client(mosquitto_tls.url, ca_file=mosquitto_tls.ca_file)
    assert refused.value.reason_code is not None
    assert refused.value.reason_code.value == NOT_AUTHORIZED


# --- the shipped mosquitto.conf itself -------------------------------------------------------


def test_shipped_config_runs_as_readme_says(mqtt_connect: Connect):
    # Run the shipped file from a temp copy of the checkout layout (deploy/mosquitto/ with a
    # fresh passwd, run/mosquitto/), as README.md says. Only its `listener 1883 127.0.0.1` line
    # becomes another port: 1883 may be taken (a system broker, a parallel test run).
    with Mosquitto(acl_users=ACL_USERS, shipped_config=True) as shipped:
        used = shipped.config_path.read_text().splitlines()
        original = SHIPPED_CONF.read_text().splitlines()
        assert len(used) == len(original)
        changed = [(a, b) for a, b in zip(original, used, strict=True) if a != b]
        assert changed == [("listener 1883 127.0.0.1", f"listener {shipped.port} 127.0.0.1")]
        if os.geteuid() == 0:  # started as root, it drops to the mosquitto user as documented
            status = Path(f"/proc/{shipped.pid}/status").read_text()
            uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid"))
            assert uid != "0", "mosquitto kept root"

        with pytest.raises(MqttConnectError):
            mqtt_client(shipped.url)  # allow_anonymous false
        alice = mqtt_connect(shipped.url, **_login(shipped, "alice"))
        publish(alice, PRESENCE, b"alice-online", qos=1, retain=True)
        bob = mqtt_connect(shipped.url, **_login(shipped, "bob"))
        subscribe(bob, "#")
        assert publish(bob, INBOX, b"x", qos=1).value == NOT_AUTHORIZED  # type: ignore[union-attr]
        publish(bob, "rdv/v1/bob/teleop-1/presence", b"bob-online", qos=1)
        wait_for_message(bob, "rdv/v1/bob/#")
        assert [m.topic for m in received(bob)] == ["rdv/v1/bob/teleop-1/presence"]

        # max_packet_size 131072: a 64 KiB envelope passes, a 200 KiB message does not.
        subscribe(alice, INBOX)
        publish(alice, INBOX, b"e" * 65536, qos=1)
        wait_for_message(alice, INBOX, lambda m: len(m.payload) == 65536)
        # No PUBACK: the broker drops the connection (paho may see that before publish returns).
        with pytest.raises((TimeoutError, ConnectionError)):
            publish(alice, INBOX, b"x" * 200_000, qos=1, timeout_s=2)
        wait_for_disconnect(alice)
        assert "disconnected due to oversize packet" in shipped.log_text()
        assert not any(len(m.payload) == 200_000 for m in received(alice))

        shipped.restart()  # persistence true, in run/mosquitto/ as the file says
        assert (shipped.dir / "run" / "mosquitto" / "mosquitto.db").is_file()
        later = mqtt_connect(shipped.url, **_login(shipped, "alice"))
        subscribe(later, PRESENCE)
        assert wait_for_message(later, PRESENCE).payload == b"alice-online"
        pid, directory = shipped.pid, shipped.dir
    assert not _running(pid)
    assert not directory.exists()
