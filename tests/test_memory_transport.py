"""The in-memory broker and transport: MQTT semantics, fault injection, and a conformance
scenario that gives the same observations on a real Mosquitto with ``MqttClient``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fedbus.broker import LocalBroker
from fedbus.errors import BrokerUnreachable, ConnectRefused, ConnectTimeout, MessageTooLarge
from fedbus.memory_transport import MemoryBroker, MemoryTransport, Published, topic_matches
from fedbus.transport import (
    ConnectionSettings,
    Message,
    MqttClient,
    Transport,
    Will,
    connect_timeout_error,
)

Seen = tuple[str, bytes, bool]  # (topic, payload, retain)


def settings(client_id: str, **overrides: Any) -> ConnectionSettings:
    return ConnectionSettings("memory", 1883, client_id, client_id, "secret", **overrides)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Recorder:
    """The callbacks of one transport: what arrived, on which thread, each connect."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages: list[Seen] = []
        self.sessions: list[bool] = []  # session_present of every on_connect
        self.threads: set[int] = set()

    def on_message(self, message: Message) -> None:
        with self._lock:
            self.threads.add(threading.get_ident())
            self.messages.append((message.topic, message.payload, message.retain))

    def on_connect(self, session_present: bool) -> None:
        with self._lock:
            self.threads.add(threading.get_ident())
            self.sessions.append(session_present)

    def take(self) -> list[Seen]:
        """What arrived since the last ``take``."""
        with self._lock:
            seen, self.messages = self.messages, []
            return seen

    def wait_count(self, n: int, timeout: float = 5.0) -> None:
        wait_for(lambda: len(self.messages) >= n, f"{n} messages (have {self.messages})",
                 timeout)


@pytest.fixture
def mem() -> Iterator[MemoryBroker]:
    memory = MemoryBroker()
    yield memory
    memory.close()


def client(
    broker: MemoryBroker, client_id: str, *subscriptions: str, will: Will | None = None,
    start: bool = True, **overrides: Any,
) -> tuple[MemoryTransport, Recorder]:
    """A transport subscribed to ``subscriptions`` (QoS 1), started and connected."""
    rec = Recorder()
    transport = broker.factory(
        settings(client_id, **overrides), on_message=rec.on_message,
        on_connect=rec.on_connect, will=will,
    )
    for topic_filter in subscriptions:
        transport.subscribe(topic_filter)
    if start:
        transport.start()
        assert transport.wait_connected(5), transport.last_error
        assert broker.wait_idle()
    return transport, rec


# -- topic filters ----------------------------------------------------------------------


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("fedbus/model", "fedbus/model", True),
    ("fedbus/model", "fedbus/model/x", False),
    ("fedbus/+", "fedbus/model", True),
    ("fedbus/+", "fedbus", False),
    ("fedbus/+", "fedbus/update/dev-a", False),
    ("fedbus/+/dev-a", "fedbus/update/dev-a", True),
    ("fedbus/+", "fedbus/", True),  # an empty level is a level
    ("fedbus/#", "fedbus", True),  # '#' includes the parent level
    ("fedbus/#", "fedbus/update/dev-a", True),
    ("fedbus/#", "other/update", False),
    ("#", "fedbus/x", True),
    ("#", "$SYS/broker/uptime", False),  # a wildcard first level never matches '$' topics
    ("+/broker/uptime", "$SYS/broker/uptime", False),
    ("$SYS/#", "$SYS/broker/uptime", True),
])
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["", "fedbus/#/x", "fedbus/a#", "fedbus/a+", "$share/g/t"])
def test_invalid_filters_are_refused(mem: MemoryBroker, bad: str) -> None:
    transport, _ = client(mem, "dev-a", start=False)
    with pytest.raises(ValueError):
        transport.subscribe(bad)


@pytest.mark.parametrize(("topic", "qos"), [("", 1), ("fedbus/+", 1), ("a/#", 0), ("a", 2)])
def test_invalid_publishes_are_refused(mem: MemoryBroker, topic: str, qos: int) -> None:
    transport, _ = client(mem, "dev-a")
    with pytest.raises(ValueError):
        transport.publish(topic, b"x", qos=qos)


# -- the transport ------------------------------------------------------------------------


