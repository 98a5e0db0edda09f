"""Revision 2.10: at most ``concurrency`` devices train at a time, by invitation (pure parts:
``coordinator.invitations``, the core's decisions, the wire form)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.core import AggregationConfig, SendInvite, SendReceipt
from coordinator.invitations import Invitations
from fedbus.envelope import pack, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import Invite, ModelSpec, Task, TrainSpec
from tests.test_core import TASK, core, status, upd


def test_invites_in_order_of_waiting_up_to_the_limit() -> None:
    inv = Invitations(2)
    for d in ("a", "b", "c"):
        inv.on_presence(d, True, False, now=0.0)
    assert inv.invite(1.0) == ["a", "b"]
    assert inv.invite(1.0) == []  # no free slot
    assert inv.consume("a") and not inv.consume("a")  # used once
    assert inv.invite(2.0) == ["c"]  # c waited longer than a, which is back in line
    assert inv.consume("b")
    assert inv.invite(3.0) == ["a"]
    assert not inv.consume("x")  # never invited


def test_a_device_cannot_push_itself_forward() -> None:
    inv = Invitations(1)
    inv.on_presence("a", True, False, now=0.0)
    inv.on_presence("b", True, False, now=0.0)
    inv.on_presence("b", True, False, now=1.0)  # saying so again keeps its place
    assert inv.invite(1.0) == ["a"]


def test_offline_devices_leave_and_free_their_slot() -> None:
    inv = Invitations(1)
    inv.on_presence("a", True, False, now=0.0)
    inv.on_presence("b", True, False, now=0.0)
    assert inv.invite(0.0) == ["a"]
    inv.on_presence("a", False, False, now=1.0)
    assert not inv.holds("a")
    assert inv.invite(1.0) == ["b"]
    inv.on_presence("a", True, False, now=2.0)
    assert inv.invite(2.0) == []  # a waits behind nobody, but the slot is b's


def test_training_without_invitation_takes_a_free_slot_only() -> None:
    inv = Invitations(1)
    inv.on_presence("a", True, True, now=0.0)  # e.g. invited by the coordinator before a restart
    assert inv.holds("a")
    inv.on_presence("b", True, True, now=0.0)  # no slot left: b waits
    assert not inv.holds("b") and inv.waiting == {"b": None}


def test_unused_invitations_expire_oldest_first() -> None:
    inv = Invitations(2, timeout=10.0)
    for d in ("a", "b", "c"):
        inv.on_presence(d, True, False, now=0.0)
    inv.invite(0.0)
    assert inv.expire(9.9) == []
    assert inv.expire(10.0) == ["a", "b"]
    assert inv.invite(10.0) == ["c", "a"]


@pytest.mark.parametrize("kwargs", [{"concurrency": 0}, {"concurrency": 1, "timeout": 0.0}])
def test_refuses_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Invitations(**kwargs)


def test_config_checks_concurrency() -> None:
    with pytest.raises(ValueError, match="fedbuff"):
        AggregationConfig(mode="fedavg", concurrency=4)
    with pytest.raises(ValueError, match="concurrency"):
        AggregationConfig(concurrency=-1)
    # the staleness a fleet makes is the staleness its training part makes, and K keeps it
    # at about STALENESS_TARGET versions (coordinator.fleet_scale)
    scaled = AggregationConfig(fleet_scaling=True, concurrency=100).scaled(5000)
    assert scaled == AggregationConfig(fleet_scaling=True, concurrency=100).scaled(100)
    assert scaled.buffer_size == 15


def _online(c: object, devices: list[str]) -> list:
    actions: list = []
    for d in devices:
        actions += c.on_status(d, status(d, "online"), now=0.0)  # type: ignore[attr-defined]
    return actions


def test_core_invites_up_to_the_limit_and_refuses_the_uninvited() -> None:
    c = core(buffer_size=2, concurrency=2)
    invites = _online(c, ["d1", "d2", "d3"])
    assert invites == [SendInvite("d1", 0), SendInvite("d2", 0)]
    refused = c.on_update("d3", upd("d3"), now=1.0)
    assert [(a.receipt.accepted, a.receipt.reason) for a in refused] == [
        (False, "not_selected")]
    accepted = c.on_update("d1", upd("d1"), now=1.0)
    first = accepted[0]
    assert isinstance(first, SendReceipt) and first.receipt.accepted
    assert accepted[1:] == [SendInvite("d3", 0)]  # d1's slot goes to d3, first in line
    assert c.on_update("d1", upd("d1", base=1), now=2.0)[0].receipt.reason == "future_version"
    # a rejected update uses the invitation up too (the device trained): d1 waits again
    assert c.on_update("d2", upd("d2"), now=2.0)[-1] == SendInvite("d1", 1)
    assert c.on_update("d2", upd("d2", base=1), now=3.0)[0].receipt.reason == "not_selected"
    assert c.counters["invitations_sent"] == 4
    assert c.counters["rejected_not_selected"] == 2


def test_a_fleet_within_the_limit_is_not_refused() -> None:
    # an agent older than 2.10 trains without invitation: within the limit, it is taken
    c = core(buffer_size=4, concurrency=3)
    assert _online(c, ["d1", "d2"]) == [SendInvite("d1", 0), SendInvite("d2", 0)]
    assert c.on_update("d1", upd("d1"), now=1.0)[0].receipt.accepted
    # d3 said nothing (no status, no invitation): 3 devices, within the limit of 3
    assert c.on_update("d3", upd("d3"), now=1.0)[0].receipt.accepted
    _online(c, ["d3", "d4"])  # 4 > 3: now an update without invitation is refused
    assert c.on_update("d4", upd("d4"), now=2.0)[0].receipt.reason == "not_selected"


def test_tick_withdraws_unused_invitations() -> None:
    c = core(buffer_size=2, concurrency=1, invite_timeout=30.0)
    assert _online(c, ["d1", "d2"]) == [SendInvite("d1", 0)]
    assert c.tick(now=29.0) == []
    assert c.tick(now=30.0) == [SendInvite("d2", 0)]
    assert c.counters["invitations_expired"] == 1


def test_no_invitations_once_the_run_ended() -> None:
    c = core(buffer_size=2, concurrency=1)
    c.end("done")
    assert _online(c, ["d1"]) == []


def test_invite_and_task_flag_on_the_wire() -> None:
    invite = Invite(7, 1767225600.0, run_id="r1")
    wire = invite.to_wire()
    assert wire == {"v": 2, "kind": "invite", "run": "r1", "version": 7, "ts": 1767225600.0}
    assert Invite.from_wire(unpack(pack(wire))) == invite
    # the test vector of docs/protocol.md section 7.11
    vector = Invite(12, 1767225600.0, run_id="hR5tWq2LmZ8vXc1E").to_wire()
    assert pack(vector).hex() == (
        "85a17602a46b696e64a6696e76697465a372756eb0685235745771324c6d5a387658633145"
        "a776657273696f6e0ca27473cb41da556e40000000")
    with pytest.raises(ProtocolError):
        Invite.from_wire({**wire, "version": -1})
    task = Task("t", ModelSpec("mlp"), TrainSpec(), run_id="r1", by_invitation=True)
    assert task.to_wire()["by_invitation"] is True
    assert Task.from_wire(task.to_wire()) == task
    plain = Task("t", ModelSpec("mlp"), TrainSpec(), run_id="r1")
    assert "by_invitation" not in plain.to_wire()  # byte for byte the task of 2.9
    with pytest.raises(ProtocolError):
        Task.from_wire({**task.to_wire(), "by_invitation": 1})


def test_open_invitations_are_noted_for_the_store_in_order() -> None:
    inv = Invitations(2)
    for d in ("a", "b", "c"):
        inv.on_presence(d, True, False, now=0.0)
    inv.invite(0.0)
    assert inv.drain_changes() == {"a": True, "b": True}
    assert inv.drain_changes() == {}
    inv.consume("a")
    inv.invite(1.0)  # c takes a's slot
    inv.on_presence("b", False, False, now=1.0)
    assert list(inv.drain_changes().items()) == [("a", False), ("c", True), ("b", False)]
    back = Invitations.restored(2, 600.0, ("c",), now=5.0)
    assert back.open == {"c": 5.0} and back.waiting == {} and back.changes == {}


def test_a_restarted_coordinator_keeps_its_invitations() -> None:
    from coordinator.core import CoordinatorCore

    c = core(buffer_size=2, concurrency=2, invite_timeout=30.0)
    assert _online(c, ["d1", "d2", "d3"]) == [SendInvite("d1", 0), SendInvite("d2", 0)]
    assert c.on_update("d1", upd("d1"), now=1.0)[-1] == SendInvite("d3", 0)
    snap = c.store.load()
    assert snap.invitations == ("d2", "d3")  # d1's was used up; in the order they were made
    again = CoordinatorCore.resume(
        TASK, c.config, ledger=c.store, version=snap.version, state=snap.state,
        velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
        round_fixed=snap.round, ended=None, now=100.0, invitations=snap.invitations)
    # the retained statuses arrive again: d3 says training, d1 waits; no slot is free
    assert again.on_status("d3", status("d3", "training"), now=100.0) == []
    assert again.on_status("d1", status("d1", "online"), now=100.0) == []
    judged = again.on_update("d2", upd("d2"), now=101.0)  # invited before the restart
    assert judged[0].receipt.accepted and judged[-1] == SendInvite("d1", 1)
    assert again.tick(now=129.0) == []
    # d3's invitation ran a whole timeout from the restart; its slot goes to d2, next in line
    assert again.tick(now=130.0) == [SendInvite("d2", 1)]


def test_open_invitations_survive_reopening_the_state(tmp_path) -> None:
    from coordinator.journal import InvitationsChanged
    from coordinator.store import Store

    store = Store(tmp_path / "state.db")
    store.create_run("r1", TASK.to_wire(), 0.0, {"w": np.zeros(2, np.float32)}, {})
    store.commit([InvitationsChanged((("a", True), ("b", True), ("c", True)))], {})
    store.commit([InvitationsChanged((("a", False), ("b", True)))], {})  # b invited again
    store.close()
    again = Store(tmp_path / "state.db")
    assert again.load().invitations == ("c", "b")
    again.close()


# -- revision 2.13: an invitation lost by a restart is sent again, same id ------------------


def _status17(device: str, state: str, known: str | None) -> bytes:
    from fedbus.messages import Status

    return pack(Status(device, state, ts=0.0, invite=known, invite_aware=True).to_wire())


@pytest.mark.parametrize(("open_id", "state", "aware", "known", "due"), [
    ("X", "online", True, None, True),     # restarted before using it: never heard of it
    ("X", "idle", True, "W", True),        # knows only an older one
    ("X", "online", True, "X", False),     # holds it (waiting for a model)
    ("X", "idle", True, "X", False),       # used it: its update is on the way
    ("X", "training", True, None, False),  # trains on something: its next status decides
    ("X", "offline", True, None, False),
    ("X", None, True, None, False),        # status cleared
    ("X", "online", False, None, False),   # older than 2.13: says nothing, never sent again
    (None, "online", True, "W", False),    # holds no invitation
])
def test_resend_due(open_id: str | None, state: str | None, aware: bool, known: str | None,
                    due: bool) -> None:
    from coordinator.invitations import resend_due

    assert resend_due(open_id, state, aware, known) is due


def test_resend_names_the_open_invitation_and_changes_nothing() -> None:
    ids = iter(["i1", "i2"])
    inv = Invitations(1, new_id=lambda: next(ids))
    inv.on_presence("a", True, False, now=0.0)
    inv.on_presence("b", True, False, now=0.0)
    assert inv.invite(0.0) == ["a"] and inv.id_of("a") == "i1"
    inv.drain_changes()
    assert inv.resend("a", "online", True, None, now=5.0) == "i1"
    assert inv.resend("a", "online", True, "i1", now=9.0) is None
    assert inv.resend("b", "online", True, "i1", now=9.0) is None  # b holds none
    assert inv.open == {"a": 0.0} and list(inv.waiting) == ["b"] and inv.changes == {}
    assert inv.resends_due(20.0) == []
    assert inv.consume("a") and inv.id_of("a") is None
    assert inv.invite(1.0) == ["b"] and inv.id_of("b") == "i2"  # a fresh id per invitation


def test_a_claim_within_the_grace_waits_and_a_later_status_can_clear_it() -> None:
    inv = Invitations(1, grace=3.0, new_id=lambda: "i1")
    inv.on_presence("a", True, False, now=0.0)
    assert inv.invite(0.0) == ["a"]
    # the idle a published before the invite reached it: noted, not sent again at once
    assert inv.resend("a", "idle", True, "old", now=0.1) is None
    assert inv.resends_due(2.9) == []
    inv.resend("a", "idle", True, "i1", now=0.2)  # it got it and says so: nothing to send
    assert inv.resends_due(3.0) == []
    # it restarts quickly and names nothing: sent once the grace from the invite has passed
    assert inv.resend("a", "online", True, None, now=1.0) is None
    assert inv.resends_due(3.0) == [("a", "i1")]
    assert inv.resends_due(10.0) == []  # once
    # a device repeating its claim gets its invitation at most once per grace
    assert [inv.resend("a", "online", True, None, now=t) for t in (3.5, 5.9, 6.0)] == [
        None, None, "i1"]
    inv.consume("a")
    assert inv.unknown == {} and inv.resends_due(100.0) == []


def test_core_sends_a_lost_invitation_again_with_its_id() -> None:
    c = core(buffer_size=2, concurrency=1)
    first = c.on_status("d1", _status17("d1", "online", None), now=0.0)
    assert first == [SendInvite("d1", 0)]  # once: the status that opened it does not resend
    invite_id = first[0].invite_id
    assert invite_id is not None and len(invite_id) == 16
    assert c.on_status("d2", _status17("d2", "online", "zz"), now=0.0) == []  # no slot
    # d1 received it (its status names it), trains, says idle before its update arrives
    assert c.on_status("d1", _status17("d1", "training", invite_id), now=1.0) == []
    assert c.on_status("d1", _status17("d1", "idle", invite_id), now=2.0) == []
    # d1 restarted before training: it names an older invitation; the same one goes again
    again = c.on_status("d1", _status17("d1", "online", "old"), now=3.0)
    assert again == [SendInvite("d1", 0)] and again[0].invite_id == invite_id
    assert c.on_status("d1", status("d1", "online"), now=4.0) == []  # a 2.12 status: nothing
    # within the grace of that resend: at the first tick after it
    assert c.on_status("d1", _status17("d1", "online", None), now=5.0) == []
    assert c.tick(now=5.9) == []
    assert c.tick(now=6.0) == [SendInvite("d1", 0)] and c.tick(now=9.5) == []
    assert c.counters["invitations_sent"] == 1 and c.counters["invitations_resent"] == 2
    # its update uses it up; d2 gets the slot with a new id
    judged = c.on_update("d1", upd("d1"), now=10.0)
    assert judged[0].receipt.accepted and judged[-1] == SendInvite("d2", 0)
    assert judged[-1].invite_id not in (None, invite_id)
    c.pause("maintenance")
    assert c.on_status("d2", _status17("d2", "online", None), now=20.0) == []  # paused


def test_invitation_ids_survive_a_coordinator_restart(tmp_path) -> None:
    from coordinator.core import CoordinatorCore
    from coordinator.journal import InvitationsChanged
    from coordinator.store import Store

    c = core(buffer_size=2, concurrency=1)
    sent = c.on_status("d1", _status17("d1", "online", None), now=0.0)
    assert c.on_status("d1", _status17("d1", "online", None), now=0.5) == []  # crossed it
    snap = c.store.load()
    assert snap.invitation_ids == {"d1": sent[0].invite_id}
    again = CoordinatorCore.resume(
        TASK, c.config, ledger=c.store, version=snap.version, state=snap.state,
        velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
        round_fixed=snap.round, ended=None, now=100.0, invitations=snap.invitations,
        invitation_ids=snap.invitation_ids)
    resent = again.on_status("d1", _status17("d1", "online", None), now=100.0)
    assert resent == [SendInvite("d1", 0)] and resent[0].invite_id == sent[0].invite_id
    # a state whose rows have no id (written before 2.13) gets fresh ones; a file reopened
    store = Store(tmp_path / "state.db")
    store.create_run("r1", TASK.to_wire(), 0.0, {"w": np.zeros(2, np.float32)}, {})
    store.commit([InvitationsChanged((("a", True), ("b", True)), (("b", "beef"),))], {})
    store.close()
    reopened = Store(tmp_path / "state.db")
    loaded = reopened.load()
    reopened.close()
    assert loaded.invitations == ("a", "b") and loaded.invitation_ids == {"b": "beef"}
    back = Invitations.restored(1, 600.0, loaded.invitations, now=0.0,
                                ids=loaded.invitation_ids)
    assert back.ids["b"] == "beef" and len(back.ids["a"]) == 16


def test_invite_id_and_status_invite_on_the_wire() -> None:
    from fedbus.messages import Status

    invite = Invite(12, 1767225600.0, run_id="hR5tWq2LmZ8vXc1E", invite_id="9f86d081884c7d65")
    # the second test vector of docs/protocol.md section 7.11
    assert pack(invite.to_wire()).hex() == (
        "86a17602a46b696e64a6696e76697465a372756eb0685235745771324c6d5a387658633145"
        "a776657273696f6e0ca27473cb41da556e40000000a26964b0396638366430383138383463"
        "37643635")
    assert Invite.from_wire(unpack(pack(invite.to_wire()))) == invite
    for bad in ("", "a b", 7):
        with pytest.raises(ProtocolError):
            Invite.from_wire({**invite.to_wire(), "id": bad})
    none = Status("d1", "online", ts=0.0, invite=None, invite_aware=True)
    assert none.to_wire()["invite"] is None  # nil, but present: the device speaks 2.13
    assert Status.read(pack(none.to_wire())) == none
    old = Status.read(pack(Status("d1", "online", ts=0.0).to_wire()))
    assert "invite" not in Status("d1", "online").to_wire() and not old.invite_aware
    with pytest.raises(ProtocolError):
        Status.from_wire({**none.to_wire(), "invite": 3})
