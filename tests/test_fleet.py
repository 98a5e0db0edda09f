"""The fleet view without a broker: statistics folded from judgements and status messages
(coordinator.fleet), the snapshot message and its reader, its rendering
(coordinator.fleet_view), the status fields of revision 2.3, the operator's rights, and the
coordinator's side (judging, presence log lines, publishing) on the in-memory broker."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import msgpack
import pytest
from inmemory import ARGS, Running, wait_for
from rich.console import Console

from broker_config import ACL_FILE
from coordinator.config import CoordinatorConfig
from coordinator.core import STATUS_LIMITS, Judged
from coordinator.fleet import RATE_WINDOW, FleetStats, fleet_snapshot
from coordinator.fleet_view import fleet_view, human_bytes, read_fleet, seconds_ago
from coordinator.service import CoordinatorService
from fedbus import dynsec
from fedbus.envelope import pack
from fedbus.errors import ProtocolError
from fedbus.memory_transport import MemoryBroker
from fedbus.messages import MAX_STATUS_ERROR, Status
from fedbus.transport import ConnectionSettings, Message

RUN = {"task": "t", "run": "r1", "mode": "fedbuff", "version": 3, "accuracy": 0.8125,
       "loss": 0.5, "evaluated_version": 3, "updates_accepted": 2, "updates_rejected": 1,
       "bytes_received": 3000, "bytes_model_published": 4000, "ended": None,
       "state": "paused", "control": {"id": "q1", "command": "pause", "outcome": "done",
                                      "detail": "paused", "ts": 1000.5}}


def _status(device: str, state: str, **kw: Any) -> bytes:
    return pack(Status(device, state, ts=1.0, **kw).to_wire())


# -- folding ---------------------------------------------------------------------------------


def test_judgements_fold_into_counts_bytes_staleness_and_metrics() -> None:
    fleet = FleetStats()
    fleet.on_judged(Judged("a", "accepted", None, 1000, 0, {"loss": 0.75, "acc_int8": 0.5,
                                                             "sec": 2.0}), now=100.0)
    fleet.on_judged(Judged("a", "accepted", None, 1200, 3, {"loss": 0.25}), now=101.0)
    fleet.on_judged(Judged("a", "rejected", "stale", 800), now=102.0)
    fleet.on_judged(Judged("a", "rejected", "stale", 800), now=103.0)
    fleet.on_judged(Judged("a", "rejected", "malformed", 10), now=104.0)
    fleet.on_judged(Judged("a", "repeated", None, 1000, 0), now=105.0)
    a = fleet.devices["a"]
    assert (a.accepted, a.repeated, a.rejected) == (2, 1, {"stale": 2, "malformed": 1})
    assert a.bytes == 1000 + 1200 + 800 + 800 + 10  # a repeat is not counted again
    assert a.staleness_sum == 3
    assert a.metrics == {"loss": 0.25}  # the last accepted update's claims only
    assert a.last_seen == 105.0
    assert fleet.revision == 6
    snap = fleet_snapshot(fleet, RUN, now=106.0, started=100.0)
    (device,) = snap["devices"]
    assert device["mean_staleness"] == 1.5  # (0 + 3) / 2
    assert device["rejected"] == {"malformed": 1, "stale": 2}
    assert device["state"] == "unknown" and device["online"] is False
    # 2 accepted within 6 s of the start of this process
    assert snap["run"]["updates_per_second"] == round(2 / 6, 4)


def test_updates_per_second_counts_the_last_window_only() -> None:
    fleet = FleetStats()
    for t in (0.0, 10.0, 70.0, 75.0, 80.0):
        fleet.on_judged(Judged("a", "accepted", None, 1, 0), now=t)
    # at 90 s the window (30..90] holds three
    assert fleet.updates_per_second(90.0, started=0.0) == pytest.approx(3 / RATE_WINDOW)
    assert fleet.updates_per_second(500.0, started=0.0) == 0.0


def test_status_gives_presence_agent_version_and_errors() -> None:
    fleet = FleetStats()
    assert fleet.on_status("a", _status("a", "online", agent="0.9", run_id="r1",
                                        model_version=2), now=10.0) == "joined"
    assert fleet.on_status("a", _status("a", "training", run_id="r1", model_version=2),
                           now=11.0) is None
    a = fleet.devices["a"]
    assert (a.state, a.agent, a.run, a.model_version, a.last_seen) == (
        "training", "0.9", "r1", 2, 11.0)
    error = _status("a", "idle", run_id="r1", model_version=3, error="labels 0-9, model has 2",
                    error_kind="data")
    fleet.on_status("a", error, now=12.0)
    assert a.error == {"kind": "data", "text": "labels 0-9, model has 2", "ts": 12.0}
    fleet.on_status("a", error, now=20.0)  # the same error again keeps its first time
    assert a.error["ts"] == 12.0
    fleet.on_status("a", _status("a", "idle", run_id="r1", model_version=4), now=30.0)
    assert a.error is not None  # the last error stays after the device recovered
    # the Will: offline with no run and no version keeps what the device last said
    assert fleet.on_status("a", _status("a", "offline"), now=40.0) == "left"
    assert (a.state, a.run, a.model_version, a.last_seen) == ("offline", "r1", 4, 30.0)
    assert fleet.on_status("a", b"", now=50.0) is None  # forgotten, was already offline
    assert "a" not in fleet.devices


def test_claims_that_do_not_hold_are_ignored() -> None:
    fleet = FleetStats()
    assert fleet.on_status("a", _status("b", "online"), now=1.0) is None  # names another
    assert fleet.on_status("a", b"\x93\x01\x02", now=1.0) is None  # not a status
    assert fleet.on_status("../x", _status("a", "online"), now=1.0) is None
    too_long = pack({**Status("a", "online", ts=1.0).to_wire(), "agent": "x" * 65})
    assert fleet.on_status("a", too_long, now=1.0) is None
    assert fleet.devices == {} and fleet.status_ignored == 3


def test_a_cleared_status_of_an_online_device_is_a_leave() -> None:
    fleet = FleetStats()
    fleet.on_status("a", _status("a", "idle"), now=1.0)
    assert fleet.on_status("a", b"", now=2.0) == "left"


# -- the status fields of revision 2.3 --------------------------------------------------------


def test_status_error_fields_round_trip_and_stay_within_the_decode_limits() -> None:
    status = Status("dev-1", "idle", 4, 1.0, run_id="r1", agent="x" * 64,
                    error="e" * MAX_STATUS_ERROR, error_kind="memory")
    payload = pack(status.to_wire())
    assert len(payload) < STATUS_LIMITS.max_bytes
    assert Status.read(payload, STATUS_LIMITS) == status
    # without the new fields the wire form is what revision 2.1 wrote
    assert set(Status("d", "online", ts=1.0).to_wire()) == {
        "v", "kind", "device_id", "state", "run", "model_version", "ts"}


@pytest.mark.parametrize(("field", "value"), [
    ("error", "e" * (MAX_STATUS_ERROR + 1)), ("error", "é" * 101), ("agent", "a\nb"),
    ("agent", 5),
    ("error_kind", "k" * 33),
])
def test_status_fields_out_of_bounds_are_schema_errors(field: str, value: Any) -> None:
    wire = {**Status("d", "idle", ts=1.0, error="x", error_kind="data").to_wire(), field: value}
    with pytest.raises(ProtocolError) as info:
        Status.read(pack(wire), STATUS_LIMITS)
    assert info.value.reason == "schema"


def test_an_unknown_error_kind_reads_as_other() -> None:
    wire = {**Status("d", "idle", ts=1.0).to_wire(), "error": "x", "error_kind": "gpu"}
    assert Status.read(pack(wire)).error_kind == "other"


# -- the snapshot on the wire -----------------------------------------------------------------


def _fleet() -> FleetStats:
    fleet = FleetStats()
    fleet.on_status("dev-a", _status("dev-a", "idle", agent="0.1.0", run_id="r1",
                                     model_version=3), now=1000.0)
    fleet.on_judged(Judged("dev-a", "accepted", None, 1500, 1, {"loss": 0.4, "acc_int8": 0.75}),
                    now=1001.0)
    fleet.on_judged(Judged("dev-a", "rejected", "stale", 1500), now=1002.0)
    fleet.on_status("dev-b", _status("dev-b", "offline", error="out of memory",
                                     error_kind="memory"), now=990.0)
    return fleet


def test_snapshot_round_trips_through_the_wire() -> None:
    snap = fleet_snapshot(_fleet(), RUN, now=1003.0, started=900.0)
    back = read_fleet(pack(snap))
    assert back == snap
    assert [d["id"] for d in back["devices"]] == ["dev-a", "dev-b"]
    assert back["run"]["devices_online"] == 1 and back["run"]["devices_known"] == 2


def test_reader_tolerates_additions_and_refuses_what_it_cannot_show() -> None:
    snap = fleet_snapshot(_fleet(), RUN, now=1003.0, started=900.0)
    newer = {**snap, "extra": 1, "run": {**snap["run"], "new": "x"}}
    assert read_fleet(pack(newer))["run"] == snap["run"]
    for bad in (
        {**snap, "kind": "status"},
        {**snap, "devices": {}},
        {**snap, "ts": math.nan},
        {**snap, "run": {**snap["run"], "version": "3"}},
        {**snap, "devices": [{**snap["devices"][0], "accepted": True}]},
        {**snap, "devices": [{**snap["devices"][0], "loss": math.inf}]},
        {**snap, "devices": [{**snap["devices"][0], "rejected": {"stale": "1"}}]},
        {**snap, "devices": [{"state": "idle"}]},
    ):
        with pytest.raises(ProtocolError):
            read_fleet(msgpack.packb(bad, use_bin_type=True))


def test_rendering_shows_each_device_and_the_run() -> None:
    snap = read_fleet(pack(fleet_snapshot(_fleet(), RUN, now=1003.0, started=900.0)))
    console = Console(width=200, record=True, color_system=None)
    console.print(fleet_view(snap, now=1010.0))
    text = console.export_text()
    assert "held-out accuracy 0.8125" in text
    assert "devices online 1/2" in text
    assert "snapshot 7s ago" in text
    assert "the run is paused" in text  # RUN is paused (revision 2.5)
    row_a = next(line for line in text.splitlines() if line.startswith("dev-a"))
    for cell in ("idle", "8s ago", "0.1.0", "v3", "1 (stale 1)", "3.0 kB", "1.00", "0.400",
                 "0.750"):
        assert cell in row_a, cell
    row_b = next(line for line in text.splitlines() if line.startswith("dev-b"))
    assert "offline" in row_b and "memory: out of memory (20s ago)" in row_b


def test_rendering_an_empty_fleet() -> None:
    snap = read_fleet(pack(fleet_snapshot(FleetStats(), RUN, now=5.0, started=1.0)))
    console = Console(width=120, record=True, color_system=None)
    console.print(fleet_view(snap, now=5.0))
    assert "no device has been seen yet" in console.export_text()
    assert "paused" not in fleet_text({**RUN, "state": "running"})


def fleet_text(run: dict[str, object]) -> str:
    snap = read_fleet(pack(fleet_snapshot(FleetStats(), run, now=5.0, started=1.0)))
    console = Console(width=120, record=True, color_system=None)
    console.print(fleet_view(snap, now=5.0))
    return console.export_text()


def test_human_units() -> None:
    assert [human_bytes(n) for n in (None, 999, 1000, 1_234_567, 5 * 10**12)] == [
        "-", "999 B", "1.0 kB", "1.2 MB", "5000.0 GB"]
    assert [seconds_ago(t, 10_000.0) for t in (None, 9_990.0, 9_000.0, 2_000.0, 20_000.0)] == [
        "-", "10s ago", "16m ago", "2h ago", "0s ago"]
    assert seconds_ago(0.0, 200_000.0) == "2d ago"


# -- who may read and write it ----------------------------------------------------------------


def test_operator_role_reads_and_writes_only_the_run_commands() -> None:
    role = dynsec.operator_role("lab/t7")
    rows = {(a["acltype"], a["topic"]) for a in role["acls"]}
    assert rows == {
        ("publishClientSend", "lab/t7/control"),  # revision 2.5: fedbus run
        ("publishClientReceive", "lab/t7/fleet"), ("subscribeLiteral", "lab/t7/fleet"),
        ("publishClientReceive", "lab/t7/task"), ("subscribeLiteral", "lab/t7/task"),
        ("publishClientReceive", "lab/t7/model"), ("subscribeLiteral", "lab/t7/model"),
        ("publishClientReceive", "lab/t7/model/chunk/+"),  # revision 2.6
        ("subscribePattern", "lab/t7/model/chunk/+"),
        ("publishClientReceive", "lab/t7/status/+"), ("subscribePattern", "lab/t7/status/+"),
    }
    with pytest.raises(ValueError, match="reserved"):
        dynsec.check_new_device_id(dynsec.OPERATOR_USERNAME)


def test_no_device_role_or_pattern_grants_the_fleet_topic() -> None:
    role = dynsec.device_role("fedbus", "dev-a")
    assert not any("fleet" in a["topic"] for a in role["acls"])
    lines = [line.split() for line in ACL_FILE.read_text().splitlines()
             if line and not line.startswith("#")]
    assert not any(words[0] == "pattern" and "fleet" in words[-1] for words in lines)
    # nor the run commands (revision 2.5): only the operator's section names them
    assert not any("control" in a["topic"] for a in role["acls"])
    assert [words for words in lines if "fedbus/control" in words[-1]] == [
        ["topic", "write", "fedbus/control"]]


def test_an_old_broker_directory_gets_the_operator_once() -> None:
    old = dynsec.initial_config("fedbus", admin_password="a", coordinator_password="c",
                                devices={"dev-a": "d"})
    assert dynsec.OPERATOR_USERNAME not in {c["username"] for c in old["clients"]}
    new = dynsec.with_operator(old, "fedbus", "op")
    assert new is not None
    operator = next(c for c in new["clients"] if c["username"] == dynsec.OPERATOR_USERNAME)
    assert operator["roles"] == [{"rolename": dynsec.OPERATOR_ROLE}]
    assert [r["rolename"] for r in new["roles"]].count(dynsec.OPERATOR_ROLE) == 1
    assert dynsec.with_operator(new, "fedbus", "op") is None
    # a directory of revision 2.3: the account is there, its role lacks the run commands
    older_role = {**dynsec.operator_role("fedbus")}
    older_role["acls"] = [a for a in older_role["acls"] if a["acltype"] != "publishClientSend"]
    v23 = {**new, "roles": [r if r["rolename"] != dynsec.OPERATOR_ROLE else older_role
                            for r in new["roles"]]}
    updated = dynsec.with_operator(v23, "fedbus", "other")
    assert updated is not None and updated["clients"] == new["clients"]  # password kept
    assert dynsec.operator_role("fedbus") in updated["roles"]
    assert [r["rolename"] for r in updated["roles"]].count(dynsec.OPERATOR_ROLE) == 1


# -- the coordinator's side ------------------------------------------------------------------


def _service() -> CoordinatorService:
    return CoordinatorService(CoordinatorConfig(model_args=ARGS, state_dir=None), password="x")


def test_the_coordinator_folds_what_it_judges_and_logs_joins_and_leaves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = _service()
    caplog.set_level(logging.INFO, logger="coordinator.service")
    topics = service.topics
    service._on_message(Message(topics.status("dev-a"),
                                _status("dev-a", "online", agent="0.1.0"), True))
    service._on_message(Message(topics.update("dev-a"), b"\xc1", False))
    service._on_message(Message(topics.status("dev-a"), _status("dev-a", "offline"), False))
    joined = [r.getMessage() for r in caplog.records if "joined" in r.getMessage()]
    left = [r.getMessage() for r in caplog.records if " left " in r.getMessage()]
    assert joined == ["device dev-a joined (online, agent 0.1.0, last finished nothing)"]
    assert left == ["device dev-a left (offline)"]
    a = service.fleet.devices["dev-a"]
    assert a.rejected == {"malformed": 1} and a.bytes == 1
    figures = service._run_figures()
    assert figures["updates_rejected"] == 1 and figures["version"] == 0
    service.close()


def test_the_snapshot_is_published_retained_when_it_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("coordinator.service._FLEET_INTERVAL", 0.1)
    broker = MemoryBroker()
    running = Running(broker)
    got: list[Message] = []
    watcher = broker.factory(
        ConnectionSettings("memory", 0, "fedbus-operator", "fedbus-operator", "x"),
        on_message=got.append,
    )
    watcher.subscribe(running.service.topics.fleet)
    watcher.start()
    try:
        wait_for(lambda: bool(got), what="the first snapshot")
        first = read_fleet(got[-1].payload)
        assert first["devices"] == [] and first["run"]["version"] == 0
        device = broker.factory(ConnectionSettings("memory", 0, "dev-a", "dev-a", "x"),
                                on_message=lambda m: None)
        device.start()
        device.publish(running.service.topics.status("dev-a"), _status("dev-a", "idle"),
                       retain=True)
        wait_for(lambda: len(got) >= 2, what="a snapshot with the device")
        assert [d["id"] for d in read_fleet(got[-1].payload)["devices"]] == ["dev-a"]
        late: list[Message] = []  # a viewer that comes later gets the retained snapshot
        viewer = broker.factory(ConnectionSettings("memory", 0, "op2", "op2", "x"),
                                on_message=late.append)
        viewer.subscribe(running.service.topics.fleet)
        viewer.start()
        wait_for(lambda: bool(late), what="the retained snapshot")
        assert late[0].retain and late[0].payload == got[-1].payload
        viewer.stop()
        count = len(got)
        time.sleep(0.5)  # due again several times, but nothing changed: not published
        assert len(got) == count
    finally:
        watcher.stop()
        running.stop()


def test_packed_snapshot_is_the_snapshot_and_packs_only_changed_devices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator publishes ``fleet_snapshot_payload`` every 2 s: byte for byte the
    packed ``fleet_snapshot``, with each device's entry built again only when it changed
    (with 5,000 devices building every entry each time grew the CPU per update)."""
    import coordinator.fleet as fleet_module

    fleet = _fleet()
    for i in range(50):
        fleet.on_status(f"dev-{i:02d}", _status(f"dev-{i:02d}", "idle", run_id="r1"),
                        now=1000.0 + i)

    def same(now: float) -> bytes:
        payload = fleet_module.fleet_snapshot_payload(fleet, RUN, now=now, started=900.0)
        assert payload == pack(fleet_snapshot(fleet, RUN, now=now, started=900.0))
        return payload

    built: list[str] = []
    device_dict = fleet_module._device_dict
    def counted(device_id: str, stats: Any) -> dict[str, Any]:
        built.append(device_id)
        return device_dict(device_id, stats)

    monkeypatch.setattr(fleet_module, "_device_dict", counted)
    first = same(1100.0)
    assert read_fleet(first)["run"]["devices_known"] == 52
    built.clear()
    fleet_module.fleet_snapshot_payload(fleet, RUN, now=1101.0, started=900.0)
    assert built == []  # nothing changed: nothing built again
    fleet.on_status("dev-07", _status("dev-07", "training", run_id="r1"), now=1102.0)
    fleet.on_judged(Judged("dev-a", "accepted", None, 900, 2, {"loss": 0.3}), now=1103.0)
    fleet.on_status("dev-zz", _status("dev-zz", "online"), now=1104.0)  # a new device
    fleet.on_status("dev-11", b"", now=1105.0)  # a cleared status: forgotten
    built.clear()
    after = read_fleet(fleet_module.fleet_snapshot_payload(fleet, RUN, now=1106.0,
                                                           started=900.0))
    assert sorted(built) == ["dev-07", "dev-a", "dev-zz"]
    ids = [d["id"] for d in after["devices"]]
    assert ids == sorted(ids) and "dev-zz" in ids and "dev-11" not in ids
    assert next(d for d in after["devices"] if d["id"] == "dev-07")["state"] == "training"
    built.clear()
    same(1107.0)  # and still the same bytes as the plain snapshot
