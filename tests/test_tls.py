"""TLS and mutual TLS against a real Mosquitto (the listeners LocalBroker opens).

Clients are fedbus's own transport (``MqttClient``), so each refusal is also checked for the
typed error it produces. Where the broker must refuse something our client would not even
try (an expired client certificate), a raw TLS socket speaks to it.
"""

from __future__ import annotations

import datetime as dt
import queue
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from inmemory import wait_for

from fedbus import pki
from fedbus.broker import LocalBroker
from fedbus.datasets import load_digits, write_npz
from fedbus.errors import ConfigError, NotMqtt, TlsError
from fedbus.processes import Child, ChildGroup
from fedbus.tls import TlsSettings
from fedbus.transport import ConnectionSettings, Message, MqttClient

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    from conftest import MqttClientFactory

pytestmark = pytest.mark.broker

TIMEOUT = 5.0
NOT_AUTHORIZED = 0x87


@pytest.fixture
def clients() -> Iterator[Callable[..., MqttClient]]:
    """``connect(broker_or_host, port, username, password, tls=..., client_id=...)``: a started
    MqttClient (not waited for); every one is stopped at teardown."""
    started: list[MqttClient] = []

    def connect(host: str, port: int, username: str, password: str = "", *,
                tls: TlsSettings | None, client_id: str | None = None,
                on_message: Callable[[Message], None] = lambda m: None) -> MqttClient:
        client = MqttClient(
            ConnectionSettings(host, port, client_id or username, username, password,
                               reconnect_max=2.0, connack_timeout=3.0, tls=tls),
            on_message=on_message,
        )
        started.append(client)
        client.start()
        return client

    yield connect
    for client in started:
        client.stop()


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A directory with a CA that is not the broker's."""
    pki.ensure_ca(tmp_path / "other-ca", common_name="someone else's CA")
    return tmp_path / "other-ca"


def _fatal(client: MqttClient) -> TlsError:
    wait_for(lambda: client.fatal is not None, TIMEOUT, "a fatal error")
    assert not client.connected
    assert isinstance(client.fatal, TlsError)
    return client.fatal


def _attempts_failed(client: MqttClient) -> BaseException:
    wait_for(lambda: client.last_error is not None, TIMEOUT, "a failed attempt")
    assert not client.connected
    assert client.fatal is None  # retried, not given up
    assert client.last_error is not None
    return client.last_error


# -- server verification ------------------------------------------------------------------------


def test_password_login_over_tls_works(broker: LocalBroker, clients,
                                       mqtt_client: MqttClientFactory) -> None:
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    mqtt_client(broker, "coordinator", on_message=lambda c, u, m: inbox.put(m)).subscribe(
        "fedbus/update/#", qos=1)
    device = clients(broker.host, broker.tls_port, "dev-a", broker.devices["dev-a"].password,
                     tls=TlsSettings(ca_file=broker.ca_file))
    assert device.wait_connected(TIMEOUT), device.last_error
    assert device.publish("fedbus/update/dev-a", b"over tls").wait(TIMEOUT)
    msg = inbox.get(timeout=TIMEOUT)
    assert (msg.topic, msg.payload) == ("fedbus/update/dev-a", b"over tls")


def test_a_wrong_password_over_tls_is_still_refused(broker: LocalBroker, clients) -> None:
    device = clients(broker.host, broker.tls_port, "dev-a", "wrong",
                     tls=TlsSettings(ca_file=broker.ca_file))
    wait_for(lambda: device.fatal is not None, TIMEOUT, "a refused login")
    assert getattr(device.fatal, "reason_code", None) == NOT_AUTHORIZED


def test_a_client_that_trusts_another_ca_is_refused(broker: LocalBroker, clients,
                                                    other_ca: Path) -> None:
    device = clients(broker.host, broker.tls_port, "dev-a", broker.devices["dev-a"].password,
                     tls=TlsSettings(ca_file=other_ca / pki.CA_CERT_FILE))
    error = _fatal(device)
    assert error.reason == "unknown_ca" and error.port == broker.tls_port
    assert "not signed by a CA we trust" in str(error)


def test_a_host_name_the_certificate_does_not_list_is_refused(tmp_path: Path, clients) -> None:
    # Every interface: no plain MQTT listener then, and the certificate names loopback and
    # broker.test only, so 127.0.0.2 (which reaches the same socket) does not match.
    with LocalBroker(tmp_path / "b", device_ids=["dev-a"], host="0.0.0.0",
                     tls_names=["broker.test"]) as wide:
        assert not wide.plaintext
        assert "listener" not in _plain_listener_lines(wide.config_file.read_text())
        tls = TlsSettings(ca_file=wide.ca_file)
        password = wide.devices["dev-a"].password
        good = clients("127.0.0.1", wide.tls_port, "dev-a", password, tls=tls)
        assert good.wait_connected(TIMEOUT), good.last_error
        good.stop()
        device = clients("127.0.0.2", wide.tls_port, "dev-a", password, tls=tls)
        error = _fatal(device)
        assert error.reason == "hostname_mismatch"
        assert "127.0.0.2" in error.detail


