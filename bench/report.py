"""results.json -> the generated tables of BENCHMARKS.md.

Each table sits between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``; the
harness rewrites only what is between the markers, so the prose around them stays. A
section whose markers are missing is appended at the end of the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import ratio

__all__ = ["render_sections", "update_markdown"]


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}g}"
    return str(value)


def _ratio(value: Any) -> str:
    return "–" if value is None else f"{_num(value)}×"


def _met(value: Any) -> str:
    return {True: "**yes**", False: "**no**"}.get(value, "–")


def _runs(values: list[Any]) -> str:
    return ", ".join(_num(v) for v in values)


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _stamp(b: dict[str, Any]) -> str:
    quick = " (quick smoke run: not a measurement)" if b.get("quick") else ""
    return f"_Measured {b.get('measured_at', '?')}, {b.get('seconds', '?')} s{quick}._"


def _error(b: dict[str, Any]) -> str | None:
    if "error" in b:
        return f"{_stamp(b)}\n\n**Failed:** `{b['error']}`"
    return None


def _environment(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    rows = [[k.replace("_", " "), f"`{env[k]}`" if k != "cpu_count" else str(env[k])]
            for k in ("cpu_model", "cpu_count", "memory_mib", "platform", "python", "torch",
                      "torch_threads", "paho_mqtt", "numpy", "msgpack", "mosquitto",
                      "git_commit", "git_dirty") if k in env]
    text = [f"_Generated {results.get('generated_at')} by `{results.get('command')}` "
            f"in {results.get('total_seconds')} s._", "", _table(["", "value"], rows)]
    if env.get("broker_config"):
        text += ["", "<details><summary>Broker configuration used (mosquitto.conf as "
                 "LocalBroker wrote it)</summary>", "", "```", env["broker_config"], "```",
                 "", "</details>"]
    return "\n".join(text)


def _head(b: dict[str, Any], metric: str, fmt: Callable[[Any], str] = _num) -> list[str]:
    return [metric, fmt(b["ours"]["median"]), fmt(b["baseline"]["median"]), _ratio(b["ratio"]),
            b.get("aim", "–"), _met(b.get("aim_met"))]


HEAD = ["metric", "ours", "baseline", "ratio", "aim", "met?"]


def _ingest(b: dict[str, Any]) -> str:
    p = b["params"]
    text = [_stamp(b), "", _table(HEAD, [_head(b, "updates/s (median)")]), "",
            f"Ours: {b['ours']['label']}; baseline: {b['baseline']['label']}. "
            f"{p['parameters']:,} parameters, int8 payload {p['payload_bytes']:,} bytes, "
            f"{p['updates_per_run']} updates per run, FedBuff K={p['buffer_size_K']}, "
            f"{p['pairs']} alternating pairs.", "",
            f"- runs, ours: {_runs(b['ours']['runs'])} updates/s",
            f"- runs, baseline: {_runs(b['baseline']['runs'])} updates/s",
            f"- CPU per update: ours {_num(b['ours'].get('cpu_ms_per_update'))} ms, "
            f"baseline {_num(b['baseline'].get('cpu_ms_per_update'))} ms",
            f"- publisher: {_num(b['details'].get('publisher_rate_median'))} updates/s "
            "(median over all runs)"]
    lost = [r.get("lost", 0) for r in b["details"]["ours_runs"]]
    if any(lost):
        text.append(f"- updates that never reached the coordinator's core, per run: "
                    f"{_runs(lost)} (bare subscriber: "
                    f"{_runs([r.get('lost', 0) for r in b['details']['baseline_runs']])})")
    text += _failed_runs(b)
    text += _workers_curve(b)
    stages = b["details"].get("stage_costs_us") or {}
    if stages:
        text += ["", "Where one update's time goes (µs, each step timed alone in the harness "
                 "process):", "", _table(["step", "µs"],
                                         [[k, _num(v)] for k, v in stages.items()])]
    return "\n".join(text)


def _workers_curve(b: dict[str, Any]) -> list[str]:
    """Throughput against ``--ingest-workers``, each against the baseline of the same pairs."""
    curve = b["details"].get("curve") or []
    if not curve:
        return []
    cores = b["params"].get("cpu_count")
    rows = [[str(c["workers"]), _num(c["median"]), _ratio(c["ratio"]),
             _num(c.get("cpu_ms_per_update")), _runs(c["runs"]),
             str(c.get("failed_runs", 0))] for c in curve]
    return ["", f"Throughput against ingest workers (`--ingest-workers`; 0: all in the "
            f"coordinator's process), each against the bare subscriber's median of the same "
            f"alternating pairs ({_num(b['baseline']['median'])} updates/s), on "
            f"{cores if cores else '?'} cores shared with the broker and the publisher. CPU "
            f"per update is the coordinator's process and its workers together:", "",
            _table(["workers", "updates/s (median)", "of the ceiling", "CPU ms/update",
                    "runs", "failed runs"], rows)]


def _failed_runs(b: dict[str, Any]) -> list[str]:
    d = b.get("details", {})
    failed = [r for r in d.get("ours_runs", []) + d.get("baseline_runs", []) if r.get("error")]
    if not failed:
        return []
    return [f"- runs that failed and count as missing: {len(failed)} "
            f"(first: `{failed[0]['error'][:160]}`)"]


def _latency(b: dict[str, Any]) -> str:
    p99 = b["p99"]
    rows = [_head(b, "p50 (ms)"),
            ["p99 (ms)", _num(p99["ours"]["median"]), _num(p99["baseline"]["median"]),
             _ratio(p99["ratio"]), b.get("aim", "–"), "–"]]
    p = b["params"]
    return "\n".join([
        _stamp(b), "", _table(HEAD, rows), "",
        f"{p['rate_per_s']:g} updates/s for {p['seconds']:g} s per run, {p['mode']}, "
        f"{p['parameters']:,} parameters (int8 payload {p['payload_bytes']:,} bytes), "
        f"{p['pairs']} alternating pairs, first {p['warmup_skipped']} updates of a run skipped.",
        "",
        f"- p50 per run, ours: {_runs(b['ours']['runs'])}; baseline: "
        f"{_runs(b['baseline']['runs'])}",
        f"- p99 per run, ours: {_runs(p99['ours']['runs'])}; baseline: "
        f"{_runs(p99['baseline']['runs'])}",
        *_failed_runs(b),
    ])


def _bytes(b: dict[str, Any]) -> str:
    d = b["details"]
    rows = [_head(b, "bytes per update")]
    codec_rows = []
    p = b["params"]
    robust = p.get("robust_aggregator")
    for spec, c in b["codecs"].items():
        side = c.get(robust) if robust else None
        codec_rows.append([
            f"`{spec}`", _num(c["bytes_per_update"]["median"]), _num(c.get("bytes_same_delta")),
            _ratio(c.get("ratio_vs_torch_save")), _num(c["accuracy"]["median"]),
            _runs(c["accuracy"]["runs"]), _num(c["points_lost_vs_fp32"]["median"]),
            _met(c.get("meets_bar")) if "error" not in c else f"error: {c['error'][:80]}",
            *([] if not robust else ["" if side is None else _runs(side["accuracy"]["runs"]),
                                     "" if side is None
                                     else _num(side["points_lost_vs_fp32"]["median"]),
                                     "" if side is None else _met(side.get("meets_bar"))]),
        ])
    return "\n".join([
        _stamp(b), "", _table(HEAD, rows), "",
        f"Baseline: `torch.save` of the float32 delta, {d['torch_save_bytes']:,} bytes "
        f"({d['parameters']:,} parameters). Accuracy: {p['mode']}, {p['versions']} versions "
        f"({p['updates_per_run']} updates) per run, {p['devices']} devices, seeds "
        f"{p['seeds']}. An update message without its delta takes "
        f"{d['envelope_bytes_without_delta']} bytes ("
        + ", ".join(f"{k} {v}" for k, v in (d.get("envelope_bytes_by_field") or {}).items())
        + "). Codecs from: "
        f"{', '.join(p['codec_sources'])}."
        + ("" if not robust else
           f" Accuracy under `{p['aggregator']}` (the codec's own cost), and under "
           f"`{robust}` (the default aggregator) in the same run, its points lost against "
           f"fp32 under `{p['aggregator']}`."), "",
        _table(["codec", "bytes/update (runs)", "bytes, same delta", "vs torch.save",
                f"accuracy ({p['aggregator']})", "accuracy per seed", "points lost vs fp32",
                "within bar?",
                *([] if not robust else [f"{robust}: accuracy per seed",
                                         f"{robust}: points lost", f"{robust}: within bar?"])],
               codec_rows),
        *_both_directions(b),
    ])


def _both_directions(b: dict[str, Any]) -> list[str]:
    """Bytes per device per version, up and down, for the runs that measured the model
    delta (revision 2.7)."""
    rows = []
    for spec, c in b["codecs"].items():
        whole, delta = c.get("model_bytes_per_version"), c.get("delta_bytes_per_version")
        if whole is None or delta is None:
            continue
        up = c["bytes_per_update"]["median"]
        default = spec == b["params"].get("default_codec")
        rows.append([f"`{spec}`" + (" (default)" if default else ""), _num(up), _num(whole),
                     _num(delta), _num(None if up is None else up + whole),
                     _num(None if up is None else up + delta)])
    if not rows:
        return []
    return ["", "Bytes per device per version, both directions (median over the runs; in "
            "synchronous FedAvg every device sends one update and receives one model per "
            "version). Down: the whole model as every device received it before revision 2.7 "
            "(default `--model-codec fp32`), and the model delta a device that follows the "
            "deltas receives instead (revision 2.7; it receives one whole model when it joins).",
            "", _table(["codec", "up: update", "down: whole model", "down: model delta",
                        "total, whole model", "total, model delta"], rows)]


def _overrun_text(p: dict[str, Any]) -> str:
    """How many updates took longer to train than their device's simulated period."""
    o = p.get("overruns")
    if not o:  # results of an earlier version of the benchmark
        return (f"agents whose training overran the simulated period: "
                f"{p.get('agents_overrunning_period')}")
    return ("updates whose training overran the simulated period: "
            + ", ".join(f"{side} {v['overrun']} of {v['updates']}"
                        for side, v in (("async", o["fedbuff"]), ("sync", o["fedavg"]))))


