"""The fleet simulator (bench.fleet_sim) and the fleet benchmark's arithmetic (bench.fleet):
pure parts by hand, and one run of 20 virtual devices against a real broker and coordinator."""

from __future__ import annotations

import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.fleet import (
    Sampler,
    accuracy_after,
    fleet_settings,
    folded_latencies,
    interpolate,
    mean_accuracy_to,
)
from bench.fleet_sim import FleetSim, compute_seconds, parse_args, shard_indices, training_seed


def test_compute_seconds_repeat_the_profile_and_keep_the_mean() -> None:
    # speeds 1, 2, 4 over 6 devices: mean factor 7/3, so the scale is 7 / (7/3) = 3
    assert compute_seconds(6, 7.0, [1, 2, 4]) == pytest.approx([3, 6, 12, 3, 6, 12])
    assert compute_seconds(1, 5.0, [2]) == [5.0]
    with pytest.raises(ValueError):
        compute_seconds(0, 1.0, [1])
    with pytest.raises(ValueError):
        compute_seconds(3, 1.0, [0.0])


def test_shards_are_distinct_per_device_and_reproducible() -> None:
    a = shard_indices(100, 10, 0, seed=1)
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
    assert np.array_equal(a, shard_indices(100, 10, 0, seed=1))
    assert not np.array_equal(a, shard_indices(100, 10, 1, seed=1))
    with pytest.raises(ValueError):
        shard_indices(5, 6, 0, seed=0)


def test_training_seed_is_the_agents() -> None:
    expected = (3 * 1_000_003 + zlib.crc32(b"device-07") + 12) % 2**31
    assert training_seed(3, "device-07", 12) == expected


def test_fleet_settings_follow_the_training_fleet() -> None:
    s = fleet_settings(100, period=2.5, updates=1200)
    # the coordinator's fleet scaling under its concurrency limit: K = ⌈100 / 7⌉ = 15
    # (updates about 7 versions old), limit 50 (⌈4 · 100 / 15⌉ = 27 is below the floor);
    # ⌈1200 / 15⌉ versions
    assert (s.period, s.buffer_size, s.max_staleness, s.max_versions) == (2.5, 15, 50, 80)
    # at most 100 train at a time (revision 2.10): a fleet of 5,000 steps as one of 100
    big = fleet_settings(5000, period=2.5, updates=1200)
    assert (big.period, big.buffer_size, big.max_versions) == (2.5, 15, 80)
    assert fleet_settings(5000, concurrency=400).buffer_size == 58  # ⌈400 / 7⌉
    assert fleet_settings(4).buffer_size == 4 and fleet_settings(4).max_staleness == 50


def test_interpolate_between_samples() -> None:
    points = [(0.0, 1.0), (2.0, 3.0), (4.0, 3.0)]
    assert interpolate(points, 1.0) == 2.0
    assert interpolate(points, 3.0) == 3.0
    assert interpolate(points, 5.0) is None


def test_latency_runs_to_the_version_an_update_was_folded_into() -> None:
    updates = {
        "a": {"published_at": 10.0},
        "b": {"published_at": 10.0},  # rejected: never folded in
        "c": {"published_at": 11.0},  # folded into a version not recorded
        "d": {"published_at": 30.0},  # outside the window
        "e": {"published_at": 12.0},  # no verdict
    }
    verdicts = {"a": (True, None, 3), "b": (False, "stale", None), "c": (True, None, 9),
                "d": (True, None, 3)}
    assert folded_latencies(updates, verdicts, {3: 12.5}, 0.0, 20.0) == [2.5]


def test_mean_accuracy_to_averages_the_versions_up_to_the_count() -> None:
    history = [(0, 0.0, 0, 0.1), (1, 1.0, 4, 0.5), (2, 2.0, 4, None), (3, 3.0, 4, 0.7),
               (4, 4.0, 4, 0.9)]
    assert mean_accuracy_to(history, 12, versions=2) == pytest.approx(0.6)  # v1 and v3
    assert mean_accuracy_to(history, 99, versions=3) == pytest.approx(0.7)  # the last three
    assert mean_accuracy_to([], 5) is None


def test_accuracy_after_counts_applied_updates() -> None:
    history = [(0, 0.0, 0, 0.1), (1, 1.0, 4, 0.5), (2, 2.0, 4, 0.7), (3, 3.0, 4, 0.8)]
    assert accuracy_after(history, 8) == (8, 0.7)
    assert accuracy_after(history, 100) == (12, 0.8)


