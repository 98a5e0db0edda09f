"""Ingest: updates per second the coordinator fully decodes, validates and aggregates, against
the ceiling of a bare paho subscriber receiving the same payloads through the same broker.

Per run, three processes besides the broker: the consumer (ours: a real ``CoordinatorService``
in ``bench.procs coordinator``; baseline: ``bench.procs subscriber``) and a publisher with one
connection per device account publishing pre-encoded int8 updates flat out at QoS 1. Ours runs
once per number of ingest workers in ``WORKERS`` (``--ingest-workers``, whose processes are
ours too), then the baseline, and again; the coordinator's durable session is reset before
each run so no run sees the leftovers of another. The curve reports each number of workers
against the baseline runs of the same pairs; the headline is the number of workers with the
highest median.

Rate = completed updates / (completion of the last - arrival of the first), at the consumer.
For ours an update is complete when it has been aggregated into a new model version
(``VersionRecord.seconds`` of the last version; FedBuff with K updates per version); for
the baseline when paho's ``on_message`` ran.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    BenchBroker,
    BenchContext,
    BenchError,
    median,
    ratio,
    summarize,
)
from fedbus.processes import Child, ChildError

__all__ = ["SIZES", "make_template", "run"]

log = logging.getLogger("bench")

# mlp arguments giving about 25 thousand and 1 million parameters (64 inputs, 10 classes).
SIZES: dict[str, dict[str, Any]] = {
    "ingest_25k": {
        "model_args": {"in_features": 64, "hidden": [330], "num_classes": 10},
        "n": 4000, "pairs": 5,
        "quick": {"model_args": {"in_features": 64, "hidden": [330], "num_classes": 10},
                  "n": 400},
    },
    "ingest_1m": {
        "model_args": {"in_features": 64, "hidden": [1000, 900], "num_classes": 10},
        "n": 250, "pairs": 5,
        "quick": {"model_args": {"in_features": 64, "hidden": [256, 256], "num_classes": 10},
                  "n": 60},
    },
}
K = 10  # FedBuff buffer size: a new version every 10 updates
LAG = 20  # base_version lags the publish index by this many versions
# Four publisher connections interleave at the broker, so an update can reach the coordinator
# 100+ positions after its publish index; a staleness bound of 1000 versions keeps every one.
MAX_STALENESS = 1000
# One update per device and base version (the coordinator refuses a second as
# duplicate_work): with base = max(0, i // K - LAG) the first K x LAG updates all have base
# 0, so there are K more device accounts than that, one connection each, sending in turn.
DEVICES = tuple(f"device-{i:03d}" for i in range(1, K * (LAG + 1) + 1))
AIM = 0.9  # issue 10: 90% of the bare ceiling
WORKERS = (0, 1, 2, 3)  # the throughput-against-workers curve (--ingest-workers)
# --quick (a smoke run, the suite's test_bench_smoke): one point, the worker path, so that
# the smoke costs what it did before the curve
WORKERS_QUICK = (1,)


def make_template(ctx: BenchContext, name: str, model_args: dict[str, Any],
                  codec: str = "int8") -> tuple[str, int, int]:
    """An encoded delta (msgpack file) of small random values shaped like the model's state.

    Returns (path, parameter count, size in bytes of one whole update message).
    """
    import numpy as np
    import torch

    from fedbus.envelope import pack
    from fedbus.messages import Update
    from fedbus.update_codec import encode_delta
    from fedbus.zoo import build_model, get_state

    torch.manual_seed(0)
    state = get_state(build_model("mlp", model_args))
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
             for k, v in state.items()}
    encoded = encode_delta(delta, codec, rng=rng)
    path = ctx.path(name, "template.msgpack")
    path.write_bytes(pack(encoded))
    size = len(pack(Update("x" * 16, DEVICES[0], "t", 0, 10, encoded, {"loss": 0.5},
                           time.time(), run_id="x" * 16).to_wire()))
    return str(path), int(sum(v.size for v in state.values())), size


def _consumer_args(broker: BenchBroker, out: str, ready: str, **extra: Any) -> dict[str, Any]:
    return {"host": broker.host, "port": broker.port, "prefix": broker.prefix,
            "credentials": str(broker.credentials_file), "out": out, "ready": ready, **extra}


def _publish(ctx: BenchContext, broker: BenchBroker, run_dir: str, template: str, n: int,
             k: int, task_id: str, tag: str, rate: float = 0.0, log_sent: bool = False,
             window: int = 20) -> Child:
    return ctx.spawn_role("publisher", {
        "host": broker.host, "port": broker.port, "prefix": broker.prefix,
        "credentials": str(broker.credentials_file), "devices": list(DEVICES),
        "template": template, "n": n, "k": k, "lag": LAG, "rate": rate, "tag": tag,
        "task_id": task_id, "window": window, "log_sent": log_sent,
        "out": f"{run_dir}/publisher.json",
    }, log_path=ctx.path(run_dir, "publisher.log"))


def run_ours(ctx: BenchContext, broker: BenchBroker, name: str, i: int, model_args: dict,
             template: str, n: int, workers: int = 0) -> dict[str, Any]:
    run_dir = str(ctx.path(name, f"ours-{i}-w{workers}", "x").parent)
    broker.reset_coordinator_session()
    task_id = f"ingest-{i}"
    consumer = ctx.spawn_role("coordinator", _consumer_args(
        broker, f"{run_dir}/result.json", f"{run_dir}/ready", task_id=task_id,
        model_args=model_args, mode="fedbuff", k=K, max_versions=n // K,
        duration=300.0, max_staleness=MAX_STALENESS, state_dir=f"{run_dir}/state",
        config={"ingest_workers": workers},
    ), log_path=ctx.path(run_dir, "coordinator.log"))
    consumer.wait_for_file(ctx.path(run_dir, "ready"), 60)
    pub = _publish(ctx, broker, run_dir, template, n, K, task_id, f"o{i}w{workers}")
    consumer.wait(300)
    pub.wait(60)
    res = json.loads(ctx.path(run_dir, "result.json").read_text())
    pub_res = json.loads(ctx.path(run_dir, "publisher.json").read_text())
    counters = res["counters"]
    accepted = counters.get("updates_accepted", 0)
    completed = (len(res["history"]) - 1) * K
    t_first = res["first_update_seconds"]
    t_last = res["history"][-1][1]
    rate = completed / (t_last - t_first) if t_first is not None and t_last > t_first else None
    cpu = None
    if res["accepted"]:
        cpu_first, cpu_last = res["accepted"][0][3], res["accepted"][-1][3]
        cpu = (cpu_last - cpu_first) / max(1, len(res["accepted"]) - 1)
    return {
        "workers": workers, "rate": rate, "completed": completed, "accepted": accepted,
        "rejected": counters.get("updates_rejected", 0),
        "lost": n - counters.get("updates_received", 0),
        "rejected_by": {k: v for k, v in counters.items() if k.startswith("rejected_") and v},
        "span_seconds": None if t_first is None else round(t_last - t_first, 3),
        "cpu_ms_per_update": None if cpu is None else round(cpu * 1000, 3),
        "publisher_rate": pub_res["sent"] / pub_res["seconds"],
        "publish_failures": len(pub_res["failures"]),
        "stop_reason": res["stop_reason"],
    }


def run_bare(ctx: BenchContext, broker: BenchBroker, name: str, i: int, template: str,
             n: int) -> dict[str, Any]:
    run_dir = str(ctx.path(name, f"bare-{i}", "x").parent)
    broker.reset_coordinator_session()
    consumer = ctx.spawn_role("subscriber", _consumer_args(
        broker, f"{run_dir}/result.json", f"{run_dir}/ready", n=n, duration=300.0,
    ), log_path=ctx.path(run_dir, "subscriber.log"))
    consumer.wait_for_file(ctx.path(run_dir, "ready"), 60)
    pub = _publish(ctx, broker, run_dir, template, n, K, f"bare-{i}", f"b{i}")
    consumer.wait(300)
    pub.wait(60)
    res = json.loads(ctx.path(run_dir, "result.json").read_text())
    pub_res = json.loads(ctx.path(run_dir, "publisher.json").read_text())
    received = res["received"]
    rate = None
    if res["times"] and received > 1:
        t_first, t_last = res["times"]
        rate = received / (t_last - t_first) if t_last > t_first else None
    cpu = None
    if res["cpu"] and received > 1:
        cpu = (res["cpu"][1] - res["cpu"][0]) / (received - 1)
    return {
        "rate": rate, "received": received, "lost": n - received,
        "span_seconds": None if t_first is None else round(t_last - t_first, 3),
        "cpu_ms_per_update": None if cpu is None else round(cpu * 1000, 3),
        "publisher_rate": pub_res["sent"] / pub_res["seconds"],
        "publish_failures": len(pub_res["failures"]),
    }


def guarded(fn: Any) -> dict[str, Any]:
    """One run; a run that fails is recorded (rate None, the error) instead of ending the
    benchmark, so one hiccup of a shared machine does not throw away the other runs."""
    try:
        return fn()
    except (BenchError, ChildError, OSError, ValueError, KeyError) as exc:
        log.warning("run failed: %s", exc)
        return {"rate": None, "error": f"{type(exc).__name__}: {exc}"[:500]}


def _split_answer(wire: bytes) -> tuple[bytes, bytearray]:
    """(header, values) of an ingest worker's answer, as its reader thread reads them."""
    head_len = int.from_bytes(wire[:4], "little")
    return wire[12:12 + head_len], bytearray(wire[12 + head_len:])


