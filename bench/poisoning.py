"""Poisoning: held-out accuracy when 20% of the devices attack, for each aggregator.

``python -m bench --only poisoning`` (``run``), or ``python -m bench.poisoning [--quick]``
to print the table without touching the results.

An in-process simulation that drives the real parts: the coordinator core
(``CoordinatorCore`` with an in-memory ``Store``, FedBuff with K = 5, every journal
committed as the service does), real local training of the bundled models
(``edge_agent.train.train_local``, QAT as the agents run it) and the real update codec (int8,
the task default) for every update. No broker and no agent processes: what is measured is
what the coordinator makes of hostile updates, not transport.

Ten devices on a Dirichlet(1.0) label-skewed split of the training part of a data set; two of
them (20%) hostile. Each version, devices are visited in a random order, each training on the
current global model, until K updates are accepted (refused ones do not count; if all ten
were visited, whatever was accepted is applied). The attacks, by the two hostile devices on
every update they send:

- ``signflip``: their honestly trained delta × −10;
- ``random``: a Gaussian delta scaled to the largest norm the coordinator accepts at that
  moment (just under ``--max-norm`` without the adaptive bound, just under its reject bound
  with it: the attacker knows the rule);
- ``inflate``: their delta × −1, claiming 2^40 samples;
- ``labelflip``: trained honestly on their own data with every label ``y`` replaced by
  ``9 − y``.

Each configuration runs the same number of versions from the same initial model and split,
and reports held-out accuracy at the end. Under ``quorum`` (the default) a full buffer may
wait for more updates: the loop then visits further devices of the same version, and the
step it makes may hold up to 2K updates. "Points lost" are percentage points against the
clean run of the plain mean (the old default).

``poisoning_adaptive`` (``python -m bench --only poisoning_adaptive``, ``run_adaptive``): the
default side by side with the default under ``--adaptive-k --staleness-a 0.5`` (label
``default, adaptive K``). The core is then told that all ten devices are online (a status
each), since adaptive K is worked out from the devices online; its clock is the count of
updates sent, so a device's measured period is its place in the random visiting order (equal
speeds with jitter), and K moves between 5 and 10. ``quorum``'s limit is K itself there: a
full buffer is stepped with those of its K updates that agree, never waiting for another.
Every update is based on the newest version (staleness 0), so the exponent plays no part.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ATTACKS", "CONFIGS", "result", "run", "run_adaptive", "run_sparse", "simulate"]

ATTACKS: tuple[str, ...] = ("none", "signflip", "random", "inflate", "labelflip")
DEVICES = 10
HOSTILE = (0, 1)
K = 5
MAX_NORM = 100.0  # the fixed ceiling, as before the adaptive bound
# label -> AggregationConfig settings; "default" is what a new run gets when nothing is asked
CONFIGS: dict[str, dict[str, Any]] = {
    "mean": {"aggregator": "mean", "norm_multiple": 0},
    "median": {"aggregator": "median", "norm_multiple": 0},
    "trimmed:0.2": {"aggregator": "trimmed:0.2", "norm_multiple": 0},
    "krum:1": {"aggregator": "krum:1", "norm_multiple": 0},
    "mean+cap:2, adaptive bound": {"aggregator": "mean+cap:2"},
    "agree, adaptive bound": {"aggregator": "agree"},  # the default before quorum
    "default": {},
    # the default under --adaptive-k --staleness-a 0.5 (the tta bench's async side)
    "default, adaptive K": {"adaptive_k": True, "staleness_a": 0.5},
}
ADAPTIVE = "default, adaptive K"
# the whole fleet in every step, as adaptive K makes it for equal speeds (its floor 10: K is
# 10 whatever the simulated periods), against the default with a fixed K = 10
CONFIGS["default, K = 10"] = {"buffer_size": DEVICES}
CONFIGS["default, adaptive K = 10"] = {"adaptive_k": True, "staleness_a": 0.5,
                                       "buffer_size": DEVICES}
WHOLE_FLEET = ("default, K = 10", "default, adaptive K = 10")
WORKERS = 2  # runs are independent and seeded: two processes give the same numbers


@dataclass(frozen=True)
class Sizes:
    versions: dict[str, int]
    seeds: tuple[int, ...]
    configs: tuple[str, ...] = tuple(CONFIGS)
    attacks: tuple[str, ...] = ATTACKS
    codec: str = "int8"


FULL = Sizes({"digits": 30, "mnist": 12}, (0, 1, 2),
             tuple(label for label in CONFIGS if label not in (ADAPTIVE, *WHOLE_FLEET)))
# a smoke run: the shape of the results, not a measurement
QUICK = Sizes({"digits": 1, "mnist": 1}, (0,), ("mean", "default"), ("none", "inflate"))
# poisoning_sparse: the 100x codec (BENCHMARKS.md, bytes) under the plain mean and the default
SPARSE_CODEC = "sparse:0.007:sign"
SPARSE_FULL = Sizes({"digits": 30, "mnist": 12}, (0, 1, 2, 3, 4), ("mean", "default"), ATTACKS,
                    SPARSE_CODEC)
SPARSE_QUICK = Sizes({"digits": 1}, (0,), ("mean", "default"), ("none", "inflate"),
                     SPARSE_CODEC)
# poisoning_adaptive: the default with and without --adaptive-k --staleness-a 0.5
ADAPTIVE_FULL = Sizes({"digits": 30, "mnist": 12}, (0, 1, 2), ("mean", "default", ADAPTIVE))
ADAPTIVE_QUICK = Sizes({"digits": 1}, (0,), ("mean", ADAPTIVE), ("none", "inflate"))


@dataclass
class _Data:
    xtr: np.ndarray
    ytr: np.ndarray
    xte: np.ndarray
    yte: np.ndarray
    parts: list[np.ndarray]


@functools.lru_cache(maxsize=4)
def _data(dataset: str, seed: int) -> _Data:
    from fedbus.datasets import dirichlet_split, get_dataset, train_test_split

    x, y = get_dataset(dataset).load()
    xtr, ytr, xte, yte = train_test_split(x, y, 0.25, seed)
    parts = dirichlet_split(ytr, DEVICES, 1.0, seed, min_per_class=2)
    return _Data(xtr, ytr, xte, yte, parts)


def _attack_bound(core: Any) -> float:
    """The largest norm ``core`` accepts now: its adaptive reject bound, else the ceiling."""
    bound = core.snapshot()["norm_bound"]
    cfg = core.config
    if bound is None:
        return 0.99 * cfg.max_norm
    return 0.99 * min(cfg.max_norm, bound * cfg.norm_reject)


def simulate(dataset: str, label: str, attack: str, seed: int, versions: int,
             data: _Data | None = None, codec: str = "int8", hostile_first: bool = False
             ) -> dict[str, Any]:
    """One run: ``versions`` versions of ``dataset`` under ``attack`` with ``CONFIGS[label]``,
    every update encoded with ``codec`` (``hostile_first``: the hostile devices are visited
    first at every version, so they are in every step, as the fastest devices of a fleet
    would be); under a sparse codec (``topk``, ``sparse``) honest
    devices keep their error-feedback residual as the agent does (``encode_with_feedback``:
    what an update does not carry is added to the next one; a refused update's content goes
    back into it), hostile ones send their attack encoded as it is."""
    import torch

    from coordinator.aggregation import l2_norm
    from coordinator.core import AggregationConfig, CoordinatorCore
    from coordinator.store import Store
    from edge_agent.residual import encode_with_feedback
    from edge_agent.train import evaluate, train_local
    from fedbus.codec_spec import parse_codec
    from fedbus.datasets import get_dataset
    from fedbus.envelope import pack
    from fedbus.messages import ModelSpec, Status, Task, TrainSpec, Update
    from fedbus.update_codec import encode_delta
    from fedbus.zoo import build_model, get_state, set_state

    torch.set_num_threads(1)
    spec_ds = get_dataset(dataset)
    d = data if data is not None else _data(dataset, seed)
    args = dict(spec_ds.model_args)
    train = TrainSpec(epochs=spec_ds.epochs, batch_size=spec_ds.batch_size, lr=spec_ds.lr,
                      momentum=0.9)
    task = Task(f"poison-{dataset}", ModelSpec(spec_ds.arch, args), train, run_id="bench")
    torch.manual_seed(seed)
    model = build_model(spec_ds.arch, args)
    store = Store(None)
    config = AggregationConfig(mode="fedbuff", buffer_timeout=0.0, max_norm=MAX_NORM,
                               **{"buffer_size": K, **CONFIGS[label]})
    core = CoordinatorCore(task, get_state(model), config, ledger=store)
    store.create_run("bench", task.to_wire(), 0.0, core.state, core.counters,
                     aggregator=str(config.spec))
    if config.adaptive_k:  # K is worked out from the devices known online: all ten are
        for dev in range(DEVICES):
            core.on_status(f"d{dev}", pack(Status(f"d{dev}", "online", ts=0.0).to_wire()), 0.0)
        store.commit(core.drain_journal(), core.counters, max_staleness=10)
    rng = np.random.default_rng(seed)
    spec_codec = parse_codec(codec)
    feedback = codec.split(":", 1)[0] in ("topk", "sparse")
    residuals: dict[int, dict[str, np.ndarray]] = {}
    sent = 0
    t0 = time.perf_counter()
    while core.version < versions:
        version = core.version
        order = rng.permutation(DEVICES)
        if hostile_first:  # the hostile devices send as soon as a version is out
            order = np.concatenate([np.asarray(HOSTILE), [d for d in order if d not in HOSTILE]])
        for dev in order:
            base = core.state
            hostile = attack != "none" and int(dev) in HOSTILE
            x, y = d.xtr[d.parts[dev]], d.ytr[d.parts[dev]]
            n = len(y)
            if hostile and attack == "random":
                noise = {k: rng.standard_normal(a.shape) for k, a in base.items()}
                scale = _attack_bound(core) / l2_norm(noise)
                delta = {k: (a * scale).astype(np.float32) for k, a in noise.items()}
            else:
                if hostile and attack == "labelflip":
                    y = 9 - y
                set_state(model, base)
                train_local(model, x, y, train, seed=seed * 100_003 + sent)
                trained = get_state(model)
                delta = {k: trained[k] - base[k] for k in base}
                if hostile and attack == "signflip":
                    delta = {k: a * np.float32(-10.0) for k, a in delta.items()}
                elif hostile and attack == "inflate":
                    delta = {k: -a for k, a in delta.items()}
                    n = 2**40
            sent += 1
            residual = residuals.get(int(dev)) if feedback and not hostile else None
            if feedback:
                wire, compression, left = encode_with_feedback(
                    delta, residual, spec_codec, rng=np.random.default_rng(sent))
            else:
                wire, compression, left = encode_delta(
                    delta, spec_codec, rng=np.random.default_rng(sent)), None, {}
            payload = pack(Update(f"u{sent}", f"d{dev}", task.task_id, version, n, wire,
                                  run_id="bench", compression=compression).to_wire())
            accepted = core.counters["updates_accepted"]
            core.on_update(f"d{dev}", payload, now=float(sent))
            if feedback and not hostile:
                if core.counters["updates_accepted"] == accepted:  # refused: nothing sent
                    left = {k: delta[k] + (residual[k] if residual is not None else 0)
                            for k in left}
                residuals[int(dev)] = left
            store.commit(core.drain_journal(), core.counters, max_staleness=10)
            if core.version != version:
                break
        else:  # every device visited without K accepted: apply what there is
            core.flush(float(sent))
            store.commit(core.drain_journal(), core.counters, max_staleness=10)
            if core.version == version:
                break  # nothing accepted at all: no progress possible
    set_state(model, core.state)
    _, accuracy = evaluate(model, d.xte, d.yte)
    counters = core.counters
    return {
        "dataset": dataset, "config": label, "aggregator": str(config.spec), "attack": attack,
        **({"hostile_first": True} if hostile_first else {}),
        "seed": seed, "versions": core.version, "accuracy": round(float(accuracy), 4),
        "sent": sent, "accepted": counters["updates_accepted"],
        "rejected_norm": counters["rejected_norm"], "clipped": counters["updates_clipped"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _one(job: tuple[str, str, str, int, int, str]) -> dict[str, Any]:
    logging.getLogger("coordinator").setLevel(logging.ERROR)  # a worker process
    dataset, label, attack, seed, versions, codec = job
    return simulate(dataset, label, attack, seed, versions, codec=codec)


def _measure(sizes: Sizes, log: Any = None) -> list[dict[str, Any]]:
    """Every run, in a pool of ``WORKERS`` processes (each run is seeded: the same numbers
    whatever the order)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(dataset, label, attack, seed, versions, sizes.codec)
            for dataset, versions in sizes.versions.items() for seed in sizes.seeds
            for label in sizes.configs for attack in sizes.attacks]
    rows = []
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=WORKERS, mp_context=context)
    try:
        for row in pool.map(_one, jobs):
            rows.append(row)
            if log is not None:
                log(row)
    except BaseException:  # interrupted: the runs not started yet are dropped
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return rows


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracy over seeds per (dataset, config, attack), points lost against the clean
    plain mean, and the worst loss of each configuration."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        cell = table.setdefault(r["dataset"], {}).setdefault(r["config"], {})
        cell.setdefault(r["attack"], 0.0)
    for dataset, configs in table.items():
        for label, cells in configs.items():
            for attack in cells:
                accs = [r["accuracy"] for r in rows if (r["dataset"], r["config"],
                        r["attack"]) == (dataset, label, attack)]
                cells[attack] = round(float(np.mean(accs)), 4)
    worst: dict[str, dict[str, float]] = {}
    for configs in table.values():
        reference = configs["mean"]["none"]
        for label, cells in configs.items():
            lost = {a: round(100 * (reference - acc), 2) for a, acc in cells.items()}
            entry = worst.setdefault(label, {"clean": -1e9, "attack": -1e9})
            entry["clean"] = max(entry["clean"], lost["none"])
            entry["attack"] = max(entry["attack"], *(v for a, v in lost.items() if a != "none"))
    return {"accuracy": table, "worst_points_lost": worst}


