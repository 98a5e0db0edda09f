"""The one module that talks MQTT (paho-mqtt 2.x, MQTT v5 only).

The coordinator service and the agent do not build a client: they are given a
:data:`TransportFactory` (``MqttClient`` by default; tests pass
``fedbus.memory_transport.MemoryBroker.factory`` to exercise failure paths without a
broker). What they see is the :class:`Transport` protocol: ``start()``, ``subscribe()``,
``publish()`` returning a :class:`PublishResult`, an ``on_message`` callback receiving plain
:class:`Message` values, and failures as typed exceptions from ``fedbus.errors`` that carry
the broker address, reason code or sizes (``fatal``, ``last_error``).

The paho traps this module takes care of:

- durable sessions: a stable client id, ``clean_start=False`` passed explicitly on every
  connect and a non-zero session expiry (paho's default wipes the session on restart);
- a publish's fate is read from the PUBACK reason code in ``on_publish`` (``wait_for_publish``
  reports success for a refused publish);
- an exception inside a paho callback would kill the network thread, so every callback
  here catches and logs;
- ``connect_async`` + ``loop_start`` so a broker that is down at start-up is retried with
  backoff instead of raising; every failed attempt is logged with its cause (refused, no
  route, unknown host, a port that does not speak MQTT, no CONNACK in time), not just
  retried in silence;
- paho never checks an outgoing packet against the broker's maximum packet size, and
  Mosquitto answers an oversize packet by dropping the connection (paho then reports only
  "Unspecified error" and reconnects forever): ``publish`` refuses such a message with
  ``MessageTooLarge`` instead, using the limit the broker announced in its CONNACK;
- a broker that refuses our credentials is a configuration mistake: retrying cannot fix it,
  so the client stops and reports it (``fatal``);
- TLS (``ConnectionSettings.tls``): the context from ``fedbus.tls.client_context`` verifies
  the broker; a failed handshake surfaces inside paho as a bare ``OSError`` (or, with TLS
  1.3, as a connection closed after the handshake when the broker refuses our client
  certificate), so the socket class of the context records what happened and the failure
  becomes a ``TlsError`` naming its cause; certificate problems are ``fatal``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedbus.errors import (
    BrokerUnreachable,
    ConnectRefused,
    ConnectTimeout,
    MessageTooLarge,
    NotMqtt,
    TlsError,
    TransportError,
)
from fedbus.tls import TlsSettings, client_context, describe_failure

__all__ = [
    "ConnectionSettings",
    "Message",
    "MqttClient",
    "PublishGroup",
    "PublishResult",
    "Transport",
    "TransportFactory",
    "Will",
    "connect_timeout_error",
    "publish_packet_size",
]

log = logging.getLogger(__name__)

# CONNACK reason codes that retrying cannot fix (MQTT v5 spec, 3.2.2.2).
_FATAL_CONNACK = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    # Mosquitto 2.0.11 answers 0x87 to every failed login: a wrong password, an unknown
    # user and an anonymous client alike.
    0x87: "not authorized (Mosquitto 2.0 says this for any failed login: check the "
    "username and password)",
    0x8C: "bad authentication method",
}
_SUPERVISE_INTERVAL = 0.25


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and as whom to connect, and how patiently."""

    host: str
    port: int
    client_id: str
    username: str
    password: str
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: float = 1.0
    reconnect_max: float = 30.0
    max_queued: int = 1000  # QoS>0 messages paho keeps while disconnected; bounds memory
    # TCP is up but no CONNACK after this many seconds: not an MQTT broker (or a stuck one);
    # the attempt is abandoned and retried
    connack_timeout: float = 10.0
    # assumed until the broker's CONNACK announces its own (the shipped broker: 8 MiB)
    max_packet_size: int = 8 * 1024 * 1024
    # the Maximum Packet Size of our CONNECT: the broker must not send us a larger packet
    # (MQTT v5 3.1.2.25; Mosquitto drops such a message for this client only and logs it).
    # None: no limit announced (the broker's own applies)
    receive_max_packet_size: int | None = None
    # None: plain MQTT. With a client certificate the password may be empty (the broker
    # takes the certificate's common name as the username).
    tls: TlsSettings | None = None
    # True: a received QoS 1 message is acknowledged (PUBACK) only when its ``Message.ack``
    # is called, from any thread, not when ``on_message`` returns; the caller must call it
    # for every message, in the order they arrived (MQTT v5 4.6)
    manual_ack: bool = False
    # the Receive Maximum of our CONNECT: the broker sends at most this many QoS 1 messages
    # we have not acknowledged yet (MQTT v5 3.1.2.11; None: the protocol's 65,535)
    receive_maximum: int | None = None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


