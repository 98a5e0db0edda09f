"""Adding, disabling, enabling, removing and listing devices on a running broker.

``DynsecAdmin`` sends commands of Mosquitto's dynamic-security plugin (``fedbus.dynsec``)
over MQTT as the broker's admin account, through the one transport seam
(``fedbus.transport``): it works from any machine that can reach the broker over TLS, needs
no shell access to the broker host and no ``mosquitto_ctrl``, and never restarts the broker,
so no other device's session is touched.

The plugin answers on ``$CONTROL/dynamic-security/v1/response``; every command carries a
random correlation tag so the answer to this admin's commands is told apart.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from fedbus import dynsec
from fedbus.credentials import BrokerAccess
from fedbus.dynsec import DeviceEntry, DynsecError
from fedbus.errors import ConfigError, FedbusError
from fedbus.tls import TlsSettings, is_loopback
from fedbus.transport import ConnectionSettings, Message, MqttClient, TransportFactory

__all__ = ["AdminError", "DynsecAdmin", "DynsecError", "admin_settings"]

DEFAULT_TIMEOUT = 10.0
_POLL = 0.05


class AdminError(FedbusError):
    """The broker could not be reached as the admin account, or did not answer in time."""


def admin_settings(access: BrokerAccess) -> ConnectionSettings:
    """How the admin account of a credentials file connects: over TLS to the file's TLS
    port when the broker has one (verified with the file's CA), else plain MQTT (loopback
    only); no durable session."""
    if access.username != dynsec.ADMIN_USERNAME:
        raise ConfigError(f"{access.username!r} is not the admin account")
    if not access.password:
        raise ConfigError("the credentials file has no password for the admin account")
    tls = access.tls_port is not None
    if not tls and not is_loopback(access.host):
        raise ConfigError(
            f"the broker at {access.host} has no TLS port in the credentials file: the admin "
            "password would cross the network in clear text"
        )
    return ConnectionSettings(
        host=access.host, port=access.port_for(tls=tls, client_certificate=False),
        client_id=dynsec.ADMIN_USERNAME, username=access.username, password=access.password,
        session_expiry=0, tls=TlsSettings(ca_file=access.ca_file) if tls else None,
    )


class DynsecAdmin:
    """One admin connection to the broker's dynamic-security plugin.

    ``settings`` connect as the admin account (``fedbus.dynsec.ADMIN_USERNAME``); the session
    is not kept (expiry 0). Use as a context manager.
    """

    def __init__(self, settings: ConnectionSettings, prefix: str, *,
                 transport: TransportFactory = MqttClient,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self._prefix = prefix
        self._timeout = timeout
        self._lock = threading.Lock()
        self._answers: list[bytes] = []
        self._arrived = threading.Condition(self._lock)
        self._client = transport(settings, on_message=self._on_message)

    # -- life cycle -----------------------------------------------------------------------

    def connect(self) -> None:
        self._client.subscribe(dynsec.RESPONSE_TOPIC, qos=1)
        self._client.start()
        deadline = time.monotonic() + self._timeout
        while not self._client.wait_connected(_POLL):
            if self._client.fatal is None and time.monotonic() < deadline:
                continue
            self._client.stop(disconnect=False)
            s = self._client.settings
            if self._client.fatal is not None:
                raise AdminError(f"cannot log in to the broker as {s.username!r}: "
                                 f"{self._client.fatal}")
            cause = self._client.last_error
            raise AdminError(
                f"cannot reach the broker at {s.host}:{s.port} as {s.username!r} within "
                f"{self._timeout:g} s" + (f": {cause}" if cause else "")
            )

    def close(self) -> None:
        self._client.stop()

    def __enter__(self) -> DynsecAdmin:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- devices --------------------------------------------------------------------------

    def add_device(self, device_id: str, password: str | None) -> None:
        """A new account with its own role; ``password`` None: certificate login only.
        ``DynsecError`` if the account or its role already exists."""
        self.send(dynsec.add_device_commands(self._prefix, device_id, password))

    def disable_device(self, device_id: str) -> None:
        self.send(dynsec.disable_device_commands(device_id))

    def enable_device(self, device_id: str) -> None:
        self.send(dynsec.enable_device_commands(device_id))

    def remove_device(self, device_id: str) -> None:
        self.send(dynsec.remove_device_commands(device_id))

    def list_devices(self) -> list[DeviceEntry]:
        (answer,) = self.send([dynsec.list_clients_command()])
        return dynsec.devices_from_list(answer)

    # -- commands -------------------------------------------------------------------------

    def send(self, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` in one message and return the plugin's answers, in order.

        The plugin carries out the commands of one message in order and does not stop at a
        refused one; ``DynsecError`` names the first refusal.
        """
        correlation = secrets.token_hex(8)
        payload = dynsec.encode_commands(commands, correlation)
        with self._lock:
            self._answers.clear()
        result = self._client.publish(dynsec.CONTROL_TOPIC, payload, qos=1)
        if not result.wait(self._timeout):
            raise AdminError(
                f"the broker refused the admin command ({result.reason}): is "
                f"{self._client.settings.username!r} the admin account of a broker with the "
                "dynamic-security plugin?"
            )
        with self._arrived:
            while True:
                for raw in self._answers:
                    found = dynsec.read_responses(raw, correlation, len(commands))
                    if found is not None:
                        return found
                self._answers.clear()
                if not self._arrived.wait(self._timeout):
                    raise AdminError(
                        f"no answer from the dynamic-security plugin within {self._timeout:g} s"
                    )

    def _on_message(self, message: Message) -> None:
        if message.topic != dynsec.RESPONSE_TOPIC:
            return
        with self._arrived:
            self._answers.append(message.payload)
            self._arrived.notify_all()