def stage_costs(model_args: dict[str, Any]) -> dict[str, float]:
    """Microseconds per update of each step of the coordinator's path, in this process.

    Measured on one encoded int8 update of the same model: where the time of one update goes
    (the same functions the coordinator calls, timed one by one).
    """
    import numpy as np
    import torch

    from coordinator.aggregation import WeightedSum, fedbuff_apply, l2_norm
    from coordinator.ingest_workers import decode_answer, encode_answer
    from coordinator.journal import Pending, Verdict
    from coordinator.store import Store
    from coordinator.validation import ValidationLimits, check_delta, validate_update
    from fedbus.envelope import pack, unpack
    from fedbus.messages import Update
    from fedbus.update_codec import decode_delta, encode_delta
    from fedbus.zoo import build_model, get_state

    torch.manual_seed(0)
    state = get_state(build_model("mlp", model_args))
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
             for k, v in state.items()}
    payload = pack(Update("x" * 16, "device-01", "t", 0, 10, encode_delta(delta, "int8", rng=rng),
                          {}, time.time(), run_id="r").to_wire())
    shapes = {k: v.shape for k, v in state.items()}
    limits = ValidationLimits(4 * 1024 * 1024, 100.0, 10)
    obj = unpack(payload, "update", limits.decode)
    decoded = decode_delta(obj["delta"])
    ledger = Store(None)
    workdir = tempfile.mkdtemp(prefix="fedbus-stage-")
    store = Store(Path(workdir) / "state.db")
    store.create_run("r", {}, 0.0, state, {})
    last_id = [""]

    def next_id() -> str:
        last_id[0] = f"u{len(last_id)}-{time.perf_counter_ns()}"
        return last_id[0]

    buffered = WeightedSum(shapes)
    for _ in range(K):
        buffered.add(decoded, num_samples=10, coef=10.0)

    def per_call(fn: Any, repeat: int) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times.append((time.perf_counter() - start) / repeat)
        return round(min(times) * 1e6, 1)

    checked = check_delta(payload, expected_shapes=shapes, limits=limits)
    big = sum(v.size for v in state.values()) > 200_000
    r = 20 if big else 300
    return {
        "unpack (msgpack, limits)": per_call(lambda: unpack(payload, "update", limits.decode),
                                             r),
        "decode_delta (int8 -> float32)": per_call(lambda: decode_delta(obj["delta"]), r),
        "l2_norm (also proves the values finite)": per_call(lambda: l2_norm(decoded), r),
        "validate_update (all of the above)": per_call(lambda: validate_update(
            payload, topic_device="device-01", run_id="r", task_id="t",
            expected_shapes=shapes, current_version=1, limits=limits, ledger=ledger), r),
        "check_delta (an ingest worker's part)": per_call(lambda: check_delta(
            payload, expected_shapes=shapes, limits=limits), r),
        "validate_update with the worker's outcome (the reducer's part)": per_call(
            lambda: validate_update(
                payload, topic_device="device-01", run_id="r", task_id="t",
                expected_shapes=shapes, current_version=1, limits=limits, ledger=ledger,
                prechecked=checked), r),
        "worker answer encode + decode (framing, without the pipe)": per_call(
            lambda: decode_answer(*_split_answer(encode_answer(1, 0.0, checked, shapes)),
                                  shapes), r),
        "store commit (verdict + payload, WAL on disk)": per_call(
            lambda: store.commit([Verdict(next_id(), "device-01", b"12345678", 0, True, None,
                                          "buffered", 1, 0),
                                  Pending(last_id[0], f"d{last_id[0]}", 0, 10, 0, 10.0,
                                          payload)], {}), r),
        "WeightedSum.add (into the buffer)": per_call(
            lambda: buffered.add(decoded, num_samples=10, coef=10.0), r),
        "fedbuff_apply / K": round(per_call(lambda: fedbuff_apply(
            state, buffered, server_lr=1.0), max(2, r // K)) / K, 1),
        "model message pack (fp32) / K": round(per_call(lambda: pack({"t": encode_delta(
            state, "fp32")}), max(2, r // K)) / K, 1),
    }


def run(ctx: BenchContext, name: str) -> dict[str, Any]:
    size = SIZES[name]
    cfg = {**size, **size["quick"]} if ctx.quick else size
    model_args, n = cfg["model_args"], cfg["n"]
    pairs = ctx.pairs(size["pairs"])
    template, params, payload_bytes = make_template(ctx, name, model_args)
    workers = WORKERS_QUICK if ctx.quick else WORKERS
    curve_runs: dict[int, list[dict]] = {w: [] for w in workers}
    base: list[dict] = []
    with BenchBroker(ctx, name, DEVICES) as broker:
        for i in range(pairs):
            for w in workers:
                curve_runs[w].append(guarded(lambda i=i, w=w: run_ours(
                    ctx, broker, name, i, model_args, template, n, w)))
            base.append(guarded(lambda i=i: run_bare(ctx, broker, name, i, template, n)))
    if all(r.get("error") for r in base):
        raise BenchError(f"{name}: every baseline run failed: {base[0]['error']}")
    b = summarize([r["rate"] for r in base], "bare paho subscriber",
                  cpu_ms_per_update=median(r.get("cpu_ms_per_update") for r in base))
    curve: list[dict[str, Any]] = []
    for w, rs in curve_runs.items():
        good = [r for r in rs if not (r.get("error") or r["rejected"] or r["completed"] < n - K)]
        rates = [r["rate"] for r in good]
        m = median(rates)
        curve.append({"workers": w, "runs": [r.get("rate") for r in rs],
                      "median": m, "ratio": ratio(m, b["median"]),
                      "cpu_ms_per_update": median(r.get("cpu_ms_per_update") for r in good),
                      "failed_runs": len(rs) - len(good)})
    usable = [c for c in curve if c["median"] is not None]
    if not usable:
        first = curve_runs[workers[0]][0]
        raise BenchError(f"{name}: every coordinator run failed or rejected updates: {first}")
    best = max(usable, key=lambda c: c["median"])
    best_runs = curve_runs[best["workers"]]
    o = summarize([r["rate"] for r in best_runs],
                  f"coordinator (CoordinatorService, --ingest-workers {best['workers']})",
                  cpu_ms_per_update=best["cpu_ms_per_update"])
    ours = [r for w in workers for r in curve_runs[w]]
    value = ratio(o["median"], b["median"])
    return {
        "unit": "updates/s",
        "ours": o,
        "baseline": b,
        "ratio": value,
        "ratio_definition": "ours / ceiling (median updates/s of ours / of the bare subscriber)",
        "aim": f"ours >= {AIM:.0%} of the bare ceiling",
        "aim_met": None if value is None else value >= AIM,
        "params": {
            "parameters": params, "model_args": model_args, "payload_bytes": payload_bytes,
            "codec": "int8", "updates_per_run": n, "pairs": pairs, "mode": "fedbuff",
            "buffer_size_K": K, "publisher_connections": len(DEVICES),
            "publisher_window": 20, "evaluation": "none",
            "max_staleness": MAX_STALENESS, "base_version_lag": LAG,
            "ingest_workers": best["workers"], "workers_measured": list(workers),
            "cpu_count": os.cpu_count(),
        },
        "details": {
            "curve": curve,
            "ours_runs": ours, "baseline_runs": base,
            "publisher_rate_median": median(r.get("publisher_rate") for r in ours + base),
            "stage_costs_us": stage_costs(model_args),
        },
    }
