"""fedbus.transport against real sockets: failures that speak, with their causes as data."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from fedbus.broker import LocalBroker, find_free_port
from fedbus.errors import BrokerUnreachable, ConnectTimeout, MessageTooLarge, NotMqtt
from fedbus.transport import ConnectionSettings, MqttClient, connect_timeout_error


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