def _tta(b: dict[str, Any]) -> str:
    par = b["params"]
    target = par["target_accuracy"]
    rows = [_head(b, f"seconds to a stable {target:g}, 1:2:4 (median)")]
    prow, late_rows, share_rows = [], [], []
    for name, p in b["profiles"].items():
        m = p["measured_updates_per_s"]
        fh = p["first_hit"]
        n_asy, n_syn = len(p["ours"]["runs"]), len(p["baseline"]["runs"])
        prow.append([
            name, f"{_num(p['ours']['median'])} ({p['ours']['reached']}/{n_asy})",
            f"{_num(p['baseline']['median'])} ({p['baseline']['reached']}/{n_syn})",
            _ratio(p["ratio"]),
            f"{_num(fh['async_median'])} / {_num(fh['sync_median'])}", _ratio(fh["ratio"]),
            _ratio(p["ideal"]), _ratio(p.get("effective_ideal")), _ratio(m.get("ratio")),
            f"{_num(m.get('async'))} / {_num(m.get('sync'))}",
        ])
        lt, st = p["late_target"], p["late_stable_target"]
        vt = p.get("versions_to_target") or {}
        late_rows.append([
            name, f"{_num(lt['async_median'])} / {_num(lt['sync_median'])}",
            f"{_num(st['async_median'])} ({st['async_held']}/{n_asy})",
            f"{_num(st['sync_median'])} ({st['sync_held']}/{n_syn})", _ratio(st.get("ratio")),
            f"{_num(vt.get('async'))} / {_num(vt.get('sync'))}"])
        shares = p.get("device_shares") or {}
        share_rows.append([
            name, _runs(p.get("async_rejected_stale", [])),
            " · ".join(f"{100 * (v['update_share'] or 0):.0f}/{100 * v['data_share']:.0f}"
                       for v in shares.values())])
    lines = [_stamp(b), "", _table(HEAD, rows), "",
             f"Headline: seconds to a stable {target:g} held-out accuracy, i.e. to the first "
             f"version from which {target:g} held (at least {100 * par['hold_fraction']:g}% of "
             f"the versions evaluated in the following {par['hold_seconds']:g} s reached it "
             f"too, the rule of `fedbus coordinator --target-hold`); the first hit beside it. "
             f"{par['async']} against {par['sync']}; seeds {par['seeds']} "
             f"({len(par['seeds'])} per side and profile); (held/runs) beside each median; a "
             f"run whose target was not reached, or did not hold, within "
             f"{par['cap_seconds']:g} s counts as {par['cap_seconds']:g} s. "
             + (f"Each update of a device takes its slowdown × {par['compute_seconds']:g} s "
                "(`--compute-seconds`), whatever its data size."
                if par.get("compute_seconds") else
                "The slowdown stretches each agent's own training time."), "",
             _table(["profile", "stable async s", "stable sync s", "sync/async (stable)",
                     "first hit async / sync s", "sync/async (first hit)", "ideal",
                     "effective ideal", "measured updates/s ratio",
                     "updates/s async / sync"], prow), "",
             f"The same runs, on to {par['late_target_accuracy']:g} (each run went on until "
             f"{par['late_target_accuracy']:g} held, or to the cap), and the versions each "
             f"mode needed to first reach {target:g}:", "",
             _table(["profile", "first hit async / sync s", "stable async s",
                     "stable sync s", "sync/async (stable)",
                     f"versions to {target:g}, async / sync"], late_rows), "",
             "No device shut out: each device's share of the updates the asynchronous runs "
             "accepted (and so applied, with its staleness weight; median over the seeds) "
             "against its share of the training data, in percent, device-01 first, and the "
             "updates rejected as stale in each async run:", "",
             _table(["profile", "stale rejects per run", "update % / data % per device"],
                    share_rows), ""]
    for name, p in b["profiles"].items():
        lines.append(f"- {name}: stable async runs {_runs(p['ours']['runs'])} s; stable sync "
                     f"runs {_runs(p['baseline']['runs'])} s; speeds {p['speeds']}; samples "
                     f"per device {list(p['samples_per_device'].values())}; measured relative "
                     f"slowness per device (async) "
                     f"{list(p['effective_relative_speed'].values())}; {_overrun_text(p)}")
    return "\n".join(lines)


