"""A TCP proxy that breaks one network link on purpose: cut, blackhole, refuse and flap.

Fault-injection tests and the fault benchmark put a ``LinkProxy`` between one MQTT client
(an edge agent) and the broker: the agent connects to ``proxy.host:proxy.port`` instead of
the broker, and the test switches the link between modes from any thread while real
sockets carry the traffic::

    with LinkProxy("127.0.0.1", broker.port) as link:
        start_agent(port=link.port)
        link.blackhole()          # the radio dies, TCP stays up
        ...
        link.heal()

Modes and actions (every call returns once the change is in effect):

``heal()``
    Normal forwarding both ways (the initial mode). Re-opens the listener on the same port
    after ``refuse()``. Connections that were blackholed are closed with a reset (see below).
``blackhole()``
    The link goes silent while TCP stays up: existing connections stay open, new ones are
    still accepted, and every byte read from either side is discarded (bytes already
    buffered in the proxy are discarded too). Connections accepted while blackholed never
    reach the target. A side that closes its end while blackholed is closed on the proxy
    only; the other side does not hear of it. Only an application keepalive can notice.
    ``heal()`` closes every blackholed connection with a reset instead of resuming it: the
    bytes lost in between would have left each MQTT stream torn in the middle of a packet,
    so the peers reconnect.
``cut()``
    Resets every current connection on both sides at once (``SO_LINGER`` 0, so the peers
    see ``ECONNRESET``). The listener stays open and the mode does not change, so a client
    may reconnect at once (or is blackholed again if the mode is ``"blackhole"``).
``refuse()``
    Cuts every connection and closes the listener, so new connections get "connection
    refused" until ``heal()`` or ``blackhole()``. The port stays reserved meanwhile (the
    proxy keeps a bound, non-listening socket on it), so reconnecting to the same address
    works after healing.

``flap()`` alternates a down phase (cut, refuse or blackhole) and an up phase (heal) for
random durations until an event is set, and always ends healed; ``start_flapping()`` runs
it on a daemon thread.

Implementation: one daemon thread runs a ``selectors`` loop over the listener and every
connection (non-blocking sockets, bounded buffers, so a slow reader slows the writer down
instead of filling memory). Mode changes are handed to that thread and the caller waits for
them. The target is connected only when a client connects; if it cannot be reached, the
client connection is reset. Errors on one connection close that connection only and are
never raised into the caller; only ``start()`` and ``heal()``/``blackhole()`` (when the
port cannot be bound again) raise ``OSError`` in the caller's thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, get_args

__all__ = ["FlapHow", "Flapper", "LinkMode", "LinkProxy", "LinkStats"]

log = logging.getLogger(__name__)

LinkMode = Literal["pass", "blackhole", "refuse"]
"""What the link does now: forward, discard silently, or refuse connections."""

FlapHow = Literal["cut", "refuse", "blackhole"]
"""How ``flap()`` takes the link down in each down phase."""

PhaseCallback = Callable[[str, float], None]

_RECV_SIZE = 64 * 1024
_HIGH_WATER = 256 * 1024  # per direction and connection; reading pauses above it
_BACKLOG = 128
_LINGER_RST = struct.pack("ii", 1, 0)
_COMMAND_TIMEOUT = 10.0
_STOP_JOIN_SECONDS = 2.0
_CONNECT_IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})

_LISTENER = "listener"
_WAKE = "wake"

_Address = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of a proxy's counters (since it was created)."""

    connections_accepted: int
    """Client connections the listener accepted (in any mode)."""
    connections_cut: int
    """Connections the proxy reset on purpose: ``cut()``, ``refuse()``, and ``heal()``
    after ``blackhole()``. Errors, normal closes and ``stop()`` are not counted."""
    connections_open: int
    """Connections open right now (client side, server side or both)."""
    target_connect_failures: int
    """Client connections reset because the target could not be reached."""
    bytes_client_to_server: int
    """Bytes written to the target."""
    bytes_server_to_client: int
    """Bytes written to clients."""
    bytes_discarded: int
    """Bytes read from either side and never delivered: read while blackholed, or still
    buffered in the proxy when a connection was blackholed, cut or failed."""


