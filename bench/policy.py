"""Device training policy: what the CPU cap and the memory ceiling cost and hold, measured.

``python -m bench.policy [--runs N] [--out FILE]`` (run it under ``nice -n 10`` on a shared
machine). Standalone: not part of ``python -m bench``.

- **CPU cap.** The demo's network (``cnn``, 8 and 16 channels) trains 6 local epochs on
  1,437 digits (batch 32), in this process with one torch thread, through the agent's
  ``TrainingGate`` exactly as the agent calls it: uncapped (the baseline, gate without a
  policy), with the memory ceiling check alone (every batch reads ``/proc/self/status``),
  and capped at 0.5 and 0.25 of a core. Runs alternate setting by setting. Reported:
  CPU seconds (``time.process_time``), wall seconds and their ratio, the share of a core.
- **Memory.** A fresh Python process imports torch, trains the same network once and
  reports ``VmSize`` (address space, what ``RLIMIT_AS`` limits), ``VmData`` (private data,
  ``RLIMIT_DATA``), ``VmRSS`` and ``VmHWM`` (resident now and at peak); then the same
  process again under ``RLIMIT_AS`` set to 1.5 x the peak resident memory of the first,
  to see what an address-space limit does to torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

_CHILD = r"""
import json, resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
torch.set_num_threads(1)
from edge_agent.train import train_local
from fedbus.datasets import load_digits
from fedbus.messages import TrainSpec
from fedbus.zoo import build_model, fit_inputs, input_shape
args = {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10, "channels": [8, 16]}
x, y = load_digits()
model = build_model("cnn", args)
train_local(model, fit_inputs(x, input_shape("cnn", args)), y, TrainSpec(epochs=1), seed=0)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({k: int(status[k].split()[0]) // 1024 for k in
                  ("VmSize", "VmData", "VmRSS", "VmHWM")}))
"""


def _cpu_runs(runs: int) -> dict[str, list[dict[str, float]]]:
    import torch

    from edge_agent.gate import TrainingGate
    from edge_agent.policy import TrainingPolicy
    from edge_agent.train import train_local, warm_up
    from fedbus.datasets import load_digits
    from fedbus.messages import TrainSpec
    from fedbus.zoo import build_model, fit_inputs, input_shape

    torch.set_num_threads(1)
    warm_up()
    args = {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10, "channels": [8, 16]}
    x, y = load_digits()
    x = fit_inputs(x[:1437], input_shape("cnn", args))
    y = y[:1437]
    spec = TrainSpec(epochs=6, batch_size=32)
    settings = {
        "uncapped (baseline)": TrainingPolicy(),
        "memory check only": TrainingPolicy(memory_bytes=64 * 1024**3),
        "cap 0.5 of a core": TrainingPolicy(cpu_share=0.5),
        "cap 0.25 of a core": TrainingPolicy(cpu_share=0.25),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for _ in range(runs):
        for name, policy in settings.items():
            model = build_model("cnn", args)
            gate = TrainingGate(policy, sleep=time.sleep)
            cpu0, wall0 = time.process_time(), time.monotonic()
            gate.begin_training()
            train_local(model, x, y, spec, seed=0, should_stop=gate.between_batches)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            results[name].append({"cpu_s": cpu, "wall_s": wall, "share": cpu / wall})
    return results


def _memory(limit: int) -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _CHILD, str(limit)], cwd=repo,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode == 0:
        return {"exit": 0, **json.loads(done.stdout.strip().splitlines()[-1])}
    tail = (done.stderr.strip().splitlines() or [""])[-1]
    return {"exit": done.returncode, "error": tail[:200]}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    opts = parser.parse_args()
    cpu = _cpu_runs(opts.runs)
    free = _memory(0)
    limited = _memory(int(free["VmHWM"] * 1.5) * 1024 * 1024) if free["exit"] == 0 else {}
    result = {"cpu": cpu, "memory": free, "memory_rlimit_as_1.5x_peak_rss": limited}
    print("| setting | CPU s | wall s | share of a core |")
    print("|---|---|---|---|")
    for name, rows in cpu.items():
        print(f"| {name} | {_median([r['cpu_s'] for r in rows]):.2f} | "
              f"{_median([r['wall_s'] for r in rows]):.2f} | "
              f"{_median([r['share'] for r in rows]):.2f} |")
    print(f"memory (MiB): {free}")
    print(f"under RLIMIT_AS = 1.5 x peak RSS: {limited}")
    text = json.dumps(result, indent=2)
    if opts.out is not None:
        opts.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
