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
    Children,
    median,
    proc_status,
    ratio,
    summarize,
    wait_for_file,
)

__all__ = ["run"]

VERSIONS = 15
IDLE_SECONDS = 3.0
AIM_MIB = 260.0
DEVICE = "device-01"


class _Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
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
            rss = proc_status(self.pid).get("VmRSS", 0)
            self.max_rss = max(self.max_rss, rss)
            self.samples += 1


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
        agent = ctx.children.spawn(
            [sys.executable, "-m", "fedbus", "agent", "--device-id", DEVICE, "--data", data,
             "--credentials", str(broker.credentials_file)],
            log_path=ctx.path("footprint", f"agent-{i}.log"))
        try:
            service = CoordinatorService(
                CoordinatorConfig(
                    host=broker.host, port=broker.port, username=COORDINATOR,
                    prefix=broker.prefix, task_id=f"footprint-{i}",
                    model_args=json.dumps({"in_features": 64, "num_classes": 10}),
                    mode="fedasync", max_versions=versions, duration=120.0,
                ),
                password=broker.coordinator_password,
            )
            with _Sampler(agent.pid) as sampler:
                summary = service.run()
                if agent.poll() is not None:
                    raise BenchError(f"agent exited with code {agent.returncode}")
                training = proc_status(agent.pid)
                time.sleep(IDLE_SECONDS)
                idle = proc_status(agent.pid)
            if summary.counters.get("updates_accepted", 0) < versions:
                raise BenchError(f"agent run {i}: only {summary.counters} updates accepted")
        finally:
            Children.stop(agent)
    return {
        "peak_training_mib": training["VmHWM"] / 1024,
        "rss_end_of_training_mib": training["VmRSS"] / 1024,
        "idle_rss_mib": idle["VmRSS"] / 1024,
        "idle_hwm_mib": idle["VmHWM"] / 1024,
        "sampled_max_rss_mib": sampler.max_rss / 1024,
        "samples": sampler.samples,
        "updates": summary.counters.get("updates_accepted", 0),
    }


def _bare_run(ctx: BenchContext, i: int) -> dict[str, Any]:
    ready = ctx.path("footprint", f"bare-{i}.ready")
    proc = ctx.children.spawn_role("torch-idle", {"ready": str(ready), "seconds": 120},
                                   log_path=ctx.path("footprint", f"bare-{i}.log"))
    try:
        wait_for_file(ready, 60, [proc], "python -c 'import torch'")
        time.sleep(0.5)
        status = proc_status(proc.pid)
    finally:
        Children.stop(proc)
    return {"peak_mib": status["VmHWM"] / 1024, "rss_mib": status["VmRSS"] / 1024}


def _stages(ctx: BenchContext) -> tuple[list, bool]:
    """The agent's path step by step (``rss-stages``), and whether it imported torch._dynamo."""
    out = ctx.path("footprint", "stages.json")
    proc = ctx.children.spawn_role("rss-stages", {"out": str(out)},
                                   log_path=ctx.path("footprint", "stages.log"))
    ctx.children.wait(proc, 120, "rss-stages")
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
