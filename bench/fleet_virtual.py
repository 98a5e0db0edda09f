"""``bench.fleet``'s learning question in virtual time: ``python -m bench.fleet_virtual``.

The fleet benchmark runs thousands of devices against the real broker and coordinator, one run
of about 1,200 applied updates per size, on a loaded machine: its held-out accuracy swings by
a point or two between runs, too much to tell apart the causes of a 2-point gap. This model
asks the same learning question with the network and the load taken out, so that it can be
run over many seeds and with one thing changed at a time:

- the same data (digits, 20% held out, ``bench.fleet``), each device's shard of ``--shard``
  samples drawn as ``bench.fleet_sim.shard_indices`` draws it, the same model and local
  training (``edge_agent.train.train_local``, the coordinator's defaults: 2 epochs, batch 16,
  lr 0.05, momentum 0.9, QAT);
- the same compute times (``bench.fleet_sim.compute_seconds``: mean ``bench.fleet.PERIOD``,
  speeds 1:2:4) and start-up spread (the devices invited at the start take a random part of
  their compute time for their first training);
- training by invitation as ``coordinator.invitations`` keeps it (at most ``C`` devices
  training, first come first invited; a device whose update was judged waits again at the end
  of the line), and the buffer, limit and staleness weight of ``coordinator.fleet_scale``;
- the default aggregator's buffer rule and step (``quorum``), no codec, no norm bound.

Every update is judged the moment its training ends (no network) and a device invited trains on
the newest version. Printed per configuration: held-out accuracy after ``--updates`` applied
updates, the mean of the 10 versions up to there, and the mean staleness of the applied updates,
per seed and on average.
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.fleet import PERIOD, SPEEDS, UPDATES
from bench.fleet_sim import compute_seconds, shard_indices
from coordinator.aggregator_spec import parse_aggregator, quorum_reached, quorum_step
from coordinator.fleet_scale import fleet_scale
from coordinator.staleness import staleness_weight

State = dict[str, np.ndarray]
QUORUM = parse_aggregator("quorum")


@dataclass(frozen=True)
class Outcome:
    accuracy: float  # of the version at which ``updates`` applied updates were reached
    mean10: float  # the mean of the 10 versions up to it
    staleness: float  # mean staleness of the applied updates
    versions: int
    devices_trained: int  # distinct devices that trained


def run(devices: int, *, seed: int = 0, updates: int = UPDATES, concurrency: int = 100,
        shard: int = 32, shards: int | None = None, period: float = PERIOD,
        speeds: Sequence[float] = SPEEDS, k: int | None = None,
        weight: str | None = None) -> Outcome:
    """One run of ``devices`` virtual devices; ``shards``: devices share the first ``shards``
    shards (device ``i`` holds shard ``i mod shards``); ``k``/``weight`` override fleet
    scaling's."""
    import torch

    from edge_agent.train import evaluate, train_local
    from fedbus.datasets import load_digits, train_test_split
    from fedbus.messages import TrainSpec
    from fedbus.zoo import build_model, get_state

    torch.set_num_threads(1)
    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    distinct = shards or devices
    index = [shard_indices(len(y_train), shard, i % distinct, seed) for i in range(devices)]
    torch.manual_seed(seed)
    model = build_model("mlp", {"in_features": 64, "num_classes": 10})
    spec = TrainSpec(epochs=2, batch_size=16, lr=0.05)  # the coordinator's defaults
    scale = fleet_scale(min(devices, concurrency), 4, 50, bounded=True)
    k_run = k or scale.buffer_size
    kind = weight or scale.weight or "poly"
    computes = compute_seconds(devices, period, speeds)
    versions: list[State] = [get_state(model)]
    accuracies: list[float] = []

    def load(state: State) -> None:
        current = model.state_dict()
        for name, value in state.items():
            current[name] = torch.from_numpy(np.array(value, dtype=np.float32))
        model.load_state_dict(current)

    def evaluate_newest() -> None:
        load(versions[-1])
        accuracies.append(evaluate(model, x_test, y_test)[1])

    evaluate_newest()
    rng = np.random.default_rng(seed)
    events: list[tuple[float, int, int]] = []  # (done at, device, base version)
    line: dict[int, None] = {}
    for d in range(devices):
        if d < concurrency:
            heapq.heappush(events, (float(rng.uniform(0, computes[d])), d, 0))
        else:
            line[d] = None
    buffer: list[State] = []
    applied = 0
    stale_sum = 0
    counted: list[int] = [0]  # applied updates folded in by each version, cumulative
    trained: set[int] = set()
    trainings = 0
    while events and applied < updates:
        now, device, base = heapq.heappop(events)
        trained.add(device)
        trainings += 1
        newest = len(versions) - 1
        s = newest - base
        if s <= scale.max_staleness:
            load(versions[base])
            train_local(model, x_train[index[device]], y_train[index[device]], spec,
                        seed=seed * 1_000_003 + trainings)
            after = get_state(model)
            w = np.float32(staleness_weight(s, kind, a=1.0) if kind == "poly"
                           else staleness_weight(s, kind))
            buffer.append({n: (after[n] - versions[base][n]) * w for n in after})
            stale_sum += s
            if quorum_reached(QUORUM, buffer, k_run, min(devices, concurrency)):
                step = quorum_step(buffer).aggregate
                versions.append({n: np.asarray(v + step[n], dtype=np.float32)
                                 for n, v in versions[-1].items()})
                applied += len(buffer)
                counted.append(applied)
                buffer.clear()
                evaluate_newest()
        # the device's invitation is used: it waits again, and the first in line is invited
        line[device] = None
        nxt = next(iter(line))
        del line[nxt]
        heapq.heappush(events, (now + computes[nxt], nxt, len(versions) - 1))
    tail = accuracies[-10:]
    return Outcome(accuracies[-1], float(np.mean(tail)), stale_sum / max(1, trainings),
                   len(versions) - 1, len(trained))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_virtual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="NAME=JSON",
                   help='run() keywords, e.g. 5000=\'{"devices": 5000}\'')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    for item in args.configs:
        name, _, text = item.partition("=")
        settings: dict[str, Any] = json.loads(text)
        out = [run(seed=s, **settings) for s in args.seeds]
        acc = [round(o.accuracy, 4) for o in out]
        m10 = [round(o.mean10, 4) for o in out]
        print(f"{name}: accuracy {acc} mean {np.mean(acc):.4f}; 10-version "
              f"{m10} mean {np.mean(m10):.4f}; staleness "
              f"{np.mean([o.staleness for o in out]):.2f}; versions "
              f"{[o.versions for o in out]}; devices {[o.devices_trained for o in out]}",
              flush=True)


if __name__ == "__main__":
    main()
