"""Bytes through the root broker, flat against bridged: ``python -m bench.bridge_bytes``.

The same run twice, alternated ``--pairs`` times: a coordinator on the root broker and
``--devices`` virtual devices (``bench.fleet_sim``, model subscription ``always``, so every
device receives every model version), either all on the root broker (flat) or split over
two regional brokers bridged to it. What the root's mosquitto read from and wrote to its
sockets is its ``/proc/<pid>/io`` ``rchar``/``wchar`` over the run, less what it wrote to its
log file (persistence is written only at an autosave, 60 s, or at exit: after the reading).
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


def _io(pid: int) -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(1, n + 1)]


def one_run(root_dir: Path, devices: int, bridged: bool, versions: int,
            pool: Path, eval_data: Any) -> dict[str, Any]:
    from bench.fleet_sim import FleetSim, parse_args
    from coordinator.config import CoordinatorConfig
    from coordinator.service import CoordinatorService
    from fedbus.bridge import read_bridge_bundle
    from fedbus.broker import LocalBroker

    half = devices // 2
    root = LocalBroker(root_dir / "root", device_ids=[] if bridged else _ids("dev", devices),
                       bridge_regions=REGIONS if bridged else ())
    root.start()
    regions: list[LocalBroker] = []
    try:
        if bridged:
            for region in REGIONS:
                regional = LocalBroker(root_dir / region, device_ids=_ids(region, half),
                                       bridge=read_bridge_bundle(root.bridge_bundle_dir(region)))
                regional.start()
                regions.append(regional)
            time.sleep(1.0)  # the bridges connect
        fleets = ([(r.credentials_file, half) for r in regions] if bridged
                  else [(root.credentials_file, devices)])
        service = CoordinatorService(
            CoordinatorConfig(host=root.host, port=root.port, prefix=root.prefix,
                              task_id="bridge-bytes", mode="fedbuff", buffer_size=4,
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
    finally:
        for regional in regions:
            regional.stop()
        root.stop()
    return {"bridged": bridged, "devices": devices, "final_version": summary[0].final_version,
            "root_read_bytes": r1 - r0, "root_written_bytes": w1 - w0 - log_written,
            "models_received_by_devices": models, "updates_published": updates,
            "seconds": round(seconds, 2)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bridge_bytes", description=__doc__)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--versions", type=int, default=4)
    p.add_argument("--pairs", type=int, default=2)
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
            for bridged in (False, True):
                run = one_run(Path(tmp) / f"{pair}-{bridged}", args.devices, bridged,
                              args.versions, pool, (x_test, y_test))
                print(json.dumps(run), flush=True)
                runs.append(run)
    args.out.write_text(json.dumps({"devices": args.devices, "versions": args.versions,
                                    "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
