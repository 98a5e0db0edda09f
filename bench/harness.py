"""What every benchmark shares: child processes, the broker, the environment, statistics and
the fleet of real agents.

Nothing here changes fedbus: the harness drives the public pieces (``LocalBroker``,
``CoordinatorService``, the ``fedbus agent`` command) and, for timing, wraps the
coordinator core's ``on_update`` on one instance to note when each update was accepted.

Every child process the harness starts is a ``fedbus.processes.Child`` kept in a
``ChildGroup`` (the context's, or a fleet's) and stopped by its PID in a ``finally``; brokers
are stopped the same way, so nothing is left running when a benchmark fails or the harness
is interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbus.processes import Child, ChildGroup, Watchdog

__all__ = [
    "REPO",
    "BenchBroker",
    "BenchContext",
    "Fleet",
    "FleetPool",
    "accepted_recorder",
    "environment",
    "median",
    "percentile",
    "ratio",
    "summarize",
]

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench")

COORDINATOR = "coordinator"


class BenchError(RuntimeError):
    """A benchmark could not be measured (a child failed, a run timed out, ...)."""


# -- statistics ---------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    """Median of the finite values, None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(finite) if finite else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation, None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    value = numerator / denominator
    return value if math.isfinite(value) else None


def summarize(runs: Sequence[float | None], label: str, **extra: Any) -> dict[str, Any]:
    """``{"label", "runs", "median", ...}``: one side of a benchmark."""
    return {"label": label, "runs": list(runs), "median": median(runs), **extra}


# -- context ------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What a benchmark gets: sizes (quick or full), children, a scratch directory."""

    quick: bool
    runs: int | None  # --runs: timing pairs per benchmark (None: each benchmark's default)
    workdir: Path
    children: ChildGroup = field(default_factory=ChildGroup)
    broker_configs: dict[str, str] = field(default_factory=dict)
    fleets: FleetPool | None = None
    codecs: list[str] | None = None  # --codecs: the bytes benchmark's specs (None: discovered)

    def pairs(self, full: int, quick: int = 1) -> int:
        if self.runs is not None:
            return max(1, self.runs)
        return quick if self.quick else full

    def start(self, argv: Sequence[str], *, log_path: Path, name: str | None = None,
              env: dict[str, str] | None = None, group: ChildGroup | None = None) -> Child:
        """A child process in the repository's directory, its output appended to
        ``log_path``, kept in ``group`` (default: this context's ``children``)."""
        child = Child(argv, log_path=log_path, name=name, env=env, cwd=REPO, append=True)
        return (self.children if group is None else group).add(child)

    def spawn_role(self, role: str, args: dict[str, Any], *, log_path: Path,
                   env: dict[str, str] | None = None) -> Child:
        """``python -m bench.procs ROLE JSON`` (see ``bench.procs``), named ``role``."""
        return self.start([sys.executable, "-m", "bench.procs", role, json.dumps(args)],
                          log_path=log_path, name=role, env=env)

    def path(self, *parts: str) -> Path:
        p = self.workdir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def fleet_pool(self) -> FleetPool:
        if self.fleets is None:
            self.fleets = FleetPool(self)
        return self.fleets

    def close(self) -> None:
        try:
            if self.fleets is not None:
                self.fleets.close()
        finally:
            self.children.stop_all()


# -- broker -------------------------------------------------------------------------------


