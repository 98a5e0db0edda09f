"""``bench.tta``'s question in virtual time: ``python -m bench.tta_virtual PROFILE NAME=JSON ...``.

The time-to-accuracy benchmark runs real agents against a real broker, so on a busy machine
its speed profiles hold only as far as the agents' training fits in their simulated period (it
counts the updates that overran it). This model asks the same question with the load taken
out: the same data split (``harness.Fleet``: digits, 20% held out, Dirichlet 0.5 over the
devices), the same model and local training (``edge_agent.train.train_local``, 2 epochs, batch
16, lr 0.05), the same staleness weights, the default aggregator's step and buffer rule
(``quorum``: ``aggregator_spec.quorum_step``, ready once K updates agree or at
``buffer_limit``), the server's momentum if asked (``momentum``, the coordinator's
``--server-momentum``: ``v = momentum·v + step``, ``θ + η·v``), and every update taking
exactly ``speed x 0.5`` *virtual* seconds. No network, and unless asked (``run``'s
``codec``, ``norm_multiple``, ``jitter``) no codec (int8 in the benchmark), no adaptive
norm bound and no late arrivals; every version is evaluated (the coordinator evaluates the newest
waiting one). With ``{"k": "auto"}`` (the coordinator's ``--adaptive-k``, floor 4) K is also
re-checked every ``TICK_SECONDS``, as the coordinator's loop does, and ``quorum``'s limit is K
(``adaptive_k.quorum_devices``). A device trains once per version, as an agent does: when it
finishes on ``v`` and ``v`` is still the newest, it waits for the next. FedAvg rounds wait for
every device and make ``θ + η·a`` of the round's quorum aggregate.

Each ``NAME=JSON`` sets ``run``'s keywords (``{"mode": "fedavg"}``, ``{"k": 10}``, ...);
every configuration runs once per ``--seeds`` seed (the model's initialisation and the
devices' shuffles), and stops once 0.90 held for 20 virtual seconds (``target_hold``), or at
``--horizon``. Printed: virtual seconds to a stable 0.90 and to the first hit, versions to
the first hit, per seed.
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import tta
from coordinator.adaptive_k import DevicePeriods, adaptive_k, quorum_devices
from coordinator.aggregation import l2_norm
from coordinator.aggregator_spec import parse_aggregator, quorum_reached, quorum_step
from coordinator.norm_bound import NormRule, decide_norm, pushed
from coordinator.robust import clip_norm
from coordinator.staleness import staleness_weight
from coordinator.target_hold import Evaluated, first_held
from fedbus.update_codec import decode_update_delta, encode_update_delta

State = dict[str, np.ndarray]
COMPUTE_SECONDS = 0.5  # bench.tta.COMPUTE_SECONDS
# k "auto": the coordinator re-checks K at every tick (its loop wakes at least every 0.2 s)
TICK_SECONDS = 0.2


@dataclass(frozen=True)
class Outcome:
    stable: float | None  # virtual seconds to the first version from which the target held
    first: float | None  # ... to the first version at the target
    versions_to_target: int | None
    versions: int
    updates: int
    history: tuple[Evaluated, ...] = ()  # every version's accuracy, as evaluated
    clipped: int = 0  # updates the adaptive norm bound scaled down (``norm_multiple``)


QUORUM = parse_aggregator("quorum")


def quorum_ready(deltas: list[State], k: int, online: int) -> bool:
    """The coordinator's rule for a ``quorum`` buffer (``aggregator_spec.quorum_reached``)."""
    return quorum_reached(QUORUM, deltas, k, online)


