"""Footprint: resident memory of a real ``fedbus agent`` process while training and while idle,
against a bare ``python -c "import torch"`` process.

Per agent run: a fresh broker, one ``fedbus agent`` process (the demo's model and a demo-sized
share of the digits), and a coordinator (in this process, FedAsync, no evaluation) that makes
``VERSIONS`` versions, so the agent trains ``VERSIONS`` times. The harness reads
``/proc/<pid>/status`` of the agent every 20 ms: the peak while training is ``VmHWM`` when
the last update is in; idle is ``VmRSS`` after the coordinator stopped and the agent has
had nothing to do for ``IDLE_SECONDS``. The baseline process imports torch and sleeps; its
``VmHWM`` is read once it is ready. Runs alternate agent, bare, agent, bare, ...
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from bench.harness import (
    COORDINATOR,
    BenchBroker,
    BenchContext,
    BenchError,
    median,
    ratio,
    summarize,
)
from fedbus.processes import Child, Memory

__all__ = ["run"]

VERSIONS = 15
IDLE_SECONDS = 3.0
AIM_MIB = 260.0
DEVICE = "device-01"


class _Sampler:
    """The highest ``VmRSS`` of ``child``, read every 20 ms while the block runs."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.max_rss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            memory = self.child.rss()
            self.max_rss = max(self.max_rss, memory.rss_kib if memory else 0)
            self.samples += 1


def _memory(child: Child) -> Memory:
    """``child.rss()``, or a ``BenchError`` if it has exited."""
    memory = child.rss()
    if memory is None:
        raise BenchError(f"{child.name} exited with code {child.returncode}")
    return memory


def _shard(ctx: BenchContext) -> str:
    from fedbus.datasets import dirichlet_split, load_digits, train_test_split, write_npz

    x, y = load_digits()
    x_train, y_train, _, _ = train_test_split(x, y, 0.2, 0)
    part = dirichlet_split(y_train, 8, 0.5, 0)[0]  # what device-01 of the demo gets
    path = ctx.path("footprint", "device-01.npz")
    write_npz(path, x_train[part], y_train[part])
    return str(path)


def _agent_run(ctx: BenchContext, i: int, data: str, versions: int) -> dict[str, Any]:
    from coordinator.config import CoordinatorConfig
    from coordinator.service import CoordinatorService

    with BenchBroker(ctx, f"footprint-{i}", [DEVICE]) as broker:
        agent = ctx.start(
            [sys.executable, "-m", "fedbus", "agent", "--device-id", DEVICE, "--data", data,
             "--credentials", str(broker.credentials_file),
             "--state-dir", str(ctx.path("footprint", f"state-{i}"))],
            log_path=ctx.path("footprint", f"agent-{i}.log"), name="agent")
        try:
            service = CoordinatorService(
                CoordinatorConfig(
                    host=broker.host, port=broker.port, username=COORDINATOR,
                    prefix=broker.prefix, task_id=f"footprint-{i}",
                    model_args=json.dumps({"in_features": 64, "num_classes": 10}),
                    mode="fedasync", max_versions=versions, duration=120.0,
                    state_dir=ctx.path("footprint", f"run-{i}"),
                    signing_key=broker.local.signing_key_file,
                ),
                password=broker.coordinator_password,
            )
            with _Sampler(agent) as sampler:
                summary = service.run()
                training = _memory(agent)
                time.sleep(IDLE_SECONDS)
                idle = _memory(agent)
            if summary.counters.get("updates_accepted", 0) < versions:
                raise BenchError(f"agent run {i}: only {summary.counters} updates accepted")
        finally:
            agent.terminate()
    return {
        "peak_training_mib": training.hwm_mib,
        "rss_end_of_training_mib": training.rss_mib,
        "idle_rss_mib": idle.rss_mib,
        "idle_hwm_mib": idle.hwm_mib,
        "sampled_max_rss_mib": sampler.max_rss / 1024,
        "samples": sampler.samples,
        "updates": summary.counters.get("updates_accepted", 0),
    }


def _bare_run(ctx: BenchContext, i: int) -> dict[str, Any]:
    ready = ctx.path("footprint", f"bare-{i}.ready")
    proc = ctx.spawn_role("torch-idle", {"ready": str(ready), "seconds": 120},
                          log_path=ctx.path("footprint", f"bare-{i}.log"))
    try:
        proc.wait_for_file(ready, 60, "python -c 'import torch'")
        time.sleep(0.5)
        status = _memory(proc)
    finally:
        proc.terminate()
    return {"peak_mib": status.hwm_mib, "rss_mib": status.rss_mib}


def _stages(ctx: BenchContext) -> tuple[list, bool]:
    """The agent's path step by step (``rss-stages``), and whether it imported torch._dynamo."""
    out = ctx.path("footprint", "stages.json")
    proc = ctx.spawn_role("rss-stages", {"out": str(out)},
                          log_path=ctx.path("footprint", "stages.log"))
    proc.wait(120)
    result = json.loads(out.read_text())
    stages = [{"stage": name, "rss_mib": round(v["VmRSS"] / 1024, 1),
               "hwm_mib": round(v["VmHWM"] / 1024, 1)} for name, v in result["stages"]]
    return stages, bool(result["torch_dynamo_imported"])


def run(ctx: BenchContext) -> dict[str, Any]:
    pairs = ctx.pairs(3)
    versions = 4 if ctx.quick else VERSIONS
    data = _shard(ctx)
    agents: list[dict] = []
    bare: list[dict] = []
    for i in range(pairs):
        agents.append(_agent_run(ctx, i, data, versions))
        bare.append(_bare_run(ctx, i))
    o = summarize([r["peak_training_mib"] for r in agents], "fedbus agent: VmHWM while training")
    b = summarize([r["peak_mib"] for r in bare], "python -c 'import torch': VmHWM")
    idle = summarize([r["idle_rss_mib"] for r in agents], "fedbus agent: VmRSS idle")
    stages, dynamo = _stages(ctx)
    return {
        "unit": "MiB",
        "ours": o,
        "baseline": b,
        "ratio": ratio(o["median"], b["median"]),
        "ratio_definition": "agent peak RSS / bare import-torch peak RSS",
        "idle": {"ours": idle, "ratio": ratio(idle["median"],
                                              median(r["rss_mib"] for r in bare))},
        "aim": f"agent peak RSS <= {AIM_MIB:.0f} MiB",
        "aim_met": None if o["median"] is None else o["median"] <= AIM_MIB,
        "params": {"pairs": pairs, "versions_trained": versions, "model": "mlp 64-[64]-10 (demo)",
                   "data": "digits, device-01 share of the demo split", "idle_seconds":
                   IDLE_SECONDS, "sample_interval_s": 0.02},
        "details": {"agent_runs": agents, "bare_runs": bare, "stages": stages,
                    "stages_import_torch_dynamo": dynamo},
    }
