"""Regional brokers bridged to a root broker (fedbus.bridge): the bridge section and the
root's role by hand, and one run of a coordinator on a root broker with virtual devices on
two regional brokers, one of them started by the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fedbus.bridge import (
    BridgeSpec,
    bridge_role,
    parse_address,
    read_bridge_bundle,
    render_bridge,
    with_bridge_accounts,
)
from fedbus.dynsec import check_new_device_id
from fedbus.errors import ConfigError
from tests.conftest import MqttClientFactory


def test_bridge_section_with_a_certificate() -> None:
    spec = BridgeSpec(region="eu", host="root.example", port=8884, prefix="lab/t7",
                      ca_file=Path("/b/ca.crt"), username="fedbus-bridge-eu",
                      cert_file=Path("/b/bridge.crt"), key_file=Path("/b/bridge.key"))
    assert render_bridge(spec).splitlines() == [
        "connection fedbus-bridge-eu",
        "address root.example:8884",
        "bridge_protocol_version mqttv50",
        "cleansession false",
        "notifications false",
        "try_private true",
        "restart_timeout 2 30",
        "remote_clientid fedbus-bridge-eu",
        "local_clientid fedbus-bridge-eu-local",
        "bridge_cafile /b/ca.crt",
        "bridge_insecure false",
        "bridge_require_ocsp false",
        "bridge_tls_version tlsv1.2",
        "bridge_certfile /b/bridge.crt",
        "bridge_keyfile /b/bridge.key",
        "topic lab/t7/update/+ out 1",
        "topic lab/t7/status/+ out 1",
        "topic lab/t7/task in 1",
        "topic lab/t7/model in 1",
        "topic lab/t7/model/chunk/+ in 1",
        "topic lab/t7/model_delta in 1",
        "topic lab/t7/receipt/+ in 1",
    ]


def test_bridge_section_with_a_password() -> None:
    spec = BridgeSpec(region="us-1", host="10.0.0.5", port=8883, prefix="fedbus",
                      ca_file=Path("/b/ca.crt"), username="fedbus-bridge-us-1", password="pw")
    lines = render_bridge(spec).splitlines()
    assert "remote_username fedbus-bridge-us-1" in lines and "remote_password pw" in lines
    assert not any(line.startswith("bridge_certfile") for line in lines)


@pytest.mark.parametrize("change", [
    {"region": "EU"}, {"region": "-eu"}, {"port": 0}, {"password": "pw"},  # both logins
    {"key_file": None}, {"host": "root example"},
])
def test_bad_bridge_specs_are_refused(change: dict) -> None:
    base = dict(region="eu", host="root", port=8884, prefix="fedbus", ca_file=Path("/ca"),
                username="fedbus-bridge-eu", cert_file=Path("/c"), key_file=Path("/k"))
    with pytest.raises(ConfigError):
        BridgeSpec(**{**base, **change})  # type: ignore[arg-type]


def test_the_bridge_role_publishes_updates_and_statuses_and_reads_the_coordinators() -> None:
    acls = {(a["acltype"], a["topic"]) for a in bridge_role("fedbus", "eu")["acls"]}
    assert acls == {
        ("publishClientSend", "fedbus/update/+"), ("publishClientSend", "fedbus/status/+"),
        *((kind, topic) for topic in ("fedbus/task", "fedbus/model", "fedbus/model/chunk/+",
                                      "fedbus/model_delta", "fedbus/receipt/+")
          for kind in ("publishClientReceive", "subscribeLiteral")),
    }
    assert bridge_role("fedbus", "eu")["rolename"] == "fedbus-bridge-eu"


def test_bridge_accounts_are_added_once() -> None:
    config = {"clients": [{"username": "coordinator"}], "roles": []}
    added = with_bridge_accounts(config, "fedbus", {"eu": "pw"})
    assert added is not None
    assert [c["username"] for c in added["clients"]] == ["coordinator", "fedbus-bridge-eu"]
    assert added["clients"][1]["roles"] == [{"rolename": "fedbus-bridge-eu"}]
    assert with_bridge_accounts(added, "fedbus", {"eu": "pw"}) is None


def test_bridge_names_are_no_device_ids_and_addresses_parse() -> None:
    with pytest.raises(ValueError):
        check_new_device_id("fedbus-bridge-eu")
    assert parse_address("root.lan:8884") == ("root.lan", 8884)
    assert parse_address("[::1]:8884") == ("::1", 8884)
    for bad in ("root.lan", "root.lan:0", ":8884", "root:x"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_cli_refuses_a_missing_bundle(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedbus", "broker", "--dir", str(tmp_path / "b"),
         "--bridge-bundle", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "bridge.json not found" in out.stderr


def start_root_coordinator(
    root: Any, state_dir: Path, task_id: str, buffer_size: int, eval_data: Any
) -> tuple[Any, threading.Thread, list]:
    """A FedBuff coordinator on the root broker ``root`` (a LocalBroker), run in a thread for
    two versions at most: (the service, its thread, a list that gets its RunSummary)."""
    from coordinator.config import CoordinatorConfig
    from coordinator.service import CoordinatorService

    service = CoordinatorService(
        CoordinatorConfig(
            host=root.host, port=root.port, prefix=root.prefix, task_id=task_id,
            mode="fedbuff", buffer_size=buffer_size, max_versions=2, duration=30.0,
            state_dir=state_dir, signing_key=root.signing_key_file,
        ),
        password=root.coordinator.password, eval_data=eval_data,
    )
    summary: list = []
    thread = threading.Thread(target=lambda: summary.append(service.run()), daemon=True)
    thread.start()
    return service, thread, summary


def test_coordinator_on_the_root_and_devices_on_two_bridged_regions(
    tmp_path: Path, mqtt_client: MqttClientFactory,
) -> None:
    from bench.fleet_sim import FleetSim, parse_args
    from fedbus.broker import LocalBroker
    from fedbus.datasets import load_digits, train_test_split, write_npz
    from fedbus.processes import terminate

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    pool = tmp_path / "pool.npz"
    write_npz(pool, x_train, y_train)
    root = LocalBroker(tmp_path / "root", device_ids=[], bridge_regions=["eu", "us"])
    root.start()
    eu = LocalBroker(tmp_path / "eu", device_ids=["eu-01", "eu-02"],
                     bridge=read_bridge_bundle(root.bridge_bundle_dir("eu")))
    us_dir = tmp_path / "us"
    us = subprocess.Popen(
        [sys.executable, "-m", "fedbus", "broker", "--dir", str(us_dir), "--device-id",
         "us-01", "--device-id", "us-02", "--bridge-bundle",
         str(root.bridge_bundle_dir("us")),
         "--bridge-to", f"127.0.0.1:{root.mtls_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    service = None
    try:
        eu.start()
        assert us.stdout is not None
        for line in us.stdout:
            if "bridged to" in line:
                break
        assert us.poll() is None, "the regional broker of the CLI did not start"
        # the regional brokers hand their devices the root coordinator's key
        for creds in (eu.credentials_file, us_dir / "credentials.json"):
            assert json.loads(creds.read_text())["coordinator_key"] == root.coordinator_key
        service, thread, summary = start_root_coordinator(
            root, tmp_path / "run", "bridged", 4, (x_test, y_test))
        sims = [FleetSim(parse_args([
            "--credentials", str(creds), "--devices", "2", "--data", str(pool),
            "--period", "0.3", "--connect-seconds", "0.2", "--duration", "15",
            "--out", str(tmp_path / f"{ids[0]}.json")]))
            for creds, ids in ((eu.credentials_file, ["eu-01", "eu-02"]),
                               (us_dir / "credentials.json", ["us-01", "us-02"]))]
        runs = [threading.Thread(target=s.run, daemon=True) for s in sims]
        start = time.monotonic()
        for t in runs:
            t.start()
        thread.join(25)
        assert not thread.is_alive(), "the coordinator did not end its run"
        for s in sims:
            s.stop_requested = True
        for t in runs:
            t.join(10)
        print(f"bridged run: {time.monotonic() - start:.1f} s")
        # the devices' retained statuses reached the root retained, through both bridges
        # (a status the devices send while they stop may also arrive live, unretained)
        retained: set[str] = set()

        def on_status(_c: object, _u: object, m: Any) -> None:
            if m.retain:
                retained.add(m.topic.rsplit("/", 1)[1])

        mqtt_client(root, "fedbus-operator", on_message=on_status).subscribe(
            "fedbus/status/+", 1)
        deadline = time.monotonic() + 5
        while len(retained) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert retained == {"eu-01", "eu-02", "us-01", "us-02"}
    finally:
        if service is not None:
            service.stop()
        terminate(us, 10.0)
        eu.stop()
        root.stop()
    assert summary[0].final_version == 2
    for sim, region in zip(sims, ("eu", "us"), strict=True):
        result = sim.result()
        assert result["counters"]["publish_refused"] == 0
        receipts = [u for u in result["updates"].values() if u["accepted"] is not None]
        # updates went up, receipts came down, through this region's bridge
        assert any(u["accepted"] for u in receipts), region
        assert result["counters"]["models_received"] >= 2, region  # models came down
