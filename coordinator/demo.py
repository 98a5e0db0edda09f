"""The demo: a broker, a coordinator and N simulated devices on this machine.

The devices are real ``fedbus agent`` processes talking to a real Mosquitto; each gets a
non-IID share of a bundled data set (``fedbus.datasets.DATASETS``: digits, mnist or motions)
and a simulated speed. The coordinator runs in this process, builds the data set's model
and evaluates every version on the held-out share, so the demo can show progress and write
the report.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.core import AggregationConfig
from coordinator.privacy import privacy_from_settings
from coordinator.report import write_report
from coordinator.service import CoordinatorService, RunSummary, VersionRecord
from fedbus.broker import LocalBroker, default_device_ids
from fedbus.errors import ConfigError, FedbusError
from fedbus.processes import Child, ChildGroup, Watchdog

__all__ = ["DEMO_PRESETS", "DemoConfig", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)


# Demo settings per data set, measured on a shared 2-core machine (see the README). Local
# training settings (epochs, lr, batch size) come from the data set's registry entry.
# ``min_per_class``: every device gets at least this many samples of every class.
DEMO_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "digits": MappingProxyType(
        {"devices": 8, "alpha": 0.5, "max_versions": 100, "test_fraction": 0.2,
         "min_per_class": 0}
    ),
    # accuracy is within half a point of its 100-version value by version 60
    "mnist": MappingProxyType(
        {"devices": 8, "alpha": 0.5, "max_versions": 60, "test_fraction": 0.2,
         "min_per_class": 0}
    ),
    # 80 windows: a 50/50 split (the archive's proportions) leaves 10 training windows per
    # class, so 4 devices get 2 windows of every class each and the other 8 follow the
    # Dirichlet skew. It is learnt by version 15 or so; 50 versions show it staying there.
    "motions": MappingProxyType(
        {"devices": 4, "alpha": 0.5, "max_versions": 50, "test_fraction": 0.5,
         "min_per_class": 2}
    ),
})
_PER_DATASET = ("devices", "alpha", "max_versions", "test_fraction", "epochs", "lr",
                "batch_size")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``fedbus demo``; ``None`` means "the data set's default" (``resolved``)."""

    dataset: str = "digits"
    devices: int | None = None
    mode: str = "fedbuff"
    codec: str = "int8"
    speeds: str = "1,2,4"  # slowdown factors, cycled over the devices
    alpha: float | None = None  # Dirichlet concentration of the label skew (smaller = more skewed)
    max_versions: int | None = None
    duration: float = 180.0  # safety cap in seconds
    buffer_size: int = 4
    # coordinator.aggregator_spec; None: quorum, or mean with differential privacy
    aggregator: str | None = None
    # central differential privacy (coordinator.privacy); off while dp_noise is 0 (it also
    # switches the adaptive norm bound off)
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    dp_epsilon_budget: float = 0.0
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    test_fraction: float | None = None
    seed: int = 0
    report: Path = Path("fedbus-report")
    workdir: Path | None = None  # keep broker files, data and logs here (default: temp, removed)
    dashboard_port: int = 0  # the coordinator's live dashboard on 127.0.0.1 (0: none)

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
        if self.dataset not in DEMO_PRESETS:
            raise ValueError(
                f"dataset must be one of {', '.join(DEMO_PRESETS)}, got {self.dataset!r}"
            )
        if self.devices is not None and not 1 <= self.devices <= 99:
            raise ValueError("devices must be between 1 and 99")
        if not 0 <= self.dashboard_port <= 65535:
            raise ValueError(f"dashboard_port must be 1-65535, or 0 for none, got "
                             f"{self.dashboard_port}")
        self.speed_factors()
        if self.mode not in ("fedbuff", "fedasync", "fedavg"):
            raise ValueError(f"mode must be fedbuff, fedasync or fedavg, got {self.mode!r}")
        AggregationConfig(
            mode=self.mode, buffer_size=self.buffer_size, aggregator=self.aggregator,
            privacy=privacy_from_settings(self.dp_noise, self.dp_clip, 1e-5,
                                          self.dp_epsilon_budget),
        )  # one clear line for an aggregator or DP that cannot work with this mode and K
        if self.max_versions is not None and self.max_versions < 1:
            raise ValueError("max_versions must be at least 1")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must be between 0 and 1")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError("alpha must be a positive number")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr must be positive")

    @property
    def min_per_class(self) -> int:
        """Samples of every class each device should get (fewer if there are too few)."""
        return int(DEMO_PRESETS[self.dataset]["min_per_class"])

    def resolved(self) -> DemoConfig:
        """This configuration with every ``None`` replaced by the data set's default."""
        from fedbus.datasets import get_dataset

        info = get_dataset(self.dataset)
        defaults = {
            **DEMO_PRESETS[self.dataset],
            "epochs": info.epochs, "lr": info.lr, "batch_size": info.batch_size,
        }
        return replace(self, **{
            name: defaults[name] for name in _PER_DATASET if getattr(self, name) is None
        })


