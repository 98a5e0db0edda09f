"""The one module that talks MQTT (paho-mqtt 2.x, MQTT v5 only).

Everything else in fedbus sees a small client object: ``start()``, ``subscribe()``,
``publish()`` returning a :class:`PublishResult`, and an ``on_message`` callback that
receives plain :class:`Message` values. The paho traps this module takes care of:

- durable sessions: a stable client id, ``clean_start=False`` passed explicitly on every
  connect and a non-zero session expiry (paho's default wipes the session on restart);
- a publish's fate is read from the PUBACK reason code in ``on_publish`` (``wait_for_publish``
  reports success for a refused publish);
- an exception inside a paho callback would kill the network thread, so every callback
  here catches and logs;
- ``connect_async`` + ``loop_start`` so a broker that is down at start-up is retried with
  backoff instead of raising;
- a broker that refuses our credentials is a configuration mistake: retrying cannot fix it,
  so the client stops and reports it (``fatal_error``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["ConnectionSettings", "Message", "MqttClient", "PublishResult", "Will"]

log = logging.getLogger(__name__)

# CONNACK reason codes that retrying cannot fix (MQTT v5 spec, 3.2.2.2).
_FATAL_CONNACK = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8C: "bad authentication method",
}


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and as whom to connect."""

    host: str
    port: int
    client_id: str
    username: str
    password: str
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    max_queued: int = 1000  # QoS>0 messages paho keeps while disconnected; bounds memory


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


@dataclass(frozen=True)
class Message:
    """One received message, detached from paho."""

    topic: str
    payload: bytes
    retain: bool


class PublishResult:
    """The fate of one publish: resolved when the PUBACK (QoS 1) arrives or the write is done."""

    def __init__(self, topic: str, size: int) -> None:
        self.topic = topic
        self.size = size
        self._done = threading.Event()
        self.reason: str | None = None
        self.ok = False

    def _resolve(self, ok: bool, reason: str) -> None:
        self.ok = ok
        self.reason = reason
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until acknowledged; True only if the broker accepted the message."""
        self._done.wait(timeout)
        return self.ok


class MqttClient:
    """A durable MQTT v5 session with automatic reconnect.

    ``on_message`` runs on the network thread: keep it quick (put the message on a queue).
    ``on_connect`` also runs there, after every successful (re)connect, with
    ``session_present``; subscriptions are renewed before it is called.
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        on_message: Callable[[Message], None],
        on_connect: Callable[[bool], None] | None = None,
        will: Will | None = None,
    ) -> None:
        self.settings = settings
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._lock = threading.Lock()
        self._pending: dict[int, PublishResult] = {}
        self._early: dict[int, tuple[bool, str]] = {}
        self._subscriptions: dict[str, int] = {}
        self._connected = threading.Event()
        self._stopped = False
        self.fatal_error: str | None = None
        self.last_error: str | None = None
        self.connects = 0
        self.bytes_sent = 0
        self.bytes_received = 0

        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(settings.username, settings.password)
        client.reconnect_delay_set(int(settings.reconnect_min), int(settings.reconnect_max))
        client.max_queued_messages_set(settings.max_queued)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._client = client

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; never raises because the broker is down."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, *, disconnect: bool = True) -> None:
        """Stop the network thread. ``disconnect=False`` drops the connection without a
        DISCONNECT packet, as a crash would (the broker then sends the Will)."""
        self._stopped = True
        if disconnect:
            self._client.disconnect()
        else:
            sock = self._client.socket()
            if sock is not None:
                sock.close()
        self._client.loop_stop()
        self._connected.clear()
        with self._lock:
            for result in self._pending.values():
                result._resolve(False, "client stopped")
            self._pending.clear()

    # -- subscribe / publish -------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self.connected:
            self._client.subscribe(topic_filter, qos=qos)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishResult:
        """Queue a publish. While disconnected, QoS 1 messages wait in paho's queue and are
        sent on reconnect; the result resolves when the broker acknowledges."""
        result = PublishResult(topic, len(payload))
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            result._resolve(False, mqtt.error_string(info.rc))
            return result
        self.bytes_sent += len(payload)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is not None:
                result._resolve(*early)
            else:
                self._pending[info.mid] = result
        return result

    # -- paho callbacks (network thread: never raise, never block) ------------------------

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        try:
            if reason.is_failure:
                text = _FATAL_CONNACK.get(reason.value, str(reason))
                self.last_error = f"broker refused the connection: {text}"
                if reason.value in _FATAL_CONNACK:
                    self.fatal_error = (
                        f"broker at {self.settings.host}:{self.settings.port} refused "
                        f"user {self.settings.username!r}: {text}"
                    )
                    log.error("%s; not retrying", self.fatal_error)
                    self._stopped = True
                    client.disconnect()
                else:
                    log.warning("%s; retrying", self.last_error)
                return
            self.connects += 1
            session_present = bool(getattr(flags, "session_present", False))
            with self._lock:
                subs = list(self._subscriptions.items())
            for topic_filter, qos in subs:
                client.subscribe(topic_filter, qos=qos)
            self._connected.set()
            log.info(
                "connected to %s:%d as %s (session %s)",
                self.settings.host,
                self.settings.port,
                self.settings.client_id,
                "resumed" if session_present else "new",
            )
            if self._on_connect_cb is not None:
                self._on_connect_cb(session_present)
        except Exception:
            log.exception("error in connect handler")

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            if self._stopped:
                return
            self.last_error = f"disconnected: {reason}"
            if was_connected:
                log.warning("lost connection to broker (%s); reconnecting with backoff", reason)
        except Exception:
            log.exception("error in disconnect handler")

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = bytes(msg.payload)
            self.bytes_received += len(payload)
            self._on_message_cb(Message(msg.topic, payload, bool(msg.retain)))
        except Exception:
            log.exception("error handling message on %s", getattr(msg, "topic", "?"))

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        try:
            ok = not reason.is_failure
            text = str(reason)
            with self._lock:
                result = self._pending.pop(mid, None)
                if result is None:
                    self._early[mid] = (ok, text)
                    return
            if not ok:
                log.warning("broker refused publish to %s: %s", result.topic, text)
            result._resolve(ok, text)
        except Exception:
            log.exception("error in publish handler")
