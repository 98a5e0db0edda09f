"""The coordinator process: the thin shell around ``CoordinatorCore``.

It publishes the task and the retained global model, feeds every received update and
status message to the pure core, carries out the core's actions (receipts, new model
versions), evaluates each version on the held-out set and decides when to stop.

Two threads share the work. The MQTT network thread handles each message as it arrives:
the core judges it and the receipt (and, when a version is made, the new model) is
published before paho acknowledges the message to the broker, so an update is
acknowledged only once it is in the buffer. Handing every message to another thread cost
more than judging it (measured in BENCHMARKS.md, ingest). The calling thread records
versions (evaluation, checkpoint, ``on_version``), applies the core's clock (``tick``)
and decides when to stop; it never holds the lock around the core while it evaluates.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.core import CoordinatorCore, NewModel, SendReceipt
from coordinator.evaluation import Evaluator
from fedbus.envelope import pack
from fedbus.errors import FedbusError
from fedbus.messages import ModelSpec, Task, TrainSpec
from fedbus.topics import Topics
from fedbus.transport import ConnectionSettings, Message, MqttClient

__all__ = ["CoordinatorService", "RunSummary", "VersionRecord", "build_task"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionRecord:
    """One global model version as the coordinator saw it."""

    version: int
    seconds: float  # since the coordinator started
    accuracy: float | None
    loss: float | None
    updates_accepted: int


@dataclass
class RunSummary:
    task_id: str
    mode: str
    final_version: int
    final_accuracy: float | None
    wall_seconds: float
    counters: dict[str, int]
    history: list[VersionRecord] = field(default_factory=list)
    stop_reason: str = ""
    first_update_seconds: float | None = None  # when the first update arrived


def build_task(
    config: CoordinatorConfig, eval_x: np.ndarray | None, eval_y: np.ndarray | None
) -> Task:
    """The task description from the configuration (mlp sizes inferred from eval data)."""
    args = config.parsed_model_args()
    if config.arch == "mlp" and eval_x is not None and eval_y is not None:
        args.setdefault("in_features", int(np.prod(eval_x.shape[1:])))
        args.setdefault("num_classes", int(eval_y.max()) + 1)
    return Task(
        task_id=config.task_id,
        model=ModelSpec(config.arch, args),
        train=TrainSpec(
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            qat=config.qat,
        ),
        codec=config.codec,
        max_update_bytes=config.max_update_bytes,
        created_at=time.time(),
    )


@dataclass(frozen=True)
class _Made:
    """A version as the network thread made it (the arrays are read-only, never mutated)."""

    version: int
    state: dict[str, np.ndarray]
    updates_accepted: int
    seconds: float  # since the coordinator started


class CoordinatorService:
    """Runs one task to its stopping condition. ``stop()`` may be called from any thread."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        password: str,
        eval_data: tuple[np.ndarray, np.ndarray] | None = None,
        on_version: Callable[[VersionRecord], None] | None = None,
    ) -> None:
        import torch

        from fedbus.zoo import build_model, get_state

        self.config = config
        self.topics = Topics(config.prefix)
        self.on_version = on_version
        eval_x, eval_y = eval_data if eval_data is not None else (None, None)
        self.task = build_task(config, eval_x, eval_y)
        torch.manual_seed(config.seed)
        try:
            model = build_model(self.task.model.arch, self.task.model.args)
        except (ValueError, TypeError) as exc:
            raise FedbusError(f"cannot build model {self.task.model.arch!r}: {exc}") from None
        self.core = CoordinatorCore(
            self.task,
            get_state(model),
            config.aggregation(),
            model_codec=config.model_codec,
        )
        self._check_model_fits(config.max_message_bytes)
        self.bytes_model_published = 0  # every model payload sent, re-publishes included
        self.evaluator = None
        if eval_x is not None and eval_y is not None:
            self.evaluator = Evaluator(self.task, eval_x, eval_y)
        self.history: list[VersionRecord] = []
        # the core is used by both threads; the lock is held only while it judges a message,
        # ticks or is read, and while the resulting publishes are queued
        self._lock = threading.Lock()
        self._closed = False  # set under the lock: later messages are not judged
        # versions made on the network thread, for the calling thread to record
        self._made: queue.SimpleQueue[_Made] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._republish = threading.Event()
        self._task_published = False  # min_devices: nothing is published before that
        self._waiting_logged = 0.0
        self._started = time.monotonic()
        self._first_update: float | None = None
        self.client = MqttClient(
            ConnectionSettings(
                host=config.host,
                port=config.port,
                client_id=config.username,
                username=config.username,
                password=password,
            ),
            on_message=self._on_message,
            on_connect=lambda _present: self._republish.set(),
        )

    def stop(self) -> None:
        self._stop.set()

    def _check_model_fits(self, limit: int) -> None:
        """Refuse to start with a model the broker would not carry (it would disconnect us
        on every attempt to publish it)."""
        size = len(pack(self.core.model_message(time.time()).to_wire()))
        headroom = 1024  # topic name, properties and fixed header of the PUBLISH packet
        if size + headroom > limit:
            raise FedbusError(
                f"the {self.task.model.arch} model message takes {size:,} bytes, more than the "
                f"broker's packet limit of {limit:,} allows; fedbus cannot split messages "
                "yet: use a smaller model, or --model-codec fp16+zstd"
            )

    def counters(self) -> dict[str, int]:
        """The core's counters plus ``bytes_model_published`` (this shell's publishes)."""
        with self._lock:
            return {**self.core.counters, "bytes_model_published": self.bytes_model_published}

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> RunSummary:
        self.client.subscribe(self.topics.all_updates, qos=1)
        self.client.subscribe(self.topics.all_status, qos=1)
        self._started = time.monotonic()
        self._record(_Made(self.core.version, self.core.state, 0, 0.0))
        self.client.start()
        log.info(
            "coordinator: task %s (%s %s), mode %s, codec %s, model codec %s; broker %s:%d",
            self.task.task_id, self.task.model.arch, self.task.model.args,
            self.config.mode, self.task.codec, self.config.model_codec,
            self.config.host, self.config.port,
        )
        stop_reason = "stopped"
        try:
            while True:
                if self.client.fatal_error:
                    raise FedbusError(self.client.fatal_error)
                if self._republish.is_set() and self._enough_devices():
                    self._republish.clear()
                    with self._lock:
                        self._publish_task_and_model()
                    self._task_published = True
                self._record_made(timeout=0.2)
                with self._lock:
                    self._carry_out(self.core.tick(time.time()))
                stop_reason = self._should_stop()
                if stop_reason:
                    break
        finally:
            with self._lock:
                self._closed = True
            self.client.stop()
        self._record_made(timeout=0)  # versions made before the network thread stopped
        log.info("coordinator stopping: %s", stop_reason)
        last = self.history[-1]
        return RunSummary(
            task_id=self.task.task_id,
            mode=self.config.mode,
            final_version=self.core.version,
            final_accuracy=last.accuracy,
            wall_seconds=time.monotonic() - self._started,
            counters=self.counters(),
            history=list(self.history),
            stop_reason=stop_reason,
            first_update_seconds=self._first_update,
        )

    # -- network thread ------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        with self._lock:
            if not self._closed:
                self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        """Judge one message and carry out the core's actions (the caller holds the lock)."""
        device = self.topics.device_of(msg.topic)
        if device is None:
            return
        now = time.time()
        if msg.topic == self.topics.update(device):
            if self._first_update is None:
                self._first_update = round(time.monotonic() - self._started, 3)
            self._carry_out(self.core.on_update(device, msg.payload, now))
        elif msg.topic == self.topics.status(device):
            self._carry_out(self.core.on_status(device, msg.payload, now))
        if self._reached_max_versions():
            self._closed = True  # e.g. max_versions reached: judge nothing more

    def _carry_out(self, actions: list) -> None:
        """Publish receipts and new versions (the caller holds the lock)."""
        for action in actions:
            if isinstance(action, SendReceipt):
                self.client.publish(
                    self.topics.receipt(action.device_id), pack(action.receipt.to_wire()), qos=1
                )
            elif isinstance(action, NewModel):
                self._publish_model()
                self._made.put(
                    _Made(
                        self.core.version,
                        self.core.state,
                        self.core.counters["updates_accepted"],
                        time.monotonic() - self._started,
                    )
                )

    def _reached_max_versions(self) -> bool:
        return bool(self.config.max_versions) and self.core.version >= self.config.max_versions

    # -- calling thread ------------------------------------------------------------------

    def _enough_devices(self) -> bool:
        """True once ``min_devices`` devices are online (always, after the first publish:
        a reconnect republishes whoever is online)."""
        need = self.config.min_devices
        if self._task_published or need == 0:
            return True
        with self._lock:
            online = len(self.core.online_devices())
        if online >= need:
            log.info("%d of %d devices online: publishing the task", online, need)
            return True
        now = time.monotonic()
        if now - self._waiting_logged >= 10.0:
            self._waiting_logged = now
            log.info("waiting for devices: %d of %d online", online, need)
        return False

    def _record_made(self, timeout: float) -> None:
        """Record the versions made since the last call, waiting up to ``timeout`` seconds
        for the first. When several are waiting, only the newest is evaluated: evaluation
        must not fall ever further behind a fast stream of versions."""
        try:
            made = [self._made.get(timeout=timeout) if timeout > 0 else self._made.get_nowait()]
        except queue.Empty:
            return
        while True:
            try:
                made.append(self._made.get_nowait())
            except queue.Empty:
                break
        for i, item in enumerate(made):
            self._record(item, evaluate=i == len(made) - 1)

    def _should_stop(self) -> str:
        cfg = self.config
        if self._stop.is_set():
            return "stop requested"
        if self._reached_max_versions():
            return f"reached {cfg.max_versions} model versions"
        if cfg.duration and time.monotonic() - self._started >= cfg.duration:
            return f"ran for {cfg.duration:g} s"
        last = self.history[-1] if self.history else None
        reached = last is not None and last.accuracy is not None and (
            last.accuracy >= cfg.target_accuracy
        )
        if cfg.target_accuracy and reached:
            return f"reached accuracy {last.accuracy:.3f}"  # type: ignore[union-attr]
        return ""

    # -- publishing, evaluation, checkpoints ---------------------------------------------

    def _publish_task_and_model(self) -> None:
        self.client.publish(self.topics.task, pack(self.task.to_wire()), qos=1, retain=True)
        self._publish_model()

    def _publish_model(self) -> None:
        payload = pack(self.core.model_message(time.time()).to_wire())
        self.client.publish(self.topics.model, payload, qos=1, retain=True)
        self.bytes_model_published += len(payload)

    def _record(self, made: _Made, *, evaluate: bool = True) -> None:
        accuracy = loss = None
        if self.evaluator is not None and evaluate:
            loss, accuracy = self.evaluator.evaluate(made.state)
        record = VersionRecord(
            version=made.version,
            seconds=round(made.seconds, 3),
            accuracy=accuracy,
            loss=loss,
            updates_accepted=made.updates_accepted,
        )
        self.history.append(record)
        if accuracy is not None:
            log.info(
                "model v%d: held-out accuracy %.4f, loss %.4f (%d updates accepted)",
                record.version, accuracy, loss, record.updates_accepted,
            )
        else:
            log.info("model v%d (%d updates accepted)", record.version, record.updates_accepted)
        if self.config.out is not None:
            self._checkpoint(made)
        if self.on_version is not None:
            self.on_version(record)

    def _checkpoint(self, made: _Made) -> None:
        out = Path(self.config.out)  # type: ignore[arg-type]
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, __version__=np.array(made.version), **made.state)
        os.replace(tmp, out / "model.npz")
        history = {
            "task": self.task.to_wire(),
            "counters": self.counters(),
            "history": [asdict(r) for r in self.history],
        }
        tmp = out / "history.json.tmp"
        tmp.write_text(json.dumps(history, indent=1))
        os.replace(tmp, out / "history.json")