class BenchBroker:
    """A ``LocalBroker`` (the project's policy, a free port) with device accounts."""

    def __init__(self, ctx: BenchContext, name: str, devices: Sequence[str]) -> None:
        from fedbus.broker import LocalBroker

        self.ctx = ctx
        self.name = name
        self.devices = list(devices)
        self.local = LocalBroker(Path(tempfile.mkdtemp(prefix=f"bb-{name}-", dir=ctx.workdir)),
                                 device_ids=self.devices)

    def __enter__(self) -> BenchBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.local.start()
        self.ctx.broker_configs[self.name] = self.local.config_file.read_text()
        log.info("broker %s on %s:%d (pid %s)", self.name, self.host, self.port, self.local.pid)

    def stop(self) -> None:
        self.local.stop()

    @property
    def host(self) -> str:
        return self.local.host

    @property
    def port(self) -> int:
        return self.local.port

    @property
    def prefix(self) -> str:
        return self.local.prefix

    @property
    def credentials_file(self) -> Path:
        return self.local.credentials_file

    @property
    def coordinator_password(self) -> str:
        return self.local.coordinator.password

    def reset_coordinator_session(self, *, settle_devices: Sequence[str] = (),
                                  timeout: float = 20.0) -> dict[str, str]:
        """Connect as the coordinator with a clean start, then leave: this discards the
        durable session of the previous run and the messages queued for it.

        With ``settle_devices``, first wait (up to ``timeout``) until none of them reports
        ``training`` in its retained status for half a second, so that a new run starts
        with idle agents. Returns the last state of each device.
        """
        import msgpack
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        states: dict[str, str] = {}
        connected = threading.Event()
        topics = self.local.topics

        def on_connect(client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                if settle_devices:
                    client.subscribe(topics.all_status, qos=1)
                connected.set()

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                obj = msgpack.unpackb(msg.payload, raw=False)
                states[str(obj.get("device_id"))] = str(obj.get("state"))
            except Exception:
                pass

        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=COORDINATOR, protocol=mqtt.MQTTv5)
        client.username_pw_set(COORDINATOR, self.coordinator_password)
        client.on_connect = on_connect
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        client.connect(self.host, self.port, keepalive=30, clean_start=True, properties=props)
        client.loop_start()
        try:
            if not connected.wait(10):
                raise BenchError("could not connect as the coordinator to reset its session")
            if settle_devices:
                time.sleep(0.3)
                deadline = time.monotonic() + timeout
                quiet_since: float | None = None
                while time.monotonic() < deadline:
                    busy = [d for d in settle_devices if states.get(d) == "training"]
                    if busy:
                        quiet_since = None
                    elif quiet_since is None:
                        quiet_since = time.monotonic()
                    elif time.monotonic() - quiet_since >= 0.5:
                        break
                    time.sleep(0.05)
        finally:
            from bench.procs import close_client

            close_client(client)
        return dict(states)


# -- coordinator instrumentation ------------------------------------------------------------


def accepted_recorder(service: Any, clock: Callable[[], float] = time.time) -> list[tuple]:
    """Wrap ``service.core.on_update`` (this instance only) to note, for every accepted update,
    ``(update_id, device_id, clock() when the core returned, process CPU seconds)`` (the
    CPU seconds of the coordinator's ingest workers included).

    The core returns after validating and (when the buffer is full) aggregating the update;
    the time is taken right after that, before the shell publishes receipts or the model.
    """
    from coordinator.core import SendReceipt

    records: list[tuple] = []
    core = service.core
    original = core.on_update

    def on_update(device: str, payload: bytes, now: float, **kwargs: Any) -> list:
        actions = original(device, payload, now, **kwargs)
        done = clock()
        # with ingest workers, their CPU time too (each reports its own with every answer)
        cpu = time.process_time() + service.ingest_worker_cpu()
        for action in actions:
            if isinstance(action, SendReceipt) and action.receipt.accepted:
                records.append((action.receipt.update_id, device, done, cpu))
        return actions

    core.on_update = on_update
    return records


# -- environment -----------------------------------------------------------------------------


def _mosquitto_version() -> str:
    exe = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path=os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"]))
    if exe is None:
        return "not found"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment(broker_configs: dict[str, str]) -> dict[str, Any]:
    """Machine, versions and the broker configuration the harness used."""
    import msgpack
    import numpy
    import paho.mqtt
    import torch

    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    config = next(iter(broker_configs.values()), "")
    status = _git("status", "--short", "--untracked-files=no")
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_mib": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "paho_mqtt": paho.mqtt.__version__,
        "numpy": numpy.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "mosquitto": _mosquitto_version(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status),
        "broker_config": _redact(config),
    }


def _redact(config: str) -> str:
    """The broker config's directives (comments dropped), this run's temporary paths
    shortened (no secrets are in it)."""
    lines = []
    for line in config.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key in ("password_file", "acl_file", "persistence_location", "log_dest") and value:
            value = value.replace(str(Path(tempfile.gettempdir())), "$TMP")
        lines.append(f"{key} {value}".rstrip() if value else line)
    return "\n".join(lines)


# -- the fleet: real agents with simulated speeds ---------------------------------------------


