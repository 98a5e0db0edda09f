"""The dashboard's feed (pure) and its HTTP server (a real one on a free port, in this
process). The page in a real headless Chromium during a real run is in test_system.py."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from coordinator import dashboard
from coordinator.dashboard import DashboardFeed, fleet_rows, serve_dashboard, sse_frame
from fedbus.errors import ConfigError

RUN = {"run_id": "r1", "task_id": "t1", "mode": "fedbuff", "state": "running"}


def frames(stream, n):
    return [next(stream) for _ in range(n)]


def parse(frame: bytes) -> tuple[str, int, dict]:
    lines = frame.decode().strip().split("\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return fields["event"], int(fields["id"]), json.loads(fields["data"])


def test_an_event_is_one_json_line_with_its_name_and_number():
    assert sse_frame("version", {"version": 3}, 7) == (
        b'event: version\nid: 7\ndata: {"version":3}\n\n'
    )


def test_the_snapshot_holds_versions_in_order_and_the_latest_summary():
    feed = DashboardFeed(RUN)
    feed.version(0, 0.0, 0.1, 2.3, 0, at=100.0)
    feed.version(1, 1.5, 0.4, float("nan"), 4, at=101.5)
    feed.version(0, 0.0, None, None, 0)  # an older version again (a resume): ignored
    assert feed.summary({"accepted": 4, "rejected": {"norm": 1}})
    assert not feed.summary({"accepted": 4, "rejected": {"norm": 1}})  # unchanged
    snap = feed.snapshot()
    assert snap["run"] == RUN
    assert [p["version"] for p in snap["points"]] == [0, 1]
    assert snap["points"][1] == {"version": 1, "seconds": 1.5, "accuracy": 0.4, "loss": None,
                                 "updates_accepted": 4, "at": 101.5}
    assert snap["summary"] == {"accepted": 4, "rejected": {"norm": 1}}
    assert snap["seq"] == 3  # two versions and one summary
    feed.version(1, 1.5, 0.5, 1.0, 4)  # the same version again, evaluated: replaced
    assert feed.snapshot()["points"][1]["accuracy"] == 0.5
    json.dumps(snap, allow_nan=False)  # nothing a browser's JSON.parse would refuse


def test_a_long_run_is_thinned_but_keeps_its_newest_versions(monkeypatch):
    monkeypatch.setattr(dashboard, "MAX_POINTS", 10)
    feed = DashboardFeed(RUN)
    for v in range(11):
        feed.version(v, float(v), 0.5, 1.0, v)
    versions = [p["version"] for p in feed.snapshot()["points"]]
    assert versions == [0, 2, 4, 5, 6, 7, 8, 9, 10]


def test_a_stream_starts_with_a_snapshot_then_sends_each_event_once():
    feed = DashboardFeed(RUN)
    feed.version(0, 0.0, 0.1, 2.3, 0)
    stream = feed.stream(keepalive=0.05)
    event, number, data = parse(next(stream))
    assert (event, number, len(data["points"])) == ("snapshot", 1, 1)
    feed.version(1, 1.0, 0.5, 1.2, 2)
    feed.summary({"accepted": 2})
    got = [parse(f) for f in frames(stream, 2)]
    assert [(e, n) for e, n, _ in got] == [("version", 2), ("summary", 3)]
    assert got[0][2]["accuracy"] == 0.5
    assert next(stream) == b": keepalive\n\n"  # silence
    feed.run_info(state="ended")
    event, _, data = parse(next(stream))
    assert event == "run" and data["state"] == "ended"
    feed.close()
    assert list(stream) == []


def test_a_page_that_falls_behind_the_event_log_gets_a_new_snapshot(monkeypatch):
    monkeypatch.setattr(dashboard, "EVENT_LOG", 4)
    feed = DashboardFeed(RUN)
    stream = feed.stream(keepalive=0.05)
    assert parse(next(stream))[0] == "snapshot"
    for v in range(10):  # more events than the log holds, while the page is not reading
        feed.version(v, float(v), 0.5, 1.0, v)
    event, number, data = parse(next(stream))
    assert event == "snapshot" and number == 10 and len(data["points"]) == 10


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_the_server_serves_the_page_the_state_and_the_event_stream():
    feed = DashboardFeed(RUN)
    feed.version(0, 0.0, 0.25, 2.0, 0)
    server = serve_dashboard(feed, "127.0.0.1", 0, keepalive=0.2)
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, kind, body = _get(base + "/")
        assert status == 200 and kind.startswith("text/html")
        assert b"EventSource" in body and b"http://" not in body.replace(
            b"http://www.w3.org/2000/svg", b"")  # nothing loaded from elsewhere
        status, kind, body = _get(base + "/state.json")
        assert status == 200 and kind == "application/json"
        assert json.loads(body)["points"][0]["accuracy"] == 0.25
        assert _get(base + "/nothing")[0] == 404

        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"event: snapshot" not in received or not received.endswith(b"\n\n"):
            received += sock.recv(65536)
        assert b"text/event-stream" in received
        threading.Timer(0.1, feed.version, (1, 1.0, 0.6, 1.1, 2)).start()
        while b"event: version" not in received:
            received += sock.recv(65536)
        assert b'"accuracy":0.6' in received
    finally:
        server.stop()
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)


def test_a_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve the dashboard on 127.0.0.1:{port}"):
            serve_dashboard(DashboardFeed(RUN), "127.0.0.1", port)


def test_fleet_rows_follow_the_fleet_snapshot():
    from coordinator.fleet import FleetStats, fleet_snapshot

    stats = FleetStats()
    snap = fleet_snapshot(stats, {}, now=10.0, started=0.0)
    assert fleet_rows(snap["devices"]) == []
    rows = fleet_rows([{
        "id": "dev-1", "state": "idle", "online": True, "last_seen": 9.0, "agent": "0.1.0",
        "run": "r1", "model_version": 3, "accepted": 2, "rejected": {"norm": 1},
        "repeated": 0, "bytes": 900, "mean_staleness": 0.5, "loss": 0.3, "acc": 0.8,
        "acc_int8": None, "error": {"kind": "data", "text": "label 'x' unknown", "ts": 8.0},
    }])
    assert rows == [{
        "device": "dev-1", "state": "idle", "last_seen": 9.0, "agent": "0.1.0",
        "model_version": 3, "accepted": 2, "rejected": {"norm": 1}, "bytes": 900,
        "mean_staleness": 0.5, "loss": 0.3, "local_accuracy": 0.8,
        "error": "data: label 'x' unknown",
    }]
