"""The station's MQTT connection: fixed client id, retained Last Will, reconnect with backoff.

paho runs its network loop on its own thread; this module only hands what arrives to a queue,
so all decisions happen on the session manager's one thread. It must never block that thread
and never publish outside the station's own `rdv/v1/<owner>/` subtree.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services import metrics

log = logging.getLogger(__name__)
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
INBOX_EXPIRY_S = 10  # an unread request is worthless after this; the broker may drop it
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 10  # paho's backoff doubles from min to max per attempt


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retained: bool
    correlation: bytes | None = None


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Disconnected:
    reason: str


def disable_nagle(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on the broker connection. Without it, a publish that follows the ACK of a
    message just received waits for the broker's delayed ACK (~40 ms on Linux): measured by
    bench/presence.py, one pairing took 103 ms instead of 30 ms. paho does not set it."""
    with contextlib.suppress(OSError, AttributeError):  # TLS wrappers and test sockets vary
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) from mqtt://host[:port] or mqtts://host[:port]."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:1883 or mqtts://host:8883: {url}")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


class MqttLink:
    def __init__(
        self,
        *,
        client_id: str,
        url: str,
        username: str | None,
        password: str | None,
        ca_file: str | None,
        protocol: str,
        will_topic: str,
        will_payload: bytes,
        subscriptions: list[str],
        events: queue.Queue,
        keepalive_s: int = 10,
    ) -> None:
        self.host, self.port, tls = broker_address(url)
        self.protocol = PROTOCOLS[protocol]
        self._subscriptions = subscriptions
        self._events = events
        self._keepalive_s = keepalive_s
        # A fixed client id: a reconnect replaces the old connection instead of leaving a ghost
        # whose will could fire later and mark the station offline.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=self.protocol
        )
        if username:
            client.username_pw_set(username, password)
        if tls:
            client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.will_set(will_topic, will_payload, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        client.on_socket_open = disable_nagle
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        self._failed_attempts = 0
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    @property
    def v5(self) -> bool:
        return self.protocol == mqtt.MQTTv5

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self._keepalive_s)
        self.client.loop_start()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: str | None = None,
        expiry_s: int | None = None,
    ) -> mqtt.MQTTMessageInfo:
        properties = None
        if self.v5 and (response_topic or correlation or expiry_s):
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation:
                properties.CorrelationData = correlation.encode()
            if expiry_s:
                properties.MessageExpiryInterval = expiry_s
        return self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)

    def stop(self, last_topic: str | None = None, last_payload: bytes | None = None) -> None:
        """Publish a last retained message (offline presence), then disconnect cleanly."""
        if last_topic is not None and last_payload is not None and self.client.is_connected():
            info = self.client.publish(last_topic, last_payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline presence not confirmed: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        metrics.MQTT_CONNECTED.set(0)

    # paho's thread: hand over, decide nothing here.
    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                    _properties: Any = None) -> None:  # fmt: skip
        if reason.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        metrics.MQTT_CONNECTED.set(1)
        self._failed_attempts = 0
        log.info("connected to broker %s:%d", self.host, self.port)
        self._events.put(Connected())

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        # One line per attempt: paho's backoff (doubling, at most RECONNECT_MAX_S apart) is
        # what keeps this from flooding, and the times show that it backs off.
        self._failed_attempts += 1
        log.warning(
            "broker %s:%d unreachable (attempt %d); retrying with backoff (%d-%d s)",
            self.host,
            self.port,
            self._failed_attempts,
            RECONNECT_MIN_S,
            RECONNECT_MAX_S,
        )

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                       _properties: Any = None) -> None:  # fmt: skip
        metrics.MQTT_CONNECTED.set(0)
        self._events.put(Disconnected(str(reason)))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        correlation = None
        properties = getattr(message, "properties", None)
        if properties is not None and hasattr(properties, "CorrelationData"):
            correlation = properties.CorrelationData
        self._events.put(Incoming(message.topic, message.payload, message.retain, correlation))