def _footprint(b: dict[str, Any]) -> str:
    rows = [_head(b, "peak RSS while training (MiB)"),
            ["RSS idle after training (MiB)", _num(b["idle"]["ours"]["median"]),
             _num(b["baseline"]["median"]), _ratio(b["idle"].get("ratio")), "–", "–"]]
    stages = b["details"].get("stages") or []
    manual = b["details"].get("stages_without_torch_optim") or []
    extra = []
    if manual:
        extra = ["", "The same steps with a hand-written SGD-with-momentum step instead of "
                 "`torch.optim.SGD` (a probe of what the agent would need without torch.optim):",
                 "", _table(["step", "VmRSS MiB", "VmHWM MiB"],
                            [[s["stage"], _num(s["rss_mib"]), _num(s["hwm_mib"])]
                             for s in manual])]
    return "\n".join([
        _stamp(b), "", _table(HEAD, rows), "",
        f"- runs, agent peak: {_runs(b['ours']['runs'])} MiB; idle: "
        f"{_runs(b['idle']['ours']['runs'])} MiB; bare peak: {_runs(b['baseline']['runs'])} MiB",
        "", "Resident memory after each step an agent takes (one process):", "",
        _table(["step", "VmRSS MiB", "VmHWM MiB"],
               [[s["stage"], _num(s["rss_mib"]), _num(s["hwm_mib"])] for s in stages]),
        *extra,
    ])


