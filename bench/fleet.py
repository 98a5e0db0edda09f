"""The fleet benchmark: 100, 1,000 and 5,000 virtual devices (``bench.fleet_sim``) against a
real Mosquitto (``fedbus.broker.LocalBroker``, every device its own account and ACL) and the
real coordinator (``fedbus coordinator``, FedBuff, int8 updates, evaluating every version).

Every device takes the same compute time per update at every size (``PERIOD`` seconds on
average, speeds 1:2:4), as a real device does: its time per training does not depend on how
many others there are. The coordinator runs with ``--fleet-scaling``, which keeps at most
``--concurrency`` (100 by default) devices training at a time by invitation (protocol revision
2.10, ``coordinator.invitations``), so the offered load is the same at every size: about 100
devices training, ``100 / PERIOD`` × 1.36 updates per second (the fast devices send more often).
What changes with the size is the number of connections, sessions and idle devices the broker
and the coordinator carry, and the cost per update shows what the fleet itself costs.

(Before revision 2.10 the bench gave each device a compute time of N/15 seconds, to offer the
same load without a concurrency limit: then every device of a fleet of 5,000 started on
version 0 at once and trained once in the run, so what an applied update was worth fell with
the fleet. With the limit, a device's compute time can stay what it is on a device.)

Measured at each size: updates judged per second, publish-to-aggregated latency (the update's
publish by the simulator to the coordinator's record of the version that folded it in: wall
clocks of one machine), coordinator and broker CPU per update and peak RSS (``/proc``, sampled
every second), held-out accuracy over applied updates (the coordinator's own evaluations),
models delivered per update, and the simulator's own lateness (how late its publishes went out
against their schedule).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import BenchContext, percentile, ratio, summarize
from bench.proc_stat import cpu_seconds, rss_mib

log = logging.getLogger("bench.fleet")

PERIOD = 100 / 15.0  # mean compute seconds per update of every device, at every size
CONCURRENCY = 100  # the coordinator's default under fleet scaling (coordinator.invitations)
UPDATES = 1200  # applied updates per run, the same at every size
SPEEDS = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class FleetSettings:
    devices: int
    period: float  # mean compute seconds per device and update
    buffer_size: int  # K, as the coordinator's fleet scaling sets it for the whole fleet
    max_staleness: int
    max_versions: int


def fleet_settings(devices: int, period: float = PERIOD, updates: int = UPDATES,
                   concurrency: int = CONCURRENCY) -> FleetSettings:
    """The run for ``devices``: each device takes ``period`` compute seconds per update on
    average; K and the staleness limit are what the coordinator's fleet scaling (the
    default floors) sets once the whole fleet is online, at most ``concurrency`` of it
    training; enough versions to apply ``updates`` at that K."""
    from coordinator.fleet_scale import fleet_scale

    if devices < 1 or period <= 0 or updates < 1 or concurrency < 1:
        raise ValueError("need devices >= 1, period > 0, updates >= 1, concurrency >= 1")
    scale = fleet_scale(min(devices, concurrency), 4, 50, bounded=True)
    k = scale.buffer_size
    return FleetSettings(devices, period, k, scale.max_staleness, math.ceil(updates / k))


# -- /proc sampling ---------------------------------------------------------------------------


class Sampler:
    """CPU seconds and RSS of some processes, every ``interval`` seconds, on a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        row: dict[str, Any] = {"t": time.time()}
        for name, pid in self.pids.items():
            row[f"{name}_cpu"] = cpu_seconds(pid)
            row[f"{name}_rss"] = rss_mib(pid)
        self.samples.append(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def cpu_between(self, name: str, t0: float, t1: float) -> float | None:
        """CPU seconds of ``name`` between wall times ``t0`` and ``t1`` (interpolated). A
        process that exited less than two intervals after ``t1`` (the coordinator ends
        right after its last version) counts up to its last sample, missing at most that
        much of its CPU."""
        points = [(s["t"], s[f"{name}_cpu"]) for s in self.samples
                  if s[f"{name}_cpu"] is not None]
        if points and points[-1][0] < t1 <= points[-1][0] + 2 * self.interval:
            t1 = points[-1][0]
        a, b = interpolate(points, t0), interpolate(points, t1)
        return None if a is None or b is None else b - a

    def peak_rss(self, name: str) -> float | None:
        values = [s[f"{name}_rss"] for s in self.samples if s[f"{name}_rss"] is not None]
        return max(values) if values else None


def interpolate(points: list[tuple[float, float]], t: float) -> float | None:
    """The value at ``t`` on the polyline through ``points`` (sorted by time); None outside."""
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return None


# -- what a run measured ------------------------------------------------------------------------


def folded_latencies(updates: dict[str, dict[str, Any]],
                     verdicts: dict[str, tuple[bool, str | None, int | None]],
                     made_at: dict[int, float], t0: float, t1: float) -> list[float]:
    """Seconds from the publish of each update sent between ``t0`` and ``t1`` to the making
    of the version the coordinator folded it into (its verdict's ``applied_version``; wall
    clocks of one machine). Updates never folded in are left out."""
    out = []
    for update_id, u in updates.items():
        verdict = verdicts.get(update_id)
        if verdict is None or not t0 <= u["published_at"] <= t1:
            continue
        made = made_at.get(verdict[2]) if verdict[2] is not None else None
        if made is not None:
            out.append(made - u["published_at"])
    return out


def accuracy_after(history: Sequence[tuple[int, float, int, float | None]],
                   applied: int) -> tuple[int, float | None]:
    """``(applied so far, accuracy)`` of the first version whose cumulative applied updates
    reach ``applied`` (or the last version); ``history``: (version, made_at, accepted,
    accuracy) in version order."""
    total = 0
    last: tuple[int, float | None] = (0, None)
    for _v, _t, accepted, acc in history:
        total += accepted
        last = (total, acc)
        if total >= applied:
            break
    return last


def mean_accuracy_to(history: Sequence[tuple[int, float, int, float | None]], applied: int,
                     versions: int = 10) -> float | None:
    """The mean held-out accuracy of the ``versions`` evaluated versions up to the first
    whose cumulative applied updates reach ``applied`` (or the last): the accuracy after
    ``applied`` updates with the swing of single versions averaged out."""
    total = 0
    seen: list[float] = []
    for _v, _t, accepted, acc in history:
        total += accepted
        if acc is not None:
            seen.append(acc)
        if total >= applied:
            break
    tail = seen[-versions:]
    return sum(tail) / len(tail) if tail else None


def _read_history(state_db: Path) -> list[tuple[int, float, int, float | None]]:
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT h.version, h.made_at, h.updates, e.accuracy FROM history h "
            "LEFT JOIN evaluations e USING (version) ORDER BY h.version").fetchall()
    finally:
        db.close()
    return [(int(v), float(t), int(n), None if a is None else float(a)) for v, t, n, a in rows]