def run(profile: str, *, mode: str = "fedbuff", seed: int = 0, k: int | str = 6,
        server_lr: float = 1.0, staleness: str = "poly", staleness_a: float = 1.0,
        momentum: float = 0.0, codec: str | None = None, norm_multiple: float = 0.0,
        jitter: float = 0.0, limit_k: bool = True,
        target: float = tta.TARGET, hold: float = tta.HOLD_SECONDS,
        horizon: float = 60.0) -> Outcome:
    """One run of ``profile`` (``bench.tta.PROFILES``) in ``mode`` fedbuff or fedavg; ``k``
    ``"auto"``: the coordinator's ``--adaptive-k`` with ``--buffer-size 4``
    (``coordinator.adaptive_k``, from the same virtual arrival and version times).

    What the real fleet adds, each behind an option (all off by default): ``codec`` (e.g.
    ``"int8"``, the benchmark's) sends every delta through the agent's encoder and the
    coordinator's decoder (stochastic rounding, as an agent does); ``norm_multiple`` applies
    the coordinator's adaptive norm bound (``coordinator.norm_bound``, clip at this multiple
    of the median of the last 64 accepted norms, reject above 4x that, warm-up 4x the
    model's norm; the coordinator's default multiple is 2) to each decoded delta before its
    staleness weight; ``jitter`` stretches each update's period by a
    uniform factor in ``[1, 1 + jitter]`` (late arrivals: overruns, messaging). ``limit_k``
    False: with ``k`` "auto", ``quorum``'s limit is worked out from every device online
    (``min(2K, devices)``, as before 2026-12-03 18:20) instead of being K."""
    import torch

    from edge_agent.train import evaluate, train_local
    from fedbus.datasets import dirichlet_split, load_digits, train_test_split
    from fedbus.messages import TrainSpec
    from fedbus.zoo import build_model, get_state

    torch.set_num_threads(1)
    speeds = tta.PROFILES[profile]
    n = len(speeds)
    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    data = [(x_train[p], y_train[p]) for p in dirichlet_split(y_train, n, 0.5, 0)]
    torch.manual_seed(seed)
    model = build_model("mlp", {"in_features": 64, "num_classes": 10})
    spec = TrainSpec(epochs=2, batch_size=16, lr=0.05)
    versions: dict[int, State] = {0: get_state(model)}
    history: list[Evaluated] = []

    def load(state: State) -> None:
        current = model.state_dict()
        for name, value in state.items():
            current[name] = torch.from_numpy(np.array(value, dtype=np.float32))
        model.load_state_dict(current)

    def publish(at: float) -> None:
        load(versions[len(versions) - 1])
        _, accuracy = evaluate(model, x_test, y_test)
        history.append(Evaluated(at, len(versions) - 1, accuracy))

    rng = np.random.default_rng(seed)
    rule = NormRule(multiple=norm_multiple)
    norms: tuple[float, ...] = ()
    clipped = 0

    def period(device: int) -> float:
        stretch = 1.0 + float(rng.uniform(0.0, jitter)) if jitter else 1.0
        return speeds[device] * COMPUTE_SECONDS * stretch

    publish(0.0)
    events = [(period(d), d, 0) for d in range(n)]  # (done at, device, base)
    if k == "auto":
        events.append((TICK_SECONDS, -1, -1))
    heapq.heapify(events)
    buffer: list[State] = []
    waiting: list[int] = []  # devices that trained on the newest version
    trained = [0] * n
    last_base = [0] * n  # the version each device last trained on
    now = 0.0
    made = {0: 0.0}  # when each version was made
    periods = DevicePeriods()
    velocity: State = {}
    while events:
        now, device, base = heapq.heappop(events)
        if now > horizon or first_held(history, target, hold, now=now) is not None:
            break
        newest = len(versions) - 1
        if device < 0:  # the coordinator's tick: K may have gone down with time
            heapq.heappush(events, (now + TICK_SECONDS, -1, -1))
            if not buffer:
                continue
        else:
            load(versions[base])
            trained[device] += 1
            train_local(model, *data[device], spec, seed=seed * 100_000 + trained[device])
            after = get_state(model)
            delta = {name: after[name] - versions[base][name] for name in after}
            if codec is not None:  # the agent's encoder, the coordinator's decoder
                wire, compression = encode_update_delta(delta, codec, rng=rng)
                delta = decode_update_delta(wire, compression)
            accepted = True
            if norm_multiple:  # the coordinator's adaptive bound (core._prepared)
                norm = l2_norm(delta)
                decision = decide_norm(rule, norm, norms, l2_norm(versions[newest]))
                accepted = decision.action != "reject"  # refused: not in the window
                if accepted:
                    norms = pushed(norms, norm, rule.window)
                if decision.action == "clip" and decision.clip_bound is not None:
                    delta, scale = clip_norm(delta, decision.clip_bound)
                    clipped += scale < 1.0
            weight = 1.0 if mode == "fedavg" else staleness_weight(
                newest - base, staleness, a=staleness_a)
            if accepted:
                buffer.append({name: value * np.float32(weight)
                               for name, value in delta.items()})
            waiting.append(device)
            periods.observe(str(device), now, base, made[base])
        if k == "auto":  # the core's _buffer_target and _step_ready
            k_now = adaptive_k(periods.view([str(d) for d in range(n)], now, newest, made, 0.0),
                               4, n)
            online = quorum_devices(k_now, n) if limit_k else n
        else:
            k_now, online = int(k), n
        ready = len(buffer) == n if mode == "fedavg" else quorum_ready(buffer, k_now, online)
        if ready:
            step = quorum_step(buffer).aggregate
            if momentum:
                velocity = {name: np.float32(momentum) * velocity.get(name, 0) + step[name]
                            for name in step}
                step = velocity
            versions[newest + 1] = {name: np.asarray(value + np.float32(server_lr) * step[name],
                                                     dtype=np.float32)
                                    for name, value in versions[newest].items()}
            buffer.clear()
            made[newest + 1] = now
            publish(now)
        newest = len(versions) - 1
        still = []
        for d in waiting:  # each device trains once per version, on the newest
            if last_base[d] < newest:
                last_base[d] = newest
                heapq.heappush(events, (now + period(d), d, newest))
            else:
                still.append(d)
        waiting = still
    held = first_held(history, target, hold, now=now)
    hit = next((e for e in history if e.accuracy >= target), None)
    return Outcome(stable=None if held is None else held.candidate.at,
                   first=None if hit is None else hit.at,
                   versions_to_target=None if hit is None else hit.version,
                   versions=len(versions) - 1, updates=sum(trained),
                   history=tuple(history), clipped=clipped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tta_virtual", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", choices=sorted(tta.PROFILES))
    parser.add_argument("configs", nargs="+", metavar="NAME=JSON")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--horizon", type=float, default=60.0, help="virtual seconds per run")
    args = parser.parse_args(argv)
    for item in args.configs:
        name, _, text = item.partition("=")
        settings: dict[str, Any] = json.loads(text or "{}")
        outcomes = [run(args.profile, seed=s, horizon=args.horizon, **settings)
                    for s in args.seeds]
        print(f"{name}: stable {[o.stable for o in outcomes]} first "
              f"{[o.first for o in outcomes]} versions to target "
              f"{[o.versions_to_target for o in outcomes]} clipped "
              f"{[o.clipped for o in outcomes]}", flush=True)


if __name__ == "__main__":
    main()
