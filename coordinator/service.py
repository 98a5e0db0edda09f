"""The coordinator process: the thin shell around ``CoordinatorCore``.

It keeps its run in a state directory (``coordinator.store``), publishes the task and the
retained global model, feeds every received update and status message to the pure core,
writes what the core decided to the store, then carries out the core's actions (receipts,
new model versions), evaluates each version on the held-out set and decides when to stop.

Durability: the core's journal is committed in one transaction inside the MQTT callback,
before any receipt or model is published and before paho acknowledges the message to the
broker (paho sends the PUBACK when the callback returns). So an "accepted" receipt is only
ever sent for an update that survives a crash, and an update whose PUBACK was not sent is
delivered again by the broker and answered from the store (the same verdict, never applied
twice). If the store cannot be written, the connection is aborted without acknowledging
the message and the service stops with an error.

A restart on the same state directory resumes the run: the same run id, version, model
bytes and buffer. A state directory holding another task, or a run that has ended, is
refused; ``new_run=True`` moves the old run aside and starts a new one.

Fairness: because messages are judged one at a time in arrival order, each device has a
budget of the network thread's CPU time (``coordinator.admission``, ``--device-share``); a
device that has used it up has its updates refused before they are decoded, with a
``rate_limited`` receipt that says when to send again (docs/protocol.md 10.3). Nothing of a
refused update is stored, and it is acknowledged at once.

Two threads share the work. The transport's network thread handles each message as it
arrives (judging a message on another thread cost more than judging it: BENCHMARKS.md,
ingest). The calling thread records versions (evaluation, history, model export,
``on_version``), applies the core's clock (``tick``) and decides when to stop; it never
holds the lock around the core while it evaluates.

With ingest workers (``--ingest-workers N``, ``coordinator.ingest_workers``) the network
thread only numbers each message and hands an update's payload to a worker process that
decodes and checks its delta; a reducer thread judges the messages in arrival order with the
workers' outcomes, commits up to 32 updates per transaction, carries out their actions and
only then sends their PUBACKs (manual acknowledgement), so the durability above holds.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.admission import Admission
from coordinator.aggregator_spec import sparse_codec_warning
from coordinator.chunk_intake import ChunkIntake, Completed, chunk_limits
from coordinator.chunk_store import CHUNKS_FILE, ChunkStore
from coordinator.config import CoordinatorConfig
from coordinator.control import ControlDecision, Malformed, judge_control, run_state
from coordinator.core import Action, CoordinatorCore, NewModel, SendInvite, SendReceipt
from coordinator.dashboard import DashboardFeed, DashboardServer, fleet_rows, serve_dashboard
from coordinator.evaluation import Evaluator
from coordinator.fleet import FleetStats, fleet_snapshot, fleet_snapshot_payload
from coordinator.ingest_workers import IngestPool, InOrder, WorkerSettings, pipeline_depth
from coordinator.limits import default_max_update_bytes, model_size_bound, receive_packet_limit
from coordinator.privacy import epsilon_spent, new_noise_secret, privacy_summary
from coordinator.stall import StallDetector
from coordinator.store import (
    BEST_MODEL_FILE,
    DB_FILE,
    TASK_FILE,
    HistoryRow,
    StateLock,
    Store,
    archive_run,
)
from coordinator.target_hold import Evaluated, TargetWatch
from coordinator.validation import DeltaChecked
from fedbus.chunks import chunk_data_size, is_chunk, peek_chunk_id, split
from fedbus.envelope import DecodeLimits, pack
from fedbus.errors import ConfigError, FedbusError, MessageTooLarge, StateError
from fedbus.messages import (
    GlobalModel,
    Invite,
    ModelDelta,
    ModelSpec,
    Receipt,
    Task,
    TrainSpec,
    new_run_id,
    peek_update_id,
)
from fedbus.model_delta import encode_model_delta, model_digest
from fedbus.preprocess import InputNorm, compute_input_norm, load_input_norm, parse_classes
from fedbus.signing import (
    DeviceKeyFile,
    SignatureError,
    ensure_private_key,
    key_text,
    load_private_key,
    sign_message,
    update_signature_problem,
    verify_message,
)
from fedbus.topics import Topics
from fedbus.transport import (
    ConnectionSettings,
    Message,
    MqttClient,
    PublishResult,
    Transport,
    TransportFactory,
    connect_timeout_error,
    publish_packet_size,
)

if TYPE_CHECKING:  # imported when a service is made: prometheus_client is a server extra,
    # and the CLI loads this module for `fedbus agent` too (through `fedbus demo`)
    from coordinator.metrics import CoordinatorMetrics, MetricsServer, SentKind

__all__ = [
    "TASK_FILE",
    "CoordinatorService",
    "RunSummary",
    "VersionRecord",
    "build_task",
    "load_signing_key",
    "task_classes",
    "task_input_norm",
]

log = logging.getLogger(__name__)

# stop reasons that end the run (a stop requested by a signal only stops this process)
_STOP_REQUESTED = "stop requested"
_FINAL_PUBLISH_WAIT = 5.0  # seconds to wait for the broker to take the last messages
_SIGNING_KEY_FILE = "signing.key"  # in the state directory; its public key in signing.pub
# after someone else wrote the task or model topic, publish ours again at most this often
# (two coordinators on one prefix would otherwise answer each other without end)
_RESTORE_INTERVAL = 5.0
_FLEET_INTERVAL = 2.0  # the fleet snapshot is published at most this often, when it changed
_FLOOD_LOG_INTERVAL = 60.0  # seconds between warnings about a device still over its share
_CHECKPOINT_INTERVAL = 1.0  # seconds between copies of the store's log into its file
# --ingest-workers: at most this many updates judged before one commit (group commit)
_GROUP_COMMIT = 32


@dataclass(frozen=True)
class VersionRecord:
    """One global model version as the coordinator saw it."""

    version: int
    seconds: float  # since the run started
    accuracy: float | None
    loss: float | None
    updates_accepted: int
    epsilon: float | None = None  # differential privacy: spent so far, at the run's delta


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
    run_id: str = ""
    run_ended: bool = False
    buffered: int = 0  # accepted updates waiting in the state directory at the stop
    aggregator: str = "mean"  # the canonical --aggregator spec
    # differential privacy: coordinator.privacy.privacy_summary at the stop (None: off)
    privacy: dict[str, Any] | None = None
    # the evaluated version of highest held-out accuracy (model_best.npz), None if none
    best_version: int | None = None
    best_accuracy: float | None = None
    # when this process stopped, in the history's seconds (since the run was created)
    stopped_seconds: float | None = None


def freeze_heap() -> None:
    """Collect garbage once, then exempt every object alive now from later collections
    (``gc.freeze``). For a process about to serve a run, after its imports and set-up:
    torch, numpy and the service leave about 177,000 objects that every full collection
    walks again, 100 ms of CPU each measured here, with every thread stopped, the
    network thread included; full collections recur as a long run makes new objects.
    The process's composition root calls it (the CLI, the benchmarks' coordinator), not
    the service, so that a process running many services (the tests) keeps none of their
    garbage."""
    gc.collect()
    gc.freeze()


def build_task(
    config: CoordinatorConfig, eval_x: np.ndarray | None, eval_y: np.ndarray | None, *,
    run_id: str, created_at: float,
) -> Task:
    """The task description from the configuration (mlp sizes inferred from eval data),
    with its class names and input normalisation (``task_classes``, ``task_input_norm``).
    Without ``config.max_update_bytes`` its ``max_update_bytes`` is ``Task``'s default, a
    placeholder until the model is known (``CoordinatorService`` derives it)."""
    args = config.parsed_model_args()
    classes = task_classes(config, eval_y)
    if config.arch == "mlp" and eval_x is not None and eval_y is not None:
        args.setdefault("in_features", int(np.prod(eval_x.shape[1:])))
        args.setdefault("num_classes", len(classes) if classes is not None
                        else int(np.asarray(eval_y).max()) + 1)
    if classes is not None and args.get("num_classes", len(classes)) != len(classes):
        raise ConfigError(
            f"{len(classes)} class names ({', '.join(classes)}) but the model has "
            f"num_classes {args['num_classes']}"
        )
    norm = task_input_norm(config, eval_x, args)
    return Task(
        task_id=config.task_id,
        run_id=run_id,
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
        max_update_bytes=(Task.max_update_bytes if config.max_update_bytes is None
                          else config.max_update_bytes),
        max_staleness=config.aggregation().effective_max_staleness,
        created_at=created_at,
        classes=classes,
        input_norm=norm,
        requires=("input_norm",) if norm is not None else (),
        by_invitation=config.effective_concurrency > 0,
    )


def task_classes(config: CoordinatorConfig, eval_y: np.ndarray | None) -> tuple[str, ...] | None:
    """``--classes``, else the sorted names of the evaluation labels when they are names,
    else None (labels are class indices)."""
    given = config.class_names()
    if given is not None:
        return given
    if eval_y is None or np.asarray(eval_y).dtype.kind != "U":
        return None
    try:
        return parse_classes(sorted(set(np.asarray(eval_y).tolist())))
    except ValueError as exc:
        raise ConfigError(f"the evaluation data's labels cannot be class names: {exc}") from None


def _is_table(path: Path | None) -> bool:
    """A .csv file, or a directory holding one: the data a user exported from a table."""
    if path is None:
        return False
    path = Path(path)
    if path.is_dir():
        return any(p.suffix.lower() == ".csv" for p in path.iterdir())
    return path.suffix.lower() == ".csv"


def task_input_norm(
    config: CoordinatorConfig, eval_x: np.ndarray | None, args: dict[str, Any]
) -> InputNorm | None:
    """The normalisation ``--normalize`` asks for (see ``CoordinatorConfig.normalize``)."""
    from fedbus.zoo import fit_inputs, input_shape

    mode = config.normalize.strip()
    if mode in ("off", "") or (mode == "auto" and not _is_table(config.eval_data)):
        return None
    if mode in ("auto", "eval") and eval_x is None:
        if mode == "auto":
            return None
        raise ConfigError("--normalize eval needs --eval-data to compute the normalisation from")
    try:
        shape = input_shape(config.arch, args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot build model {config.arch!r}: {exc}") from None
    try:
        if mode in ("auto", "eval"):
            assert eval_x is not None
            return compute_input_norm(fit_inputs(eval_x, shape))
        norm = load_input_norm(mode)
        norm.check_fits(shape)
        return norm
    except ValueError as exc:
        raise ConfigError(f"input normalisation: {exc}") from None


def _task_conflicts(stored: Task, wanted: Task) -> list[str]:
    """What the configuration asks for that the stored run cannot become: another task id
    or another network. (Training settings, codec and limits may change on resume.)"""
    conflicts = []
    if wanted.input_norm is not None and wanted.input_norm != stored.input_norm:
        conflicts.append("another input normalisation" if stored.input_norm is not None
                         else "no input normalisation")
    if wanted.classes is not None and wanted.classes != stored.classes:
        conflicts.append(f"classes {list(stored.classes or [])} (asked: {list(wanted.classes)})")
    if stored.task_id != wanted.task_id:
        conflicts.append(f"task id {stored.task_id!r} (asked: {wanted.task_id!r})")
    if stored.model.arch != wanted.model.arch:
        conflicts.append(f"arch {stored.model.arch!r} (asked: {wanted.model.arch!r})")
    elif wanted.model.args and wanted.model.args != stored.model.args:
        conflicts.append(f"model args {stored.model.args} (asked: {wanted.model.args})")
    return conflicts


def _changed_settings(stored: Task, wanted: Task) -> dict[str, tuple[Any, Any]]:
    old, new = stored.to_wire(), wanted.to_wire()
    keys = ("train", "codec", "max_update_bytes", "max_staleness")
    return {k: (old[k], new[k]) for k in keys if old[k] != new[k]}


@dataclass(frozen=True)
class _Made:
    """A version as the network thread made it (the arrays are read-only, never mutated)."""

    version: int
    state: dict[str, np.ndarray]
    updates_accepted: int
    seconds: float  # since the run started


class CoordinatorService:
    """Runs one task to its stopping condition. ``stop()`` may be called from any thread."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        password: str,
        eval_data: tuple[np.ndarray, np.ndarray] | None = None,
        on_version: Callable[[VersionRecord], None] | None = None,
        transport_factory: TransportFactory = MqttClient,
        new_run: bool = False,
    ) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.on_version = on_version
        eval_x, eval_y = eval_data if eval_data is not None else (None, None)
        self._lock_file: StateLock | None = None
        self.store = self._open_store(config.state_dir, new_run)
        try:
            self._signing_key = load_signing_key(config)
            self._set_up(config, eval_x, eval_y)
            self._require_signed_updates(config)
            self._write_task_file()
        except BaseException:
            self.close()
            raise
        self.bytes_model_published = 0  # every model payload sent, re-publishes included
        self.bytes_model_delta_published = 0  # every model_delta payload (revision 2.7)
        # the last model published: (run, version, its tensors as the devices decode them)
        self._released: tuple[str, int, dict[str, np.ndarray]] | None = None
        # Prometheus metrics (served over HTTP by run() when config.metrics_port is set)
        from coordinator.metrics import CoordinatorMetrics

        self.metrics: CoordinatorMetrics = CoordinatorMetrics()
        self.metrics.current_version(self.core.version)
        self.metrics.sync_counters(self.core.counters)
        self._metrics_server: MetricsServer | None = None
        # the live web dashboard (coordinator.dashboard), served when config.dashboard_port
        self._dashboard: DashboardFeed | None = None
        self._dashboard_server: DashboardServer | None = None
        self._dashboard_due = 0.0
        self._accepted_at: list[tuple[float, int]] = []  # (monotonic, accepted) samples
        self.bytes_sent = 0  # every payload published (task, model, receipts)
        # tasks and models someone else published on our topics (an ACL mistake, a replay)
        self.foreign_publications = 0
        self._restore_at: float | None = None  # when to publish ours again (monotonic)
        self._last_restore = -_RESTORE_INTERVAL
        self.evaluator = None
        if eval_x is not None and eval_y is not None:
            self.evaluator = Evaluator(self.task, eval_x, eval_y)
        self.last_record: VersionRecord | None = None
        # the best evaluated version and its accuracy, derived from the stored evaluations
        # (a resumed run knows it); its model is model_best.npz in the state directory
        self.best: tuple[int, float] | None = self.store.best_evaluated()
        # --target-accuracy: when the target held (coordinator.target_hold); wall-clock
        # times, like the stored evaluations a resumed run starts from
        self._target: TargetWatch | None = None
        if config.target_accuracy:
            self._target = TargetWatch(config.target_accuracy, config.target_hold)
            since = time.time() - config.target_hold
            self._target.add(Evaluated(t, v, a) for t, v, a in self.store.evaluations(since))
        # the core is used by both threads; the lock is held only while it judges a message,
        # ticks or is read, while its journal is committed and its publishes are queued
        self._lock = threading.Lock()
        self._fatal: FedbusError | None = None  # set on the network thread, raised by run()
        # per-device fairness (network thread): refusals are this process's counts
        self._admission = Admission(config.admission())
        self._rate_limited = dict.fromkeys(
            ("updates_rate_limited", "bytes_rate_limited"), 0
        )
        self._flooding: dict[str, list[Any]] = {}  # device -> [since, refused, bytes]
        # (thread, its CPU time) when the last message was handled
        self._cpu_mark: tuple[int | None, float] = (None, 0.0)
        # versions made on the network thread, for the calling thread to record
        self._made: queue.SimpleQueue[_Made] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._stall = StallDetector(config.stall_window)  # fed verdicts under self._lock
        self._republish = threading.Event()
        self._task_published = self.resumed  # min_devices: a resumed run publishes at once
        self._waiting_logged = 0.0
        self._started = time.monotonic()
        self._checkpointed = time.monotonic()  # when the store's log was last copied
        self._first_update: float | None = None
        # what operators see (fedbus status): per-device statistics, published retained
        self.fleet = FleetStats()
        self._started_wall = time.time()
        self._fleet_key: tuple[Any, ...] | None = None  # what the last snapshot showed
        self._fleet_at = -_FLEET_INTERVAL  # when it was published (monotonic)
        self._fleet_too_large = False
        # the operator's commands (revision 2.5): the last one answered (for the fleet
        # snapshot), a stop asked for (its end reason), and malformed ones ignored
        self._control: dict[str, Any] | None = None
        self._stop_command: str | None = None
        self.control_ignored = 0
        # the largest packet the broker may send us (MQTT v5 Maximum Packet Size): a larger
        # one is dropped by the broker and never costs this process a byte
        self.receive_limit = receive_packet_limit(
            self.task.max_update_bytes, self._shapes(), config.max_message_bytes
        )
        # chunked updates (revision 2.6): partial ones, bounded per device and in all
        # ... kept durably beside the run (chunks.db), so a PUBACK never loses a chunk
        chunk_file = None if config.state_dir is None else Path(config.state_dir) / CHUNKS_FILE
        self._chunks = ChunkIntake(
            chunk_limits(self.task.max_update_bytes, config.chunk_memory_per_device,
                         config.chunk_memory, config.chunk_timeout),
            max_chunk_bytes=self.receive_limit,
            store=ChunkStore(chunk_file, sync=config.sync),
        )
        if new_run:  # partial updates of the run moved aside
            self._chunks.store.clear()
        # chunk topics of the model that may still hold a retained chunk (None: unknown,
        # as after a start: every topic a chunk of this model could have used)
        self._model_chunk_topics: int | None = None
        self._model_chunking_logged = False
        # --ingest-workers (coordinator.ingest_workers): messages in arrival order, the
        # worker processes that decode updates, and the reducer thread that judges them
        self._in_order: InOrder | None = None
        self._pool: IngestPool | None = None
        self._reducer: threading.Thread | None = None
        # group commit: the judged updates waiting for the reducer's commit (else None)
        self._deferred: list[tuple[Message, list[Action]]] | None = None
        # ... and how many messages it may hold at once (coordinator.ingest_workers)
        self._depth = pipeline_depth(self.task.max_update_bytes,
                                     sum(math.prod(s) for s in self._shapes().values()))
        self.client: Transport = transport_factory(
            ConnectionSettings(
                host=config.host,
                port=config.broker_port(),
                tls=config.tls_settings(),
                client_id=config.username,
                username=config.username,
                password=password,
                max_packet_size=config.max_message_bytes,
                receive_max_packet_size=self.receive_limit,
                # ingest workers: the reducer acknowledges each message after its commit
                # (the broker honours the Receive Maximum only until the first PUBACK:
                # _enqueue bounds the pipeline itself)
                manual_ack=config.ingest_workers > 0,
                receive_maximum=self._depth if config.ingest_workers > 0 else None,
            ),
            on_message=self._on_message,
            on_connect=lambda _present: self._republish.set(),
        )

    # -- state directory -----------------------------------------------------------------

    def _open_store(self, state_dir: Path | None, new_run: bool) -> Store:
        if state_dir is None:
            return Store(None, sync=self.config.sync)
        directory = Path(state_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {directory}: {exc}") from None
        self._lock_file = StateLock(directory)
        self._lock_file.acquire()
        try:
            store = Store(directory / DB_FILE, sync=self.config.sync, own_checkpoints=True)
            if new_run and store.has_run:
                old = store.load()
                store.close()
                archived = archive_run(directory, old.run_id)
                log.info("new run: run %s (version %d) moved to %s", old.run_id, old.version,
                         archived)
                store = Store(directory / DB_FILE, sync=self.config.sync, own_checkpoints=True)
            return store
        except BaseException:
            self._lock_file.release()
            raise

    def _set_up(
        self, config: CoordinatorConfig, eval_x: np.ndarray | None, eval_y: np.ndarray | None
    ) -> None:
        import torch

        from fedbus.zoo import build_model, get_state, state_shapes

        wanted = build_task(config, eval_x, eval_y, run_id="pending", created_at=0.0)
        if self.store.has_run:
            self._resume(wanted)
            return
        self.resumed = False
        self.task = replace(wanted, run_id=new_run_id(), created_at=time.time())
        torch.manual_seed(config.seed)
        try:
            model = build_model(self.task.model.arch, self.task.model.args)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot build model {self.task.model.arch!r}: {exc}") from None
        if config.max_update_bytes is None:  # not given: what this model needs
            derived = default_max_update_bytes(state_shapes(model), config.max_message_bytes)
            self.task = replace(self.task, max_update_bytes=derived)
        aggregation = config.aggregation()
        privacy = aggregation.privacy
        secret = None if privacy is None else new_noise_secret()
        self.core = CoordinatorCore(
            self.task, get_state(model), aggregation, ledger=self.store,
            model_codec=config.model_codec, noise_secret=secret,
        )
        self._check_model_fits(config.max_message_bytes)
        self.store.create_run(
            self.task.run_id, self.task.to_wire(), self.task.created_at, self.core.state,
            self.core.counters, aggregator=str(self.core.config.spec),
            privacy=None if privacy is None else privacy.mechanism, noise_secret=secret,
            mode=self.core.config.mode,
        )
        where = config.state_dir if config.state_dir is not None else "memory only"
        log.info("new run %s of task %s (state: %s)", self.task.run_id, self.task.task_id, where)
        self._start_paused()

    def _require_signed_updates(self, config: CoordinatorConfig) -> None:
        """Revision 2.8: with ``require_signed_updates`` every update must carry a valid
        signature by its device's key from the device-key file (read again when it
        changes); the core refuses the others as ``signature``."""
        keys = _device_key_file(config)
        if keys is None:
            return
        topics = self.topics

        def problem(device_id: str, payload: bytes) -> str | None:
            return update_signature_problem(keys.keys(), topics.update(device_id), device_id,
                                            payload)

        self.core.update_signatures = problem
        log.info("signed updates required: device keys from %s (%d known now)", keys.path,
                 len(keys.keys()))

    def _start_paused(self) -> None:
        """``start = "paused"``: the run begins (or goes on) paused until the operator
        resumes it."""
        if self.config.start == "paused" and self.core.pause("started paused"):
            self._commit()
        if self.core.paused is not None:
            self.task = replace(self.task, state="paused")
            log.info("the run is paused (%s): no version is made and agents do not train "
                     "until `fedbus run resume`", self.core.paused)

    def _resume(self, wanted: Task) -> None:
        snap = self.store.load()
        stored = Task.from_wire(snap.task)
        where = self.config.state_dir
        if snap.ended is not None:
            raise StateError(
                f"run {snap.run_id} in {where} has ended at version {snap.version} "
                f"({snap.ended}); start a new run there with --new-run, or use another "
                "--state-dir"
            )
        conflicts = _task_conflicts(stored, wanted)
        if conflicts:
            raise StateError(
                f"{where} holds run {snap.run_id} of another task: it has "
                f"{'; '.join(conflicts)}. Resume it with the same task settings, start a new "
                "run there with --new-run, or use another --state-dir"
            )
        # first, as the aggregator a resumed run keeps depends on it (a DP run's is mean)
        privacy = self.config.privacy()
        asked_dp = "off" if privacy is None else privacy.mechanism
        if (snap.privacy or "off") != asked_dp or (privacy is not None
                                                   and snap.noise_secret is None):
            raise StateError(
                f"{where} holds run {snap.run_id} with differential privacy "
                f"{snap.privacy or 'off'} (asked: {asked_dp}); its noise and clip are part of "
                "the run: resume it with the same --dp-noise and --dp-clip, start a new run "
                "there with --new-run, or use another --state-dir"
            )
        if self.config.aggregator is None:  # not asked for: the run keeps its own
            self.config = replace(self.config, aggregator=snap.aggregator)
        asked = str(self.config.aggregation().spec)
        if snap.aggregator != asked:
            raise StateError(
                f"{where} holds run {snap.run_id} aggregated with --aggregator "
                f"{snap.aggregator} (asked: {asked}); the aggregator is part of a run: resume "
                f"it with --aggregator {snap.aggregator}, start a new run there with "
                "--new-run, or use another --state-dir"
            )
        if self.config.max_update_bytes is None:  # not given: the run keeps its own
            wanted = replace(wanted, max_update_bytes=stored.max_update_bytes)
            shapes = {name: tuple(a.shape) for name, a in snap.state.items()}
            derived = default_max_update_bytes(shapes, self.config.max_message_bytes)
            if derived != stored.max_update_bytes:
                log.info(
                    "resumed run %s keeps its max_update_bytes of %d; derived from the model "
                    "it would be %d (--max-update-bytes %d to take that)", snap.run_id,
                    stored.max_update_bytes, derived, derived,
                )
        changed = _changed_settings(stored, wanted)
        task = replace(  # the network, its classes and input normalisation stay the run's
            wanted, run_id=snap.run_id, created_at=snap.created_at, model=stored.model,
            classes=stored.classes, input_norm=stored.input_norm, requires=stored.requires,
            state="paused" if snap.paused is not None else "running",
        )
        if changed:
            for key, (old, new) in changed.items():
                log.warning("resumed run %s: %s changes from %s to %s", snap.run_id, key, old,
                            new)
            self.store.set_task(task.to_wire())
        self.resumed = True
        self.task = task
        self.core = CoordinatorCore.resume(
            task, self.config.aggregation(), ledger=self.store, version=snap.version,
            state=snap.state, velocity=snap.velocity, counters=snap.counters,
            pending=snap.pending, round_fixed=snap.round, ended=None,
            now=time.monotonic(), model_codec=self.config.model_codec,
            noise_secret=snap.noise_secret, norms=snap.norms, paused=snap.paused,
            periods=snap.periods, region_parts=snap.region_parts,
            invitations=snap.invitations,
            invitation_ids=snap.invitation_ids,
        )
        self._check_model_fits(self.config.max_message_bytes)
        log.info(
            "resuming run %s of task %s at version %d with %d accepted update(s) waiting "
            "(state: %s)", snap.run_id, task.task_id, snap.version, self.core.buffered, where,
        )
        self._start_paused()

    def _write_task_file(self) -> None:
        """``task.json`` in the state directory: the run's task as JSON (its wire fields),
        for ``fedbus data check --task`` on a device's data. Replaced atomically."""
        if self.config.state_dir is None:
            return
        path = Path(self.config.state_dir) / TASK_FILE
        tmp = path.with_name(f".{TASK_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(self.task.to_wire(), indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc}") from None

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """The model's tensor shapes (those of every update's delta)."""
        return {name: tuple(a.shape) for name, a in self.core.state.items()}

    def close(self) -> None:
        """Close the store and release the state directory (idempotent)."""
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        chunks = getattr(self, "_chunks", None)
        if chunks is not None:
            chunks.store.close()
        if self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on while the service runs, else None."""
        server = self._metrics_server
        return None if server is None else server.port

    def _serve_metrics(self) -> None:
        """Start the metrics endpoint if configured; a port that cannot be bound closes the
        state directory and raises ``ConfigError``."""
        from coordinator.metrics import serve_metrics

        port = self.config.metrics_port
        if not port:
            return
        try:
            self._metrics_server = serve_metrics(
                self.metrics.registry, self.config.metrics_host, port
            )
        except ConfigError:
            self.close()
            raise
        log.info("metrics: http://%s:%d/metrics", self.config.metrics_host, port)

    def _serve_dashboard(self) -> None:
        """Start the dashboard if configured (a port that cannot be bound closes the state
        directory and raises ``ConfigError``)."""
        port = self.config.dashboard_port
        if not port:
            return
        feed = DashboardFeed({
            "run_id": self.task.run_id, "task_id": self.task.task_id,
            "arch": self.task.model.arch, "mode": self.config.mode,
            "aggregator": str(self.core.config.spec), "codec": self.task.codec,
            "eval_data": None if self.config.eval_data is None else self.config.eval_data.name,
            "state": self.task.state,
        })
        for row in self.history():
            feed.version(row.version, row.seconds, row.accuracy, row.loss,
                         row.updates_accepted)
        try:
            self._dashboard_server = serve_dashboard(feed, self.config.dashboard_host, port)
        except ConfigError:
            self._stop_metrics()
            self.close()
            raise
        self._dashboard = feed
        log.info("dashboard: http://%s:%d/", self.config.dashboard_host,
                 self._dashboard_server.port)

    @property
    def dashboard_port(self) -> int | None:
        """The port the dashboard listens on while the service runs, else None."""
        server = self._dashboard_server
        return None if server is None else server.port

    def _dashboard_summary(self) -> dict[str, Any]:
        """What the dashboard shows besides versions (the caller holds the lock)."""
        now = time.monotonic()
        counters = self.core.counters
        accepted = counters["updates_accepted"]
        self._accepted_at.append((now, accepted))
        while len(self._accepted_at) > 2 and self._accepted_at[1][0] <= now - 60:
            self._accepted_at.pop(0)
        then, before = self._accepted_at[0]
        online = self.core.online_devices()
        snapshot = fleet_snapshot(self.fleet, self._run_figures(), now=time.time(),
                                  started=self._started_wall)
        return {
            "version": self.core.version,
            "accepted": accepted,
            "rejected": {key[len("rejected_"):]: n for key, n in counters.items()
                         if key.startswith("rejected_") and n},
            "bytes_received": counters.get("bytes_received", 0),
            "bytes_sent": self.bytes_sent,
            "devices_online": len(online),
            "updates_per_second": (accepted - before) / (now - then) if now > then else None,
            "first_update_seconds": None if self.resumed else self._first_update,
            "fleet": fleet_rows(snapshot["devices"]),
        }

    def _dashboard_tick(self, *, force: bool = False) -> None:
        """Send the dashboard the run's counters, at most once a second."""
        feed = self._dashboard
        if feed is None or (not force and time.monotonic() < self._dashboard_due):
            return
        self._dashboard_due = time.monotonic() + 1.0
        with self._lock:
            summary = self._dashboard_summary()
        feed.summary(summary)

    def _stop_dashboard(self) -> None:
        server, self._dashboard_server = self._dashboard_server, None
        if server is not None:
            server.stop()
        self._dashboard = None

    def _stop_metrics(self) -> None:
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.stop()

    def _check_model_fits(self, limit: int) -> None:
        """Say when the model goes in chunks (revision 2.6), and when it is larger than
        agents take by default (their --max-model-bytes)."""
        size = len(self._model_payload())
        headroom = 1024  # topic name, properties and fixed header of the PUBLISH packet
        if size + headroom > limit:
            log.info("the %s model message takes %s bytes, more than the packet limit of %s: "
                     "it is published in chunks (agents of protocol revision 2.6 and later)",
                     self.task.model.arch, f"{size:,}", f"{limit:,}")
        agents = DecodeLimits().max_bytes
        if size > agents:
            log.warning("the model message takes %s bytes: agents refuse a model over their "
                        "--max-model-bytes (default %s); start them with a larger one",
                        f"{size:,}", f"{agents:,}")

    def counters(self) -> dict[str, int]:
        """The core's counters plus this shell's: ``bytes_model_published``,
        ``foreign_publications`` and the updates refused unjudged (``updates_rate_limited``,
        ``bytes_rate_limited``; counts of this process)."""
        with self._lock:
            return {**self.core.counters, "bytes_model_published": self.bytes_model_published,
                    "bytes_model_delta_published": self.bytes_model_delta_published,
                    "foreign_publications": self.foreign_publications, **self._rate_limited,
                    **self._chunks.counters}

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Serve the run until it ends or ``stop()``; raises ``FedbusError`` subclasses for
        what retrying cannot fix (refused credentials, ``connect_timeout``, a model above
        the broker's packet limit, an unwritable state)."""
        self._serve_metrics()
        self._serve_dashboard()
        self.client.subscribe(
            self.topics.all_updates, qos=1, no_local=True, retain_as_published=True
        )
        self.client.subscribe(self.topics.all_status, qos=1)
        # the operator's commands (revision 2.5): never retained, so a stale one is not
        # replayed to us; No Local, as we never send one
        self.client.subscribe(self.topics.control, qos=1, no_local=True)
        # our own topics, to notice what someone else publishes there (not our own: No Local)
        for topic in (self.topics.task, self.topics.model):
            self.client.subscribe(topic, qos=0, no_local=True)
        self._started = time.monotonic()
        if self.resumed:
            self._record_missing()
        else:
            self._record(_Made(self.core.version, self.core.state, 0, 0.0))
        with self._lock:  # partial updates a stopped process held (revision 2.6)
            for completed in self._chunks.restore(time.monotonic()):
                self._judge_chunked(completed, time.monotonic())
        self._start_ingest_workers()
        self.client.start()
        log.info(
            "coordinator: task %s run %s (%s %s), mode %s, aggregator %s, codec %s, model "
            "codec %s; broker %s:%d; signing with %s",
            self.task.task_id, self.task.run_id, self.task.model.arch, self.task.model.args,
            self.config.mode, self.core.config.spec, self.task.codec, self.config.model_codec,
            self.config.host, self.config.broker_port(), key_text(self._signing_key),
        )
        conflict = sparse_codec_warning(self.core.config.spec, self.task.codec)
        if conflict is not None:
            log.warning("%s", conflict)
        if self.task.classes is not None or self.task.input_norm is not None:
            norm = self.task.input_norm
            log.info(
                "task data: classes %s; input normalisation %s", ", ".join(self.task.classes)
                if self.task.classes is not None else "none (labels are class indices)",
                "none" if norm is None else f"of {len(norm.mean)} value(s), applied by every "
                "device (agents before protocol revision 2.2 ignore it: upgrade them)",
            )
        log.info("updates of up to %d bytes are judged; the broker is asked for no packet "
                 "over %d bytes (larger ones are dropped for us by the broker)",
                 self.task.max_update_bytes, self.receive_limit)
        privacy = self.core.config.privacy
        if privacy is not None:
            info = privacy_summary(privacy, self.core.version, self.core.config.dp_divisor)
            log.info(
                "differential privacy: updates clipped to %g, Gaussian noise of std %g (noise "
                "multiplier %g, D=%d) on every step; epsilon %.3g at delta %g so far; %s",
                privacy.clip, info["noise_std"], privacy.noise, info["divisor"],
                info["epsilon"], privacy.delta,
                "no budget" if info["max_steps"] is None else
                f"budget {privacy.epsilon_budget:g} allows {info['max_steps']} steps",
            )
        stop_reason = _STOP_REQUESTED
        try:
            while True:
                self._raise_if_failed()
                self._restore_if_due()
                if self._republish.is_set() and self._enough_devices():
                    self._republish.clear()
                    with self._lock:
                        self._publish_task_and_model()
                        self._fleet_key = None  # the broker may have lost it too
                    self._task_published = True
                self._record_made(timeout=0.2)
                self._checkpoint_if_due()
                self._publish_fleet()
                with self._lock:  # a buffer timeout or a round deadline may make a version
                    self._chunks.expire(time.monotonic())
                    actions = self.core.tick(time.monotonic())
                    self._end_at_max_versions()
                    self._commit()
                    self._carry_out(actions)
                    stalled = self._stall.check(time.monotonic())
                if stalled:
                    log.warning("%s", stalled)
                self._dashboard_tick()
                stop_reason = self._should_stop()
                if stop_reason:
                    self._raise_if_failed()  # a failure that asked to stop is an error
                    break
            if stop_reason != _STOP_REQUESTED:
                self._end_run(stop_reason)
        finally:
            self._stop_reducer()  # what it had not committed is not acknowledged either
            self.client.stop()
            self._stop_ingest_workers()
            self._record_made(timeout=0)  # versions made before the network thread stopped
            if self._dashboard is not None:
                self._dashboard.run_info(state="ended" if self.core.ended else "stopped")
                self._dashboard_tick(force=True)
            self._stop_dashboard()
            self._stop_metrics()
            buffered = self.core.buffered
            if buffered and self.core.ended is None:
                log.info(
                    "%d accepted update(s) wait in the state directory; they are applied when "
                    "the run resumes", buffered,
                )
            history = self.history()
            self.close()
        log.info("coordinator stopping: %s", stop_reason)
        last = self.last_record
        return RunSummary(
            task_id=self.task.task_id,
            mode=self.config.mode,
            final_version=self.core.version,
            final_accuracy=last.accuracy if last is not None else None,
            wall_seconds=time.monotonic() - self._started,
            counters=self.counters(),
            history=history,
            stop_reason=stop_reason,
            first_update_seconds=self._first_update,
            run_id=self.task.run_id,
            run_ended=self.core.ended is not None,
            buffered=buffered,
            aggregator=str(self.core.config.spec),
            privacy=self._privacy_summary(),
            best_version=None if self.best is None else self.best[0],
            best_accuracy=None if self.best is None else self.best[1],
            stopped_seconds=round(time.time() - self.task.created_at, 3),
        )

    def _privacy_summary(self) -> dict[str, Any] | None:
        privacy = self.core.config.privacy
        if privacy is None:
            return None
        info = privacy_summary(privacy, self.core.version, self.core.config.dp_divisor)
        log.info("differential privacy: epsilon %.4g at delta %g after %d steps",
                 info["epsilon"], privacy.delta, info["steps"])
        return info

    def _epsilon(self, version: int) -> float | None:
        """Epsilon spent by the run's first ``version`` steps (None without DP)."""
        privacy = self.core.config.privacy
        return None if privacy is None else epsilon_spent(privacy.noise, version, privacy.delta)

    def _raise_if_failed(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self.client.fatal is not None:
            raise self.client.fatal
        timeout = connect_timeout_error(self.client, self.config.connect_timeout)
        if timeout is not None:
            raise timeout

    def _end_run(self, reason: str) -> None:
        """Apply what waits, mark the run ended, tell the devices (the retained task)."""
        with self._lock:
            waiting = self.core.buffered
            actions = self.core.flush(time.monotonic())
            if waiting:
                log.info("the run ends: %d accepted update(s) applied as a last version",
                         waiting)
            self.core.end(reason)
            self._commit()
            self._carry_out(actions)
            self.task = replace(self.task, state="ended", end_reason=reason)
            last: list[PublishResult | None] = [
                self._publish(self.topics.task, self._task_payload(), retain=True, kind="task")
            ]
        self._record_made(timeout=0)  # the last version's evaluation, for the snapshot
        last.append(self._publish_fleet(force=True))
        log.info("run %s ended (%s): told the devices", self.task.run_id, reason)
        deadline = time.monotonic() + _FINAL_PUBLISH_WAIT
        for result in last:
            if result is not None:
                result.wait(max(0.0, deadline - time.monotonic()))
        self._record_made(timeout=0)

    # -- network thread ------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if self._in_order is not None:
            self._enqueue(msg)
            return
        with self._lock:
            if self._fatal is not None:
                return
            try:
                self._dispatch(msg)
            except Exception as exc:  # the store failed: never acknowledge what is not kept
                self._fatal = (exc if isinstance(exc, StateError)
                               else StateError(f"cannot handle a message: {exc}"))
                log.critical("%s; stopping without acknowledging the message", self._fatal)
                self.client.abort()
                self._stop.set()
            finally:
                self._cpu_mark = (threading.get_ident(), time.thread_time())

    # -- ingest workers (coordinator.ingest_workers) --------------------------------------

    def _start_ingest_workers(self) -> None:
        n = self.config.ingest_workers
        if n <= 0:
            return
        order = InOrder()
        shapes, limits = self.core.delta_check
        try:
            self._pool = IngestPool(n, WorkerSettings.of(shapes, limits), order.settle)
        except OSError as exc:
            self._stop_metrics()
            self._stop_dashboard()
            self.close()
            raise ConfigError(f"cannot start {n} ingest worker process(es): {exc}") from None
        self._in_order = order
        self._reducer = threading.Thread(target=self._reduce, name="reducer", daemon=True)
        self._reducer.start()
        log.info("ingest: %d worker process(es) decode and check update deltas (pids %s); "
                 "this process judges, commits and acknowledges in arrival order", n,
                 ", ".join(str(w.proc.pid) for w in self._pool.workers))

    def _stop_reducer(self) -> None:
        if self._in_order is not None:
            self._in_order.close()
        if self._reducer is not None:
            self._reducer.join(timeout=30)

    def _stop_ingest_workers(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def ingest_worker_cpu(self) -> float:
        """CPU seconds the ingest workers reported so far (0 without workers)."""
        return 0.0 if self._pool is None else self._pool.cpu_seconds()

    def _plain_update(self, msg: Message) -> bool:
        """An update a worker can check ahead: whole (not a chunk) and not a clearing."""
        device = self.topics.device_of(msg.topic)
        return (device is not None and msg.topic == self.topics.update(device)
                and bool(msg.payload) and not is_chunk(msg.payload))

    def _enqueue(self, msg: Message) -> None:
        """Network thread, with workers: number the message, and send a plain update to a
        worker; the reducer judges it once the worker answered (no PUBACK before then)."""
        assert self._in_order is not None and self._pool is not None
        # not reading the socket meanwhile holds further messages at the broker
        self._in_order.wait_room(self._depth)
        decode = self._plain_update(msg)
        seq = self._in_order.add(msg, wait=decode)
        if decode and not self._pool.submit(seq, msg.payload):
            self._in_order.settle(seq, None)  # no worker left: the reducer decodes it

    def _reduce(self) -> None:
        """The reducer thread: judge messages in arrival order with their workers' outcomes,
        commit their verdicts in groups, publish what they caused, then acknowledge them."""
        assert self._in_order is not None
        while True:
            batch = self._in_order.take(_GROUP_COMMIT)
            if not batch:
                return  # closed
            with self._lock:
                if self._fatal is not None:
                    return
                try:
                    self._reduce_batch(batch)
                except Exception as exc:  # the store failed: acknowledge nothing of it
                    self._fatal = (exc if isinstance(exc, StateError)
                                   else StateError(f"cannot handle a message: {exc}"))
                    log.critical("%s; stopping without acknowledging the message", self._fatal)
                    self.client.abort()
                    self._stop.set()
                    return
                finally:
                    self._deferred = None
                    self._cpu_mark = (threading.get_ident(), time.thread_time())
            for msg, _ in batch:  # in arrival order, each after its verdict's commit
                if msg.ack is not None:
                    msg.ack()

    def _reduce_batch(self, batch: list[tuple[Message, DeltaChecked | None]]) -> None:
        """Judge ``batch`` (the caller holds the lock). Plain updates share one commit until
        one of them makes a new version (its model is published from the state it made) or
        another kind of message comes (it commits and publishes as it always does).

        Fairness (``coordinator.admission``): each message's device is charged this thread's
        CPU time judging it; the group's commit and publishing are charged to no one (else
        the last updates of a group would pay for the whole group's)."""
        deferred: list[tuple[Message, list[Action]]] = []
        for msg, checked in batch:
            if not self._plain_update(msg):
                self._flush(deferred)
                self._cpu_mark = (threading.get_ident(), time.thread_time())
                self._dispatch(msg)
                continue
            self._deferred = deferred
            self._cpu_mark = (threading.get_ident(), time.thread_time())
            try:
                self._dispatch(msg, checked)
            finally:
                self._deferred = None
            if deferred and any(isinstance(a, NewModel) for a in deferred[-1][1]):
                self._flush(deferred)
        self._flush(deferred)

    def _flush(self, deferred: list[tuple[Message, list[Action]]]) -> None:
        """Commit the judged updates, then carry out their actions in order."""
        if not deferred:
            return
        self._commit()
        self.metrics.sync_counters(self.core.counters)
        for msg, actions in deferred:
            if msg.retain:  # the broker would replay it to every new subscriber: clear it
                self._publish(msg.topic, b"", retain=True)
            self._carry_out(actions)
        deferred.clear()

    def _cpu_since_last_message(self) -> float:
        """CPU time this thread spent since it last finished handling a message: reading
        this one off the socket and decoding its packet (paho), and small writes (0 when
        unknown: the first message, or a network thread started anew)."""
        thread, mark = self._cpu_mark
        if thread != threading.get_ident():
            return 0.0
        return max(0.0, time.thread_time() - mark)

    def _dispatch(self, msg: Message, prechecked: DeltaChecked | None = None) -> None:
        """Judge one message, commit the core's journal, then carry out its actions (the
        caller holds the lock).

        Fairness (``coordinator.admission``): a device over its share of this thread's CPU
        time has its updates refused before anything of them is read. Every message of a
        device (its status messages too) is charged to it, refused or not: the CPU time
        spent since the previous message (receiving this one) plus handling it. So a device
        that keeps sending while it is refused stays refused, and a well-behaved one is
        admitted again after the ``retry_after`` it was told."""
        if msg.topic in (self.topics.task, self.topics.model):
            self._check_ours(msg)
            return
        if msg.topic == self.topics.control:
            self._on_control(msg)
            return
        device = self.topics.device_of(msg.topic)
        if device is None:
            return
        now = time.monotonic()
        if msg.topic == self.topics.update(device):
            if msg.retain and not msg.payload:
                return  # a cleared retained update (empty payload): nothing to judge
            handle: Callable[[str, Message, float], None] = partial(
                self._on_update, prechecked=prechecked)
        elif msg.topic == self.topics.status(device):
            handle = self._on_status
        else:
            return
        received = self._cpu_since_last_message()
        started = time.thread_time()
        # a status message is always read (it is small, bounded by its decode limits, and
        # presence must follow the device's Will), but charged like an update
        decision = self._admission.admit(device, now)
        if decision.admitted or handle == self._on_status:
            if decision.admitted and device in self._flooding:
                self._flood_ended(device)
            handle(device, msg, now)
        else:
            self._refuse(device, msg, decision.retry_after, now)
        cost = received + time.thread_time() - started
        self._admission.charge(device, cost, time.monotonic())

    def _on_update(self, device: str, msg: Message, now: float,
                   prechecked: DeltaChecked | None = None) -> None:
        if is_chunk(msg.payload):  # revision 2.6: judged once the update is whole
            if msg.retain:  # never part of an update; the broker would replay it forever
                self._chunks.counters["chunks_refused"] += 1
                log.warning("refused a retained chunk on %s; clearing it", msg.topic)
                self._publish(msg.topic, b"", retain=True)
                return
            completed = self._chunks.add(device, msg.payload, now)
            if completed is not None:
                self._judge_chunked(completed, now)
            return
        self._judge_update(device, msg, msg.payload, now, prechecked)

    def _judge_chunked(self, completed: Completed, now: float) -> None:
        topic = self.topics.update(completed.device)
        self._judge_update(completed.device, Message(topic, completed.payload, False),
                           completed.payload, now)
        self._chunks.done(completed)  # after its verdict is committed

    def _judge_update(self, device: str, msg: Message, payload: bytes, now: float,
                      prechecked: DeltaChecked | None = None) -> None:
        if self._first_update is None:
            self._first_update = round(now - self._started, 3)
        actions = self.core.on_update(device, payload, now, retained=msg.retain,
                                      prechecked=prechecked)
        if self.core.last_judged is not None:
            self.fleet.on_judged(self.core.last_judged, time.time())
        self._end_at_max_versions()
        if self._deferred is not None:  # group commit: the reducer commits, then carries out
            self._deferred.append((msg, actions))
            return
        self._commit()
        self.metrics.sync_counters(self.core.counters)
        if msg.retain:  # the broker would replay it to every new subscriber: clear it
            self._publish(msg.topic, b"", retain=True)
        self._carry_out(actions)

    def _on_status(self, device: str, msg: Message, now: float) -> None:
        actions = self.core.on_status(device, msg.payload, now)
        self._log_presence(device, self.fleet.on_status(device, msg.payload, time.time()))
        self._end_at_max_versions()
        self._commit()
        self.metrics.online(self.core.online_count())
        self._carry_out(actions)

    def _refuse(self, device: str, msg: Message, retry_after: float, now: float) -> None:
        """Refuse an update of a device over its share, unjudged: nothing is decoded or
        remembered (a re-send is judged as if new). If its id can be read off its first
        bytes it gets a ``rate_limited`` receipt naming ``retry_after``; a retained one is
        cleared, as a judged one would be."""
        self._rate_limited["updates_rate_limited"] += 1
        self._rate_limited["bytes_rate_limited"] += len(msg.payload)
        self.metrics.refused()
        self._log_refusal(device, len(msg.payload), retry_after, now)
        if msg.retain:
            self._publish(msg.topic, b"", retain=True)
        # a chunk of an update names the update's id (revision 2.6): the device sends the
        # whole update again after retry_after, and its chunks complete what is held
        update_id = (peek_chunk_id(msg.payload) if is_chunk(msg.payload)
                     else peek_update_id(msg.payload))
        if update_id is None:
            return
        receipt = Receipt(
            update_id=update_id, run_id=self.task.run_id, accepted=False,
            reason="rate_limited",
            detail=f"device {device} is over its share of the coordinator's time "
            f"(--device-share {self._admission.policy.share:g}): send it again in "
            f"{retry_after:.3g} s",
            model_version=self.core.version, retry_after=retry_after,
        )
        self._publish(self.topics.receipt(device), pack(receipt.to_wire()), kind="receipt")

    def _log_refusal(self, device: str, size: int, retry_after: float, now: float) -> None:
        """A warning when a device starts being refused, then one a minute while it goes on
        (a flood must not flood the log too); every refusal at debug level."""
        log.debug("refused an update of %s unjudged (rate_limited, %d bytes): again in %.3g s",
                  device, size, retry_after)
        seen = self._flooding.get(device)
        if seen is None:
            log.warning(
                "device %s is over its share of the coordinator's time (--device-share %g, "
                "--device-burst %g s): refusing its updates unjudged (rate_limited) for "
                "%.3g s", device, self._admission.policy.share, self._admission.policy.burst,
                retry_after,
            )
            self._flooding[device] = [now, 1, size]
            return
        seen[1] += 1
        seen[2] += size
        if now - seen[0] >= _FLOOD_LOG_INTERVAL:
            log.warning("device %s is still over its share: %d update(s), %d bytes refused "
                        "unjudged in the last %.0f s", device, seen[1], seen[2], now - seen[0])
            self._flooding[device] = [now, 0, 0]

    def _flood_ended(self, device: str) -> None:
        since, count, size = self._flooding.pop(device)
        log.info("device %s is within its share again (%d update(s), %d bytes refused since "
                 "%.0f s ago)", device, count, size, time.monotonic() - since)

    def _on_control(self, msg: Message) -> None:
        """An operator's command (the caller holds the lock): judged (``coordinator.control``),
        carried out, and answered in the fleet snapshot, published at once."""
        state = run_state(ended=self.core.ended is not None or self._stop_command is not None,
                          paused=self.core.paused is not None)
        decision = judge_control(msg.payload, retained=msg.retain, now=time.time(),
                                 state=state)
        if isinstance(decision, Malformed):
            self.control_ignored += 1
            log.warning("ignored a message on %s: %s", msg.topic, decision.detail)
            return
        log.info("operator: %s (request %s%s): %s, %s", decision.command, decision.request_id,
                 f", reason {decision.reason!r}" if decision.reason else "", decision.outcome,
                 decision.detail)
        if decision.change:
            self._carry_out_control(decision)
        self._control = decision.answer(time.time())
        self._fleet_at = -_FLEET_INTERVAL  # the answer goes out with the next loop

    def _carry_out_control(self, decision: ControlDecision) -> None:
        """Pause, resume or stop the run (the caller holds the lock)."""
        if decision.command == "stop":
            self._stop_command = decision.end_reason  # the calling thread ends the run
            return
        actions: list[Action] = []
        if decision.command == "pause":
            self.core.pause(decision.reason or "paused by operator")
            self.task = replace(self.task, state="paused")
        else:
            actions = self.core.unpause(time.monotonic()) or []
            self.task = replace(self.task, state="running")
        self._commit()
        if self._task_published:  # else it goes out, in this state, once enough devices are on
            self._publish(self.topics.task, self._task_payload(), retain=True, kind="task")
        self._carry_out(actions)
        if self._dashboard is not None:
            self._dashboard.run_info(state=self.task.state)

    def _log_presence(self, device: str, change: str | None) -> None:
        if change == "joined":
            stats = self.fleet.devices[device]
            log.info("device %s joined (%s, agent %s, last finished %s)", device, stats.state,
                     stats.agent or "unknown",
                     "nothing" if stats.model_version is None else f"v{stats.model_version}")
        elif change == "left":
            gone = self.fleet.devices.get(device)
            log.info("device %s left (%s)", device,
                     "status cleared" if gone is None else gone.state)

    def _check_ours(self, msg: Message) -> None:
        """A live message on the task or model topic (we never get our own: No Local) was
        published by someone else: an ACL mistake, a replay of one of ours, a clearing.
        Agents that verify signatures ignore it, but as the retained message it hides ours
        from agents that connect now. Logged, counted, and ours is published again (at most
        every 5 s). A copy with the retain flag is what the broker held when we subscribed;
        the publication after every connect replaces it anyway."""
        if msg.retain:
            return
        why = self._foreign_because(msg)
        self.foreign_publications += 1
        log.warning("someone else published on %s (%s): check who can write it (broker ACL); "
                    "publishing ours again", msg.topic, why)
        if self._restore_at is None:
            self._restore_at = max(time.monotonic(), self._last_restore + _RESTORE_INTERVAL)

    def _foreign_because(self, msg: Message) -> str:
        if not msg.payload:
            return "an empty message: the retained one was cleared"
        try:
            verify_message(self._signing_key.public_key(), msg.topic, msg.payload)
        except SignatureError as exc:
            return str(exc)
        # a message we signed, yet not sent by us (No Local): an old one, published again
        return "a message we signed earlier, published again (a replay)"

    def _restore_if_due(self) -> None:
        """Publish our task and model again after someone else's (calling thread)."""
        with self._lock:
            due = self._restore_at
            if due is None or time.monotonic() < due or not self._task_published:
                return
            self._restore_at = None
            self._last_restore = time.monotonic()
            self._publish_task_and_model()

    def _end_at_max_versions(self) -> None:
        """The run ends with the version that reaches ``max_versions``: later updates are
        refused (``run_ended``) rather than buffered into one version too many."""
        if self._reached_max_versions() and self.core.ended is None:
            self.core.end(f"reached {self.config.max_versions} model versions")

    def _commit(self) -> None:
        """Write the core's journal and counters in one transaction (the caller holds the
        lock); raises if the store cannot be written."""
        try:
            self.store.commit(
                self.core.drain_journal(), self.core.counters,
                max_staleness=self.core.config.effective_max_staleness,
            )
        except StateError:
            raise
        except Exception as exc:  # sqlite3 errors: disk full, I/O error, ...
            raise StateError(f"cannot record the run's state: {exc}") from exc

    def _carry_out(self, actions: list[Action]) -> None:
        """Publish receipts and new versions (the caller holds the lock, and the journal
        that led to them is committed)."""
        for action in actions:
            if isinstance(action, SendReceipt):
                receipt = action.receipt
                self._publish(
                    self.topics.receipt(action.device_id), pack(receipt.to_wire()),
                    kind="receipt",
                )
                if receipt.accepted and not receipt.repeat and receipt.staleness is not None:
                    self.metrics.accepted(receipt.staleness)
                if not receipt.repeat:
                    self._stall.record(time.monotonic(), action.device_id, receipt.accepted,
                                       receipt.reason, receipt.detail)
            elif isinstance(action, SendInvite):  # revision 2.10
                invite = Invite(action.version, time.time(), run_id=self.task.run_id,
                                invite_id=action.invite_id)
                self._publish(self.topics.receipt(action.device_id),
                              pack(invite.to_wire()), kind="receipt")
            elif isinstance(action, NewModel):
                self.metrics.version(action.version, action.sent_at, time.time())
                self._publish_model()
                self._made.put(
                    _Made(
                        self.core.version,
                        self.core.state,
                        self.core.counters["updates_accepted"],
                        time.time() - self.task.created_at,
                    )
                )

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, kind: SentKind | None = None
    ) -> PublishResult:
        result = self.client.publish(topic, payload, qos=1, retain=retain)
        self.bytes_sent += len(payload)
        if kind is not None:
            self.metrics.sent(kind, len(payload))
        return result

    # -- calling thread ------------------------------------------------------------------

    def _enough_devices(self) -> bool:
        """True once ``min_devices`` devices are online (always, after the first publish:
        a reconnect republishes whoever is online)."""
        need = self.config.min_devices
        if self._task_published or need == 0:
            return True
        with self._lock:
            online = self.core.online_count()
        if online >= need:
            log.info("%d of %d devices online: publishing the task", online, need)
            return True
        now = time.monotonic()
        if now - self._waiting_logged >= 10.0:
            self._waiting_logged = now
            log.info("waiting for devices: %d of %d online", online, need)
        return False

    def _checkpoint_if_due(self) -> None:
        """Copy the store's log into its database file about once a second, here rather
        than in a commit on the network thread (where SQLite would do it, fsyncs and all,
        every 1,000 pages: a pause of every message behind it). Without the lock: the
        checkpoint has its own connection and never blocks a commit."""
        now = time.monotonic()
        if now - self._checkpointed < _CHECKPOINT_INTERVAL:
            return
        self._checkpointed = now
        try:
            self.store.checkpoint()
        except StateError as exc:  # the log stays whole; commits report real failures
            log.warning("%s", exc)

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
            return _STOP_REQUESTED
        ended = self.core.ended  # the core ends a run itself when its privacy budget is spent
        if ended is not None:
            return ended
        if self._stop_command is not None:
            return self._stop_command
        if self._reached_max_versions():
            return f"reached {cfg.max_versions} model versions"
        if cfg.duration and time.monotonic() - self._started >= cfg.duration:
            return f"ran for {cfg.duration:g} s"
        if self._target is not None:
            held = self._target.decide(time.time())
            for missed in self._target.missed:
                log.info("%s", missed.describe())
            self._target.missed.clear()
            if held is not None:
                return held.describe()
        return ""

    def _reached_max_versions(self) -> bool:
        return bool(self.config.max_versions) and self.core.version >= self.config.max_versions

    # -- publishing, evaluation, history -------------------------------------------------

    def _signed(self, topic: str, message: dict[str, Any]) -> bytes:
        """The payload of a task or model: packed, with the coordinator's signature."""
        return sign_message(self._signing_key, topic, pack(message))

    def _task_payload(self) -> bytes:
        return self._signed(self.topics.task, self.task.to_wire())

    def _model_payload(self) -> bytes:
        return self._signed(self.topics.model, self.core.model_message(time.time()).to_wire())

    def _publish_task_and_model(self) -> None:
        self._publish(self.topics.task, self._task_payload(), retain=True, kind="task")
        self._publish_model()

    def _run_figures(self) -> dict[str, Any]:
        """The run's own figures in the fleet snapshot (the caller holds the lock)."""
        counters = self.core.counters
        last = self.last_record
        evaluated = last if last is not None and last.accuracy is not None else None
        return {
            "task": self.task.task_id, "run": self.task.run_id, "mode": self.config.mode,
            "version": self.core.version,
            "accuracy": None if evaluated is None else evaluated.accuracy,
            "loss": None if evaluated is None else evaluated.loss,
            "evaluated_version": None if evaluated is None else evaluated.version,
            "updates_accepted": counters.get("updates_accepted", 0),
            "updates_rejected": counters.get("updates_rejected", 0),
            "bytes_received": counters.get("bytes_received", 0),
            "bytes_model_published": self.bytes_model_published,
            "ended": self.core.ended,
            "state": run_state(ended=self.core.ended is not None,
                               paused=self.core.paused is not None),
            "control": self._control,
        }

    def _publish_fleet(self, *, force: bool = False) -> PublishResult | None:
        """Publish the fleet snapshot (retained, for operators) if it changed, at most
        every 2 s (``force``: now, if it changed). Calling thread."""
        now = time.monotonic()
        if not force and now - self._fleet_at < _FLEET_INTERVAL:
            return None
        with self._lock:
            figures = self._run_figures()
            key = (self.fleet.revision, *figures.values())
            if key == self._fleet_key:
                return None
            payload = fleet_snapshot_payload(self.fleet, figures, now=time.time(),
                                             started=self._started_wall)
            self._fleet_key, self._fleet_at = key, now
            try:
                return self._publish(self.topics.fleet, payload, retain=True)
            except MessageTooLarge as exc:
                if not self._fleet_too_large:
                    self._fleet_too_large = True
                    log.warning("the fleet snapshot is not published: %s", exc)
                return None

    def _model_delta_payload(self, message: GlobalModel) -> bytes | None:
        """The signed ``model_delta`` from the previously published version to
        ``message``'s (revision 2.7), or None when that was not the version before it (the
        first model of a run, a re-publish of the same version)."""
        from fedbus.update_codec import decode_update_delta

        shapes = {name: a.shape for name, a in self.core.state.items()}
        released = decode_update_delta(message.tensors, message.compression,
                                       expected_shapes=shapes)
        before, self._released = self._released, (message.run_id, message.version, released)
        if before is None or before[:2] != (message.run_id, message.version - 1):
            return None
        delta = ModelDelta(
            task_id=message.task_id, run_id=message.run_id, base=message.version - 1,
            version=message.version, delta=encode_model_delta(before[2], released),
            sha=model_digest(released), created_at=message.created_at,
        )
        return self._signed(self.topics.model_delta, delta.to_wire())

    def _publish_model(self) -> None:
        message = self.core.model_message(time.time())
        payload = self._signed(self.topics.model, message.to_wire())
        delta = self._model_delta_payload(message)
        try:
            if delta is not None and publish_packet_size(
                    self.topics.model_delta, len(delta)) <= self.client.max_packet_size:
                # first: a device following the deltas needs only this (a delta over the
                # packet limit is not sent: devices then take the chunked whole model)
                self._publish(self.topics.model_delta, delta, retain=True)
                self.bytes_model_delta_published += len(delta)
            self._publish_model_payload(payload)
        except (MessageTooLarge, ValueError) as exc:
            self._fatal = exc if isinstance(exc, MessageTooLarge) else ConfigError(
                f"the model message of {len(payload):,} bytes cannot be published within the "
                f"broker's packet limit of {self.client.max_packet_size:,} bytes: {exc}")
            log.error(
                "%s: use a smaller model or --model-codec fp16+zstd, or raise the broker's "
                "max_packet_size", self._fatal,
            )
            self._stop.set()
            return
        self.bytes_model_published += len(payload)

    def _publish_model_payload(self, payload: bytes) -> None:
        """Publish the model retained: whole if it fits the broker's packet limit, else in
        chunks (revision 2.6), chunk 0 on the model topic, the others on their own topics,
        then clear the chunk topics an earlier model used beyond this one's."""
        limit = self.client.max_packet_size
        topic = self.topics.model
        longest = self.topics.model_chunk(65_534)
        data = chunk_data_size(limit, longest)
        if publish_packet_size(topic, len(payload)) <= limit:
            chunks = [payload]
        else:
            chunks = split(payload, data, new_run_id())
            if not self._model_chunking_logged:
                self._model_chunking_logged = True
                log.info("the model message (%d bytes) goes in %d chunks of at most %d bytes "
                         "(packet limit %d)", len(payload), len(chunks), data, limit)
        for i in range(1, len(chunks)):  # chunk 0 last: the model topic names what is whole
            self._publish(self.topics.model_chunk(i), chunks[i], retain=True, kind="model")
        self._publish(topic, chunks[0], retain=True, kind="model")
        held = self._model_chunk_topics
        if held is None:  # after a start: any topic a chunk of this model may have used
            held = -(-model_size_bound(self._shapes()) // data)
        for i in range(len(chunks), held):
            self._publish(self.topics.model_chunk(i), b"", retain=True)
        self._model_chunk_topics = len(chunks)
        self.bytes_model_published += sum(len(c) for c in chunks) - len(payload)

    def _record_missing(self) -> None:
        """On resume: evaluate the current version if no evaluation of it was recorded."""
        with self._lock:
            last = self.store.last_evaluated()
            made = _Made(self.core.version, self.core.state,
                         self.core.counters["updates_accepted"],
                         time.time() - self.task.created_at)
        if last is None or last < made.version:
            self._record(made)
        else:
            rows = self.store.history(made.version)
            if rows:
                self.last_record = _version_record(rows[0], self.task.created_at,
                                                   self._epsilon(rows[0].version))

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
            epsilon=self._epsilon(made.version),
        )
        self.last_record = record
        privacy = self.core.config.privacy
        spent = "" if privacy is None or record.epsilon is None else (
            f", epsilon {record.epsilon:.4g} at delta {privacy.delta:g}"
        )
        if accuracy is not None and loss is not None:
            self.metrics.evaluated(record.version, accuracy, loss)
            log.info(
                "model v%d: held-out accuracy %.4f, loss %.4f (%d updates accepted%s)",
                record.version, accuracy, loss, record.updates_accepted, spent,
            )
        else:
            log.info("model v%d (%d updates accepted%s)", record.version,
                     record.updates_accepted, spent)
        evaluated_at = time.time()
        with self._lock:
            if evaluate:
                self.store.record_evaluation(made.version, accuracy, loss, evaluated_at)
        best = accuracy is not None and (self.best is None or accuracy > self.best[1])
        if accuracy is not None:
            if best:
                self.best = (made.version, accuracy)
            if self._target is not None:
                self._target.add([Evaluated(evaluated_at, made.version, accuracy)])
        if self.config.state_dir is not None:
            self._export(made, record, best=best)
        if self._dashboard is not None:
            self._dashboard.version(record.version, record.seconds, record.accuracy,
                                    record.loss, record.updates_accepted)
        if self.on_version is not None:
            self.on_version(record)

    def _export(self, made: _Made, record: VersionRecord, *, best: bool = False) -> None:
        """``model.npz`` (replaced atomically), with ``best`` also ``model_best.npz`` (the
        best evaluated version: older versions' tensors are not kept, so it is written
        when evaluated), and a line of ``history.jsonl`` (appended) in the state
        directory, for people and tools; the store is the record."""
        directory = Path(self.config.state_dir)  # type: ignore[arg-type]
        try:
            _write_model(directory / "model.npz", made.version, made.state, None)
            if best:
                _write_model(directory / BEST_MODEL_FILE, made.version, made.state,
                             record.accuracy)
            line = {"run": self.task.run_id, **record.__dict__}
            with open(directory / "history.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.warning("cannot export version %d to %s: %s", made.version, directory, exc)

    def history(self) -> list[VersionRecord]:
        """Every version of the run so far, with its evaluation (from the store)."""
        with self._lock:
            rows = self.store.history()
        return [_version_record(r, self.task.created_at, self._epsilon(r.version)) for r in rows]


def _device_key_file(config: CoordinatorConfig) -> DeviceKeyFile | None:
    """The device-key file when signed updates are required (``ConfigError`` when none is
    named); None when they are not."""
    if not config.require_signed_updates:
        return None
    if config.device_keys is None:
        raise ConfigError("--require-signed-updates needs the device-key file: give "
                          "--device-keys or --credentials")
    return DeviceKeyFile(config.device_keys)


def load_signing_key(config: CoordinatorConfig) -> Ed25519PrivateKey:
    """The key tasks and models are signed with: the state directory's ``signing.key``,
    made once (adopting ``config.signing_key`` when given) and kept across restarts and
    new runs, so devices keep trusting the directory's coordinator. Without a state
    directory: ``config.signing_key``, or a key for this process only.

    A state directory whose key is not ``config.signing_key`` (e.g. a broker set up anew,
    whose credentials file gives devices another key) is a ``ConfigError``: every device
    would ignore every task and model."""
    wanted = config.signing_key
    if config.state_dir is None:
        if wanted is not None:
            return load_private_key(Path(wanted))
        log.warning("no state directory: signing with a key made for this process only")
        return Ed25519PrivateKey.generate()
    path = Path(config.state_dir) / _SIGNING_KEY_FILE
    key = ensure_private_key(path, adopt=Path(wanted) if wanted is not None else None)
    if wanted is not None:
        given = load_private_key(Path(wanted))
        if key_text(given) != key_text(key):
            raise ConfigError(
                f"the state directory {config.state_dir} signs with {key_text(key)} "
                f"({path}), but the signing key {wanted} is {key_text(given)}: devices given "
                f"that key would ignore every task and model. Use the state directory made "
                f"with that key, or another --state-dir"
            )
    return key


def _write_model(path: Path, version: int, state: dict[str, np.ndarray],
                 accuracy: float | None) -> None:
    """An exported model (``np.load``-able): its tensors, ``__version__`` and, when given,
    ``__accuracy__``; written beside and renamed, so a reader never sees half."""
    tmp = path.with_name(path.name + ".tmp")
    arrays: dict[str, Any] = {"__version__": np.array(version), **state}
    if accuracy is not None:
        arrays["__accuracy__"] = np.array(accuracy)
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def _version_record(
    row: HistoryRow, created_at: float, epsilon: float | None = None
) -> VersionRecord:
    return VersionRecord(
        version=row.version,
        seconds=round(row.made_at - created_at, 3),
        accuracy=row.accuracy,
        loss=row.loss,
        updates_accepted=row.updates_accepted,
        epsilon=epsilon,
    )

