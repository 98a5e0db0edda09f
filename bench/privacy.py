"""``privacy``: held-out accuracy against epsilon on digits, central DP (coordinator.privacy).

A pure in-process simulation, no broker and no processes: a fleet of simulated devices, each
holding an equal random share of scikit-learn's digits (80 % of them; the other 20 % are the
held-out set), trains the digits MLP of ``fedbus.datasets`` with the agent's own
``edge_agent.train.train_local`` (QAT, SGD with momentum, the dataset's epochs, batch size
and learning rate) on the newest global model, encodes its delta with the task's codec
(int8) into a real update message, and hands it to the real ``CoordinatorCore`` (FedBuff,
validation, clipping, noise, the accountant), whose journal is committed to an in-memory
store as the service does. Each step draws ``K`` distinct devices at random; every update is
fresh (staleness 0). After a fixed number of applied steps the final model is evaluated on
the held-out set; epsilon is what the accountant reports for that many steps at ``δ``.

Rows: no DP (the plain mean), clipping alone (``mean+clip:C``: what clipping costs without
noise), and one row per noise multiplier ``σ``. The headline ("ours" in the summary) is the
row with ``σ = HEADLINE_NOISE``, against no DP.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import numpy as np

from bench.harness import BenchContext, summarize

__all__ = ["run", "simulate"]

DELTA = 1e-5
CLIP = 0.5
HEADLINE_NOISE = 1.0
EPOCHS = 5  # local epochs: a device's share is small, so each update does more local work


def _setup(devices: int, seed: int) -> dict[str, Any]:
    from fedbus.datasets import get_dataset, train_test_split

    data = get_dataset("digits")
    x, y = data.load()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, seed=0)
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(y_train)), devices)
    return {"data": data, "shares": [(x_train[p], y_train[p]) for p in parts],
            "test": (x_test, y_test)}


def simulate(*, noise: float | None, clip_only: bool = False, devices: int, k: int, steps: int,
             seed: int, epochs: int = EPOCHS) -> dict[str, Any]:
    """One run: ``noise`` None is no DP (``clip_only``: the mean clipped to ``CLIP``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the agent trains; restored for the benchmarks after this one
    try:
        return _simulate(noise=noise, clip_only=clip_only, devices=devices, k=k, steps=steps,
                         seed=seed, epochs=epochs)
    finally:
        torch.set_num_threads(threads)


def _simulate(*, noise: float | None, clip_only: bool, devices: int, k: int, steps: int,
              seed: int, epochs: int) -> dict[str, Any]:
    import torch

    from coordinator.core import AggregationConfig, CoordinatorCore
    from coordinator.evaluation import Evaluator
    from coordinator.privacy import PrivacySpec, epsilon_spent, new_noise_secret
    from coordinator.store import Store
    from edge_agent.train import train_local
    from fedbus.envelope import pack
    from fedbus.messages import ModelSpec, Task, TrainSpec, Update
    from fedbus.update_codec import encode_update_delta
    from fedbus.zoo import build_model, get_state, set_state

    setup = _setup(devices, seed)
    data = setup["data"]
    args = dict(data.model_args)
    args["hidden"] = list(args["hidden"])
    task = Task("digits-dp", ModelSpec(data.arch, args),
                TrainSpec(epochs=epochs, batch_size=data.batch_size, lr=data.lr,
                          momentum=0.9, qat=True),
                codec="int8", run_id="bench-privacy")
    torch.manual_seed(seed)
    model = build_model(data.arch, args)
    privacy = None if noise is None else PrivacySpec(noise, CLIP, DELTA)
    config = AggregationConfig(
        mode="fedbuff", buffer_size=k, buffer_timeout=0.0, server_lr=1.0,
        aggregator=f"mean+clip:{CLIP:g}" if clip_only else "mean", privacy=privacy,
        norm_multiple=0.0,  # every row without the adaptive bound (DP has none): only C differs
    )
    secret = None if privacy is None else new_noise_secret()
    store = Store(None)
    core = CoordinatorCore(task, get_state(model), config, ledger=store, noise_secret=secret)
    store.create_run(task.run_id, task.to_wire(), 0.0, core.state, core.counters,
                     aggregator=str(config.spec),
                     privacy=None if privacy is None else privacy.mechanism, noise_secret=secret)
    rng = np.random.default_rng(seed + 1000)
    codec_rng = np.random.default_rng(seed + 2000)
    norms: list[float] = []
    started = time.perf_counter()
    uid = 0
    for step in range(steps):
        base = core.version
        global_state = core.state
        for device in rng.choice(devices, size=k, replace=False):
            x, y = setup["shares"][int(device)]
            set_state(model, global_state)
            uid += 1
            train_local(model, x, y, task.train, seed=seed * 100_003 + uid)
            local = get_state(model)
            delta = {name: local[name] - global_state[name] for name in global_state}
            norms.append(float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2))
                                           for d in delta.values()))))
            wire, compression = encode_update_delta(delta, task.codec, rng=codec_rng)
            name = f"dev{int(device)}"
            update = Update(f"u{uid}", name, task.task_id, base, len(y), wire,
                            compression=compression, run_id=task.run_id)
            core.on_update(name, pack(update.to_wire()), float(step))
            store.commit(core.drain_journal(), core.counters,
                         max_staleness=config.effective_max_staleness)
        if core.version != step + 1:
            raise RuntimeError(f"step {step}: the core is at version {core.version}")
    loss, accuracy = Evaluator(task, *setup["test"]).evaluate(core.state)
    store.close()
    counters = core.counters
    return {
        "accuracy": accuracy,
        "loss": loss,
        "epsilon": None if noise is None else epsilon_spent(noise, steps, DELTA),
        "updates_applied": counters["updates_accepted"],
        "updates_clipped": counters["updates_clipped"],
        "median_update_norm": median(norms),
        "update_norm_quartiles": [float(q) for q in np.percentile(norms, [25, 50, 75])],
        "seconds": round(time.perf_counter() - started, 2),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    seeds: tuple[int, ...]
    noises: tuple[float, ...]
    if ctx.quick:
        devices, k, steps, seeds, noises = 10, 5, 2, (0,), (HEADLINE_NOISE,)
    else:
        devices, k, steps, seeds, noises = 50, 25, 30, (0, 1), (HEADLINE_NOISE, 3.0, 10.0)
    rows: dict[str, dict[str, Any]] = {}
    configs: list[tuple[str, float | None, bool]] = [("no DP", None, False),
                                                     (f"clip {CLIP:g}, no noise", None, True)]
    configs += [(f"σ = {s:g}", s, False) for s in noises]
    for label, noise, clip_only in configs:
        runs = [simulate(noise=noise, clip_only=clip_only, devices=devices, k=k, steps=steps,
                         seed=seed) for seed in seeds]
        rows[label] = {
            "noise_multiplier": noise,
            "clip": CLIP if noise is not None or clip_only else None,
            "noise_std": None if noise is None else noise * CLIP / k,
            "epsilon": runs[0]["epsilon"],
            "accuracy": summarize([r["accuracy"] for r in runs], label),
            "median_update_norm": median(r["median_update_norm"] for r in runs),
            "update_norm_quartiles": runs[0]["update_norm_quartiles"],
            "updates_applied": [r["updates_applied"] for r in runs],
            "updates_clipped": [r["updates_clipped"] for r in runs],
            "seconds_per_run": [r["seconds"] for r in runs],
        }
    headline = rows[f"σ = {HEADLINE_NOISE:g}"]
    base = rows["no DP"]
    ours, theirs = headline["accuracy"]["median"], base["accuracy"]["median"]
    return {
        "ours": {**headline["accuracy"], "label": f"central DP, σ = {HEADLINE_NOISE:g}, "
                 f"C = {CLIP:g}, ε = {headline['epsilon']:.3g} at δ = {DELTA:g}"},
        "baseline": {**base["accuracy"], "label": "no DP (plain mean)"},
        "ratio": None if not theirs else ours / theirs,
        "ratio_definition": "held-out accuracy with DP (σ = 1) / without",
        "unit": "accuracy",
        "aim": "–",
        "rows": rows,
        "params": {
            "dataset": "digits", "devices": devices, "buffer_size_K": k, "steps": steps,
            "updates_per_run": k * steps, "seeds": list(seeds), "delta": DELTA, "clip": CLIP,
            "codec": "int8", "mode": "fedbuff, server lr 1, no momentum, staleness 0",
            "local_epochs": EPOCHS, "torch_threads": 1,
            "simulation": "In process: the real CoordinatorCore and edge_agent.train.train_local, "
                          "no broker",
        },
    }
