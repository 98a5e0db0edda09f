"""``bench.codecs``'s accuracy question without the broker: ``python -m bench.codecs_virtual``.

The bytes benchmark runs real agents and the real coordinator, about 35 s per run on an idle
machine; this model asks the same question in-process, a few seconds per run, so that more
seeds and more variants fit: the same data split (``harness.Fleet``: digits, 20% held out,
Dirichlet 0.5 over ten devices, seed 0), the same model and local training
(``edge_agent.train.train_local``, 2 epochs, batch 16, lr 0.05, the agent's per-version
training seed), each update encoded as the agent does (``edge_agent.residual``: error
feedback for ``topk`` and ``sparse``), decoded as the coordinator does, and synchronous
FedAvg for ``--versions`` versions with either the plain sample-weighted ``mean``
(``aggregation.fedavg_step``) or ``quorum`` (``aggregator_spec.quorum_step`` with the
claimed sample counts). Not modelled: the adaptive norm bound (it clipped no sparse update in
the real runs' counters), the network, the initial model's exact seed (``torch.manual_seed``
of the seed here). Printed per codec and aggregator: held-out accuracy per seed, their mean,
and the mean number of updates a ``quorum`` step kept.
"""

from __future__ import annotations

import argparse
import json
import zlib
from typing import Any

import numpy as np

DEVICES = 10


def run(codec: str, aggregator: str, seed: int, versions: int = 30) -> tuple[float, float]:
    """One run: (held-out accuracy after ``versions`` versions, mean updates kept per
    ``quorum`` step; ``DEVICES`` under the mean)."""
    import msgpack
    import torch

    from coordinator.aggregation import apply_step, fedavg_step
    from coordinator.aggregator_spec import quorum_step
    from edge_agent.residual import encode_with_feedback
    from edge_agent.train import evaluate, train_local
    from fedbus.codec_spec import parse_codec
    from fedbus.datasets import dirichlet_split, load_digits, train_test_split
    from fedbus.messages import TrainSpec
    from fedbus.update_codec import decode_update_delta, encode_update_delta
    from fedbus.zoo import build_model, get_state, set_state

    torch.set_num_threads(1)
    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    data = [(x_train[p], y_train[p]) for p in dirichlet_split(y_train, DEVICES, 0.5, 0)]
    spec = parse_codec(codec)
    torch.manual_seed(seed)
    model = build_model("mlp", {"in_features": 64, "num_classes": 10})
    state = get_state(model)
    shapes = {name: value.shape for name, value in state.items()}
    train = TrainSpec(epochs=2, batch_size=16, lr=0.05)
    residuals: list[Any] = [None] * DEVICES
    kept: list[int] = []
    for version in range(versions):
        deltas, samples = [], []
        for d in range(DEVICES):
            set_state(model, state)
            # the agent's training seed (edge_agent.agent) for device-NN at this version
            s = (seed * 1_000_003 + zlib.crc32(f"device-{d + 1:02d}".encode()) + version) % 2**31
            train_local(model, *data[d], train, seed=s)
            new = get_state(model)
            delta = {name: new[name] - state[name] for name in state}
            rng = np.random.default_rng(s)
            if spec.error_feedback:
                wire, compression, residuals[d] = encode_with_feedback(
                    delta, residuals[d], spec, rng=rng)
            else:
                wire, compression = encode_update_delta(delta, spec, rng=rng)
            received = wire if compression is not None else msgpack.unpackb(msgpack.packb(wire))
            deltas.append(decode_update_delta(received, compression, expected_shapes=shapes))
            samples.append(len(data[d][1]))
        if aggregator == "mean":
            state = fedavg_step(state, deltas, samples)
            kept.append(DEVICES)
        else:
            step = quorum_step(deltas, samples)
            kept.append(len(step.kept))
            state = apply_step(state, step.aggregate, server_lr=1.0)
    set_state(model, state)
    return float(evaluate(model, x_test, y_test)[1]), float(np.mean(kept))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codecs_virtual", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("codecs", nargs="+", metavar="SPEC")
    parser.add_argument("--aggregators", nargs="+", choices=("mean", "quorum"),
                        default=["mean", "quorum"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--versions", type=int, default=30)
    args = parser.parse_args(argv)
    for codec in args.codecs:
        for aggregator in args.aggregators:
            out = [run(codec, aggregator, s, args.versions) for s in args.seeds]
            accuracy = [round(a, 4) for a, _ in out]
            print(json.dumps({"codec": codec, "aggregator": aggregator, "seeds": args.seeds,
                              "accuracy": accuracy, "mean": round(float(np.mean(accuracy)), 4),
                              "kept_per_step": round(float(np.mean([k for _, k in out])), 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
