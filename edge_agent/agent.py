"""The edge agent: waits for a task and a model, trains locally, publishes its delta.

Threads: paho's network thread only stores the newest task and model bytes and wakes the
agent (so a long training never starves the keepalive and memory holds one model, however
many arrive); the calling thread decodes, trains and publishes.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.residual import ResidualStore, encode_with_feedback
from fedbus.codec_spec import parse_codec
from fedbus.envelope import DecodeLimits, pack, unpack
from fedbus.errors import FedbusError, ProtocolError
from fedbus.messages import GlobalModel, Receipt, Status, Task, Update, new_update_id
from fedbus.topics import Topics
from fedbus.transport import ConnectionSettings, Message, MqttClient, PublishResult, Will
from fedbus.update_codec import decode_update_delta, encode_update_delta

__all__ = ["Agent", "AgentStats", "LocalData", "pacing_delay"]

log = logging.getLogger(__name__)

_SMALL = DecodeLimits(max_bytes=64 * 1024, max_bin_len=1024)


@dataclass(frozen=True)
class LocalData:
    x: np.ndarray
    y: np.ndarray


@dataclass
class AgentStats:
    updates_published: int = 0
    updates_acknowledged: int = 0
    updates_refused: int = 0
    receipts_accepted: int = 0
    receipts_rejected: int = 0
    bytes_uploaded: int = 0
    last_version: int | None = None
    train_seconds: float = 0.0
    rejections: dict[str, int] = field(default_factory=dict)


def pacing_delay(elapsed: float, slowdown: float, compute_seconds: float) -> float:
    """Seconds to wait after a training that took ``elapsed`` seconds, so that a simulated
    device behaves ``slowdown`` times slower.

    With ``compute_seconds`` 0 the training time itself is stretched (``slowdown x
    elapsed`` in all), so a device with more data is also slower. Otherwise every update
    takes ``slowdown x compute_seconds`` in all, whatever the data size; a training that
    took longer than that is not waited for (0).
    """
    if compute_seconds > 0:
        return max(0.0, slowdown * compute_seconds - elapsed)
    return (slowdown - 1.0) * elapsed


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _task_key(task: Task) -> tuple[str, float]:
    return (task.task_id, task.created_at)


class Agent:
    """One device's agent. ``run()`` blocks until stopped or ``max_updates`` is reached."""

    def __init__(self, config: AgentConfig, data: LocalData, *, password: str) -> None:
        self.config = config
        self.data = data
        self.topics = Topics(config.prefix)
        self.stats = AgentStats()
        self._stop = threading.Event()
        self._pacing_warned = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._task_bytes: bytes | None = None
        self._model_bytes: bytes | None = None
        self._task: Task | None = None
        self._model = None  # torch module for the current task
        self._x: np.ndarray = data.x  # local inputs shaped for the current task's model
        self._unusable: tuple[str, float] | None = None  # a task this device cannot train
        self._training = False
        self._unacked: list[tuple[PublishResult, str]] = []
        self._residuals: ResidualStore | None = None  # created for the first top-k task
        device = config.device_id
        self.client = MqttClient(
            ConnectionSettings(
                host=config.host,
                port=config.port,
                client_id=device,
                username=device,
                password=password,
                keepalive=config.keepalive,
            ),
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=Will(self.topics.status(device), self._status("offline")),
        )

    # -- network thread ------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if msg.topic == self.topics.task:
            with self._lock:
                self._task_bytes = msg.payload
            self._wake.set()
        elif msg.topic == self.topics.model:
            with self._lock:
                self._model_bytes = msg.payload
            self._wake.set()
        elif msg.topic == self.topics.receipt(self.config.device_id):
            self._on_receipt(msg.payload)

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = Receipt.from_wire(unpack(payload, "receipt", _SMALL))
        except ProtocolError as exc:
            log.warning("ignoring malformed receipt: %s", exc)
            return
        if receipt.accepted:
            self.stats.receipts_accepted += 1
            log.info(
                "update %s accepted (staleness %s, global version now %d)",
                receipt.update_id[:8], receipt.staleness, receipt.model_version,
            )
        else:
            self.stats.receipts_rejected += 1
            reason = receipt.reason or "unknown"
            self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
            log.warning(
                "update %s rejected: %s (%s)", receipt.update_id[:8], reason, receipt.detail
            )

    def _on_connect(self, session_present: bool) -> None:
        state = "training" if self._training else "online"
        self.client.publish(
            self.topics.status(self.config.device_id), self._status(state), retain=True
        )

    # -- agent thread --------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        return pack(
            Status(self.config.device_id, state, self.stats.last_version, time.time()).to_wire()
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self, *, on_update: Callable[[AgentStats], None] | None = None) -> AgentStats:
        import torch

        torch.set_num_threads(self.config.threads)
        device = self.config.device_id
        for topic in (self.topics.task, self.topics.model, self.topics.receipt(device)):
            self.client.subscribe(topic, qos=1)
        self.client.start()
        log.info(
            "agent %s: %d local samples, connecting to %s:%d",
            device, len(self.data.y), self.config.host, self.config.port,
        )
        from edge_agent.train import warm_up

        log.debug("torch warm-up took %.2f s", warm_up())
        try:
            while not self._stop.is_set():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                self._reap_acks()
                if self.client.fatal_error:
                    raise FedbusError(self.client.fatal_error)
                work = self._next_work()
                if work is None:
                    continue
                task, model_msg = work
                self._train_and_publish(task, model_msg)
                if on_update is not None:
                    on_update(self.stats)
                if self.config.max_updates and (
                    self.stats.updates_published >= self.config.max_updates
                ):
                    log.info("published %d updates; stopping", self.stats.updates_published)
                    break
        finally:
            self._shutdown()
        return self.stats

    def _next_work(self) -> tuple[Task, GlobalModel] | None:
        with self._lock:
            task_bytes, model_bytes = self._task_bytes, self._model_bytes
        if task_bytes is None or model_bytes is None:
            return None
        try:
            task = Task.from_wire(unpack(task_bytes, "task", _SMALL))
            limits = DecodeLimits(
                max_bytes=self.config.max_model_bytes, max_bin_len=self.config.max_model_bytes
            )
            model_msg = GlobalModel.from_wire(unpack(model_bytes, "model", limits))
        except ProtocolError as exc:
            log.warning("ignoring malformed task or model: %s", exc)
            with self._lock:  # do not retry the same bad bytes
                if self._model_bytes is model_bytes:
                    self._model_bytes = None
            return None
        if model_msg.task_id != task.task_id:
            return None  # the model for a new task has not arrived yet
        if self._unusable == _task_key(task):
            return None  # this device cannot take part; wait for another task
        last = self.stats.last_version
        same_task = self._task is not None and _task_key(task) == _task_key(self._task)
        if same_task and last is not None and model_msg.version <= last:
            return None
        return task, model_msg

    def _prepare(self, task: Task) -> bool:
        """Build ``task``'s model and fit the local data to its input; False (logged once)
        when this device cannot take part, e.g. an unknown architecture or data of another
        shape. A restarted coordinator publishes its task anew (new ``created_at``), which
        counts as a new task: versions start again from its model."""
        from fedbus.zoo import build_model, fit_inputs, input_shape

        if self._task is not None and _task_key(self._task) == _task_key(task):
            return True
        try:
            model = build_model(task.model.arch, task.model.args)
            x = fit_inputs(self.data.x, input_shape(task.model.arch, task.model.args))
        except (ValueError, TypeError) as exc:
            self._give_up_on(task, str(exc))
            return False
        log.info("new task %s: %s %s", task.task_id, task.model.arch, task.model.args)
        self._model, self._x, self._task = model, x, task
        self.stats.last_version = None
        return True

    def _give_up_on(self, task: Task, why: str) -> None:
        self._unusable = _task_key(task)
        self._task = self._model = None
        log.error("cannot take part in task %s: %s; waiting for a new task", task.task_id, why)

    def _train_and_publish(self, task: Task, model_msg: GlobalModel) -> None:
        from edge_agent.train import train_local
        from fedbus.zoo import get_state, set_state, state_shapes

        if not self._prepare(task):
            return
        model, x = self._model, self._x
        shapes = state_shapes(model)
        try:
            # a zstd model decompresses to at most the largest encoding of these shapes
            base = decode_update_delta(
                model_msg.tensors, model_msg.compression, expected_shapes=shapes
            )
            set_state(model, base)
        except (ProtocolError, ValueError) as exc:
            log.error(
                "global model v%d does not fit task %s: %s",
                model_msg.version, task.task_id, exc,
            )
            self.stats.last_version = model_msg.version
            return
        device = self.config.device_id
        self._training = True
        self.client.publish(self.topics.status(device), self._status("training"), retain=True)
        seed = (self.config.seed * 1_000_003 + zlib.crc32(device.encode()) + model_msg.version)
        started = time.monotonic()
        try:
            result = train_local(
                model, x, self.data.y, task.train, seed=seed % (2**31),
                should_stop=self._stop.is_set,
            )
        except FloatingPointError as exc:
            log.error("local training on v%d diverged (%s); skipping it", model_msg.version, exc)
            self._training = False
            self.stats.last_version = model_msg.version
            return
        except ValueError as exc:  # e.g. local labels the task's model cannot output
            self._training = False
            self._give_up_on(task, str(exc))
            return
        elapsed = time.monotonic() - started
        delay = pacing_delay(elapsed, self.config.slowdown, self.config.compute_seconds)
        if self.config.compute_seconds and delay == 0 and not self._pacing_warned:
            self._pacing_warned = True
            log.warning(
                "training took %.2f s, more than the simulated %.2f s per update "
                "(--compute-seconds x --slowdown); updates go out as soon as they are ready",
                elapsed, self.config.compute_seconds * self.config.slowdown,
            )
        if delay > 0:
            self._stop.wait(delay)
        self.stats.train_seconds += time.monotonic() - started
        self._training = False
        if result.stopped or self._stop.is_set():
            return  # a partial update is never sent
        new_state = get_state(model)
        delta = {name: new_state[name] - base[name] for name in base}
        rng = np.random.default_rng(seed)
        spec = parse_codec(task.codec)  # the task parsed it already: cannot fail here
        residual: dict[str, np.ndarray] | None = None
        if spec.is_topk:  # error feedback: what top-k left out last time goes in now
            if self._residuals is None:
                self._residuals = ResidualStore(self.config.state_path())
            previous = self._residuals.load(task.task_id, task.created_at, shapes)
            wire, compression, residual = encode_with_feedback(delta, previous, spec, rng=rng)
        else:
            wire, compression = encode_update_delta(delta, spec, rng=rng)
        update = Update(
            update_id=new_update_id(),
            device_id=device,
            task_id=task.task_id,
            base_version=model_msg.version,
            num_samples=result.num_samples,
            delta=wire,
            metrics=self._metrics(result, elapsed, task, model, x),
            sent_at=time.time(),
            compression=compression,
        )
        payload = update.pack()  # compact: metric values as float32
        if len(payload) > task.max_update_bytes:
            log.error(
                "update of %d bytes exceeds the task's limit of %d; not sent",
                len(payload), task.max_update_bytes,
            )
            self.stats.last_version = model_msg.version
            return
        outcome = self.client.publish(self.topics.update(device), payload, qos=1)
        if residual is not None and self._residuals is not None:
            if outcome.done and not outcome.ok:  # refused before it left: nothing was sent
                log.warning("update not queued (%s); keeping the previous residual",
                            outcome.reason)
            else:
                self._residuals.save(task.task_id, task.created_at, residual)
        self.stats.updates_published += 1
        self.stats.bytes_uploaded += len(payload)
        self.stats.last_version = model_msg.version
        log.info(
            "trained on v%d: %d samples, loss %.3f, acc %.3f (int8 %s) in %.2fs; sent %d bytes",
            model_msg.version, result.num_samples, result.loss, result.accuracy,
            _fmt(update.metrics.get("acc_int8")), elapsed, len(payload),
        )
        self.client.publish(self.topics.status(device), self._status("idle"), retain=True)
        self._unacked.append((outcome, update.update_id))

    def _metrics(self, result, elapsed: float, task: Task, model, x: np.ndarray) -> dict:
        """Training metrics for the update: ``loss`` and ``acc`` of the last epoch, ``sec`` of
        training, and ``acc_int8``, the int8 model's local accuracy, when the task trains
        quantization-aware (the int8 model is also saved with --export). Short names: they
        travel in every update."""
        metrics = {"loss": result.loss, "acc": result.accuracy, "sec": elapsed}
        if not task.train.qat:
            return metrics
        from fedbus.export import export_int8, int8_accuracy

        try:
            int8 = export_int8(model, arch=task.model.arch, model_args=task.model.args)
            metrics["acc_int8"] = int8_accuracy(int8, x, self.data.y)
            if self.config.export is not None:
                int8.save(self.config.export)
        except (ValueError, OSError) as exc:
            log.warning("int8 export failed: %s", exc)
        return metrics

    def _reap_acks(self) -> None:
        """Count PUBACKs that have arrived; a refused publish is logged with its reason."""
        waiting = []
        for outcome, update_id in self._unacked:
            if not outcome.done:
                waiting.append((outcome, update_id))
            elif outcome.ok:
                self.stats.updates_acknowledged += 1
            else:
                self.stats.updates_refused += 1
                log.error("broker refused update %s: %s", update_id[:8], outcome.reason)
        self._unacked = waiting

    def _shutdown(self) -> None:
        device = self.config.device_id
        try:
            deadline = time.monotonic() + 5.0
            while self._unacked and time.monotonic() < deadline and self.client.connected:
                self._unacked[0][0].wait(timeout=0.1)
                self._reap_acks()
            if self.client.connected:
                self.client.publish(
                    self.topics.status(device), self._status("offline"), retain=True
                ).wait(timeout=2.0)
        finally:
            self.client.stop()
