"""The demo: a broker, a coordinator and N simulated devices on this machine.

The devices are real ``fedbus agent`` processes talking to a real Mosquitto; each gets a
non-IID share of the handwritten digits and a simulated speed. The coordinator runs in
this process so the demo can show progress and write the report.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.report import write_report
from coordinator.service import CoordinatorService, RunSummary, VersionRecord
from fedbus.broker import LocalBroker, default_device_ids
from fedbus.errors import FedbusError

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    devices: int = 8
    mode: str = "fedbuff"
    codec: str = "int8"
    speeds: str = "1,2,4"  # slowdown factors, cycled over the devices
    alpha: float = 0.5  # Dirichlet concentration of the label skew (smaller = more skewed)
    max_versions: int = 100
    duration: float = 180.0  # safety cap in seconds
    buffer_size: int = 4
    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 16
    test_fraction: float = 0.2
    seed: int = 0
    report: Path = Path("fedbus-report")
    workdir: Path | None = None  # keep broker files, data and logs here (default: temp, removed)

    def speed_factors(self) -> list[float]:
        try:
            factors = [float(part) for part in self.speeds.split(",")]
        except ValueError:
            raise ValueError(
                f"speeds must be comma-separated numbers, got {self.speeds!r}"
            ) from None
        if not factors or min(factors) < 1.0:
            raise ValueError("speeds are slowdown factors and must each be at least 1.0")
        return factors

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 99:
            raise ValueError("devices must be between 1 and 99")
        self.speed_factors()
        if self.mode not in ("fedbuff", "fedasync", "fedavg"):
            raise ValueError(f"mode must be fedbuff, fedasync or fedavg, got {self.mode!r}")
        if self.max_versions < 1:
            raise ValueError("max_versions must be at least 1")


@dataclass(frozen=True)
class DemoResult:
    summary: RunSummary
    report: dict
    report_dir: Path


def _prepare_data(cfg: DemoConfig, workdir: Path, device_ids: list[str]):
    from fedbus.datasets import dirichlet_split, load_digits, train_test_split, write_npz

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, cfg.test_fraction, cfg.seed)
    parts = dirichlet_split(y_train, len(device_ids), cfg.alpha, cfg.seed)
    paths = {}
    for device, idx in zip(device_ids, parts, strict=True):
        path = workdir / "data" / f"{device}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, x_train[idx], y_train[idx])
        paths[device] = path
        labels = np.bincount(y_train[idx], minlength=10)
        log.debug("%s: %d samples, labels %s", device, len(idx), labels.tolist())
    return paths, (x_test, y_test), len(y_train)


def _start_agents(
    cfg: DemoConfig, broker: LocalBroker, device_ids: list[str], data: dict[str, Path],
    workdir: Path,
) -> dict[str, tuple[subprocess.Popen, float]]:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    agents = {}
    for i, device in enumerate(device_ids):
        factors = cfg.speed_factors()
        slowdown = factors[i % len(factors)]
        cmd = [
            sys.executable, "-m", "fedbus", "agent",
            "--device-id", device,
            "--data", str(data[device]),
            "--credentials", str(broker.credentials_file),
            "--slowdown", str(slowdown),
            "--seed", str(cfg.seed),
        ]
        with open(logs / f"{device}.log", "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        agents[device] = (proc, slowdown)
    return agents


def _stop_agents(agents: dict[str, tuple[subprocess.Popen, float]], timeout: float = 10.0) -> None:
    for proc, _ in agents.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc, _ in agents.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _AgentWatchdog:
    """Stops the coordinator as soon as an agent process dies, and says why."""

    def __init__(self, agents: dict[str, tuple[subprocess.Popen, float]], logs: Path,
                 service: CoordinatorService) -> None:
        self._agents = agents
        self._logs = logs
        self._service = service
        self._done = threading.Event()
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._watch, name="agent-watchdog", daemon=True)

    def __enter__(self) -> _AgentWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            for device, (proc, _) in self._agents.items():
                if proc.poll() is not None:
                    lines = (self._logs / f"{device}.log").read_text(errors="replace").splitlines()
                    last = lines[-1].strip() if lines else "(no output)"
                    self.failure = f"agent {device} exited with code {proc.returncode}: {last}"
                    self._service.stop()
                    return


def run_demo(
    cfg: DemoConfig, *, on_version: Callable[[VersionRecord], None] | None = None
) -> DemoResult:
    """Run the whole demo and write the report; returns the summary and the report dict."""
    started = time.monotonic()
    own_workdir = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fedbus-demo-")) if own_workdir else Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device_ids = default_device_ids(cfg.devices)
    agents: dict[str, tuple[subprocess.Popen, float]] = {}
    broker = LocalBroker(workdir / "broker", device_ids=device_ids)
    try:
        data, eval_data, n_train = _prepare_data(cfg, workdir, device_ids)
        broker.start()
        log.info("broker listening on %s:%d (pid %d)", broker.host, broker.port, broker.pid)
        agents = _start_agents(cfg, broker, device_ids, data, workdir)
        log.info("started %d agents (slowdowns %s)", len(agents),
                 [s for _, s in agents.values()])
        service = CoordinatorService(
            CoordinatorConfig(
                host=broker.host,
                port=broker.port,
                username=broker.coordinator.username,
                prefix=broker.prefix,
                task_id=f"demo-{cfg.seed}",
                codec=cfg.codec,
                mode=cfg.mode,
                buffer_size=cfg.buffer_size,
                epochs=cfg.epochs,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                max_versions=cfg.max_versions,
                duration=cfg.duration,
                round_deadline=30.0,
            ),
            password=broker.coordinator.password,
            eval_data=eval_data,
            on_version=on_version,
        )
        with _AgentWatchdog(agents, workdir / "logs", service) as watchdog:
            summary = service.run()
        if watchdog.failure:
            raise FedbusError(f"demo failed: {watchdog.failure}")
        _stop_agents(agents)
        report = write_report(
            cfg.report,
            summary,
            extra={
                "devices": cfg.devices,
                "dataset": "digits",
                "train_samples": n_train,
                "test_samples": len(eval_data[1]),
                "codec": cfg.codec,
                "speeds": [s for _, s in agents.values()],
                "alpha": cfg.alpha,
                "total_seconds": round(time.monotonic() - started, 3),
                "agent_exit_codes": {d: p.returncode for d, (p, _) in agents.items()},
            },
        )
        return DemoResult(summary, report, Path(cfg.report))
    finally:
        _stop_agents(agents)
        broker.stop()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
