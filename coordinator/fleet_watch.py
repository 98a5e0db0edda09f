"""``fedbus status``'s and ``fedbus run``'s side of the wire: the thin MQTT shell that receives the
coordinator's retained fleet snapshot as the operator account.

The operator account (``fedbus-operator``) may read the fleet snapshot, the task, the model
and every status, and write nothing (docs/protocol.md section 2.8). The watcher keeps no
session (expiry 0) and subscribes to ``<prefix>/fleet`` only: the broker hands it the
retained snapshot at once, then each new one the coordinator publishes.
"""

from __future__ import annotations

import threading
import time

from fedbus.errors import ConnectTimeout, FedbusError
from fedbus.topics import Topics
from fedbus.transport import (
    ConnectionSettings,
    Message,
    MqttClient,
    PublishResult,
    TransportFactory,
)

__all__ = ["FleetWatcher", "NoSnapshot"]

_POLL = 0.05


class NoSnapshot(FedbusError):
    """No fleet snapshot arrived in time."""


class FleetWatcher:
    """Receives the fleet snapshots of one prefix; ``next_payload`` hands out the newest."""

    def __init__(self, settings: ConnectionSettings, prefix: str, *, timeout: float,
                 transport: TransportFactory = MqttClient) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.topic = Topics(prefix).fleet
        self._arrived = threading.Condition()
        self._payload: bytes | None = None
        self._client = transport(settings, on_message=self._on_message)

    def start(self) -> None:
        """Connect and subscribe; a ``FedbusError`` with one line when the broker cannot be
        reached or refuses the login within the timeout."""
        self._client.subscribe(self.topic, qos=1)
        self._client.start()
        deadline = time.monotonic() + self.timeout
        while not self._client.wait_connected(_POLL):
            fatal = self._client.fatal
            if fatal is None and time.monotonic() < deadline:
                continue
            self._client.stop(disconnect=False)
            if fatal is not None:
                raise fatal
            s = self._client.settings
            raise ConnectTimeout(s.host, s.port, self.timeout, self._client.last_error)

    def next_payload(self, timeout: float) -> bytes | None:
        """The newest snapshot that arrived since the last call, waiting up to ``timeout``
        seconds for one; None if none came."""
        with self._arrived:
            if self._payload is None:
                self._arrived.wait(timeout)
            payload, self._payload = self._payload, None
            return payload

    def first_payload(self) -> bytes:
        """The retained snapshot (or the first one published), within the timeout."""
        payload = self.next_payload(self.timeout)
        if payload is None:
            raise NoSnapshot(
                f"no fleet snapshot on {self.topic} within {self.timeout:g} s: is a "
                "coordinator (fedbus with protocol revision 2.3 or newer) serving prefix "
                f"{self.prefix!r} on this broker, and is {self._client.settings.username!r} the "
                "operator account (`fedbus devices operator`)?"
            )
        return payload

    def publish(self, topic: str, payload: bytes) -> PublishResult:
        """Publish ``payload`` (QoS 1, not retained): the run commands of ``fedbus run``
        (revision 2.5), which only the operator account may write."""
        return self._client.publish(topic, payload, qos=1, retain=False)

    def fatal(self) -> FedbusError | None:
        return self._client.fatal

    def stop(self) -> None:
        self._client.stop()

    def _on_message(self, message: Message) -> None:
        if message.topic != self.topic or not message.payload:
            return
        with self._arrived:
            self._payload = message.payload
            self._arrived.notify_all()
