"""Bytes per update for every codec fedbus has, against a float32 ``torch.save`` of the same
delta, each with its final accuracy against uncompressed (fp32) training.

Codecs are discovered at run time: ``fedbus.update_codec.CODECS`` and, when
``fedbus.codec_spec`` exists, the specs quoted in its docstring, in ``update_codec``'s
docstring and in the codec tests, kept if ``parse_codec`` accepts them (canonical form,
duplicates dropped).

Accuracy: real agents (the demo's digits split over ``DEVICES`` devices, equal speeds) and
the real coordinator, synchronous FedAvg for a fixed number of versions, so every codec
sees the same number of updates, from the same devices, on the same model versions; the
only thing that differs between two runs of one seed is the codec. Bytes per update are the
coordinator's ``bytes_accepted / updates_accepted`` over those runs (real payloads).

Baseline: ``torch.save`` of the float32 delta, one real local training of the demo's model
on device-01's share (torch.save's size does not depend on the values). Beside each codec,
the size of its message for that same delta (``bytes_same_delta``).

Aggregation: the plain sample-weighted ``mean`` for every codec (the accuracy the codec
itself costs), and beside it the coordinator's default, ``quorum``, for every codec but the
fp32 reference, in the same run (points lost against fp32 under the mean). ``quorum`` keeps
an update whose cosine with the step's coordinate-wise median is positive and at least half
the step's median cosine; of ten sparse updates that median is zero almost everywhere, so
before ``coordinator.sparse_agreement`` it threw most of a sparse step away (measured on seed
0 with ``topk:0.01:int8+zstd``: 0.836 held-out accuracy under ``quorum`` against 0.939 under
``mean``; fp32 0.944). A step of sparse updates is now judged on each update's own support.

Both directions, per device and version: up, the update (the coordinator's bytes per accepted
update; in synchronous FedAvg every device sends one per version); down, the whole model
message (the coordinator's published model bytes over the versions it published, the default
model codec ``fp32``: what every device received at every version before revision 2.7) beside
the model delta (revision 2.7: the coordinator's published delta bytes over the versions that
had one, what a device that follows the deltas receives per version instead).
"""

from __future__ import annotations

import io
import re
import time
from typing import Any

from bench.harness import REPO, BenchContext, median, ratio, summarize

__all__ = ["discover_codecs", "run"]

VERSIONS = 30  # FedAvg rounds per accuracy run (each round: one update per device)
SEEDS = (0, 1, 2, 3, 4)
DEVICES = 10
MAX_CODECS = 14
BAR_POINTS = 1.0  # accuracy lost against fp32, in percentage points
AIM_RATIO = 100.0
AGGREGATOR = "mean"  # the codec's own cost
ROBUST = "quorum"  # the default aggregator, side by side (module doc)
DEFAULT_CODEC = "int8"  # the coordinator's default (coordinator.config), shown side by side
_QUOTED = re.compile(r"``([^`\s]+)``")
_STRING = re.compile(r"""["']([A-Za-z0-9:.+\-]+)["']""")


def discover_codecs() -> tuple[list[str], list[str], list[str]]:
    """(specs named by the code: CODECS and the docstrings; specs found only in the tests;
    where they came from), each list in order of discovery, canonical, without duplicates."""
    from fedbus import update_codec

    primary: list[str] = []
    secondary: list[str] = []
    sources = ["fedbus.update_codec.CODECS"]
    for name in getattr(update_codec, "CODECS", ()):
        if str(name) not in primary:
            primary.append(str(name))
    try:
        from fedbus import codec_spec
    except ImportError:
        return primary, secondary, sources
    texts = [("fedbus.codec_spec docstring", codec_spec.__doc__ or ""),
             ("fedbus.update_codec docstring", update_codec.__doc__ or "")]
    for test in sorted((REPO / "tests").glob("test_codec*.py")):
        texts.append((f"tests/{test.name}", test.read_text()))
    for source, text in texts:
        docstring = source.endswith("docstring")
        into = primary if docstring else secondary
        before = len(primary) + len(secondary)
        for candidate in (_QUOTED if docstring else _STRING).findall(text):
            try:
                spec = str(codec_spec.parse_codec(candidate))
            except ValueError:
                continue
            if spec not in primary and spec not in secondary:
                into.append(spec)
        if len(primary) + len(secondary) > before:
            sources.append(source)
    return primary, secondary, sources