def test_factory_builds_a_transport_that_connects_asynchronously(mem: MemoryBroker) -> None:
    rec = Recorder()
    transport: Transport = mem.factory(settings("dev-a"), on_message=rec.on_message,
                                       on_connect=rec.on_connect)
    assert isinstance(transport, MemoryTransport)
    assert not transport.connected
    assert transport.disconnected_since is not None
    transport.start()
    assert transport.wait_connected(5)
    assert transport.connected and transport.disconnected_since is None
    assert transport.connects == 1 and transport.fatal is None and transport.last_error is None
    mem.wait_idle()
    assert rec.sessions == [False]  # a new session
    assert rec.threads and threading.get_ident() not in rec.threads
    with pytest.raises(RuntimeError):
        transport.start()


def test_callbacks_run_on_the_transport_thread_and_may_publish(mem: MemoryBroker) -> None:
    replies: list[tuple[bool, int | None]] = []

    def echo(message: Message) -> None:  # publishes and waits, on the transport's thread
        result = responder.publish("reply", message.payload)
        replies.append((result.wait(1), result.reason_code))

    responder = mem.factory(settings("echo"), on_message=echo)
    responder.subscribe("ask")
    responder.start()
    asker, rec = client(mem, "asker", "reply")
    assert asker.publish("ask", b"ping").wait(1)
    assert mem.wait_idle()
    assert replies == [(True, 0)]
    assert rec.messages == [("reply", b"ping", False)]
    assert threading.get_ident() not in rec.threads


def test_counters_and_max_packet_size() -> None:
    small = MemoryBroker(max_packet_size=1000)
    try:
        transport, _ = client(small, "dev-a", "t", start=False, max_packet_size=5000)
        assert transport.max_packet_size == 5000  # the settings' until a CONNACK says more
        transport.start()
        assert transport.wait_connected(5)
        assert transport.max_packet_size == 1000
        assert transport.publish("t", b"x" * 900).wait(1)
        small.wait_idle()
        assert transport.bytes_sent == 900 and transport.bytes_received == 900
        with pytest.raises(MessageTooLarge) as info:
            transport.publish("t", b"x" * 1000)
        assert (info.value.size, info.value.limit, info.value.topic) == (1009, 1000, "t")
        assert info.value.host == "memory" and info.value.port == 1883
        assert transport.bytes_sent == 900  # nothing was sent
    finally:
        small.close()


def test_publish_result_reason_codes(mem: MemoryBroker) -> None:
    _sub, _ = client(mem, "sub", "t")
    pub, _ = client(mem, "pub")
    r = pub.publish("t", b"x")
    assert r.done and r.ok and (r.reason_code, r.reason) == (0, "Success")
    r = pub.publish("nobody/listens", b"x")  # Mosquitto's PUBACK 0x10, still a success
    assert r.ok and (r.reason_code, r.reason) == (0x10, "No matching subscribers")
    r = pub.publish("nobody/listens", b"x", qos=0)  # no PUBACK: paho reports the write
    assert r.ok and r.reason_code == 0


# -- retained messages ------------------------------------------------------------------