def _read_verdicts(state_db: Path) -> dict[str, tuple[bool, str | None, int | None]]:
    """update id -> (accepted, reason, the version it was folded into)."""
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT update_id, accepted, reason, applied_version FROM verdicts").fetchall()
    finally:
        db.close()
    return {u: (bool(a), r, None if v is None else int(v)) for u, a, r, v in rows}


def _write_data(root: Path) -> tuple[Path, Path]:
    from fedbus.datasets import load_digits, train_test_split, write_npz

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, 0)
    root.mkdir(parents=True, exist_ok=True)
    pool, held_out = root / "pool.npz", root / "eval.npz"
    write_npz(pool, x_train, y_train)
    write_npz(held_out, x_test, y_test)
    return pool, held_out


def _budget(s: FleetSettings, updates: int, concurrency: int) -> float:
    """Seconds the simulator may take: connects, half a period to start, the updates at the
    offered rate (``concurrency`` devices training at a time), the longest compute time to
    finish, and as much again for a loaded box."""
    rate = min(s.devices, concurrency) / s.period
    return 2 * (30 + s.devices / 500 + 2.5 * s.period + updates / rate)


def _wait_ready(coordinator: Any, log_path: Path, timeout: float = 120.0) -> None:
    """Until the coordinator has connected and published its task and model (its log says
    so), so that its start-up CPU is not counted."""
    deadline = time.monotonic() + timeout
    while "connected to" not in log_path.read_text(errors="replace"):
        if not coordinator.alive or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not start: {coordinator.log_tail()}")
        time.sleep(0.2)
    time.sleep(1.0)


