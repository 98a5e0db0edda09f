"""Ingest workers: decode and check update deltas in other processes (``--ingest-workers N``).

The coordinator keeps its one durable MQTT session and judges every message in the order it
arrived, as it does without workers. What moves out of its process is the part of judging
an update that depends on nothing but the payload: decoding the delta and checking its
names, shapes, values and norm (``coordinator.validation.check_delta``, steps 11 to 15),
and the payload's digest that tells a copy of an update from another update. The network
thread numbers each message and hands an update's payload to a worker (round robin, over a
pipe); a worker answers with the decoded float32 values or the reason that refuses the
delta; the reducer thread (``CoordinatorService._reduce``) takes the messages back in their
arrival order (``InOrder``) and judges each one with its worker's outcome
(``validate_update(prechecked=...)``): the run's state (ledger, versions, buffer, quorum),
the store commit, the receipts and the model stay in one thread of one process, so
exactly-once holds as before. Several updates share one commit (group commit), their
receipts and PUBACKs sent after it.

Durability: the session is opened with manual acknowledgement (``ConnectionSettings.
manual_ack``): a message's PUBACK is sent by the reducer after the commit of its verdict,
in arrival order, never by paho when the callback returns. A message that was still with a
worker, or waiting for the reducer, when the process died was never acknowledged: the
broker delivers it again to the restarted coordinator (its durable session), which judges it
then, or answers it from the store if its verdict was committed. The broker's own limit on
unacknowledged messages per client (``max_inflight_messages``, 20 in the shipped
configuration) and the client's MQTT v5 Receive Maximum hold only until the client sends its
first PUBACK of its own accord (measured with Mosquitto 2.0.11 and paho's manual acks:
Receive Maximum 5, five messages sent, then 20 after three PUBACKs; without one, 20, then
every queued message), so the coordinator bounds the pipeline itself: the network thread
waits while ``pipeline_depth`` messages (64, fewer for large models) are in it, which stops
it reading the socket until the reducer catches up. That bounds the memory the pipeline
holds, also when a restarted coordinator finds thousands of updates queued in its session.

A worker that dies (or answers something unreadable) is dropped: the updates it held are
decoded by the reducer itself, like any update after the last worker is gone.

The wire between the coordinator and a worker is this module's own (never pickle): a request
is ``seq`` and the payload; an answer is ``seq``, the worker's CPU seconds so far, the
outcome (a reason and detail, or none), the norm and the payload's digest, as msgpack, then
the values of each tensor in the order of the model's shapes, as float32 bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import msgpack
import numpy as np

from coordinator.validation import DeltaChecked, ValidationLimits, check_delta
from fedbus.envelope import DecodeLimits

__all__ = [
    "MAX_WORKERS",
    "InOrder",
    "IngestPool",
    "WorkerSettings",
    "decode_answer",
    "encode_answer",
    "pipeline_depth",
]

log = logging.getLogger(__name__)

MAX_WORKERS = 64  # a sanity bound: each worker is a process of its own
_PIPELINE_BYTES = 256 * 1024 * 1024  # about the most the messages in the pipeline may hold
_MAX_DEPTH = 64
_MIN_DEPTH = 4
_REQUEST = struct.Struct("<QQ")  # seq, payload length
_ANSWER = struct.Struct("<IQ")  # header length, values length
_NO_ENVELOPE = "-"  # answer reason: the envelope failed; the reducer finds why itself


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to check a delta: the model's shapes and the run's limits."""

    shapes: dict[str, tuple[int, ...]]
    max_update_bytes: int
    max_norm: float
    max_bin_len: int
    max_unknown_bytes: int | None
    max_bytes: int

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...]],
           limits: ValidationLimits) -> WorkerSettings:
        assert limits.decode is not None
        return cls({k: tuple(v) for k, v in shapes.items()}, limits.max_update_bytes,
                   limits.max_norm, limits.decode.max_bin_len, limits.decode.max_unknown_bytes,
                   limits.decode.max_bytes)

    def limits(self) -> ValidationLimits:
        decode = DecodeLimits(max_bytes=self.max_bytes, max_bin_len=self.max_bin_len,
                              max_unknown_bytes=self.max_unknown_bytes)
        # the staleness bound plays no part in checking a delta
        return ValidationLimits(self.max_update_bytes, self.max_norm, 0, decode)

    def to_json(self) -> str:
        return json.dumps({"shapes": {k: list(v) for k, v in self.shapes.items()},
                           "max_update_bytes": self.max_update_bytes,
                           "max_norm": self.max_norm, "max_bin_len": self.max_bin_len,
                           "max_unknown_bytes": self.max_unknown_bytes,
                           "max_bytes": self.max_bytes})

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        d = json.loads(text)
        return cls({k: tuple(v) for k, v in d["shapes"].items()}, d["max_update_bytes"],
                   d["max_norm"], d["max_bin_len"], d["max_unknown_bytes"], d["max_bytes"])


