"""pytest fixtures that run real MQTT brokers (tests/support/broker.py) and connect clients.

Bring them into a conftest.py with `from tests.support.fixtures import *  # noqa: F403`.
Every fixture starts its own broker for one test and stops it afterwards (process ended by
pid, temp dir removed); none of them may share a broker between tests or use the system one.

- `mosquitto`: anonymous Mosquitto (MQTT 5 and 3.1.1).
- `mosquitto_acl`: Mosquitto with users ACL_USERS (alice, bob) and the shipped ACL.
- `mosquitto_tls`: like mosquitto_acl, but its only listener is TLS (mqtts://, `.ca_file`).
- `amqtt_broker`: amqtt, anonymous, MQTT 3.1.1 only.
- `broker`: parametrized over Mosquitto and amqtt; use `protocol=broker.protocol`.
- `mqtt_connect`: mqtt_client() that closes every client it made when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import (
    ACL_USERS,
    AmqttBroker,
    Broker,
    Mosquitto,
    close_client,
    mqtt_client,
)

__all__ = [
    "ACL_USERS",
    "amqtt_broker",
    "broker",
    "mosquitto",
    "mosquitto_acl",
    "mosquitto_tls",
    "mqtt_client",
    "mqtt_connect",
]


AnyBroker = TypeVar("AnyBroker", Mosquitto, AmqttBroker)


def _serve(running: AnyBroker) -> Iterator[AnyBroker]:
    with running:
        yield running
        # Captured by pytest: shown in the report of a failed test only.
        print(f"--- {running!r} log (tail) ---\n{running.log_text()}")


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    yield from _serve(Mosquitto())


@pytest.fixture
def mosquitto_acl() -> Iterator[Mosquitto]:
    yield from _serve(Mosquitto(acl_users=ACL_USERS))


@pytest.fixture
def mosquitto_tls() -> Iterator[Mosquitto]:
    yield from _serve(Mosquitto(acl_users=ACL_USERS, tls=True))


@pytest.fixture
def amqtt_broker() -> Iterator[AmqttBroker]:
    yield from _serve(AmqttBroker())


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if request.param == "mosquitto":
        yield from _serve(Mosquitto())
    else:
        yield from _serve(AmqttBroker())


@pytest.fixture
def mqtt_connect() -> Iterator[Callable[..., mqtt.Client]]:
    """mqtt_client(url, ...) for a test; its clients are closed when the test ends."""
    clients: list[mqtt.Client] = []

    def connect(*args: Any, **kwargs: Any) -> mqtt.Client:
        client = mqtt_client(*args, **kwargs)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        close_client(client)