def _decode_worst(b: dict[str, Any]) -> str:
    mib = 1 << 20
    rows = [[f"`{r['shape']}`", f"{r['payload_bytes']:,}", r["reason"],
             _num(r["tracemalloc_peak_bytes"] / mib), _num(r["peak_over_payload"]),
             _num(r["unpackb_peak_bytes"] / mib), _num(r["seconds"] * 1000)]
            for r in b["details"]["shapes"]]
    return "\n".join([
        _stamp(b), "", _table(HEAD, [_head(b, "peak / payload (median over shapes)")]), "",
        _table(["payload (bench/hostile.py)", "bytes", "verdict", "peak MiB", "peak / payload",
                "msgpack.unpackb peak MiB", "ms (best of 3)"], rows),
    ])


def _poisoning(b: dict[str, Any]) -> str:
    d = b["details"]
    names = {"none": "clean", "signflip": "sign flip x10", "random": "random at the bound",
             "inflate": "n = 2^40, flipped", "labelflip": "label flip"}
    attacks = d["attacks"]
    out = [_stamp(b), "", _table(HEAD, [_head(b, "worst points lost under attack")]), "",
           f"In-process simulation (bench/poisoning.py): the real coordinator core, real local "
           f"training and the {d.get('codec', 'int8')} codec"
           + (" (honest devices with error feedback)" if d.get("codec", "int8") != "int8"
              else "") + ", no broker."
           f" {d['devices']} devices, {d['hostile']} "
           f"hostile, FedBuff K={d['buffer_size']}; accuracy after a fixed number of versions "
           f"({', '.join(f'{k}: {v}' for k, v in d['versions'].items())}), mean over seeds "
           f"{d['seeds']}. Points lost are against the clean run of the plain mean."]
    for dataset, configs in d["accuracy"].items():
        reference = configs["mean"]["none"]
        rows = []
        for label, cells in configs.items():
            rows.append([f"{label} (`{d['configs'][label]}`)"] + [
                f"{_num(cells[a], 4)} ({100 * (cells[a] - reference):+.1f})" for a in attacks
            ])
        out += ["", f"{dataset}: held-out accuracy (points against the clean mean)", "",
                _table(["configuration", *(names.get(a, a) for a in attacks)], rows)]
    worst = d["worst_points_lost"]
    out += ["", "Worst points lost over the data sets:", "",
            _table(["configuration", "clean", "under attack (worst)"],
                   [[label, _num(w["clean"], 2), _num(w["attack"], 2)]
                    for label, w in worst.items()])]
    return "\n".join(out)
