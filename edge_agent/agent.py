"""The edge agent: waits for a task and a model, trains locally, publishes its delta.

Threads: the transport's network thread only keeps the newest task bytes and the newest
model of the run (by version, so a stale retained copy never replaces a newer one; a model
delta is applied there, one decompression and one XOR over the model), queues receipts, and
wakes the agent; the calling thread decodes, trains, publishes and owns the
durable state (``edge_agent.state``), so a long training never starves the keepalive.

What the agent guarantees (protocol v2, docs/protocol.md section 9):

- every trained update enters the outbox, in one transaction with the version it was
  trained on, before it is published; it leaves the outbox when its receipt arrives.
  After a reconnect the updates the broker had acknowledged but the coordinator has not
  answered are sent again (paho re-sends the unacknowledged ones itself), after a restart
  all of them; the coordinator answers a copy with the verdict it already gave;
- the agent trains at most once per model version of a run, across restarts, and never on
  a model older than the newest it has seen;
- it subscribes to the model with QoS 0: the broker queues no model versions for it while
  it is away, and the retained model (the newest) arrives on every reconnect, so a device
  back from a partition trains on the newest model, not on a backlog; and only between
  trainings (protocol revision 2.9): the versions made while it trains are never sent to it,
  and subscribing again afterwards brings the newest; in a run whose task says
  ``by_invitation`` (revision 2.10) it trains only once per ``invite`` the coordinator sends
  on its receipt topic, and follows the model topics only from an invitation to the start
  of the training it allows, on a model that arrived after the invitation;
- it follows model deltas (protocol revision 2.7): once it has rebuilt a version from the
  retained ``model_delta`` of the version it holds (checked bit for bit against the
  delta's digest), it unsubscribes from the whole model and receives only deltas; a delta
  it cannot apply (another base, a missed version, a digest that does not match)
  subscribes it to the whole model again, until the next delta applies;
- an outbox entry that can no longer be accepted (older than the task's ``max_staleness``,
  refused by the broker, over the outbox's bounds, of a run that ended or was replaced)
  is dropped with a log line; for a top-k task its content goes back into the residual;
- a task whose ``state`` is ``ended`` stops training: the agent waits for a new run, or
  exits (``on_run_end = "exit"``); one whose ``state`` is ``paused`` (revision 2.5) holds
  training back until the run resumes (connected, ``idle``, the outbox still sent);
- with the coordinator's public key (``coordinator_key``) it acts only on a task or model
  that carries the coordinator's valid signature for its topic (``fedbus.signing``); any
  other is ignored with one log line and counted (``AgentStats.bad_signatures``), never
  trained on. Without a key it accepts them unsigned and says so once at start-up.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.gate import TrainingGate
from edge_agent.policy import Decision
from edge_agent.residual import encode_with_feedback
from edge_agent.state import STATE_FILE, AgentState, OutboxEntry
from fedbus import __version__
from fedbus.chunks import ChunkLimits, Reassembler, chunk_data_size, is_chunk, read_chunk, split
from fedbus.codec_spec import parse_codec
from fedbus.envelope import DecodeLimits, pack, unpack
from fedbus.errors import ConfigError, MessageTooLarge, ProtocolError
from fedbus.messages import (
    MAX_STATUS_ERROR,
    GlobalModel,
    Invite,
    ModelDelta,
    Receipt,
    Status,
    Task,
    Update,
    new_update_id,
)
from fedbus.model_delta import apply_model_delta
from fedbus.preprocess import KNOWN_REQUIREMENTS, encode_labels
from fedbus.signing import (
    SignatureError,
    Verifier,
    key_text,
    load_private_key,
    load_public_key,
    sign_message,
)
from fedbus.topics import Topics
from fedbus.transport import (
    ConnectionSettings,
    Message,
    MqttClient,
    PublishGroup,
    PublishResult,
    Transport,
    TransportFactory,
    Will,
    connect_timeout_error,
    publish_packet_size,
)
from fedbus.update_codec import decode_update_delta, encode_update_delta

__all__ = ["Agent", "AgentStats", "LocalData", "pacing_delay", "rate_limit_hold"]

log = logging.getLogger(__name__)

_SMALL = DecodeLimits(max_bytes=64 * 1024, max_bin_len=1024)
# after a reconnect, wait this long for the retained model before re-sending the outbox,
# so an update that became too stale during the outage is dropped, not sent to be rejected
_RESEND_GRACE = 2.0
# stopping on max_updates: how long the last updates may take to leave
_FLUSH_SECONDS = 10.0
# rejections after which the content of a top-k update is not worth sending again: the
# coordinator applied it (a repeat), or the same work is already in
_NO_FEEDBACK = ("duplicate_work",)
# a rate_limited receipt (protocol revision 2.4): wait what it says, at least and at most
_RATE_LIMIT_MIN = 1.0
_RATE_LIMIT_MAX = 300.0
_RATE_LIMIT_DEFAULT = 10.0  # a receipt without retry_after
_RATE_LIMIT_JITTER = 0.2  # up to 20% more, so devices refused together do not return together
# a chunked model (revision 2.6) whose chunks stop coming for this long is given up (logged),
# and the model topics are subscribed to again: the broker re-sends the retained chunks
CHUNK_TIMEOUT = 30.0


def rate_limit_hold(retry_after: float | None, jitter: float) -> float:
    """Seconds to hold the outbox after a ``rate_limited`` receipt: the coordinator's
    ``retry_after`` (10 s when it gave none) kept within 1 s and 5 min, stretched by up to
    20% (``jitter`` in [0, 1))."""
    wait = _RATE_LIMIT_DEFAULT if retry_after is None else retry_after
    wait = min(max(wait, _RATE_LIMIT_MIN), _RATE_LIMIT_MAX)
    return wait * (1.0 + _RATE_LIMIT_JITTER * min(max(jitter, 0.0), 1.0))


@dataclass(frozen=True)
class LocalData:
    x: np.ndarray
    y: np.ndarray


@dataclass
class AgentStats:
    updates_published: int = 0  # updates produced and sent (re-sends not counted)
    updates_acknowledged: int = 0  # PUBACKs received for them
    updates_refused: int = 0  # refused by the broker
    updates_resent: int = 0
    updates_dropped: int = 0
    receipts_accepted: int = 0
    receipts_rejected: int = 0
    receipts_rate_limited: int = 0  # refused unjudged; the update stays and goes again
    bytes_uploaded: int = 0
    last_version: int | None = None
    train_seconds: float = 0.0
    rejections: dict[str, int] = field(default_factory=dict)
    # tasks and models ignored because their signature was missing or did not verify
    bad_signatures: int = 0
    # chunked messages (protocol revision 2.6)
    models_chunked: int = 0  # models received in chunks and reassembled
    model_chunks_refused: int = 0  # chunks malformed, conflicting or over the limits
    model_chunk_timeouts: int = 0  # partial models given up for want of a chunk
    updates_chunked: int = 0  # sends of an update that went in chunks
    # models received whole, and versions rebuilt from a model delta (revision 2.7)
    models_received: int = 0
    model_deltas_applied: int = 0
    invitations: int = 0  # revision 2.10: invitations to train received
    bytes_models: int = 0  # model and model_delta payloads received, both


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


class Agent:
    """One device's agent. ``run()`` blocks until stopped, ``max_updates`` is reached, or
    the run ends with ``on_run_end = "exit"``."""

    def __init__(
        self,
        config: AgentConfig,
        data: LocalData,
        *,
        password: str,
        transport_factory: TransportFactory = MqttClient,
    ) -> None:
        self.config = config
        self.data = data
        self.topics = Topics(config.prefix)
        self.stats = AgentStats()
        self._stop = threading.Event()
        self._pacing_warned = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        # written by the network thread, read by the agent thread (under _lock)
        self._task_bytes: bytes | None = None
        self._model_msg: GlobalModel | None = None  # the newest of its run
        # (run, version, float32 tensors) of _model_msg once decoded for a model delta, and
        # whether the agent is subscribed to the whole model (else it follows the deltas)
        self._held: tuple[str, int, dict[str, np.ndarray]] | None = None
        self._whole_model = True
        self._models_since_connect = 0
        # revision 2.10: the run of the invitation held (None: none), model messages received
        # so far and when the invitation came, so it trains on a model received after it
        self._invited_run: str | None = None
        # revision 2.13: the id of the newest invitation known (held, or used: then stored
        # with its update, so it survives a restart), named in every status
        self._invite_known: str | None = None
        self._invite_training: str | None = None  # the id of the invitation being used
        self._model_arrivals = 0
        self._arrivals_at_invite = 0
        # revision 2.9: whether the model topics are followed (between trainings), and the
        # model topics subscribed to now (_sync_model_subscriptions)
        self._models_followed = False
        self._model_subscribed: list[str] = []
        self._subscription_lock = threading.Lock()
        self._receipts: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        # a chunked model being reassembled (network thread; the agent thread expires it)
        # decode limits of a model or model delta message (both at most --max-model-bytes)
        self._model_limits = DecodeLimits(
            max_bytes=config.max_model_bytes, max_bin_len=config.max_model_bytes
        )
        self._chunk_lock = threading.Lock()
        self._model_chunks = Reassembler(ChunkLimits(
            max_message_bytes=config.max_model_bytes,
            max_sender_bytes=2 * config.max_model_bytes + 64 * 1024,
            max_total_bytes=2 * config.max_model_bytes + 64 * 1024,
            timeout=CHUNK_TIMEOUT,
        ))
        self._connected_at: float | None = None  # monotonic, set by each (re)connect
        # agent thread only
        self._task: Task | None = None  # the task joined (its run is the current run)
        self._decoded_task_bytes: bytes | None = None
        self._model: Any = None  # torch module for the current task (torch loads lazily)
        # local inputs shaped (and normalised) for the current task's model, and its labels
        # as class indices (fedbus.preprocess): set by _prepare
        self._x: np.ndarray = data.x
        self._y: np.ndarray = data.y
        self._unusable: tuple[str, str] | None = None  # (run, task) this device cannot train
        self._ended_logged: str | None = None
        self._paused_logged: str | None = None  # the run whose pause was said (rev 2.5)
        self._training = False
        # the last problem that kept this device from contributing (kind, text), reported
        # in its status until an update is trained again (protocol 2.3)
        self._error: tuple[str, str] | None = None
        # outbox id -> its last publish (several, for an update sent in chunks)
        self._sends: dict[str, PublishResult | PublishGroup | None] = {}
        # a reconnect's grace before re-sending; at start, the outbox of an earlier process
        self._resend_due: float | None = 0.0
        self._inherited: set[str] = set()  # outbox entries an earlier process made
        self._hold_until = 0.0  # monotonic: send nothing before (a rate_limited receipt)
        # revision 2.8: this device's key; every update is signed on its update topic
        self._signer = (
            load_private_key(config.signing_key) if config.signing_key is not None else None
        )
        self._verifier: Verifier | None = (
            load_public_key(config.coordinator_key) if config.coordinator_key else None
        )
        # the device training policy (edge_agent.gate): when and how hard this device trains
        self._gate = TrainingGate(config.training_policy(), sleep=self._stop.wait,
                                  on_change=self._on_policy_change)
        self.state = AgentState(config.state_path() / STATE_FILE,
                                ledger_capacity=config.ledger_size)
        self._invite_known = self.state.invite_used()
        device = config.device_id
        self.client: Transport = transport_factory(
            ConnectionSettings(
                host=config.host,
                port=config.broker_port(),
                tls=config.tls_settings(),
                client_id=device,
                username=device,
                password=password,
                keepalive=config.keepalive,
                max_packet_size=config.max_model_bytes,
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
        elif msg.topic == self.topics.model or self.topics.is_model_chunk(msg.topic):
            with self._lock:
                self.stats.bytes_models += len(msg.payload)
            payload: bytes | None = msg.payload
            if is_chunk(msg.payload):
                payload = self._model_chunk(msg.payload)
            elif msg.topic != self.topics.model:
                return  # a cleared chunk topic (empty), or something that is no chunk
            if payload is not None and self._signed_by_coordinator(
                    self.topics.model, payload, self.config.max_model_bytes):
                self._keep_newest_model(payload)
        elif msg.topic == self.topics.model_delta:
            with self._lock:
                self.stats.bytes_models += len(msg.payload)
            if self._signed_by_coordinator(msg.topic, msg.payload,
                                           self.config.max_model_bytes):
                self._follow_delta(msg.payload)
        elif msg.topic == self.topics.receipt(self.config.device_id):
            self._receipts.put(msg.payload)
            self._wake.set()

    def _signed_by_coordinator(self, topic: str, payload: bytes, max_bytes: int) -> bool:
        """True if ``payload`` may be acted on: it carries the coordinator's valid signature
        for ``topic``, or this agent has no key to check it with. Otherwise one log line and
        a count (either thread may call this). A payload over ``max_bytes`` is left to the
        decoder, which refuses it (``too_large``) without reading it."""
        if self._verifier is None or len(payload) > max_bytes:
            return True
        try:
            self._verifier.verify(topic, payload)
        except SignatureError as exc:
            with self._lock:
                self.stats.bad_signatures += 1
            log.warning("ignoring a message on %s: %s", topic, exc)
            return False
        return True

    def _model_chunk(self, payload: bytes) -> bytes | None:
        """Take one chunk of a chunked model (revision 2.6); the whole model message once
        every chunk of it is there (its SHA-256 checked; its signature is checked next, as
        for a model that came whole). Partial models of earlier publications are then
        given up: the coordinator publishes the chunks of one model after the other."""
        with self._chunk_lock:
            try:
                chunk = read_chunk(payload, self.config.max_model_bytes)
            except ProtocolError as exc:
                self.stats.model_chunks_refused += 1
                log.warning("ignoring a model chunk: %s", exc)
                return None
            outcome = self._model_chunks.add("coordinator", chunk, time.monotonic())
            if outcome.status == "rejected":
                self.stats.model_chunks_refused += 1
                log.warning("ignoring chunk %d of %d of model %s: %s (%s)", chunk.index,
                            chunk.count, chunk.id, outcome.reason, outcome.detail)
            for gone in outcome.dropped:
                log.warning("gave up the chunked model %s (%d of %d chunks): %s (%s)",
                            gone.id, gone.received, gone.count, gone.reason, gone.detail)
            if outcome.status != "complete":
                return None
            self.stats.models_chunked += 1
            for gone in self._model_chunks.drop_sender("coordinator", "superseded", ""):
                log.debug("gave up the partial model %s: a later one is whole", gone.id)
            log.debug("model reassembled from %d chunks (%d bytes)", chunk.count, chunk.size)
            return outcome.payload

    def _expire_model_chunks(self) -> None:
        """Give up a chunked model whose chunks stopped coming (the agent receives models at
        QoS 0: the broker may drop one) and subscribe to the model topics again, so the
        broker sends the retained model, every chunk of it, once more."""
        with self._chunk_lock:
            gone = self._model_chunks.expire(time.monotonic())
        for partial in gone:
            self.stats.model_chunk_timeouts += 1
            log.warning("gave up the chunked model %s: %s; asking the broker for the "
                        "retained model again", partial.id, partial.detail)
        if gone:  # subscribing again to what it follows: the retained chunks come again
            with self._subscription_lock:
                for topic in self._model_subscribed:
                    if topic != self.topics.model_delta:
                        self.client.subscribe(topic, qos=0)

    def _keep_newest_model(self, payload: bytes) -> None:
        """Keep a model only if it is the newest seen for its run (the tensors stay
        encoded until the agent thread trains on them)."""
        try:
            model = GlobalModel.read(payload, self._model_limits)
        except ProtocolError as exc:
            log.warning("ignoring malformed model message: %s", exc)
            return
        with self._lock:
            held = self._model_msg
            if held is None or held.run_id != model.run_id or model.version > held.version:
                self._model_msg = model
                self._held = None
            self._models_since_connect += 1
            self._model_arrivals += 1
            self.stats.models_received += 1
        self._wake.set()

    def _follow_delta(self, payload: bytes) -> None:
        """Rebuild the next version from a model delta if it applies to the model held;
        otherwise make sure the whole model comes (network thread)."""
        try:
            delta = ModelDelta.read(payload, self._model_limits)
        except ProtocolError as exc:
            log.warning("ignoring malformed model delta: %s", exc)
            return
        with self._lock:
            held, cached = self._model_msg, self._held
        if held is not None and held.run_id == delta.run_id and delta.version <= held.version:
            with self._lock:  # a retained copy of what the agent holds: it is current
                self._models_since_connect += 1
                self._model_arrivals += 1
            self._wake.set()
            return
        if held is None or held.run_id != delta.run_id or delta.base != held.version:
            self._want_whole_model("the model delta is not for the version held")
            return
        try:
            if cached is None or cached[:2] != (held.run_id, held.version):
                base = decode_update_delta(held.tensors, held.compression)
            else:
                base = cached[2]
            tensors = apply_model_delta(base, delta.delta, delta.sha)
        except ProtocolError as exc:
            self._want_whole_model(f"model delta v{delta.version} does not apply: {exc}")
            return
        wire, _ = encode_update_delta(tensors, "fp32")  # exact: what training decodes
        model = GlobalModel(task_id=delta.task_id, version=delta.version, tensors=wire,
                            created_at=delta.created_at, run_id=delta.run_id)
        with self._lock:
            if self._model_msg is not held:  # a whole model came meanwhile
                return
            self._model_msg, self._held = model, (delta.run_id, delta.version, tensors)
            self.stats.model_deltas_applied += 1
            self._models_since_connect += 1
            self._model_arrivals += 1
            whole, self._whole_model = self._whole_model, False
        if whole:
            log.info("following model deltas from v%d on", delta.version)
            self._sync_model_subscriptions()
        self._wake.set()

    def _want_whole_model(self, why: str) -> None:
        with self._lock:
            whole, self._whole_model = self._whole_model, True
        if not whole:
            log.info("subscribing to the whole model again: %s", why)
            self._sync_model_subscriptions()

    def _on_connect(self, session_present: bool) -> None:
        task = self._task
        state = ("training" if self._training
                 else "idle" if task is not None and task.paused else "online")
        self.client.publish(
            self.topics.status(self.config.device_id), self._status(state), retain=True
        )
        with self._lock:
            self._connected_at = time.monotonic()
            self._models_since_connect = 0
        self._wake.set()

    # -- agent thread --------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        task = getattr(self, "_task", None)
        error = getattr(self, "_error", None)
        return pack(
            Status(
                self.config.device_id, state, self.stats.last_version, time.time(),
                run_id=task.run_id if task is not None else None, agent=__version__,
                error=None if error is None else error[1],
                error_kind=None if error is None else error[0],
                invite=getattr(self, "_invite_known", None), invite_aware=True,
            ).to_wire()
        )

    def _report_error(self, kind: str, text: str) -> None:
        """Tell the operator (through the retained status) why this device is not
        contributing: ``kind`` one of ``fedbus.messages.ERROR_KINDS``."""
        text = "".join(c if c.isprintable() else " " for c in text)
        if len(text.encode()) > MAX_STATUS_ERROR:  # a limit in bytes of UTF-8
            text = text.encode()[: MAX_STATUS_ERROR - 3].decode(errors="ignore") + "..."
        self._error = (kind, text)
        self._publish_status("idle")

    def _publish_status(self, state: str) -> None:
        self.client.publish(
            self.topics.status(self.config.device_id), self._status(state), retain=True
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self, *, on_update: Callable[[AgentStats], None] | None = None) -> AgentStats:
        """Serve until stopped; raises ``FedbusError`` subclasses for what retrying cannot
        fix (refused credentials, ``connect_timeout``)."""
        import torch

        torch.set_num_threads(self.config.threads)
        device = self.config.device_id
        self.client.subscribe(self.topics.task, qos=1)
        # QoS 0: no model versions are queued while away; the retained one comes on connect.
        # Only between trainings (revision 2.9): dropped while training, taken again after;
        # the deltas (revision 2.7) always, the whole model (and its chunk topics, revision
        # 2.6) until a delta applies (_model_topics)
        self._follow_models(True)
        self.client.subscribe(self.topics.receipt(device), qos=1)
        self.client.start()
        try:
            self._gate.start()  # after the network thread started: only training is niced
        except ConfigError:
            self._shutdown()
            raise
        waiting = self.state.outbox()
        self._inherited = {e.update_id for e in waiting}
        log.info(
            "agent %s: %d local samples, %d update(s) in the outbox, connecting to %s:%d",
            device, len(self.data.y), len(waiting), self.config.host, self.config.broker_port(),
        )
        if self._verifier is None:
            log.warning(
                "no coordinator key (--coordinator-key, or coordinator_key in the credentials "
                "file): tasks and models are accepted unsigned, from anyone who can write "
                "their topics"
            )
        else:
            log.info("tasks and models must be signed by the coordinator's key %s",
                     self._verifier)
        if self._signer is not None:
            log.info("updates are signed with this device's key %s (protocol revision 2.8)",
                     key_text(self._signer))
        from edge_agent.train import warm_up

        log.debug("torch warm-up took %.2f s", warm_up())
        try:
            while not self._stop.is_set():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                self._raise_if_failed()
                self._expire_model_chunks()
                task = self._current_task()
                self._handle_receipts()
                self._reap_acks()
                if task is None:
                    continue
                if task.ended:
                    if self._on_run_ended(task):
                        break
                    continue
                self._follow_models(self._wants_models(task))
                self._drop_unusable(task)
                self._resend_if_due(task)
                self._pump(task)
                if self._run_paused(task):
                    continue  # the operator paused the run: connected, idle, outbox flowing
                allowed = self._gate.poll().train  # the training policy, said when it changes
                work = self._next_work(task)
                if work is None or not allowed:
                    continue  # nothing new, or paused (the outbox is still sent above)
                # revision 2.10: the invitation is used (2.13: its id is stored with the update)
                self._invited_run = None
                self._invite_training = self._invite_known if task.by_invitation else None
                # revision 2.9: no model deliveries while training; subscribing again
                # afterwards brings the retained model, the newest, at once (by invitation:
                # with the next invitation)
                self._follow_models(False)
                try:
                    self._train_and_publish(task, work)
                finally:
                    self._follow_models(self._wants_models(task))
                if on_update is not None:
                    on_update(self.stats)
                if self.config.max_updates and (
                    self.stats.updates_published >= self.config.max_updates
                ):
                    log.info("published %d updates; stopping", self.stats.updates_published)
                    self._flush(task, timeout=_FLUSH_SECONDS)
                    break
        finally:
            self._shutdown()
        return self.stats

    def _flush(self, task: Task, *, timeout: float) -> None:
        """Before stopping on ``max_updates``: give the outbox its chance to go out. A
        reconnect's grace can hold back the update just trained; without this the process
        would stop with it unsent (it would wait for the next start)."""
        deadline = time.monotonic() + timeout
        while self.client.connected and time.monotonic() < deadline:
            self._resend_if_due(task)
            self._pump(task)
            sends = [self._sends.get(e.update_id) for e in self.state.outbox(task.run_id)]
            if all(r is not None and r.done for r in sends):
                return
            time.sleep(0.05)

    def _follow_models(self, on: bool) -> None:
        """Take the model topics between trainings, drop them while training (revision 2.9,
        protocol 9.1)."""
        self._models_followed = on
        self._sync_model_subscriptions()

    def _model_topics(self) -> list[str]:
        """The model topics to be subscribed to now, in the order to subscribe: none while
        training (revision 2.9); else the model deltas (revision 2.7) and, unless the agent
        follows them, the whole model's chunk topics (revision 2.6) and the model itself."""
        if not self._models_followed:
            return []
        topics = [self.topics.model_delta]
        if self._whole_model:
            topics += [self.topics.model_chunks, self.topics.model]
        return topics

    def _sync_model_subscriptions(self) -> None:
        """Subscribe and unsubscribe (QoS 0) so that the model topics are ``_model_topics``
        (either thread: the agent thread around a training, the network thread when a delta
        applies or does not)."""
        with self._subscription_lock:
            want = self._model_topics()
            for topic in [t for t in reversed(self._model_subscribed) if t not in want]:
                self.client.unsubscribe(topic)
            for topic in [t for t in want if t not in self._model_subscribed]:
                self.client.subscribe(topic, qos=0)
            self._model_subscribed = want

    def _on_policy_change(self, decision: Decision) -> None:
        if not decision.train and not self._training:
            self._publish_status("idle")  # paused: connected, not training

    def _raise_if_failed(self) -> None:
        if self.client.fatal is not None:
            raise self.client.fatal
        timeout = connect_timeout_error(self.client, self.config.connect_timeout)
        if timeout is not None:
            raise timeout

    # -- task and run ----------------------------------------------------------------------

    def _current_task(self) -> Task | None:
        """The task the broker holds, decoded; joining a new run forgets the old one."""
        with self._lock:
            task_bytes = self._task_bytes
        if task_bytes is None:
            return self._task
        if task_bytes is self._decoded_task_bytes:
            return self._task
        self._decoded_task_bytes = task_bytes
        if not self._signed_by_coordinator(self.topics.task, task_bytes, _SMALL.max_bytes):
            return self._task
        try:
            task = Task.from_wire(unpack(task_bytes, "task", _SMALL))
        except ProtocolError as exc:
            log.warning("ignoring malformed task: %s", exc)
            return self._task
        old = self._task
        if self._older_run(task):
            return old
        if old is None or old.run_id != task.run_id:
            self._join(task)
        self._task = task
        return task

    def _older_run(self, task: Task) -> bool:
        """With a coordinator key: a genuine task of a run that began before the run this
        agent follows (known from ``agent.db`` across restarts), published again by someone
        who can write the task topic. Never go back to it (logged)."""
        if self._verifier is None:
            return False
        joined = ((self._task.run_id, self._task.created_at) if self._task is not None
                  else self.state.joined_run())
        if joined is None or joined[0] == task.run_id or task.created_at >= joined[1]:
            return False
        log.warning("ignoring the task of run %s: it began before run %s, which this agent "
                    "follows", task.run_id, joined[0])
        return True

    def _join(self, task: Task) -> None:
        dropped = self.state.start_run(task.run_id, task.created_at)
        for entry in dropped:
            self._sends.pop(entry.update_id, None)
            self.stats.updates_dropped += 1
            log.warning(
                "dropped update %s of run %s from the outbox: the coordinator now runs %s",
                entry.update_id, entry.run_id, task.run_id,
            )
        self._model = None
        self.stats.last_version = self.state.last_version(task.run_id)
        state = "ended" if task.ended else "running"
        log.info(
            "task %s, run %s (%s): %s %s", task.task_id, task.run_id, state, task.model.arch,
            task.model.args,
        )

    def _run_paused(self, task: Task) -> bool:
        """True while the operator has paused ``task``'s run (revision 2.5): no training;
        the agent stays connected, keeps sending its outbox and keeping the newest model,
        and says ``idle`` once. When the run resumes it trains on the newest model."""
        if task.paused:
            if self._paused_logged != task.run_id:
                self._paused_logged = task.run_id
                log.info("run %s is paused by the operator: not training until it resumes",
                         task.run_id)
                if not self._training:
                    self._publish_status("idle")
            return True
        if self._paused_logged == task.run_id:
            self._paused_logged = None
            log.info("run %s resumed", task.run_id)
        return False

    def _on_run_ended(self, task: Task) -> bool:
        """The run is over: say so once, give up what waits for receipts; True to exit.

        Only a run this device took part in makes it exit: the task the broker still holds
        from an earlier run (its new coordinator has not published its own yet) does not."""
        took_part = self.state.last_version(task.run_id) is not None
        leave = self.config.on_run_end == "exit" and took_part
        if self._ended_logged != task.run_id:
            self._ended_logged = task.run_id
            for entry in self.state.outbox(task.run_id):
                self._drop(entry, "the run has ended", task)
            log.info(
                "run %s of task %s has ended (%s)%s; %s", task.run_id, task.task_id,
                task.end_reason or "no reason given",
                "" if took_part else " without this device",
                "exiting" if leave else "waiting for a new run",
            )
            self._publish_status("idle")
        return leave

    # -- outbox ----------------------------------------------------------------------------

    def _handle_receipts(self) -> None:
        while True:
            try:
                payload = self._receipts.get_nowait()
            except queue.Empty:
                return
            try:
                obj = unpack(payload, None, _SMALL)
                if obj.get("kind") == "invite":  # revision 2.10, on the receipt topic
                    self._on_invite(Invite.from_wire(obj))
                    continue
                receipt = Receipt.from_wire(obj)
            except ProtocolError as exc:
                log.warning("ignoring malformed receipt: %s", exc)
                continue
            self._settle(receipt)

    def _on_invite(self, invite: Invite) -> None:
        """The coordinator invites this device to train once (revision 2.10): follow the
        model topics again; the training waits for a model that arrives from now on (the
        retained one, the newest, comes with the subscription). It counts for the run it
        names, whose task may come after it. Revision 2.13: an invitation whose id is the
        newest this agent knows (held, or used) is the same sent again: ignored, so that it
        never makes a second training."""
        if invite.invite_id is not None and invite.invite_id == self._invite_known:
            log.debug("invitation %s again: already %s", invite.invite_id,
                      "held" if self._invited_run is not None or self._training else "used")
            return
        self._invite_known = invite.invite_id
        if invite.invite_id is not None:  # say so: a status from before it is not read
            self._publish_status("idle")  # as a lost invitation (revision 2.13)
        with self._lock:
            self._arrivals_at_invite = self._model_arrivals
        self._invited_run = invite.run_id
        self.stats.invitations += 1
        log.debug("invited to train (global version %d)", invite.version)
        with self._subscription_lock:
            held = list(self._model_subscribed)
        self._follow_models(True)
        # an invitation that came before the agent thread dropped the model topics (just
        # after connecting, say) finds them subscribed: the retained model came before it,
        # so subscribe again for the broker to send it once more (MQTT v5 3.8.4, retain
        # handling 0) and the training it waits for can start
        for topic in held:
            self.client.subscribe(topic, qos=0)

    def _wants_models(self, task: Task) -> bool:
        """Whether the model topics are followed between trainings: always, unless the run
        trains by invitation (revision 2.10) and the agent holds none."""
        return not task.by_invitation or self._invited_run == task.run_id

    def _settle(self, receipt: Receipt) -> None:
        uid = receipt.update_id
        entry = next((e for e in self.state.outbox() if e.update_id == uid), None)
        if entry is None:
            log.debug("receipt for %s, which is no longer in the outbox", uid)
            return
        if not receipt.accepted and receipt.reason == "rate_limited":
            self._hold_for_rate_limit(entry, receipt)
            return
        self._sends.pop(uid, None)
        if receipt.accepted:
            self.state.settle(uid, "accepted", receipt.detail)
            self.stats.receipts_accepted += 1
            log.info(
                "update %s accepted%s (staleness %s, global version %d)", uid,
                " (repeated receipt)" if receipt.repeat else "", receipt.staleness,
                receipt.model_version,
            )
            return
        reason = receipt.reason or "unknown"
        self.stats.receipts_rejected += 1
        self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
        log.warning("update %s rejected: %s (%s)", uid, reason, receipt.detail)
        task = self._task
        if reason == "wrong_run" and (task is None or task.run_id != receipt.run_id):
            log.warning("the coordinator runs %s now; re-joining with its task",
                        receipt.run_id)
        feedback = reason not in _NO_FEEDBACK
        self._give_back(entry, "rejected", f"{reason}: {receipt.detail}", feedback)

    def _hold_for_rate_limit(self, entry: OutboxEntry, receipt: Receipt) -> None:
        """The coordinator refused the update unjudged because this device sent more than
        its share: it stays in the outbox, and nothing is sent before the hold is over."""
        self.stats.receipts_rate_limited += 1
        self._sends[entry.update_id] = None  # to be sent again
        hold = rate_limit_hold(receipt.retry_after, random.random())
        self._hold_until = max(self._hold_until, time.monotonic() + hold)
        log.warning("update %s refused unjudged: this device is over its share of the "
                    "coordinator's time (%s); sending again in %.1f s", entry.update_id,
                    receipt.detail, hold)

    def _drop(self, entry: OutboxEntry, why: str, task: Task | None) -> None:
        self._sends.pop(entry.update_id, None)
        self.stats.updates_dropped += 1
        log.warning("dropped update %s (base version %d) from the outbox: %s",
                    entry.update_id, entry.base_version, why)
        self._give_back(entry, "dropped", why, feedback=task is not None and not task.ended)

    def _give_back(self, entry: OutboxEntry, fate: str, detail: str, feedback: bool) -> None:
        """Settle ``entry``; for a top-k update of the current run, its content goes back
        into the residual (sent later instead of lost)."""
        task = self._task
        residual = None
        if (feedback and entry.feedback and task is not None and entry.run_id == task.run_id
                and self._prepare(task)):
            residual = self._residual_with(entry, task)
        self.state.settle(entry.update_id, fate, detail, run_id=entry.run_id,
                          residual=residual)

    def _residual_with(self, entry: OutboxEntry, task: Task) -> dict[str, np.ndarray] | None:
        from fedbus.zoo import state_shapes

        shapes = state_shapes(self._model)
        try:
            update = Update.read(entry.payload)
            content = decode_update_delta(update.delta, update.compression,
                                          expected_shapes=shapes)
        except (ProtocolError, ValueError) as exc:  # our own bytes: should never happen
            log.error("cannot read back update %s (%s); its content is lost",
                      entry.update_id, exc)
            return None
        residual = self.state.residual(task.run_id, shapes)
        return {name: residual[name] + content[name] for name in residual}

    def _drop_unusable(self, task: Task) -> None:
        """Drop outbox entries the coordinator would only reject as stale."""
        with self._lock:
            model = self._model_msg
        if model is None or model.run_id != task.run_id:
            return
        for entry in self.state.outbox(task.run_id):
            behind = model.version - entry.base_version
            if behind > task.max_staleness:
                self._drop(entry, f"{behind} versions behind the newest model "
                           f"(max staleness {task.max_staleness})", task)

    def _resend_if_due(self, task: Task) -> None:
        """After a reconnect, once the retained model has arrived or after a short grace
        (so that what became too stale is dropped, not sent to be rejected): mark for
        sending again what the broker had acknowledged but nobody answered. (After a
        restart nothing is marked sent yet, so the whole outbox goes.)"""
        with self._lock:
            connected_at, self._connected_at = self._connected_at, None
            models = self._models_since_connect
        if connected_at is not None:
            self._resend_due = connected_at + _RESEND_GRACE
        due = self._resend_due
        if due is None or not self.client.connected:
            return
        if models == 0 and time.monotonic() < due:
            self._wake.set()  # look again soon
            time.sleep(0.05)
            return
        self._resend_due = None
        self._drop_unusable(task)
        for uid, last in list(self._sends.items()):
            if last is not None and last.done and last.ok:
                self._sends[uid] = None  # acknowledged, unanswered: send it again
        self._pump(task)

    def _pump(self, task: Task) -> None:
        """Send outbox entries, oldest first, one in flight at a time: an update is sent
        only once the broker has acknowledged the one before. So a dead link holds at most
        one update in paho's hands (which paho re-sends as it is); the rest wait in the
        outbox, where the staleness check still applies before they go."""
        if self._resend_due is not None:
            return  # a reconnect's grace is running
        if time.monotonic() < self._hold_until:
            return  # the coordinator rate-limited this device (the loop looks every second)
        for entry in self.state.outbox(task.run_id):
            if any(r is not None and not r.done for r in self._sends.values()):
                return
            if self._sends.get(entry.update_id) is not None:
                continue  # sent, waiting for its receipt
            uid = entry.update_id
            self._send(entry, resend=uid in self._sends or uid in self._inherited)
            result = self._sends.get(uid)
            if result is not None:
                result.wait(2.0)

    def _send(self, entry: OutboxEntry, *, resend: bool = False) -> None:
        topic = self.topics.update(self.config.device_id)
        limit = self.client.max_packet_size
        result: PublishResult | PublishGroup
        try:
            if publish_packet_size(topic, len(entry.payload)) <= limit:
                result = self.client.publish(topic, entry.payload, qos=1)
            else:  # revision 2.6: in chunks named by the update's id, the same on a re-send
                chunks = split(entry.payload, chunk_data_size(limit, topic), entry.update_id)
                result = PublishGroup(topic, [self.client.publish(topic, c, qos=1)
                                              for c in chunks])
                self.stats.updates_chunked += 1
                log.debug("update %s goes in %d chunks (packet limit %d)", entry.update_id,
                          len(chunks), limit)
        except (MessageTooLarge, ValueError) as exc:
            self._drop(entry, str(exc), self._task)
            return
        self._sends[entry.update_id] = result
        if resend:
            self.stats.updates_resent += 1
            log.info("sent update %s (base version %d) again", entry.update_id,
                     entry.base_version)

    def _reap_acks(self) -> None:
        """Count PUBACKs; an update the broker refused is dropped with its reason."""
        for uid, result in list(self._sends.items()):
            if result is None or not result.done or getattr(result, "_counted", False):
                continue
            result._counted = True  # type: ignore[union-attr]
            if result.ok:
                self.stats.updates_acknowledged += 1
                continue
            if result.reason == "client stopped":
                continue
            if result.reason_code is None:  # refused locally (paho's queue), not by the broker
                log.warning("update %s could not be queued (%s); trying again later", uid,
                            result.reason)
                self._sends[uid] = None
                continue
            self.stats.updates_refused += 1
            entry = next((e for e in self.state.outbox() if e.update_id == uid), None)
            if entry is not None:
                self._drop(entry, f"the broker refused it: {result.reason}", self._task)

    # -- training --------------------------------------------------------------------------

    def _next_work(self, task: Task) -> GlobalModel | None:
        with self._lock:
            model = self._model_msg
        if model is None or model.run_id != task.run_id or model.task_id != task.task_id:
            # the model of this run has not arrived yet: a new run's first model comes only
            # whole, so an agent following the deltas of the previous run subscribes again
            self._want_whole_model(f"run {task.run_id} has no model here yet")
            return None
        if self._unusable == (task.run_id, task.task_id):
            return None  # this device cannot take part; wait for another run
        if task.by_invitation:  # revision 2.10: only invited, on a model received since
            if self._invited_run != task.run_id:
                return None
            with self._lock:
                if self._model_arrivals <= self._arrivals_at_invite:
                    return None
        last = self.state.last_version(task.run_id)
        if last is not None and model.version <= last:
            return None
        return model

    def _prepare(self, task: Task) -> bool:
        """Build ``task``'s model and fit the local data to it: the input shape, the
        task's normalisation, its class names (``fedbus.preprocess``). False (logged once)
        when this device cannot take part, e.g. an unknown architecture, data of another
        shape, a label outside the task's classes, or a requirement it does not know."""
        from fedbus.zoo import build_model, fit_inputs, input_shape

        if self._model is not None:
            return True
        unknown = [r for r in task.requires if r not in KNOWN_REQUIREMENTS]
        if unknown:
            self._give_up_on(task, f"it requires {', '.join(unknown)}, which this agent does "
                             "not implement (upgrade fedbus)", "model")
            return False
        try:
            model = build_model(task.model.arch, task.model.args)
        except (ValueError, TypeError) as exc:
            self._give_up_on(task, str(exc), "model")
            return False
        try:
            shape = input_shape(task.model.arch, task.model.args)
            x = fit_inputs(self.data.x, shape)
            if task.input_norm is not None:
                task.input_norm.check_fits(shape)
                x = task.input_norm.apply(x)
            y = encode_labels(self.data.y, task.classes)
        except (ValueError, TypeError) as exc:
            self._give_up_on(task, str(exc), "data")
            return False
        from fedbus.data_check import scale_warnings

        for warning in scale_warnings(fit_inputs(self.data.x, shape), task):  # once per task
            log.warning("local data: %s", warning)
        self._model, self._x, self._y = model, x, y
        return True

    def _give_up_on(self, task: Task, why: str, kind: str) -> None:
        self._unusable = (task.run_id, task.task_id)
        self._model = None
        log.error("cannot take part in task %s: %s; waiting for a new task", task.task_id, why)
        self._report_error(kind, f"cannot take part in task {task.task_id}: {why}")

    def _skip(self, task: Task, version: int) -> None:
        """Mark a version as done without an update (it could not be trained on)."""
        self.state.record_trained(task.run_id, version, None)
        self.stats.last_version = version

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
            self._skip(task, model_msg.version)
            self._report_error("model", f"model v{model_msg.version} does not fit the task: "
                                        f"{exc}")
            return
        device = self.config.device_id
        if self._gate.begin_training() is not None:  # already over the memory ceiling
            self._policy_stopped(task, model_msg.version)
            return
        self._training = True
        self._publish_status("training")
        seed = (self.config.seed * 1_000_003 + zlib.crc32(device.encode()) + model_msg.version)
        started = time.monotonic()
        try:
            result = train_local(
                model, x, self._y, task.train, seed=seed % (2**31),
                should_stop=lambda: self._stop.is_set() or self._gate.between_batches(),
            )
        except FloatingPointError as exc:
            log.error("local training on v%d diverged (%s); skipping it", model_msg.version, exc)
            self._training = False
            self._skip(task, model_msg.version)
            self._report_error("training", f"training on v{model_msg.version} diverged: {exc}")
            return
        except MemoryError:
            log.error("out of memory while training on v%d; skipping it", model_msg.version)
            self._training = False
            self._skip(task, model_msg.version)
            self._report_error("memory", f"out of memory while training on "
                                         f"v{model_msg.version}")
            return
        except ValueError as exc:  # e.g. local labels the task's model cannot output
            self._training = False
            self._give_up_on(task, str(exc), "data")
            return
        self._gate.end_training()
        if result.stopped and not self._stop.is_set():  # the training policy stopped it
            self._training = False
            self._policy_stopped(task, model_msg.version)
            return
        elapsed = time.monotonic() - started
        self._pace(elapsed)
        self.stats.train_seconds += time.monotonic() - started
        self._training = False
        if result.stopped or self._stop.is_set():
            return  # a partial update is never sent; the version is trained again later
        new_state = get_state(model)
        delta = {name: new_state[name] - base[name] for name in base}
        update, residual = self._encode(task, model_msg, delta, shapes, seed, result, elapsed)
        payload = update.pack()  # compact: metric values as float32
        if self._signer is not None:
            payload = sign_message(self._signer, self.topics.update(self.config.device_id),
                                   payload)
        if len(payload) > task.max_update_bytes:
            log.error(
                "update of %d bytes exceeds the task's limit of %d; not sent",
                len(payload), task.max_update_bytes,
            )
            self._skip(task, model_msg.version)
            self._report_error("update", f"update of {len(payload)} bytes exceeds the "
                                         f"task's limit of {task.max_update_bytes}")
            return
        entry = OutboxEntry(update.update_id, task.run_id, model_msg.version, payload,
                            feedback=residual is not None)
        self._make_room(task, len(payload))
        self.state.record_trained(task.run_id, model_msg.version, entry, residual=residual,
                                  invite_id=self._invite_training)
        self.stats.last_version = model_msg.version
        self._pump(task)
        self.stats.updates_published += 1
        self.stats.bytes_uploaded += len(payload)
        log.info(
            "update %s trained on v%d: %d samples, loss %.3f, acc %.3f (int8 %s) in %.2fs; "
            "sent %d bytes", update.update_id, model_msg.version, result.num_samples,
            result.loss, result.accuracy, _fmt(update.metrics.get("acc_int8")), elapsed,
            len(payload),
        )
        self._error = None  # contributing again
        self._publish_status("idle")

    def _policy_stopped(self, task: Task, version: int) -> None:
        """The training policy stopped a training (nothing is sent): over the memory ceiling
        the version is skipped, since training it again would end the same way; after a pause
        the newest model is trained once training is allowed again."""
        if self._gate.over_memory:
            log.error("skipping v%d: %s", version, self._gate.interruption)
            self._skip(task, version)
        else:
            log.info("training on v%d stopped: %s", version, self._gate.interruption)
        self._publish_status("idle")

    def _pace(self, elapsed: float) -> None:
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

    def _encode(
        self, task: Task, model_msg: GlobalModel, delta: Mapping[str, np.ndarray],
        shapes: Mapping[str, tuple[int, ...]], seed: int, result: Any, elapsed: float,
    ) -> tuple[Update, dict[str, np.ndarray] | None]:
        """The update message, and for top-k the residual that stays behind (what was not
        sent of delta + residual)."""
        rng = np.random.default_rng(seed)
        spec = parse_codec(task.codec)  # the task parsed it already: cannot fail here
        residual: dict[str, np.ndarray] | None = None
        if spec.error_feedback:  # what top-k or sparse left out so far goes in now
            previous = self.state.residual(task.run_id, shapes)
            wire, compression, residual = encode_with_feedback(delta, previous, spec, rng=rng)
        else:
            wire, compression = encode_update_delta(delta, spec, rng=rng)
        update = Update(
            update_id=new_update_id(),
            device_id=self.config.device_id,
            run_id=task.run_id,
            task_id=task.task_id,
            base_version=model_msg.version,
            num_samples=result.num_samples,
            delta=wire,
            metrics=self._metrics(result, elapsed, task, self._model, self._x),
            sent_at=time.time(),
            compression=compression,
        )
        return update, residual

    def _make_room(self, task: Task, size: int) -> None:
        """Keep the outbox within its bounds: drop the oldest updates (logged)."""
        cfg = self.config
        entries = self.state.outbox()
        total = sum(len(e.payload) for e in entries) + size
        count = len(entries) + 1
        for entry in entries:
            if count <= cfg.outbox_max_updates and total <= cfg.outbox_max_bytes:
                break
            self._drop(entry, f"the outbox is full ({cfg.outbox_max_updates} updates, "
                       f"{cfg.outbox_max_bytes:,} bytes)", task)
            count -= 1
            total -= len(entry.payload)

    def _metrics(self, result: Any, elapsed: float, task: Task, model: Any,
                 x: np.ndarray) -> dict[str, float]:
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
            metrics["acc_int8"] = int8_accuracy(int8, x, self._y)
            if self.config.export is not None:
                int8.save(self.config.export)
        except (ValueError, OSError) as exc:
            log.warning("int8 export failed: %s", exc)
        return metrics

    def _shutdown(self) -> None:
        try:
            deadline = time.monotonic() + 5.0
            while self.client.connected and time.monotonic() < deadline and any(
                r is not None and not r.done for r in self._sends.values()
            ):
                time.sleep(0.05)
            self._reap_acks()
            if self.client.connected:
                self.client.publish(
                    self.topics.status(self.config.device_id), self._status("offline"),
                    retain=True,
                ).wait(timeout=2.0)
        finally:
            self.client.stop()
            waiting = len(self.state.outbox())
            if waiting:
                log.info("%d update(s) wait in the outbox for their receipts; they are sent "
                         "again when the agent restarts", waiting)
            self.state.close()

