"""A fleet of virtual devices in one process: ``python -m bench.fleet_sim --out R.json ...``.

Each virtual device has what a real agent has on the wire: its own MQTT v5 connection with its
own account (username = client id = device id, so the broker's per-device ACL applies), a
durable session (clean start 0, 7-day expiry), a Last Will, its own data shard, its own speed,
and the messages of docs/protocol.md section 9 built with the shared fedbus modules (topics,
envelope, messages, update codec, signatures) and trained with the agent's own
``edge_agent.train.train_local``. What is shared is what a simulator may share without changing
a byte on the wire: one torch, one network object (loaded with the global model before every
training), and the pure work of checking and decoding an identical task or model payload.

Thousands of paho clients cannot each have a thread: every client runs on one event loop
(``selectors`` over paho's external-loop calls: ``loop_read``, ``loop_write``, ``loop_misc``).
Training runs on that loop too, and takes real CPU time; the device's simulated compute time
(its speed) is the wait between taking a model and publishing the update, as the agent's
``--compute-seconds`` pacing does. The loop measures its own lateness (how late each publish
went out against its schedule) so that latencies can be read with it.

Not simulated: the agent's SQLite outbox (a device holds its one update in memory; paho re-sends
an unacknowledged publish after a reconnect), the training policy, ``acc_int8`` in the metrics.

``--model-subscription``: ``always`` keeps the model subscription (QoS 0) for the whole
connection, as the agent of revisions up to 2.8 does, so every device receives every version;
``on-demand`` subscribes only when the device is ready to train and unsubscribes once it holds
a model it can train on (revision 2.9, section 9.1), so it receives about one model per update.

In a run whose task says ``by_invitation`` (revision 2.10, section 9.3) a device trains only
once per ``invite`` on its receipt topic, on a model received after it, as the agent does; in
``on-demand`` mode it follows the model topic only from the invitation to the training.
As the agent of revision 2.13 it names the newest invitation it knows in its status, says so
as soon as it gets a new one, and ignores an invitation whose id it knows (one sent again).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import heapq
import itertools
import json
import logging
import resource
import selectors
import signal
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.fleet_sim")

SESSION_EXPIRY = 604800  # seconds, as the agent (protocol section 2.3)
KEEPALIVE = 60  # seconds; the agent's default is 15 s, longer here keeps PINGREQs off the loop
MODES = ("always", "on-demand")
TRAIN_SLICE = 0.03  # seconds of training per loop turn, so connections are served between


# -- pure parts -----------------------------------------------------------------------------


def compute_seconds(n: int, mean_period: float, speeds: Sequence[float]) -> list[float]:
    """Each device's simulated compute time per update: the speed profile repeated over the
    fleet (device ``i`` gets ``speeds[i % len(speeds)]``), scaled so the fleet's mean is
    ``mean_period``."""
    if n < 1 or mean_period <= 0 or not speeds or min(speeds) <= 0:
        raise ValueError("need n >= 1, a positive period and positive speeds")
    factors = [speeds[i % len(speeds)] for i in range(n)]
    scale = mean_period / (sum(factors) / n)
    return [f * scale for f in factors]


def shard_indices(pool: int, size: int, device_index: int, seed: int) -> np.ndarray:
    """``size`` distinct sample indices out of ``pool`` for one device, from a generator seeded
    by the device: shards of different devices overlap once ``n * size > pool``."""
    if not 0 < size <= pool:
        raise ValueError(f"shard size must be in 1..{pool}, got {size}")
    rng = np.random.default_rng([seed, device_index])
    return np.sort(rng.choice(pool, size=size, replace=False))


def training_seed(seed: int, device: str, version: int) -> int:
    """The seed of one local training, as the agent computes it (edge_agent.agent)."""
    return (seed * 1_000_003 + zlib.crc32(device.encode()) + version) % (2**31)


@dataclass
class UpdateRecord:
    """What became of one update: when it left, and its receipt."""

    device: str
    base: int
    published_at: float  # wall clock
    late: float  # seconds after its scheduled time
    receipt_at: float | None = None
    accepted: bool | None = None
    reason: str | None = None
    judged_version: int | None = None  # the receipt's model_version
    staleness: int | None = None


@dataclass
class Counters:
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    models_received: int = 0
    models_ignored: int = 0  # bad signature, malformed, other run
    models_while_training: int = 0  # on-demand: sent before the broker had the UNSUBSCRIBE
    models_after_unsuback: int = 0  # on-demand: after the broker confirmed it (must be 0)
    tasks_received: int = 0
    receipts: int = 0
    receipts_rate_limited: int = 0
    receipts_unknown: int = 0
    updates_published: int = 0
    publish_refused: int = 0
    trainings: int = 0
    train_cpu_seconds: float = 0.0
    subscribes: int = 0
    unsubscribes: int = 0
    invitations: int = 0  # revision 2.10
    invitations_repeated: int = 0  # revision 2.13: an invitation sent again, ignored


# -- the devices ------------------------------------------------------------------------------


@dataclass
class Device:
    index: int
    device_id: str
    compute: float
    client: Any
    x: np.ndarray
    y: np.ndarray
    connected: bool = False
    model_subscribed: bool = False
    unsubscribed: bool = False  # the broker confirmed the model UNSUBSCRIBE (UNSUBACK)
    ready: bool = False  # idle and allowed to train (its start time has come)
    model: Any = None  # the newest GlobalModel of its run it holds
    last_trained: int = -1
    run: str | None = None
    pending: tuple[float, bytes, str, int] | None = None  # (due, payload, update id, base)
    done: bool = False
    models_received: int = 0
    updates: int = 0
    first_compute: float | None = None  # the compute time of its first update
    queued: float | None = None  # when it started a training still in the training queue
    invited: str | None = None  # revision 2.10: the run of the invitation it holds
    invite_known: str | None = None  # revision 2.13: the id of the newest invitation known


@dataclass
class _Timer:
    due: float
    seq: int
    action: Callable[[], None] = field(compare=False)

    def __lt__(self, other: _Timer) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)


class FleetSim:
    """N virtual devices on one selector loop, against a real broker and coordinator."""

    def __init__(self, args: argparse.Namespace) -> None:
        from fedbus.credentials import read_credentials
        from fedbus.datasets import load_local_data
        from fedbus.signing import load_public_key
        from fedbus.topics import Topics

        self.args = args
        self.mode: str = args.model_subscription
        access = read_credentials(args.credentials, args.device_ids[0])
        self.host, self.port, self.prefix = access.host, access.port, access.prefix
        self.topics = Topics(self.prefix)
        if not access.coordinator_key:
            raise SystemExit("the credentials file has no coordinator_key")
        self.verifier = load_public_key(access.coordinator_key)
        accounts = json.loads(Path(args.credentials).read_text())["devices"]
        self.passwords = {d: accounts[d]["password"] for d in args.device_ids}
        x, y = load_local_data(args.data)
        self.pool_x, self.pool_y = x, y
        self.sel = selectors.DefaultSelector()
        self.timers: list[_Timer] = []
        # (publish due, seq, device, the model it took): trained in order of due time
        self.train_queue: list[tuple[float, int, Device, Any]] = []
        self.seq = itertools.count()
        self.counters = Counters()
        self.records: dict[str, UpdateRecord] = {}
        self.lateness: list[float] = []
        self.loop_stalls: list[float] = []  # loop turns whose work took over 50 ms (seconds)
        self.task: Any = None
        self._task_payload: bytes | None = None
        self._model_cache: tuple[bytes, Any] | None = None  # (payload, GlobalModel or None)
        self._net: Any = None
        self._net_task: str | None = None
        self._x_ready: dict[str, np.ndarray] = {}
        self.ended_at: float | None = None
        self.stop_requested = False
        computes = compute_seconds(len(args.device_ids), args.period, args.speeds)
        self.devices: list[Device] = []
        for i, device_id in enumerate(args.device_ids):
            idx = shard_indices(len(y), min(args.shard, len(y)), i, args.seed)
            self.devices.append(Device(i, device_id, computes[i], None, x[idx], y[idx]))
        self.by_fd: dict[int, Device] = {}

    # -- timers -----------------------------------------------------------------------------

    def at(self, due: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timers, _Timer(due, next(self.seq), action))

    # -- MQTT -------------------------------------------------------------------------------

    def _client(self, dev: Device) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from fedbus.envelope import pack
        from fedbus.messages import Status

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev.device_id,
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(dev.device_id, self.passwords[dev.device_id])
        will = pack(Status(dev.device_id, "offline", None, time.time()).to_wire())
        client.will_set(self.topics.status(dev.device_id), will, qos=1, retain=True)
        client.max_queued_messages_set(1000)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY
        client.on_socket_open = lambda _c, _u, sock: self._sock_open(dev, sock)
        client.on_socket_close = lambda _c, _u, sock: self._sock_close(sock)
        client.on_socket_register_write = lambda _c, _u, sock: self._want_write(sock, True)
        client.on_socket_unregister_write = lambda _c, _u, sock: self._want_write(sock, False)
        client.on_connect = lambda _c, _u, _f, reason, _p: self._on_connect(dev, reason)
        client.on_disconnect = lambda _c, _u, _f, reason, _p: self._on_disconnect(dev, reason)
        client.on_message = lambda _c, _u, msg: self._on_message(dev, msg)
        client.on_publish = lambda _c, _u, mid, reason, _p: self._on_publish(dev, reason)
        client.on_unsubscribe = lambda _c, _u, _mid, _r, _p: self._on_unsuback(dev)
        client._fleet_props = props  # type: ignore[attr-defined]
        return client

    def _sock_open(self, dev: Device, sock: Any) -> None:
        self.by_fd[sock.fileno()] = dev
        self.sel.register(sock, selectors.EVENT_READ, dev)

    def _sock_close(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, sock: Any, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, events, self.sel.get_key(sock).data)

    def connect(self, dev: Device) -> None:
        if self.stop_requested:
            return
        if dev.client is None:
            dev.client = self._client(dev)
        try:
            dev.client.connect(self.host, self.port, keepalive=KEEPALIVE, clean_start=False,
                               properties=dev.client._fleet_props)
        except OSError as exc:
            self.counters.connect_failures += 1
            log.warning("%s: connect failed (%s); retrying in 1 s", dev.device_id, exc)
            self.at(time.monotonic() + 1.0, lambda: self.connect(dev))

    def _on_connect(self, dev: Device, reason: Any) -> None:
        if reason.is_failure:
            self.counters.connect_failures += 1
            log.error("%s: CONNACK %s", dev.device_id, reason)
            return
        self.counters.connects += 1
        dev.connected = True
        c = dev.client
        c.subscribe(self.topics.task, qos=1)
        c.subscribe(self.topics.receipt(dev.device_id), qos=1)
        dev.model_subscribed = False
        if self.mode == "always" or (dev.ready and self._wants_model(dev)):
            self._subscribe_model(dev)
        self._status(dev, "training" if dev.pending else "online")

    def _on_disconnect(self, dev: Device, reason: Any) -> None:
        dev.connected = False
        dev.model_subscribed = False
        if self.stop_requested:
            return
        self.counters.disconnects += 1
        log.warning("%s: disconnected (%s); reconnecting in 1 s", dev.device_id, reason)
        self.at(time.monotonic() + 1.0, lambda: self._reconnect(dev))

    def _reconnect(self, dev: Device) -> None:
        if self.stop_requested or dev.connected:
            return
        try:
            dev.client.reconnect()
        except OSError:
            self.at(time.monotonic() + 1.0, lambda: self._reconnect(dev))

    def _on_publish(self, dev: Device, reason: Any) -> None:
        if reason.is_failure:
            self.counters.publish_refused += 1
            log.error("%s: publish refused (%s)", dev.device_id, reason)

    def _on_unsuback(self, dev: Device) -> None:
        if not dev.model_subscribed:  # not subscribed again meanwhile
            dev.unsubscribed = True

    def _subscribe_model(self, dev: Device) -> None:
        dev.unsubscribed = False
        if not dev.model_subscribed and dev.connected:
            dev.client.subscribe(self.topics.model, qos=0)
            dev.model_subscribed = True
            self.counters.subscribes += 1

    def _unsubscribe_model(self, dev: Device) -> None:
        if dev.model_subscribed and dev.connected:
            dev.client.unsubscribe(self.topics.model)
            dev.model_subscribed = False
            self.counters.unsubscribes += 1

    def _status(self, dev: Device, state: str) -> None:
        from fedbus.envelope import pack
        from fedbus.messages import Status

        version = dev.last_trained if dev.last_trained >= 0 else None
        payload = pack(Status(dev.device_id, state, version, time.time(), run_id=dev.run,
                              agent="fleet-sim", invite=dev.invite_known,
                              invite_aware=True).to_wire())
        dev.client.publish(self.topics.status(dev.device_id), payload, qos=1, retain=True)

    # -- messages ---------------------------------------------------------------------------

    def _on_message(self, dev: Device, msg: Any) -> None:
        topic = msg.topic
        if topic == self.topics.model:
            self._on_model(dev, msg.payload)
        elif topic == self.topics.task:
            self._on_task(dev, msg.payload)
        elif topic == self.topics.receipt(dev.device_id):
            self._on_receipt(dev, msg.payload)

    def _read_task(self, payload: bytes) -> Any:
        """The task in ``payload`` if its signature holds and it decodes (None otherwise);
        checked once per distinct payload (pure work, shared by every device)."""
        from fedbus.envelope import unpack
        from fedbus.errors import ProtocolError
        from fedbus.messages import Task
        from fedbus.signing import SignatureError

        if payload == self._task_payload:
            return self.task
        try:
            self.verifier.verify(self.topics.task, payload)
            task = Task.from_wire(unpack(payload, "task"))
        except (SignatureError, ProtocolError) as exc:
            log.warning("ignoring a task: %s", exc)
            return None
        self._task_payload, self.task = payload, task
        return task

    def _read_model(self, payload: bytes) -> Any:
        from fedbus.envelope import DecodeLimits
        from fedbus.errors import ProtocolError
        from fedbus.messages import GlobalModel
        from fedbus.signing import SignatureError

        if self._model_cache is not None and self._model_cache[0] == payload:
            return self._model_cache[1]
        limits = DecodeLimits(max_bytes=8 << 20, max_bin_len=8 << 20)
        model = None
        try:
            self.verifier.verify(self.topics.model, payload)
            model = GlobalModel.read(payload, limits)
        except (SignatureError, ProtocolError) as exc:
            log.warning("ignoring a model: %s", exc)
        self._model_cache = (payload, model)
        return model

    def _on_task(self, dev: Device, payload: bytes) -> None:
        self.counters.tasks_received += 1
        task = self._read_task(payload)
        if task is None:
            return
        if task.run_id != dev.run:
            dev.run, dev.last_trained, dev.model = task.run_id, -1, None
        if task.ended:
            if not dev.done:
                dev.done = True
                dev.pending = None  # an ended run takes nothing more (section 9.2)
                self._status(dev, "idle")
                if self.ended_at is None:
                    self.ended_at = time.time()
            return
        self._maybe_train(dev)

    def _on_model(self, dev: Device, payload: bytes) -> None:
        self.counters.models_received += 1
        dev.models_received += 1
        if dev.pending is not None or dev.queued is not None:
            self.counters.models_while_training += 1
        if dev.unsubscribed:
            self.counters.models_after_unsuback += 1
        model = self._read_model(payload)
        if model is None or (dev.run is not None and model.run_id != dev.run):
            self.counters.models_ignored += 1
            return
        held = dev.model
        if held is None or held.run_id != model.run_id or model.version > held.version:
            dev.model = model
        self._maybe_train(dev)

    def _wants_model(self, dev: Device) -> bool:
        """Whether the device follows the model between trainings (on-demand): always,
        unless the run trains by invitation (revision 2.10) and it holds none."""
        task = self.task
        return task is None or not task.by_invitation or dev.invited == task.run_id

    def _on_invite(self, dev: Device, invite: Any) -> None:
        """Revision 2.10: the device may train once, on a model received from now on.
        Revision 2.13: an id it knows is the same invitation sent again: ignored."""
        if invite.invite_id is not None and invite.invite_id == dev.invite_known:
            self.counters.invitations_repeated += 1
            return
        self.counters.invitations += 1
        if dev.done:
            return
        dev.invite_known = invite.invite_id
        dev.invited = invite.run_id  # (it may come before the task of its run)
        if self.mode == "on-demand" and dev.pending is None and dev.queued is None:
            dev.model = None  # the retained model, the newest, comes with the subscription
            if dev.ready:
                self._subscribe_model(dev)
        self._maybe_train(dev)
        if dev.invited is not None and invite.invite_id is not None and dev.connected:
            self._status(dev, "idle")  # not training yet: its status names the invitation

    def _on_receipt(self, dev: Device, payload: bytes) -> None:
        from fedbus.envelope import unpack
        from fedbus.errors import ProtocolError
        from fedbus.messages import Invite, Receipt

        try:
            obj = unpack(payload)
            if obj.get("kind") == "invite":
                self._on_invite(dev, Invite.from_wire(obj))
                return
            self.counters.receipts += 1
            receipt = Receipt.from_wire(obj)
        except ProtocolError as exc:
            log.warning("malformed receipt: %s", exc)
            return
        if receipt.reason == "rate_limited":
            self.counters.receipts_rate_limited += 1
            return
        record = self.records.get(receipt.update_id)
        if record is None:
            self.counters.receipts_unknown += 1
            return
        if record.receipt_at is None:  # the first receipt is the verdict
            record.receipt_at = time.time()
            record.accepted = receipt.accepted
            record.reason = receipt.reason
            record.judged_version = receipt.model_version
            record.staleness = receipt.staleness

    # -- training ---------------------------------------------------------------------------

    def _start(self, dev: Device) -> None:
        """The device's first training time has come (starts are spread over one period)."""
        dev.ready = True
        if not self._wants_model(dev):  # not invited now: its first training is a whole one
            dev.first_compute = None
        if self.mode == "on-demand" and self._wants_model(dev):
            self._subscribe_model(dev)
        self._maybe_train(dev)

    def _maybe_train(self, dev: Device) -> None:
        """Start a training if the device may: as the agent, it takes its newest model, drops
        its model subscription (on-demand) and says ``training`` at once; the CPU work waits
        in the training queue, which the loop works through a slice at a time in order of
        when the updates are due, so that many devices starting together do not stall every
        connection. The compute time runs from now: a training done after its update was due
        shows as lateness."""
        task, model = self.task, dev.model
        if (not dev.ready or dev.pending is not None or dev.queued or dev.done
                or not dev.connected or task is None or task.ended or task.paused
                or model is None or model.run_id != task.run_id
                or model.task_id != task.task_id or model.version <= dev.last_trained
                or dev.run != task.run_id
                or (task.by_invitation and dev.invited != task.run_id)):
            return
        dev.invited = None
        if self.mode == "on-demand":
            self._unsubscribe_model(dev)
        self._status(dev, "training")
        now = time.monotonic()
        # the start-up spread: only a device that may train at the common start takes a
        # random part of its compute time for its first training (by invitation, most
        # devices start later, and a shortened training would make their updates fresher)
        compute = dev.compute if dev.first_compute is None else dev.first_compute
        dev.first_compute = None
        dev.queued = now
        heapq.heappush(self.train_queue, (now + compute, next(self.seq), dev, model))

    def _run_trainings(self, budget: float) -> None:
        """Train queued devices for about ``budget`` seconds."""
        end = time.monotonic() + budget
        while self.train_queue and time.monotonic() < end:
            due, _seq, dev, model = heapq.heappop(self.train_queue)
            dev.queued = None
            task = self.task
            if dev.done or task is None or task.ended:
                continue
            cpu0 = time.process_time()
            payload, update_id = self._train(dev, task, model)
            self.counters.train_cpu_seconds += time.process_time() - cpu0
            self.counters.trainings += 1
            dev.pending = (due, payload, update_id, model.version)
            if self.mode == "on-demand":
                dev.model = None
            self.at(due, functools.partial(self._publish, dev))

    def _prepared(self, task: Any, dev: Device) -> np.ndarray:
        from fedbus.zoo import fit_inputs, input_shape

        x = self._x_ready.get(dev.device_id)
        if x is None:
            x = fit_inputs(dev.x, input_shape(task.model.arch, task.model.args))
            if task.input_norm is not None:
                x = task.input_norm.apply(x)
            self._x_ready[dev.device_id] = x
        return x

    def _train(self, dev: Device, task: Any, model_msg: Any) -> tuple[bytes, str]:
        from edge_agent.train import train_local
        from fedbus.codec_spec import parse_codec
        from fedbus.messages import Update, new_update_id
        from fedbus.update_codec import decode_update_delta, encode_update_delta
        from fedbus.zoo import build_model, get_state, set_state, state_shapes

        if self._net_task != (task.run_id + task.task_id):
            self._net = build_model(task.model.arch, task.model.args)
            self._net_task = task.run_id + task.task_id
            self._x_ready.clear()
        net = self._net
        shapes = state_shapes(net)
        base = decode_update_delta(model_msg.tensors, model_msg.compression,
                                   expected_shapes=shapes)
        set_state(net, base)
        x = self._prepared(task, dev)
        seed = training_seed(self.args.seed, dev.device_id, model_msg.version)
        t0 = time.monotonic()
        result = train_local(net, x, dev.y, task.train, seed=seed)
        new = get_state(net)
        delta = {k: new[k] - base[k] for k in base}
        wire, compression = encode_update_delta(delta, parse_codec(task.codec),
                                                rng=np.random.default_rng(seed))
        update = Update(
            update_id=new_update_id(), device_id=dev.device_id, run_id=task.run_id,
            task_id=task.task_id, base_version=model_msg.version,
            num_samples=result.num_samples, delta=wire,
            metrics={"loss": result.loss, "acc": result.accuracy,
                     "sec": time.monotonic() - t0 + dev.compute},
            sent_at=time.time(), compression=compression,
        )
        return update.pack(), update.update_id

    def _publish(self, dev: Device) -> None:
        if dev.pending is None:
            return
        due, payload, update_id, base = dev.pending
        now = time.monotonic()
        task = self.task
        if dev.done or task is None or task.ended:
            dev.pending = None
            return
        if not dev.connected:  # publish when the connection is back
            self.at(now + 0.5, lambda: self._publish(dev))
            return
        late = now - due
        self.lateness.append(late)
        dev.client.publish(self.topics.update(dev.device_id), payload, qos=1)
        self.records[update_id] = UpdateRecord(dev.device_id, base, time.time(), late)
        self.counters.updates_published += 1
        dev.updates += 1
        dev.pending = None
        dev.last_trained = base
        self._status(dev, "idle")
        if self.mode == "on-demand" and self._wants_model(dev):
            self._subscribe_model(dev)  # the retained model comes with the subscription
        self._maybe_train(dev)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        start = time.monotonic()
        spread = self.args.connect_seconds
        n = len(self.devices)
        for dev in self.devices:
            self.at(start + spread * dev.index / n, functools.partial(self.connect, dev))
        rng = np.random.default_rng(self.args.seed)
        begin = start + spread + 1.0
        for dev in self.devices:
            # every device starts at once on the first model, and its first training takes a
            # random part of its compute time: updates arrive at the steady rate from the
            # beginning, and the training queue works in order of when updates are due
            dev.first_compute = float(rng.uniform(0, dev.compute))
            self.at(begin, functools.partial(self._start, dev))
        deadline = start + self.args.duration
        next_misc = start + 1.0
        while not self.stop_requested:
            now = time.monotonic()
            if now >= deadline:
                log.warning("duration reached before the run ended")
                break
            if self.ended_at is not None and all(d.pending is None or d.done
                                                 for d in self.devices):
                break
            wake = min(next_misc, self.timers[0].due if self.timers else now + 0.5)
            if self.train_queue:
                wake = now
            ready = self.sel.select(max(0.0, min(wake - now, 0.5)))
            turn = time.monotonic()  # a turn's work, without the wait in select
            for key, events in ready:
                client = key.data.client
                if events & selectors.EVENT_READ:
                    client.loop_read(10)
                if events & selectors.EVENT_WRITE:
                    client.loop_write()
            now = time.monotonic()
            while self.timers and self.timers[0].due <= now:
                heapq.heappop(self.timers).action()
            self._run_trainings(TRAIN_SLICE)
            if now >= next_misc:
                for dev in self.devices:
                    if dev.client is not None:
                        dev.client.loop_misc()
                next_misc = now + 1.0
            took = time.monotonic() - turn
            if took > 0.05:
                self.loop_stalls.append(took)
        self.close()

    def close(self) -> None:
        """Offline status and DISCONNECT for every device (protocol section 9.6)."""
        self.stop_requested = True
        for dev in self.devices:
            if dev.connected:
                self._status(dev, "offline")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(
                d.connected and d.client.want_write() for d in self.devices):
            for key, events in self.sel.select(0.2):
                if events & selectors.EVENT_WRITE:
                    key.data.client.loop_write()
                if events & selectors.EVENT_READ:
                    key.data.client.loop_read(10)
        for dev in self.devices:
            if dev.client is not None and dev.connected:
                dev.client.disconnect()
                dev.client.loop_write()

    def result(self) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "mode": self.mode,
            "counters": self.counters.__dict__,
            "lateness": self.lateness,
            "loop_stalls": self.loop_stalls,
            "ended_at": self.ended_at,
            "updates": {k: r.__dict__ for k, r in self.records.items()},
            "models_per_device": [d.models_received for d in self.devices],
            "updates_per_device": [d.updates for d in self.devices],
            "cpu_seconds": time.process_time(),
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


