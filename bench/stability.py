"""Sweep of server-side settings for a model that stays at its target (issue 10, item 4).

``python -m bench.stability --profile 1:2:4 --seeds 0 1 --out sweep.json NAME=JSON ...``

Each ``NAME=JSON`` is a configuration: ``CoordinatorConfig`` fields given to every FedBuff run
(``{}`` is the default; ``{"mode": "fedavg"}`` the synchronous baseline). The fleet is
``bench.tta``'s (same profiles, compute time, K), every configuration runs once per seed,
alternating configurations within a seed, each to ``LATE_TARGET`` held for ``HOLD_SECONDS``
or to the cap. Per run it records what ``bench.tta`` records (first hit, stable target) and
the share of the versions evaluated in the ``HOLD_SECONDS`` after the first hit that were
still at the target, and each device's share of the accepted updates against its share of
the data. Written as JSON (``--out``) and summarised on stdout, medians per configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench import tta
from bench.harness import BenchContext, median


def held_share(run: dict[str, Any], target: float, hold: float) -> float | None:
    """Of the versions evaluated in the ``hold`` seconds after the first one at ``target``,
    the share at or above it (None: never reached, or no version evaluated after it)."""
    evaluated = [r for r in run["history"] if r["accuracy"] is not None]
    first = next((r for r in evaluated if r["accuracy"] >= target), None)
    if first is None:
        return None
    window = [r for r in evaluated if first["seconds"] < r["seconds"] <= first["seconds"] + hold]
    if not window:
        return None
    return sum(r["accuracy"] >= target for r in window) / len(window)


def _one(fleet: Any, name: str, overrides: dict[str, Any], seed: int, k: int,
         cap: float) -> dict[str, Any]:
    settings = {"mode": "fedbuff", "buffer_size": k, **overrides}
    r = fleet.run(task_id=f"sweep-{name}-s{seed}", codec="int8", seed=seed,
                  target_accuracy=tta.LATE_TARGET, target_hold=tta.HOLD_SECONDS,
                  duration=cap, **settings)
    r["seed"] = seed
    out = tta._compact(r, tta.TARGET, tta.LATE_TARGET, cap, tta.HOLD_SECONDS,
                       tta.fleet_periods(fleet))
    out["held_share"] = held_share(r, tta.TARGET, tta.HOLD_SECONDS)
    out["late_held_share"] = held_share(r, tta.LATE_TARGET, tta.HOLD_SECONDS)
    out["device_shares"] = tta.device_shares(r, fleet.samples)
    out["name"] = name
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="1:2:4", choices=sorted(tta.PROFILES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cap", type=float, default=tta.CAP_SECONDS,
                        help="seconds a run may last (a run that never held counts as this)")
    parser.add_argument("configs", nargs="+", metavar="NAME=JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("coordinator", "fedbus", "edge_agent"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configs: list[tuple[str, dict[str, Any]]] = []
    for item in args.configs:
        name, _, text = item.partition("=")
        configs.append((name, json.loads(text or "{}")))
    speeds = tta.PROFILES[args.profile]
    k = max(1, min(round(tta.BUFFER_SHARE * len(speeds)), len(speeds) - 1))
    workdir = Path(tempfile.mkdtemp(prefix="fedbus-stability-"))
    ctx = BenchContext(quick=False, runs=None, workdir=workdir)
    results: list[dict[str, Any]] = []
    try:
        fleet = ctx.fleet_pool().get(args.profile, speeds, tta.COMPUTE_SECONDS)
        for seed in args.seeds:
            for name, overrides in configs:
                results.append(_one(fleet, name, overrides, seed, k, args.cap))
                args.out.write_text(json.dumps(
                    {"profile": args.profile, "k": k, "configs": dict(configs),
                     "runs": results}, indent=1))
    finally:
        ctx.close()
        shutil.rmtree(workdir, ignore_errors=True)
    for name, _ in configs:
        mine = [r for r in results if r["name"] == name]
        print(f"{name:>14}: first {median(r['value'] for r in mine)} "
              f"stable {median(r['stable_value'] for r in mine)} "
              f"late first {median(r['late_value'] for r in mine)} "
              f"late stable {median(r['late_stable_value'] for r in mine)} "
              f"held {[r['held_share'] for r in mine]} late held "
              f"{[r['late_held_share'] for r in mine]} rejected {[r['rejected'] for r in mine]} "
              f"overrun {[(r['trained']['overrun'], r['trained']['updates']) for r in mine]}")


if __name__ == "__main__":
    main()