def _plain_listener_lines(config: str) -> str:
    """The instance's listener lines not followed by TLS settings."""
    lines = [x for x in config.splitlines() if x.strip() and not x.startswith("#")]
    plain = []
    for i, line in enumerate(lines):
        if line.startswith("listener ") and not any(
            x.startswith("tls_version") for x in lines[i + 1:i + 4]
        ):
            plain.append(line)
    return "\n".join(plain)


def test_a_broker_beyond_loopback_opens_no_plain_port_unless_asked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no plain listener"):
        LocalBroker(tmp_path, device_ids=["dev-a"], host="0.0.0.0", port=1883)
    assert LocalBroker(tmp_path, device_ids=["dev-a"], host="0.0.0.0", plaintext=True).plaintext
    assert LocalBroker(tmp_path, device_ids=["dev-a"]).plaintext


# -- plain MQTT and TLS on each other's ports ---------------------------------------------------


def test_cleartext_mqtt_on_the_tls_port_is_refused(broker: LocalBroker, clients) -> None:
    for port in (broker.tls_port, broker.mtls_port):
        plain = clients(broker.host, port, "dev-a", broker.devices["dev-a"].password, tls=None)
        error = _attempts_failed(plain)
        assert isinstance(error, NotMqtt)
        assert plain.connects == 0


def test_tls_to_a_plain_mqtt_port_is_named(broker: LocalBroker, clients) -> None:
    device = clients(broker.host, broker.port, "dev-a", broker.devices["dev-a"].password,
                     tls=TlsSettings(ca_file=broker.ca_file))
    error = _attempts_failed(device)
    assert isinstance(error, TlsError) and error.reason == "closed"
    assert "is this a TLS port" in str(error)


# -- mutual TLS ---------------------------------------------------------------------------------


def _mtls(broker: LocalBroker, username: str) -> TlsSettings:
    cert, key = broker.client_certificate(username)
    return TlsSettings(ca_file=broker.ca_file, cert_file=cert, key_file=key)


def test_an_mtls_device_writes_only_its_own_update_topic(
    broker: LocalBroker, clients, mqtt_client: MqttClientFactory
) -> None:
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    mqtt_client(broker, "coordinator", on_message=lambda c, u, m: inbox.put(m)).subscribe(
        "fedbus/update/#", qos=1)
    # dev-a's certificate; the CONNECT claims to be dev-b, with no password: the broker
    # takes the name from the certificate and ignores the rest
    device = clients(broker.host, broker.mtls_port, "dev-b", "", client_id="dev-b",
                     tls=_mtls(broker, "dev-a"))
    assert device.wait_connected(TIMEOUT), device.last_error
    for topic in ("fedbus/update/dev-b", "fedbus/status/dev-b", "fedbus/model"):
        foreign = device.publish(topic, b"forged")
        assert not foreign.wait(TIMEOUT), topic
        assert foreign.reason_code == NOT_AUTHORIZED, topic
    own = device.publish("fedbus/update/dev-a", b"mine")  # the barrier
    assert own.wait(TIMEOUT)
    msg = inbox.get(timeout=TIMEOUT)
    assert (msg.topic, msg.payload) == ("fedbus/update/dev-a", b"mine")
    assert inbox.empty()


def test_an_unknown_client_certificate_is_refused(broker: LocalBroker, clients,
                                                  other_ca: Path) -> None:
    ca = pki.load_ca(other_ca)
    cert, key = other_ca / "dev-a.crt", other_ca / "dev-a.key"
    pki.issue_client_certificate(ca, "dev-a", cert, key)  # right name, wrong CA
    device = clients(broker.host, broker.mtls_port, "dev-a", tls=TlsSettings(
        ca_file=broker.ca_file, cert_file=cert, key_file=key))
    error = _fatal(device)
    assert error.reason == "certificate_refused"
    assert "refused our client certificate" in str(error)
    assert device.connects == 0


def test_no_client_certificate_on_the_mtls_port_is_refused(broker: LocalBroker,
                                                           clients) -> None:
    device = clients(broker.host, broker.mtls_port, "dev-a", broker.devices["dev-a"].password,
                     tls=TlsSettings(ca_file=broker.ca_file))
    wait_for(lambda: device.last_error is not None, TIMEOUT, "a failed attempt")
    error = device.last_error
    # With TLS 1.3 the broker's refusal arrives after the client's handshake: as the alert
    # "certificate required" (fatal), or as a closed connection if the client reads after
    # the broker has gone (retried); both name the cause.
    assert isinstance(error, TlsError) and error.reason in ("certificate_refused", "closed")
    assert "wants a client certificate" in str(error)
    assert device.connects == 0


# A minimal MQTT v5 CONNECT: client id "dev-a", keepalive 60, no properties.
_CONNECT = bytes([0x10, 18, 0, 4, *b"MQTT", 5, 0x02, 0, 60, 0, 0, 5, *b"dev-a"])