def pipeline_depth(max_update_bytes: int, parameters: int) -> int:
    """How many messages the coordinator takes from the broker before it acknowledges
    them (its MQTT Receive Maximum): enough to keep the workers and a group commit busy
    (64), fewer when each could hold a large payload and its decoded float32 values."""
    per_message = max(1, max_update_bytes + 4 * parameters)
    return max(_MIN_DEPTH, min(_MAX_DEPTH, _PIPELINE_BYTES // per_message))


# -- the wire between coordinator and worker (pure) ----------------------------------------


def encode_answer(seq: int, cpu: float, checked: DeltaChecked | None,
                  shapes: Mapping[str, tuple[int, ...]]) -> bytes:
    """A worker's answer for message ``seq`` (``checked`` None: the envelope failed)."""
    values = b""
    if checked is None:
        header = [seq, cpu, _NO_ENVELOPE, "", math.nan, b""]
    elif checked.delta is None:
        header = [seq, cpu, checked.reason, checked.detail, checked.norm, checked.digest]
    else:
        header = [seq, cpu, "", "", checked.norm, checked.digest]
        values = b"".join(np.ascontiguousarray(checked.delta[name], dtype=np.float32).data
                          for name in shapes)
    head = msgpack.packb(header, use_bin_type=True)
    return _ANSWER.pack(len(head), len(values)) + head + values


def decode_answer(head: bytes, values: bytes | bytearray, shapes: Mapping[str, tuple[int, ...]]
                  ) -> tuple[int, float, DeltaChecked | None]:
    """(seq, worker CPU seconds, outcome) of an answer; ``values`` is kept by the arrays (no
    copy). Raises ``ValueError`` if it does not fit the shapes."""
    seq, cpu, reason, detail, norm, digest = msgpack.unpackb(head, raw=False)
    if not (isinstance(seq, int) and isinstance(reason, str) and isinstance(detail, str)
            and isinstance(digest, bytes)):
        raise ValueError("not an answer of an ingest worker")
    if reason == _NO_ENVELOPE:
        return seq, float(cpu), None
    if reason:
        return seq, float(cpu), DeltaChecked(None, float(norm), reason, detail, digest)
    flat = np.frombuffer(values, dtype=np.float32)
    delta: dict[str, np.ndarray] = {}
    at = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        if at + size > flat.size:
            raise ValueError("an ingest worker's answer is shorter than the model")
        delta[name] = flat[at:at + size].reshape(shape)
        at += size
    if at != flat.size:
        raise ValueError("an ingest worker's answer is longer than the model")
    return seq, float(cpu), DeltaChecked(delta, float(norm), digest=digest)


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream."""
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_into(stream: IO[bytes], size: int) -> bytearray | None:
    """``size`` bytes into a new (writable) buffer, or None at the end of the stream."""
    buf = bytearray(size)
    view = memoryview(buf)
    at = 0
    while at < size:
        got = stream.readinto(view[at:])  # type: ignore[attr-defined]
        if not got:
            return None
        at += got
    return buf


# -- the worker process --------------------------------------------------------------------


def worker_main(argv: list[str]) -> int:
    """``python -m coordinator.ingest_workers SETTINGS_JSON``: answer requests from stdin
    until it closes (the coordinator stopped or died)."""
    # a Ctrl-C reaches the whole process group: the coordinator stops, then closes our pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = WorkerSettings.from_json(argv[0])
    limits = settings.limits()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        request = _read_exactly(stdin, _REQUEST.size)
        if request is None:
            return 0
        seq, size = _REQUEST.unpack(request)
        payload = _read_exactly(stdin, size)
        if payload is None:
            return 0
        checked = check_delta(payload, expected_shapes=settings.shapes, limits=limits)
        stdout.write(encode_answer(seq, time.process_time(), checked, settings.shapes))
        stdout.flush()


# -- the coordinator's side ----------------------------------------------------------------


class _Worker:
    def __init__(self, index: int, settings: WorkerSettings) -> None:
        self.index = index
        # the coordinator's own module path, not the working directory's (-P)
        path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
        env = {**os.environ, "PYTHONPATH": path, "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "coordinator.ingest_workers", settings.to_json()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self.outstanding: list[int] = []  # seqs sent, not answered yet (in order)
        self.cpu = 0.0
        self.alive = True


class IngestPool:
    """``n`` worker processes. ``submit`` (one thread: the network thread) sends a payload
    to the next live worker; each answer is given to ``on_answer(seq, outcome)`` from the
    worker's reader thread. A worker that dies gives ``on_answer(seq, None)`` for each
    payload it held, so that the reducer decodes those itself."""

    def __init__(self, n: int, settings: WorkerSettings,
                 on_answer: Callable[[int, DeltaChecked | None], None]) -> None:
        if not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"ingest workers must be 1-{MAX_WORKERS}, got {n}")
        self.settings = settings
        self._on_answer = on_answer
        self._lock = threading.Lock()
        self._next = 0
        self._closing = False
        self.workers = [_Worker(i, settings) for i in range(n)]
        self._readers = [threading.Thread(target=self._read, args=(w,), daemon=True,
                                          name=f"ingest-worker-{w.index}")
                         for w in self.workers]
        for thread in self._readers:
            thread.start()

    @property
    def live(self) -> int:
        return sum(w.alive for w in self.workers)

    def cpu_seconds(self) -> float:
        """CPU time the workers reported so far (their own ``process_time``)."""
        return sum(w.cpu for w in self.workers)

    def submit(self, seq: int, payload: bytes) -> bool:
        """Send ``payload`` to a worker; False when none is alive (decode it yourself)."""
        for _ in range(len(self.workers)):
            with self._lock:
                worker = self.workers[self._next % len(self.workers)]
                self._next += 1
                if not worker.alive:
                    continue
                worker.outstanding.append(seq)
            try:
                assert worker.proc.stdin is not None
                worker.proc.stdin.write(_REQUEST.pack(seq, len(payload)))
                worker.proc.stdin.write(payload)
                worker.proc.stdin.flush()
                return True
            except (OSError, ValueError):  # the worker is gone: ``seq`` is handed back
                self._lost(worker, "its pipe closed")
                return True
        return False

    def _read(self, worker: _Worker) -> None:
        stream = worker.proc.stdout
        assert stream is not None
        shapes = self.settings.shapes
        why = "it exited"
        try:
            while True:
                lengths = _read_exactly(stream, _ANSWER.size)
                if lengths is None:
                    break
                head_len, values_len = _ANSWER.unpack(lengths)
                head = _read_exactly(stream, head_len)
                values = _read_into(stream, values_len)
                if head is None or values is None:
                    break
                seq, cpu, checked = decode_answer(head, values, shapes)
                with self._lock:
                    if not worker.outstanding or worker.outstanding[0] != seq:
                        why = f"it answered {seq} out of turn"
                        break
                    worker.outstanding.pop(0)
                    worker.cpu = cpu
                self._on_answer(seq, checked)
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            why = f"its answer was unreadable: {exc}"
        self._lost(worker, why)

    def _lost(self, worker: _Worker, why: str) -> None:
        with self._lock:
            if not worker.alive:
                return
            worker.alive = False
            held, worker.outstanding = worker.outstanding, []
            closing = self._closing
        if not closing:
            log.error("ingest worker %d (pid %d) is gone (%s): the coordinator decodes its %d "
                      "update(s) itself; %d worker(s) left", worker.index, worker.proc.pid, why,
                      len(held), self.live)
        for seq in held:
            self._on_answer(seq, None)
        with_timeout_kill(worker.proc)

    def close(self) -> None:
        """Stop the workers: their stdin closes, they exit; any that does not is killed."""
        with self._lock:
            self._closing = True
        for worker in self.workers:
            if worker.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    worker.proc.stdin.close()
        for worker in self.workers:
            with_timeout_kill(worker.proc)
        for thread in self._readers:
            if thread is not threading.current_thread():
                thread.join(timeout=5)


def with_timeout_kill(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Wait for ``proc`` (whose stdin is closed or whose pipe broke); kill it if it hangs."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- arrival order ---------------------------------------------------------------------------


class InOrder:
    """Messages in arrival order, each released once its worker's outcome is in (or at once,
    when it needs none). Thread-safe: ``add`` from the network thread, ``settle`` from the
    workers' readers, ``take`` from the reducer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[int, Any] = {}
        self._outcomes: dict[int, DeltaChecked | None] = {}
        self._waiting: set[int] = set()
        self._next_seq = 0  # the next to add
        self._next_out = 0  # the next to take
        self._closed = False

    def wait_room(self, limit: int, timeout: float | None = None) -> bool:
        """Wait until fewer than ``limit`` items are in (or closed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or self._next_seq - self._next_out < limit, timeout)

    def add(self, item: Any, *, wait: bool) -> int:
        """Append ``item``; ``wait``: it is released only once ``settle`` gives its outcome."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            self._items[seq] = item
            if wait:
                self._waiting.add(seq)
            else:
                self._outcomes[seq] = None
                self._cond.notify_all()
            return seq

    def settle(self, seq: int, outcome: DeltaChecked | None) -> None:
        with self._cond:
            if seq in self._waiting:
                self._waiting.discard(seq)
                self._outcomes[seq] = outcome
                self._cond.notify_all()

    def take(self, limit: int, timeout: float | None = None
             ) -> list[tuple[Any, DeltaChecked | None]]:
        """The next released items in order (at most ``limit``; waits up to ``timeout`` for
        the first; [] on timeout or once closed)."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._closed or self._next_out in self._outcomes, timeout)
            out: list[tuple[Any, DeltaChecked | None]] = []
            if not ready or self._closed:
                return out
            while len(out) < limit and self._next_out in self._outcomes:
                seq = self._next_out
                out.append((self._items.pop(seq), self._outcomes.pop(seq)))
                self._next_out += 1
            self._cond.notify_all()  # room for the network thread
            return out

    def pending(self) -> int:
        with self._cond:
            return self._next_seq - self._next_out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