def run(ctx: Any) -> dict[str, Any]:
    """The harness entry: every configuration under every attack, digits and MNIST."""
    return _run(QUICK if ctx.quick else FULL)


def run_adaptive(ctx: Any) -> dict[str, Any]:
    """The harness entry of ``poisoning_adaptive``: the default with and without
    ``--adaptive-k --staleness-a 0.5`` (and the plain mean, the reference) under every
    attack. Every update here is based on the newest version, so the staleness exponent
    plays no part: what differs is quorum's limit (K itself under adaptive K) and K."""
    return _run(ADAPTIVE_QUICK if ctx.quick else ADAPTIVE_FULL, ours=ADAPTIVE,
                base="mean" if ctx.quick else "default")


def run_sparse(ctx: Any) -> dict[str, Any]:
    """The harness entry of ``poisoning_sparse``: the plain mean and the default under every
    attack, every update encoded with ``SPARSE_CODEC`` (honest devices with error feedback)."""
    return _run(SPARSE_QUICK if ctx.quick else SPARSE_FULL)


def _run(sizes: Sizes, ours: str = "default", base: str = "mean") -> dict[str, Any]:
    log = logging.getLogger("bench")
    core_log = logging.getLogger("coordinator")
    level = core_log.level
    core_log.setLevel(logging.ERROR)  # every refused update is a warning: thousands here
    try:
        rows = _measure(sizes, lambda r: log.info(
            "poisoning %s %-22s %-9s seed %d: %.4f (%d rejected, %d clipped, %.1f s)",
            r["dataset"], r["config"], r["attack"], r["seed"], r["accuracy"],
            r["rejected_norm"], r["clipped"], r["seconds"]))
    finally:
        core_log.setLevel(level)
    return result(sizes, rows, ours, base)