def test_retained_message_on_every_subscribe(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    assert pub.publish("fedbus/model", b"m1", retain=True).wait(1)
    assert mem.retained("fedbus/model") == b"m1"
    sub, rec = client(mem, "dev-a", "fedbus/model")
    assert rec.take() == [("fedbus/model", b"m1", True)]
    pub.publish("fedbus/model", b"m2", retain=True)
    mem.wait_idle()
    assert rec.take() == [("fedbus/model", b"m2", False)]  # live: retain False
    sub.subscribe("fedbus/model")  # retain handling 0: again on every SUBSCRIBE
    mem.wait_idle()
    assert rec.take() == [("fedbus/model", b"m2", True)]
    sub.subscribe("fedbus/#")  # a second, overlapping subscription
    mem.wait_idle()
    assert rec.take() == [("fedbus/model", b"m2", True)]
    pub.publish("fedbus/model", b"m3")  # one copy per matching subscription, as Mosquitto
    mem.wait_idle()
    assert rec.take() == [("fedbus/model", b"m3", False)] * 2
    assert mem.retained("fedbus/model") == b"m2"  # m3 was not retained


def test_empty_retained_payload_clears_and_is_delivered(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    pub.publish("fedbus/status/dev-a", b"online", retain=True)
    _sub, rec = client(mem, "dev-a", "fedbus/status/+")
    assert rec.take() == [("fedbus/status/dev-a", b"online", True)]
    assert pub.publish("fedbus/status/dev-a", b"", retain=True).ok
    mem.wait_idle()
    assert mem.retained("fedbus/status/dev-a") is None
    assert rec.take() == [("fedbus/status/dev-a", b"", False)]
    _late, late_rec = client(mem, "dev-b", "fedbus/status/+")
    assert late_rec.messages == []


def test_retained_messages_are_sent_again_after_a_reconnect(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    pub.publish("fedbus/model", b"m1", retain=True)
    sub, rec = client(mem, "dev-a", "fedbus/model")
    assert rec.take() == [("fedbus/model", b"m1", True)]
    assert mem.drop("dev-a")
    wait_for(lambda: sub.connects == 2, "the reconnect")
    assert mem.wait_idle()
    assert rec.sessions == [False, True]  # subscriptions renewed, session resumed
    assert rec.take() == [("fedbus/model", b"m1", True)]


# -- durable sessions -------------------------------------------------------------------


def test_durable_session_queues_qos1_not_qos0(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    sub, _ = client(mem, "dev-a", "fedbus/receipt/dev-a")
    sub.stop()
    assert not sub.connected and mem.queued("dev-a") == 0
    codes = [pub.publish("fedbus/receipt/dev-a", payload, qos=qos).reason_code
             for payload, qos in ((b"q1", 1), (b"q0", 0), (b"q2", 1))]
    assert codes == [0, 0, 0]  # an offline durable session is a matching subscriber
    assert mem.queued("dev-a") == 2
    _again, rec = client(mem, "dev-a")  # no SUBSCRIBE: the session kept the subscription
    assert rec.sessions == [True]
    assert rec.messages == [("fedbus/receipt/dev-a", b"q1", False),
                            ("fedbus/receipt/dev-a", b"q2", False)]
    assert mem.queued("dev-a") == 0


def test_delivery_qos_is_the_lower_of_publish_and_subscription(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    sub, rec = client(mem, "dev-a")
    sub.subscribe("fedbus/model", qos=0)
    pub.publish("fedbus/model", b"live")
    mem.wait_idle()
    assert rec.take() == [("fedbus/model", b"live", False)]
    sub.stop()
    pub.publish("fedbus/model", b"while away", qos=1)  # delivered at QoS 0: not queued
    assert mem.queued("dev-a") == 0


def test_session_expiry_zero_ends_the_session(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    sub, _ = client(mem, "dev-a", "t", session_expiry=0)
    sub.stop()
    assert pub.publish("t", b"x").reason_code == 0x10  # nobody subscribes any more
    _again, rec = client(mem, "dev-a")
    assert rec.sessions == [False] and rec.messages == []


def test_messages_from_one_publisher_arrive_in_order(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    sub, rec = client(mem, "dev-a", "fedbus/receipt/dev-a")
    for i in range(100):
        pub.publish("fedbus/receipt/dev-a", b"%d" % i, qos=i % 2)
    assert mem.wait_idle()
    sub.stop()
    for i in range(100, 150):
        pub.publish("fedbus/receipt/dev-a", b"%d" % i)
    _again, again_rec = client(mem, "dev-a")
    assert [int(p) for _, p, _ in rec.messages] == list(range(100))
    assert [int(p) for _, p, _ in again_rec.messages] == list(range(100, 150))


def test_a_second_connection_takes_the_session_over_without_the_will() -> None:
    slow = MemoryBroker(reconnect_delay=30)  # the first one does not take it back at once
    try:
        watcher, watched = client(slow, "coordinator", "fedbus/status/+")
        first, _ = client(slow, "dev-a", "fedbus/receipt/dev-a",
                          will=Will("fedbus/status/dev-a", b"offline"))
        second, rec = client(slow, "dev-a", start=False)
        second.start()
        assert second.wait_connected(5)
        wait_for(lambda: not first.connected, "the first connection to end")
        assert "taken over" in str(first.last_error)
        assert watched.messages == [] and slow.retained("fedbus/status/dev-a") is None
        assert rec.sessions == [True]
        watcher.publish("fedbus/receipt/dev-a", b"r")
        wait_for(lambda: rec.messages == [("fedbus/receipt/dev-a", b"r", False)], "the receipt")
    finally:
        slow.close()


# -- subscription options ---------------------------------------------------------------


def test_no_local(mem: MemoryBroker) -> None:
    me, rec = client(mem, "coordinator")
    me.subscribe("fedbus/receipt/+", no_local=True)
    me.subscribe("fedbus/task")
    _other, other_rec = client(mem, "dev-a", "fedbus/receipt/dev-a")
    assert me.publish("fedbus/receipt/dev-a", b"r").reason_code == 0
    me.publish("fedbus/task", b"t")
    mem.wait_idle()
    assert rec.messages == [("fedbus/task", b"t", False)]
    assert other_rec.messages == [("fedbus/receipt/dev-a", b"r", False)]


def test_retain_as_published(mem: MemoryBroker) -> None:
    pub, _ = client(mem, "coordinator")
    _plain, plain_rec = client(mem, "dev-a", "fedbus/model")
    as_published, rap_rec = client(mem, "dev-b")
    as_published.subscribe("fedbus/model", retain_as_published=True)
    pub.publish("fedbus/model", b"m1", retain=True)
    pub.publish("fedbus/model", b"m2", retain=False)
    mem.wait_idle()
    assert plain_rec.messages == [("fedbus/model", b"m1", False), ("fedbus/model", b"m2", False)]
    assert rap_rec.messages == [("fedbus/model", b"m1", True), ("fedbus/model", b"m2", False)]


# -- acknowledgement when on_message returns ------------------------------------------------


class Blocking(Recorder):
    """Holds the first message in ``on_message`` until ``release``; then calls ``during``."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.release = threading.Event()
        self.during: Callable[[], None] | None = None

    def on_message(self, message: Message) -> None:
        super().on_message(message)
        if not self.inside.is_set():
            self.inside.set()
            if self.during is not None:
                self.during()
            assert self.release.wait(5)


def blocked_coordinator(mem: MemoryBroker) -> tuple[MemoryTransport, Blocking, MemoryTransport]:
    """A coordinator stuck in ``on_message`` for u1, with u2 queued behind it."""
    rec = Blocking()
    transport = mem.factory(settings("coordinator"), on_message=rec.on_message,
                            on_connect=rec.on_connect)
    transport.subscribe("fedbus/update/+")
    transport.start()
    device, _ = client(mem, "dev-a")
    device.publish("fedbus/update/dev-a", b"u1")
    device.publish("fedbus/update/dev-a", b"u2")
    assert rec.inside.wait(5)
    assert mem.queued("coordinator") == 2  # u1 (being handled) and u2
    return transport, rec, device


U1, U2 = ("fedbus/update/dev-a", b"u1", False), ("fedbus/update/dev-a", b"u2", False)


def test_a_message_is_acknowledged_when_on_message_returns(mem: MemoryBroker) -> None:
    _transport, rec, _ = blocked_coordinator(mem)
    rec.release.set()
    assert mem.wait_idle()
    assert rec.messages == [U1, U2] and mem.queued("coordinator") == 0


def test_drop_during_on_message_delivers_it_again(mem: MemoryBroker) -> None:
    transport, rec, _ = blocked_coordinator(mem)
    assert mem.drop("coordinator")
    rec.release.set()
    wait_for(lambda: transport.connects == 2, "the reconnect")
    assert mem.wait_idle()
    assert rec.messages == [U1, U1, U2]  # u1 again: it was never acknowledged
    assert rec.sessions == [False, True] and mem.queued("coordinator") == 0


def test_crash_during_on_message_leaves_it_in_the_session(mem: MemoryBroker) -> None:
    transport, rec, _ = blocked_coordinator(mem)
    stopper = threading.Thread(target=lambda: transport.stop(disconnect=False))
    stopper.start()
    wait_for(lambda: not transport.connected, "the crash")
    rec.release.set()
    stopper.join(5)
    assert mem.queued("coordinator") == 2
    _again, again_rec = client(mem, "coordinator")
    assert again_rec.messages == [U1, U2]


def test_abort_inside_on_message_leaves_it_in_the_session(mem: MemoryBroker) -> None:
    _watcher, watched = client(mem, "dev-b", "fedbus/status/+")
    rec = Blocking()
    transport = mem.factory(settings("coordinator"), on_message=rec.on_message,
                            will=Will("fedbus/status/coordinator", b"gone"))
    rec.during = transport.abort  # from the transport's own thread
    rec.release.set()
    transport.subscribe("fedbus/update/+")
    transport.start()
    device, _ = client(mem, "dev-a")
    device.publish("fedbus/update/dev-a", b"u1")
    device.publish("fedbus/update/dev-a", b"u2")
    assert mem.wait_idle()
    assert rec.messages == [U1] and not transport.connected
    assert transport.connects == 1  # no reconnect after an abort
    assert watched.messages == [("fedbus/status/coordinator", b"gone", False)]  # the Will
    assert mem.queued("coordinator") == 2
    r = transport.publish("fedbus/task", b"t")  # waits, as paho's queue would
    transport.stop()
    assert r.done and not r.ok and r.reason == "client stopped"
    _again, again_rec = client(mem, "coordinator")
    assert again_rec.messages == [U1, U2]


def test_an_exception_in_on_message_is_logged_and_the_message_acknowledged(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[bytes] = []

    def fails(message: Message) -> None:
        seen.append(message.payload)
        raise RuntimeError("boom")

    transport = mem.factory(settings("coordinator"), on_message=fails)
    transport.subscribe("t")
    transport.start()
    device, _ = client(mem, "dev-a")
    device.publish("t", b"1")
    device.publish("t", b"2")
    assert mem.wait_idle()
    assert seen == [b"1", b"2"] and mem.queued("coordinator") == 0
    assert transport.connected
    assert "error handling message on t" in caplog.text


# -- Last Will ----------------------------------------------------------------------------


WILL = Will("fedbus/status/dev-a", b"offline")


def test_will_after_an_abnormal_stop_not_after_a_clean_one(mem: MemoryBroker) -> None:
    _watcher, rec = client(mem, "coordinator", "fedbus/status/+")
    clean, _ = client(mem, "dev-a", will=WILL)
    clean.publish("fedbus/status/dev-a", b"online", retain=True)
    clean.stop()
    mem.wait_idle()
    assert rec.take() == [("fedbus/status/dev-a", b"online", False)]
    assert mem.retained("fedbus/status/dev-a") == b"online"
    crashed, _ = client(mem, "dev-a", will=WILL)
    crashed.stop(disconnect=False)
    mem.wait_idle()
    assert rec.take() == [("fedbus/status/dev-a", b"offline", False)]
    assert mem.retained("fedbus/status/dev-a") == b"offline"  # Will.retain defaults to True
    assert mem.published[-1] == Published("dev-a", "fedbus/status/dev-a", b"offline", 1, True)


def test_drop_sends_the_will_and_the_client_reconnects(mem: MemoryBroker) -> None:
    _watcher, rec = client(mem, "coordinator", "fedbus/status/+")
    device, device_rec = client(mem, "dev-a", will=WILL)
    before = time.monotonic()
    assert mem.drop("dev-a")
    assert not mem.drop("nobody")
    assert not device.connected
    since = device.disconnected_since
    assert since is not None and since >= before
    assert "the broker dropped the connection" in str(device.last_error)
    assert device.fatal is None
    wait_for(lambda: device.connected, "the reconnect")
    assert device.connects == 2 and device.disconnected_since is None
    assert mem.wait_idle()
    assert device_rec.sessions == [False, True]
    assert rec.messages == [("fedbus/status/dev-a", b"offline", False)]


def test_no_local_applies_to_the_own_will(mem: MemoryBroker) -> None:
    device, _ = client(mem, "dev-a", will=WILL)
    device.subscribe("fedbus/status/dev-a", no_local=True)
    device.stop(disconnect=False)
    assert mem.queued("dev-a") == 0
    assert mem.retained("fedbus/status/dev-a") == b"offline"


# -- fault injection ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0x84, 0x85, 0x86, 0x87, 0x8C])
def test_fatal_connack_stops_retrying(mem: MemoryBroker, code: int) -> None:
    mem.refuse_connects(code)
    transport, _ = client(mem, "dev-a", start=False)
    transport.start()
    wait_for(lambda: transport.fatal is not None, "the transport to give up")
    fatal = transport.fatal
    assert isinstance(fatal, ConnectRefused) and fatal.fatal
    assert fatal.reason_code == code and fatal.username == "dev-a"
    assert fatal.exit_code == 2 and transport.last_error is fatal
    mem.clear_faults()
    assert not transport.wait_connected(0.2)  # 4 reconnect delays: it no longer tries
    assert transport.connects == 0


def test_other_connack_failures_are_retried(mem: MemoryBroker) -> None:
    mem.refuse_connects(0x88, count=3)
    transport, rec = client(mem, "dev-a", start=False)
    started = time.monotonic()
    transport.start()
    assert transport.wait_connected(5)
    assert time.monotonic() - started >= 3 * mem.reconnect_delay
    error = transport.last_error
    assert isinstance(error, ConnectRefused) and not error.fatal and error.reason_code == 0x88
    assert "Server unavailable" in str(error)
    assert transport.fatal is None and transport.connects == 1
    mem.wait_idle()
    assert rec.sessions == [False]


def test_refuse_connects_without_count_until_cleared(mem: MemoryBroker) -> None:
    mem.refuse_connects(0x89)
    transport, _ = client(mem, "dev-a", start=False)
    transport.start()
    assert not transport.wait_connected(0.2)
    assert isinstance(transport.last_error, ConnectRefused)
    mem.refuse_connects(0x89, count=0)
    assert transport.wait_connected(5)
    with pytest.raises(ValueError):
        mem.refuse_connects(0x00)


def test_broker_down_drops_everyone_and_refuses_connects(mem: MemoryBroker) -> None:
    watcher, rec = client(mem, "coordinator", "fedbus/status/+")
    device, _ = client(mem, "dev-a", will=WILL)
    mem.set_down(True)
    assert not watcher.connected and not device.connected
    wait_for(lambda: isinstance(device.last_error, BrokerUnreachable), "a refused attempt")
    error = device.last_error
    assert isinstance(error, BrokerUnreachable) and not error.fatal
    assert (error.host, error.port) == ("memory", 1883)
    assert mem.queued("coordinator") == 1  # the Will, kept for the durable session
    assert not mem.wait_idle(0.1)  # both keep retrying
    time.sleep(0.1)
    timeout = connect_timeout_error(device, 0.1)
    assert isinstance(timeout, ConnectTimeout)
    assert isinstance(timeout.last_error, BrokerUnreachable)
    waiting = device.publish("fedbus/status/dev-a", b"back")
    assert not waiting.done
    mem.set_down(False)
    assert device.wait_connected(5) and watcher.wait_connected(5)
    assert waiting.wait(1)
    assert mem.wait_idle()
    assert (watcher.connects, device.connects) == (2, 2)
    # the Will kept for the session, its retained copy again for the renewed subscription,
    # and dev-a's message: which of the two reconnected first decides the order
    assert sorted(rec.messages) == [("fedbus/status/dev-a", b"back", False),
                                    ("fedbus/status/dev-a", b"offline", False),
                                    ("fedbus/status/dev-a", b"offline", True)]
    assert connect_timeout_error(device, 0.1) is None


def test_lost_puback_leaves_the_result_pending_until_the_resend(mem: MemoryBroker) -> None:
    _coordinator, rec = client(mem, "coordinator", "fedbus/update/+")
    device, _ = client(mem, "dev-a")
    mem.lose_pubacks("dev-a", 1)
    assert device.publish("fedbus/update/dev-a", b"q0", qos=0).ok  # no PUBACK to lose
    lost = device.publish("fedbus/update/dev-a", b"u1")
    acked = device.publish("fedbus/update/dev-a", b"u2")
    assert not lost.done and acked.ok
    mem.wait_idle()
    assert [p for _, p, _ in rec.take()] == [b"q0", b"u1", b"u2"]  # u1 did arrive
    assert not lost.wait(0.1)
    mem.drop("dev-a")  # paho re-sends an unacknowledged QoS 1 message after reconnecting
    wait_for(lambda: device.connects == 2, "the reconnect")
    assert lost.wait(1) and lost.reason_code == 0
    assert mem.wait_idle()
    assert [p for _, p, _ in rec.take()] == [b"u1"]  # a duplicate the receiver must expect
    assert [p.payload for p in mem.published if p.client_id == "dev-a"] == [
        b"q0", b"u1", b"u2", b"u1"]


def test_lost_puback_then_stop_fails_the_result(mem: MemoryBroker) -> None:
    device, _ = client(mem, "dev-a")
    mem.lose_pubacks("dev-a", 1)
    lost = device.publish("t", b"u1")
    assert not lost.done
    device.stop()
    assert lost.done and not lost.ok and lost.reason == "client stopped"


def test_refused_publish(mem: MemoryBroker) -> None:
    coordinator, rec = client(mem, "coordinator", "fedbus/#")
    device, _ = client(mem, "dev-a")
    mem.refuse_publishes("fedbus/model", client_id="dev-a")
    mem.refuse_publishes("fedbus/task", 0x97)
    forged = device.publish("fedbus/model", b"forged", retain=True)
    assert forged.done and not forged.ok
    assert (forged.reason_code, forged.reason) == (0x87, "Not authorized")
    assert device.publish("fedbus/model", b"forged", qos=0).ok  # QoS 0: silently dropped
    quota = coordinator.publish("fedbus/task", b"t")
    assert not quota.ok and quota.reason_code == 0x97
    assert coordinator.publish("fedbus/model", b"real").ok  # the rule was for dev-a only
    mem.wait_idle()
    assert rec.take() == [("fedbus/model", b"real", False)]
    assert mem.retained("fedbus/model") is None
    assert [p.payload for p in mem.published] == [b"real"]
    mem.clear_faults()
    assert device.publish("fedbus/model", b"allowed").ok
    with pytest.raises(ValueError):
        mem.refuse_publishes("fedbus/model", 0x00)


# -- publishing while disconnected ----------------------------------------------------------


def test_qos1_publishes_wait_for_the_connection(mem: MemoryBroker) -> None:
    _coordinator, rec = client(mem, "coordinator", "fedbus/update/+")
    device, _ = client(mem, "dev-a", start=False, max_queued=2)
    first = device.publish("fedbus/update/dev-a", b"u1")
    second = device.publish("fedbus/update/dev-a", b"u2")
    full = device.publish("fedbus/update/dev-a", b"u3")
    fire_and_forget = device.publish("fedbus/update/dev-a", b"q0", qos=0)
    assert not first.done and not second.done
    assert full.done and not full.ok and full.reason == "Message queue full."
    device.start()
    assert first.wait(5) and second.wait(5)
    mem.wait_idle()
    assert [p for _, p, _ in rec.messages] == [b"u1", b"u2"]  # in order; q0 was dropped
    assert not fire_and_forget.done  # as with paho: never written, never resolved
    assert device.bytes_sent == 6
    device.stop()
    assert fire_and_forget.done and not fire_and_forget.ok
    after = device.publish("fedbus/update/dev-a", b"late")
    assert after.done and not after.ok and after.reason == "client stopped"


def test_oversize_message_queued_before_the_first_connack(mem: MemoryBroker) -> None:
    small = MemoryBroker(max_packet_size=200)
    try:
        device, _ = client(small, "dev-a", start=False)
        big = device.publish("t", b"x" * 500)  # fits the settings' 8 MiB assumption
        device.start()
        # the broker drops the connection and paho re-sends after every reconnect
        wait_for(lambda: device.connects >= 3, "a few reconnects")
        assert "maximum packet size is 200" in str(device.last_error)
        assert not big.done and small.published == []
        assert device.max_packet_size == 200
        with pytest.raises(MessageTooLarge):
            device.publish("t", b"x" * 500)
        device.stop()
        assert big.done and not big.ok
    finally:
        small.close()


# -- conformance with Mosquitto -------------------------------------------------------------

Make = Callable[[str, Will | None], tuple[Transport, Recorder]]

CONFORMANCE = {
    "a first": [("fedbus/model", b"m1", True), ("fedbus/model", b"m2", False),
                ("fedbus/receipt/dev-a", b"r-a", False)],
    "b first": [("fedbus/model", b"m1", True), ("fedbus/model", b"m2", True)],
    "coordinator live": [("fedbus/task", b"t1", False),
                         ("fedbus/status/dev-a", b"online", False)],
    "codes to an offline session": [0, 0, 0, 0],
    "b resumed": [True],
    "b queued": [("fedbus/receipt/dev-b", b"q1", False), ("fedbus/receipt/dev-b", b"q2", False),
                 ("fedbus/model", b"m3", True)],
    "no subscriber": (True, 0x10),
    "denied": (False, 0x87),
    "will": [("fedbus/status/dev-a", b"offline", False)],
    "after a clean stop": [],
    "retained will": [("fedbus/status/dev-a", b"offline", True)],
    "cleared": [("fedbus/status/dev-a", b"", False)] * 2,
    "after clearing": [],
}


def conformance_scenario(make: Make, settle: Callable[[], object]) -> dict[str, object]:
    """A small scenario through a broker; what each client observed. Client ids are the
    usernames of the test broker's accounts, and every step is allowed by its ACL except
    dev-b writing the model."""
    seen: dict[str, object] = {}
    transports: list[Transport] = []

    def started(user: str, *subscriptions: str, will: Will | None = None,
                **options: bool) -> tuple[Transport, Recorder]:
        transport, rec = make(user, will)
        transports.append(transport)
        for topic_filter in subscriptions:
            transport.subscribe(topic_filter, **options)
        transport.start()
        assert transport.wait_connected(5), transport.last_error
        return transport, rec

    try:
        co, co_rec = started("coordinator")
        co.subscribe("fedbus/status/+")
        co.subscribe("fedbus/receipt/+", no_local=True)
        co.subscribe("fedbus/task")
        assert co.publish("fedbus/model", b"m1", retain=True).wait(5)
        a, a_rec = started("dev-a", "fedbus/model", "fedbus/receipt/dev-a",
                           will=Will("fedbus/status/dev-a", b"offline"))
        b, b_rec = started("dev-b", "fedbus/model", "fedbus/receipt/dev-b",
                           retain_as_published=True)
        a_rec.wait_count(1)
        b_rec.wait_count(1)

        # retained and live, no_local, retain_as_published
        assert co.publish("fedbus/model", b"m2", retain=True).wait(5)
        assert co.publish("fedbus/task", b"t1").wait(5)
        assert co.publish("fedbus/receipt/dev-a", b"r-a").wait(5)
        assert a.publish("fedbus/status/dev-a", b"online", retain=True).wait(5)
        a_rec.wait_count(3)
        b_rec.wait_count(2)
        co_rec.wait_count(2)
        settle()
        seen["a first"], seen["b first"] = a_rec.take(), b_rec.take()
        seen["coordinator live"] = co_rec.take()

        # a durable session: QoS 1 queued while offline, QoS 0 not
        b.stop()
        settle()
        results = [co.publish("fedbus/receipt/dev-b", b"q1"),
                   co.publish("fedbus/receipt/dev-b", b"q0", qos=0),
                   co.publish("fedbus/receipt/dev-b", b"q2"),
                   co.publish("fedbus/model", b"m3", retain=True)]
        assert all(r.wait(5) for r in results)
        seen["codes to an offline session"] = [r.reason_code for r in results]
        b2, b2_rec = started("dev-b")  # no SUBSCRIBE: the session has them
        b2_rec.wait_count(3)
        settle()
        seen["b resumed"], seen["b queued"] = b2_rec.sessions, b2_rec.take()

        nobody = co.publish("fedbus/nobody", b"x")
        denied = b2.publish("fedbus/model", b"forged")
        assert nobody.wait(5) and not denied.wait(5)
        seen["no subscriber"] = (nobody.ok, nobody.reason_code)
        seen["denied"] = (denied.ok, denied.reason_code)

        # the Will after a crash, not after a clean stop
        a.stop(disconnect=False)
        co_rec.wait_count(1)
        settle()
        seen["will"] = co_rec.take()
        c, _ = started("dev-c", will=Will("fedbus/status/dev-c", b"offline"))
        c.stop()
        settle()
        seen["after a clean stop"] = co_rec.take()
        co.subscribe("fedbus/status/dev-a")  # overlaps fedbus/status/+
        co_rec.wait_count(1)
        settle()
        seen["retained will"] = co_rec.take()

        # an empty retained payload clears, and is delivered (once per subscription)
        assert co.publish("fedbus/status/dev-a", b"", retain=True).wait(5)
        co_rec.wait_count(2)
        settle()
        seen["cleared"] = co_rec.take()
        co.subscribe("fedbus/status/dev-a")
        co.subscribe("fedbus/status/+")
        settle()
        seen["after clearing"] = co_rec.take()
    finally:
        for transport in transports:
            transport.stop()
    return seen


def memory_run() -> dict[str, object]:
    memory = MemoryBroker()
    memory.refuse_publishes("fedbus/model", client_id="dev-b")  # the ACL's doing on Mosquitto

    def make(user: str, will: Will | None) -> tuple[Transport, Recorder]:
        rec = Recorder()
        return memory.factory(settings(user), on_message=rec.on_message,
                              on_connect=rec.on_connect, will=will), rec

    try:
        return conformance_scenario(make, memory.wait_idle)
    finally:
        memory.close()


def test_conformance_scenario_on_the_memory_broker() -> None:
    assert memory_run() == CONFORMANCE


@pytest.mark.broker
def test_conformance_scenario_same_on_mosquitto(broker: LocalBroker) -> None:
    def make(user: str, will: Will | None) -> tuple[Transport, Recorder]:
        rec = Recorder()
        s = ConnectionSettings(broker.host, broker.port, user, user,
                               broker.credentials(user).password)
        return MqttClient(s, on_message=rec.on_message, on_connect=rec.on_connect,
                          will=will), rec

    real = conformance_scenario(make, lambda: time.sleep(0.3))
    assert real == memory_run()
    assert real == CONFORMANCE
