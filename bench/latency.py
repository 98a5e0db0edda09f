"""Latency: publish to aggregated, p50 and p99, at a fixed moderate rate, against the delivery
latency of a bare paho subscriber at the same rate through the same broker.

The publisher puts ``time.time()`` into each update's ``sent_at`` just before publishing and
logs it by update id; the consumer notes ``time.time()`` when the update is done (ours: when
``CoordinatorCore.on_update`` returned it aggregated — FedAsync, K = 1, so every accepted
update makes a new model version at once; baseline: when paho's ``on_message`` ran). Both
processes read the same clock. The first ``WARMUP`` updates of each run are left out.
"""

from __future__ import annotations

import json
from typing import Any

from bench.harness import (
    BenchBroker,
    BenchContext,
    BenchError,
    median,
    percentile,
    ratio,
    summarize,
)
from bench.ingest import (
    DEVICES,
    LAG,
    MAX_STALENESS,
    SIZES,
    _consumer_args,
    _publish,
    guarded,
    make_template,
)

__all__ = ["run"]

RATE = 50.0  # updates per second: well below every ingest ceiling measured here
SECONDS = 10.0
WARMUP = 10


def _latencies(sent_at: dict[str, float], done: list[tuple[str, float]]) -> list[float]:
    out = []
    for uid, when in done:
        if uid in sent_at:
            out.append((when - sent_at[uid]) * 1000.0)
    return out


def _one(ctx: BenchContext, broker: BenchBroker, kind: str, i: int, template: str,
         model_args: dict, n: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    run_dir = str(ctx.path("latency", f"{kind}-{i}", "x").parent)
    broker.reset_coordinator_session()
    out, ready = f"{run_dir}/result.json", f"{run_dir}/ready"
    if kind != "bare":
        consumer = ctx.spawn_role("coordinator", _consumer_args(
            broker, out, ready, task_id=f"latency-{i}", model_args=model_args,
            mode="fedasync", k=1, max_versions=n, duration=SECONDS * 5 + 30,
            max_staleness=MAX_STALENESS, wall_clock=True,
        ), log_path=ctx.path(run_dir, "coordinator.log"), env=env)
    else:
        consumer = ctx.spawn_role("subscriber", _consumer_args(
            broker, out, ready, n=n, duration=SECONDS * 5 + 30, wall_clock=True, ids=True,
            all_times=True,
        ), log_path=ctx.path(run_dir, "subscriber.log"))
    consumer.wait_for_file(ctx.path(run_dir, "ready"), 60, kind)
    pub = _publish(ctx, broker, run_dir, template, n, 1, f"latency-{i}", f"{kind[0]}{i}",
                   rate=RATE, log_sent=True)
    pub.wait(SECONDS * 5 + 30)
    consumer.wait(SECONDS * 5 + 60, kind)
    res = json.loads(ctx.path(run_dir, "result.json").read_text())
    sent = json.loads(ctx.path(run_dir, "publisher.json").read_text())
    if kind != "bare":
        done = [(r[0], r[2]) for r in res["accepted"]]
    else:
        done = list(zip(res["ids"], res["times"], strict=True))
    order = sorted(sent["sent_at"], key=sent["sent_at"].get)
    skip = set(order[:WARMUP])
    lat = _latencies({u: t for u, t in sent["sent_at"].items() if u not in skip}, done)
    return {"n": len(lat), "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
            "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else None,
            "publish_failures": len(sent["failures"])}


def run(ctx: BenchContext) -> dict[str, Any]:
    model_args = SIZES["ingest_25k"]["model_args"]
    seconds = 3.0 if ctx.quick else SECONDS
    n = int(RATE * seconds)
    pairs = ctx.pairs(3)
    template, params, payload_bytes = make_template(ctx, "latency", model_args)
    ours: list[dict] = []
    base: list[dict] = []
    with BenchBroker(ctx, "latency", DEVICES) as broker:
        for i in range(pairs):
            ours.append(guarded(lambda i=i: _one(ctx, broker, "ours", i, template, model_args,
                                                 n)))
            base.append(guarded(lambda i=i: _one(ctx, broker, "bare", i, template, model_args,
                                                 n)))
    for side, rs in (("ours", ours), ("baseline", base)):
        if all(r.get("error") for r in rs):
            raise BenchError(f"latency: every {side} run failed: {rs[0]['error']}")
    o50 = summarize([r.get("p50_ms") for r in ours], "coordinator: publish to aggregated")
    b50 = summarize([r.get("p50_ms") for r in base], "bare paho subscriber: publish to delivered")
    o99 = summarize([r.get("p99_ms") for r in ours], "coordinator: publish to aggregated")
    b99 = summarize([r.get("p99_ms") for r in base], "bare paho subscriber: publish to delivered")
    return {
        "unit": "ms",
        "ours": o50,
        "baseline": b50,
        "ratio": ratio(o50["median"], b50["median"]),
        "ratio_definition": "ours p50 / bare p50 (lower is better; p99 beside it)",
        "p99": {"ours": o99, "baseline": b99, "ratio": ratio(o99["median"], b99["median"])},
        "aim": "none set (reported)",
        "aim_met": None,
        "params": {"rate_per_s": RATE, "seconds": seconds, "updates_per_run": n,
                   "warmup_skipped": WARMUP, "pairs": pairs, "parameters": params,
                   "model_args": model_args, "payload_bytes": payload_bytes, "codec": "int8",
                   "mode": "fedasync (K=1)", "publisher_connections": len(DEVICES),
                   "base_version_lag": LAG},
        "details": {"ours_runs": ours, "baseline_runs": base,
                    "p90_ms": {"ours": median(r.get("p90_ms") for r in ours),
                               "baseline": median(r.get("p90_ms") for r in base)}},
    }
