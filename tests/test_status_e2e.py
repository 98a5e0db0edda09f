"""``fedbus status`` against real parts: a real Mosquitto with the project's policy, the
coordinator service on it, a device client, and the CLI as a subprocess with the operator's
credentials (over TLS, as the credentials file says). Devices must not read the fleet
snapshot: refused in the SUBACK by the dynamic-security plugin, silently not delivered by the
static ACL file; the operator account writes nothing but the run commands (revision 2.5),
which no device may write."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from conftest import MqttClientFactory
from inmemory import ARGS, wait_for
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from fedbus import dynsec
from fedbus.broker import LocalBroker, find_free_port, render_acl
from fedbus.cli import cli
from fedbus.envelope import pack
from fedbus.messages import Status, Update
from fedbus.processes import terminate
from fedbus.update_codec import encode_delta

pytestmark = pytest.mark.broker

NOT_AUTHORIZED = 0x87


def _update(service: CoordinatorService, uid: str) -> bytes:
    delta = {name: np.zeros_like(a) for name, a in service.core.state.items()}
    return pack(Update(uid, "dev-a", service.task.task_id, 0, 5, encode_delta(delta, "fp32"),
                       {"loss": 0.5, "acc_int8": 0.75}, run_id=service.task.run_id).to_wire())


def _published(service: CoordinatorService) -> bool:
    """The retained snapshot shows everything the coordinator has folded so far."""
    key = service._fleet_key
    return key is not None and key[0] == service.fleet.revision


def test_status_shows_the_fleet_to_the_operator_and_not_to_devices(
    broker: LocalBroker, mqtt_client: MqttClientFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("coordinator.service._FLEET_INTERVAL", 0.2)  # 2 s in service
    config = CoordinatorConfig(model_args=ARGS, state_dir=None, host=broker.host,
                               port=broker.port, tls=False, buffer_size=4)
    service = CoordinatorService(config, password=broker.coordinator.password)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    topics = service.topics
    try:
        wait_for(lambda: service.client.connected, what="the coordinator connected")
        device = mqtt_client(broker, "dev-a")
        status = Status("dev-a", "idle", 0, time.time(), run_id=service.task.run_id,
                        agent="0.1.0-test", error="out of memory in the last training",
                        error_kind="memory")
        device.publish(topics.status("dev-a"), pack(status.to_wire()), qos=1, retain=True)
        device.publish(topics.update("dev-a"), _update(service, "u-1"), qos=1)
        device.publish(topics.update("dev-a"), b"\xc1", qos=1)
        wait_for(lambda: service.core.counters["updates_received"] == 2
                 and _published(service), what="a snapshot with both updates")

        # a device may not read it: the plugin refuses the subscription, delivers nothing
        got: list[Any] = []
        granted: list[int] = []
        other = mqtt_client(broker, "dev-b", on_message=lambda c, u, m: got.append(m.topic))
        other.on_subscribe = lambda c, u, mid, codes, props: granted.extend(
            code.value for code in codes)
        other.subscribe(topics.fleet, qos=1)
        wait_for(lambda: bool(granted), what="the SUBACK")
        assert granted == [NOT_AUTHORIZED]

        env = {**os.environ, "FEDBUS_LOG_LEVEL": "warning"}
        done = subprocess.run(
            [sys.executable, "-m", "fedbus", "status", "--credentials",
             str(broker.credentials_file), "--json", "--timeout", "10"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert done.returncode == 0, done.stderr
        snapshot = json.loads(done.stdout)
        run = snapshot["run"]
        # one device online: the buffer target is 1, so its update made version 1
        assert (run["task"], run["run"], run["version"]) == (
            service.task.task_id, service.task.run_id, 1)
        assert (run["updates_accepted"], run["updates_rejected"]) == (1, 1)
        assert run["accuracy"] is None  # no held-out data in this run
        (a,) = snapshot["devices"]
        assert (a["id"], a["state"], a["online"], a["agent"], a["model_version"]) == (
            "dev-a", "idle", True, "0.1.0-test", 0)
        assert (a["accepted"], a["rejected"], a["mean_staleness"]) == (1, {"malformed": 1}, 0)
        assert (a["loss"], a["acc_int8"]) == (0.5, 0.75)
        assert a["bytes"] > 1 and a["error"]["kind"] == "memory"
        assert a["error"]["text"] == "out of memory in the last training"

        # the text table, in-process
        result = CliRunner().invoke(cli, ["status", "--credentials",
                                          str(broker.credentials_file), "--once"])
        assert result.exit_code == 0, result.output
        row = next(line for line in result.output.splitlines() if line.startswith("dev-a"))
        assert "1 (malformed 1)" in row and "0.1.0-test" in row and "memory: out of memory" in row
        time.sleep(0.2)
        assert got == []
    finally:
        service.stop()
        thread.join(10)
        service.close()


def test_the_static_acl_file_keeps_devices_out_and_the_operator_read_only(
    tmp_path: Path,
) -> None:
    """A system Mosquitto with a password file and broker_config/fedbus.acl."""
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    mosquitto, passwd = shutil.which("mosquitto", path=sbin), shutil.which("mosquitto_passwd")
    assert mosquitto and passwd, "install the Debian package 'mosquitto'"
    accounts = {"coordinator": "c-pw", dynsec.OPERATOR_USERNAME: "o-pw", "dev-a": "d-pw"}
    (tmp_path / "passwd").touch()
    for user, password in accounts.items():
        subprocess.run([passwd, "-b", str(tmp_path / "passwd"), user, password], check=True)
    (tmp_path / "fedbus.acl").write_text(render_acl())
    port = find_free_port()
    # as root, mosquitto would switch to the `mosquitto` user, who cannot read tmp_path
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else ""
    (tmp_path / "m.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\n{user}"
        f"password_file {tmp_path / 'passwd'}\nacl_file {tmp_path / 'fedbus.acl'}\n"
    )
    proc = subprocess.Popen([mosquitto, "-c", str(tmp_path / "m.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients: list[mqtt.Client] = []

    def connect(user: str) -> tuple[mqtt.Client, list[str], list[int]]:
        got: list[str] = []
        acks: list[int] = []
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=user,
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.username_pw_set(user, accounts[user])
        client.on_message = lambda c, u, m: got.append(m.topic)
        client.on_publish = lambda c, u, mid, code, props: acks.append(code.value)
        deadline = time.monotonic() + 5
        while True:
            try:
                client.connect("127.0.0.1", port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.loop_start()
        clients.append(client)
        wait_for(client.is_connected, 5, f"{user} connected")
        return client, got, acks

    try:
        coordinator, _, _ = connect("coordinator")
        operator, seen, refused = connect(dynsec.OPERATOR_USERNAME)
        device, device_got, _ = connect("dev-a")
        for client, topic in ((operator, "fedbus/fleet"), (operator, "fedbus/status/+"),
                              (operator, "fedbus/update/+"), (device, "fedbus/fleet")):
            client.subscribe(topic, qos=1)
        time.sleep(0.2)
        coordinator.publish("fedbus/fleet", b"snapshot", qos=1, retain=True)
        device.publish("fedbus/status/dev-a", b"status", qos=1, retain=True)
        device.publish("fedbus/update/dev-a", b"update", qos=1)
        for topic in ("fedbus/fleet", "fedbus/update/fedbus-operator",
                      "fedbus/status/fedbus-operator", "fedbus/task"):
            operator.publish(topic, b"x", qos=1)
        wait_for(lambda: len(refused) == 4 and len(seen) == 2, 5, "the operator's answers")
        assert refused == [NOT_AUTHORIZED] * 4
        assert sorted(seen) == ["fedbus/fleet", "fedbus/status/dev-a"]  # no update
        assert device_got == []
        # the run commands (revision 2.5): the operator may send them, a device may not
        coordinator.on_message = lambda c, u, m: commands.append(m.payload)
        commands: list[bytes] = []
        coordinator.subscribe("fedbus/control", qos=1)
        time.sleep(0.2)
        device.on_publish = lambda c, u, mid, code, props: device_acks.append(code.value)
        device_acks: list[int] = []
        device.publish("fedbus/control", b"forged", qos=1)
        operator.publish("fedbus/control", b"command", qos=1)
        wait_for(lambda: len(refused) == 5 and bool(device_acks) and bool(commands), 5,
                 "the answers to the run commands")
        assert refused[-1] == 0 and device_acks == [NOT_AUTHORIZED]
        assert commands == [b"command"]
        # the chunks of a model (revision 2.6): a device reads them and writes none
        device.subscribe("fedbus/model/chunk/+", qos=1)
        time.sleep(0.2)
        coordinator.publish("fedbus/model/chunk/1", b"chunk", qos=1, retain=True)
        device.publish("fedbus/model/chunk/2", b"forged", qos=1)
        wait_for(lambda: len(device_acks) == 2 and "fedbus/model/chunk/1" in device_got, 5,
                 "the device's chunk and its refused publish")
        assert device_acks[-1] == NOT_AUTHORIZED and device_got == ["fedbus/model/chunk/1"]
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
        terminate(proc, 5.0)


def _subscribe_codes(client: mqtt.Client, topic: str) -> list[int]:
    codes: list[int] = []
    client.on_subscribe = lambda c, u, mid, rcs, props: codes.extend(r.value for r in rcs)
    client.subscribe(topic, qos=1)
    wait_for(lambda: bool(codes), 5, "the SUBACK")
    return codes


def test_operator_bundle_from_the_file_or_made_on_a_running_broker(
    broker: LocalBroker, mqtt_client: MqttClientFactory, tmp_path: Path,
) -> None:
    runner = CliRunner()
    creds = str(broker.credentials_file)
    bundle = tmp_path / "op"
    result = runner.invoke(cli, ["devices", "--credentials", creds, "operator",
                                 "--bundle", str(bundle)])
    assert result.exit_code == 0, result.output
    data = json.loads((bundle / "credentials.json").read_text())
    assert data["operator"] == {"username": dynsec.OPERATOR_USERNAME,
                                "password": broker.operator.password}
    assert "devices" not in data and "coordinator" not in data
    assert (bundle / "credentials.json").stat().st_mode & 0o777 == 0o600
    operator = mqtt_client(broker, dynsec.OPERATOR_USERNAME)
    assert _subscribe_codes(operator, broker.topics.fleet) == [1]

    # a credentials file from before the operator account: the account is made over MQTT
    with_admin = dict(json.loads(broker.credentials_file.read_text()))
    del with_admin["operator"]
    old = broker.workdir / "old-credentials.json"
    old.write_text(json.dumps(with_admin))
    answers: list[bytes] = []
    admin = mqtt_client(broker, dynsec.ADMIN_USERNAME,
                        on_message=lambda c, u, m: answers.append(m.payload))
    assert _subscribe_codes(admin, dynsec.RESPONSE_TOPIC) == [1]
    admin.publish(dynsec.CONTROL_TOPIC, dynsec.encode_commands(
        [{"command": "deleteClient", "username": dynsec.OPERATOR_USERNAME},
         {"command": "deleteRole", "rolename": dynsec.OPERATOR_ROLE}], "t"), qos=1)
    wait_for(lambda: bool(answers), 5, "the plugin's answer")
    assert dynsec.read_responses(answers[0], "t", 2) is not None
    fresh = tmp_path / "op2"
    made = runner.invoke(cli, ["devices", "--credentials", str(old), "operator",
                               "--bundle", str(fresh)])
    assert made.exit_code == 0, made.output
    assert "made the operator account" in made.output
    password = json.loads((fresh / "credentials.json").read_text())["operator"]["password"]
    assert password != broker.operator.password
    again = mqtt_client(broker, dynsec.OPERATOR_USERNAME, password=password,
                        client_id="op-again")
    assert _subscribe_codes(again, broker.topics.fleet) == [1]
    assert _subscribe_codes(again, broker.topics.receipt("dev-a")) == [NOT_AUTHORIZED]
    # it exists now: a second attempt is refused and leaves no bundle behind
    refused = runner.invoke(cli, ["devices", "--credentials", str(old), "operator",
                                  "--bundle", str(tmp_path / "op3")])
    assert refused.exit_code != 0 and not (tmp_path / "op3").exists()


def test_a_broker_directory_from_before_gets_the_operator_at_its_next_start(
    tmp_path: Path, mqtt_client: MqttClientFactory,
) -> None:
    local = LocalBroker(tmp_path / "b", device_ids=["dev-a"])
    local.start()
    local.stop()
    # as revision 2.2 left it: no operator account, role or credentials entry
    config = json.loads(local.dynsec_file.read_text())
    config["clients"] = [c for c in config["clients"]
                         if c["username"] != dynsec.OPERATOR_USERNAME]
    config["roles"] = [r for r in config["roles"] if r["rolename"] != dynsec.OPERATOR_ROLE]
    local.dynsec_file.write_text(json.dumps(config))
    creds = json.loads(local.credentials_file.read_text())
    del creds["operator"]
    local.credentials_file.write_text(json.dumps(creds))
    again = LocalBroker(tmp_path / "b", device_ids=[])
    again.start()
    try:
        password = json.loads(again.credentials_file.read_text())["operator"]["password"]
        client = mqtt_client(again, dynsec.OPERATOR_USERNAME, password=password)
        assert _subscribe_codes(client, again.topics.fleet) == [1]
    finally:
        again.stop()
