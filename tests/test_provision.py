"""Live device provisioning: Mosquitto's dynamic-security plugin, ``fedbus devices`` and the
credentials bundle.

Pure parts first (password hashes, roles, answers, bundles), then a real Mosquitto 2.0.11
with the project's own configuration on free ports (the ``broker`` fixture): devices added,
disabled, enabled and removed while other sessions stay up, the ACL guarantees for a device
added on the fly, files written once, and one end-to-end run with real processes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import re
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fedbus import dynsec
from fedbus.broker import LocalBroker
from fedbus.cli._options import load_process_config
from fedbus.credentials import (
    BrokerAddress,
    bundle_device,
    bundle_document,
    read_credentials,
    write_bundle,
)
from fedbus.datasets import load_digits, write_npz
from fedbus.dynsec import DynsecError
from fedbus.errors import ConfigError, ConnectRefused
from fedbus.processes import Child, ChildGroup
from fedbus.provision import DynsecAdmin, admin_settings
from fedbus.signing import DEVICE_KEYS_FILE, key_text, load_private_key, parse_device_keys
from fedbus.tls import TlsSettings
from fedbus.transport import ConnectionSettings, Message, MqttClient

NOT_AUTHORIZED = 0x87
ADMINISTRATIVE_ACTION = 0x98
TIMEOUT = 10.0


# -- pure: passwords, roles, answers ------------------------------------------------------------


def test_password_hash_is_the_one_mosquitto_ctrl_writes() -> None:
    # `mosquitto_ctrl dynsec init f.json admin secretpw` (2.0.11) wrote this salt and hash
    fields = dynsec.hash_password("secretpw", salt=bytes.fromhex("31d0657fd3014c1710b2f720"))
    assert fields == {
        "password": "MC2/tLKOQLQ5cLGrSwnAatPNBnyxIMAMZv6YYcpRm7C2Ez8pxKsUtNKBudz4JtbrrUqCtUd64YF"
                    "noAg2399mhQ==",
        "salt": "MdBlf9MBTBcQsvcg",
        "iterations": 101,
    }


def test_device_role_is_the_acl_file_for_one_device() -> None:
    role = dynsec.device_role("lab/t7", "dev-a")
    assert role["rolename"] == "fedbus-device-dev-a"
    rows = {(a["acltype"], a["topic"]) for a in role["acls"]}
    assert all(a["allow"] for a in role["acls"])
    assert rows == {
        ("publishClientSend", "lab/t7/update/dev-a"),
        ("publishClientSend", "lab/t7/status/dev-a"),
        ("publishClientReceive", "lab/t7/task"), ("subscribeLiteral", "lab/t7/task"),
        ("publishClientReceive", "lab/t7/model"), ("subscribeLiteral", "lab/t7/model"),
        # the chunks of a model over the broker's packet limit (revision 2.6)
        ("publishClientReceive", "lab/t7/model/chunk/+"),
        ("subscribePattern", "lab/t7/model/chunk/+"),
        ("publishClientReceive", "lab/t7/model_delta"),
        ("subscribeLiteral", "lab/t7/model_delta"),
        ("publishClientReceive", "lab/t7/receipt/dev-a"),
        ("subscribeLiteral", "lab/t7/receipt/dev-a"),
        ("publishClientReceive", "lab/t7/status/dev-a"),
        ("subscribeLiteral", "lab/t7/status/dev-a"),
    }


def test_initial_config_denies_by_default_and_stores_no_password() -> None:
    config = dynsec.initial_config("fedbus", admin_password="pa", coordinator_password="pc",
                                   devices={"dev-a": "p1"})
    assert config["defaultACLAccess"] == {"publishClientSend": False,
                                          "publishClientReceive": False, "subscribe": False,
                                          "unsubscribe": True}
    roles = {c["username"]: [r["rolename"] for r in c["roles"]] for c in config["clients"]}
    assert roles == {"fedbus-admin": ["fedbus-admin"], "coordinator": ["fedbus-coordinator"],
                     "dev-a": ["fedbus-device-dev-a"]}
    text = json.dumps(config)
    assert '"p1"' not in text and '"pa"' not in text
    with pytest.raises(ValueError, match="reserved"):
        dynsec.initial_config("fedbus", admin_password="a", coordinator_password="c",
                              devices={"fedbus-admin": "x"})


def test_answers_are_matched_by_correlation_and_refusals_raise() -> None:
    payload = dynsec.encode_commands([{"command": "a"}, {"command": "b"}], "tag")
    sent = json.loads(payload)["commands"]
    assert [c["correlationData"] for c in sent] == ["tag:0", "tag:1"]
    ok = json.dumps({"responses": [{"command": "a", "correlationData": "tag:0"},
                                   {"command": "b", "correlationData": "tag:1"}]}).encode()
    assert [r["command"] for r in dynsec.read_responses(ok, "tag", 2) or []] == ["a", "b"]
    other = json.dumps({"responses": [{"command": "a", "correlationData": "else:0"}]}).encode()
    assert dynsec.read_responses(other, "tag", 1) is None
    refused = json.dumps({"responses": [
        {"command": "deleteClient", "error": "Client not found", "correlationData": "tag:0"}]})
    with pytest.raises(DynsecError, match="deleteClient: Client not found"):
        dynsec.read_responses(refused.encode(), "tag", 1)
    with pytest.raises(DynsecError, match="unreadable"):
        dynsec.read_responses(b"not json", "tag", 1)


def test_listed_devices_are_enabled_only_with_their_role() -> None:
    answer = {"data": {"clients": [
        {"username": "fedbus-admin", "roles": [{"rolename": "fedbus-admin"}]},
        {"username": "coordinator", "roles": [{"rolename": "fedbus-coordinator"}]},
        {"username": "b", "roles": [{"rolename": "fedbus-device-b"}]},
        {"username": "a", "roles": [], "disabled": True},
        {"username": "c", "roles": [{"rolename": "fedbus-device-c"}], "disabled": True},
    ]}}
    assert dynsec.devices_from_list(answer) == [
        dynsec.DeviceEntry("a", False), dynsec.DeviceEntry("b", True),
        dynsec.DeviceEntry("c", False)]


# -- pure-ish: the bundle -----------------------------------------------------------------------

ADDRESS = BrokerAddress("broker.lan", None, 8883, 8884, "fedbus")


def test_bundle_holds_a_password_or_a_certificate() -> None:
    with_password = bundle_document(ADDRESS, "dev-a", password="pw", certificate=False)
    assert with_password["devices"] == {"dev-a": {"username": "dev-a", "password": "pw"}}
    assert with_password["bundle"] == {"version": 1, "device": "dev-a"}
    assert with_password["tls"] == {"port": 8883, "mtls_port": 8884, "ca_file": "ca.crt"}
    with_cert = bundle_document(ADDRESS, "dev-a", password=None, certificate=True)
    assert with_cert["devices"]["dev-a"] == {"username": "dev-a", "cert_file": "dev-a.crt",
                                             "key_file": "dev-a.key"}
    assert "coordinator_key" not in with_password  # only when the operator's file has one
    keyed = BrokerAddress("broker.lan", None, 8883, 8884, "fedbus", "ed25519:" + "A" * 43)
    assert bundle_document(keyed, "dev-a", password="pw", certificate=False)[
        "coordinator_key"] == "ed25519:" + "A" * 43
    for password, certificate in (("pw", True), (None, False)):
        with pytest.raises(ValueError, match="exactly one"):
            bundle_document(ADDRESS, "dev-a", password=password, certificate=certificate)


def test_bundle_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "dev-a", ADDRESS, "dev-a", ca_pem=b"CA", password="pw")
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    assert stat.S_IMODE((bundle / "credentials.json").stat().st_mode) == 0o600
    before = (bundle / "credentials.json").read_bytes()
    with pytest.raises(ConfigError, match="never overwrites"):
        write_bundle(bundle, ADDRESS, "dev-a", ca_pem=b"CA", password="other")
    assert (bundle / "credentials.json").read_bytes() == before
    access = read_credentials(bundle, "dev-a")  # the directory itself
    assert (access.host, access.port, access.tls_port, access.password) == (
        "broker.lan", None, 8883, "pw")
    assert access.ca_file == bundle / "ca.crt"
    assert bundle_device(bundle) == "dev-a"
    assert bundle_device(bundle / "credentials.json") == "dev-a"
    assert bundle_device(tmp_path / "missing") is None


def test_agent_reads_a_certificate_bundle_alone(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    from edge_agent.config import ENV_PREFIX, AgentConfig
    from fedbus import pki

    monkeypatch.delenv("FEDBUS_AGENT_DEVICE_ID", raising=False)
    now = dt.datetime.now(dt.UTC)
    ca = pki.build_ca(pki.new_key(), common_name="test CA", now=now)
    issued = pki.build_client_certificate(ca, pki.new_key(), "dev-x", now=now)
    bundle = write_bundle(tmp_path / "b", ADDRESS, "dev-x", ca_pem=ca.certificate_pem,
                          certificate_pem=issued.certificate_pem, key_pem=issued.key_pem)
    assert stat.S_IMODE((bundle / "dev-x.key").stat().st_mode) == 0o600
    flags: dict[str, Any] = {"credentials": bundle, "data": tmp_path / "d.npz"}
    cfg, password = load_process_config(
        AgentConfig, flags, env_prefix=ENV_PREFIX, config_file=None, section="agent",
        username=lambda c: c.device_id, identity="device_id")
    # the bundle's device, its certificate and the mutual-TLS port, and no password
    assert (cfg.device_id, cfg.port, password) == ("dev-x", 8884, "")
    assert (cfg.tls_cert, cfg.tls_key) == (bundle / "dev-x.crt", bundle / "dev-x.key")


# -- against a real broker ----------------------------------------------------------------------


class Device:
    """A device connected with fedbus's own transport; counts its connections."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.client = MqttClient(settings, on_message=self.inbox.put)

    def start(self) -> Device:
        self.client.start()
        assert self.client.wait_connected(TIMEOUT), self.client.last_error
        return self

    def refused(self) -> ConnectRefused:
        """Wait until the broker has dropped us and refused the reconnect."""
        deadline = time.monotonic() + TIMEOUT
        while self.client.fatal is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert isinstance(self.client.fatal, ConnectRefused), self.client.last_error
        return self.client.fatal