@dataclass(frozen=True)
class DemoResult:
    summary: RunSummary
    report: dict
    report_dir: Path


def _prepare_data(
    cfg: DemoConfig, workdir: Path, device_ids: list[str]
) -> tuple[dict[str, Path], tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """Split the data set and write one ``.npz`` per device.

    Returns the files, the held-out set and a description of the split for the report.
    """
    from fedbus.datasets import dirichlet_split, get_dataset, train_test_split, write_npz

    assert cfg.test_fraction is not None and cfg.alpha is not None
    x, y = get_dataset(cfg.dataset).load()
    x_train, y_train, x_test, y_test = train_test_split(x, y, cfg.test_fraction, cfg.seed)
    n_classes = int(y.max()) + 1
    min_size = min(10, len(y_train) // len(device_ids))
    # as many of every class as the data set asks for, or as the smallest class allows
    smallest = int(np.bincount(y_train, minlength=n_classes).min())
    min_per_class = min(cfg.min_per_class, smallest // len(device_ids))
    try:
        parts = dirichlet_split(
            y_train, len(device_ids), cfg.alpha, cfg.seed, min_size=min_size,
            min_per_class=min_per_class,
        )
    except ValueError as exc:
        raise ConfigError(
            f"cannot split the {len(y_train)} {cfg.dataset} training samples over "
            f"{len(device_ids)} devices: {exc}"
        ) from None
    paths = {}
    for device, idx in zip(device_ids, parts, strict=True):
        if len(idx) == 0:
            raise ConfigError(
                f"{len(device_ids)} devices are too many for the {len(y_train)} {cfg.dataset} "
                "training samples: a device would get none"
            )
        path = workdir / "data" / f"{device}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, x_train[idx], y_train[idx])
        paths[device] = path
        labels = np.bincount(y_train[idx], minlength=n_classes)
        log.debug("%s: %d samples, labels %s", device, len(idx), labels.tolist())
    info = {
        "train_samples": len(y_train),
        "test_samples": len(y_test),
        "device_samples": [len(idx) for idx in parts],
        "min_per_class": min_per_class,
    }
    return paths, (x_test, y_test), info


def _slowdowns(cfg: DemoConfig, devices: int) -> list[float]:
    """The simulated slowdown of each device: ``cfg.speeds`` cycled over the devices."""
    factors = cfg.speed_factors()
    return [factors[i % len(factors)] for i in range(devices)]


def _agent_command(
    cfg: DemoConfig, broker: LocalBroker, device: str, data: Path, slowdown: float,
    workdir: Path,
) -> list[str]:
    """The command line of one simulated device's ``fedbus agent``."""
    return [
        sys.executable, "-m", "fedbus", "agent",
        "--device-id", device,
        "--data", str(data),
        "--credentials", str(broker.credentials_file),
        "--slowdown", str(slowdown),
        "--seed", str(cfg.seed),
        # outbox and top-k residuals stay with the demo's files, not in ~/.local/state
        "--state-dir", str(workdir / "state" / device),
        # the agents exit by themselves when the coordinator ends the run
        "--on-run-end", "exit",
    ]


# Simulated devices run this many nice levels below the coordinator. Real devices bring
# their own CPUs; here N agents share this machine's cores with the coordinator, and at
# equal priority they starve it: it falls behind, every update arrives many versions stale
# and learning degrades (seen with the mnist CNN on 2 cores).
_AGENT_NICE = 10
_AGENT_STOP_SECONDS = 10.0  # SIGTERM, then SIGKILL


def _start_agents(
    cfg: DemoConfig, broker: LocalBroker, data: dict[str, Path], speeds: list[float],
    workdir: Path, agents: ChildGroup,
) -> None:
    """One ``fedbus agent`` process per device (in ``data``'s order), its log in
    ``workdir/logs/<device>.log``, into ``agents``."""
    for (device, path), slowdown in zip(data.items(), speeds, strict=True):
        agents.add(Child(
            _agent_command(cfg, broker, device, path, slowdown, workdir),
            log_path=workdir / "logs" / f"{device}.log", name=f"agent {device}",
            nice=_AGENT_NICE,
        ))


def _wait_for_agents(agents: ChildGroup, timeout: float) -> None:
    """Give the agents ``timeout`` seconds to see the ended run and exit, then stop the
    ones left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(child.alive for child in agents):
        time.sleep(0.1)
    agents.stop_all(_AGENT_STOP_SECONDS)


def run_demo(
    cfg: DemoConfig, *, on_version: Callable[[VersionRecord], None] | None = None
) -> DemoResult:
    """Run the whole demo and write the report; returns the summary and the report dict.

    ``cfg`` is resolved first (``DemoConfig.resolved``): unset settings take the data
    set's defaults.
    """
    from fedbus.datasets import get_dataset

    started = time.monotonic()
    cfg = cfg.resolved()
    assert cfg.devices is not None and cfg.max_versions is not None
    assert cfg.epochs is not None and cfg.lr is not None and cfg.batch_size is not None
    dataset = get_dataset(cfg.dataset)
    own_workdir = cfg.workdir is None
    workdir = (Path(tempfile.mkdtemp(prefix="fedbus-demo-")) if cfg.workdir is None
               else Path(cfg.workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    device_ids = default_device_ids(cfg.devices)
    speeds = _slowdowns(cfg, len(device_ids))
    agents = ChildGroup()
    broker = LocalBroker(workdir / "broker", device_ids=device_ids)
    try:
        data, eval_data, split = _prepare_data(cfg, workdir, device_ids)
        broker.start()
        log.info("broker listening on %s, TLS port %d (pid %d)", broker.host, broker.tls_port,
                 broker.pid)
        _start_agents(cfg, broker, data, speeds, workdir, agents)
        log.info("started %d agents (slowdowns %s)", len(agents), speeds)
        service = CoordinatorService(
            CoordinatorConfig(
                # TLS, as every agent (their --credentials name the TLS port and the CA)
                host=broker.host,
                port=broker.tls_port,
                tls_ca=broker.ca_file,
                username=broker.coordinator.username,
                # the key whose public half the agents' credentials file names
                signing_key=broker.signing_key_file,
                prefix=broker.prefix,
                task_id=f"demo-{cfg.dataset}-{cfg.seed}",
                min_devices=cfg.devices,
                arch=dataset.arch,
                model_args=dataset.model_args_json(),
                codec=cfg.codec,
                mode=cfg.mode,
                buffer_size=cfg.buffer_size,
                aggregator=cfg.aggregator,
                dp_noise=cfg.dp_noise,
                dp_clip=cfg.dp_clip,
                dp_epsilon_budget=cfg.dp_epsilon_budget,
                epochs=cfg.epochs,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                max_versions=cfg.max_versions,
                duration=cfg.duration,
                round_deadline=30.0,
                state_dir=workdir / "run",
                dashboard_port=cfg.dashboard_port,
            ),
            password=broker.coordinator.password,
            eval_data=eval_data,
            on_version=on_version,
        )
        # an agent that exits before the run has ended failed; after, it is meant to
        watchdog = Watchdog(
            lambda: None if service.core.ended is not None else agents.first_dead(),
            service.stop,
        )
        with watchdog:
            summary = service.run()
        if watchdog.failure:
            raise FedbusError(f"demo failed: {watchdog.failure}")
        _wait_for_agents(agents, _AGENT_STOP_SECONDS)
        report = write_report(
            cfg.report,
            summary,
            workdir / "run",
            extra={
                "devices": cfg.devices,
                "dataset": cfg.dataset,
                "arch": dataset.arch,
                "model_args": json.loads(dataset.model_args_json()),
                "epochs": cfg.epochs,
                "lr": cfg.lr,
                "batch_size": cfg.batch_size,
                "buffer_size": cfg.buffer_size,
                **split,
                "codec": cfg.codec,
                "speeds": speeds,
                "alpha": cfg.alpha,
                "total_seconds": round(time.monotonic() - started, 3),
                "agent_exit_codes": {
                    d: a.returncode for d, a in zip(device_ids, agents, strict=True)
                },
            },
        )
        return DemoResult(summary, report, Path(cfg.report))
    finally:
        agents.stop_all(_AGENT_STOP_SECONDS)
        broker.stop()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
