"""What the one-command device install costs: the virtualenv's size on disk and the resident
memory of a connected, idle agent, against a bare ``import torch`` in the same virtualenv.

    deploy/install-agent.sh --root /tmp/agent-root --bundle BUNDLE [--torch-index '']
    nice -n 10 .venv/bin/python -m bench.device_install --venv /tmp/agent-root/opt/fedbus/venv

Size: ``du -sk`` of the virtualenv (disk blocks, as ``du`` counts them).

Idle agent: a fresh broker (this process, ``LocalBroker``) and a bundle for one device; the
installed virtualenv runs the service's own command, ``python -m fedbus agent``, configured
like the service (``FEDBUS_AGENT_CREDENTIALS``, ``_DATA``, ``_STATE_DIR``) on the demo's share
of the digits of device-01. No coordinator runs, so the agent connects, warms torch up and
waits for a task. Once its log shows both, and ``IDLE_SECONDS`` later, ``VmRSS`` and
``VmHWM`` come from ``/proc/<pid>/status`` and ``Pss`` from ``/proc/<pid>/smaps_rollup``.
Baseline: the same interpreter running ``import torch`` and sleeping, read the same way once
it is ready. Runs alternate agent, bare, agent, bare, ...

Prints one JSON document. Not part of ``python -m bench`` (it needs an installed virtualenv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedbus.broker import LocalBroker
from fedbus.credentials import BrokerAddress, write_bundle
from fedbus.processes import Child

__all__ = ["main", "measure"]

DEVICE = "device-01"
IDLE_SECONDS = 5.0
READY_TIMEOUT = 120.0


def _proc_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (``/proc/<pid>/status``) and Pss (``smaps_rollup``), in KiB."""
    found: dict[str, int] = {}
    for name, keys in (("status", ("VmRSS", "VmHWM")), ("smaps_rollup", ("Pss",))):
        with open(f"/proc/{pid}/{name}") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in keys:
                    found[key] = int(value.split()[0])
    return found


def _wait_for_log(child: Child, needles: tuple[str, ...], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = child.log_path.read_text(errors="replace")
        if all(n in text for n in needles):
            return
        if not child.alive:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{child.name}: no {needles} in its log:\n{child.log_tail()}")


def _agent_run(python: Path, work: Path, i: int) -> dict[str, int]:
    from fedbus.datasets import dirichlet_split, load_digits, train_test_split, write_npz

    x, y = load_digits()
    x_train, y_train, _, _ = train_test_split(x, y, 0.2, 0)
    part = dirichlet_split(y_train, 8, 0.5, 0)[0]  # device-01's share in the demo
    data = work / f"data-{i}.npz"
    write_npz(data, x_train[part], y_train[part])
    broker = LocalBroker(work / f"broker-{i}", device_ids=[DEVICE])
    broker.start()
    try:
        bundle = write_bundle(
            work / f"bundle-{i}",
            BrokerAddress(broker.host, broker.port, broker.tls_port, broker.mtls_port,
                          broker.prefix, broker.coordinator_key),
            DEVICE, ca_pem=broker.ca_file.read_bytes(),
            password=broker.credentials(DEVICE).password)
        agent = Child([str(python), "-m", "fedbus", "agent"], log_path=work / f"agent-{i}.log",
                      name="agent", env={
                          "FEDBUS_AGENT_CREDENTIALS": str(bundle),
                          "FEDBUS_AGENT_DATA": str(data),
                          "FEDBUS_AGENT_STATE_DIR": str(work / f"state-{i}"),
                          "FEDBUS_LOG_LEVEL": "debug",  # for the warm-up line
                          "PYTHONPATH": "",
                      })
        try:
            _wait_for_log(agent, ("connected to", "torch warm-up took"), READY_TIMEOUT)
            time.sleep(IDLE_SECONDS)
            return _proc_kib(agent.pid)
        finally:
            agent.terminate(20)
    finally:
        broker.stop()


def _bare_run(python: Path, work: Path, i: int) -> dict[str, int]:
    ready = work / f"bare-{i}.ready"
    bare = Child([str(python), "-c", "import pathlib, sys, time, torch; "
                  "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)", str(ready)],
                 log_path=work / f"bare-{i}.log", name="bare", env={"PYTHONPATH": ""})
    try:
        bare.wait_for_file(ready, READY_TIMEOUT, "import torch")
        time.sleep(IDLE_SECONDS)
        return _proc_kib(bare.pid)
    finally:
        bare.terminate(10)


def _summary(runs: list[dict[str, int]], key: str) -> dict[str, Any]:
    mib = [round(r[key] / 1024, 1) for r in runs]
    return {"median": round(statistics.median(mib), 1), "runs": mib}


def measure(venv: Path, runs: int) -> dict[str, Any]:
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"error: {python} does not exist: give an installed --venv")
    du = subprocess.run(["du", "-sk", str(venv)], capture_output=True, text=True, check=True)
    torch_version = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
        text=True, check=True, env={**os.environ, "PYTHONPATH": ""}).stdout.strip()
    agents: list[dict[str, int]] = []
    bare: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="fedbus-device-install-") as tmp:
        for i in range(runs):
            agents.append(_agent_run(python, Path(tmp), i))
            bare.append(_bare_run(python, Path(tmp), i))
    result: dict[str, Any] = {
        "venv": str(venv),
        "venv_du_mib": round(int(du.stdout.split()[0]) / 1024),
        "torch": torch_version,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "idle_seconds": IDLE_SECONDS,
        "agent_idle": {k: _summary(agents, k) for k in ("VmRSS", "VmHWM", "Pss")},
        "bare_import_torch": {k: _summary(bare, k) for k in ("VmRSS", "VmHWM", "Pss")},
    }
    a, b = result["agent_idle"]["VmRSS"]["median"], result["bare_import_torch"]["VmRSS"]["median"]
    result["agent_over_bare_rss"] = round(a / b, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.device_install",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, required=True,
                        help="the virtualenv deploy/install-agent.sh made")
    parser.add_argument("--runs", type=int, default=3, help="runs per side (default 3)")
    args = parser.parse_args(argv)
    json.dump(measure(args.venv, args.runs), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