def run_size(ctx: BenchContext, devices: int, *, mode: str, period: float, updates: int,
             tag: str = "") -> dict[str, Any]:
    """One run of ``devices`` virtual devices; the measured numbers."""
    from fedbus.broker import LocalBroker, default_device_ids
    from fedbus.processes import ChildError, ChildGroup

    s = fleet_settings(devices, period, updates)
    root = ctx.workdir / f"fleet-{devices}{tag}"
    pool, held_out = _write_data(root / "data")
    group = ChildGroup()
    t_setup = time.monotonic()
    broker = LocalBroker(root / "broker", device_ids=default_device_ids(devices))
    broker.start()
    ctx.broker_configs["fleet"] = broker.config_file.read_text()
    setup_seconds = time.monotonic() - t_setup
    try:
        coordinator = ctx.start(
            [sys.executable, *(["-m", "cProfile", "-o", str(root / "coordinator.prof")]
                               if os.environ.get("FLEET_PROFILE") else []),
             "-m", "fedbus", "coordinator",
             "--credentials", str(broker.credentials_file), "--state-dir", str(root / "run"),
             "--eval-data", str(held_out), "--task-id", "fleet", "--seed", "0",
             "--fleet-scaling", "--max-versions", str(s.max_versions), "--codec", "int8"],
            log_path=root / "coordinator.log", name="coordinator", group=group)
        _wait_ready(coordinator, root / "coordinator.log")
        out = root / "sim.json"
        with Sampler({"coordinator": coordinator.pid, "broker": broker.pid or 0},
                     interval=0.25) as sampler:
            sim = ctx.start(
                [sys.executable, "-m", "bench.fleet_sim",  # as nice as the coordinator
                 "--credentials", str(broker.credentials_file), "--devices", str(devices),
                 "--data", str(pool), "--period", repr(s.period),
                 "--speeds", *map(str, SPEEDS), "--model-subscription", mode,
                 "--connect-seconds", str(max(2.0, devices / 500)),
                 "--duration", str(_budget(s, updates, CONCURRENCY)),
                 "--out", str(out)],
                log_path=root / "sim.log", name="fleet_sim", group=group)
            coordinator.wait(_budget(s, updates, CONCURRENCY), "the coordinator to end its run")
            try:  # the simulator stops once its devices are told the run ended
                sim.wait(20, "the fleet simulator")
            except ChildError:  # a device never told: SIGTERM, and it writes what it has
                log.warning("the simulator did not see the run end; stopping it")
                sim.terminate(60)
        if sim.returncode not in (0, -15):
            raise RuntimeError(f"fleet_sim exited with {sim.returncode}: {sim.log_tail()}")
        result = json.loads(out.read_text())
    finally:
        group.stop_all(10.0)
        broker.stop()
    (root / "samples.json").write_text(json.dumps(sampler.samples))
    history = _read_history(root / "run" / "state.db")
    verdicts = _read_verdicts(root / "run" / "state.db")
    return summarize_run(s, mode, result, history, verdicts, sampler, setup_seconds, updates)