def result(sizes: Sizes, rows: list[dict[str, Any]], ours: str = "default",
           base: str = "mean") -> dict[str, Any]:
    """The benchmark entry of ``rows`` measured with ``sizes``: worst points lost of
    ``ours`` against ``base``, the per-cell summary and the rows."""
    summary = summarize_rows(rows)
    worst = summary["worst_points_lost"]
    mine, theirs = worst[ours], worst[base]
    return {
        "unit": "points lost (worst attack)",
        "ours": {"runs": [mine["attack"]], "median": mine["attack"]},
        "baseline": {"runs": [theirs["attack"]], "median": theirs["attack"]},
        "ratio": None if theirs["attack"] == 0 else round(mine["attack"] / theirs["attack"], 4),
        "ratio_definition": f"worst accuracy points lost under attack, {_NAMES[ours]} / "
        f"{_NAMES[base]}",
        "aim": "<= 2 points lost under each attack, <= 1 point lost on the clean run",
        "aim_met": mine["attack"] <= 2.0 and mine["clean"] <= 1.0,
        "details": {
            "devices": DEVICES, "hostile": len(HOSTILE), "buffer_size": K,
            "codec": sizes.codec,
            "versions": sizes.versions, "seeds": list(sizes.seeds),
            "configs": {label: str(_spec(label)) for label in sizes.configs},
            "attacks": list(sizes.attacks),
            **summary, "rows": rows,
        },
    }


