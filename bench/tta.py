"""Time to accuracy: FedBuff (asynchronous, the default) against FedAvg (fedbus's synchronous
mode) to the same held-out accuracy on digits, several seeds, three device-speed profiles.

A fleet of real agents (``harness.Fleet``: the demo's split, one ``fedbus agent`` process per
device with ``--slowdown`` and ``--compute-seconds COMPUTE_SECONDS``, so that an update of
device ``i`` takes ``s_i x COMPUTE_SECONDS`` whatever its data size) serves every run of a
profile; each run is a new task. Time is
counted from the first update the coordinator receives (agent start-up excluded). Runs
alternate async, sync per seed.

The headline is the time to a *stable* target: to the first version that reaches it and
from which it held (at least 90% of the versions evaluated in the following
``HOLD_SECONDS`` reached it too; ``coordinator.target_hold.first_held``, the rule
``--target-hold`` stops a coordinator by, applied to the run's history with the versions'
times); the time to the first version that reaches it (the first hit) is beside it. Each
run goes on to ``LATE_TARGET`` held for ``HOLD_SECONDS`` (the coordinator's
``--target-hold``), or to the cap; a run whose target did not hold before it ended counts
as the cap, like a run that never reached it. Beside them, each device's share of the
accepted async updates against its share of the data (no device shut out).

Beside each profile: the ideal, i.e. how many more updates per second asynchronous
aggregation receives than synchronous rounds when device ``i`` needs ``s_i`` time units per
update (async: ``Σ 1/s_i`` per unit; sync: ``n`` per round of ``max s_i``), the same ratio
from the per-device update rates actually measured in the async runs (``effective_ideal``),
and the measured ratio of accepted updates per second, async over sync.
"""

from __future__ import annotations

from typing import Any

from bench.harness import BenchContext, median, overruns, ratio, summarize
from coordinator.target_hold import HOLD_FRACTION, Evaluated, first_held

__all__ = ["PROFILES", "ideal_ratio", "run"]

PROFILES: dict[str, list[float]] = {
    "1:2:4": [1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 1.0],
    "long_tail": [1.0] * 9 + [10.0],  # one device in ten is ten times slower
    "equal": [1.0] * 10,
    "quick": [1.0, 2.0, 4.0],
}
ORDER = ("equal", "1:2:4", "long_tail")  # one fleet at a time, in this order
TARGET = 0.90  # the headline
LATE_TARGET = 0.93  # runs go on to this one, to see whether the speed-up lasts
SEEDS = (0, 1, 2)
CAP_SECONDS = 120.0
HOLD_SECONDS = 20.0  # a stable target: held for this long (issue 10's definition)
QUICK_HOLD_SECONDS = 5.0  # --quick: a smoke check of the same path, not a measurement
# Simulated seconds per update at slowdown 1: above what training takes when ten agents
# train at once on two cores, so the profiles are exactly the speeds they name as long as
# the machine is not busy: each profile reports, per side, the updates whose training overran
# their device's period (from the agents' logs).
COMPUTE_SECONDS = 0.5
QUICK_COMPUTE_SECONDS = 0.2
# FedBuff K as a share of the fleet: 4 of 10 devices, the coordinator's own default
# (--buffer-size 4). Chosen on 2026-12-03 (BENCHMARKS.md, "What limits time to accuracy"),
# seconds to a stable 0.90, medians of 3 seeds: in virtual time (bench.tta_virtual, no load)
# K=4 3.5 and K=6 4.0 against sync 2.5 under equal speeds, K=4 5.0 and K=6 6.0 against 12.0
# under 1:2:4; on the fleet under 1:2:4 on a quiet machine K=4 4.64, K=6 5.66, sync 11.78.
# (2026-11-22, to a first hit, other defaults: K=6 had been the one no slower under equal
# speeds.) No single K meets both aims: K=10, the whole fleet, is exactly sync's rounds.
BUFFER_SHARE = 0.4
# True: FedBuff with the coordinator's --adaptive-k, K of BUFFER_SHARE its floor (K = the
# devices about as fast as the fastest, coordinator.adaptive_k; quorum's limit is K). Off until
# 2026-12-03 18:20: the long tail's 0.93 held later than with K = 4 (20.1 s against 9.4 s)
# while quorum's limit counted every device online; with the limit K it held sooner than
# K = 4 in virtual time (BENCHMARKS.md, "What limits time to accuracy").
ADAPTIVE_K = True
# The staleness exponent of the async side (--staleness-a; weight 1 / (1 + s)^a). With K the
# fast group, versions come at its pace and a device 4x slower is about 4 versions behind:
# a = 1 weighs its rare updates at 1/5, a = 0.5 at 0.45. Virtual time, 1:2:4, seeds 0-4,
# to a stable 0.90: 4.8 s with a = 0.5 against 6.0 s with a = 1 (rounds 10.0 s).
ASYNC_STALENESS_A = 0.5
# Issue 10: on *stable* targets (the headline is the time to a stable TARGET), async at least
# 2x faster than sync under 1:2:4 and no slower under equal speeds.
AIM_SPEEDUP = 2.0