def settings_for(access_path: Path, device_id: str) -> ConnectionSettings:
    access = read_credentials(access_path, device_id)
    cert = access.cert_file is not None and not access.password
    tls = TlsSettings(access.ca_file, access.cert_file if cert else None,
                      access.key_file if cert else None)
    return ConnectionSettings(access.host, access.port_for(tls=True, client_certificate=cert),
                              device_id, device_id, access.password, tls=tls,
                              reconnect_min=0.1, reconnect_max=0.2)


@pytest.fixture
def devices() -> Iterator[Callable[[ConnectionSettings], Device]]:
    started: list[Device] = []

    def make(settings: ConnectionSettings) -> Device:
        device = Device(settings).start()
        started.append(device)
        return device

    yield make
    for device in started:
        device.client.stop()


@pytest.fixture
def admin(broker: LocalBroker) -> Iterator[DynsecAdmin]:
    access = read_credentials(broker.credentials_file, dynsec.ADMIN_USERNAME)
    with DynsecAdmin(admin_settings(access), broker.prefix, timeout=TIMEOUT) as connected:
        yield connected


def fedbus_devices(broker: LocalBroker, *args: str) -> subprocess.CompletedProcess[str]:
    """``fedbus devices`` as a real process (what an operator runs)."""
    return subprocess.run(
        [sys.executable, "-m", "fedbus", "devices", "--credentials",
         str(broker.credentials_file), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture
def devices_cli(broker: LocalBroker) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``fedbus devices`` in this process (a second faster than a new Python): returns the
    exit code, stdout, and the error an operator would see on stderr."""
    from click.testing import CliRunner

    from fedbus.cli import cli

    transport_log = logging.getLogger("fedbus.transport")
    level = transport_log.level

    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(
            cli, ["devices", "--credentials", str(broker.credentials_file), *args])
        error = "" if result.exception is None else str(result.exception)
        return result.exit_code, result.output, error

    yield run
    transport_log.setLevel(level)  # the command quietens it


def paho_mtls(broker: LocalBroker, bundle: Path, device_id: str,
              will: str | None = None) -> tuple[mqtt.Client, Any]:
    """A raw paho client on the mTLS port with the bundle's certificate; returns the client
    and its CONNACK reason."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=device_id,
                         protocol=MQTTProtocolVersion.MQTTv5)
    if will is not None:
        client.will_set(will, b"offline", qos=1, retain=True)
    context = ssl.create_default_context(cafile=str(bundle / "ca.crt"))
    context.load_cert_chain(bundle / f"{device_id}.crt", bundle / f"{device_id}.key")
    client.tls_set_context(context)
    connacks: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, u, f, reason, p: connacks.put(reason)
    client.connect(broker.host, broker.mtls_port, clean_start=True)
    client.loop_start()
    return client, connacks.get(timeout=TIMEOUT)


def suback(client: mqtt.Client, topic: str) -> int:
    codes: queue.Queue[int] = queue.Queue()
    client.on_subscribe = lambda c, u, mid, reasons, p: codes.put(reasons[0].value)
    client.subscribe(topic, qos=1)
    return codes.get(timeout=TIMEOUT)


def puback(client: mqtt.Client, topic: str) -> int:
    codes: queue.Queue[int] = queue.Queue()
    client.on_publish = lambda c, u, mid, reason, p: codes.put(reason.value)
    client.publish(topic, b"x", qos=1)
    return codes.get(timeout=TIMEOUT)


def file_digests(root: Path) -> dict[str, str]:
    skip = {"mosquitto.log", "mosquitto.out", "mosquitto.db", "broker.lock"}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.mark.broker
def test_a_device_added_to_a_running_broker_publishes_while_others_stay_connected(
        broker: LocalBroker, devices: Callable[[ConnectionSettings], Device],
        admin: DynsecAdmin, devices_cli: Callable[..., tuple[int, str, str]]) -> None:
    creds = broker.credentials_file
    coordinator = devices(settings_for(creds, "coordinator"))
    coordinator.client.subscribe(broker.topics.all_updates)
    dev_a = devices(settings_for(creds, "dev-a"))

    code, out, error = devices_cli("add", "newbie")
    assert code == 0, error
    bundle = broker.bundles_dir / "newbie"
    assert f"bundle: {bundle}" in out
    newbie = devices(settings_for(bundle, "newbie"))
    assert newbie.client.publish(broker.topics.update("newbie"), b"u1").wait(TIMEOUT)
    seen = coordinator.inbox.get(timeout=TIMEOUT)
    assert (seen.topic, seen.payload) == (broker.topics.update("newbie"), b"u1")

    assert dynsec.DeviceEntry("newbie", True) in admin.list_devices()
    code, listed, _ = devices_cli("list")
    assert code == 0 and "newbie  enabled" in listed.replace("   ", "  ")
    # nobody else was disconnected on the way
    for other in (dev_a, coordinator):
        assert other.client.connected and other.client.connects == 1
        assert other.client.last_error is None
    assert dev_a.client.publish(broker.topics.update("dev-a"), b"still here").wait(TIMEOUT)


@pytest.mark.broker
def test_disable_and_remove_disconnect_a_device_and_refuse_it(
        broker: LocalBroker, devices: Callable[[ConnectionSettings], Device],
        admin: DynsecAdmin, tmp_path: Path) -> None:
    creds = broker.credentials_file
    dev_a = devices(settings_for(creds, "dev-a"))
    dev_b = devices(settings_for(creds, "dev-b"))

    admin.disable_device("dev-b")
    refused = dev_b.refused()  # dropped, and the reconnect refused
    assert refused.reason_code == NOT_AUTHORIZED
    assert dynsec.DeviceEntry("dev-b", False) in admin.list_devices()

    admin.enable_device("dev-b")
    again = devices(settings_for(creds, "dev-b"))
    assert again.client.publish(broker.topics.update("dev-b"), b"back").wait(TIMEOUT)

    admin.remove_device("dev-b")
    assert again.refused().reason_code == NOT_AUTHORIZED
    assert "dev-b" not in {e.device_id for e in admin.list_devices()}
    with pytest.raises(DynsecError, match="Client not found"):
        admin.remove_device("dev-b")
    assert dev_a.client.connected and dev_a.client.connects == 1


@pytest.mark.broker
def test_a_removed_certificate_connects_but_can_do_nothing(
        broker: LocalBroker, admin: DynsecAdmin,
        devices: Callable[[ConnectionSettings], Device],
        devices_cli: Callable[..., tuple[int, str, str]]) -> None:
    """The account layer alone (the plugin, as ``DynsecAdmin`` changes it, without the
    revocation list `fedbus devices` also updates: tests/test_revocation.py). Mosquitto
    2.0.11 never asks the plugin about a certificate login: the CONNACK succeeds. Rights
    come only from the device's own role, which disable and remove take away, so the
    certificate can then neither publish nor subscribe."""
    code, _, error = devices_cli("add", "cert-dev", "--certificate")
    assert code == 0, error
    bundle = broker.bundles_dir / "cert-dev"
    assert not read_credentials(bundle, "cert-dev").password
    topics = broker.topics

    client, connack = paho_mtls(broker, bundle, "cert-dev")
    try:
        assert connack.value == 0
        assert puback(client, topics.update("cert-dev")) < 0x80  # 0x10: no subscriber
        assert suback(client, topics.task) < 0x80
        kicked = threading.Event()
        client.on_disconnect = lambda c, u, f, reason, p: kicked.set()
        admin.disable_device("cert-dev")
        assert kicked.wait(TIMEOUT)
    finally:
        client.disconnect()
        client.loop_stop()

    for change in ("disabled", "removed"):
        if change == "removed":
            admin.remove_device("cert-dev")
        client, connack = paho_mtls(broker, bundle, "cert-dev")
        try:
            assert connack.value == 0, change  # the TLS handshake and CONNACK still succeed
            assert puback(client, topics.update("cert-dev")) == NOT_AUTHORIZED, change
            assert puback(client, topics.status("cert-dev")) == NOT_AUTHORIZED, change
            assert suback(client, topics.task) == NOT_AUTHORIZED, change
            assert suback(client, topics.receipt("cert-dev")) == NOT_AUTHORIZED, change
        finally:
            client.disconnect()
            client.loop_stop()

    # nor is its Will published: a second connection with the same certificate takes the
    # session over (the broker sends the first one's Will before the second's CONNACK)
    coordinator = devices(settings_for(broker.credentials_file, "coordinator"))
    coordinator.client.subscribe(topics.all_status)
    first, _ = paho_mtls(broker, bundle, "cert-dev", will=topics.status("cert-dev"))
    second, connack = paho_mtls(broker, bundle, "cert-dev")
    try:
        assert connack.value == 0
        assert coordinator.client.publish(topics.status("barrier"), b"b").wait(TIMEOUT)
        seen = coordinator.inbox.get(timeout=TIMEOUT)
        assert (seen.topic, seen.payload) == (topics.status("barrier"), b"b")
    finally:
        for client in (first, second):
            client.disconnect()
            client.loop_stop()


@pytest.mark.broker
def test_a_dynamically_added_device_is_held_to_its_own_topics(
        broker: LocalBroker, devices: Callable[[ConnectionSettings], Device],
        admin: DynsecAdmin, tmp_path: Path) -> None:
    admin.add_device("late", "late-password")
    write_bundle(tmp_path / "late", BrokerAddress(broker.host, broker.port, broker.tls_port,
                                                  broker.mtls_port, broker.prefix),
                 "late", ca_pem=broker.ca_file.read_bytes(), password="late-password")
    topics = broker.topics
    late = devices(settings_for(tmp_path / "late", "late"))
    for topic in (topics.update("dev-a"), topics.status("dev-a"), topics.task, topics.model,
                  topics.receipt("late")):
        result = late.client.publish(topic, b"forged")
        assert not result.wait(TIMEOUT) and result.reason_code == NOT_AUTHORIZED, topic
    for topic in (topics.receipt("dev-a"), f"{topics.prefix}/receipt/+", f"{topics.prefix}/#",
                  topics.receipt("late")):
        late.client.subscribe(topic)
    coordinator = devices(settings_for(broker.credentials_file, "coordinator"))
    for topic, payload in ((topics.receipt("dev-a"), b"for dev-a"),
                           (topics.update("dev-a"), b"dev-a's update"),
                           (topics.receipt("late"), b"for late")):  # the barrier
        assert coordinator.client.publish(topic, payload).wait(TIMEOUT)
    seen = late.inbox.get(timeout=TIMEOUT)
    assert (seen.topic, seen.payload) == (topics.receipt("late"), b"for late")
    assert late.inbox.empty()  # anything else would have come before the barrier
    assert late.client.publish(topics.update("late"), b"mine").wait(TIMEOUT)


@pytest.mark.broker
def test_add_never_overwrites_and_leaves_no_secret_behind_a_refusal(
        broker: LocalBroker, devices_cli: Callable[..., tuple[int, str, str]]) -> None:
    assert devices_cli("add", "twice")[0] == 0
    bundle = broker.bundles_dir / "twice"
    before = file_digests(bundle)
    code, _, error = devices_cli("add", "twice")
    assert code != 0 and "never overwrites" in error
    assert file_digests(bundle) == before
    # an account the broker already has: the new bundle is not kept
    code, _, error = devices_cli("add", "dev-a")
    assert code != 0 and "Client already exists" in error
    assert not (broker.bundles_dir / "dev-a").exists()
    for path in (broker.credentials_file, broker.dynsec_file, bundle / "credentials.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.broker
def test_add_keeps_the_bundle_when_the_answer_never_comes(
        broker: LocalBroker, devices_cli: Callable[..., tuple[int, str, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedbus.provision import AdminError

    def lost(self: DynsecAdmin, device_id: str, password: str | None) -> None:
        raise AdminError("no answer")

    monkeypatch.setattr(DynsecAdmin, "add_device", lost)
    code, _, error = devices_cli("add", "unsure")
    assert code != 0 and "its bundle is kept" in error
    assert read_credentials(broker.bundles_dir / "unsure", "unsure").password


@pytest.mark.broker
def test_a_second_start_on_a_live_directory_changes_nothing(
        broker: LocalBroker, admin: DynsecAdmin) -> None:
    admin.add_device("added-live", "pw-live")
    before = file_digests(broker.workdir)
    second = LocalBroker(broker.workdir, device_ids=[])
    with pytest.raises(ConfigError, match="already running"):
        second.start()
    assert file_digests(broker.workdir) == before
    assert broker.running

    # stopped and started again (a new process, ports left at 0): same secrets, same ports,
    # and the device added while it ran is still there
    ports = (broker.port, broker.tls_port, broker.mtls_port)
    broker.stop()
    with pytest.raises(ConfigError, match="without dev-new"):
        LocalBroker(broker.workdir, device_ids=["dev-a", "dev-new"]).start()
    with LocalBroker(broker.workdir, device_ids=[]) as again:
        assert (again.port, again.tls_port, again.mtls_port) == ports
        assert again.credentials("coordinator") == broker.coordinator
        assert again.devices["dev-a"] == broker.devices["dev-a"]
        after = file_digests(broker.workdir)
        assert {k: v for k, v in after.items() if k != "mosquitto.conf"} == {
            k: v for k, v in before.items() if k != "mosquitto.conf"}
        access = read_credentials(again.credentials_file, dynsec.ADMIN_USERNAME)
        with DynsecAdmin(admin_settings(access), again.prefix, timeout=TIMEOUT) as a2:
            assert dynsec.DeviceEntry("added-live", True) in a2.list_devices()


# -- end to end ---------------------------------------------------------------------------------


def test_a_device_added_mid_run_gets_an_update_accepted(broker: LocalBroker,
                                                         tmp_path: Path) -> None:
    """Real processes: a coordinator waiting for devices and requiring signed updates, then
    `fedbus devices add` (which registers the device's key in the file the coordinator
    reads live), then an agent given nothing but the bundle, signing with its key."""
    x, y = load_digits()
    write_npz(tmp_path / "newbie.npz", x[:200], y[:200])
    write_npz(tmp_path / "test.npz", x[-300:], y[-300:])
    coordinator_log = tmp_path / "coordinator.log"
    with ChildGroup() as group:
        coordinator = group.add(Child(
            [sys.executable, "-m", "fedbus", "coordinator", "--credentials",
             str(broker.credentials_file), "--state-dir", str(tmp_path / "run"),
             "--buffer-size", "1", "--min-devices", "1", "--epochs", "1",
             "--max-versions", "1", "--duration", "60", "--require-signed-updates",
             "--eval-data", str(tmp_path / "test.npz")],
            log_path=coordinator_log, name="coordinator",
        ))
        deadline = time.monotonic() + 30
        while "waiting for devices" not in (coordinator_log.read_text()
                                            if coordinator_log.exists() else ""):
            assert coordinator.alive and time.monotonic() < deadline, coordinator.log_tail()
            time.sleep(0.05)
        added = fedbus_devices(broker, "add", "newbie")
        assert added.returncode == 0, added.stderr
        agent = group.add(Child(
            [sys.executable, "-m", "fedbus", "agent", "--credentials",
             str(broker.bundles_dir / "newbie"), "--data", str(tmp_path / "newbie.npz"),
             "--state-dir", str(tmp_path / "agent"), "--on-run-end", "exit"],
            log_path=tmp_path / "agent.log", name="agent newbie",
        ))
        assert coordinator.wait(60, "one model version") == 0
        assert agent.wait(30, "the end of the run") == 0
    agent_log = (tmp_path / "agent.log").read_text()
    assert f"connected to 127.0.0.1:{broker.tls_port} as newbie" in agent_log
    # the bundle carries the coordinator's public key, and the agent verified with it
    bundle = json.loads((broker.bundles_dir / "newbie" / "credentials.json").read_text())
    assert bundle["coordinator_key"] == broker.coordinator_key
    assert bundle["coordinator"] == {"username": "coordinator"}  # never its signing key
    assert bundle["devices"]["newbie"]["signing_key_file"] == "signing.key"
    key = load_private_key(broker.bundles_dir / "newbie" / "signing.key")
    registered = (broker.credentials_file.parent / "signing" / "devices.pub").read_text()
    assert f"newbie {key_text(key)}" in registered
    assert "signed updates required: device keys from" in coordinator_log.read_text()
    assert ": signature (" not in coordinator_log.read_text()  # every update was signed
    assert f"updates are signed with this device's key {key_text(key)}" in agent_log
    assert f"signed by the coordinator's key {broker.coordinator_key}" in agent_log
    assert re.search(r"done: \d+ updates published, [1-9]\d* accepted", agent_log), agent_log


def test_init_writes_the_accounts_of_a_system_broker_once(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedbus.cli import cli

    (tmp_path / "ca.crt").write_bytes(b"CA PEM")
    args = ["devices", "init", "--dir", str(tmp_path / "op"), "--host", "broker.lan",
            "--ca", str(tmp_path / "ca.crt")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    op = tmp_path / "op"
    for name, mode in (("credentials.json", 0o600), ("dynsec.json", 0o600), ("ca.crt", 0o644)):
        assert stat.S_IMODE((op / name).stat().st_mode) == mode, name
    access = read_credentials(op, dynsec.ADMIN_USERNAME)
    assert (access.host, access.port, access.tls_port, access.mtls_port) == (
        "broker.lan", None, 8883, 8884)
    config = json.loads((op / "dynsec.json").read_text())
    admin = next(c for c in config["clients"] if c["username"] == "fedbus-admin")
    salt = base64.b64decode(admin["salt"])
    assert dynsec.hash_password(access.password, salt=salt)["password"] == admin["password"]
    assert read_credentials(op, "coordinator").password
    before = file_digests(op)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "never overwrites" in str(again.exception)
    assert file_digests(op) == before


def test_agent_reads_a_password_bundle_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.config import ENV_PREFIX, AgentConfig

    bundle = write_bundle(tmp_path / "b", ADDRESS, "dev-p", ca_pem=b"CA", password="pw")
    monkeypatch.delenv("FEDBUS_AGENT_DEVICE_ID", raising=False)
    monkeypatch.setenv("FEDBUS_AGENT_CREDENTIALS", str(bundle))
    cfg, password = load_process_config(
        AgentConfig, {"data": tmp_path / "d.npz"}, env_prefix=ENV_PREFIX, config_file=None,
        section="agent", username=lambda c: c.device_id, identity="device_id")
    assert (cfg.device_id, cfg.host, cfg.port, cfg.tls_ca, password) == (
        "dev-p", "broker.lan", 8883, bundle / "ca.crt", "pw")
    assert cfg.tls_cert is None
    # a device id given elsewhere wins, and must then be in the bundle
    monkeypatch.setenv("FEDBUS_AGENT_DEVICE_ID", "dev-q")
    with pytest.raises(ConfigError, match="has no account 'dev-q'"):
        load_process_config(
            AgentConfig, {"data": tmp_path / "d.npz"}, env_prefix=ENV_PREFIX,
            config_file=None, section="agent", username=lambda c: c.device_id,
            identity="device_id")


@pytest.mark.broker
def test_bundle_of_an_existing_account_logs_in_and_is_never_rewritten(
        broker: LocalBroker, devices: Callable[[ConnectionSettings], Device],
        devices_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, error = devices_cli("bundle", "dev-a")
    assert code == 0, error
    bundle = broker.bundles_dir / "dev-a"
    assert f"(logs in with its password): {bundle}" in out
    assert stat.S_IMODE((bundle / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((bundle / "signing.key").stat().st_mode) == 0o600
    assert "fedbus-admin" not in (bundle / "credentials.json").read_text()
    key = load_private_key(bundle / "signing.key")
    assert f"its update-signing key {key_text(key)} is registered" in out
    keys = parse_device_keys((broker.credentials_file.parent / DEVICE_KEYS_FILE).read_text())
    assert key_text(keys["dev-a"]) == key_text(key)
    dev_a = devices(settings_for(bundle, "dev-a"))
    assert dev_a.client.publish(broker.topics.update("dev-a"), b"u").wait(TIMEOUT)
    before = file_digests(bundle)
    code, _, error = devices_cli("bundle", "dev-a")
    assert code != 0 and "already exists" in error
    assert file_digests(bundle) == before
    code, _, error = devices_cli("bundle", "nobody")
    assert code != 0 and "has no account 'nobody'" in error
