"""Hierarchical aggregation end to end (protocol revision 2.11): three real Mosquitto
brokers on one machine, a root with the coordinator and two bridged regions, each with a
regional aggregator (one started by the real CLI) and virtual devices of the fleet
simulator that know nothing of it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path


def test_two_regions_send_partial_updates_to_the_root_coordinator(tmp_path: Path) -> None:
    from bench.fleet_sim import FleetSim, parse_args
    from coordinator.region_service import RegionAggregator, RegionConfig
    from fedbus.bridge import read_bridge_bundle
    from fedbus.broker import LocalBroker
    from fedbus.datasets import load_digits, train_test_split, write_npz
    from fedbus.processes import terminate
    from tests.test_bridge import start_root_coordinator

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    pool = tmp_path / "pool.npz"
    write_npz(pool, x_train, y_train)
    root = LocalBroker(tmp_path / "root", device_ids=[], bridge_regions=["eu", "us"])
    start = time.monotonic()
    root.start()
    regions: dict[str, LocalBroker] = {}
    service = None
    cli = None
    in_thread = None
    try:
        regions = {r: LocalBroker(tmp_path / r, device_ids=[f"{r}-01", f"{r}-02"],
                                  bridge=read_bridge_bundle(root.bridge_bundle_dir(r)),
                                  region_aggregator=True)
                   for r in ("eu", "us")}
        for broker in regions.values():
            broker.start()
        # eu: the real CLI; us: in this process
        cli = subprocess.Popen(
            [sys.executable, "-m", "fedbus", "region-aggregator", "--region", "eu",
             "--credentials", str(regions["eu"].credentials_file), "--state-dir",
             str(tmp_path / "eu-state"), "--partial-size", "2", "--partial-timeout", "1",
             "--duration", "60"],
            stdout=(tmp_path / "eu.log").open("w"), stderr=subprocess.STDOUT, text=True)
        us = RegionAggregator(RegionConfig(
            region="us", host=regions["us"].host, port=regions["us"].port,
            state_dir=tmp_path / "us-state", partial_size=2, partial_timeout=1.0),
            regions["us"].coordinator.password)
        us_counters: list[dict[str, int]] = []
        in_thread = threading.Thread(target=lambda: us_counters.append(us.run()), daemon=True)
        in_thread.start()
        # the aggregators take their devices' updates from the start (an update published
        # before an aggregator's first subscription has no subscriber to go to; later, its
        # durable session keeps them)
        deadline = time.monotonic() + 20
        while "aggregating the updates" not in (tmp_path / "eu.log").read_text():
            assert time.monotonic() < deadline and cli.poll() is None, \
                (tmp_path / "eu.log").read_text()
            time.sleep(0.05)
        assert us.ready.wait(20)
        service, thread, summary = start_root_coordinator(
            root, tmp_path / "run", "regions", 4, (x_test, y_test))  # K: device updates
        sims = [FleetSim(parse_args([
            "--credentials", str(broker.credentials_file), "--devices", "2", "--data",
            str(pool), "--period", "0.2", "--connect-seconds", "0.2", "--duration", "15",
            "--out", str(tmp_path / f"{r}.json")])) for r, broker in regions.items()]
        runs = [threading.Thread(target=s.run, daemon=True) for s in sims]
        for t in runs:
            t.start()
        thread.join(25)
        assert not thread.is_alive(), (tmp_path / "eu.log").read_text()
        counters = service.counters()
        for s in sims:
            s.stop_requested = True
        for t in runs:
            t.join(10)
    finally:
        if service is not None:
            service.stop()
        if cli is not None:
            terminate(cli, 10.0)
        if in_thread is not None:
            us.stop()
            in_thread.join(10)
        for broker in regions.values():
            broker.stop()
        root.stop()
    print(f"three brokers: {time.monotonic() - start:.1f} s")
    assert summary[0].final_version == 2
    # the root saw partial updates only: every update it accepted folds device updates
    assert counters["partials_accepted"] >= 2
    assert counters["updates_accepted"] == counters["partials_accepted"]
    assert counters["partial_parts"] >= 2 * counters["partials_accepted"] - 2
    # K counts the device updates a partial folds (revision 2.12): 2 versions of K = 4
    assert counters["partial_parts"] >= 8
    assert counters["rejected_region_quota"] == 0  # honest regions stay within their quota
    output = (tmp_path / "eu.log").read_text()
    assert "region eu: " in output and "partials_sent" in output, output
    # the CLI took the root's key from the regional credentials and followed only the task
    # and models the root signed (a forged one is ignored: tests/test_regional.py)
    assert "must be signed by the root coordinator's key ed25519:" in output, output
    assert "bad_signatures 0" in output, output
    assert us_counters and us_counters[0]["partials_sent"] >= 1
    for sim, region in zip(sims, ("eu", "us"), strict=True):
        result = sim.result()
        assert result["counters"]["publish_refused"] == 0
        # the devices changed nothing and got their receipts from their region's aggregator
        assert any(u["accepted"] for u in result["updates"].values()), region
        assert result["counters"]["models_received"] >= 2, region  # models came down