def _raw_mtls_connect(port: int, ca_file: Path, cert: Path, key: Path) -> bytes | OSError:
    """What the broker answers to a CONNECT over TLS with this client certificate: the
    first bytes it sends, or the error that ended the connection."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(_CONNECT)
                return tls.recv(4)
        except OSError as exc:
            return exc


def test_an_expired_client_certificate_is_refused(broker: LocalBroker, tmp_path: Path) -> None:
    ca = pki.load_ca(broker.tls_dir)
    cert, key = tmp_path / "old.crt", tmp_path / "old.key"
    pki.issue_client_certificate(ca, "dev-a", cert, key, days=1,
                                 now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    answer = _raw_mtls_connect(broker.mtls_port, broker.ca_file, cert, key)
    assert not (isinstance(answer, bytes) and answer[:1] == b"\x20"), "got a CONNACK"
    # the same request with the device's valid certificate is answered with a CONNACK
    good_cert, good_key = broker.client_certificate("dev-a")
    answer = _raw_mtls_connect(broker.mtls_port, broker.ca_file, good_cert, good_key)
    assert isinstance(answer, bytes) and answer[:1] == b"\x20"
    # and fedbus's own client does not even try with the expired one
    with pytest.raises(ConfigError, match="expired on"):
        MqttClient(ConnectionSettings(broker.host, broker.mtls_port, "dev-a", "dev-a", "",
                                      tls=TlsSettings(broker.ca_file, cert, key)),
                   on_message=lambda m: None)


# -- end to end ---------------------------------------------------------------------------------


def test_agents_and_coordinator_complete_a_version_over_tls(broker: LocalBroker,
                                                            tmp_path: Path) -> None:
    """Real processes with nothing but --credentials (TLS by default) and, for one agent,
    its client certificate (mTLS) instead of its password."""
    x, y = load_digits()
    data = {}
    for i, device in enumerate(("dev-a", "dev-b")):
        data[device] = tmp_path / f"{device}.npz"
        write_npz(data[device], x[i * 200:(i + 1) * 200], y[i * 200:(i + 1) * 200])
    write_npz(tmp_path / "test.npz", x[-300:], y[-300:])
    creds = str(broker.credentials_file)
    cert, key = broker.client_certificate("dev-b")
    with ChildGroup() as group:
        coordinator = group.add(Child(
            [sys.executable, "-m", "fedbus", "coordinator", "--credentials", creds,
             "--state-dir", str(tmp_path / "run"), "--buffer-size", "2", "--epochs", "1",
             "--min-devices", "2",
             "--max-versions", "1", "--duration", "60",
             "--eval-data", str(tmp_path / "test.npz")],
            log_path=tmp_path / "coordinator.log", name="coordinator",
        ))
        for device, extra in (("dev-a", []), ("dev-b", ["--tls-cert", str(cert),
                                                       "--tls-key", str(key)])):
            group.add(Child(
                [sys.executable, "-m", "fedbus", "agent", "--device-id", device,
                 "--data", str(data[device]), "--credentials", creds,
                 "--state-dir", str(tmp_path / device), "--on-run-end", "exit", *extra],
                log_path=tmp_path / f"{device}.log", name=f"agent {device}",
            ))
        assert coordinator.wait(60, "one model version") == 0
    log = (tmp_path / "coordinator.log").read_text()
    assert f"connected to 127.0.0.1:{broker.tls_port} as coordinator" in log
    done = re.search(r"done \(reached 1 model versions\): 1 versions, .* (\d+) updates accepted, "
                     r"(\d+) rejected", log)
    assert done and int(done.group(1)) >= 2, log  # K=2: one update from each device at least
    # an update still in flight when the version is made is refused because the run ended
    reasons = re.findall(r"rejected update \S+ from \S+: (\w+)", log)
    assert len(reasons) == int(done.group(2)) and set(reasons) <= {"run_ended"}, log
    for device, port in (("dev-a", broker.tls_port), ("dev-b", broker.mtls_port)):
        agent_log = (tmp_path / f"{device}.log").read_text()
        assert f"connected to 127.0.0.1:{port} as {device}" in agent_log
        assert re.search(r"done: \d+ updates published, [1-9]\d* accepted", agent_log)


# -- what a user sees ----------------------------------------------------------------------------


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_an_agent_that_trusts_another_ca_exits_with_one_line(
    broker: LocalBroker, other_ca: Path, tmp_path: Path
) -> None:
    x, y = load_digits()
    write_npz(tmp_path / "d.npz", x[:50], y[:50])
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "agent", "--device-id", "dev-a",
         "--data", str(tmp_path / "d.npz"), "--credentials", str(broker.credentials_file),
         "--tls-ca", str(other_ca / pki.CA_CERT_FILE), "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "not signed by a CA we trust" in lines[0], result.stderr
    assert f":{broker.tls_port}" in lines[0]


def test_plain_mqtt_to_another_host_is_one_config_error_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "coordinator", "--host", "broker.example",
         "--no-tls", "--password", "x", "--state-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "--insecure-plaintext" in lines[0], result.stderr