def _async_config() -> dict[str, Any]:
    """The async side's coordinator settings beyond K."""
    return {"adaptive_k": ADAPTIVE_K, "staleness_a": ASYNC_STALENESS_A}


def ideal_ratio(speeds: list[float]) -> float:
    """Async over sync updates per second: ``Σ 1/s_i`` against ``n / max s_i``."""
    return sum(1.0 / s for s in speeds) / (len(speeds) / max(speeds))


def _tta(run: dict[str, Any], target: float) -> float | None:
    first = run["first_update_seconds"]
    if first is None:
        return None
    for rec in run["history"]:
        if rec["accuracy"] is not None and rec["accuracy"] >= target:
            return round(max(0.0, rec["seconds"] - first), 3)
    return None


def _stable_tta(run: dict[str, Any], target: float, hold: float) -> float | None:
    """Seconds to the first version from which ``target`` held for ``hold`` seconds (its
    own time, so comparable with the first hit; the decision comes ``hold`` s later)."""
    first = run["first_update_seconds"]
    evaluated = [Evaluated(rec["seconds"], rec["version"], rec["accuracy"])
                 for rec in run["history"] if rec["accuracy"] is not None]
    if first is None or not evaluated:
        return None
    # windows still open when the run stopped are not judged
    end = run.get("stopped_seconds") or run["history"][-1]["seconds"]
    held = first_held(evaluated, target, hold, now=end)
    return None if held is None else round(max(0.0, held.candidate.at - first), 3)


def device_shares(run: dict[str, Any], samples: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Each device's share of the updates accepted in the run against its share of the
    training data. An accepted update is applied (a run ends by applying what its buffer
    holds), with its staleness weight."""
    accepted = {d: len(ts) for d, ts in run["accepted_at"].items()}
    total_updates = sum(accepted.values())
    total_samples = sum(samples.values())
    return {d: {"updates": accepted.get(d, 0),
                "update_share": round(accepted.get(d, 0) / total_updates, 4)
                if total_updates else None,
                "data_share": round(n / total_samples, 4) if total_samples else None}
            for d, n in samples.items()}


def _rates(run: dict[str, Any]) -> tuple[float | None, dict[str, float]]:
    """Accepted updates per second over the run, and per device."""
    times = [t for ts in run["accepted_at"].values() for t in ts]
    if len(times) < 2:
        return None, {}
    start, end = min(times), max(times)
    span = end - start
    if span <= 0:
        return None, {}
    per_device = {d: len(ts) / span for d, ts in run["accepted_at"].items()}
    return (len(times) - 1) / span, per_device


def overrun_counts(run: dict[str, Any], periods: dict[str, float]) -> dict[str, int]:
    """Of the updates the agents sent during the run (their logs), how many there were and
    how many took longer to train than their device's simulated period (``periods``: speed
    x compute seconds), i.e. came later than the profile says (the machine was too busy)."""
    trained = run.get("training_seconds") or {}
    return {"updates": sum(len(v) for v in trained.values()),
            "overrun": sum(overruns(trained.get(d, []), p) for d, p in periods.items()),
            "devices_overrunning": sum(overruns(trained.get(d, []), p) > 0
                                       for d, p in periods.items())}


def _compact(run: dict[str, Any], target: float, late: float, cap: float,
             hold: float, periods: dict[str, float] | None = None) -> dict[str, Any]:
    rate, per_device = _rates(run)
    tta, tta_late = _tta(run, target), _tta(run, late)
    stable, stable_late = _stable_tta(run, target, hold), _stable_tta(run, late, hold)
    return {
        "seed": run["seed"], "tta_seconds": tta, "reached": tta is not None,
        "value": tta if tta is not None else cap,  # a run that never got there counts as cap
        "late_tta_seconds": tta_late, "late_value": tta_late if tta_late is not None else cap,
        "stable_tta_seconds": stable, "stable_value": stable if stable is not None else cap,
        "late_stable_tta_seconds": stable_late,
        "late_stable_value": stable_late if stable_late is not None else cap,
        "versions_to_target": next((h["version"] for h in run["history"]
                                    if h["accuracy"] is not None and h["accuracy"] >= target),
                                   None),
        "first_update_seconds": run["first_update_seconds"],
        "versions": run["final_version"], "updates_accepted": run["updates_accepted"],
        "updates_rejected": run["updates_rejected"], "rejected": run["rejected"],
        "final_accuracy": run["final_accuracy"], "stop_reason": run["stop_reason"],
        "updates_per_s": rate,
        "updates_per_s_by_device": {d: round(r, 3) for d, r in per_device.items()},
        "trained": overrun_counts(run, periods or {}),
    }


def fleet_periods(fleet: Any) -> dict[str, float]:
    """Each device's simulated seconds per update: its speed x the compute seconds."""
    return {d: s * fleet.spec.compute_seconds
            for d, s in zip(fleet.devices, fleet.spec.speeds, strict=True)}