def _uninvited_update(broker: object, device: str, tmp_path: Path) -> dict:
    """One valid update from ``device`` on the current model, sent without an invitation
    (and without a status: the device holds none); its receipt."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedbus.codec_spec import parse_codec
    from fedbus.envelope import unpack
    from fedbus.messages import Task, Update, new_update_id
    from fedbus.update_codec import encode_update_delta
    from fedbus.zoo import build_model, state_shapes

    got: dict[str, bytes] = {}
    arrived = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        got[msg.topic.rsplit("/", 1)[-1] if "/receipt/" in msg.topic else "task"] = msg.payload
        arrived.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device,
                         protocol=mqtt.MQTTv5)
    b: Any = broker
    client.username_pw_set(device, b.credentials(device).password)
    client.on_message = on_message
    client.connect(b.host, b.port)
    client.loop_start()
    try:
        client.subscribe(b.topics.receipt(device), qos=1)
        client.subscribe(b.topics.task, qos=1)
        assert arrived.wait(10) and "task" in got
        task = Task.from_wire(unpack(got["task"]))
        assert task.by_invitation  # revision 2.10: the run says so
        shapes = state_shapes(build_model(task.model.arch, task.model.args))
        delta = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
        wire, compression = encode_update_delta(delta, parse_codec(task.codec))
        update = Update(new_update_id(), device, task.task_id, 0, 32, wire,
                        run_id=task.run_id, compression=compression)
        arrived.clear()
        client.publish(b.topics.update(device), update.pack(), qos=1)
        deadline = time.monotonic() + 10
        while device not in got and time.monotonic() < deadline:
            arrived.wait(0.2)
        return unpack(got[device])
    finally:
        client.disconnect()
        client.loop_stop()


def test_twenty_virtual_devices_by_invitation_against_the_real_broker_and_coordinator(
    tmp_path: Path,
) -> None:
    """Revision 2.10: at most 6 of 20 devices train at a time, each once per invitation;
    an update from a device holding no invitation is refused as not_selected."""
    from coordinator.config import CoordinatorConfig
    from coordinator.service import CoordinatorService
    from fedbus.broker import LocalBroker, default_device_ids
    from fedbus.datasets import load_digits, train_test_split, write_npz

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    pool = tmp_path / "pool.npz"
    write_npz(pool, x_train, y_train)
    ids = default_device_ids(21)  # device-21 sends without invitation
    broker = LocalBroker(tmp_path / "broker", device_ids=ids)
    broker.start()
    try:
        service = CoordinatorService(
            CoordinatorConfig(
                host=broker.host, port=broker.port, prefix=broker.prefix, task_id="fleet",
                mode="fedbuff", buffer_size=4, max_versions=3, duration=60.0,
                concurrency=6, state_dir=tmp_path / "run",
                signing_key=broker.signing_key_file,
            ),
            password=broker.coordinator.password, eval_data=(x_test, y_test),
        )
        summary: list = []
        thread = threading.Thread(target=lambda: summary.append(service.run()), daemon=True)
        thread.start()
        args = parse_args(["--credentials", str(broker.credentials_file), "--devices", "20",
                           "--data", str(pool), "--period", "0.6", "--speeds", "1", "2",
                           "--model-subscription", "on-demand", "--connect-seconds", "0.5",
                           "--duration", "40", "--out", str(tmp_path / "sim.json")])
        sim = FleetSim(args)
        sim_thread = threading.Thread(target=sim.run, daemon=True)
        sim_thread.start()
        deadline = time.monotonic() + 20  # once the fleet (20) is over the limit (6)
        while sim.counters.connects < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        receipt = _uninvited_update(broker, ids[-1], tmp_path)
        sim_thread.join(40)
        thread.join(20)
        assert not thread.is_alive(), "the coordinator did not end its run"
        core_counters = service.core.counters
    finally:
        service.stop()
        broker.stop()
    assert (receipt["accepted"], receipt["reason"]) == (False, "not_selected")
    result = sim.result()
    counters = result["counters"]
    assert counters["connects"] == 20 and counters["connect_failures"] == 0
    assert counters["publish_refused"] == 0
    assert summary[0].final_version == 3
    verdicts = [u for u in result["updates"].values() if u["accepted"] is not None]
    accepted = [u for u in verdicts if u["accepted"]]
    assert len(accepted) >= 12  # three versions of four updates each
    # every device trained only when invited: none of its updates was refused for it
    assert all(u["reason"] in (None, "run_ended", "stale") for u in verdicts)
    assert counters["trainings"] <= counters["invitations"]
    # revision 2.13: a status crossing the next invitation (the idle after every update)
    # is no loss: invitations are not sent twice as a rule (measured: none of 19-20 was)
    assert core_counters["invitations_resent"] <= counters["invitations"] // 4
    assert counters["invitations_repeated"] <= core_counters["invitations_resent"]
    # a device follows the model only from an invitation to its training (and once at
    # connect, before the task): about one model per training
    assert counters["models_received"] <= counters["trainings"] + 20 + 6
    assert counters["models_after_unsuback"] == 0


def test_cpu_of_a_process_that_ended_just_after_the_window() -> None:
    s = Sampler({"c": 1}, interval=0.25)
    s.samples = [{"t": 0.0, "c_cpu": 0.0}, {"t": 1.0, "c_cpu": 2.0}, {"t": 1.25, "c_cpu": None}]
    assert s.cpu_between("c", 0.5, 0.75) == pytest.approx(0.5)
    assert s.cpu_between("c", 0.5, 1.4) == pytest.approx(1.0)  # up to its last sample
    assert s.cpu_between("c", 0.5, 1.6) is None  # more than two intervals after it
