"""Bytes through the root broker and accuracy, flat against bridged against hierarchical:
``python -m bench.bridge_bytes``.

The same run three ways, alternated ``--pairs`` times: a coordinator on the root broker
(FedBuff, the default ``quorum`` aggregator) and ``--devices`` virtual devices
(``bench.fleet_sim``, model subscription ``always``, so every device receives every model
version), either all on the root broker (``flat``), or split over two regional brokers
bridged to it (``bridged``), or the same with a regional aggregator beside each regional
broker (``hierarchical``, protocol revision 2.11: each folds ``--partial-size`` device
updates into one partial update, and only partials cross to the root). Every way makes
``--versions`` versions from the same number of device updates per version: the root's
buffer K is ``--buffer`` device updates when they come whole, ``--buffer`` /
``--partial-size`` partials when they come folded. What the root's mosquitto read from and
wrote to its sockets is its ``/proc/<pid>/io`` ``rchar``/``wchar`` over the run, less what it
wrote to its log file (persistence is written only at an autosave, 60 s, or at exit: after
the reading); the accuracy is the coordinator's held-out accuracy of the last version.
Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REGIONS = ("eu", "us")
MODES = ("flat", "bridged", "hierarchical")


def _io(pid: int) -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(1, n + 1)]


def one_run(root_dir: Path, devices: int, mode: str, versions: int,
            pool: Path, eval_data: Any, *, buffer: int = 4,
            partial_size: int = 2, partial_codec: str = "int8") -> dict[str, Any]:
    from bench.fleet_sim import FleetSim, parse_args
    from coordinator.config import CoordinatorConfig
    from coordinator.region_service import RegionAggregator, RegionConfig
    from coordinator.service import CoordinatorService
    from fedbus.bridge import read_bridge_bundle
    from fedbus.broker import LocalBroker

    bridged = mode != "flat"
    folded = mode == "hierarchical"
    half = devices // 2
    root = LocalBroker(root_dir / "root", device_ids=[] if bridged else _ids("dev", devices),
                       bridge_regions=REGIONS if bridged else ())
    root.start()
    regions: list[LocalBroker] = []
    aggregators: list[tuple[RegionAggregator, threading.Thread]] = []
    try:
        if bridged:
            for region in REGIONS:
                regional = LocalBroker(root_dir / region, device_ids=_ids(region, half),
                                       bridge=read_bridge_bundle(root.bridge_bundle_dir(region)),
                                       region_aggregator=folded)
                regional.start()
                regions.append(regional)
                if folded:
                    agg = RegionAggregator(RegionConfig(
                        region=region, host=regional.host, port=regional.port,
                        state_dir=root_dir / f"{region}-state", partial_size=partial_size,
                        partial_timeout=5.0, partial_codec=partial_codec,
                        coordinator_key=root.coordinator_key),
                        regional.coordinator.password)
                    thread = threading.Thread(target=agg.run, daemon=True)
                    thread.start()
                    aggregators.append((agg, thread))
            time.sleep(1.0)  # the bridges connect
        fleets = ([(r.credentials_file, half) for r in regions] if bridged
                  else [(root.credentials_file, devices)])
        service = CoordinatorService(
            CoordinatorConfig(host=root.host, port=root.port, prefix=root.prefix,
                              task_id="bridge-bytes", mode="fedbuff",
                              buffer_size=buffer,
                              max_versions=versions, duration=120.0,
                              state_dir=root_dir / "run", signing_key=root.signing_key_file),
            password=root.coordinator.password, eval_data=eval_data)
        assert root.pid is not None
        log_before = root.log_file.stat().st_size
        r0, w0 = _io(root.pid)
        summary: list[Any] = []
        coord = threading.Thread(target=lambda: summary.append(service.run()), daemon=True)
        coord.start()
        sims = [FleetSim(parse_args([
            "--credentials", str(creds), "--devices", str(n), "--data", str(pool),
            "--period", "0.3", "--connect-seconds", "0.2", "--duration", "60",
            "--out", str(root_dir / f"sim{i}.json")])) for i, (creds, n) in enumerate(fleets)]
        threads = [threading.Thread(target=s.run, daemon=True) for s in sims]
        started = time.monotonic()
        for t in threads:
            t.start()
        coord.join(90)
        for s in sims:
            s.stop_requested = True
        for t in threads:
            t.join(10)
        seconds = time.monotonic() - started
        r1, w1 = _io(root.pid)
        log_written = root.log_file.stat().st_size - log_before
        service.stop()
        models = sum(s.result()["counters"]["models_received"] for s in sims)
        updates = sum(s.result()["counters"]["updates_published"] for s in sims)
        counters = service.counters()
        partial_bytes = sum(agg.counters["bytes_up"] for agg, _ in aggregators)
    finally:
        for agg, thread in aggregators:
            agg.stop()
            thread.join(10)
        for regional in regions:
            regional.stop()
        root.stop()
    final = summary[0]
    return {"mode": mode, "bridged": bridged, "devices": devices,
            "final_version": final.final_version, "accuracy": final.final_accuracy,
            "root_read_bytes": r1 - r0, "root_written_bytes": w1 - w0 - log_written,
            "models_received_by_devices": models, "updates_published": updates,
            "root_updates_accepted": counters["updates_accepted"],
            # what the root's coordinator took in as updates (device updates or partials)
            "update_bytes_at_root": counters["bytes_received"],
            "partial_bytes_sent": partial_bytes if folded else None,
            "device_updates_applied": counters["partial_parts"] if folded
            else counters["updates_accepted"],
            "seconds": round(seconds, 2)}


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mode, the median of each figure over its runs."""
    import statistics

    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if mine:
            keys = ("accuracy", "root_read_bytes", "root_written_bytes",
                    "device_updates_applied", "root_updates_accepted", "update_bytes_at_root",
                    "seconds")
            out[mode] = {key: statistics.median(r[key] for r in mine) for key in keys
                         if all(r[key] is not None for r in mine)}
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bridge_bytes", description=__doc__)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--versions", type=int, default=8)
    p.add_argument("--buffer", type=int, default=4, help="device updates per version")
    p.add_argument("--partial-size", type=int, default=2)
    p.add_argument("--partial-codec", default="int8")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out", type=Path, default=Path("bench/bridge_bytes.json"))
    args = p.parse_args(argv)
    from fedbus.datasets import load_digits, train_test_split, write_npz

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.npz"
        write_npz(pool, x_train, y_train)
        for pair in range(args.pairs):
            for mode in args.modes:
                run = one_run(Path(tmp) / f"{pair}-{mode}", args.devices, mode,
                              args.versions, pool, (x_test, y_test), buffer=args.buffer,
                              partial_size=args.partial_size,
                              partial_codec=args.partial_codec)
                print(json.dumps(run), flush=True)
                runs.append(run)
    args.out.write_text(json.dumps({"devices": args.devices, "versions": args.versions,
                                    "buffer": args.buffer, "partial_size": args.partial_size,
                                    "partial_codec": args.partial_codec,
                                    "runs": runs, "medians": medians(runs)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
