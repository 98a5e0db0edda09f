"""The coordinator's live web dashboard: one self-contained page, a JSON snapshot and a
stream of server-sent events, served by the standard library's HTTP server.

The pure part is ``DashboardFeed``: the service tells it about versions (``version``) and,
at most about once a second, the run's counters and fleet (``summary``); it keeps the page's
whole state (a bounded list of version points, the latest summary) and a numbered log of
recent events. ``serve_dashboard`` answers

- ``GET /``            the page (``dashboard.html`` beside this module; no external resource),
- ``GET /state.json``  the whole state, for scripts and for a page that (re)connects,
- ``GET /events``      ``text/event-stream``: ``snapshot`` (the whole state) on connect, then
                       ``version`` and ``summary`` events as they happen, and a comment line
                       every 15 s of silence so proxies keep the connection open.

Why this stack: the stream only ever flows from the coordinator to the page, which is what
server-sent events are for (the browser's ``EventSource`` reconnects by itself); the
standard library serves them from one thread per open page without adding a web framework
to the coordinator, and the page draws its charts as SVG without a charting library. Like
the metrics endpoint it listens on loopback unless told otherwise: it names devices and
shows the run's progress, and it has no login.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from fedbus.errors import ConfigError

__all__ = ["DashboardFeed", "DashboardServer", "fleet_rows", "serve_dashboard", "sse_frame"]

# version points the page is sent; older ones are thinned (every other one dropped)
MAX_POINTS = 2000
# events kept for pages that fall behind; one that falls further gets a new snapshot
EVENT_LOG = 256
KEEPALIVE_SECONDS = 15.0


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def sse_frame(event: str, data: Mapping[str, Any] | list[Any], event_id: int) -> bytes:
    """One server-sent event: ``event``, ``id`` and the JSON ``data`` on one line."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\nid: {event_id}\ndata: {text}\n\n".encode()


def fleet_rows(devices: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The page's fleet table from the devices of a fleet snapshot (``coordinator.fleet``):
    one row per device, in the page's column order; local_accuracy is the device's own int8
    accuracy on its data (its float accuracy when it sent no int8 one), the error the text
    of its last reported problem."""
    rows = []
    for d in devices:
        error = d.get("error")
        accuracy = d.get("acc_int8")
        rows.append({
            "device": d["id"], "state": d.get("state") or "unknown",
            "last_seen": d.get("last_seen"), "agent": d.get("agent"),
            "model_version": d.get("model_version"), "accepted": d.get("accepted", 0),
            "rejected": d.get("rejected") or {}, "bytes": d.get("bytes", 0),
            "mean_staleness": d.get("mean_staleness"), "loss": d.get("loss"),
            "local_accuracy": accuracy if accuracy is not None else d.get("acc"),
            "error": None if not error else f"{error.get('kind')}: {error.get('text')}",
        })
    return rows


class DashboardFeed:
    """The page's state and its recent events; safe to use from several threads."""

    def __init__(self, run: Mapping[str, Any]) -> None:
        self._run = dict(run)
        self._points: list[dict[str, Any]] = []
        self._summary: dict[str, Any] = {}
        self._events: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=EVENT_LOG)
        self._seq = 0
        self._cond = threading.Condition()
        self.closed = False

    # -- what the service tells --------------------------------------------------------------

    def version(self, version: int, seconds: float, accuracy: float | None,
                loss: float | None, updates_accepted: int, at: float | None = None) -> None:
        """Version ``version`` was recorded ``seconds`` into the run (evaluated or not)."""
        point = {
            "version": int(version), "seconds": round(float(seconds), 3),
            "accuracy": _finite(accuracy), "loss": _finite(loss),
            "updates_accepted": int(updates_accepted),
            "at": round(time.time() if at is None else at, 3),
        }
        with self._cond:
            if self._points and self._points[-1]["version"] > point["version"]:
                return  # an older version recorded again: the page has it already
            if self._points and self._points[-1]["version"] == point["version"]:
                self._points[-1] = point  # the same version again, evaluated this time
            else:
                self._points.append(point)
            if len(self._points) > MAX_POINTS:  # thin the oldest half, keep the newest
                half = len(self._points) // 2
                self._points = self._points[:half:2] + self._points[half:]
            self._emit("version", point)

    def summary(self, summary: Mapping[str, Any]) -> bool:
        """The run's counters, bytes and fleet now; an unchanged summary sends nothing.
        Returns whether it changed."""
        new = json.loads(json.dumps(summary, allow_nan=False, default=str))
        with self._cond:
            if new == self._summary:
                return False
            self._summary = new
            self._emit("summary", new)
            return True

    def run_info(self, **changes: Any) -> None:
        """Change what the page says about the run (its state when it ends, for example)."""
        with self._cond:
            self._run.update(changes)
            self._emit("run", dict(self._run))

    def close(self) -> None:
        """Wake every open stream so that it ends."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # -- what pages read ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {"run": dict(self._run), "points": list(self._points),
                    "summary": dict(self._summary), "seq": self._seq}

    def stream(self, keepalive: float = KEEPALIVE_SECONDS) -> Iterator[bytes]:
        """The frames of one open page: a snapshot, then events as they come, ``b": \\n\\n"``
        after ``keepalive`` seconds of silence; ends when the feed closes."""
        snap = self.snapshot()
        seq = snap["seq"]
        yield sse_frame("snapshot", snap, seq)
        while True:
            with self._cond:
                self._cond.wait_for(partial(self._newer_than, seq), timeout=keepalive)
                if self.closed:
                    return
                pending = [e for e in self._events if e[0] > seq]
                behind = bool(self._events) and self._events[0][0] > seq + 1
                if behind:  # this page missed events the log no longer holds
                    snap = {"run": dict(self._run), "points": list(self._points),
                            "summary": dict(self._summary), "seq": self._seq}
            if behind:
                seq = snap["seq"]
                yield sse_frame("snapshot", snap, seq)
            elif pending:
                for number, event, data in pending:
                    yield sse_frame(event, data, number)
                seq = pending[-1][0]
            else:
                yield b": keepalive\n\n"

    def _newer_than(self, seq: int) -> bool:
        return self._seq > seq or self.closed

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        self._events.append((self._seq, event, data))
        self._cond.notify_all()


def _page() -> bytes:
    return resources.files("coordinator").joinpath("dashboard.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.server.page)
        elif path == "/state.json":
            body = json.dumps(self.server.feed.snapshot(), allow_nan=False).encode()
            self._send(HTTPStatus.OK, "application/json", body)
        elif path == "/events":
            self._stream()
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # the page loads nothing from anywhere else
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; style-src 'unsafe-inline'; "
                         "script-src 'unsafe-inline'; img-src 'self' data:")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for frame in self.server.feed.stream(self.server.keepalive):
                self.wfile.write(frame)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the coordinator's log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], feed: DashboardFeed, keepalive: float) -> None:
        super().__init__(address, _Handler)
        self.feed = feed
        self.keepalive = keepalive
        self.page = _page()


class DashboardServer:
    """The dashboard's HTTP server on its own thread; ``stop()`` closes it."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fedbus-dashboard",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.feed.close()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_dashboard(feed: DashboardFeed, host: str, port: int,
                    keepalive: float = KEEPALIVE_SECONDS) -> DashboardServer:
    """Serve ``feed`` on ``http://host:port/`` (port 0: any free port). A port that cannot
    be bound is a ``ConfigError``."""
    try:
        server = _Server((host, port), feed, keepalive)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}; choose "
            "another --dashboard-port (or 0 to switch it off)"
        ) from None
    return DashboardServer(server)
