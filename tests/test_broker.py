"""The local broker and the fedbus policy, checked against a real Mosquitto.

Tests marked ``broker`` start their own mosquitto on a free port (see conftest.py). Where
a test asserts that something is *not* delivered, a later message that the same client is
allowed to receive serves as a barrier: Mosquitto delivers in order, so once the barrier
arrives, the forbidden message would already have been there.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

import fedbus.broker
from broker_config import LISTENER_POLICY_FILE, POLICY_FILE
from fedbus.broker import (
    BrokerError,
    LocalBroker,
    default_device_ids,
    find_free_port,
    render_acl,
    render_config,
)
from fedbus.credentials import read_credentials
from fedbus.envelope import pack, unpack
from fedbus.errors import ConfigError
from fedbus.messages import Status
from fedbus.topics import Topics

if TYPE_CHECKING:
    from conftest import MqttClientFactory

TIMEOUT = 5.0
NOT_AUTHORIZED = 135  # MQTT v5 reason code 0x87


# -- helpers ------------------------------------------------------------------------------


class Inbox:
    """Messages one client receives, in arrival order."""

    def __init__(self) -> None:
        self._messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._messages.put(message)

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self._messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def pending(self) -> list[str]:
        """Topics of messages received but not yet taken (should usually be none)."""
        topics = []
        while not self._messages.empty():
            topics.append(self._messages.get_nowait().topic)
        return topics


def subscribe(client: mqtt.Client, topic: str) -> list[ReasonCode]:
    """Subscribe at QoS 1 and wait for the SUBACK; returns its reason codes."""
    done = threading.Event()
    codes: list[ReasonCode] = []

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                     properties: Any) -> None:
        codes.extend(reason_codes)
        done.set()

    client.on_subscribe = on_subscribe
    result, _ = client.subscribe(topic, qos=1)
    assert result == mqtt.MQTT_ERR_SUCCESS
    assert done.wait(TIMEOUT), f"no SUBACK for {topic}"
    return codes


def listen(client: mqtt.Client, *topics: str) -> Inbox:
    """A new inbox for ``client``, subscribed to ``topics`` (each must be granted)."""
    inbox = Inbox()
    client.on_message = inbox.on_message
    for topic in topics:
        codes = subscribe(client, topic)
        assert not any(code.is_failure for code in codes), codes
    return inbox


class Publisher:
    """QoS 1 publishes that wait for the PUBACK and return its reason code.

    paho's ``wait_for_publish`` reports success for any PUBACK, failures included, so the
    reason code is read in ``on_publish``.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        client.on_publish = self._on_publish

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._acks, TIMEOUT), "no PUBACK"
            return self._acks.pop(info.mid)

    def ok(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        reason = self.publish(topic, payload, retain=retain)
        assert not reason.is_failure, f"publish to {topic} failed: {reason}"


def connack(broker: LocalBroker, username: str | None, password: str | None) -> ReasonCode:
    """The CONNACK reason code for one connection attempt (no reconnects)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="probe",
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=False,
    )
    if username is not None:
        client.username_pw_set(username, password)
    answers: queue.Queue[ReasonCode] = queue.Queue()
    client.on_connect = lambda c, u, flags, reason, props: answers.put(reason)
    client.connect(broker.host, broker.port, keepalive=10)
    client.loop_start()
    try:
        return answers.get(timeout=TIMEOUT)
    finally:
        client.disconnect()
        client.loop_stop()


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- configuration, without a broker ------------------------------------------------------


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            found.setdefault(key, []).append(value.strip())
    return found


def test_default_device_ids() -> None:
    assert default_device_ids(3) == ["device-01", "device-02", "device-03"]
    assert default_device_ids(0) == []
    assert default_device_ids(100)[0] == "device-001"
    assert default_device_ids(100)[-1] == "device-100"


def test_policy_holds_the_settings_and_nothing_instance_specific() -> None:
    policy = _directives(POLICY_FILE.read_text())
    for key in ("listener", "port", "bind_address", "password_file", "acl_file",
                "persistence_location", "log_dest", "user", "include_dir",
                # per-listener: before any listener it would open a default one on 1883
                "use_username_as_clientid"):
        assert key not in policy, key
    assert policy["allow_anonymous"] == ["false"]
    assert policy["per_listener_settings"] == ["false"]
    assert policy["max_packet_size"] == ["8388608"]
    assert policy["persistence"] == ["true"]
    assert policy["max_queued_messages"] == ["10000"]
    assert policy["persistent_client_expiration"] == ["7d"]
    assert _directives(LISTENER_POLICY_FILE.read_text()) == {
        "use_username_as_clientid": ["true"]
    }


def test_render_config_puts_listener_settings_right_after_the_listener(tmp_path: Path) -> None:
    text = render_config(
        POLICY_FILE.read_text(), LISTENER_POLICY_FILE.read_text(),
        host="127.0.0.1", port=18830, plugin=tmp_path / "dynsec.so",
        dynsec_file=tmp_path / "dynsec.json", data_dir=tmp_path / "data",
        log_file=tmp_path / "mosquitto.log", run_as="root",
    )
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith("#")]
    at = lines.index("listener 18830 127.0.0.1")
    assert lines[at + 1] == "use_username_as_clientid true"
    assert lines.count("use_username_as_clientid true") == 1
    assert f"persistence_location {tmp_path / 'data'}/" in lines
    assert f"plugin {tmp_path / 'dynsec.so'}" in lines
    assert f"plugin_opt_config_file {tmp_path / 'dynsec.json'}" in lines
    assert lines[-1] == "user root"


def test_shipped_tls_listener_settings() -> None:
    from broker_config import MTLS_POLICY_FILE, TLS_POLICY_FILE

    assert _directives(TLS_POLICY_FILE.read_text()) == {
        "tls_version": ["tlsv1.2"], "require_certificate": ["false"],
    }
    assert _directives(MTLS_POLICY_FILE.read_text()) == {
        "tls_version": ["tlsv1.2"], "require_certificate": ["true"],
        "use_identity_as_username": ["true"],
    }


def test_render_config_gives_each_tls_listener_its_settings_and_files(tmp_path: Path) -> None:
    from broker_config import MTLS_POLICY_FILE, TLS_POLICY_FILE
    from fedbus.broker import TlsListeners

    tls = TlsListeners(port=18883, mtls_port=18884, ca_file=tmp_path / "ca.crt",
                       cert_file=tmp_path / "server.crt", key_file=tmp_path / "server.key",
                       tls_policy=TLS_POLICY_FILE.read_text(),
                       mtls_policy=MTLS_POLICY_FILE.read_text())
    text = render_config(
        POLICY_FILE.read_text(), LISTENER_POLICY_FILE.read_text(), host="0.0.0.0", port=None,
        plugin=tmp_path / "dynsec.so", dynsec_file=tmp_path / "dynsec.json",
        data_dir=tmp_path / "data", log_file=tmp_path / "mosquitto.log", tls=tls,
    )
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith("#")]
    assert [x for x in lines if x.startswith("listener")] == [
        "listener 18883 0.0.0.0", "listener 18884 0.0.0.0"]  # no plain listener
    files = [f"cafile {tmp_path / 'ca.crt'}", f"certfile {tmp_path / 'server.crt'}",
             f"keyfile {tmp_path / 'server.key'}"]
    at = lines.index("listener 18883 0.0.0.0")
    assert lines[at + 1:at + 7] == ["use_username_as_clientid true", "tls_version tlsv1.2",
                                    "require_certificate false", *files]
    at = lines.index("listener 18884 0.0.0.0")
    assert lines[at + 1:at + 8] == ["use_username_as_clientid true", "tls_version tlsv1.2",
                                    "require_certificate true",
                                    "use_identity_as_username true", *files]


def test_render_acl_default_prefix_is_the_shipped_file() -> None:
    from broker_config import ACL_FILE

    assert render_acl() == ACL_FILE.read_text()


def test_render_acl_replaces_the_prefix_in_rules_only() -> None:
    template = render_acl()
    acl = render_acl("lab/trial-7")
    rules = [x for x in acl.splitlines() if x.startswith(("topic", "pattern"))]
    assert rules == [
        "topic readwrite lab/trial-7/#",
        "topic write lab/trial-7/control",
        "topic read lab/trial-7/fleet",
        "topic read lab/trial-7/task",
        "topic read lab/trial-7/model",
        "topic read lab/trial-7/model/chunk/+",
        "topic read lab/trial-7/status/+",
        "topic deny lab/trial-7/update/fedbus-operator",
        "topic deny lab/trial-7/status/fedbus-operator",
        "pattern read lab/trial-7/task",
        "pattern read lab/trial-7/model",
        "pattern read lab/trial-7/model_delta",
        "pattern read lab/trial-7/model/chunk/+",
        "pattern read lab/trial-7/receipt/%u",
        "pattern write lab/trial-7/update/%u",
        "pattern readwrite lab/trial-7/status/%u",
    ]
    comments = [x for x in acl.splitlines() if x.startswith("#")]
    assert comments == [x for x in template.splitlines() if x.startswith("#")]
    assert "user coordinator" in acl.splitlines()
    # a prefix that merely starts with the same letters is left alone
    assert render_acl("x", "pattern read fedbusy/task\n") == "pattern read fedbusy/task\n"


@pytest.mark.parametrize("prefix", ["", "a/#", "two words", "a/+/b", "/lead"])
def test_render_acl_rejects_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ConfigError):
        render_acl(prefix)


@pytest.mark.parametrize(
    "ids", [["ok", "not ok"], ["coordinator"], ["dev-a", "dev-a"], ["a/b"], ["%u"]]
)
def test_local_broker_rejects_bad_device_ids(tmp_path: Path, ids: list[str]) -> None:
    with pytest.raises(ConfigError):
        LocalBroker(tmp_path, device_ids=ids)


def test_missing_mosquitto_is_a_one_line_config_error(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path, device_ids=["dev-a"], mosquitto="fedbus-no-such-mosquitto")
    with pytest.raises(ConfigError) as caught:
        broker.start()
    assert str(caught.value) == (
        "fedbus-no-such-mosquitto not found: install the Debian package 'mosquitto' "
        "(make setup does this)"
    )


# -- life cycle ---------------------------------------------------------------------------


@pytest.mark.broker
def test_start_and_stop(broker: LocalBroker) -> None:
    pid = broker.pid
    assert pid is not None and process_exists(pid)
    assert broker.port > 0 and accepts_connections(broker.host, broker.port)
    broker.stop()
    assert broker.pid is None and not broker.running
    assert not process_exists(pid)
    assert not accepts_connections(broker.host, broker.port)
    broker.stop()  # idempotent


@pytest.mark.broker
def test_context_manager_stops_the_broker(tmp_path: Path) -> None:
    with LocalBroker(tmp_path, device_ids=["dev-a"]) as local:
        pid = local.pid
        assert pid is not None and process_exists(pid)
    assert not process_exists(pid)


@pytest.mark.broker
def test_credentials_file_is_private_and_readable_by_the_clients(broker: LocalBroker) -> None:
    path = broker.credentials_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert (data["host"], data["port"], data["prefix"]) == ("127.0.0.1", broker.port, "fedbus")
    assert data["coordinator"] == {"username": "coordinator",
                                   "password": broker.coordinator.password,
                                   "cert_file": "tls/clients/coordinator.crt",
                                   "key_file": "tls/clients/coordinator.key",
                                   "signing_key_file": "signing/coordinator.key"}
    # the signing key: private, made once; devices get its public key
    key_file = broker.workdir / "signing" / "coordinator.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert data["coordinator_key"] == broker.coordinator_key
    assert data["coordinator_key"].startswith("ed25519:")
    assert (broker.workdir / "signing" / "coordinator.pub").read_text().strip() == (
        broker.coordinator_key)
    assert "signing_key_file" not in data["devices"]["dev-a"]
    assert data["tls"] == {"port": broker.tls_port, "mtls_port": broker.mtls_port,
                           "ca_file": "tls/ca.crt"}
    assert sorted(data["devices"]) == ["dev-a", "dev-b", "dev-c"]
    access = read_credentials(path, "dev-b")
    assert (access.port, access.password) == (broker.port, broker.devices["dev-b"].password)
    assert (access.tls_port, access.mtls_port) == (broker.tls_port, broker.mtls_port)
    assert access.ca_file == broker.ca_file
    assert access.cert_file == broker.client_certificate("dev-b")[0]
    assert access.coordinator_key == broker.coordinator_key
    assert access.signing_key_file is None
    assert read_credentials(path, "coordinator").signing_key_file == key_file
    # the plugin's file holds hashes only
    accounts = broker.dynsec_file.read_text()
    assert broker.devices["dev-b"].password not in accounts
    assert broker.admin.password not in accounts
    assert stat.S_IMODE(broker.dynsec_file.stat().st_mode) == 0o600


@pytest.mark.broker
def test_a_new_broker_on_the_same_directory_keeps_the_passwords(broker: LocalBroker) -> None:
    again = LocalBroker(broker.workdir, device_ids=["dev-a", "dev-new"])
    assert again.coordinator == broker.coordinator
    assert again.devices["dev-a"] == broker.devices["dev-a"]
    assert again.devices["dev-new"].password not in {
        c.password for c in broker.devices.values()
    }


@pytest.mark.broker
def test_taken_port_is_reported(broker: LocalBroker, tmp_path: Path) -> None:
    other = LocalBroker(tmp_path / "other", device_ids=["dev-a"], port=broker.port)
    with pytest.raises(ConfigError, match="already in use by another program; nothing was "
                       "written"):
        other.start()
    assert other.pid is None
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["broker.lock"]


@pytest.mark.broker
def test_a_raced_free_port_is_replaced(broker: LocalBroker, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    offered = [broker.port]  # first offer: a port another broker holds by now

    def racy_free_port(host: str = "127.0.0.1") -> int:
        return offered.pop() if offered else find_free_port(host)

    monkeypatch.setattr(fedbus.broker, "find_free_port", racy_free_port)
    with LocalBroker(tmp_path / "other", device_ids=["dev-a"]) as other:
        assert other.port not in (0, broker.port)
        assert connack(other, "dev-a", other.devices["dev-a"].password).value == 0


@pytest.mark.broker
def test_start_failure_shows_mosquittos_log(tmp_path: Path) -> None:
    # TEST-NET-1 is never a local address: mosquitto cannot bind and exits.
    local = LocalBroker(tmp_path, device_ids=["dev-a"], host="192.0.2.1",
                        tls_port=find_free_port(), mtls_port=find_free_port())
    with pytest.raises(BrokerError) as caught:
        local.start()
    message = str(caught.value)
    assert "exited with code" in message
    assert "Cannot assign requested address" in message
    assert local.pid is None


# -- authentication -----------------------------------------------------------------------


@pytest.mark.broker
def test_anonymous_connection_is_refused(broker: LocalBroker) -> None:
    assert connack(broker, None, None).value == NOT_AUTHORIZED


@pytest.mark.broker
def test_wrong_password_is_refused(broker: LocalBroker) -> None:
    assert connack(broker, "dev-a", "not-the-password").value == NOT_AUTHORIZED
    assert connack(broker, "dev-a", broker.devices["dev-b"].password).value == NOT_AUTHORIZED
    assert connack(broker, "dev-a", broker.devices["dev-a"].password).value == 0


@pytest.mark.broker
def test_client_id_is_the_username(broker: LocalBroker, mqtt_client: MqttClientFactory) -> None:
    """dev-b claiming dev-a's client id must not take over dev-a's session."""
    dev_a = mqtt_client(broker, "dev-a")
    drops: list[Any] = []
    dev_a.on_disconnect = lambda *args: drops.append(args)
    mqtt_client(broker, "dev-b", client_id="dev-a")
    Publisher(dev_a).ok(Topics().status("dev-a"), b"still here")  # round trip on dev-a
    assert drops == []


# -- access control -----------------------------------------------------------------------


@pytest.mark.broker
def test_device_update_reaches_the_coordinator(broker: LocalBroker,
                                               mqtt_client: MqttClientFactory) -> None:
    topics = broker.topics
    inbox = listen(mqtt_client(broker, "coordinator"), topics.all_updates)
    Publisher(mqtt_client(broker, "dev-a")).ok(topics.update("dev-a"), b"delta")
    message = inbox.get()
    assert (message.topic, message.payload) == (topics.update("dev-a"), b"delta")


@pytest.mark.broker
def test_device_cannot_publish_as_another_device(broker: LocalBroker,
                                                 mqtt_client: MqttClientFactory) -> None:
    topics = broker.topics
    inbox = listen(mqtt_client(broker, "coordinator"), topics.all_updates, topics.all_status)
    dev_a = Publisher(mqtt_client(broker, "dev-a"))
    assert dev_a.publish(topics.update("dev-b"), b"forged").value == NOT_AUTHORIZED
    assert dev_a.publish(topics.status("dev-b"), b"forged").value == NOT_AUTHORIZED
    dev_a.ok(topics.update("dev-a"), b"barrier")
    message = inbox.get()
    assert (message.topic, message.payload) == (topics.update("dev-a"), b"barrier")
    assert inbox.pending() == []


@pytest.mark.broker
def test_device_cannot_overwrite_task_or_model(broker: LocalBroker,
                                               mqtt_client: MqttClientFactory) -> None:
    topics = broker.topics
    coordinator = Publisher(mqtt_client(broker, "coordinator"))
    coordinator.ok(topics.task, b"task-1", retain=True)
    coordinator.ok(topics.model, b"model-v1", retain=True)
    coordinator.ok(topics.model_chunk(1), b"chunk-1", retain=True)  # revision 2.6
    dev_a = Publisher(mqtt_client(broker, "dev-a"))
    assert dev_a.publish(topics.model, b"evil", retain=True).value == NOT_AUTHORIZED
    assert dev_a.publish(topics.task, b"evil", retain=True).value == NOT_AUTHORIZED
    assert dev_a.publish(topics.model_chunk(1), b"evil", retain=True).value == NOT_AUTHORIZED

    inbox = listen(mqtt_client(broker, "dev-b"), topics.model, topics.task,
                   topics.model_chunks)
    retained = {m.topic: (m.payload, m.retain) for m in (inbox.get(), inbox.get(), inbox.get())}
    assert retained == {topics.model: (b"model-v1", True), topics.task: (b"task-1", True),
                        topics.model_chunk(1): (b"chunk-1", True)}


@pytest.mark.broker
def test_device_receives_only_its_own_receipts(broker: LocalBroker,
                                               mqtt_client: MqttClientFactory) -> None:
    topics = broker.topics
    dev_a_inbox = listen(mqtt_client(broker, "dev-a"), topics.receipt("dev-a"))
    # The dynamic-security plugin refuses these subscriptions in the SUBACK (the ACL file
    # of Mosquitto 2.0.11 granted them and filtered each message instead).
    dev_b = mqtt_client(broker, "dev-b")
    dev_b_inbox = Inbox()
    dev_b.on_message = dev_b_inbox.on_message
    for topic in (topics.receipt("dev-a"), f"{topics.prefix}/receipt/+", f"{topics.prefix}/#"):
        assert [c.value for c in subscribe(dev_b, topic)] == [NOT_AUTHORIZED], topic
    assert not subscribe(dev_b, topics.receipt("dev-b"))[0].is_failure

    coordinator = Publisher(mqtt_client(broker, "coordinator"))
    coordinator.ok(topics.receipt("dev-a"), b"for dev-a")
    coordinator.ok(topics.update("dev-a"), b"an update, not for dev-b either")
    coordinator.ok(topics.receipt("dev-b"), b"for dev-b")  # the barrier

    assert dev_a_inbox.get().payload == b"for dev-a"
    seen = dev_b_inbox.get()
    assert (seen.topic, seen.payload) == (topics.receipt("dev-b"), b"for dev-b")
    # anything else would have arrived before the barrier
    assert dev_b_inbox.pending() == []


# -- presence and persistence -------------------------------------------------------------

_DEVICE_SCRIPT = """
import os
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

user = os.environ["DEVICE"]
client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=user,
                     protocol=MQTTProtocolVersion.MQTTv5)