@dataclass(frozen=True)
class FleetSpec:
    name: str
    speeds: tuple[float, ...]  # one slowdown factor per device
    # each agent's --compute-seconds: with it an update takes exactly speed x this long,
    # whatever the device's data size (0: the slowdown stretches the real training time)
    compute_seconds: float = 0.0
    alpha: float = 0.5  # Dirichlet label skew, as in the demo
    data_seed: int = 0


class Fleet:
    """A broker, one ``fedbus agent`` process per device with a fixed ``--slowdown``, and the
    digits split of the demo. Runs are coordinator tasks with fresh task ids; the agents
    follow each new task (model, codec and training settings come with it), so the cost of
    starting them (importing torch) is paid once per fleet, not once per run.
    """

    def __init__(self, ctx: BenchContext, spec: FleetSpec) -> None:
        from fedbus.broker import default_device_ids

        self.ctx = ctx
        self.spec = spec
        self.devices = default_device_ids(len(spec.speeds))
        self.broker = BenchBroker(ctx, f"fleet-{spec.name}", self.devices)
        self.agents = ChildGroup()  # one per device, in device order
        self.samples: dict[str, int] = {}
        self.eval_data: tuple[Any, Any] | None = None
        self._runs = 0
        self.started_at = 0.0

    def start(self) -> None:
        from fedbus.datasets import dirichlet_split, load_digits, train_test_split, write_npz

        x, y = load_digits()
        x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, self.spec.data_seed)
        parts = dirichlet_split(y_train, len(self.devices), self.spec.alpha, self.spec.data_seed)
        self.eval_data = (x_test, y_test)
        data_dir = self.ctx.path("fleets", self.spec.name, "data", "x").parent
        paths = {}
        for device, idx in zip(self.devices, parts, strict=True):
            path = data_dir / f"{device}.npz"
            write_npz(path, x_train[idx], y_train[idx])
            paths[device] = path
            self.samples[device] = len(idx)
        self.broker.start()
        self.started_at = time.monotonic()
        for device, speed in zip(self.devices, self.spec.speeds, strict=True):
            self.ctx.start(
                [sys.executable, "-m", "fedbus", "agent", "--device-id", device,
                 "--data", str(paths[device]), "--credentials", str(self.broker.credentials_file),
                 "--slowdown", repr(float(speed)), "--seed", "0",
                 "--compute-seconds", repr(float(self.spec.compute_seconds)),
                 "--state-dir", str(self.ctx.path("fleets", self.spec.name, "state", device))],
                log_path=self._log(device),
                name=f"agent {device}", group=self.agents,
            )
        log.info("fleet %s: %d agents, speeds %s x %g s, samples %s", self.spec.name,
                 len(self.devices), list(self.spec.speeds), self.spec.compute_seconds,
                 list(self.samples.values()))
        # Warm-up: one synchronous round makes every agent import and run its training
        # path once (the first optimizer costs seconds), so measured runs start warm.
        self.run(task_id="warmup", mode="fedavg", codec="int8", seed=0, max_versions=1,
                 duration=120.0)

    def check_alive(self) -> None:
        failure = self.agents.first_dead()
        if failure is not None:
            raise BenchError(failure)

    def run(self, *, task_id: str, mode: str, codec: str, seed: int, max_versions: int = 0,
            target_accuracy: float = 0.0, duration: float = 120.0, buffer_size: int = 4,
            epochs: int = 2, lr: float = 0.05, batch_size: int = 16,
            **config: Any) -> dict[str, Any]:
        """One coordinator task against the running agents; the coordinator runs in this
        process (as in ``fedbus demo``) with the held-out digits as evaluation data.
        ``config``: further ``CoordinatorConfig`` fields (e.g. ``staleness``)."""
        from coordinator.config import CoordinatorConfig
        from coordinator.service import CoordinatorService

        self.check_alive()
        self.broker.reset_coordinator_session(settle_devices=self.devices)
        self._runs += 1
        service = CoordinatorService(
            CoordinatorConfig(
                host=self.broker.host, port=self.broker.port, username=COORDINATOR,
                prefix=self.broker.prefix, task_id=f"{task_id}-{self._runs}", codec=codec,
                mode=mode, buffer_size=buffer_size, epochs=epochs, lr=lr,
                batch_size=batch_size, seed=seed, max_versions=max_versions,
                duration=duration, target_accuracy=target_accuracy, round_deadline=30.0,
                min_devices=len(self.devices),
                state_dir=self.ctx.path("fleets", self.spec.name, "runs", str(self._runs)),
                signing_key=self.broker.local.signing_key_file,
                **config,
            ),
            password=self.broker.coordinator_password,
            eval_data=self.eval_data,
        )
        records = accepted_recorder(service, clock=time.monotonic)
        watchdog = Watchdog(self.agents.first_dead, service.stop)
        marks = {d: _size(self._log(d)) for d in self.devices}
        t0 = time.monotonic()
        with watchdog:
            summary = service.run()
        if watchdog.failure:
            raise BenchError(watchdog.failure)
        record = _run_record(summary, records, t0, self.devices)
        record["training_seconds"] = {d: training_seconds(_tail(self._log(d), marks[d]))
                                      for d in self.devices}
        return record

    def _log(self, device: str) -> Path:
        return self.ctx.path("fleets", self.spec.name, "logs", f"{device}.log")

    def close(self) -> None:
        try:
            self.agents.stop_all()
        finally:
            self.broker.stop()


