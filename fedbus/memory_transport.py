"""An in-memory MQTT v5 broker and a :class:`~fedbus.transport.Transport` bound to it.

Tests hand ``MemoryBroker.factory`` to the coordinator service or the agent wherever they
would take ``MqttClient``, then drive the failure paths a real broker makes hard to reach
on purpose: a refused CONNACK, a lost PUBACK, a dropped connection and the reconnect after
it, a refused publish, an oversize message::

    broker = MemoryBroker()
    service = CoordinatorService(config, password="", transport_factory=broker.factory)
    broker.lose_pubacks("dev-a", 1)     # dev-a's next update arrives, but is never acked
    broker.drop("dev-a")                # its Will goes out; dev-a reconnects and re-sends

What the broker does, as Mosquitto 2.0 does it with fedbus's policy (``broker_config/``):

- topic filters with ``+`` and ``#`` (a filter starting with a wildcard does not match a
  ``$`` topic); a message matching several subscriptions of one client is delivered once
  per subscription;
- retained messages, sent again on every SUBSCRIBE (retain handling 0) with the retain
  flag set; an empty retained payload clears the topic's retained message and is still
  delivered to current subscribers;
- durable sessions keyed by client id (``clean_start`` is always False in fedbus; a
  ``session_expiry`` of 0 ends the session at disconnect): a session keeps its
  subscriptions and queues QoS 1 messages while its client is offline, not QoS 0 ones;
- subscription options: delivery QoS = min(publish QoS, subscription QoS); ``no_local``
  (a client is not sent its own messages, its Will included); ``retain_as_published``
  (otherwise a live message arrives with retain False);
- a message counts as acknowledged when the receiving ``on_message`` returns: a QoS 1
  message whose connection ends before that stays in the session and is delivered again on
  the next connect of the client id (paho sends the PUBACK after ``on_message``);
- PUBACK 0x10 (no matching subscribers, a success) for a QoS 1 message no session
  subscribes to; a second connection with the same client id takes the session over and
  drops the first without its Will (which then reconnects, as paho does, and takes it back);
- the Last Will goes out when a connection ends without a DISCONNECT (``stop(disconnect=
  False)``, ``abort()``, :meth:`MemoryBroker.drop`, :meth:`MemoryBroker.set_down`), not on
  ``stop()``;
- a message whose PUBLISH packet is larger than the Maximum Packet Size a client announced
  (``ConnectionSettings.receive_max_packet_size``) is dropped for that client, as Mosquitto
  does (the publisher's PUBACK is not affected);
- a packet larger than the broker's ``max_packet_size`` (only possible for a message queued
  before the first CONNACK announced the limit) makes it drop the connection, and paho
  re-sends the message after every reconnect: the fake keeps this trap.

:class:`MemoryTransport` behaves like ``MqttClient`` (see :class:`MemoryTransport`). The
knowing differences from Mosquitto and paho:

- the PUBACK is synchronous: ``publish`` while connected returns a result that is already
  resolved (unless the PUBACK is lost on purpose); paho resolves it later, on its thread;
- one message in flight per client: the next message is handed over when ``on_message``
  returned (Mosquitto sends up to 20; paho's single thread runs them one by one anyway);
- QoS 1 messages published while disconnected are re-sent in order before ``on_connect``
  runs; paho sends what ``on_connect`` publishes ahead of them;
- a wildcard SUBSCRIBE gets the matching retained messages in the order their topics were
  first retained; Mosquitto walks its topic tree depth first;
- a publish after ``stop()`` resolves at once as failed (``"client stopped"``); paho
  leaves it pending;
- no network, authentication or ACL (``refuse_connects`` and ``refuse_publishes`` stand in
  for them), no keepalive, no message expiry or other properties, no QoS 2 and no shared
  subscriptions (both ``ValueError``), no limit on an offline session's queue, sessions
  never expire, nothing is ever lost by ``set_down`` (a broker with perfect persistence);
- an invalid topic filter raises ``ValueError`` (Mosquitto refuses it in the SUBACK);
  the reasons in ``last_error`` are worded by the fake (paho mostly says "Unspecified
  error").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from fedbus.errors import BrokerUnreachable, ConnectRefused, MessageTooLarge, TransportError
from fedbus.transport import (
    _FATAL_CONNACK,
    ConnectionSettings,
    Message,
    PublishResult,
    Will,
    publish_packet_size,
)

__all__ = ["MemoryBroker", "MemoryTransport", "Published", "topic_matches"]

log = logging.getLogger(__name__)

_DEFAULT_RECONNECT_DELAY = 0.05
_NOBODY = 0x10  # PUBACK "No matching subscribers": a success code

# Names as paho prints them (str(ReasonCode)); fedbus.transport has the fatal ones.
_CONNACK_NAMES = {
    0x80: "Unspecified error", 0x81: "Malformed packet", 0x82: "Protocol error",
    0x83: "Implementation specific error", 0x88: "Server unavailable", 0x89: "Server busy",
    0x8A: "Banned", 0x90: "Topic name invalid", 0x95: "Packet too large",
    0x97: "Quota exceeded", 0x9F: "Connection rate exceeded",
}
_PUBACK_NAMES = {
    0x00: "Success", 0x10: "No matching subscribers", 0x80: "Unspecified error",
    0x83: "Implementation specific error", 0x87: "Not authorized", 0x90: "Topic name invalid",
    0x91: "Packet identifier in use", 0x97: "Quota exceeded", 0x99: "Payload format invalid",
}


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` under the MQTT rules: ``+`` is exactly one
    level, ``#`` the parent level and everything below it, and a filter that starts with a
    wildcard does not match a topic that starts with ``$``."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    want = topic_filter.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def _check_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise ValueError("empty topic filter")
    if topic_filter.startswith("$share/"):
        raise ValueError(f"{topic_filter}: MemoryBroker has no shared subscriptions")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{topic_filter}: '#' must be a whole level, the last one")
        if "+" in level and level != "+":
            raise ValueError(f"{topic_filter}: '+' must be a whole level")


def _check_topic(topic: str, qos: int) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"invalid topic to publish to: {topic!r}")
    if qos not in (0, 1):
        raise ValueError(f"QoS {qos}: MemoryBroker supports QoS 0 and 1")


class Published(NamedTuple):
    """One message the broker accepted (a Will included), in arrival order."""

    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class _Options:
    qos: int
    no_local: bool
    retain_as_published: bool


@dataclass(frozen=True, eq=False)  # compared by identity: one object per delivery
class _Delivery:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class _Session:
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.subscriptions: dict[str, _Options] = {}
        self.queue: deque[_Delivery] = deque()  # not yet acknowledged, in order
        self.connection: _Connection | None = None


class _Connection:
    def __init__(self, transport: MemoryTransport, session: _Session) -> None:
        self.transport = transport
        self.session = session
        self.alive = True


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    result: PublishResult


class MemoryBroker:
    """An MQTT v5 broker in this process, with fault injection; see the module docstring.

    ``max_packet_size`` is announced to every client in its CONNACK. ``reconnect_delay`` is
    how long a transport waits after a lost connection or a failed attempt before it tries
    again (fixed, not growing: tests stay fast and predictable).

    Every method is thread-safe. Callbacks never run while the broker's lock is held.
    """

    def __init__(
        self, max_packet_size: int = 8 * 1024 * 1024, *,
        reconnect_delay: float = _DEFAULT_RECONNECT_DELAY,
    ) -> None:
        if max_packet_size <= 0:
            raise ValueError(f"max_packet_size must be positive, got {max_packet_size}")
        self.max_packet_size = max_packet_size
        self.reconnect_delay = reconnect_delay
        self._cond = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, tuple[bytes, int]] = {}  # topic -> (payload, qos)
        self._published: list[Published] = []
        self._transports: list[MemoryTransport] = []
        self._down = False
        self._refuse_connects: tuple[int, int | None] | None = None
        self._lose_pubacks: dict[str, int] = {}
        self._refuse_publishes: list[tuple[str, int, str | None]] = []

    def factory(
        self,
        settings: ConnectionSettings,
        *,
        on_message: Callable[[Message], None],
        on_connect: Callable[[bool], None] | None = None,
        will: Will | None = None,
    ) -> MemoryTransport:
        """A :data:`~fedbus.transport.TransportFactory`: a transport bound to this broker,
        whose session is keyed by ``settings.client_id`` (host and port only appear in
        error messages)."""
        return MemoryTransport(
            self, settings, on_message=on_message, on_connect=on_connect, will=will
        )

    # -- fault injection ----------------------------------------------------------------

    def refuse_connects(self, reason_code: int, count: int | None = None) -> None:
        """Answer the next ``count`` connection attempts (None: every one, until
        ``count=0`` or :meth:`clear_faults`) with a failing CONNACK ``reason_code``.

        The transport gives up on 0x84, 0x85, 0x86, 0x87 and 0x8C (``fatal`` becomes a
        ``ConnectRefused`` with ``fatal=True``) and retries after any other code. While the
        broker is down, attempts fail before they get this far and do not use up ``count``.
        """
        if count == 0:
            with self._cond:
                self._refuse_connects = None
            return
        if not 0x80 <= reason_code <= 0xFF:
            raise ValueError(f"CONNACK reason code 0x{reason_code:02X} is not a failure")
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0 or None, got {count}")
        with self._cond:
            self._refuse_connects = (reason_code, count)

    def set_down(self, down: bool = True) -> None:
        """Make the broker unreachable (``down=True``) or reachable again.

        Going down drops every connection without a DISCONNECT, so every Will goes out (as
        in a network partition, where the broker outlives its clients' connections) and is
        queued for the durable sessions that subscribe to it. While down, connection
        attempts fail with ``BrokerUnreachable`` and are retried every ``reconnect_delay``
        seconds. Sessions and retained messages survive.
        """
        with self._cond:
            self._down = down
            if down:
                for session in list(self._sessions.values()):
                    if session.connection is not None:
                        self._detach(session.connection, will=True,
                                     reason="the broker went down")
            self._cond.notify_all()

    def drop(self, client_id: str) -> bool:
        """Cut ``client_id``'s connection without a DISCONNECT: its Will goes out and the
        transport reconnects by itself after ``reconnect_delay``. False if not connected."""
        with self._cond:
            session = self._sessions.get(client_id)
            if session is None or session.connection is None:
                return False
            self._detach(session.connection, will=True,
                         reason="the broker dropped the connection")
            return True

    def lose_pubacks(self, client_id: str, count: int = 1) -> None:
        """The next ``count`` QoS 1 publishes of ``client_id`` reach the broker and its
        subscribers, but no PUBACK comes back: their ``PublishResult`` stays unresolved, as
        when the connection dies after the broker took the message. paho re-sends an
        unacknowledged message after a reconnect, and so does the transport: subscribers
        then get it twice. QoS 0 publishes (no PUBACK) do not count."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._cond:
            self._lose_pubacks[client_id] = count

    def refuse_publishes(
        self, topic_filter: str, reason_code: int = 0x87, *, client_id: str | None = None
    ) -> None:
        """Refuse publishes to topics matching ``topic_filter`` (from ``client_id`` only, or
        from anyone), as Mosquitto's ACL does: nothing is delivered or retained, and a QoS 1
        publish's result has ``ok`` False and this ``reason_code`` (0x87: not authorized).
        A refused QoS 0 publish is dropped silently: its result is ok, as with paho."""
        _check_filter(topic_filter)
        if not 0x80 <= reason_code <= 0xFF:
            raise ValueError(f"PUBACK reason code 0x{reason_code:02X} is not a failure")
        with self._cond:
            self._refuse_publishes.append((topic_filter, reason_code, client_id))

    def clear_faults(self) -> None:
        """Undo every fault above: up, accepting connects, PUBACKs and publishes."""
        with self._cond:
            self._down = False
            self._refuse_connects = None
            self._lose_pubacks.clear()
            self._refuse_publishes.clear()
            self._cond.notify_all()

    # -- inspection ---------------------------------------------------------------------

    def retained(self, topic: str) -> bytes | None:
        """The payload retained on ``topic``, or None."""
        with self._cond:
            entry = self._retained.get(topic)
            return None if entry is None else entry[0]

    def queued(self, client_id: str) -> int:
        """Messages waiting in ``client_id``'s session: not yet acknowledged by its
        ``on_message`` (the one being handled included); 0 without a session."""
        with self._cond:
            session = self._sessions.get(client_id)
            return 0 if session is None else len(session.queue)

    @property
    def published(self) -> list[Published]:
        """A copy of every message the broker accepted, in order: refused publishes are
        not in it, Wills and re-sent duplicates are."""
        with self._cond:
            return list(self._published)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is left to happen without an outside push: every started
        transport is stopped, has given up, or is connected with nothing left to deliver
        and no callback running. A transport that is retrying (broker down, refused) is
        not idle. False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    def close(self) -> None:
        """Stop every transport made for this broker (a clean ``stop()``)."""
        with self._cond:
            transports = list(self._transports)
        for transport in transports:
            transport.stop()

    # -- the broker's side of the protocol (called with self._cond held) ------------------

    def _idle(self) -> bool:
        for t in self._transports:
            if not t._started or t._stopped or t._aborted or t.fatal is not None:
                continue
            conn = t._conn
            if conn is None or t._in_callback or t._pending_connect is not None:
                return False
            if conn.session.queue:
                return False
        return True

    def _attach(self, transport: MemoryTransport) -> tuple[_Connection, bool]:
        s = transport.settings
        if self._down:
            raise BrokerUnreachable(
                s.host, s.port, "connection refused (nothing listens on that port)"
            )
        if self._refuse_connects is not None:
            code, left = self._refuse_connects
            if left is not None:
                self._refuse_connects = (code, left - 1) if left > 1 else None
            fatal = code in _FATAL_CONNACK
            text = _FATAL_CONNACK.get(code) or _CONNACK_NAMES.get(code, f"0x{code:02X}")
            raise ConnectRefused(s.host, s.port, s.username, code, text, fatal=fatal)
        session = self._sessions.get(s.client_id)
        present = session is not None
        if session is None:
            session = self._sessions[s.client_id] = _Session(s.client_id)
        elif session.connection is not None:  # Mosquitto sends no Will on a takeover
            self._detach(session.connection, will=False,
                         reason="session taken over by another connection with the same "
                         "client id")
            if s.client_id not in self._sessions:  # it ended there (session_expiry 0)
                session = self._sessions[s.client_id] = _Session(s.client_id)
        conn = _Connection(transport, session)
        session.connection = conn
        return conn, present

    def _detach(self, conn: _Connection, *, will: bool, reason: str | None) -> None:
        """End ``conn``; ``reason`` None: the client itself closed it (``stop``,
        ``abort``)."""
        if not conn.alive:
            return
        conn.alive = False
        session = conn.session
        client_id = session.client_id
        if session.connection is conn:
            session.connection = None
            session.queue = deque(d for d in session.queue if d.qos > 0)
            if conn.transport.settings.session_expiry == 0:
                del self._sessions[client_id]
        if reason is not None:
            conn.transport._lost(conn, reason)
        last_will = conn.transport._will
        if will and last_will is not None:
            self._accept(client_id, last_will.topic, last_will.payload, last_will.qos,
                         last_will.retain)
        self._cond.notify_all()

    def _subscribe(self, conn: _Connection, topic_filter: str, options: _Options) -> None:
        session = conn.session
        session.subscriptions[topic_filter] = options
        for topic, (payload, qos) in self._retained.items():
            if topic_matches(topic_filter, topic):
                session.queue.append(_Delivery(topic, payload, min(qos, options.qos), True))
        self._cond.notify_all()

    def _unsubscribe(self, conn: _Connection, topic_filter: str) -> None:
        conn.session.subscriptions.pop(topic_filter, None)

    def _receive(self, conn: _Connection, out: _Outgoing) -> int | None:
        """One PUBLISH from ``conn``: the PUBACK reason code, or None when no PUBACK
        comes back (lost on purpose, or the connection is gone)."""
        if not conn.alive:
            return None
        client_id = conn.session.client_id
        size = publish_packet_size(out.topic, len(out.payload), out.qos)
        if size > self.max_packet_size:
            self._detach(conn, will=True, reason=(
                f"the broker dropped the connection after a packet of {size:,} bytes "
                f"(its maximum packet size is {self.max_packet_size:,})"
            ))
            return None
        code = self._accept(client_id, out.topic, out.payload, out.qos, out.retain)
        if out.qos == 0:
            return 0
        lose = self._lose_pubacks.get(client_id, 0)
        if lose > 0:
            self._lose_pubacks[client_id] = lose - 1
            return None
        return code

    def _accept(self, client_id: str, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        """Check, record, retain and route one message; its PUBACK reason code."""
        for topic_filter, code, only in self._refuse_publishes:
            if (only is None or only == client_id) and topic_matches(topic_filter, topic):
                return code
        self._published.append(Published(client_id, topic, payload, qos, retain))
        if retain:
            if payload:
                self._retained[topic] = (payload, qos)
            else:
                self._retained.pop(topic, None)
        matched = False
        for session in self._sessions.values():
            online = session.connection is not None
            for topic_filter, options in session.subscriptions.items():
                if not topic_matches(topic_filter, topic):
                    continue
                matched = True
                if options.no_local and session.client_id == client_id:
                    continue
                delivery = _Delivery(
                    topic, payload, min(qos, options.qos),
                    retain and options.retain_as_published,
                )
                if online or delivery.qos > 0:
                    session.queue.append(delivery)
        self._cond.notify_all()
        return 0 if matched or qos == 0 else _NOBODY


class MemoryTransport:
    """A :class:`~fedbus.transport.Transport` connected to a :class:`MemoryBroker`.

    The same contract as ``MqttClient``: ``start()`` connects in the background and
    reconnects after every loss (after the broker's ``reconnect_delay``); ``on_connect``
    and ``on_message`` run on this transport's own thread, never on the caller's and never
    under a lock, so a callback may publish, subscribe or stop; an exception in a callback
    is logged and the message still counts as handled. ``subscribe`` is remembered and
    renewed after every reconnect (before ``on_connect``), and the broker then sends the
    retained messages again. ``publish`` raises ``MessageTooLarge`` above the broker's
    limit (the settings' until the first connect); while disconnected a QoS 1 message
    waits (at most ``settings.max_queued`` of them, then the result fails with "Message
    queue full.") and is sent on reconnect, and a QoS 0 message is dropped with its result
    left pending, as paho does. ``stop()`` fails every pending result (``"client
    stopped"``).
    """

    def __init__(
        self,
        broker: MemoryBroker,
        settings: ConnectionSettings,
        *,
        on_message: Callable[[Message], None],
        on_connect: Callable[[bool], None] | None = None,
        will: Will | None = None,
    ) -> None:
        self.settings = settings
        self.fatal: TransportError | None = None
        self.last_error: TransportError | None = None
        self.connects = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._broker = broker
        self._on_message = on_message
        self._on_connect = on_connect
        self._will = will
        self._max_packet = settings.max_packet_size
        self._subscriptions: dict[str, _Options] = {}
        self._outbox: list[_Outgoing] = []  # QoS 1 sent without a PUBACK yet, in order
        self._unsent: list[PublishResult] = []  # QoS 0 dropped while disconnected
        self._connected = threading.Event()
        self._disconnected_since: float | None = time.monotonic()
        self._conn: _Connection | None = None
        self._retry_at = 0.0
        self._pending_connect: bool | None = None  # session_present for on_connect
        self._in_callback = False
        self._started = False
        self._stopped = False
        self._aborted = False
        self._thread: threading.Thread | None = None
        with broker._cond:
            broker._transports.append(self)

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    # -- the Transport protocol -----------------------------------------------------------

    def start(self) -> None:
        """Begin connecting on this transport's thread; never raises because the broker
        is down or refuses (see ``last_error`` and ``fatal``)."""
        with self._broker._cond:
            if self._started:
                raise RuntimeError("MemoryTransport.start() called twice")
            self._started = True
            self._disconnected_since = time.monotonic()
            self._retry_at = 0.0
            self._thread = threading.Thread(
                target=self._run, name=f"memory-transport-{self.settings.client_id}",
                daemon=True,
            )
        self._thread.start()

    def stop(self, *, disconnect: bool = True) -> None:
        """Stop the thread. ``disconnect=False`` ends the connection as a crash would: the
        broker sends the Will. Messages not yet acknowledged stay in the session."""
        cond = self._broker._cond
        with cond:
            if not self._stopped:
                self._stopped = True
                conn = self._conn
                if conn is not None:
                    self._conn = None
                    self._connected.clear()
                    self._disconnected_since = time.monotonic()
                    self._broker._detach(conn, will=not disconnect, reason=None)
                pending = [out.result for out in self._outbox] + self._unsent
                self._outbox, self._unsent = [], []
                for result in pending:
                    result._resolve(False, "client stopped")
                cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
            if thread.is_alive():
                log.warning("%s: a callback is still running after stop()", thread.name)

    def abort(self) -> None:
        """Drop the connection at once, without a DISCONNECT (the Will goes out), from any
        thread, this transport's callbacks included: the message being handled is not
        acknowledged, so the broker delivers it again to the next session of the client id.
        Nothing is retried afterwards; ``stop()`` still ends the thread and fails the
        pending results."""
        with self._broker._cond:
            if self._stopped or self._aborted:
                return
            self._aborted = True
            conn = self._conn
            if conn is not None:
                self._conn = None
                self._connected.clear()
                self._disconnected_since = time.monotonic()
                self._broker._detach(conn, will=True, reason=None)
            self._broker._cond.notify_all()

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
        """The broker's maximum packet size once connected, else the settings'."""
        return self._max_packet

    def subscribe(
        self, topic_filter: str, qos: int = 1, *, no_local: bool = False,
        retain_as_published: bool = False,
    ) -> None:
        """Subscribe now if connected (the matching retained messages follow), and again
        after every reconnect. Raises ``ValueError`` for an invalid filter or QoS."""
        _check_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError(f"QoS {qos}: MemoryBroker supports QoS 0 and 1")
        options = _Options(qos, no_local, retain_as_published)
        with self._broker._cond:
            self._subscriptions[topic_filter] = options
            if self._conn is not None:
                self._broker._subscribe(self._conn, topic_filter, options)

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe now if connected (what is already queued for the session may still
        arrive, as from a real broker), and no longer subscribe after a reconnect."""
        with self._broker._cond:
            self._subscriptions.pop(topic_filter, None)
            if self._conn is not None:
                self._broker._unsubscribe(self._conn, topic_filter)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishResult:
        """Send now if connected (the result is then already resolved, unless the broker
        loses the PUBACK), else queue a QoS 1 message for the next connect."""
        _check_topic(topic, qos)
        size = publish_packet_size(topic, len(payload), qos)
        if size > self._max_packet:
            s = self.settings
            raise MessageTooLarge(s.host, s.port, topic, size, self._max_packet)
        payload = bytes(payload)
        result = PublishResult(topic, len(payload))
        out = _Outgoing(topic, payload, qos, retain, result)
        with self._broker._cond:
            if self._stopped:
                result._resolve(False, "client stopped")
                return result
            if qos > 0 and 0 < self.settings.max_queued <= len(self._outbox):
                result._resolve(False, "Message queue full.")
                return result
            self.bytes_sent += len(payload)
            if self._conn is not None:
                self._send(out)
            elif qos > 0:
                self._outbox.append(out)
            else:  # paho: never written, so never resolved (until stop)
                self._unsent.append(result)
        return result

    # -- internals (with the broker's lock held unless said otherwise) ---------------------

    def _send(self, out: _Outgoing) -> None:
        conn = self._conn
        code = None if conn is None else self._broker._receive(conn, out)
        if code is None:
            if out.qos > 0:  # no PUBACK: re-sent after the next connect, as paho does
                self._outbox.append(out)
            return
        ok = code < 0x80
        reason = _PUBACK_NAMES.get(code, f"0x{code:02X}")
        if not ok:
            log.warning("broker refused publish to %s: %s (0x%02X)", out.topic, reason, code)
        out.result._resolve(ok, reason, code)

    def _lost(self, conn: _Connection, reason: str) -> None:
        """Called by the broker when it ends ``conn`` (not on our ``stop`` or ``abort``)."""
        if self._conn is not conn:
            return
        self._conn = None
        self._connected.clear()
        self._disconnected_since = time.monotonic()
        s = self.settings
        self.last_error = TransportError(
            s.host, s.port, f"lost the connection to {self._where}: {reason}"
        )
        log.warning("%s; reconnecting with backoff", self.last_error)
        self._retry_at = time.monotonic() + self._broker.reconnect_delay

    def _try_connect(self) -> None:
        broker = self._broker
        try:
            conn, present = broker._attach(self)
        except TransportError as error:
            self.last_error = error
            if error.fatal:
                self.fatal = error
                log.error("%s; not retrying", error)
            else:
                log.warning("%s; retrying in %g s", error, broker.reconnect_delay)
                self._retry_at = time.monotonic() + broker.reconnect_delay
            broker._cond.notify_all()
            return
        self._conn = conn
        self.connects += 1
        self._max_packet = broker.max_packet_size
        self._disconnected_since = None
        self._connected.set()
        self._pending_connect = present
        log.info("connected to memory broker as %s (session %s)", self.settings.client_id,
                 "resumed" if present else "new")
        for topic_filter, options in self._subscriptions.items():
            broker._subscribe(conn, topic_filter, options)
        waiting, self._outbox = self._outbox, []
        for out in waiting:
            self._send(out)

    def _run(self) -> None:
        """The transport's thread: connect, then hand over messages one at a time."""
        cond = self._broker._cond
        while True:
            with cond:
                delivery: _Delivery | None = None
                present: bool | None = None
                conn: _Connection | None = None
                while True:
                    if self._stopped or self._aborted or self.fatal is not None:
                        return
                    if self._pending_connect is not None:
                        present, self._pending_connect = self._pending_connect, None
                        break
                    conn = self._conn
                    if conn is None:
                        delay = self._retry_at - time.monotonic()
                        if delay <= 0:
                            self._try_connect()
                        else:
                            cond.wait(delay)
                        continue
                    if conn.session.queue:
                        delivery = conn.session.queue[0]
                        if self._too_large_for_us(delivery):
                            conn.session.queue.popleft()  # dropped for this client only
                            delivery = None
                            continue
                        if delivery.qos == 0:  # at most once: gone whatever happens next
                            conn.session.queue.popleft()
                        break
                    cond.wait()
                self._in_callback = True
            try:
                if delivery is None:
                    self._call_on_connect(bool(present))
                else:
                    self._call_on_message(delivery)
            finally:
                with cond:
                    self._in_callback = False
                    if conn is not None and delivery is not None and delivery.qos > 0:
                        self._acknowledge(conn, delivery)
                    cond.notify_all()

    def _too_large_for_us(self, delivery: _Delivery) -> bool:
        """The broker must not send a packet above our CONNECT's Maximum Packet Size: it
        drops the message for this client (Mosquitto logs "Dropping too large outgoing
        PUBLISH"), whose session never sees it."""
        limit = self.settings.receive_max_packet_size
        if limit is None:
            return False
        size = publish_packet_size(delivery.topic, len(delivery.payload), delivery.qos)
        if size <= limit:
            return False
        log.info("memory broker: dropping a PUBLISH of %d bytes on %s for %s (over its "
                 "maximum packet size of %d)", size, delivery.topic, self.settings.client_id,
                 limit)
        return True

    def _acknowledge(self, conn: _Connection, delivery: _Delivery) -> None:
        """The PUBACK for ``delivery``: only if its connection is still up."""
        queue = conn.session.queue
        if conn.alive and queue and queue[0] is delivery:
            queue.popleft()

    def _call_on_connect(self, session_present: bool) -> None:  # no lock held
        if self._on_connect is None:
            return
        try:
            self._on_connect(session_present)
        except Exception:
            log.exception("error in connect handler")

    def _call_on_message(self, delivery: _Delivery) -> None:  # no lock held
        try:
            self.bytes_received += len(delivery.payload)
            self._on_message(Message(delivery.topic, delivery.payload, delivery.retain))
        except Exception:
            log.exception("error handling message on %s", delivery.topic)