@dataclass(frozen=True)
class Message:
    """One received message, detached from paho. ``ack``: with
    ``ConnectionSettings.manual_ack``, sends this message's PUBACK (None: nothing to send,
    the transport acknowledged it when ``on_message`` returned, or it was QoS 0). An ack
    after the connection it came on was lost sends nothing: the broker delivers the message
    again on the next connection."""

    topic: str
    payload: bytes
    retain: bool
    ack: Callable[[], None] | None = field(default=None, compare=False, repr=False)


class PublishResult:
    """The fate of one publish: resolved when the PUBACK (QoS 1) arrives or the write is done."""

    def __init__(self, topic: str, size: int) -> None:
        self.topic = topic
        self.size = size
        self._done = threading.Event()
        self.reason: str | None = None
        self.reason_code: int | None = None
        self.ok = False

    def _resolve(self, ok: bool, reason: str, code: int | None = None) -> None:
        self.ok = ok
        self.reason = reason
        self.reason_code = code
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until acknowledged; True only if the broker accepted the message."""
        self._done.wait(timeout)
        return self.ok


class PublishGroup:
    """The fate of several publishes taken as one (the chunks of a message, protocol
    revision 2.6): done when every one is, ok only if every one was accepted; ``reason``
    and ``reason_code`` are those of the first that failed."""

    def __init__(self, topic: str, results: list[PublishResult]) -> None:
        self.topic = topic
        self.results = results
        self.size = sum(r.size for r in results)

    @property
    def done(self) -> bool:
        return all(r.done for r in self.results)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def _first_failure(self) -> PublishResult | None:
        return next((r for r in self.results if r.done and not r.ok), None)

    @property
    def reason(self) -> str | None:
        failed = self._first_failure()
        return failed.reason if failed is not None else (
            self.results[-1].reason if self.done else None)

    @property
    def reason_code(self) -> int | None:
        failed = self._first_failure()
        return failed.reason_code if failed is not None else (
            self.results[-1].reason_code if self.done else None)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every publish is acknowledged; True only if all were accepted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result.wait(left)
        return self.ok


class Transport(Protocol):
    """What the coordinator service and the agent need of an MQTT connection.

    ``on_message`` and ``on_connect`` run on the transport's own thread: keep them quick.
    ``on_connect(session_present)`` runs after every successful (re)connect, once the
    subscriptions are renewed.
    """

    settings: ConnectionSettings
    fatal: TransportError | None  # set when the transport gave up: retrying cannot help
    last_error: TransportError | None  # the most recent failure, fatal or not
    connects: int
    bytes_sent: int
    bytes_received: int

    def start(self) -> None: ...
    def stop(self, *, disconnect: bool = True) -> None: ...
    def abort(self) -> None:
        """Drop the connection at once, from any thread (the transport's own callbacks
        included), so that the message being handled is never acknowledged: the broker
        delivers it again to the next session. Nothing is retried afterwards."""
    def wait_connected(self, timeout: float | None = None) -> bool: ...
    @property
    def connected(self) -> bool: ...
    @property
    def disconnected_since(self) -> float | None:
        """``time.monotonic()`` when the connection was last lost (or the transport
        started), None while connected."""
    @property
    def max_packet_size(self) -> int: ...
    def subscribe(
        self, topic_filter: str, qos: int = 1, *, no_local: bool = False,
        retain_as_published: bool = False,
    ) -> None: ...
    def unsubscribe(self, topic_filter: str) -> None:
        """Drop the subscription now if connected, and do not renew it after a reconnect."""
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishResult: ...


TransportFactory = Callable[..., Transport]
"""``factory(settings, *, on_message, on_connect=None, will=None) -> Transport``."""


def publish_packet_size(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes of an MQTT v5 PUBLISH packet without properties: what the broker compares
    with its maximum packet size."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + 1 + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2**21 else 4
    return 1 + varint + remaining


def connect_timeout_error(transport: Transport, timeout: float) -> ConnectTimeout | None:
    """A ``ConnectTimeout`` if ``transport`` has been disconnected for ``timeout`` seconds
    or more (``timeout`` 0: never)."""
    since = transport.disconnected_since
    if timeout <= 0 or since is None or time.monotonic() - since < timeout:
        return None
    s = transport.settings
    return ConnectTimeout(s.host, s.port, timeout, transport.last_error)


def _os_cause(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[0].lower() + text[1:] if text else type(exc).__name__


def _shutdown(sock: object) -> None:
    """Shut a socket down from any thread (its reader wakes up and sees the end)."""
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _observed_socket_class(owner: MqttClient) -> type[ssl.SSLSocket]:
    """An ``SSLSocket`` class that tells ``owner`` how far the handshake got and which
    error ended it; paho turns both into a bare ``OSError`` or a lost connection."""

    class ObservedSSLSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            owner._tls_started = True
            try:
                super().do_handshake(block)
            except OSError as exc:
                owner._tls_error = exc
                raise
            owner._tls_done = True

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            try:
                return super().recv(buflen, flags)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except OSError as exc:
                if owner._tls_error is None:
                    owner._tls_error = exc
                raise

    return ObservedSSLSocket


def _no_delay(sock: Any) -> None:
    """Send small packets at once (TCP_NODELAY), as the shipped broker does
    (``set_tcp_nodelay true``). paho leaves Nagle's algorithm on, which holds a small
    write (a PUBACK, a receipt, an update of a few KB) until the peer acknowledges the
    previous one, and Linux delays acknowledgements by up to 40 ms."""
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # not TCP (a Unix socket)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Paho(mqtt.Client):
    """paho's client, telling its owner why a connection attempt failed (paho's own
    ``on_connect_fail`` callback is given no cause)."""

    def __init__(self, owner: MqttClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._owner._attempt_started()
        try:
            rc = super().reconnect()
        except OSError as exc:
            self._owner._attempt_failed(exc)
            raise
        self._owner._tcp_connected()
        _no_delay(self.socket())
        return rc

    def _packet_handle(self) -> mqtt.MQTTErrorCode:
        """Handle one received packet, then send at once what handling it queued (the
        answers our ``on_message`` published, paho's PUBACK of the message).

        paho's network thread otherwise reads up to as many packets as it has messages
        in flight before it writes anything, so a receipt waited behind the reading and
        judging of whatever else had arrived: under one device's flood, another device's
        receipt queued behind the flood (bench/flood.py). The write happens here on the
        network thread, between packets, outside every paho callback."""
        rc = super()._packet_handle()
        if rc == mqtt.MQTT_ERR_SUCCESS and self.want_write():
            self.loop_write()
        return rc


class MqttClient:
    """A durable MQTT v5 session with automatic reconnect: the real :class:`Transport`."""

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
        self._early: dict[int, tuple[bool, str, int]] = {}
        self._subscriptions: dict[str, SubscribeOptions] = {}
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self.fatal: TransportError | None = None
        self.last_error: TransportError | None = None
        self.connects = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._max_packet = settings.max_packet_size
        self._disconnected_since: float | None = time.monotonic()
        self._attempts = 0  # failed attempts since the last successful connect
        self._tcp_up_at: float | None = None  # TCP connected, CONNACK not yet received
        self._supervisor: threading.Thread | None = None
        # the connection a manually acknowledged message came on (counted in on_connect)
        self._generation = 0

        client = _Paho(
            self,
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=settings.manual_ack,
        )
        client.username_pw_set(settings.username, settings.password or None)
        # TLS progress of the current connection attempt (see _observed_socket_class)
        self._tls_started = False
        self._tls_done = False
        self._tls_error: OSError | None = None
        if settings.tls is not None:
            context = client_context(settings.tls)
            context.sslsocket_class = _observed_socket_class(self)
            client.tls_set_context(context)
        client.reconnect_delay_set(
            max(1, int(settings.reconnect_min)), max(1, int(settings.reconnect_max))
        )
        client.max_queued_messages_set(settings.max_queued)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._client = client

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; never raises because the broker is down."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry
        if self.settings.receive_max_packet_size is not None:
            props.MaximumPacketSize = self.settings.receive_max_packet_size
        if self.settings.receive_maximum is not None:
            props.ReceiveMaximum = self.settings.receive_maximum
        self._disconnected_since = time.monotonic()
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        self._supervisor = threading.Thread(
            target=self._supervise, name="mqtt-supervisor", daemon=True
        )
        self._supervisor.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def disconnected_since(self) -> float | None:
        return None if self._connected.is_set() else self._disconnected_since

    @property
    def max_packet_size(self) -> int:
        """The broker's maximum packet size: from its last CONNACK, else the settings'."""
        return self._max_packet

    def stop(self, *, disconnect: bool = True) -> None:
        """Stop the network thread. ``disconnect=False`` drops the connection without a
        DISCONNECT packet, as a crash would (the broker then sends the Will)."""
        self._stopped.set()
        if disconnect:
            self._client.disconnect()
        else:
            sock = self._client.socket()
            if sock is not None:
                sock.close()
        # paho 2.2's loop_stop can race with its own thread clearing _thread
        with contextlib.suppress(AttributeError):
            self._client.loop_stop()
        self._connected.clear()
        if self._supervisor is not None:
            self._supervisor.join(timeout=2 * _SUPERVISE_INTERVAL + 1)
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for result in pending:
            result._resolve(False, "client stopped")

    def abort(self) -> None:
        self._stopped.set()
        self._client.reconnect_delay_set(3600, 3600)  # no reconnect before stop() joins
        _shutdown(self._client.socket())
        self._connected.clear()

    # -- subscribe / publish -------------------------------------------------------------

    def subscribe(
        self, topic_filter: str, qos: int = 1, *, no_local: bool = False,
        retain_as_published: bool = False,
    ) -> None:
        """Subscribe now if connected, and again after every reconnect. ``no_local``: not
        sent our own messages; ``retain_as_published``: the retain flag as the publisher set
        it (MQTT v5 subscription options)."""
        options = SubscribeOptions(
            qos=qos, noLocal=no_local, retainAsPublished=retain_as_published
        )
        with self._lock:
            self._subscriptions[topic_filter] = options
        if self.connected:
            self._client.subscribe(topic_filter, options=options)

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe now if connected, and no longer subscribe after a reconnect."""
        with self._lock:
            known = self._subscriptions.pop(topic_filter, None) is not None
        if known and self.connected:
            self._client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishResult:
        """Queue a publish. While disconnected, QoS 1 messages wait in paho's queue and are
        sent on reconnect; the result resolves when the broker acknowledges.

        Raises ``MessageTooLarge`` (nothing is sent) when the packet would exceed the
        broker's maximum packet size.
        """
        size = publish_packet_size(topic, len(payload), qos)
        if size > self._max_packet:
            raise MessageTooLarge(
                self.settings.host, self.settings.port, topic, size, self._max_packet
            )
        result = PublishResult(topic, len(payload))
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            result._resolve(False, mqtt.error_string(info.rc))
            return result
        self.bytes_sent += len(payload)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = result
        if early is not None:
            result._resolve(*early)
        return result

    # -- failures ------------------------------------------------------------------------

    def _failed(self, error: TransportError) -> None:
        """Record and log one failed attempt (one line each, with the attempt count)."""
        self.last_error = error
        if error.fatal:
            self.fatal = error
            log.error("%s; not retrying", error)
            self._stopped.set()
            self._client.disconnect()
            return
        self._attempts += 1
        since = self._disconnected_since or time.monotonic()
        log.warning(
            "%s; attempt %d, disconnected for %.0f s, retrying with backoff (up to %g s)",
            error, self._attempts, time.monotonic() - since, self.settings.reconnect_max,
        )

    def _attempt_started(self) -> None:
        self._tcp_up_at = None
        self._tls_started = self._tls_done = False
        self._tls_error = None

    def _attempt_failed(self, exc: OSError) -> None:
        try:
            s = self.settings
            if self._tls_started:
                self._failed(self._tls_failure(exc))
            else:
                self._failed(BrokerUnreachable(s.host, s.port, _os_cause(exc)))
        except Exception:
            log.exception("error recording a failed connection attempt")

    def _tls_failure(self, exc: BaseException) -> TlsError:
        s = self.settings
        failure = describe_failure(
            exc, handshake_done=self._tls_done,
            client_certificate=s.tls is not None and s.tls.client_certificate,
        )
        return TlsError(s.host, s.port, failure.reason, failure.detail, fatal=failure.fatal)

    def _tcp_connected(self) -> None:
        self._tcp_up_at = time.monotonic()

    def _supervise(self) -> None:
        """Abandon an attempt whose TCP connection is up but gets no CONNACK (a port that
        is not MQTT, or a stuck broker): paho alone would wait a whole keepalive."""
        while not self._stopped.wait(_SUPERVISE_INTERVAL):
            up = self._tcp_up_at
            if up is None or self._connected.is_set():
                continue
            waited = time.monotonic() - up
            if waited < self.settings.connack_timeout:
                continue
            self._tcp_up_at = None
            s = self.settings
            self._failed(NotMqtt(
                s.host, s.port,
                f"the TCP connection is up but no CONNACK came within {waited:.0f} s (not an "
                "MQTT broker, or the broker or the link is not answering)",
            ))
            _shutdown(self._client.socket())  # wakes paho's thread: the connection is lost

    # -- paho callbacks (network thread: never raise, never block) ------------------------

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        try:
            self._tcp_up_at = None
            s = self.settings
            if reason.is_failure:
                text = _FATAL_CONNACK.get(reason.value, str(reason))
                self._failed(ConnectRefused(
                    s.host, s.port, s.username, reason.value, text,
                    fatal=reason.value in _FATAL_CONNACK,
                ))
                return
            self.connects += 1
            self._generation += 1
            self._attempts = 0
            limit = getattr(props, "MaximumPacketSize", None)
            if isinstance(limit, int) and limit > 0:
                self._max_packet = limit
            session_present = bool(getattr(flags, "session_present", False))
            with self._lock:
                subs = list(self._subscriptions.items())
            for topic_filter, options in subs:
                client.subscribe(topic_filter, options=options)
            self._connected.set()
            self._disconnected_since = None
            sock = client.socket()
            over = sock.version() if isinstance(sock, ssl.SSLSocket) else None
            log.info(
                "connected to %s as %s (session %s, %s)",
                self._where, s.client_id, "resumed" if session_present else "new",
                f"{over}, broker verified" if over else "plain MQTT",
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
            if was_connected:
                self._disconnected_since = time.monotonic()
            if self._stopped.is_set():
                return
            s = self.settings
            if self._tcp_up_at is not None and self._tls_done:
                # TLS is up but the broker hung up before its CONNACK: with TLS 1.3, this is
                # how a refused client certificate shows
                self._tcp_up_at = None
                self._failed(self._tls_failure(self._tls_error or ConnectionResetError()))
                return
            if self._tcp_up_at is not None:  # the connection ended before any CONNACK
                self._tcp_up_at = None
                self._failed(NotMqtt(
                    s.host, s.port, f"the connection closed before a CONNACK ({reason}): not an "
                    "MQTT v5 broker, a TLS-only port, or a broker refusing us"
                ))
                return
            if was_connected:
                self.last_error = TransportError(
                    s.host, s.port, f"lost the connection to {self._where}: {reason}"
                )
                log.warning("%s; reconnecting with backoff", self.last_error)
        except Exception:
            log.exception("error in disconnect handler")

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = bytes(msg.payload)
            self.bytes_received += len(payload)
            ack = None
            if self.settings.manual_ack and msg.qos > 0:
                ack = self._acknowledger(msg.mid, msg.qos, self._generation)
            self._on_message_cb(Message(msg.topic, payload, bool(msg.retain), ack))
        except Exception:
            log.exception("error handling message on %s", getattr(msg, "topic", "?"))

    def _acknowledger(self, mid: int, qos: int, generation: int) -> Callable[[], None]:
        """The PUBACK of one message, sent only on the connection it came on: after a
        reconnect the broker sends the message again (its session holds it unacknowledged)
        and may have given its packet id to another message meanwhile."""

        def ack() -> None:
            if self._generation == generation and self._connected.is_set():
                self._client.ack(mid, qos)

        return ack

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        try:
            ok = not reason.is_failure
            text = str(reason)
            with self._lock:
                result = self._pending.pop(mid, None)
                if result is None:
                    self._early[mid] = (ok, text, reason.value)
                    return
            if not ok:
                log.warning(
                    "broker refused publish to %s: %s (0x%02X)", result.topic, text, reason.value
                )
            result._resolve(ok, text, reason.value)
        except Exception:
            log.exception("error in publish handler")