_NAMES = {"default": "default defences", "mean": "plain mean",
          ADAPTIVE: "default defences under --adaptive-k --staleness-a 0.5"}


def _spec(label: str) -> str:
    from coordinator.core import AggregationConfig

    cfg = AggregationConfig(max_norm=MAX_NORM, **{"buffer_size": K, **CONFIGS[label]})
    bound = ("adaptive norm bound" if cfg.norm_rule.enabled
             else f"fixed --max-norm {MAX_NORM:g}")
    adaptive = f", --adaptive-k --staleness-a {cfg.staleness_a:g}" if cfg.adaptive_k else ""
    size = f", K = {cfg.buffer_size}" if cfg.buffer_size != K else ""
    return f"{cfg.spec}, {bound}{adaptive}{size}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.poisoning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dataset", choices=("digits", "mnist"), action="append")
    parser.add_argument("--config", choices=tuple(CONFIGS), action="append")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--codec", default="int8", help="every update's codec (default int8)")
    parser.add_argument("--hostile-first", action="store_true",
                        help="visit the hostile devices first at every version (in every step)")
    args = parser.parse_args(argv)
    logging.getLogger("coordinator").setLevel(logging.ERROR)  # every refusal is a warning
    sizes = QUICK if args.quick else FULL
    versions = {k: v for k, v in sizes.versions.items()
                if not args.dataset or k in args.dataset}
    seeds = tuple(args.seeds) if args.seeds else sizes.seeds
    for dataset, n in versions.items():
        for seed in seeds:
            data = _data(dataset, seed)
            for label in args.config or CONFIGS:
                for attack in ATTACKS:
                    print(json.dumps(simulate(dataset, label, attack, seed, n, data,
                                              codec=args.codec,
                                              hostile_first=args.hostile_first)), flush=True)


if __name__ == "__main__":
    main()
