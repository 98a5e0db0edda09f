"""Device-signed updates (docs/protocol.md section 11.10, revision 2.8): the worked example,
the device-key file, the coordinator's check, the bundle's key, and a coordinator on a real
Mosquitto that requires signatures."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from inmemory import ARGS, wait_for
from test_protocol import UPDATE_VECTOR

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from coordinator.validation import REJECT_REASONS, Rejected, ValidationLimits, validate_update
from fedbus.broker import LocalBroker
from fedbus.credentials import BrokerAddress, read_credentials, write_bundle
from fedbus.envelope import pack, unpack
from fedbus.errors import ConfigError
from fedbus.messages import Update
from fedbus.signing import (
    DeviceKeyFile,
    device_keys_text,
    key_text,
    load_private_key,
    parse_device_keys,
    private_key_pem,
    register_device_key,
    sign_message,
    split_signature,
    update_signature_problem,
)
from fedbus.transport import ConnectionSettings, MqttClient
from fedbus.update_codec import encode_delta

# RFC 8032, section 7.1, TEST 1, as in section 7.6's example
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
TOPIC = "fedbus/update/device-01"
# docs/protocol.md section 11.10: UPDATE_VECTOR (section 7.3) signed with KEY on TOPIC
SIGNED_UPDATE_VECTOR = bytes.fromhex(
    "8ca17602a46b696e64a6757064617465a97570646174655f6964b071334a785330644b39765462324c6d"
    "41a3646576a96465766963652d3031a372756eb0685235745771324c6d5a387658633145a47461736ba8"
    "6469676974732d31a4626173650ca16eccb4a16d82a46c6f7373ca3f000000a3616363ca3f600000a564"
    "656c746180a27473cb41da556e40000000a3736967c4400938102aedbd86e79251965e4ec7b8d10425d1"
    "425de25e969f7e2be66ae5cb5a02cb5b025f9265f2a398fe5c386218ade70bb0a77bf24231b512e7f389"
    "d1b705"
)


def test_the_worked_example_of_the_protocol_page() -> None:
    payload = sign_message(KEY, TOPIC, UPDATE_VECTOR)
    assert payload == SIGNED_UPDATE_VECTOR and len(payload) == 213  # Ed25519: deterministic
    assert payload[:1] == b"\x8c" and UPDATE_VECTOR[:1] == b"\x8b"
    assert payload[1:143] == UPDATE_VECTOR[1:]
    signature = payload[-64:]
    KEY.public_key().verify(signature, b"fedbus-sig-v1\x00" + TOPIC.encode() + b"\x00"
                            + UPDATE_VECTOR)
    assert split_signature(payload) == (UPDATE_VECTOR, signature)
    # an agent or coordinator that knows nothing of signatures reads the same update
    assert Update.read(payload) == Update.read(UPDATE_VECTOR)


def test_why_an_update_is_not_signed() -> None:
    keys = {"device-01": KEY.public_key()}
    assert update_signature_problem(keys, TOPIC, "device-01", SIGNED_UPDATE_VECTOR) is None
    assert update_signature_problem(keys, TOPIC, "device-01", UPDATE_VECTOR) == (
        "missing signature: the message has no 'sig' field")
    other = sign_message(Ed25519PrivateKey.generate(), TOPIC, UPDATE_VECTOR)
    problem = update_signature_problem(keys, TOPIC, "device-01", other)
    assert problem == f"invalid signature: not signed by device-01's key {key_text(KEY)}"
    # the same bytes on another device's topic (a replay as another device): invalid
    moved = {"device-02": KEY.public_key()}
    assert "invalid" in str(update_signature_problem(
        moved, "fedbus/update/device-02", "device-02", SIGNED_UPDATE_VECTOR))
    assert update_signature_problem({}, TOPIC, "device-01", SIGNED_UPDATE_VECTOR) == (
        "no key is registered for device 'device-01'; updates must be signed")
    assert "malformed" in str(update_signature_problem(keys, TOPIC, "device-01", b"\xc1"))


def test_validation_refuses_an_unsigned_update_after_the_identity_check() -> None:
    keys = {"device-01": KEY.public_key()}

    def check(device: str, payload: bytes) -> str | None:
        return update_signature_problem(keys, f"fedbus/update/{device}", device, payload)

    common = dict(run_id="hR5tWq2LmZ8vXc1E", task_id="digits-1", expected_shapes={},
                  current_version=12, limits=ValidationLimits(1 << 20, 100.0, 10),
                  ledger=_NoLedger(), signature_check=check)
    refused = validate_update(UPDATE_VECTOR, topic_device="device-01", **common)
    assert isinstance(refused, Rejected) and refused.reason == "signature"
    assert refused.update_id == "q3JxS0dK9vTb2LmA" and "signature" in REJECT_REASONS
    # the topic is still the identity: dev on another topic is device_mismatch first
    other = validate_update(SIGNED_UPDATE_VECTOR, topic_device="device-02", **common)
    assert isinstance(other, Rejected) and other.reason == "device_mismatch"
    # signed: the checks go on (an empty delta has no tensors of this model: none expected)
    passed = validate_update(SIGNED_UPDATE_VECTOR, topic_device="device-01", **common)
    assert not (isinstance(passed, Rejected) and passed.reason == "signature")


class _NoLedger:
    def verdict(self, update_id: str) -> None:
        return None

    def work(self, device_id: str, base_version: int) -> None:
        return None


# -- the device-key file -------------------------------------------------------------------


def test_the_device_key_file_format() -> None:
    other = Ed25519PrivateKey.generate().public_key()
    text = ("# comment\n\n  device-01   ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\n"
            f"pi-2\t{key_text(other)}\n")
    keys = parse_device_keys(text)
    assert sorted(keys) == ["device-01", "pi-2"]
    assert key_text(keys["device-01"]) == key_text(KEY)
    assert parse_device_keys(device_keys_text(keys)).keys() == keys.keys()
    assert device_keys_text({"device-01": KEY.public_key()}).splitlines()[1] == (
        "device-01 ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
    for bad, message in (
        ("device-01", "line 1: expected"),
        ("device-01 ed25519:abc", "line 1: 'ed25519:abc' is not"),
        ("bad/id ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "line 1: invalid"),
        ("# x\nd1 -----BEGIN", "line 2: the key must be ed25519"),
        ("d1 ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\n"
         "d1 ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "line 2: device 'd1' is"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_device_keys(bad)


def test_registering_keys_and_reading_them_live(tmp_path: Path) -> None:
    path = tmp_path / "signing" / "devices.pub"
    live = DeviceKeyFile(path)
    assert live.keys() == {}  # no file yet: no key
    register_device_key(path, "d1", KEY.public_key())
    assert [key_text(k) for k in live.keys().values()] == [key_text(KEY)]
    second = Ed25519PrivateKey.generate()
    register_device_key(path, "d2", second.public_key())
    register_device_key(path, "d1", second.public_key())  # a new bundle: replaced
    assert {d: key_text(k) for d, k in live.keys().items()} == {
        "d1": key_text(second), "d2": key_text(second)}
    register_device_key(path, "d1", None)  # removed
    assert sorted(live.keys()) == ["d2"]
    register_device_key(path, "nobody", None)  # nothing to remove: unchanged
    path.write_text("d3 broken\n")  # a broken file keeps what was read before
    assert sorted(live.keys()) == ["d2"]
    with pytest.raises(ConfigError, match="cannot use the device-key file"):
        register_device_key(path, "d1", KEY.public_key())
    path.unlink()
    assert live.keys() == {}


def test_a_bundle_carries_the_devices_signing_key(tmp_path: Path) -> None:
    address = BrokerAddress("broker.lan", None, 8883, 8884, "fedbus")
    key = Ed25519PrivateKey.generate()
    target = write_bundle(tmp_path / "pi", address, "pi", ca_pem=b"ca", password="pw",
                          signing_key_pem=private_key_pem(key))
    assert stat.S_IMODE(os.stat(target / "signing.key").st_mode) == 0o600
    access = read_credentials(target, "pi")
    assert access.signing_key_file == target / "signing.key"
    assert key_text(load_private_key(target / "signing.key")) == key_text(key)


# -- a coordinator that requires signatures, on a real broker ---------------------------------


@pytest.mark.broker
def test_a_real_coordinator_takes_signed_updates_and_refuses_forged_ones(
    broker: LocalBroker, tmp_path: Path
) -> None:
    keys_file = tmp_path / "devices.pub"
    dev_a = Ed25519PrivateKey.generate()
    register_device_key(keys_file, "dev-a", dev_a.public_key())
    config = CoordinatorConfig(
        host=broker.host, port=broker.port, state_dir=None, model_args=ARGS, buffer_size=50,
        require_signed_updates=True, device_keys=keys_file, device_share=0.0,
    )
    service = CoordinatorService(config, password=broker.coordinator.password)
    thread = threading.Thread(target=service.run, daemon=True)
    receipts: list[dict[str, object]] = []
    clients: list[MqttClient] = []

    def device(name: str) -> MqttClient:
        client = MqttClient(
            ConnectionSettings(broker.host, broker.port, name, name,
                               broker.credentials(name).password),
            on_message=lambda m: receipts.append(unpack(m.payload, "receipt")),
        )
        client.subscribe(service.topics.receipt(name), qos=1)
        client.start()
        assert client.wait_connected(5)
        clients.append(client)
        return client

    def update(uid: str, name: str, key: Ed25519PrivateKey | None) -> bytes:
        delta = {n: np.full_like(a, 0.001) for n, a in service.core.state.items()}
        body = pack(Update(uid, name, service.task.task_id, 0, 5, encode_delta(delta, "fp32"),
                           run_id=service.task.run_id).to_wire())
        return body if key is None else sign_message(key, service.topics.update(name), body)

    def verdict(uid: str) -> tuple[object, object]:
        wait_for(lambda: any(r["update_id"] == uid for r in receipts), 5, f"receipt {uid}")
        r = next(r for r in receipts if r["update_id"] == uid)
        return r["accepted"], r["reason"]

    try:
        thread.start()
        wait_for(lambda: service.client.connected, 5, "the coordinator connected")
        a, b = device("dev-a"), device("dev-b")
        topic_a = service.topics.update("dev-a")
        assert a.publish(topic_a, update("ok1", "dev-a", dev_a), qos=1).wait(5)
        assert verdict("ok1") == (True, None)
        # someone publishing as dev-a (its password leaked, an ACL mistake): no dev-a key
        assert a.publish(topic_a, update("forged1", "dev-a", Ed25519PrivateKey.generate()),
                         qos=1).wait(5)
        assert verdict("forged1") == (False, "signature")
        assert a.publish(topic_a, update("bare1", "dev-a", None), qos=1).wait(5)
        assert verdict("bare1") == (False, "signature")
        # dev-b has no key yet; registering one counts from the next update, no restart
        dev_b = Ed25519PrivateKey.generate()
        topic_b = service.topics.update("dev-b")
        assert b.publish(topic_b, update("b1", "dev-b", dev_b), qos=1).wait(5)
        assert verdict("b1") == (False, "signature")
        time.sleep(0.01)  # a new modification time for the rewritten file
        register_device_key(keys_file, "dev-b", dev_b.public_key())
        assert b.publish(topic_b, update("b2", "dev-b", dev_b), qos=1).wait(5)
        assert verdict("b2") == (True, None)
        counters = service.core.counters
        assert counters["rejected_signature"] == 3 and counters["updates_accepted"] == 2
    finally:
        for client in clients:
            client.stop()
        service.stop()
        thread.join(10)
