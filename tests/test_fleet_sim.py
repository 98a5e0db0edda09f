"""The fleet simulator (bench.fleet_sim) and the fleet benchmark's arithmetic (bench.fleet):
pure parts by hand, and one run of 20 virtual devices against a real broker and coordinator."""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from bench.fleet import (
    Sampler,
    accuracy_after,
    fleet_settings,
    folded_latencies,
    interpolate,
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


def test_fleet_settings_follow_the_fleet() -> None:
    s = fleet_settings(100, rate=40.0, updates=1200)
    # the coordinator's fleet scaling: K = sqrt(100) = 10, limit 50 (4 · 100 / 10 = 40 is
    # below the floor); 1200 / 10 versions
    assert (s.period, s.buffer_size, s.max_staleness, s.max_versions) == (2.5, 10, 50, 120)
    big = fleet_settings(5000, rate=40.0, updates=1200)
    assert big.buffer_size == 71 and big.max_versions == 17  # ceil(sqrt 5000), ceil(1200/71)
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


def test_accuracy_after_counts_applied_updates() -> None:
    history = [(0, 0.0, 0, 0.1), (1, 1.0, 4, 0.5), (2, 2.0, 4, 0.7), (3, 3.0, 4, 0.8)]
    assert accuracy_after(history, 8) == (8, 0.7)
    assert accuracy_after(history, 100) == (12, 0.8)


def test_twenty_virtual_devices_against_the_real_broker_and_coordinator(
    tmp_path: Path,
) -> None:
    from coordinator.config import CoordinatorConfig
    from coordinator.service import CoordinatorService
    from fedbus.broker import LocalBroker, default_device_ids
    from fedbus.datasets import load_digits, train_test_split, write_npz

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    pool = tmp_path / "pool.npz"
    write_npz(pool, x_train, y_train)
    broker = LocalBroker(tmp_path / "broker", device_ids=default_device_ids(20))
    broker.start()
    try:
        service = CoordinatorService(
            CoordinatorConfig(
                host=broker.host, port=broker.port, prefix=broker.prefix, task_id="fleet",
                mode="fedbuff", buffer_size=4, max_versions=3, duration=60.0,
                state_dir=tmp_path / "run", signing_key=broker.signing_key_file,
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
        sim.run()
        thread.join(20)
        assert not thread.is_alive(), "the coordinator did not end its run"
    finally:
        service.stop()
        broker.stop()
    result = sim.result()
    counters = result["counters"]
    assert counters["connects"] == 20 and counters["connect_failures"] == 0
    assert counters["publish_refused"] == 0
    assert summary[0].final_version == 3
    verdicts = [u for u in result["updates"].values() if u["accepted"] is not None]
    accepted = [u for u in verdicts if u["accepted"]]
    assert len(accepted) >= 12  # three versions of four updates each
    assert all(u["reason"] in (None, "run_ended", "stale") for u in verdicts)
    # on-demand model subscription (revision 2.9): a device unsubscribes for every training,
    # and once the broker has confirmed it, no model reaches the device
    assert counters["unsubscribes"] >= counters["trainings"]  # some queued when it ended
    assert counters["models_after_unsuback"] == 0


def test_cpu_of_a_process_that_ended_just_after_the_window() -> None:
    s = Sampler({"c": 1}, interval=0.25)
    s.samples = [{"t": 0.0, "c_cpu": 0.0}, {"t": 1.0, "c_cpu": 2.0}, {"t": 1.25, "c_cpu": None}]
    assert s.cpu_between("c", 0.5, 0.75) == pytest.approx(0.5)
    assert s.cpu_between("c", 0.5, 1.4) == pytest.approx(1.0)  # up to its last sample
    assert s.cpu_between("c", 0.5, 1.6) is None  # more than two intervals after it
