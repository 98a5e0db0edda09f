"""The regional aggregator's process (protocol revision 2.11): the MQTT shell around
``coordinator.regional`` and ``coordinator.region_store``.

It connects to its regional broker as that broker's ``coordinator`` account (a regional
broker has no coordinator of its own), reads the task and the model that come over the
bridge from the root, judges every device update of the region (``validate_update``, then
the adaptive norm bound), answers each device on its receipt topic, and publishes partial
updates on ``<prefix>/update/fedbus-region-<region>``, which the bridge (started with
``fedbus broker --region-aggregator``) forwards to the root. The root's receipts for them
come back on ``<prefix>/receipt/fedbus-region-<region>``.

Signatures, as the agent and the coordinator check them (``fedbus.signing``):

- with the root coordinator's public key (``coordinator_key``, from the regional broker's
  credentials file, which carries the root's key from the bridge bundle) it acts only on a
  task or model that carries the root's valid signature for its topic (protocol section
  7.6), and never goes back to the task of a run that began before the one it follows: a
  hostile regional broker cannot make it judge against a forged model. Any other is ignored
  with one log line and counted (``bad_signatures``). Without a key it accepts them
  unsigned and says so at start-up;
- with ``require_signed_updates`` (revision 2.8) every device update must carry a valid
  signature by its device's key from the device-key file (``device_keys``, by default the
  regional broker's ``signing/devices.pub``, read again when it changes), else it is
  refused as ``signature``: a root that requires signed updates sees only the region's
  signature on a partial, so the region must check its devices' own.

Messages are handled on the transport's thread, under one lock shared with the timer loop
of ``run`` (partials that time out, re-sends of unanswered ones).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregation import l2_norm
from coordinator.chunk_intake import ChunkIntake, chunk_limits
from coordinator.chunk_store import ChunkStore
from coordinator.journal import Verdict
from coordinator.norm_bound import DEFAULT_NORM_MULTIPLE, NormRule, decide_norm, pushed
from coordinator.region_store import RegionStore, StoredPart, StoredPartial
from coordinator.regional import DEFAULT_CAP, ClosedPartial, Part, RegionBook, partial_id
from coordinator.robust import clip_norm
from coordinator.validation import Accepted, Rejected, Repeated, ValidationLimits, validate_update
from fedbus.bridge import check_region, region_aggregator_id
from fedbus.chunks import chunk_data_size, is_chunk, read_chunk, split
from fedbus.codec_spec import parse_codec
from fedbus.envelope import DecodeLimits, pack, unpack
from fedbus.errors import ConfigError, ProtocolError
from fedbus.messages import GlobalModel, Receipt, Task, Update
from fedbus.signing import (
    DeviceKeyFile,
    SignatureError,
    Verifier,
    ensure_private_key,
    key_text,
    load_public_key,
    sign_message,
    update_signature_problem,
)
from fedbus.tls import BrokerTarget, check_transport_choice
from fedbus.topics import DEFAULT_PREFIX, Topics
from fedbus.transport import (
    ConnectionSettings,
    Message,
    MqttClient,
    PublishResult,
    Transport,
    publish_packet_size,
)
from fedbus.update_codec import decode_update_delta, encode_update_delta

__all__ = ["RegionAggregator", "RegionConfig"]

log = logging.getLogger(__name__)

STATE_FILE = "region.db"
SIGNING_KEY_FILE = "signing.key"
CHUNKS_FILE = "chunks.db"
_TASK_LIMITS = DecodeLimits(max_bytes=64 * 1024, max_bin_len=1024)
_MAX_MODEL_BYTES = 64 * 1024 * 1024
_EARLY = 1024  # updates kept while the task or the model is not known yet
_TICK = 0.1


@dataclass(frozen=True)
class RegionConfig(BrokerTarget):
    """Settings of one ``fedbus region-aggregator`` process."""

    region: str = ""
    host: str = "127.0.0.1"
    port: int | None = None
    username: str = "coordinator"  # the regional broker's coordinator account
    password: str | None = None
    credentials: Path | None = None  # the regional broker's credentials.json
    tls: bool | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_plaintext: bool = False
    prefix: str = DEFAULT_PREFIX
    state_dir: Path = Path("fedbus-region")
    partial_size: int = 8  # device updates per partial
    partial_timeout: float = 30.0  # seconds a partial may wait for more
    partial_codec: str = "int8"  # how partials are encoded (section 6.7 specs)
    max_norm: float = 100.0  # the fixed ceiling, as the coordinator's
    norm_multiple: float = DEFAULT_NORM_MULTIPLE  # the adaptive bound; 0: off
    sample_cap: float = DEFAULT_CAP  # a claim: at most this x the partial's lower median
    resend_after: float = 30.0  # seconds before an unanswered partial is sent again
    # the root coordinator's Ed25519 public key ("ed25519:..." or a file holding it or a
    # PEM public key): tasks and models must carry its signature. None: from --credentials,
    # else accepted unsigned
    coordinator_key: str | None = None
    # revision 2.8: refuse every device update not signed by its device's key (reason
    # "signature"), keys from device_keys (default: signing/devices.pub beside --credentials)
    require_signed_updates: bool = False
    device_keys: Path | None = None
    duration: float | None = None  # seconds to run (None: until stopped)
    sync: str = "normal"

    def __post_init__(self) -> None:
        if not self.region:
            raise ValueError("give the region (--region), as the root's --bridge-region named it")
        check_region(self.region)
        Topics(self.prefix)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not 1 <= self.partial_size <= 10_000:
            raise ValueError(f"partial_size must be 1-10000, got {self.partial_size}")
        for name in ("partial_timeout", "resend_after"):
            if not 0 < getattr(self, name) <= 86_400:
                raise ValueError(f"{name} must be in (0, 86400] seconds")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be > 0 seconds")
        if not self.max_norm > 0:
            raise ValueError("max_norm must be > 0")
        if not self.sample_cap >= 1:
            raise ValueError("sample_cap must be >= 1")
        NormRule(multiple=self.norm_multiple)
        try:
            spec = parse_codec(self.partial_codec)
        except ValueError as exc:
            raise ValueError(f"partial_codec: {exc}") from None
        if spec.base in ("topk", "sparse"):
            raise ValueError(f"partial_codec {self.partial_codec!r}: a partial is dense (a "
                             "mean of many updates); use fp32, fp16, int8 or int4")
        check_transport_choice(
            self.host, self.tls, insecure_plaintext=self.insecure_plaintext,
            ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key,
        )

    def settings(self, password: str) -> ConnectionSettings:
        return ConnectionSettings(
            host=self.host, port=self.broker_port(), client_id=self.username,
            username=self.username, password=password, tls=self.tls_settings(),
            max_queued=100_000,
        )


class RegionAggregator:
    """One region's aggregator; ``run()`` until ``stop()`` or ``duration``."""

    def __init__(self, config: RegionConfig, password: str, *,
                 transport: Callable[..., Transport] = MqttClient) -> None:
        self.config = config
        self.name = region_aggregator_id(config.region)
        self.topics = Topics(config.prefix)
        state = Path(config.state_dir)
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the state directory {state}: {exc}") from None
        self.store = RegionStore(state / STATE_FILE, sync=config.sync)
        self.book = RegionBook(config.partial_size, config.partial_timeout,
                               cap=config.sample_cap)
        self.rule = NormRule(multiple=config.norm_multiple)
        self._norms = tuple(self.store.norms(self.rule.window))
        self._chunks = ChunkIntake(
            chunk_limits(8 * 1024 * 1024, 0, 256 * 1024 * 1024, 120.0),
            max_chunk_bytes=8 * 1024 * 1024,
            store=ChunkStore(state / CHUNKS_FILE, sync=config.sync))
        self._codec = parse_codec(config.partial_codec)
        # every partial is signed (revision 2.8): a root that requires signed updates takes
        # it once this key is registered for fedbus-region-<region> (signing.pub beside it)
        self._verifier: Verifier | None = (
            load_public_key(config.coordinator_key) if config.coordinator_key else None)
        self._device_keys: DeviceKeyFile | None = None
        if config.require_signed_updates:
            if config.device_keys is None:
                raise ConfigError("--require-signed-updates needs the device-key file: give "
                                  "--device-keys or --credentials")
            self._device_keys = DeviceKeyFile(config.device_keys)
        self._signer = ensure_private_key(state / SIGNING_KEY_FILE)
        log.info("partials are signed with %s (register it on the root as: %s %s)",
                 state / SIGNING_KEY_FILE, self.name, key_text(self._signer))
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.ready = threading.Event()  # connected and subscribed
        self._task: Task | None = None
        self._limits: ValidationLimits | None = None  # the task's bounds, made once per task
        self._version: int | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._model_norm = 0.0
        self._early: list[tuple[str, bytes, bool]] = []
        self._unread_model: bytes | None = None  # a model that came before its task
        self._restored = False
        self._sent_at: dict[str, float] = {}  # partial id -> monotonic time last sent
        self._resend_check = 0.0  # when to look for unanswered partials next
        self.counters: dict[str, int] = dict.fromkeys(
            ["updates_received", "updates_accepted", "updates_rejected", "updates_repeated",
             "partials_sent", "partials_resent", "partials_accepted", "partials_rejected",
             "bytes_up", "bytes_from_devices", "bad_signatures"], 0)
        self.client = transport(config.settings(password), on_message=self._on_message)

    # -- running ---------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Serve until ``stop()`` (or ``duration``); closes every open partial, sends it,
        and returns the counters."""
        t = self.topics
        self.client.start()
        self.client.subscribe(t.task, qos=1)
        self.client.subscribe(t.model, qos=1)
        self.client.subscribe(t.model_chunks, qos=1)
        self.client.subscribe(t.all_updates, qos=1, no_local=True, retain_as_published=True)
        self.client.subscribe(t.receipt(self.name), qos=1)
        if not self.client.wait_connected(30.0):
            self.client.stop()
            raise ConfigError(f"no connection to the regional broker at {self.config.host}:"
                              f"{self.config.broker_port()} within 30 s")
        # from here the broker keeps the devices' updates for this durable session, also
        # while this process is down
        log.info("region %s: aggregating the updates of %s (partials of %d, up as %s)",
                 self.config.region, t.all_updates, self.config.partial_size,
                 t.update(self.name))
        if self._verifier is None:
            log.warning("no root coordinator key (--coordinator-key, or coordinator_key in the "
                        "credentials file): tasks and models are accepted unsigned, from "
                        "anyone who can write their topics on the regional broker")
        else:
            log.info("tasks and models must be signed by the root coordinator's key %s",
                     self._verifier)
        if self._device_keys is not None:
            log.info("signed device updates required: device keys from %s (%d known now)",
                     self._device_keys.path, len(self._device_keys.keys()))
        self.ready.set()
        end = None if self.config.duration is None else time.monotonic() + self.config.duration
        try:
            while not self._stop.wait(_TICK):
                if self.client.fatal is not None:
                    raise self.client.fatal
                if end is not None and time.monotonic() >= end:
                    break
                with self._lock:
                    self._tick(time.monotonic())
            with self._lock:
                sent = [r for closed in self.book.flush() for r in self._send(closed)]
            # stored already (a later start sends them again if the broker did not take
            # them): wait only for the broker's PUBACKs, not for the root's answer
            deadline = time.monotonic() + 5.0
            for result in sent:
                result.wait(max(0.0, deadline - time.monotonic()))
        finally:
            self.client.stop()
            self.store.close()
            self._chunks.store.close()
        return dict(self.counters)

    def stop(self) -> None:
        self._stop.set()

    def _tick(self, now: float) -> None:
        if self._shapes is None:
            return
        for closed in self.book.due(now, self._version):
            self._send(closed)
        if now >= self._resend_check:  # once a second: it reads the stored partials
            self._resend_check = now + 1.0
            for stored in self.store.unanswered():
                last = self._sent_at.get(stored.partial_id)
                if last is None or now - last >= self.config.resend_after:
                    self._publish_partial(stored)
                    self.counters["partials_resent"] += 1
        self._chunks.expire(now)

    # -- messages (the transport's thread) ----------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        try:
            with self._lock:
                self._dispatch(msg, time.monotonic())
        except Exception:  # one bad message must never kill the network thread
            log.exception("failed to handle a message on %s", msg.topic)

    def _dispatch(self, msg: Message, now: float) -> None:
        t = self.topics
        if msg.topic == t.task:
            self._on_task(msg.payload)
        elif msg.topic == t.model or t.is_model_chunk(msg.topic):
            self._on_model(msg.payload, now)
        elif msg.topic == t.receipt(self.name):
            self._on_receipt(msg.payload)
        else:
            device = t.device_of(msg.topic)
            if device is None or device == self.name or not msg.topic.startswith(
                    t.update(device)):
                return
            payload = msg.payload
            if not payload:  # a cleared retained update: nothing to judge
                return
            if msg.retain:  # judged (refused), then cleared, as the coordinator does
                self.client.publish(msg.topic, b"", qos=1, retain=True)
                if is_chunk(payload):  # a retained chunk is refused unread
                    return
            if is_chunk(payload):
                completed = self._chunks.add(device, payload, now)
                if completed is None:
                    return
                self._judge(device, completed.payload, msg.retain, now)
                self._chunks.done(completed)
                return
            self._judge(device, payload, msg.retain, now)

    def _signed_by_root(self, topic: str, payload: bytes) -> bool:
        """True if ``payload`` may be acted on: it carries the root coordinator's valid
        signature for ``topic``, or this aggregator has no key to check it with. Otherwise
        one log line and a count."""
        if self._verifier is None:
            return True
        try:
            self._verifier.verify(topic, payload)
        except SignatureError as exc:
            self.counters["bad_signatures"] += 1
            log.warning("ignoring a message on %s: %s", topic, exc)
            return False
        return True

    def _on_task(self, payload: bytes) -> None:
        if not payload or len(payload) > _TASK_LIMITS.max_bytes:
            if payload:
                log.warning("ignoring a task of %d bytes (at most %d)", len(payload),
                            _TASK_LIMITS.max_bytes)
            return
        if not self._signed_by_root(self.topics.task, payload):
            return
        try:
            task = Task.from_wire(unpack(payload, "task", _TASK_LIMITS))
        except ProtocolError as exc:
            log.warning("ignoring a malformed task: %s", exc)
            return
        if self._older_run(task):
            return
        if self._task is not None and task.run_id != self._task.run_id:
            self._version, self._shapes = None, None
        if self.store.run() != task.run_id:
            gone = self.book.clear() + [
                Part(p.update_id, p.device_id, p.base_version, 1, {})
                for p in self.store.open_parts()]
            if gone:
                log.warning("run %s replaces %s: %d update(s) of the old run given up",
                            task.run_id, self.store.run(), len(gone))
            self.store.dropped(p.update_id for p in gone)
            self.store.set_run(task.run_id, task.created_at)
        self._task = task
        self._limits = ValidationLimits(max_update_bytes=task.max_update_bytes,
                                        max_norm=self.config.max_norm,
                                        max_staleness=task.max_staleness)
        log.info("task %s of run %s (%s)", task.task_id, task.run_id, task.state)
        if self._unread_model is not None:
            model, self._unread_model = self._unread_model, None
            self._on_model(model, time.monotonic())

    def _older_run(self, task: Task) -> bool:
        """With the root's key: a genuine task of a run that began before the run this
        aggregator follows (known from its state across restarts), published again by
        someone who can write the task topic. Never go back to it (logged)."""
        if self._verifier is None:
            return False
        joined = self.store.run()
        began = self.store.run_created()
        if joined is None or began is None or joined == task.run_id or task.created_at >= began:
            return False
        log.warning("ignoring the task of run %s: it began before run %s, which this "
                    "aggregator follows", task.run_id, joined)
        return True

    def _on_model(self, payload: bytes, now: float) -> None:
        if not payload:
            return
        if is_chunk(payload):
            try:
                chunk = read_chunk(payload, _MAX_MODEL_BYTES)
            except ProtocolError as exc:
                log.warning("ignoring a model chunk: %s", exc)
                return
            outcome = self._chunks.reassembler.add("coordinator", chunk, now)
            if outcome.status != "complete" or outcome.payload is None:
                return
            payload = outcome.payload
        # a chunked model is checked whole, as the model it reassembles to (section 7.9)
        if len(payload) <= _MAX_MODEL_BYTES and not self._signed_by_root(self.topics.model,
                                                                          payload):
            return
        try:
            model = GlobalModel.read(payload, DecodeLimits(max_bytes=_MAX_MODEL_BYTES,
                                                           max_bin_len=_MAX_MODEL_BYTES))
            tensors = decode_update_delta(model.tensors, model.compression)
        except (ProtocolError, ValueError) as exc:
            log.warning("ignoring a malformed model: %s", exc)
            return
        task = self._task
        if task is None:
            self._unread_model = payload
            return
        if model.run_id != task.run_id:
            return
        if self._version is not None and model.version <= self._version:
            return
        self._version = model.version
        self._shapes = {name: tuple(a.shape) for name, a in tensors.items()}
        self._model_norm = l2_norm(tensors)
        log.info("model version %d", model.version)
        oldest = model.version - task.max_staleness
        gone = self.book.drop_older_than(oldest)
        if gone:
            self.store.dropped(p.update_id for p in gone)
            log.warning("%d update(s) older than version %d given up", len(gone), oldest)
        if not self._restored:
            self._restore(now)
        early, self._early = self._early, []
        for device, body, retained in early:
            self._judge(device, body, retained, now)

    def _restore(self, now: float) -> None:
        """The parts a stopped aggregator held, back in their open partials."""
        self._restored = True
        assert self._shapes is not None
        parts = self.store.open_parts()
        for stored in parts:
            update = Update.read(stored.payload)
            delta = decode_update_delta(update.delta, update.compression,
                                        expected_shapes=self._shapes)
            if stored.clip is not None:
                delta, _ = clip_norm(delta, stored.clip)
            for closed in self.book.add(Part(stored.update_id, stored.device_id,
                                             stored.base_version, update.num_samples,
                                             delta, update.metrics), now):
                self._send(closed)
        if parts:
            log.info("took back %d accepted update(s) from %s", len(parts),
                     self.config.state_dir)
        # chunked device updates (revision 2.6) whose chunks a stopped process had kept
        for completed in self._chunks.restore(now):
            self._judge(completed.device, completed.payload, False, now)
            self._chunks.done(completed)

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = Receipt.from_wire(unpack(payload, "receipt", _TASK_LIMITS))
        except ProtocolError as exc:
            log.warning("ignoring a malformed receipt: %s", exc)
            return
        verdict = "accepted" if receipt.accepted else str(receipt.reason)
        if not self.store.answered(receipt.update_id, verdict):
            return
        self._sent_at.pop(receipt.update_id, None)
        if receipt.accepted:
            self.counters["partials_accepted"] += 1
            log.info("the root accepted partial %s: %s", receipt.update_id, receipt.detail)
        else:
            self.counters["partials_rejected"] += 1
            log.warning("the root refused partial %s: %s (%s)", receipt.update_id,
                        receipt.reason, receipt.detail)

    # -- judging one device update -----------------------------------------------------------

    def _judge(self, device: str, payload: bytes, retained: bool, now: float) -> None:
        task, shapes, version, limits = self._task, self._shapes, self._version, self._limits
        if task is None or shapes is None or version is None or limits is None:
            if len(self._early) < _EARLY:
                self._early.append((device, payload, retained))
            return
        self.counters["bytes_from_devices"] += len(payload)
        result = validate_update(
            payload, topic_device=device, run_id=task.run_id, task_id=task.task_id,
            expected_shapes=shapes, current_version=version,
            limits=limits,
            ledger=self.store, retained=retained,
            signature_check=None if self._device_keys is None else self._device_signature,
        )
        if isinstance(result, Repeated):
            self.counters["updates_repeated"] += 1
            v = result.verdict
            self._receipt(device, Receipt(
                update_id=v.update_id, run_id=task.run_id, accepted=v.accepted,
                reason=v.reason, detail=v.detail, model_version=v.model_version,
                staleness=v.staleness, repeat=True))
            return
        self.counters["updates_received"] += 1
        if isinstance(result, Rejected):
            self._reject(device, result.update_id, result.base_version, result.digest,
                         result.size, result.reason, result.detail)
            return
        if task.ended:  # as the coordinator: judged, then refused (its partial would be)
            update = result.update
            self._reject(device, update.update_id, update.base_version, result.digest,
                         result.size, "run_ended", f"the run has ended: {task.end_reason}")
            return
        self._accept(device, result, now)

    def _device_signature(self, device: str, payload: bytes) -> str | None:
        """Why ``payload`` is not signed by ``device``'s registered key (None: it is)."""
        assert self._device_keys is not None
        return update_signature_problem(self._device_keys.keys(), self.topics.update(device),
                                        device, payload)

    def _reject(self, device: str, update_id: str | None, base: int | None, digest: bytes,
                size: int, reason: str, detail: str) -> None:
        self.counters["updates_rejected"] += 1
        log.warning("rejected update %s from %s: %s (%s)", update_id or "?", device, reason,
                    detail)
        if update_id is None:
            return
        assert self._task is not None and self._version is not None
        if base is not None:  # remembered (a used id is never overwritten)
            self.store.judged(Verdict(update_id, device, digest, base, False, reason, detail,
                                      self._version, None, size))
        self._receipt(device, Receipt(
            update_id=update_id, run_id=self._task.run_id, accepted=False, reason=reason,
            detail=detail, model_version=self._version))

    def _accept(self, device: str, acc: Accepted, now: float) -> None:
        assert self._task is not None and self._version is not None
        update = acc.update
        decision = decide_norm(self.rule, acc.norm, self._norms, self._model_norm)
        if decision.action == "reject":
            self._reject(device, update.update_id, update.base_version, acc.digest, acc.size,
                         "norm", f"L2 norm {acc.norm:.6g} exceeds the adaptive bound "
                         f"{decision.reject_bound:.4g} ({decision.basis})")
            return
        clip = decision.clip_bound if decision.action == "clip" else None
        delta: dict[str, np.ndarray] = dict(acc.delta)
        detail = f"folded into a partial of region {self.config.region} (base version " \
                 f"{update.base_version})"
        if clip is not None:
            delta, _ = clip_norm(delta, clip)
            detail += f"; clipped from L2 norm {acc.norm:.4g} to {clip:.4g}"
        self._norms = pushed(self._norms, acc.norm, self.rule.window)
        self.store.judged(
            Verdict(update.update_id, device, acc.digest, update.base_version, True, None,
                    detail, self._version, acc.staleness, acc.size),
            norm=acc.norm,
            part=StoredPart(update.update_id, device, update.base_version, clip, acc.payload))
        self.counters["updates_accepted"] += 1
        self._receipt(device, Receipt(
            update_id=update.update_id, run_id=self._task.run_id, accepted=True, reason=None,
            detail=detail, model_version=self._version, staleness=acc.staleness))
        for closed in self.book.add(Part(update.update_id, device, update.base_version,
                                         update.num_samples, delta, update.metrics), now):
            self._send(closed)

    def _receipt(self, device: str, receipt: Receipt) -> None:
        self.client.publish(self.topics.receipt(device), pack(receipt.to_wire()), qos=1)

    # -- partials up -------------------------------------------------------------------------

    def _send(self, closed: ClosedPartial) -> list[PublishResult]:
        """Encode ``closed``, store it (with its parts taken out), then publish it."""
        assert self._task is not None
        pid = partial_id(self.config.region, self.store.next_seq())
        wire, compression = encode_update_delta(closed.delta, self._codec,
                                                rng=np.random.default_rng())
        body = Update(
            update_id=pid, device_id=self.name, task_id=self._task.task_id,
            base_version=closed.base_version, num_samples=closed.weight, delta=wire,
            metrics=closed.metrics, sent_at=time.time(), compression=compression,
            run_id=self._task.run_id, parts=len(closed.parts),
        ).pack()
        payload = sign_message(self._signer, self.topics.update(self.name), body)
        stored = StoredPartial(pid, closed.base_version, len(closed.parts), payload)
        self.store.made(stored, closed.update_ids)
        log.info("partial %s: %d update(s) on version %d, weight %d, %d bytes (%s)", pid,
                 len(closed.parts), closed.base_version, closed.weight, len(payload),
                 closed.reason)
        self.counters["partials_sent"] += 1
        return self._publish_partial(stored)

    def _publish_partial(self, stored: StoredPartial) -> list[PublishResult]:
        topic = self.topics.update(self.name)
        limit = self.client.max_packet_size
        payloads = [stored.payload]
        if publish_packet_size(topic, len(stored.payload)) > limit:  # revision 2.6
            payloads = split(stored.payload, chunk_data_size(limit, topic), stored.partial_id)
        results = []
        for body in payloads:
            results.append(self.client.publish(topic, body, qos=1))
            self.counters["bytes_up"] += len(body)
        self._sent_at[stored.partial_id] = time.monotonic()
        return results


def summary_line(counters: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counters.items())