# an agent's log line for each update it sent: "... trained on v12: ... in 0.53s; sent ..."
_TRAINED = re.compile(r"trained on v\d+: .* in (\d+(?:\.\d+)?)s; sent")


def training_seconds(log_text: str) -> list[float]:
    """The training time of each update an agent's log says it sent, in order."""
    return [float(m.group(1)) for m in _TRAINED.finditer(log_text)]


def overruns(training: Sequence[float], period: float) -> int:
    """Updates whose training alone took longer than the device's simulated ``period``
    (speed x compute seconds): that device was slower than its profile says."""
    return sum(t > period for t in training)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, offset: int) -> str:
    """What was written to ``path`` after ``offset`` bytes."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _run_record(summary: Any, records: list[tuple], t0: float,
                devices: Sequence[str]) -> dict[str, Any]:
    history = [
        {"version": r.version, "seconds": r.seconds, "accuracy": r.accuracy}
        for r in summary.history
    ]
    counters = summary.counters
    accepted = counters.get("updates_accepted", 0)
    per_device: dict[str, list[float]] = {d: [] for d in devices}
    for _uid, device, when, _cpu in records:
        per_device.setdefault(device, []).append(round(when - t0, 4))
    return {
        "task_id": summary.task_id,
        "mode": summary.mode,
        "stop_reason": summary.stop_reason,
        "first_update_seconds": summary.first_update_seconds,
        "wall_seconds": round(summary.wall_seconds, 3),
        "stopped_seconds": summary.stopped_seconds,
        "final_version": summary.final_version,
        "final_accuracy": summary.final_accuracy,
        "updates_accepted": accepted,
        "updates_rejected": counters.get("updates_rejected", 0),
        "rejected": {k[len("rejected_"):]: v for k, v in counters.items()
                     if k.startswith("rejected_") and v},
        "bytes_per_update": (counters.get("bytes_accepted", 0) / accepted) if accepted else None,
        "bytes_model_published": counters.get("bytes_model_published", 0),
        "bytes_model_delta_published": counters.get("bytes_model_delta_published", 0),
        "history": history,
        "accepted_at": per_device,
    }


class FleetPool:
    """Fleets by speed profile, started on first use and kept for later benchmarks."""

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self._fleets: dict[tuple, Fleet] = {}
        self._current: Fleet | None = None

    def get(self, name: str, speeds: Sequence[float], compute_seconds: float = 0.0) -> Fleet:
        key = (tuple(float(s) for s in speeds), float(compute_seconds))
        fleet = self._fleets.get(key)
        if fleet is None:
            # One fleet at a time: a second set of agents would steal the CPU of the first.
            for other in self._fleets.values():
                other.close()
            self._fleets.clear()
            fleet = Fleet(self.ctx, FleetSpec(name, key[0], compute_seconds=key[1]))
            self._fleets[key] = fleet
            fleet.start()
        return fleet

    def close(self) -> None:
        fleets, self._fleets = list(self._fleets.values()), {}
        for fleet in fleets:
            fleet.close()