class _Side:
    """One socket of a connection pair, and the bytes read from it not yet delivered."""

    __slots__ = (
        "addr_index",
        "connecting",
        "deadline",
        "eof",
        "is_client",
        "mask",
        "pending",
        "shut",
        "sock",
    )

    def __init__(self, sock: socket.socket | None, *, is_client: bool) -> None:
        self.sock = sock
        self.is_client = is_client
        self.pending = bytearray()  # read from this side, waiting to go to the other
        self.eof = False  # this side sent FIN
        self.shut = False  # we sent FIN to this side
        self.connecting = False
        self.deadline = 0.0
        self.addr_index = 0
        self.mask = 0  # events the selector watches for this socket (0: unregistered)


class _Pair:
    """A client connection and the proxy's connection to the target for it."""

    __slots__ = ("blackholed", "client", "closed", "ident", "server")

    def __init__(self, ident: int, client: socket.socket, *, blackholed: bool) -> None:
        self.ident = ident
        self.client = _Side(client, is_client=True)
        self.server = _Side(None, is_client=False)
        self.blackholed = blackholed
        self.closed = False

    def peer(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client


class _Command:
    __slots__ = ("done", "error", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.error: Exception | None = None


def _reset_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST and drops unsent data."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _check_range(name: str, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not 0 <= low <= high:
        raise ValueError(f"{name} must be (low, high) seconds with 0 <= low <= high, got {bounds}")


class LinkProxy:
    """A TCP proxy for one link, from ``host:port`` to ``target_host:target_port``.

    ``listen_port=0`` picks a free port on the first ``start()``; the port is then kept
    for the proxy's lifetime (across ``refuse()``/``heal()`` and ``stop()``/``start()``).
    ``connect_timeout`` bounds each attempt to reach the target.

    Mode methods may be called from any thread, before ``start()`` too (they then only
    set the mode the proxy starts in). ``start()`` and ``stop()`` belong to one thread.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 10.0,
    ) -> None:
        if not 0 <= listen_port <= 65535:
            raise ValueError(f"listen_port must be 0..65535, got {listen_port}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
        self._target = (target_host, target_port)
        self._host = listen_host
        self._port = listen_port
        self._connect_timeout = connect_timeout

        self._lock = threading.RLock()
        self._mode: LinkMode = "pass"
        self._active = False  # the loop thread owns the sockets below
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._commands: deque[_Command] = deque()

        # Owned by the loop thread while active.
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._listener: socket.socket | None = None  # listening, or bound only (refuse)
        self._listening = False
        self._listen_family = socket.AF_INET
        self._listen_sockaddr: _Address = (listen_host, listen_port)
        self._target_addrs: list[tuple[socket.AddressFamily, _Address]] = []
        self._pairs: dict[int, _Pair] = {}
        self._next_ident = 0

        # Counters, guarded by _lock.
        self._accepted = 0
        self._cut = 0
        self._connect_failures = 0
        self._c2s = 0
        self._s2c = 0
        self._discarded = 0

    # ---- properties -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the proxy listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The listening port (known once started, kept across refuse/heal and restarts)."""
        if self._port == 0:
            raise RuntimeError("the proxy picks its port on start(); start it first")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for clients to connect to."""
        return self._host, self.port

    @property
    def target(self) -> tuple[str, int]:
        """``(host, port)`` the proxy forwards to."""
        return self._target

    @property
    def mode(self) -> LinkMode:
        """``"pass"``, ``"blackhole"`` or ``"refuse"``. ``cut()`` does not change it."""
        with self._lock:
            return self._mode

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        with self._lock:
            return self._active

    def stats(self) -> LinkStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return LinkStats(
                connections_accepted=self._accepted,
                connections_cut=self._cut,
                connections_open=len(self._pairs),
                target_connect_failures=self._connect_failures,
                bytes_client_to_server=self._c2s,
                bytes_server_to_client=self._s2c,
                bytes_discarded=self._discarded,
            )

    def __repr__(self) -> str:
        port = self._port or "?"
        return (
            f"LinkProxy({self._host}:{port} -> {self._target[0]}:{self._target[1]}, "
            f"mode={self.mode!r})"
        )

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> LinkProxy:
        """Bind the listener and start the loop thread; a no-op when already running.

        Raises ``OSError`` when the listening address cannot be bound or the target
        host name does not resolve.
        """
        with self._lock:
            if self._active:
                return self
            previous = self._thread
            if previous is not None:  # a stop() that timed out; give it one more chance
                previous.join(_STOP_JOIN_SECONDS)
                if previous.is_alive():
                    raise RuntimeError("the previous loop thread of this proxy is still running")
            self._target_addrs = [
                (info[0], info[4])
                for info in socket.getaddrinfo(
                    self._target[0], self._target[1], type=socket.SOCK_STREAM
                )
            ]
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            self._listen_family = family
            self._listen_sockaddr = sockaddr

            sel = selectors.DefaultSelector()
            wake_r, wake_w = socket.socketpair()
            listener: socket.socket | None = None
            try:
                wake_r.setblocking(False)
                wake_w.setblocking(False)
                sel.register(wake_r, selectors.EVENT_READ, _WAKE)
                listener = self._bind_listener(self._port)
                if self._mode != "refuse":
                    listener.listen(_BACKLOG)
                    sel.register(listener, selectors.EVENT_READ, _LISTENER)
            except BaseException:
                for sock in (listener, wake_r, wake_w):
                    if sock is not None:
                        sock.close()
                sel.close()
                raise
            self._port = listener.getsockname()[1]
            self._sel, self._wake_r, self._wake_w = sel, wake_r, wake_w
            self._listener = listener
            self._listening = self._mode != "refuse"
            self._stopping = False
            self._active = True
            self._thread = threading.Thread(
                target=self._run, name=f"linkfault-{self._port}", daemon=True
            )
            self._thread.start()
        log.debug("%r started", self)
        return self

    def stop(self) -> None:
        """Reset every connection, close every socket and join the loop thread.

        Idempotent; returns within about two seconds. The mode and the port are kept, so
        ``start()`` brings the proxy back on the same address.
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
        self._wake()
        if thread is not threading.current_thread():
            thread.join(_STOP_JOIN_SECONDS)
        if thread.is_alive():
            log.warning("%r: loop thread did not end within %.0f s", self, _STOP_JOIN_SECONDS)
            return
        with self._lock:
            if self._thread is thread:
                self._thread = None

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- modes ------------------------------------------------------------------------

    def heal(self) -> None:
        """Forward normally. Re-opens the listener (same port) after ``refuse()``; closes
        connections that were blackholed with a reset, so the peers reconnect."""
        self._command(self._do_heal)

    def blackhole(self) -> None:
        """Keep TCP up but discard every byte both ways, on old and new connections."""
        self._command(self._do_blackhole)

    def cut(self) -> None:
        """Reset every current connection on both sides; keep listening and the mode."""
        self._command(self._do_cut)

    def refuse(self) -> None:
        """Reset every connection and stop listening, so connecting is refused until
        ``heal()``."""
        self._command(self._do_refuse)

    # ---- flapping ---------------------------------------------------------------------

    def flap(
        self,
        stop: threading.Event,
        *,
        down: tuple[float, float] = (1.0, 4.0),
        up: tuple[float, float] = (1.0, 4.0),
        rng: random.Random | None = None,
        how: FlapHow = "cut",
        on_phase: PhaseCallback | None = None,
    ) -> int:
        """Take the link down and up again, in the caller's thread, until ``stop`` is set.

        Each cycle is a down phase (``cut()``, ``refuse()`` or ``blackhole()`` per ``how``,
        then a wait drawn uniformly from ``down`` seconds) and an up phase (``heal()``,
        then a wait drawn from ``up``). With ``how="cut"`` the link is only down for the
        instant of the cut (clients may reconnect at once), so the down and up waits just
        space the cuts out. ``on_phase(name, seconds)`` is called as each phase begins,
        with ``how`` or ``"heal"``. Always ends healed. Returns the number of down phases.
        """
        action = self._flap_action(how, down, up)
        rng = rng if rng is not None else random.Random()
        phases = 0
        try:
            while not stop.is_set():
                seconds = rng.uniform(*down)
                action()
                phases += 1
                if on_phase is not None:
                    on_phase(how, seconds)
                if stop.wait(seconds):
                    break
                seconds = rng.uniform(*up)
                self.heal()
                if on_phase is not None:
                    on_phase("heal", seconds)
                stop.wait(seconds)
        finally:
            self.heal()
        return phases

    def start_flapping(
        self,
        *,
        down: tuple[float, float] = (1.0, 4.0),
        up: tuple[float, float] = (1.0, 4.0),
        rng: random.Random | None = None,
        how: FlapHow = "cut",
        on_phase: PhaseCallback | None = None,
    ) -> Flapper:
        """Run ``flap()`` on a daemon thread; ``.stop()`` on the handle ends it healed."""
        self._flap_action(how, down, up)  # bad arguments raise here, not in the thread
        return Flapper(self, down=down, up=up, rng=rng, how=how, on_phase=on_phase)

    def _flap_action(
        self, how: str, down: tuple[float, float], up: tuple[float, float]
    ) -> Callable[[], None]:
        if how not in get_args(FlapHow):
            raise ValueError(f"how must be one of {get_args(FlapHow)}, got {how!r}")
        _check_range("down", down)
        _check_range("up", up)
        return {"cut": self.cut, "refuse": self.refuse, "blackhole": self.blackhole}[how]

    # ---- commands (run on the loop thread, or directly when not running) -------------

    def _command(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self._active or threading.current_thread() is self._thread:
                fn()  # not running: only the mode changes
                return
            command = _Command(fn)
            self._commands.append(command)
        self._wake()
        if not command.done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError(f"{self!r}: the loop thread did not answer")
        if command.error is not None:
            raise command.error

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            try:
                command.fn()
            except Exception as exc:
                command.error = exc
            finally:
                command.done.set()

    def _do_heal(self) -> None:
        if self._mode == "blackhole":
            for pair in list(self._pairs.values()):
                if pair.blackholed:
                    self._abort(pair, cut=True)
        self._open_listener()
        self._set_mode("pass")

    def _do_blackhole(self) -> None:
        self._open_listener()
        self._set_mode("blackhole")
        for pair in self._pairs.values():
            if not pair.blackholed:
                pair.blackholed = True
                dropped = len(pair.client.pending) + len(pair.server.pending)
                pair.client.pending.clear()
                pair.server.pending.clear()
                self._count_discarded(dropped)

    def _do_cut(self) -> None:
        for pair in list(self._pairs.values()):
            self._abort(pair, cut=True)

    def _do_refuse(self) -> None:
        self._do_cut()
        self._close_listener()
        self._set_mode("refuse")

    def _set_mode(self, mode: LinkMode) -> None:
        with self._lock:
            if mode != self._mode:
                log.info("%s:%s link %s -> %s", self._host, self._port, self._mode, mode)
            self._mode = mode

    # ---- listener ---------------------------------------------------------------------

    def _bind_listener(self, port: int) -> socket.socket:
        sock = socket.socket(self._listen_family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sockaddr = (self._listen_sockaddr[0], port, *self._listen_sockaddr[2:])
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_listener(self) -> None:
        if not self._active or self._listening:
            return
        assert self._sel is not None
        if self._listener is None:  # the placeholder could not be bound at refuse()
            self._listener = self._bind_listener(self._port)
        self._listener.listen(_BACKLOG)
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._listening = True

    def _close_listener(self) -> None:
        """Close the listening socket; keep the port with a bound, non-listening one."""
        if not self._active or not self._listening:
            return
        assert self._sel is not None and self._listener is not None
        self._sel.unregister(self._listener)
        self._listener.close()
        self._listening = False
        self._listener = None
        try:
            self._listener = self._bind_listener(self._port)
        except OSError as exc:  # heal() binds again (and raises if that fails too)
            log.warning("%s:%s: cannot hold the port while refusing: %s", *self.address, exc)

    def _accept(self) -> None:
        assert self._listener is not None
        while self._listening:
            try:
                client, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE; don't spin on a readable listener
                log.warning("%s:%s: accept failed: %s", self._host, self._port, exc)
                time.sleep(0.05)
                return
            client.setblocking(False)
            _nodelay(client)
            self._next_ident += 1
            pair = _Pair(self._next_ident, client, blackholed=self._mode == "blackhole")
            with self._lock:
                self._accepted += 1
                self._pairs[pair.ident] = pair
            log.debug("link %d: accepted %s (blackholed=%s)", pair.ident, peer, pair.blackholed)
            if not pair.blackholed and not self._connect_next(pair):
                self._connect_failed(pair, None)

    # ---- connections ------------------------------------------------------------------

    def _connect_next(self, pair: _Pair) -> bool:
        """Start a non-blocking connect to the next target address; False when none is
        left."""
        side = pair.server
        while side.addr_index < len(self._target_addrs):
            family, sockaddr = self._target_addrs[side.addr_index]
            side.addr_index += 1
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                log.debug("link %d: cannot create a socket: %s", pair.ident, exc)
                continue
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
            if err in _CONNECT_IN_PROGRESS:
                side.sock = sock
                side.connecting = True
                side.deadline = time.monotonic() + self._connect_timeout
                return True
            log.debug("link %d: connect to %s: %s", pair.ident, sockaddr, os.strerror(err))
            sock.close()
        return False

    def _finish_connect(self, pair: _Pair) -> None:
        side = pair.server
        assert side.sock is not None
        err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._retry_connect(pair, OSError(err, os.strerror(err)))
            return
        side.connecting = False
        _nodelay(side.sock)
        log.debug("link %d: connected to the target", pair.ident)

    def _retry_connect(self, pair: _Pair, exc: OSError) -> None:
        log.debug("link %d: connect to the target failed: %s", pair.ident, exc)
        self._close_side(pair.server, reset=False)
        pair.server.connecting = False
        if not self._connect_next(pair):
            self._connect_failed(pair, exc)

    def _connect_failed(self, pair: _Pair, exc: OSError | None) -> None:
        with self._lock:
            self._connect_failures += 1
        log.info(
            "link %d: target %s:%s unreachable (%s); closing the client",
            pair.ident,
            *self._target,
            exc or "no address",
        )
        if pair.blackholed:  # the client must not hear of it while the link is dead
            self._drop_if_empty(pair)
        else:
            self._abort(pair)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for pair in list(self._pairs.values()):
            if not pair.closed and pair.server.connecting and pair.server.deadline <= now:
                self._retry_connect(pair, TimeoutError("connect timed out"))

    def _select_timeout(self) -> float | None:
        deadlines = [p.server.deadline for p in self._pairs.values() if p.server.connecting]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _read(self, pair: _Pair, side: _Side) -> None:
        assert side.sock is not None
        try:
            data = side.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._side_failed(pair, side, exc)
            return
        if not data:
            side.eof = True
            return
        if pair.blackholed:
            self._count_discarded(len(data))
        else:
            side.pending += data

    def _write(self, pair: _Pair, side: _Side) -> None:
        assert side.sock is not None
        buf = pair.peer(side).pending
        try:
            sent = side.sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._side_failed(pair, side, exc)
            return
        del buf[:sent]
        with self._lock:
            if side.is_client:
                self._s2c += sent
            else:
                self._c2s += sent

    def _side_failed(self, pair: _Pair, side: _Side, exc: OSError) -> None:
        name = "client" if side.is_client else "server"
        log.debug("link %d: %s side failed: %s", pair.ident, name, exc)
        if pair.blackholed:  # the other side must not hear of it
            self._close_side(side, reset=True)
            self._drop_if_empty(pair)
        else:
            self._abort(pair)

    def _refresh(self, pair: _Pair) -> None:
        """Propagate half-closes, finish closed pairs, and set what the selector watches."""
        client, server = pair.client, pair.server
        if pair.blackholed:
            for side in (client, server):
                if side.eof and side.sock is not None:
                    self._close_side(side, reset=False)
            if self._drop_if_empty(pair):
                return
        else:
            for side in (client, server):
                peer = pair.peer(side)
                if (
                    side.eof
                    and not side.pending
                    and not peer.shut
                    and peer.sock is not None
                    and not peer.connecting
                ):
                    try:
                        peer.sock.shutdown(socket.SHUT_WR)
                    except OSError as exc:
                        self._side_failed(pair, peer, exc)
                        return
                    peer.shut = True
            if client.eof and server.eof and client.shut and server.shut:
                log.debug("link %d: closed by both peers", pair.ident)
                self._close_side(client, reset=False)
                self._close_side(server, reset=False)
                self._forget(pair)
                return
        for side in (client, server):
            self._watch(pair, side, self._interest(pair, side))

    @staticmethod
    def _interest(pair: _Pair, side: _Side) -> int:
        if side.sock is None:
            return 0
        if side.connecting:
            return selectors.EVENT_WRITE
        mask = 0
        if not side.eof and (pair.blackholed or len(side.pending) < _HIGH_WATER):
            mask |= selectors.EVENT_READ
        if not pair.blackholed and not side.shut and pair.peer(side).pending:
            mask |= selectors.EVENT_WRITE
        return mask

    def _watch(self, pair: _Pair, side: _Side, mask: int) -> None:
        assert self._sel is not None
        if mask == side.mask or side.sock is None:
            return
        if side.mask == 0:
            self._sel.register(side.sock, mask, (pair, side))
        elif mask == 0:
            self._sel.unregister(side.sock)
        else:
            self._sel.modify(side.sock, mask, (pair, side))
        side.mask = mask

    def _close_side(self, side: _Side, *, reset: bool) -> None:
        sock = side.sock
        if sock is None:
            return
        if side.mask and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        side.mask = 0
        side.sock = None
        if reset:
            _reset_close(sock)
        else:
            with contextlib.suppress(OSError):
                sock.close()

    def _abort(self, pair: _Pair, *, cut: bool = False) -> None:
        """Reset both sides of a pair and forget it."""
        if pair.closed:
            return
        dropped = len(pair.client.pending) + len(pair.server.pending)
        self._close_side(pair.client, reset=True)
        self._close_side(pair.server, reset=True)
        self._count_discarded(dropped)
        if cut:
            with self._lock:
                self._cut += 1
        log.debug("link %d: reset (%s)", pair.ident, "cut" if cut else "error")
        self._forget(pair)

    def _drop_if_empty(self, pair: _Pair) -> bool:
        if pair.client.sock is None and pair.server.sock is None:
            self._forget(pair)
            return True
        return False

    def _forget(self, pair: _Pair) -> None:
        pair.closed = True
        pair.client.pending.clear()
        pair.server.pending.clear()
        with self._lock:
            self._pairs.pop(pair.ident, None)

    def _count_discarded(self, n: int) -> None:
        if n:
            with self._lock:
                self._discarded += n

    # ---- the loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        sock = self._wake_w
        if sock is not None:
            with contextlib.suppress(OSError):  # full (already woken) or closed (stopped)
                sock.send(b"\0")

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                try:
                    events = sel.select(self._select_timeout())
                except OSError:
                    log.exception("%r: select failed", self)
                    time.sleep(0.05)
                    continue
                for key, mask in events:
                    self._dispatch(key, mask)
                self._run_commands()
                self._check_deadlines()
                for pair in list(self._pairs.values()):
                    try:
                        self._refresh(pair)
                    except Exception:
                        log.exception("link %d: unexpected error; resetting it", pair.ident)
                        self._abort(pair)
        except Exception:  # a bug; don't leave callers waiting on a dead loop
            log.exception("%r: loop failed; closing every connection", self)
        finally:
            self._close_everything()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        if data == _WAKE:
            assert self._wake_r is not None
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            return
        if data == _LISTENER:
            self._accept()
            return
        pair, side = data
        if pair.closed or side.sock is not key.fileobj:
            return  # closed earlier in this round
        try:
            if side.connecting:
                self._finish_connect(pair)
                return
            if mask & selectors.EVENT_READ:
                self._read(pair, side)
            if mask & selectors.EVENT_WRITE and not pair.closed and side.sock is not None:
                self._write(pair, side)
        except Exception:
            log.exception("link %d: unexpected error; resetting it", pair.ident)
            self._abort(pair)

    def _close_everything(self) -> None:
        for pair in list(self._pairs.values()):
            self._abort(pair)
        if self._listener is not None:
            self._listener.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()
        with self._lock:
            self._listener = None
            self._listening = False
            self._wake_r = self._wake_w = None
            self._sel = None
            self._active = False
            pending = list(self._commands)
            self._commands.clear()
        for command in pending:  # mode changes that raced with stop(): apply offline
            with self._lock:
                try:
                    command.fn()
                except Exception as exc:
                    command.error = exc
                finally:
                    command.done.set()
        log.debug("%r stopped", self)


class Flapper:
    """A ``LinkProxy.flap()`` running on a daemon thread; ``stop()`` ends it healed."""

    def __init__(
        self,
        proxy: LinkProxy,
        *,
        down: tuple[float, float],
        up: tuple[float, float],
        rng: random.Random | None,
        how: FlapHow,
        on_phase: PhaseCallback | None,
    ) -> None:
        self._proxy = proxy
        self._event = threading.Event()
        self._down_phases = 0
        self._on_phase = on_phase
        self.error: Exception | None = None
        """What ended the flapping early, if anything (it is logged too)."""
        self._thread = threading.Thread(
            target=self._run,
            kwargs={"down": down, "up": up, "rng": rng, "how": how},
            name=f"linkfault-flap-{proxy.host}",
            daemon=True,
        )
        self._thread.start()

    @property
    def down_phases(self) -> int:
        """Down phases begun so far."""
        return self._down_phases

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> int:
        """Stop flapping, wait for the final ``heal()``, return the number of down phases.

        Does not raise; check ``error`` for what may have ended the flapping early.
        """
        self._event.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("flapping %r did not stop within %.1f s", self._proxy, timeout)
        return self._down_phases

    def _phase(self, name: str, seconds: float) -> None:
        if name != "heal":
            self._down_phases += 1
        if self._on_phase is not None:
            self._on_phase(name, seconds)

    def _run(
        self,
        *,
        down: tuple[float, float],
        up: tuple[float, float],
        rng: random.Random | None,
        how: FlapHow,
    ) -> None:
        try:
            self._proxy.flap(self._event, down=down, up=up, rng=rng, how=how, on_phase=self._phase)
        except Exception as exc:
            self.error = exc
            log.exception("flapping %r failed", self._proxy)