def _real_delta() -> tuple[dict[str, Any], dict[str, Any]]:
    """One local training of the demo's model on device-01's share: (state, float32 delta)."""
    import numpy as np
    import torch

    from edge_agent.train import train_local
    from fedbus.datasets import dirichlet_split, load_digits, train_test_split
    from fedbus.messages import TrainSpec
    from fedbus.zoo import build_model, get_state

    x, y = load_digits()
    x_train, y_train, _, _ = train_test_split(x, y, 0.2, 0)
    part = dirichlet_split(y_train, DEVICES, 0.5, 0)[0]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model("mlp", {"in_features": 64, "num_classes": 10})
    base = get_state(model)
    train_local(model, x_train[part], y_train[part], TrainSpec(epochs=2, batch_size=16),
                seed=0)
    new = get_state(model)
    return base, {k: np.asarray(new[k] - base[k], dtype=np.float32) for k in base}


def _torch_save_bytes(delta: dict[str, Any]) -> int:
    import torch

    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in delta.items()}, buf)
    return len(buf.getvalue())


# What the agent puts in an update's metrics (edge_agent.agent, a QAT task); the values are
# placeholders of the same types.
_METRICS = {"loss": 0.5, "acc": 0.9, "sec": 0.05, "acc_int8": 0.9}


def _packed(update: Any) -> bytes:
    """An update's bytes as the agent sends them (``Update.pack`` where it exists)."""
    from fedbus.envelope import pack

    return update.pack() if hasattr(update, "pack") else pack(update.to_wire())


def _update_fields() -> dict[str, Any]:
    from fedbus.messages import new_update_id

    return dict(update_id=new_update_id(), device_id="device-01", task_id="demo-0-1",
                run_id=new_update_id(), base_version=12, num_samples=144,
                metrics=dict(_METRICS), sent_at=time.time())


def _message_bytes(delta: dict[str, Any], spec: str) -> int | None:
    """Size of one whole update message carrying ``delta`` encoded with ``spec``."""
    import numpy as np

    from fedbus import update_codec
    from fedbus.messages import Update

    rng = np.random.default_rng(0)
    fields = _update_fields()
    try:
        if hasattr(update_codec, "encode_update_delta"):
            wire, compression = update_codec.encode_update_delta(delta, spec, rng=rng)
            update = Update(delta=wire, compression=compression, **fields)
        else:
            update = Update(delta=update_codec.encode_delta(delta, spec, rng=rng), **fields)
        return len(_packed(update))
    except Exception:
        return None


def _envelope_bytes() -> tuple[int, dict[str, int]]:
    """Size of an update message with an empty delta, and per field (key + value)."""
    import msgpack

    from fedbus.messages import Update

    update = Update(delta={}, **_update_fields())
    payload = _packed(update)
    wire = update.to_wire()
    fields = {k: len(msgpack.packb(k)) + len(msgpack.packb(v, use_bin_type=True))
              for k, v in wire.items()}
    # Packed one by one, metric values are float64; whatever the real packing saves on top
    # (float32 metrics) belongs to the metrics field. 1 byte: the map header.
    saved = 1 + sum(fields.values()) - len(payload)
    metrics_key = next(k for k, v in wire.items() if isinstance(v, dict) and v == _METRICS)
    fields[metrics_key] -= saved
    return len(payload), fields