def _raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < n + 64:
        raise SystemExit(f"{n} connections need {n + 64} file descriptors; the hard limit "
                         f"is {hard}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--credentials", type=Path, required=True)
    p.add_argument("--devices", type=int, required=True, help="the first N devices of the file")
    p.add_argument("--data", type=Path, required=True, help="the training pool (.npz)")
    p.add_argument("--shard", type=int, default=32, help="samples per device")
    p.add_argument("--period", type=float, required=True,
                   help="mean simulated compute seconds per update")
    p.add_argument("--speeds", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--model-subscription", choices=MODES, default="always")
    p.add_argument("--connect-seconds", type=float, default=5.0,
                   help="spread the connects over this long")
    p.add_argument("--duration", type=float, default=600.0, help="give up after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    devices = json.loads(args.credentials.read_text())["devices"]
    if args.devices > len(devices):
        p.error(f"the credentials file has {len(devices)} devices, not {args.devices}")
    args.device_ids = list(devices)[: args.devices]
    return args


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    args = parse_args(argv)
    _raise_fd_limit(args.devices)
    import torch

    torch.set_num_threads(1)
    sim = FleetSim(args)

    def on_term(*_: object) -> None:
        sim.stop_requested = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sim.run()
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(sim.result()))
    tmp.replace(args.out)
    c = sim.counters
    log.info("%d devices: %d updates published, %d receipts, %d models received",
             len(sim.devices), c.updates_published, c.receipts, c.models_received)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