def _privacy(b: dict[str, Any]) -> str:
    p = b["params"]
    clean = b["rows"]["no DP"]["accuracy"]["median"]
    rows = []
    for label, r in b["rows"].items():
        acc = r["accuracy"]["median"]
        lost = None if acc is None or clean is None else round(100 * (clean - acc), 1)
        sigma = r["noise_multiplier"]
        rows.append([label, "–" if sigma is None else f"{sigma:g}", _num(r["clip"]),
                     _num(r["noise_std"]), _num(r["epsilon"]), _num(acc),
                     _runs(r["accuracy"]["runs"]), _num(lost),
                     ", ".join(str(c) for c in r["updates_clipped"])])
    norms = b["rows"]["no DP"].get("update_norm_quartiles") or []
    return "\n".join([
        _stamp(b), "", _table(HEAD, [_head(b, "held-out accuracy")]), "",
        f"{p['dataset']}, {p['devices']} simulated devices with equal random shares, FedBuff "
        f"K={p['buffer_size_K']} (each step draws {p['buffer_size_K']} distinct devices, every "
        f"update fresh), {p['steps']} applied steps ({p['updates_per_run']} updates) per run, "
        f"{p['local_epochs']} local epochs, one torch thread, codec {p['codec']}, seeds "
        f"{p['seeds']}; ε from the "
        f"RDP accountant at δ = {p['delta']:g}, no sampling amplification. {p['simulation']}."
        + (f" Update norms without DP (quartiles): {_runs(norms)}." if norms else ""), "",
        _table(["run", "σ", "clip C", "noise std per coordinate", "ε", "accuracy (median)",
                "accuracy per seed", "points lost vs no DP", "updates clipped per seed"],
               rows),
    ])