def _robust_summary(rs: list[dict], reference: dict[int, float], versions: int,
                    spec: str) -> dict[str, Any]:
    """A codec's accuracy under ``ROBUST`` and the points it loses against fp32 under the
    mean (same seeds)."""
    complete = [r for r in rs if r["versions"] >= versions]
    lost = [None if r["seed"] not in reference or r["final_accuracy"] is None
            else (reference[r["seed"]] - r["final_accuracy"]) * 100 for r in complete]
    lost_med = median(lost)
    return {"accuracy": summarize([r["final_accuracy"] for r in rs], f"{spec}, {ROBUST}"),
            "points_lost_vs_fp32": summarize(lost, "fp32 (mean) - codec, percentage points"),
            "meets_bar": None if lost_med is None else lost_med <= BAR_POINTS,
            "runs": rs}


def run(ctx: BenchContext) -> dict[str, Any]:
    from bench.tta import PROFILES

    primary, secondary, sources = discover_codecs()
    _base, delta = _real_delta()
    torch_bytes = _torch_save_bytes(delta)
    offline = {spec: _message_bytes(delta, spec) for spec in primary + secondary}
    seeds: tuple[int, ...]
    if ctx.codecs:  # --codecs: exactly these (canonical), with the reference and default
        from fedbus.codec_spec import parse_codec

        chosen = [str(parse_codec(s)) for s in ctx.codecs]
        specs = list(dict.fromkeys(["fp32", DEFAULT_CODEC, *chosen]))
        offline.update({s: _message_bytes(delta, s) for s in specs if s not in offline})
        versions, seeds = (3, SEEDS[:1]) if ctx.quick else (
            VERSIONS, SEEDS[: max(1, ctx.runs or len(SEEDS))])
        fleet = ctx.fleet_pool().get("equal", PROFILES["equal"])
    elif ctx.quick:
        specs = [s for s in primary if s in ("fp32", "int8")] or primary[:2]
        versions, seeds = 3, SEEDS[:1]
        fleet = ctx.fleet_pool().get("quick", PROFILES["quick"])
    else:
        # Every codec the code names, then the test-only ones, smallest first, up to a cap.
        by_size = sorted((s for s in secondary if offline[s] is not None),
                         key=lambda s: offline[s] or 0)
        specs = (primary + by_size)[:MAX_CODECS]
        versions, seeds = VERSIONS, SEEDS[: max(1, ctx.runs or len(SEEDS))]
        fleet = ctx.fleet_pool().get("equal", PROFILES["equal"])
    if "fp32" not in specs:
        specs.insert(0, "fp32")
    runs: dict[str, list[dict]] = {s: [] for s in specs}
    robust_runs: dict[str, list[dict]] = {s: [] for s in specs if s != "fp32"}
    errors: dict[str, str] = {}
    for seed in seeds:
        for spec, aggregator in [(s, a) for s in specs for a in (AGGREGATOR, ROBUST)
                                 if a == AGGREGATOR or s in robust_runs]:
            if spec in errors:
                continue
            try:
                r = fleet.run(task_id=f"codec-s{seed}", mode="fedavg", codec=spec, seed=seed,
                              max_versions=versions, duration=600.0, aggregator=aggregator)
            except Exception as exc:
                errors[spec] = f"{aggregator}: {type(exc).__name__}: {exc}"[:500]
                continue
            if aggregator == ROBUST:
                robust_runs[spec].append({"seed": seed, "final_accuracy": r["final_accuracy"],
                                          "updates": r["updates_accepted"],
                                          "versions": r["final_version"]})
                continue
            runs[spec].append({"seed": seed, "final_accuracy": r["final_accuracy"],
                               "bytes_per_update": r["bytes_per_update"],
                               "model_bytes_per_version": (
                                   r["bytes_model_published"] / (r["final_version"] + 1)),
                               # versions 1..final each came with a delta (revision 2.7)
                               "delta_bytes_per_version": (
                                   r["bytes_model_delta_published"]
                                   / max(1, r["final_version"])),
                               "updates": r["updates_accepted"],
                               "rejected": r["updates_rejected"],
                               "versions": r["final_version"],
                               "stop_reason": r["stop_reason"]})
    reference = {r["seed"]: r["final_accuracy"] for r in runs.get("fp32", [])}
    codecs: dict[str, Any] = {}
    for spec in specs:
        rs = runs[spec]
        complete = [r for r in rs if r["versions"] >= versions]
        lost = [None if r["seed"] not in reference or r["final_accuracy"] is None
                else (reference[r["seed"]] - r["final_accuracy"]) * 100 for r in complete]
        bpu = median(r["bytes_per_update"] for r in rs)
        lost_med = median(lost)
        codecs[spec] = {
            "bytes_per_update": summarize([r["bytes_per_update"] for r in rs], spec),
            "model_bytes_per_version": median(r["model_bytes_per_version"] for r in rs),
            "delta_bytes_per_version": median(r["delta_bytes_per_version"] for r in rs),
            "bytes_same_delta": offline.get(spec),
            "accuracy": summarize([r["final_accuracy"] for r in rs], spec),
            "points_lost_vs_fp32": summarize(lost, "fp32 - codec, percentage points"),
            "meets_bar": None if lost_med is None else lost_med <= BAR_POINTS,
            "ratio_vs_torch_save": ratio(torch_bytes, bpu),
            **({ROBUST: _robust_summary(robust_runs[spec], reference, versions, spec)}
               if spec in robust_runs else {}),
            "runs": rs,
            **({"error": errors[spec]} if spec in errors else {}),
        }
    envelope = _envelope_bytes()
    meeting = [s for s, c in codecs.items() if c["meets_bar"] and
               c["bytes_per_update"]["median"] is not None]
    best = min(meeting, key=lambda s: codecs[s]["bytes_per_update"]["median"], default=None)
    best_runs = codecs[best]["bytes_per_update"]["runs"] if best else []
    value = ratio(torch_bytes, codecs[best]["bytes_per_update"]["median"]) if best else None
    smallest = min((s for s in codecs if codecs[s]["bytes_per_update"]["median"]),
                   key=lambda s: codecs[s]["bytes_per_update"]["median"], default=None)
    return {
        "unit": "bytes/update",
        "ours": summarize(best_runs, f"best codec within {BAR_POINTS:g} point: {best}",
                          codec=best),
        "baseline": summarize([torch_bytes] * max(1, len(best_runs)),
                              "torch.save of the float32 delta"),
        "ratio": value,
        "ratio_definition": "torch.save bytes / bytes per update of the smallest codec that "
                            f"loses at most {BAR_POINTS:g} accuracy point against fp32",
        "aim": f">= {AIM_RATIO:g}x smaller than float32 torch.save, <= {BAR_POINTS:g} "
               "point lost",
        "aim_met": None if value is None else value >= AIM_RATIO,
        "codecs": codecs,
        "params": {"mode": "fedavg (synchronous)", "aggregator": AGGREGATOR,
                   "robust_aggregator": ROBUST,
                   "default_codec": DEFAULT_CODEC, "versions": versions,
                   "updates_per_run": versions * len(fleet.devices), "seeds": list(seeds),
                   "devices": len(fleet.devices), "speeds": list(fleet.spec.speeds),
                   "model": "mlp 64-[64]-10 (demo)", "dataset": "digits (demo split)",
                   "codec_sources": sources, "bar_points": BAR_POINTS},
        "details": {"torch_save_bytes": torch_bytes,
                    "not_run_bytes_same_delta": {s: b for s, b in offline.items()
                                                 if s not in codecs},
                    "parameters": int(sum(v.size for v in delta.values())),
                    "envelope_bytes_without_delta": envelope[0],
                    "envelope_bytes_by_field": envelope[1],
                    "smallest_codec": smallest},
    }
