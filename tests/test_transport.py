"""fedbus.transport against real sockets: failures that speak, with their causes as data."""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from fedbus.broker import LocalBroker, find_free_port
from fedbus.errors import BrokerUnreachable, ConnectTimeout, MessageTooLarge, NotMqtt
from fedbus.transport import (
    ConnectionSettings,
    Message,
    MqttClient,
    connect_timeout_error,
    publish_packet_size,
)


def _client(port: int, **settings: object) -> MqttClient:
    return MqttClient(
        ConnectionSettings("127.0.0.1", port, "x", "x", "y", reconnect_max=2.0, **settings),
        on_message=lambda m: None,
    )


def _wait_error(client: MqttClient, kind: type, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if isinstance(client.last_error, kind):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {kind.__name__} within {timeout} s: {client.last_error!r}")


@pytest.fixture
def fake_server() -> Iterator[callable]:
    servers: list[socket.socket] = []

    def start(mode: str) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        servers.append(sock)

        def serve() -> None:
            held = []
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                if mode == "close":
                    conn.close()
                elif mode == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    conn.close()
                else:  # silent: accept and say nothing
                    held.append(conn)

        threading.Thread(target=serve, daemon=True).start()
        return int(sock.getsockname()[1])

    yield start
    for sock in servers:
        sock.close()


def test_what_handling_a_packet_queued_is_sent_before_the_next_packet_is_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import paho.mqtt.client as mqtt

    from fedbus.transport import _Paho

    calls: list[str] = []
    # raises if paho no longer has the method our override extends
    monkeypatch.setattr(mqtt.Client, "_packet_handle",
                        lambda self: calls.append("handle") or mqtt.MQTT_ERR_SUCCESS)
    monkeypatch.setattr(mqtt.Client, "want_write", lambda self: True)
    monkeypatch.setattr(mqtt.Client, "loop_write",
                        lambda self: calls.append("write") or mqtt.MQTT_ERR_SUCCESS)
    client = _Paho(_client(1), callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                   protocol=mqtt.MQTTv5)
    assert client._packet_handle() == mqtt.MQTT_ERR_SUCCESS
    assert calls == ["handle", "write"]


def test_small_packets_are_not_held_back_by_nagle() -> None:
    from fedbus.transport import _no_delay

    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(
            server.getsockname()) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        _no_delay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_closed_port_is_named_on_every_attempt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    client = _client(find_free_port())
    client.start()
    try:
        _wait_error(client, BrokerUnreachable)
        assert "connection refused" in client.last_error.cause  # type: ignore[union-attr]
        time.sleep(3.5)
        attempts = [r for r in caplog.records if "connection refused" in r.getMessage()]
        assert len(attempts) >= 2 and "attempt 2" in attempts[1].getMessage()
        timeout = connect_timeout_error(client, 1.0)
        assert isinstance(timeout, ConnectTimeout)
        assert isinstance(timeout.last_error, BrokerUnreachable)
        assert connect_timeout_error(client, 0) is None  # 0: never
    finally:
        client.stop()


@pytest.mark.parametrize("mode,words", [("close", "closed before a CONNACK"),
                                        ("garbage", "closed before a CONNACK"),
                                        ("silent", "no CONNACK came within")])
def test_a_port_that_is_not_mqtt_is_named(fake_server, mode: str, words: str) -> None:
    client = _client(fake_server(mode), connack_timeout=1.0)
    client.start()
    try:
        _wait_error(client, NotMqtt)
        assert words in str(client.last_error)
        assert not client.connected and client.fatal is None  # retried, not given up
    finally:
        client.stop()


@pytest.mark.broker
def test_a_message_above_the_brokers_packet_limit_is_refused_before_sending(
    broker: LocalBroker,
) -> None:
    client = MqttClient(
        ConnectionSettings(broker.host, broker.port, "coordinator", "coordinator",
                           broker.coordinator.password, max_packet_size=100),
        on_message=lambda m: None,
    )
    with pytest.raises(MessageTooLarge) as before:  # the settings' limit, before CONNACK
        client.publish("fedbus/model", bytes(200))
    assert before.value.limit == 100
    client.start()
    try:
        assert client.wait_connected(5)
        assert client.max_packet_size == 8 * 1024 * 1024  # announced by the broker
        assert client.publish("fedbus/model", bytes(200)).wait(5)
        with pytest.raises(MessageTooLarge) as info:
            client.publish("fedbus/model", bytes(8 * 1024 * 1024))
        assert info.value.size > info.value.limit == 8 * 1024 * 1024
        assert client.connected  # nothing was sent: the broker did not drop us
    finally:
        client.stop()


@pytest.mark.broker
def test_the_broker_drops_a_message_over_our_maximum_packet_size_and_delivers_the_next(
    broker: LocalBroker, mqtt_client
) -> None:
    """MQTT v5 3.1.2.25: the Maximum Packet Size of our CONNECT binds the broker. Mosquitto
    2.0.11 drops a larger message for us alone (and logs it), keeps the connection, and
    delivers what follows; the sender's PUBACK says success all the same. Mosquitto leaves
    the fixed header's first byte out of its count: a packet 1 byte over still comes."""
    limit = 2000
    got: queue.Queue[Message] = queue.Queue()
    coordinator = MqttClient(
        ConnectionSettings(broker.host, broker.port, "coordinator", "coordinator",
                           broker.coordinator.password, receive_max_packet_size=limit),
        on_message=got.put,
    )
    topic = f"{broker.prefix}/update/dev-a"
    coordinator.subscribe(f"{broker.prefix}/update/+", qos=1, no_local=True)
    coordinator.start()
    acks: dict[int, object] = {}
    device = mqtt_client(broker, "dev-a")
    device.on_publish = lambda _c, _u, mid, reason, _p: acks.__setitem__(mid, reason)
    try:
        assert coordinator.wait_connected(5)
        # the largest payload within the limit
        fits = max(n for n in range(limit) if publish_packet_size(topic, n) <= limit)
        assert publish_packet_size(topic, fits) == limit
        probe = b"probe"
        deadline = time.monotonic() + 5  # until the subscription is in place
        while time.monotonic() < deadline:
            device.publish(topic, probe, qos=1)
            try:
                got.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        time.sleep(0.2)
        while not got.empty():  # late copies of the probe
            assert got.get().payload == probe
        sent = {size: device.publish(topic, bytes([size % 251]) * size, qos=1).mid
                for size in (fits, fits + 2, 100 * limit, 10)}
        received = []
        while not received or len(received[-1]) != 10:
            received.append(got.get(timeout=5).payload)
        assert [len(p) for p in received] == [fits, 10]  # the two over the limit: dropped
        deadline = time.monotonic() + 5
        while len(acks) < len(sent) + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(not acks[mid].is_failure for mid in sent.values())  # type: ignore[attr-defined]
        assert coordinator.connected and coordinator.connects == 1
        assert "Dropping too large outgoing PUBLISH for coordinator" in broker.log_file.read_text()
    finally:
        coordinator.stop()


def test_connect_timeout_makes_the_cli_exit_with_one_line(tmp_path) -> None:
    port = find_free_port()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "coordinator", "--password", "x", "--port", str(port),
         "--connect-timeout", "2", "--state-dir", str(tmp_path / "run"),
         "--model-args", '{"in_features": 4, "num_classes": 2}'],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "not connected to the broker" in errors[0] and "connection refused" in errors[0]