client.username_pw_set(user, os.environ["PASSWORD"])
client.will_set(os.environ["WILL_TOPIC"], bytes.fromhex(os.environ["WILL_HEX"]), qos=1,
                retain=True)
client.on_connect = lambda c, u, f, reason, p: print(reason, flush=True)
durable = Properties(PacketTypes.CONNECT)  # a durable session, as the agent uses
durable.SessionExpiryInterval = 3600
client.connect(os.environ["HOST"], int(os.environ["PORT"]), keepalive=30, clean_start=False,
               properties=durable)
client.loop_forever()
"""


def _start_device_process(broker: LocalBroker, device: str,
                          will: bytes) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DEVICE": device,
        "PASSWORD": broker.devices[device].password,
        "WILL_TOPIC": broker.topics.status(device),
        "WILL_HEX": will.hex(),
        "HOST": broker.host,
        "PORT": str(broker.port),
    }
    return subprocess.Popen([sys.executable, "-c", _DEVICE_SCRIPT], env=env,
                            stdout=subprocess.PIPE)


@pytest.mark.broker
def test_last_will_reaches_the_coordinator_when_a_device_dies(
    broker: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    topics = broker.topics
    inbox = listen(mqtt_client(broker, "coordinator"), topics.all_status)
    will = pack(Status("dev-a", "offline", ts=1.0).to_wire())
    device = _start_device_process(broker, "dev-a", will)
    try:
        assert _read_until(device, "\n").strip() == "Success"  # its CONNACK
        device.kill()  # no DISCONNECT: the broker only sees the socket close
        device.wait(TIMEOUT)
    finally:
        _stop_process(device)
    message = inbox.get()
    assert message.topic == topics.status("dev-a")
    status = Status.from_wire(unpack(message.payload, kind="status"))
    assert (status.device_id, status.state) == ("dev-a", "offline")
    # retained, so a coordinator that starts later still learns it
    later = listen(mqtt_client(broker, "dev-a"), topics.status("dev-a")).get()
    assert (later.payload, later.retain) == (will, True)


@pytest.mark.broker
def test_restart_keeps_retained_messages(broker: LocalBroker,
                                         mqtt_client: MqttClientFactory) -> None:
    topics = broker.topics
    coordinator = mqtt_client(broker, "coordinator")
    Publisher(coordinator).ok(topics.model, b"model-v7", retain=True)
    coordinator.disconnect()
    coordinator.loop_stop()
    pid, port, key = broker.pid, broker.port, broker.coordinator_key

    broker.restart()

    assert broker.pid != pid and broker.port == port
    assert broker.coordinator_key == key  # made once: devices keep trusting it
    message = listen(mqtt_client(broker, "dev-a"), topics.model).get()
    assert (message.payload, message.retain) == (b"model-v7", True)


@pytest.mark.broker
def test_restart_keeps_durable_sessions_and_their_queue(
    broker: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    topics = broker.topics
    durable = {"clean_start": False, "session_expiry": 3600}
    device = mqtt_client(broker, "dev-a", **durable)
    subscribe(device, topics.receipt("dev-a"))
    device.disconnect()
    device.loop_stop()
    coordinator = mqtt_client(broker, "coordinator")
    Publisher(coordinator).ok(topics.receipt("dev-a"), b"queued while away")
    coordinator.disconnect()
    coordinator.loop_stop()

    broker.restart()

    inbox = Inbox()
    mqtt_client(broker, "dev-a", on_message=inbox.on_message, **durable)  # no new SUBSCRIBE
    assert inbox.get().payload == b"queued while away"


@pytest.mark.broker
def test_kill_loses_what_was_not_saved_yet(broker: LocalBroker,
                                           mqtt_client: MqttClientFactory) -> None:
    """kill() is a crash: the retained model since the last autosave (60 s) is gone."""
    topics = broker.topics
    coordinator = mqtt_client(broker, "coordinator")
    Publisher(coordinator).ok(topics.model, b"model-v1", retain=True)
    coordinator.disconnect()
    coordinator.loop_stop()

    broker.kill()
    broker.start()

    device = mqtt_client(broker, "dev-a")
    inbox = listen(device, topics.model, topics.task)
    Publisher(mqtt_client(broker, "coordinator")).ok(topics.task, b"barrier")
    assert inbox.get().payload == b"barrier"


# -- the command --------------------------------------------------------------------------

_RUN_COMMAND = "from fedbus.cli.broker import command; command()"


@pytest.mark.broker
def test_broker_command_runs_until_interrupted(tmp_path: Path) -> None:
    workdir = tmp_path / "trial"
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_COMMAND, "--dir", str(workdir), "--device-id", "pi-1",
         "--device-id", "pi-2", "--prefix", "lab/t1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        summary = _read_until(proc, "Press Ctrl-C")
        pid = int(summary.split("mosquitto pid ", 1)[1].split(")", 1)[0])
        assert process_exists(pid)
        access = read_credentials(workdir / "credentials.json", "pi-2")
        assert access.prefix == "lab/t1" and f"ports {access.port} (plain MQTT)" in summary
        assert f"{access.tls_port} (TLS), {access.mtls_port} (mutual TLS)" in summary
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
    finally:
        _stop_process(proc)
    assert not process_exists(pid)


def _read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float = 10.0) -> str:
    """What ``proc`` printed up to and including ``marker`` (raw reads: no buffering)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while marker.encode() not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        assert chunk, f"process ended or stalled before printing {marker!r}:\n{data.decode()}"
        data += chunk
    return data.decode()


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM first, so a command can stop what it started; SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