def _profile(ctx: BenchContext, name: str, speeds: list[float], seeds: tuple[int, ...],
             target: float, late: float, cap: float, compute: float,
             hold: float) -> dict[str, Any]:
    fleet = ctx.fleet_pool().get(name, speeds, compute)
    # An agent trains once per model version, so FedBuff needs K < devices to make progress.
    k = max(1, min(round(BUFFER_SHARE * len(speeds)), len(speeds) - 1))
    periods = fleet_periods(fleet)
    runs: dict[str, list[dict]] = {"fedbuff": [], "fedavg": []}
    for seed in seeds:
        for mode in ("fedbuff", "fedavg"):  # ours, then the baseline
            r = fleet.run(task_id=f"tta-{mode}-s{seed}", mode=mode, codec="int8", seed=seed,
                          target_accuracy=late, target_hold=hold, duration=cap,
                          buffer_size=k, **(_async_config() if mode == "fedbuff" else {}))
            r["seed"] = seed
            compact = _compact(r, target, late, cap, hold, periods)
            compact["device_shares"] = device_shares(r, fleet.samples)
            runs[mode].append(compact)
    # the headline: time to a stable TARGET (first hit beside it, "first_hit")
    label = f"FedBuff adaptive K (floor {k})" if ADAPTIVE_K else f"FedBuff K={k}"
    if ASYNC_STALENESS_A != 1.0:
        label += f", staleness a={ASYNC_STALENESS_A:g}"
    asy = summarize([r["stable_value"] for r in runs["fedbuff"]], label,
                    reached=sum(r["stable_tta_seconds"] is not None for r in runs["fedbuff"]))
    syn = summarize([r["stable_value"] for r in runs["fedavg"]], "FedAvg (synchronous rounds)",
                    reached=sum(r["stable_tta_seconds"] is not None for r in runs["fedavg"]))
    first_asy = median(r["value"] for r in runs["fedbuff"])
    first_syn = median(r["value"] for r in runs["fedavg"])
    # Effective ideal: the per-device rates the async runs actually achieved.
    effective = []
    for r in runs["fedbuff"]:
        rates = [v for v in r["updates_per_s_by_device"].values() if v > 0]
        if rates and len(rates) == len(speeds):
            effective.append(sum(rates) / (len(rates) * min(rates)))
    async_rate = median(r["updates_per_s"] for r in runs["fedbuff"])
    sync_rate = median(r["updates_per_s"] for r in runs["fedavg"])
    rel: dict[str, list[float]] = {}
    for r in runs["fedbuff"]:
        for d, v in r["updates_per_s_by_device"].items():
            rel.setdefault(d, []).append(v)
    fastest = max((median(v) or 0.0) for v in rel.values()) if rel else 0.0
    late_asy = median(r["late_value"] for r in runs["fedbuff"])
    late_syn = median(r["late_value"] for r in runs["fedavg"])

    def stable(key: str, seconds: str) -> dict[str, Any]:
        asy_s = median(r[key] for r in runs["fedbuff"])
        syn_s = median(r[key] for r in runs["fedavg"])
        return {"async_median": asy_s, "sync_median": syn_s, "ratio": ratio(syn_s, asy_s),
                "async_held": sum(r[seconds] is not None for r in runs["fedbuff"]),
                "sync_held": sum(r[seconds] is not None for r in runs["fedavg"])}
    shares: dict[str, dict[str, Any]] = {}
    for r in runs["fedbuff"]:
        for d, v in r["device_shares"].items():
            entry = shares.setdefault(d, {"data_share": v["data_share"], "update_shares": []})
            entry["update_shares"].append(v["update_share"])
    for entry in shares.values():
        entry["update_share"] = median(entry["update_shares"])
    stale = [r["rejected"].get("stale", 0) for r in runs["fedbuff"]]
    return {
        "ours": asy,
        "baseline": syn,
        "ratio": ratio(syn["median"], asy["median"]),
        "first_hit": {"async_median": first_asy, "sync_median": first_syn,
                      "ratio": ratio(first_syn, first_asy),
                      "async_reached": sum(r["reached"] for r in runs["fedbuff"]),
                      "sync_reached": sum(r["reached"] for r in runs["fedavg"])},
        # each device's share of the accepted (and so applied) async updates, median over
        # the seeds, against its share of the training data; updates rejected as stale
        "device_shares": shares,
        "async_rejected_stale": stale,
        "late_target": {
            "target": late, "async_median": late_asy, "sync_median": late_syn,
            "ratio": ratio(late_syn, late_asy),
            "async_reached": sum(r["late_tta_seconds"] is not None for r in runs["fedbuff"]),
            "sync_reached": sum(r["late_tta_seconds"] is not None for r in runs["fedavg"])},
        # the first version from which the target held (HOLD_SECONDS, 90%), cap if none
        "stable_target": {"target": target, "hold_seconds": hold,
                          **stable("stable_value", "stable_tta_seconds")},
        "late_stable_target": {"target": late, "hold_seconds": hold,
                               **stable("late_stable_value", "late_stable_tta_seconds")},
        "versions_to_target": {
            "async": median(r["versions_to_target"] for r in runs["fedbuff"]),
            "sync": median(r["versions_to_target"] for r in runs["fedavg"])},
        "ideal": round(ideal_ratio(speeds), 3),
        # Without a compute time the slowdown multiplies each agent's own training time,
        # which grows with its share of the data: the profile is then speed x samples.
        "ideal_with_data_sizes": None if compute else round(ideal_ratio(
            [s * fleet.samples[d] for s, d in zip(speeds, fleet.devices, strict=True)]), 3),
        "compute_seconds": compute,
        # updates whose training overran the device's simulated period, per side (the
        # profile's speeds held only as far as these are few)
        "overruns": {mode: {key: sum(r["trained"][key] for r in rs)
                            for key in ("updates", "overrun")}
                     for mode, rs in runs.items()},
        "effective_ideal": median(effective),
        "measured_updates_per_s": {"async": async_rate, "sync": sync_rate,
                                   "ratio": ratio(async_rate, sync_rate)},
        "speeds": speeds,
        "samples_per_device": dict(fleet.samples),
        "effective_relative_speed": {
            d: round(fastest / m, 2) if (m := median(v)) else None for d, v in rel.items()},
        "runs": runs,
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    order: tuple[str, ...]
    seeds: tuple[int, ...]
    if ctx.quick:
        order, seeds, target, late, cap = ("quick",), (0,), 0.5, 0.6, 30.0
        compute, hold = QUICK_COMPUTE_SECONDS, QUICK_HOLD_SECONDS
    else:
        order, seeds = ORDER, SEEDS[: max(1, ctx.runs or len(SEEDS))]
        target, late, cap = TARGET, LATE_TARGET, CAP_SECONDS
        compute, hold = COMPUTE_SECONDS, HOLD_SECONDS
    profiles = {name: _profile(ctx, name, PROFILES[name], seeds, target, late, cap, compute,
                               hold)
                for name in order}
    head = profiles.get("1:2:4") or next(iter(profiles.values()))
    equal = profiles.get("equal")
    met = None
    if head["ratio"] is not None:
        met = head["ratio"] >= AIM_SPEEDUP and (
            equal is None or (equal["ratio"] is not None and equal["ratio"] >= 1.0))
    return {
        "unit": "s to a stable target",
        "ours": head["ours"],
        "baseline": head["baseline"],
        "ratio": head["ratio"],
        "ratio_definition": "sync time / async time to a stable target under 1:2:4 (other "
                            "profiles beside it)",
        "aim": f"stable target >= {AIM_SPEEDUP:g}x faster than sync under 1:2:4, no slower "
               "under equal speeds",
        "aim_met": met,
        "profiles": profiles,
        "params": {"target_accuracy": target, "late_target_accuracy": late,
                   "seeds": list(seeds), "cap_seconds": cap, "compute_seconds": compute,
                   "hold_seconds": hold, "hold_fraction": HOLD_FRACTION,
                   "async": head["ours"]["label"], "sync": "fedavg, round deadline 30 s",
                   "codec": "int8", "dataset": "digits (demo split, Dirichlet 0.5)",
                   "model": "mlp 64-[64]-10 (demo)", "epochs": 2, "batch_size": 16,
                   "lr": 0.05},
    }