def _flood(b: dict[str, Any]) -> str:
    p = b["params"]
    sides = b["sides"]
    limits = {name: side.get("max_update_bytes") for name, side in p["sides"].items()}
    compare = [[name, _num(limits.get(name)), _num(sd["p50_calm"]), _num(sd["p99_calm"]),
                _num(sd["p50_flood"]), _num(sd["p99_flood"]),
                _ratio(ratio(sd["p99_flood"], sd["p99_calm"])), _runs(sd["ratio_runs"])]
               for name, sd in sides.items()]
    per_run = []
    for name, runs in b["details"]["runs"].items():
        for i, r in enumerate(runs):
            if r.get("error"):
                per_run.append([name, str(i + 1), "failed", "", "", "", "", "", "", ""])
                continue
            limited = r["coordinator_counters"].get("updates_rate_limited")
            per_run.append([
                name, str(i + 1), _num(r["baseline"]["p99_ms"]), _num(r["flood"]["p99_ms"]),
                _num(r["flood"]["max_ms"]), str(r["honest_unanswered"]),
                ", ".join(f"{k} {v}" for k, v in sorted(r["honest_verdicts"].items())),
                f"{r['flooder']['sent']} of {r['flooder']['planned']}",
                ", ".join(f"{k} {v}" for k, v in sorted(r["flooder"]["receipts"].items()))
                or "none", "–" if limited is None else str(limited)])
    return "\n".join([
        _stamp(b), "", _table(HEAD, [_head(b, "honest p99 under flood (ms), default")]), "",
        f"Real Mosquitto, a real coordinator process (FedAsync, mlp {p['model_args']}, "
        f"{p['parameters']:,} parameters), {p['honest_devices']} honest devices each "
        f"publishing a valid int8 update ({p['honest_payload_bytes']:,} bytes) "
        f"{p['honest_rate_per_device']:g} times a second and timing publish -> receipt; one "
        f"flooder publishing {p['flood_rate']:g} hostile payloads a second "
        f"({', '.join(p['flood_shapes'])} of bench/hostile.py, built to fill the task's "
        f"`max_update_bytes`, readdressed "
        f"to the current run and version) during the second {p['seconds_per_phase']:g} s of "
        f"the honest devices' {2 * p['seconds_per_phase']:g} s (after "
        f"{p['warmup_seconds']:g} s warm-up). Baseline: the first half of the same run (no "
        f"flood). {p['runs']} runs per side, alternating: the coordinator with its defaults "
        f"(`max_update_bytes` derived from the model), with per-device admission off "
        f"(`--device-share 0`, every message judged in arrival order), with the old fixed "
        f"limit (`--max-update-bytes 4194304`); the side marked 5/s floods at 5 messages a "
        f"second instead.", "",
        _table(["coordinator", "max_update_bytes", "p50 calm (ms)", "p99 calm (ms)",
                "p50 flood (ms)", "p99 flood (ms)", "p99 flood / calm", "per run"], compare),
        "",
        _table(["coordinator", "run", "p99 calm (ms)", "p99 flood (ms)", "max flood (ms)",
                "honest unanswered", "honest verdicts", "flooder sent", "flooder receipts",
                "refused unjudged"], per_run),
    ])


