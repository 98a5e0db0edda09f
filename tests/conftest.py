"""Shared fixtures: a real Mosquitto per test, and MQTT v5 clients connected to it.

Nothing is skipped when mosquitto is missing: ``LocalBroker.start`` raises a ConfigError
that says how to install it, and the test fails (CI installs it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedbus.broker import LocalBroker

TEST_DEVICES = ("dev-a", "dev-b", "dev-c")
CONNECT_TIMEOUT = 5.0

OnMessage = Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]


class MqttClientFactory(Protocol):
    def __call__(
        self,
        broker: LocalBroker,
        username: str,
        *,
        password: str | None = None,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        will: tuple[str, bytes] | None = None,
        on_message: OnMessage | None = None,
        keepalive: int = 10,
    ) -> mqtt.Client: ...


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A fresh broker on a free port with accounts coordinator, dev-a, dev-b, dev-c."""
    local = LocalBroker(tmp_path / "broker", device_ids=TEST_DEVICES)
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def mqtt_client() -> Iterator[MqttClientFactory]:
    """``mqtt_client(broker, username, ...)``: a connected MQTT v5 client, loop running.

    The password defaults to the account's own. ``will`` is (topic, payload), sent QoS 1
    retained. ``on_message`` is installed before connecting, so messages queued in a durable
    session are not missed. Fails the test if the broker refuses the connection. Every
    client is disconnected and its loop stopped at teardown.
    """
    clients: list[mqtt.Client] = []

    def connect(
        broker: LocalBroker,
        username: str,
        *,
        password: str | None = None,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        will: tuple[str, bytes] | None = None,
        on_message: OnMessage | None = None,
        keepalive: int = 10,
    ) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or username,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if password is None:
            password = broker.credentials(username).password
        client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        if on_message is not None:
            client.on_message = on_message
        connack = _ConnackWaiter(client)
        properties = Properties(PacketTypes.CONNECT)
        if session_expiry:
            properties.SessionExpiryInterval = session_expiry
        clients.append(client)
        client.connect(broker.host, broker.port, keepalive=keepalive,
                       clean_start=clean_start, properties=properties)
        client.loop_start()
        connack.expect_success(username)
        return client

    yield connect
    for client in clients:
        client.disconnect()
        client.loop_stop()


class _ConnackWaiter:
    """Records the first CONNACK of ``client``."""

    def __init__(self, client: mqtt.Client) -> None:
        self._event = threading.Event()
        self._reason: Any = None
        client.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    def expect_success(self, username: str) -> None:
        if not self._event.wait(CONNECT_TIMEOUT):
            raise AssertionError(f"{username}: no CONNACK within {CONNECT_TIMEOUT} s")
        if self._reason.is_failure:
            raise AssertionError(f"{username}: connection refused: {self._reason}")