def summarize_run(s: FleetSettings, mode: str, sim: dict[str, Any],
                  history: list[tuple[int, float, int, float | None]],
                  verdicts: dict[str, tuple[bool, str | None, int | None]],
                  samples: Sampler, setup_seconds: float,
                  updates_wanted: int) -> dict[str, Any]:
    """What one run measured. The coordinator's own records (its verdicts and version
    history in state.db) say what was judged and when it was folded in, so nothing depends on
    receipts reaching the simulator. The steady window runs from version 1 to the last
    version: the start-up burst (every device's ``online`` and ``training`` status at once)
    stays out of ingest, CPU per update and latency."""
    updates = sim["updates"]
    if len(history) < 3:
        raise RuntimeError(f"only {len(history) - 1} versions were made")
    made_at = {v: t for v, t, _n, _a in history}
    t_first = min(u["published_at"] for u in updates.values())
    t0, t1 = made_at[1], history[-1][1]
    steady = [u for u in updates.values() if t0 <= u["published_at"] <= t1]
    judged = [verdicts[k] for k, u in updates.items()
              if k in verdicts and t0 <= u["published_at"] <= t1]
    applied_in_window = sum(n for v, _t, n, _a in history if v >= 2)
    lat = folded_latencies(updates, verdicts, made_at, t0, t1)
    with_receipt = [u for u in steady if u["receipt_at"] is not None]
    receipt_lat = [u["receipt_at"] - u["published_at"] for u in with_receipt]
    reasons: dict[str, int] = {}
    for accepted, reason, _applied in verdicts.values():
        if not accepted:
            reasons[reason or "?"] = reasons.get(reason or "?", 0) + 1
    coord_cpu = samples.cpu_between("coordinator", t0, t1)
    broker_cpu = samples.cpu_between("broker", t0, t1)
    per_update = max(1, applied_in_window)
    curve = []
    total = 0
    for _v, t, n, acc in history:
        total += n
        if acc is not None:
            curve.append((round(t - t_first, 1), total, round(acc, 4)))
    step = max(1, len(curve) // 12)
    c = sim["counters"]
    late = sim["lateness"]
    return {
        "devices": s.devices, "mode": mode, "buffer_size": s.buffer_size,
        "max_staleness": s.max_staleness, "mean_compute_seconds": round(s.period, 2),
        "broker_setup_seconds": round(setup_seconds, 1),
        "published": c["updates_published"], "judged": len(verdicts),
        "accepted": sum(1 for a, _r, _v in verdicts.values() if a),
        "rejected": reasons, "applied": sum(n for _v, _t, n, _a in history),
        "versions": len(history) - 1,
        "first_version_after_s": round(t0 - t_first, 1),
        "window_seconds": round(t1 - t0, 1),
        "ingest_per_s": round(applied_in_window / (t1 - t0), 1),
        "judged_in_window": len(judged),
        "aggregated_p50_s": percentile(lat, 50), "aggregated_p99_s": percentile(lat, 99),
        "receipts_in_window": f"{len(with_receipt)} of {len(steady)}",
        "receipt_p50_s": percentile(receipt_lat, 50),
        "receipt_p99_s": percentile(receipt_lat, 99),
        "coordinator_cpu_ms_per_update": None if coord_cpu is None
        else round(1000 * coord_cpu / per_update, 3),
        "broker_cpu_ms_per_update": None if broker_cpu is None
        else round(1000 * broker_cpu / per_update, 3),
        "coordinator_rss_mib": samples.peak_rss("coordinator"),
        "broker_rss_mib": samples.peak_rss("broker"),
        "models_per_update": round(c["models_received"] / max(1, c["updates_published"]), 2),
        "trainings": c["trainings"],
        "models_per_training": round(c["models_received"] / max(1, c["trainings"]), 2),
        "models_while_training": c.get("models_while_training"),
        "invitations": c.get("invitations"),
        "run_end_seen": sim["ended_at"] is not None,
        "accuracy_after": accuracy_after(history, updates_wanted),
        "accuracy_mean10": mean_accuracy_to(history, updates_wanted),
        "accuracy_curve": curve[::step] + ([curve[-1]] if curve and len(curve) % step else []),
        "sim_late_p50_s": percentile(late, 50), "sim_late_p99_s": percentile(late, 99),
        "sim_late_max_s": max(late) if late else None,
        "sim_loop_stalls": len(sim["loop_stalls"]),
        "sim_cpu_s": round(sim["cpu_seconds"], 1),
        "sim_train_cpu_ms_per_update": round(
            1000 * c["train_cpu_seconds"] / max(1, c["trainings"]), 2),
        "sim_rss_mib": round(sim["max_rss_kib"] / 1024, 1),
        "disconnects": c["disconnects"], "connect_failures": c["connect_failures"],
        "receipts_rate_limited": c["receipts_rate_limited"],
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    from fedbus.processes import ChildError

    sizes = (20, 60) if ctx.quick else (100, 1000, 5000)
    updates = 120 if ctx.quick else UPDATES
    period = 1.0 if ctx.quick else PERIOD
    runs: dict[str, Any] = {}
    for mode in ("on-demand", "always"):
        for n in sizes:
            if mode == "always" and n == sizes[-1]:
                continue  # the baseline of model traffic: the two smaller fleets
            log.info("fleet: %d devices, model subscription %s", n, mode)
            try:
                runs[f"{mode}-{n}"] = run_size(ctx, n, mode=mode, period=period,
                                               updates=updates, tag=f"-{mode}")
            except (RuntimeError, OSError, ValueError, ChildError) as exc:
                log.error("fleet of %d (%s) failed: %s", n, mode, exc)
                runs[f"{mode}-{n}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    small, large = runs[f"on-demand-{sizes[0]}"], runs[f"on-demand-{sizes[-1]}"]
    ours = large.get("coordinator_cpu_ms_per_update")
    base = small.get("coordinator_cpu_ms_per_update")
    r = ratio(ours, base)
    return {
        "unit": "ms CPU/update",
        "ours": summarize([ours], f"coordinator CPU per update, {sizes[-1]:,} devices"),
        "baseline": summarize([base], f"coordinator CPU per update, {sizes[0]:,} devices"),
        "ratio": r,
        "aim": "≤ 1.25× (flat)",
        "aim_met": None if r is None else r <= 1.25,
        "period": round(period, 2), "concurrency": CONCURRENCY, "updates": updates,
        "speeds": list(SPEEDS),
        "runs": runs,
    }