def _offered(speeds: list[float]) -> float:
    """Updates per second per unit of ``rate`` when compute times follow ``speeds`` scaled to
    an arithmetic mean of N/rate: the sum of 1/c over devices is N/rate times this."""
    mean = sum(speeds) / len(speeds)
    return sum(mean / s for s in speeds) / len(speeds)


def _fleet(b: dict[str, Any]) -> str:
    head = ["devices", "model subscription", "K / max staleness", "first version (s)",
            "applied/s (steady)", "accepted",
            "rejected", "publish→aggregated p50 / p99 (s)", "receipt p50 / p99 (s)",
            "coordinator CPU ms/update", "broker CPU ms/update", "coordinator / broker RSS (MiB)",
            "models per training / per update sent", f"accuracy after {b['updates']:,} applied",
            "mean of the 10 versions to it",
            "sim late p50 / p99 (s)"]
    rows = []
    curves = []
    for name, r in b["runs"].items():
        if r.get("error"):
            rows.append([name, "failed: " + r["error"][:80]] + [""] * (len(head) - 2))
            continue
        applied, acc = r["accuracy_after"]
        rows.append([
            f"{r['devices']:,}", r["mode"],
            f"{r['buffer_size']} / {r['max_staleness']}",
            _num(r.get("first_version_after_s")), _num(r["ingest_per_s"]), _num(r["accepted"]),
            ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "none",
            f"{_num(r['aggregated_p50_s'])} / {_num(r['aggregated_p99_s'])}",
            f"{_num(r['receipt_p50_s'])} / {_num(r['receipt_p99_s'])}",
            _num(r["coordinator_cpu_ms_per_update"]), _num(r["broker_cpu_ms_per_update"]),
            f"{_num(r['coordinator_rss_mib'])} / {_num(r['broker_rss_mib'])}",
            f"{_num(r.get('models_per_training'))} / {_num(r['models_per_update'])}",
            f"{_num(acc)} ({applied:,})", _num(r.get("accuracy_mean10")),
            f"{_num(r['sim_late_p50_s'])} / {_num(r['sim_late_p99_s'])}"])
        points = ", ".join(f"{n:,}: {_num(a)}" for _t, n, a in r["accuracy_curve"])
        curves.append(f"- {r['devices']:,} devices, {r['mode']}: {points}")
    if "rate" in b:  # before protocol revision 2.10: no concurrency limit
        load = (
            f"Compute times average N/{_num(b['rate'])} s over the fleet at every size (with "
            f"these speeds the fleet offers about {_num(b['rate'] * _offered(b['speeds']))} "
            f"updates/s); the coordinator runs with `--fleet-scaling`: K and the staleness "
            f"limit follow the devices online (coordinator/fleet_scale.py; the table gives "
            f"them for the whole fleet).")
    else:
        c, period = b["concurrency"], b["period"]
        load = (
            f"Every device's compute time averages {_num(period)} s per update at every "
            f"size; the coordinator runs with `--fleet-scaling`, which keeps at most {c} "
            f"devices training at a time, each invited (protocol revision 2.10, "
            f"coordinator/invitations.py), so with these speeds the fleet offers about "
            f"{_num(c / period * _offered(b['speeds']))} updates/s at every size of at least "
            f"{c}; K and the staleness limit follow the devices training "
            f"(coordinator/fleet_scale.py of min(N, {c})).")
    return "\n".join([
        _stamp(b), "", _table(HEAD, [_head(b, "coordinator CPU per update, largest fleet")]), "",
        f"Virtual devices of `bench/fleet_sim.py` (one process, one event loop, each device its "
        f"own MQTT connection, account, session, shard of 32 digits samples and speed "
        f"{':'.join(_num(s) for s in b['speeds'])}) against a real Mosquitto and a real "
        f"`fedbus coordinator` (FedBuff, int8 updates, evaluating every version). {load} "
        f"Steady window: from version 1 to the last "
        f"version (the start-up burst of every device's `online` and `training` status stays "
        f"out); first version: seconds from the first publish to version 1. Applied/s, CPU per "
        f"update (/proc CPU time over the window, per update applied in it) and publish→"
        f"aggregated (publish to the making of the version the coordinator's verdict says it "
        f"was folded into) come from the coordinator's own records; receipts are as the "
        f"simulator saw them. Models per training: models delivered to the simulator per "
        f"local training. Sim late: how late the simulator's publishes left against their "
        f"schedule (the driver's own lateness, included in the latencies).", "",
        _table(head, rows), "", "Held-out accuracy against applied updates:", "",
        *curves,
    ])


RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "ingest_25k": _ingest,
    "ingest_1m": _ingest,
    "latency": _latency,
    "bytes": _bytes,
    "time_to_accuracy": _tta,
    "footprint": _footprint,
    "decode_worst": _decode_worst,
    "poisoning": _poisoning,
    "poisoning_sparse": _poisoning,
    "poisoning_adaptive": _poisoning,
    "privacy": _privacy,
    "flood": _flood,
    "fleet": _fleet,
}


def render_sections(results: dict[str, Any]) -> dict[str, str]:
    sections = {"environment": _environment(results)}
    for name, b in results.get("benchmarks", {}).items():
        err = _error(b)
        try:
            sections[name] = err or RENDER[name](b)
        except (KeyError, TypeError, ValueError) as exc:
            sections[name] = f"{_stamp(b)}\n\n(could not render: {type(exc).__name__}: {exc})"
    return sections


RATIO_MEANS = {
    "ingest_25k": "ours / bare (higher is better)",
    "ingest_1m": "ours / bare (higher is better)",
    "latency": "ours p50 / bare p50 (lower is better)",
    "bytes": "torch.save / ours (higher is better)",
    "time_to_accuracy": "sync / async to a stable target under 1:2:4 (higher is better)",
    "footprint": "agent / bare (lower is better)",
    "decode_worst": "ours / unpackb (lower is better)",
    "poisoning": "default defences / plain mean, worst points lost (lower is better)",
    "poisoning_sparse": "the same with sparse:0.007:sign updates (lower is better)",
    "poisoning_adaptive": "the default under --adaptive-k --staleness-a 0.5 / without, worst "
    "points lost (lower is better)",
    "privacy": "accuracy with DP (σ = 1) / without (higher is better)",
    "flood": "honest p99 under a flood / without (lower is better)",
    "fleet": "coordinator CPU per update, largest fleet / smallest (lower is better)",
}


def _summary(results: dict[str, Any]) -> str:
    rows = []
    for name, b in results.get("benchmarks", {}).items():
        if "error" in b:
            rows.append([name, "–", "–", "–", RATIO_MEANS.get(name, ""), "failed", "–"])
            continue
        rows.append([name, f"{_num(b['ours']['median'])} {b.get('unit', '')}",
                     f"{_num(b['baseline']['median'])} {b.get('unit', '')}", _ratio(b["ratio"]),
                     RATIO_MEANS.get(name, ""), b.get("aim", "–"), _met(b.get("aim_met"))])
    return _table(["benchmark", "ours (median)", "baseline (median)", "ratio", "ratio is",
                   "aim", "met?"], rows)


def update_markdown(path: Path, results: dict[str, Any]) -> None:
    """Rewrite the generated sections of ``path`` (created if missing) from ``results``."""
    sections = {"summary": _summary(results), **render_sections(results)}
    text = path.read_text() if path.exists() else "# fedbus benchmarks\n"
    for name, body in sections.items():
        begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
        block = f"{begin}\n{body}\n{end}"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _m: block, text)  # noqa: B023 - called right here
        else:
            text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
    path.write_text(text)
