"""CoordinatorCore: FedBuff, FedAsync and FedAvg decisions, without broker or clock."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from coordinator.aggregation import is_finite
from coordinator.core import (
    MODES,
    AggregationConfig,
    CoordinatorCore,
    NewModel,
    SendReceipt,
)
from coordinator.store import Store
from coordinator.validation import REJECT_REASONS
from fedbus.envelope import pack, unpack
from fedbus.messages import GlobalModel, ModelSpec, Status, Task, TrainSpec, Update
from fedbus.update_codec import decode_delta, encode_delta

F32 = np.float32
TASK = Task("task1", ModelSpec("mlp"), TrainSpec(), run_id="r1")
_ids = itertools.count()


def initial(value: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, F32), "b": np.full(2, value, F32)}


def delta_of(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, F32), "b": np.full(2, value, F32)}


def upd(
    device: str,
    value: float = 1.0,
    *,
    base: int = 0,
    n: int = 1,
    uid: str | None = None,
    delta: dict[str, np.ndarray] | None = None,
    task_id: str = "task1",
    run: str = "r1",
) -> bytes:
    uid = uid if uid is not None else f"u{next(_ids)}"
    encoded = encode_delta(delta if delta is not None else delta_of(value), "fp32")
    return pack(Update(uid, device, task_id, base, n, encoded, run_id=run).to_wire())


def status(device: str, state: str) -> bytes:
    return pack(Status(device, state, ts=0.0).to_wire())


class Durable:
    """A core whose journal is committed to an in-memory store after every input, as the
    coordinator service does (the core reads its earlier verdicts back from the store)."""

    def __init__(self, core: CoordinatorCore, store: Store) -> None:
        self.core = core
        self.store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.core, name)
        if name not in ("on_update", "on_status", "tick", "flush", "end"):
            return attr

        def committed(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            self.store.commit(self.core.drain_journal(), self.core.counters,
                              max_staleness=self.core.config.effective_max_staleness)
            return result

        return committed


def core(**config: Any) -> Any:
    """A core with the plain mean, no adaptive norm bound and 1/sqrt(1+s) staleness weights
    unless asked (the expected values of most tests here are worked out for the mean of the
    deltas as sent, and for the weights that were the default before poly a = 1)."""
    start = config.pop("initial", initial())
    config.setdefault("aggregator", "mean")
    config.setdefault("staleness", "sqrt")
    config.setdefault("norm_multiple", 0)
    store = Store(None)
    c = CoordinatorCore(TASK, start, AggregationConfig(**config), ledger=store)
    store.create_run(TASK.run_id, TASK.to_wire(), 0.0, c.state, c.counters)
    return Durable(c, store)


def receipts(actions: list) -> list[SendReceipt]:
    return [a for a in actions if isinstance(a, SendReceipt)]


def models(actions: list) -> list[NewModel]:
    return [a for a in actions if isinstance(a, NewModel)]


def only_receipt(actions: list) -> SendReceipt:
    assert len(actions) == 1 and isinstance(actions[0], SendReceipt), actions
    return actions[0]


def assert_state(c: Any, value: float) -> None:
    for arr in c.state.values():
        np.testing.assert_allclose(arr, np.full(arr.shape, value), rtol=1e-6)


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "sync"},
        {"buffer_size": 0},
        {"buffer_size": 2.0},
        {"server_lr": 0.0},
        {"server_lr": math.nan},
        {"server_momentum": 1.0},
        {"server_momentum": -0.5},
        {"mode": "fedavg", "server_momentum": 0.9},
        {"server_optimizer": "rmsprop"},
        {"mode": "fedavg", "server_optimizer": "adam"},
        {"server_optimizer": "yogi", "server_momentum": 0.5},
        {"server_optimizer": "adam", "server_beta1": 1.0},
        {"server_optimizer": "adam", "server_tau": 0.0},
        {"staleness": "linear"},
        {"staleness_a": -1.0},
        {"staleness_b": -1},
        {"max_staleness": -1},
        {"max_norm": 0.0},
        {"max_norm": math.inf},
        {"round_deadline": 0.0},
        {"min_round_updates": 0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AggregationConfig(**kwargs)


def test_config_effective_values() -> None:
    assert MODES == ("fedbuff", "fedasync", "fedavg")
    assert AggregationConfig().effective_buffer_size == 4
    assert AggregationConfig(mode="fedasync", buffer_size=8).effective_buffer_size == 1
    assert AggregationConfig(max_staleness=7).effective_max_staleness == 7
    assert AggregationConfig(mode="fedavg", max_staleness=7).effective_max_staleness == 0


def test_core_rejects_bad_initial_state() -> None:
    cfg = AggregationConfig()
    with pytest.raises(ValueError):
        CoordinatorCore(TASK, {"w": np.array([np.nan], F32)}, cfg, ledger=Store(None))
    with pytest.raises(ValueError):
        CoordinatorCore(TASK, {}, cfg, ledger=Store(None))
    with pytest.raises(ValueError):
        CoordinatorCore(TASK, initial(), cfg, ledger=Store(None), start_version=-1)


# -- FedBuff ----------------------------------------------------------------------------


def test_fedbuff_applies_after_k_and_not_before() -> None:
    c = core(buffer_size=3)
    a1 = c.on_update("d1", upd("d1", 1.0, n=1), now=1.0)
    a2 = c.on_update("d2", upd("d2", 2.0, n=1), now=2.0)
    assert not models(a1) and not models(a2)
    assert c.version == 0
    assert_state(c, 0.0)
    assert c.snapshot()["buffered"] == 2
    a3 = c.on_update("d3", upd("d3", 3.0, n=2), now=3.0)
    # (1*1 + 1*2 + 2*3) / 4 = 2.25, all fresh (weight 1), server_lr 1
    assert models(a3) == [NewModel(1, models(a3)[0].reason)]
    assert c.version == 1
    assert_state(c, 2.25)
    assert c.snapshot()["buffered"] == 0
    assert c.counters["models_published"] == 1


def test_receipts_for_accepted_updates() -> None:
    c = core(buffer_size=2)
    r1 = only_receipt(c.on_update("d1", upd("d1", uid="abc"), now=0.0))
    assert r1.device_id == "d1"
    assert r1.receipt.update_id == "abc"
    assert r1.receipt.accepted is True
    assert r1.receipt.reason is None
    assert r1.receipt.model_version == 0
    assert r1.receipt.staleness == 0
    actions = c.on_update("d2", upd("d2", uid="def"), now=0.0)
    # the receipt (judged at version 0) comes before the new model
    assert isinstance(actions[0], SendReceipt) and isinstance(actions[1], NewModel)
    assert actions[0].receipt.model_version == 0
    assert actions[1].version == 1


def test_counters() -> None:
    c = core(buffer_size=2)
    good1, good2 = upd("d1"), upd("d2")
    bad = upd("d1", task_id="other")
    garbage = b"\x00garbage"
    for device, payload in (("d1", good1), ("d1", bad), ("d3", garbage), ("d2", good2)):
        c.on_update(device, payload, now=0.0)
    k = c.counters
    assert k["updates_received"] == 4
    assert k["updates_accepted"] == 2
    assert k["updates_rejected"] == 2
    assert k["rejected_wrong_task"] == 1
    assert k["rejected_malformed"] == 1
    assert k["bytes_received"] == len(good1) + len(good2) + len(bad) + len(garbage)
    assert k["bytes_accepted"] == len(good1) + len(good2)
    assert k["models_published"] == 1
    assert all(f"rejected_{reason}" in k for reason in REJECT_REASONS)


def test_staleness_weighting_affects_the_step() -> None:
    results = {}
    for kind in ("sqrt", "constant"):
        c = core(mode="fedasync", staleness=kind)
        c.on_update("d1", upd("d1", 1.0, base=0), now=0.0)  # -> 1, version 1
        c.on_update("d1", upd("d1", 1.0, base=1), now=0.0)  # -> 2, version 2
        actions = c.on_update("d2", upd("d2", 3.0, base=0), now=0.0)  # staleness 2
        assert receipts(actions)[0].receipt.staleness == 2
        results[kind] = float(c.state["w"][0, 0])
    # sqrt: 2 + 3 / sqrt(1 + 2) = 2 + sqrt(3); constant: 2 + 3 = 5
    assert results["sqrt"] == pytest.approx(2 + math.sqrt(3), rel=1e-6)
    assert results["constant"] == pytest.approx(5.0)


def test_the_default_staleness_weight_is_one_over_one_plus_s() -> None:
    assert (AggregationConfig().staleness, AggregationConfig().staleness_a) == ("poly", 1.0)
    c = core(mode="fedasync", staleness=AggregationConfig().staleness, staleness_a=1.0)
    c.on_update("d1", upd("d1", 1.0, base=0), now=0.0)  # fresh: weight 1 -> 1
    c.on_update("d2", upd("d2", 1.0, base=0), now=0.0)  # 1 behind: weight 1/2 -> 1.5
    c.on_update("d3", upd("d3", 3.0, base=0), now=0.0)  # 2 behind: weight 1/3 -> 2.5
    assert_state(c, 2.5)


def test_server_lr_and_momentum() -> None:
    c = core(mode="fedasync", server_lr=0.5, server_momentum=0.5)
    c.on_update("d1", upd("d1", 2.0, base=0), now=0.0)
    # v = 2, state = 0 + 0.5*2 = 1
    assert_state(c, 1.0)
    c.on_update("d1", upd("d1", 2.0, base=1), now=0.0)
    # v = 0.5*2 + 2 = 3, state = 1 + 0.5*3 = 2.5
    assert_state(c, 2.5)


@pytest.mark.parametrize("aggregator", ["mean", "quorum"])
def test_fedadam_steps_carry_their_moments(aggregator: str) -> None:
    # beta1 0.5, beta2 0.75, tau 0.5, lr 1; one update of 1.0 per step (fedasync)
    c = core(mode="fedasync", server_optimizer="adam", server_lr=1.0, server_beta1=0.5,
             server_beta2=0.75, server_tau=0.5, aggregator=aggregator)
    c.on_update("d1", upd("d1", 1.0, base=0), now=0.0)
    # m = 0.5, v = 0.75 * 0.25 + 0.25 = 0.4375: step 0.5 / (sqrt(0.4375) + 0.5)
    first = 0.5 / (math.sqrt(0.4375) + 0.5)
    assert_state(c, first)
    c.on_update("d1", upd("d1", 1.0, base=1), now=0.0)
    # m = 0.25 + 0.5 = 0.75, v = 0.75 * 0.4375 + 0.25 = 0.578125
    assert_state(c, first + 0.75 / (math.sqrt(0.578125) + 0.5))


def test_a_resumed_core_keeps_its_adam_moments() -> None:
    settings = {"mode": "fedasync", "server_optimizer": "adam", "server_lr": 1.0,
                "server_beta1": 0.5, "server_beta2": 0.75, "server_tau": 0.5}
    c = core(**settings)
    c.on_update("d1", upd("d1", 1.0, base=0), now=0.0)
    snap = c.store.load()
    assert sorted(snap.velocity) == ["m:b", "m:w", "v:b", "v:w"]
    again = CoordinatorCore.resume(
        TASK, c.core.config, ledger=c.store, version=snap.version, state=snap.state,
        velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
        round_fixed=snap.round, ended=snap.ended, now=1.0, norms=snap.norms,
    )
    again.on_update("d1", upd("d1", 1.0, base=1), now=2.0)
    # the second step of test_fedadam_steps_carry_their_moments: the moments were kept
    first = 0.5 / (math.sqrt(0.4375) + 0.5)
    assert_state(again, first + 0.75 / (math.sqrt(0.578125) + 0.5))
    # resumed as sgd, the moments are not a velocity: it starts afresh (plain step)
    sgd = CoordinatorCore.resume(
        TASK, AggregationConfig(mode="fedasync", aggregator="mean", norm_multiple=0),
        ledger=c.store, version=snap.version, state=snap.state, velocity=snap.velocity,
        counters=snap.counters, pending=snap.pending, round_fixed=snap.round,
        ended=snap.ended, now=1.0, norms=snap.norms,
    )
    sgd.on_update("d1", upd("d1", 1.0, base=1), now=2.0)
    assert_state(sgd, first + 1.0)


def test_a_copy_of_an_accepted_update_gets_its_verdict_again() -> None:
    c = core(buffer_size=4)
    payload = upd("d1", uid="dup")
    first = only_receipt(c.on_update("d1", payload, now=0.0))
    r = only_receipt(c.on_update("d1", payload, now=1.0))
    assert (r.receipt.accepted, r.receipt.repeat, r.receipt.update_id) == (True, True, "dup")
    assert r.receipt.detail == first.receipt.detail
    assert c.counters["updates_repeated"] == 1
    assert c.counters["updates_accepted"] == 1 and c.counters["updates_received"] == 1
    assert c.snapshot()["buffered"] == 1  # never applied twice


def test_an_update_id_is_judged_once() -> None:
    c = core()
    payload = upd("d1", uid="retry", base=5)
    first = only_receipt(c.on_update("d1", payload, now=0.0))
    assert first.receipt.reason == "future_version"
    again = only_receipt(c.on_update("d1", payload, now=0.0))
    assert (again.receipt.reason, again.receipt.repeat) == ("future_version", True)
    other = only_receipt(c.on_update("d1", upd("d1", uid="retry", base=0), now=0.0))
    assert other.receipt.reason == "duplicate"  # another update under a used id
    assert c.counters["rejected_future_version"] == 1


def test_retrained_copy_of_the_same_work_is_rejected() -> None:
    c = core(buffer_size=4)
    assert only_receipt(c.on_update("d1", upd("d1", base=0), now=0.0)).receipt.accepted
    r = only_receipt(c.on_update("d1", upd("d1", base=0), now=1.0))
    assert r.receipt.reason == "duplicate_work"
    assert c.snapshot()["buffered"] == 1


def test_updates_of_another_run_and_retained_copies_are_refused() -> None:
    c = core()
    r = only_receipt(c.on_update("d1", upd("d1", run="old-run"), now=0.0))
    assert (r.receipt.reason, r.receipt.run_id) == ("wrong_run", TASK.run_id)
    r = only_receipt(c.on_update("d1", upd("d1"), now=0.0, retained=True))
    assert r.receipt.reason == "retained"
    assert c.counters["updates_accepted"] == 0


def test_stale_is_rejected() -> None:
    c = core(mode="fedasync", max_staleness=1)
    c.on_update("d1", upd("d1", base=0), now=0.0)
    c.on_update("d1", upd("d1", base=1), now=0.0)
    assert c.version == 2
    r = only_receipt(c.on_update("d2", upd("d2", base=0), now=0.0))
    assert (r.receipt.accepted, r.receipt.reason) == (False, "stale")
    assert r.receipt.model_version == 2
    assert c.counters["rejected_stale"] == 1


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        ({"w": np.full((2, 2), np.nan, F32), "b": np.zeros(2, F32)}, "non_finite"),
        ({"w": np.full((2, 2), np.inf, F32), "b": np.zeros(2, F32)}, "non_finite"),
        ({"w": np.full((2, 2), 1e30, F32), "b": np.zeros(2, F32)}, "norm"),
        ({"w": np.full((2, 2), 60.0, F32), "b": np.zeros(2, F32)}, "norm"),  # norm 120 > 100
    ],
)
def test_poisoned_update_is_rejected_and_state_stays_finite(delta: dict, reason: str) -> None:
    c = core(mode="fedasync")
    r = only_receipt(c.on_update("d1", upd("d1", delta=delta), now=0.0))
    assert r.receipt.reason == reason
    assert c.version == 0
    assert is_finite(c.state)
    assert_state(c, 0.0)


def test_unparseable_update_gets_no_receipt() -> None:
    c = core()
    assert c.on_update("d1", b"\xc1\xc1", now=0.0) == []
    assert c.on_update("d1", pack({"v": 1, "kind": "update"}), now=0.0) == []
    assert c.counters["rejected_malformed"] == 1
    assert c.counters["rejected_schema"] == 1
    assert c.counters["updates_rejected"] == 2


def test_rejection_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    c = core()
    c.on_update("d1", upd("d1", task_id="other"), now=0.0)
    assert any(
        rec.levelname == "WARNING" and "wrong_task" in rec.getMessage() and "d1" in rec.getMessage()
        for rec in caplog.records
    )


def test_device_mismatch_receipt_goes_to_the_topic_device() -> None:
    c = core()
    r = only_receipt(c.on_update("d2", upd("d1", uid="x1"), now=0.0))
    assert r.device_id == "d2"
    assert r.receipt.reason == "device_mismatch"


def test_fedasync_applies_every_update_even_with_buffer_size_set() -> None:
    c = core(mode="fedasync", buffer_size=4)
    for i in range(3):
        actions = c.on_update("d1", upd("d1", 1.0, base=i), now=float(i))
        assert models(actions) == [NewModel(i + 1, models(actions)[0].reason)]
    assert_state(c, 3.0)


def test_aggregation_failure_keeps_the_model() -> None:
    start = initial(3e38)
    c = core(mode="fedbuff", buffer_size=2, max_norm=1e39, initial=start)
    c.on_update("d1", upd("d1", 3e38), now=0.0)
    actions = c.on_update("d2", upd("d2", 3e38), now=0.0)
    assert not models(actions)
    assert receipts(actions)[0].receipt.accepted is True
    assert c.counters["aggregation_failed"] == 1
    assert c.version == 0
    assert c.snapshot()["buffered"] == 0
    assert is_finite(c.state)
    np.testing.assert_array_equal(c.state["w"], start["w"])


def test_state_is_read_only_and_old_views_do_not_change() -> None:
    c = core(mode="fedasync")
    before = c.state
    with pytest.raises(ValueError):
        before["w"][0, 0] = 5.0
    c.on_update("d1", upd("d1", 1.0), now=0.0)
    assert_state(c, 1.0)
    np.testing.assert_array_equal(before["w"], np.zeros((2, 2), F32))


def test_initial_state_is_copied() -> None:
    start = initial(1.0)
    c = core(initial=start)
    start["w"][:] = 9.0
    assert_state(c, 1.0)


def test_model_message_round_trips() -> None:
    c = core(mode="fedasync", server_lr=0.5)
    c.on_update(
        "d1",
        upd(
            "d1",
            delta={"w": np.arange(4, dtype=F32).reshape(2, 2), "b": np.array([0.25, -3.0], F32)},
        ),
        now=0.0,
    )
    msg = c.model_message(now=42.0)
    assert (msg.task_id, msg.run_id, msg.version, msg.created_at) == ("task1", "r1", 1, 42.0)
    wire = GlobalModel.from_wire(unpack(pack(msg.to_wire()), "model"))
    decoded = decode_delta(wire.tensors)
    state = c.state
    assert decoded.keys() == state.keys()
    for name in state:
        np.testing.assert_array_equal(decoded[name], state[name])
    np.testing.assert_array_equal(decoded["b"], [0.125, -1.5])


# -- presence ---------------------------------------------------------------------------


def test_presence_from_status() -> None:
    c = core()
    c.on_status("d1", status("d1", "online"), now=0.0)
    c.on_status("d2", status("d2", "training"), now=0.0)
    c.on_status("d3", status("d3", "offline"), now=0.0)
    assert c.devices == {"d1": "online", "d2": "training", "d3": "offline"}
    assert c.snapshot()["devices_online"] == 2
    c.on_status("d1", b"", now=1.0)  # retained status cleared
    assert "d1" not in c.devices
    assert c.snapshot()["devices_online"] == 1
    c.on_status("d2", status("d2", "offline"), now=2.0)  # kept as statuses come, not counted
    c.on_status("d3", status("d3", "idle"), now=2.0)
    assert c.online_devices() == {"d3"} and c.online_count() == c.contributing_count() == 1


@pytest.mark.parametrize(
    ("device", "payload"),
    [
        ("d1", b"\xc1"),
        ("d1", pack({"v": 1, "kind": "status", "device_id": "d1", "state": "asleep", "ts": 0.0})),
        ("d1", pack({"v": 1, "kind": "update"})),
        ("d1", status("d2", "online")),  # names another device
        ("d1", b"\x00" * 5000),  # over the small status limit
        ("bad/id", status("d1", "online")),
    ],
)
def test_malformed_status_is_ignored_and_counted(device: str, payload: bytes) -> None:
    c = core()
    c.on_status("d1", status("d1", "idle"), now=0.0)
    assert c.on_status(device, payload, now=1.0) == []
    assert c.counters["status_malformed"] == 1
    assert c.devices == {"d1": "idle"}


# -- FedAvg -----------------------------------------------------------------------------


def fedavg(**config: Any) -> Any:
    return core(mode="fedavg", **config)


def online(c: Any, *devices: str, now: float = 0.0) -> None:
    for d in devices:
        assert c.on_status(d, status(d, "online"), now=now) == []


def test_fedavg_waits_for_all_online_devices_and_closes_early() -> None:
    c = fedavg()
    online(c, "a", "b")
    r = only_receipt(c.on_update("a", upd("a", 1.0, n=1), now=1.0))
    assert r.receipt.accepted and r.receipt.model_version == 0
    assert c.version == 0
    assert c.tick(now=2.0) == []
    actions = c.on_update("b", upd("b", 5.0, n=3), now=3.0)
    assert receipts(actions)[0].receipt.accepted
    assert [m.version for m in models(actions)] == [1]
    # (1*1 + 3*5) / 4 = 4
    assert_state(c, 4.0)
    snap = c.snapshot()["round"]
    assert snap["number"] == 1 and snap["version"] == 1
    assert snap["participants"] == 2 and snap["started_at"] == 3.0


def test_fedavg_closes_at_deadline_via_tick() -> None:
    c = fedavg(round_deadline=30.0, server_lr=0.5)
    online(c, "a", "b", now=0.0)
    c.on_update("a", upd("a", 2.0), now=1.0)
    assert c.tick(now=29.9) == []
    actions = c.tick(now=30.0)
    assert [m.version for m in models(actions)] == [1]
    assert_state(c, 1.0)  # 0 + 0.5 * 2
    # the next round starts with the devices online now, clock at 30
    assert c.snapshot()["round"]["participants"] == 2
    assert c.snapshot()["round"]["deadline"] == 60.0


def test_fedavg_deadline_with_too_few_updates_restarts_the_clock() -> None:
    c = fedavg(round_deadline=10.0, min_round_updates=2)
    online(c, "a", "b", "c", now=0.0)
    c.on_update("a", upd("a", 1.0), now=1.0)
    assert c.tick(now=10.0) == []
    assert c.version == 0
    assert c.counters["round_restarts"] == 1
    assert c.snapshot()["round"]["deadline"] == 20.0
    c.on_update("b", upd("b", 3.0), now=12.0)
    assert c.tick(now=19.0) == []
    actions = c.tick(now=20.0)
    assert [m.version for m in models(actions)] == [1]
    assert_state(c, 2.0)


def test_fedavg_rejects_not_selected() -> None:
    c = fedavg()
    online(c, "a", "b")
    c.on_update("a", upd("a"), now=1.0)  # the round's devices are now fixed
    online(c, "c", now=2.0)
    r = only_receipt(c.on_update("c", upd("c"), now=3.0))
    assert (r.receipt.accepted, r.receipt.reason) == (False, "not_selected")
    assert c.counters["rejected_not_selected"] == 1
    # never online at all
    r = only_receipt(c.on_update("z", upd("z"), now=3.0))
    assert r.receipt.reason == "not_selected"
    # after b reports the next round includes c
    c.on_update("b", upd("b"), now=4.0)
    assert c.version == 1
    r = only_receipt(c.on_update("c", upd("c", base=1), now=5.0))
    assert r.receipt.accepted


def test_fedavg_rejects_stale_even_with_max_staleness_set() -> None:
    c = fedavg(max_staleness=10)
    online(c, "a")
    c.on_update("a", upd("a", base=0), now=1.0)
    assert c.version == 1
    r = only_receipt(c.on_update("a", upd("a", base=0), now=2.0))
    assert r.receipt.reason == "stale"


def test_fedavg_rejects_duplicate_in_round() -> None:
    c = fedavg()
    online(c, "a", "b")
    c.on_update("a", upd("a", 1.0), now=1.0)
    r = only_receipt(c.on_update("a", upd("a", 9.0), now=2.0))
    assert (r.receipt.accepted, r.receipt.reason) == (False, "duplicate_work")
    c.on_update("b", upd("b", 1.0), now=3.0)
    assert_state(c, 1.0)  # the second update of a was not used


def test_fedavg_device_going_offline_is_not_waited_for() -> None:
    c = fedavg()
    online(c, "a", "b", "c")
    c.on_update("a", upd("a", 2.0), now=1.0)
    assert c.on_status("c", status("c", "offline"), now=2.0) == []
    assert c.snapshot()["round"]["waiting"] == 1
    # b's Will fires: everyone still in the round has reported -> the round closes
    actions = c.on_status("b", status("b", "offline"), now=3.0)
    assert [m.version for m in models(actions)] == [1]
    assert_state(c, 2.0)
    # only a is online for the next round
    assert c.snapshot()["round"]["participants"] == 1


def test_fedavg_cleared_status_counts_as_offline() -> None:
    c = fedavg()
    online(c, "a", "b")
    c.on_update("a", upd("a", 2.0), now=1.0)
    actions = c.on_status("b", b"", now=2.0)
    assert [m.version for m in models(actions)] == [1]


def test_fedavg_empty_round_waits_for_the_first_device() -> None:
    c = fedavg(round_deadline=5.0)
    assert c.tick(now=1000.0) == []
    assert c.counters["round_restarts"] == 0
    online(c, "a", now=1001.0)
    assert c.snapshot()["round"]["started_at"] == 1001.0
    online(c, "b", now=1002.0)  # joins too: no update has arrived yet
    assert c.snapshot()["round"]["participants"] == 2
    c.on_status("b", status("b", "offline"), now=1003.0)  # leaves before anything happened
    assert c.snapshot()["round"]["participants"] == 1
    actions = c.on_update("a", upd("a", 1.0), now=1004.0)
    assert [m.version for m in models(actions)] == [1]


def test_fedavg_device_back_online_is_waited_for_again() -> None:
    c = fedavg()
    online(c, "a", "b", "c")
    c.on_update("a", upd("a", 1.0), now=1.0)
    c.on_status("b", status("b", "offline"), now=2.0)
    online(c, "b", now=3.0)
    assert not models(c.on_update("c", upd("c", 1.0), now=4.0))  # still waiting for b
    actions = c.on_update("b", upd("b", 4.0), now=5.0)
    assert [m.version for m in models(actions)] == [1]
    assert_state(c, 2.0)  # (1 + 1 + 4) / 3


def test_fedavg_snapshot_is_plain() -> None:
    c = fedavg()
    online(c, "a")
    snap = c.snapshot()
    assert snap["mode"] == "fedavg"
    assert snap["version"] == 0
    assert snap["devices_online"] == 1
    assert snap["round"] == {
        "number": 0,
        "version": 0,
        "participants": 1,
        "reported": 0,
        "waiting": 1,
        "started_at": 0.0,
        "deadline": 30.0,
    }
    assert core().snapshot()["round"] is None


# -- the finite guarantee under arbitrary input -----------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_state_stays_finite_under_random_input(mode: str) -> None:
    rng = np.random.default_rng(7)
    c = core(mode=mode, buffer_size=2, max_norm=50.0)
    devices = ["a", "b", "c"]
    now = 0.0
    for step in range(400):
        now += float(rng.uniform(0, 5))
        dev = devices[int(rng.integers(0, 3))]
        choice = int(rng.integers(0, 8))
        if choice == 0:
            c.on_status(dev, status(dev, str(rng.choice(["online", "offline", "idle"]))), now)
        elif choice == 1:
            c.on_status(dev, rng.integers(0, 256, 20, dtype=np.uint8).tobytes(), now)
        elif choice == 2:
            c.tick(now)
        elif choice == 3:
            bad = delta_of(float(rng.choice([np.nan, np.inf, 1e30])))
            c.on_update(dev, upd(dev, delta=bad, base=c.version), now)
        elif choice == 4:
            payload = bytearray(upd(dev, base=c.version))
            payload[int(rng.integers(0, len(payload)))] ^= 0xFF
            c.on_update(dev, bytes(payload), now)
        else:
            base = max(0, c.version - int(rng.integers(0, 3)))
            value = float(rng.normal(0, 5))
            c.on_update(dev, upd(dev, value, base=base, n=int(rng.integers(1, 50))), now)
        assert is_finite(c.state), step
    k = c.counters
    assert k["updates_accepted"] > 0
    assert k["updates_received"] == k["updates_accepted"] + k["updates_rejected"]
    assert c.version > 0


def test_fedbuff_applies_a_partial_buffer_after_its_timeout() -> None:
    # two active devices but K=4: without the timeout the model would never move
    c = core(buffer_size=4, buffer_timeout=30.0)
    c.on_update("d1", upd("d1", 1.0), now=100.0)
    c.on_update("d2", upd("d2", 3.0), now=110.0)
    assert c.tick(129.9) == [] and c.version == 0
    actions = c.tick(130.0)  # 30 s after the OLDEST buffered update
    assert models(actions) == [NewModel(1, models(actions)[0].reason)]
    assert_state(c, 2.0)  # (1 + 3) / 2
    assert c.counters["buffer_timeouts"] == 1
    assert c.tick(1000.0) == []  # nothing buffered, nothing to apply
    # the clock restarts with the next buffered update
    c.on_update("d1", upd("d1", 1.0, base=1), now=2000.0)
    assert c.tick(2029.0) == [] and c.tick(2030.0) != []


def test_buffer_timeout_zero_disables_it_and_bad_values_are_refused() -> None:
    c = core(buffer_size=4, buffer_timeout=0.0)
    c.on_update("d1", upd("d1", 1.0), now=0.0)
    assert c.tick(1e9) == [] and c.version == 0
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="buffer_timeout"):
            AggregationConfig(buffer_timeout=bad)


def test_fedbuff_needs_no_more_updates_than_devices_online() -> None:
    c = core(buffer_size=4, buffer_timeout=0.0)
    for device in ("d1", "d2", "d3"):
        c.on_status(device, status(device, "online"), now=0.0)
    c.on_update("d1", upd("d1", 1.0), now=1.0)
    c.on_update("d2", upd("d2", 1.0), now=1.0)
    assert c.version == 0
    assert models(c.on_update("d3", upd("d3", 1.0), now=1.0))  # 3 online: K is 3, not 4
    c.on_status("d3", status("d3", "offline"), now=2.0)
    c.on_update("d1", upd("d1", 1.0, base=1), now=3.0)
    assert models(c.on_update("d2", upd("d2", 1.0, base=1), now=3.0))  # 2 online now


# -- liveness, the end of a run, and resuming from the store -----------------------------


def test_a_device_going_offline_applies_a_buffer_that_now_has_enough() -> None:
    c = core(buffer_size=4, buffer_timeout=0.0)
    for device in ("d1", "d2", "d3"):
        c.on_status(device, status(device, "online"), now=0.0)
    c.on_update("d1", upd("d1", 1.0), now=1.0)
    c.on_update("d2", upd("d2", 3.0), now=1.0)
    assert c.version == 0  # K is 3 (devices online): d3 is still expected
    actions = c.on_status("d3", status("d3", "offline"), now=50.0)  # its Will
    assert [m.version for m in models(actions)] == [1]
    assert_state(c, 2.0)


def test_flush_applies_what_waits_and_end_refuses_later_updates() -> None:
    c = core(buffer_size=4)
    c.on_update("d1", upd("d1", 2.0), now=0.0)
    assert c.buffered == 1
    assert [m.version for m in models(c.flush(1.0))] == [1]
    assert_state(c, 2.0)
    assert c.flush(2.0) == []  # nothing left
    c.end("reached 1 model versions")
    assert c.ended == "reached 1 model versions"
    r = only_receipt(c.on_update("d2", upd("d2", base=1), now=3.0))
    assert (r.receipt.accepted, r.receipt.reason) == (False, "run_ended")
    assert c.store.load().ended == "reached 1 model versions"
    assert c.store.load().task["state"] == "ended"


def test_journal_records_what_the_store_needs() -> None:
    from coordinator.journal import NormWindow, Pending, Verdict, VersionMade

    raw = CoordinatorCore(TASK, initial(), AggregationConfig(buffer_size=2), ledger=Store(None))
    payload = upd("d1", 1.0, uid="a1")
    raw.on_update("d1", payload, now=0.0)
    window, verdict, pending = raw.drain_journal()
    assert isinstance(verdict, Verdict) and verdict.accepted and verdict.update_id == "a1"
    assert isinstance(pending, Pending) and pending.payload == payload
    assert pending.clip is None  # a zero model gives no warm-up bound
    assert isinstance(window, NormWindow) and window.norms == (math.sqrt(6),)
    raw.on_update("d2", upd("d2", 3.0, uid="a2"), now=0.0)
    records = raw.drain_journal()
    made = records[-1]
    assert isinstance(made, VersionMade) and made.version == 1 and made.applied == ("a1", "a2")
    assert raw.drain_journal() == []


@pytest.mark.parametrize(
    ("mode", "aggregator"),
    [
        ("fedbuff", "mean"),
        ("fedavg", "mean"),
        ("fedbuff", "median+clip:0.9"),
        ("fedbuff", "trimmed:0.34"),
        ("fedavg", "krum:0+clip:1.5"),
        ("fedbuff", "mean+cap:1.5"),
        ("fedavg", "mean+cap:1+clip:1"),
        ("fedbuff", "quorum"),
    ],
)
def test_resume_rebuilds_the_same_model_and_buffer(mode: str, aggregator: str) -> None:
    # with the adaptive norm bound: the zero start gives no warm-up bound, version 1's model
    # gives one (half its norm) that clips the next two updates
    c = core(mode=mode, buffer_size=3, server_momentum=0.0, aggregator=aggregator,
             norm_multiple=2.0, norm_reject=100.0, norm_warmup=0.5)
    for d in ("d1", "d2", "d3"):
        c.on_status(d, status(d, "online"), now=0.0)
    for i, d in enumerate(("d1", "d2", "d3")):
        c.on_update(d, upd(d, 0.1 * (i + 1), n=i + 1), now=1.0)
    assert c.version == 1
    c.on_update("d1", upd("d1", 0.7, base=1, n=5), now=2.0)
    # FedBuff: a stale update from another device (its weight 1/sqrt(2) is stored and read
    # back exactly); FedAvg takes only fresh updates from the round's devices
    second = ("d4", 0) if mode == "fedbuff" else ("d2", 1)
    c.on_update(second[0], upd(second[0], -0.3, base=second[1], n=2), now=2.0)
    snap = c.store.load()
    assert [p.device_id for p in snap.pending] == ["d1", second[0]]
    assert all(p.clip is not None for p in snap.pending)
    assert len(snap.norms) == 5
    again = CoordinatorCore.resume(
        TASK, c.core.config, ledger=c.store, version=snap.version, state=snap.state,
        velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
        round_fixed=snap.round, ended=snap.ended, now=10.0, norms=snap.norms,
    )
    assert again.snapshot()["norm_bound"] == c.snapshot()["norm_bound"]
    assert again.version == c.version and again.counters == c.counters
    for name, value in c.state.items():
        assert again.state[name].shape == value.shape
        assert again.state[name].tobytes() == value.tobytes()
    assert again.buffered == c.buffered == 2
    if mode == "fedbuff" and aggregator == "mean":
        for name, total in c.core._buffer._sum.items():
            assert again._buffer._sum[name].tobytes() == total.tobytes()
    elif mode == "fedbuff":  # the kept deltas, clipped and staleness-scaled, to the bit
        assert c.core._kept is not None and again._kept is not None
        for mine, theirs in zip(c.core._kept, again._kept, strict=True):
            for name, value in mine.items():
                assert theirs[name].tobytes() == value.tobytes()
    else:
        for dev, (delta, n, uid) in c.core._round.reported.items():
            other, n2, uid2 = again._round.reported[dev]
            assert (n, uid) == (n2, uid2)
            for name, value in delta.items():
                assert other[name].tobytes() == value.tobytes()
    # both finish the version the same way, to the bit
    for d in ("d1", "d2", "d3"):
        again.on_status(d, status(d, "online"), now=10.0)
    last = upd("d3", 0.2, base=1, uid="last")
    b = again.on_update("d3", last, now=11.0)  # not committed: the store is c's
    a = c.on_update("d3", last, now=11.0)
    assert models(a) and models(b)
    for name, value in c.state.items():
        assert again.state[name].tobytes() == value.tobytes()


def test_when_every_known_device_is_offline_the_buffer_is_applied() -> None:
    # e.g. a resumed coordinator holding a buffer while the retained statuses come in
    c = core(buffer_size=4, buffer_timeout=0.0)
    c.on_update("d1", upd("d1", 2.0), now=1.0)
    c.on_update("d2", upd("d2", 4.0), now=1.0)
    assert c.version == 0  # no presence known: K as configured
    actions = c.on_status("d1", status("d1", "offline"), now=2.0)
    assert [m.version for m in models(actions)] == [1]
    assert_state(c, 3.0)


# -- robust aggregators ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aggregator": "average"}, "aggregator 'average': unknown part"),
        ({"aggregator": "krum:1", "buffer_size": 4}, "raise --buffer-size from 4 to 5"),
        ({"aggregator": "trimmed:0.2", "mode": "fedasync"}, "fedasync applies each update"),
        ({"aggregator": "krum:1:5", "buffer_size": 5}, "M = 5 is more than K - F = 4"),
        ({"aggregator": 3}, "must be a spec string"),
    ],
)
def test_an_aggregator_that_cannot_work_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AggregationConfig(**kwargs)


def test_aggregators_that_fit_are_taken() -> None:
    assert str(AggregationConfig(aggregator="krum:1", buffer_size=5).spec) == "krum:1"
    assert AggregationConfig(aggregator="median", mode="fedasync").spec.kind == "median"
    # FedAvg rounds vary in size: a small round falls back to the median instead
    assert AggregationConfig(aggregator="krum:2:9", mode="fedavg").spec.f == 2
    assert AggregationConfig().spec.kind == "quorum"  # the default defences


def test_fedbuff_median_ignores_the_claimed_sample_count() -> None:
    c = core(buffer_size=3, aggregator="median", max_norm=1000.0)
    c.on_update("d1", upd("d1", 1.0, n=1), now=0.0)
    c.on_update("d2", upd("d2", 2.0, n=1), now=0.0)
    assert models(c.on_update("d3", upd("d3", 100.0, n=2**40), now=0.0))
    assert_state(c, 2.0)  # the mean would have been ~100
    assert c.snapshot()["aggregator"] == "median"


def test_a_quorum_buffer_waits_for_k_agreeing_updates() -> None:
    # K = 3: +1, -1, +2 hold only two that agree with their median (+1): wait; +3 makes
    # the median 1.5 and three agree (1, 2, 3): the step is their mean, 2
    c = core(buffer_size=3, aggregator="quorum", max_norm=1000.0)
    for i, value in enumerate((1.0, -1.0, 2.0)):
        assert not models(c.on_update(f"d{i}", upd(f"d{i}", value), now=0.0))
    assert c.version == 0 and c.buffered == 3
    assert models(c.on_update("d3", upd("d3", 3.0), now=0.0))
    assert_state(c, 2.0)
    # a clean step is not delayed: three that agree make a version at the third; the 4 is
    # first shortened to 2 x the step's median norm (that of the 1s): 2 + mean(1, 1, 2)
    for i, value in enumerate((1.0, 1.0)):
        assert not models(c.on_update(f"d{i}", upd(f"d{i}", value, base=1), now=1.0))
    assert models(c.on_update("d2", upd("d2", 4.0, base=1), now=1.0))
    assert_state(c, 2.0 + 4.0 / 3.0)


def axis(i: int) -> dict[str, np.ndarray]:
    """A dense delta, 5 at coordinate ``i`` of the 6 and -1 elsewhere: a few of them never
    agree (their median is -1 at every coordinate, to which each is orthogonal). Dense, so
    the step is judged by the dense rule (a one-hot delta would make a sparse step, judged
    on each delta's own support)."""
    flat = np.full(6, -1.0, F32)
    flat[i] = 5.0
    return {"w": flat[:4].reshape(2, 2), "b": flat[4:]}


def test_a_quorum_buffer_stops_waiting_at_its_limit_and_at_the_online_devices() -> None:
    # no two agree: applied at 2K = 6 updates, with nothing agreeing -> their median, -1
    c = core(buffer_size=3, aggregator="quorum")
    for i in range(5):
        assert not models(c.on_update(f"d{i}", upd(f"d{i}", delta=axis(i)), now=0.0))
    assert models(c.on_update("d5", upd("d5", delta=axis(5)), now=0.0))
    assert c.version == 1 and c.counters["updates_accepted"] == 6
    assert_state(c, -1.0)
    # four devices online: no more than four updates can come for a version
    c = core(buffer_size=3, aggregator="quorum")
    for i in range(4):
        c.on_status(f"d{i}", status(f"d{i}", "online"), now=0.0)
    for i in range(3):
        assert not models(c.on_update(f"d{i}", upd(f"d{i}", delta=axis(i)), now=0.0))
    assert models(c.on_update("d3", upd("d3", delta=axis(3)), now=0.0))
    # the timeout applies a waiting buffer as it does a partial one
    c = core(buffer_size=3, aggregator="quorum", buffer_timeout=5.0)
    for i in range(3):
        c.on_update(f"d{i}", upd(f"d{i}", delta=axis(i)), now=0.0)
    assert c.version == 0 and models(c.tick(now=5.0))


def test_staleness_scales_each_update_before_the_robust_step_and_server_lr_after() -> None:
    c = core(buffer_size=3, aggregator="median", server_lr=0.5, staleness="sqrt")
    for d in ("d1", "d2", "d3"):
        c.on_update(d, upd(d, 0.0), now=0.0)
    assert c.version == 1
    c.on_update("d1", upd("d1", 3.0, base=1), now=1.0)  # fresh: 3
    c.on_update("d4", upd("d4", 4.0, base=0), now=1.0)  # staleness 1: 4 / sqrt(2) = 2.83
    c.on_update("d3", upd("d3", 1.0, base=1), now=1.0)  # fresh: 1
    # median(3, 2.83, 1) = 2 sqrt(2); times server_lr 0.5 = sqrt(2)
    assert c.version == 2
    assert_state(c, math.sqrt(2.0))


def test_fedasync_median_of_one_is_that_update_with_server_momentum() -> None:
    c = core(mode="fedasync", aggregator="median", server_momentum=0.5)
    c.on_update("d1", upd("d1", 2.0), now=0.0)
    assert_state(c, 2.0)  # v = 2
    c.on_update("d1", upd("d1", 1.0, base=1), now=1.0)
    assert_state(c, 4.0)  # v = 0.5 * 2 + 1 = 2; 2 + 2


def test_fedbuff_trimmed_mean_and_krum() -> None:
    c = core(buffer_size=5, aggregator="trimmed:0.2", max_norm=1000.0)
    for i, value in enumerate((1.0, 2.0, 3.0, 4.0, 100.0)):
        c.on_update(f"d{i}", upd(f"d{i}", value), now=0.0)
    assert_state(c, 3.0)  # mean of 2, 3, 4
    c = core(buffer_size=5, aggregator="krum:1", max_norm=1000.0)
    for i, value in enumerate((0.0, 1.0, 2.0, 3.0, 100.0)):
        c.on_update(f"d{i}", upd(f"d{i}", value), now=0.0)
    # scores (x6 coordinates) 30, 12, 12, 30, ...: the best n - f = 4 are 0..3 -> 1.5
    assert_state(c, 1.5)


@pytest.mark.parametrize("aggregator", [f"{k}+clip:{math.sqrt(6)}" for k in ("mean", "median")])
def test_clipping_scales_large_updates_down_before_aggregation(aggregator: str) -> None:
    # delta_of(v) has 6 coordinates: norm v * sqrt(6); the bound sqrt(6) caps v at 1
    c = core(buffer_size=2, aggregator=aggregator)
    c.on_update("d1", upd("d1", 0.5), now=0.0)
    c.on_update("d2", upd("d2", 3.0), now=0.0)
    assert_state(c, 0.75)  # (0.5 + 1) / 2, for the mean and the median of two alike
    assert c.counters["updates_clipped"] == 1


def test_a_partial_buffer_too_small_for_krum_falls_back_to_the_median() -> None:
    c = core(buffer_size=5, aggregator="krum:1", buffer_timeout=10.0, max_norm=1000.0)
    for i, value in enumerate((1.0, 2.0, 90.0)):
        c.on_update(f"d{i}", upd(f"d{i}", value), now=0.0)
    assert c.version == 0
    assert [m.version for m in models(c.tick(20.0))] == [1]
    assert_state(c, 2.0)
    assert c.counters["robust_fallbacks"] == 1


def test_fedavg_with_robust_aggregators() -> None:
    c = fedavg(aggregator="median", max_norm=1000.0)
    for d in ("d1", "d2", "d3"):
        c.on_status(d, status(d, "online"), now=0.0)
    c.on_update("d1", upd("d1", 1.0, n=1), now=1.0)
    c.on_update("d2", upd("d2", 2.0, n=1), now=1.0)
    assert models(c.on_update("d3", upd("d3", 100.0, n=10**6), now=1.0))
    assert_state(c, 2.0)
    c = fedavg(aggregator="krum:1")  # a round of 3 < 5: the median, counted
    for d in ("d1", "d2", "d3"):
        c.on_status(d, status(d, "online"), now=0.0)
    for d, value in (("d1", 1.0), ("d2", 5.0), ("d3", -40.0)):
        c.on_update(d, upd(d, value), now=1.0)
    assert_state(c, 1.0)
    assert c.counters["robust_fallbacks"] == 1


def test_robust_state_stays_finite_with_extreme_updates() -> None:
    big = float(np.finfo(np.float32).max) * 0.75
    c = core(buffer_size=3, aggregator="trimmed:0.34", max_norm=float("1e300"))
    for i, value in enumerate((big, big, big)):
        c.on_update(f"d{i}", upd(f"d{i}", value), now=0.0)
    assert c.version == 1 and is_finite(c.state)
    for i, value in enumerate((big, big, big)):  # the step would overflow: dropped
        c.on_update(f"d{i}", upd(f"d{i}", value, base=1), now=1.0)
    assert c.version == 1 and is_finite(c.state)
    assert c.counters["aggregation_failed"] == 1


def test_a_capped_mean_bounds_what_a_claimed_sample_count_buys() -> None:
    # claims 100, 200, 2^40: lower median 200, cap 1 x 200: weights 100, 200, 200
    for mode in ("fedbuff", "fedavg"):
        c = core(mode=mode, buffer_size=3, aggregator="mean+cap:1")
        for d in ("d1", "d2", "d3"):
            c.on_status(d, status(d, "online"), now=0.0)
        c.on_update("d1", upd("d1", 1.0, n=100), now=0.0)
        c.on_update("d2", upd("d2", 1.0, n=200), now=0.0)
        assert models(c.on_update("d3", upd("d3", 4.0, n=2**40), now=0.0))
        assert_state(c, (100 + 200 + 4 * 200) / 500)  # uncapped: 4.0 to six digits
    # staleness still damps each update: d4's 4.0 at staleness 1 counts 4 / sqrt(2)
    c = core(buffer_size=2, aggregator="mean+cap:2")
    c.on_update("d1", upd("d1", 0.0), now=0.0)
    c.on_update("d2", upd("d2", 0.0), now=0.0)
    c.on_update("d1", upd("d1", 1.0, base=1, n=10), now=1.0)
    c.on_update("d4", upd("d4", 4.0, base=0, n=10), now=1.0)
    assert_state(c, (1.0 + 4.0 / math.sqrt(2.0)) / 2)


def aside_status(device: str, kind: str = "data") -> bytes:
    return pack(Status(device, "idle", ts=0.0, error="cannot take part in task task1: label "
                       "'x' is not one of the task's classes", error_kind=kind).to_wire())


def test_a_device_that_cannot_take_part_is_not_waited_for() -> None:
    # K = 3 and three devices online; d3's data do not fit the task: a step is made of
    # the two updates that can come, instead of waiting for the buffer timeout
    c = core(buffer_size=3, aggregator="mean")
    for d in ("d1", "d2", "d3"):
        c.on_status(d, status(d, "online"), now=0.0)
    assert c.on_status("d3", aside_status("d3"), now=0.5) == []
    assert c.online_devices() == {"d1", "d2", "d3"}
    assert c.contributing_devices() == {"d1", "d2"}
    assert not models(c.on_update("d1", upd("d1", 1.0), now=1.0))
    assert models(c.on_update("d2", upd("d2", 3.0), now=2.0))
    assert_state(c, 2.0)
    # a training failure is not a reason to stand aside; a status without an error ends it
    c.on_status("d3", aside_status("d3", kind="training"), now=3.0)
    assert c.contributing_devices() == {"d1", "d2", "d3"}
    c.on_status("d3", aside_status("d3"), now=3.5)
    c.on_status("d3", status("d3", "training"), now=4.0)
    assert c.contributing_devices() == {"d1", "d2", "d3"}


def test_a_buffer_waiting_for_a_device_that_stands_aside_is_applied() -> None:
    c = core(buffer_size=3, aggregator="mean")
    for d in ("d1", "d2", "d3"):
        c.on_status(d, status(d, "online"), now=0.0)
    c.on_update("d1", upd("d1", 1.0), now=1.0)
    c.on_update("d2", upd("d2", 3.0), now=2.0)
    assert c.version == 0  # waits for d3 ...
    assert models(c.on_status("d3", aside_status("d3", kind="model"), now=3.0))  # ... no more
    assert c.version == 1


def test_fleet_scaling_limit_and_k_follow_the_devices_online() -> None:
    c = core(buffer_size=1, max_staleness=1, fleet_scaling=True)
    c.on_update("d1", upd("d1", base=0), now=0.0)  # nobody online: K 1, limit 1
    c.on_update("d1", upd("d1", base=1), now=0.0)
    assert c.version == 2
    r = only_receipt(c.on_update("d2", upd("d2", base=0), now=0.0))
    assert (r.receipt.accepted, r.receipt.reason) == (False, "stale")
    online(c, "a", "b", "c", "d")  # 4 online: K ceil(sqrt 4) = 2, limit ceil(4·4/2) = 8
    r = only_receipt(c.on_update("d3", upd("d3", base=0), now=0.0))
    assert r.receipt.accepted and r.receipt.staleness == 2
    assert c.version == 2 and c.snapshot()["buffered"] == 1  # 1 of K = 2
    assert models(c.on_update("d4", upd("d4", base=2), now=0.0))


def test_fleet_scaling_weighs_a_large_fleets_staleness_with_sqrt() -> None:
    """Once the fleet needs more than the floor's K, fleet scaling weighs staleness with
    1/sqrt(1+s) whatever --staleness says (coordinator.fleet_scale): the same steps as a core
    configured with sqrt; a floor that covers the fleet keeps the configured weight."""
    def run(c: Any) -> dict[str, np.ndarray]:
        online(c, "a", "b", "c", "d")  # scaled: K = ceil(sqrt 4) = 2 > the floor 1
        c.on_update("a", upd("a", 1.0, base=0), now=0.0)
        c.on_update("b", upd("b", 3.0, base=0), now=0.0)  # version 1
        c.on_update("a", upd("a", 1.0, base=1), now=0.0)
        c.on_update("c", upd("c", 3.0, base=0), now=0.0)  # one version old: version 2
        assert c.version == 2
        return c.state

    scaled = run(core(buffer_size=1, fleet_scaling=True, staleness="poly"))
    fixed_sqrt = run(core(buffer_size=2, staleness="sqrt"))
    fixed_poly = run(core(buffer_size=2, staleness="poly"))
    assert all(np.array_equal(scaled[k], fixed_sqrt[k]) for k in scaled)
    assert not all(np.array_equal(scaled[k], fixed_poly[k]) for k in scaled)
    covered = run(core(buffer_size=2, fleet_scaling=True, staleness="poly"))  # K stays 2
    assert all(np.array_equal(covered[k], fixed_poly[k]) for k in covered)


def test_a_quorum_check_of_an_unchanged_buffer_is_not_worked_out_again(monkeypatch) -> None:
    import coordinator.core as core_module

    calls: list[int] = []
    real = core_module.quorum_readiness

    def counted(*args: Any) -> Any:
        calls.append(len(args[1]))
        return real(*args)

    monkeypatch.setattr(core_module, "quorum_readiness", counted)
    c = core(buffer_size=3, aggregator="quorum")
    for i in range(6):
        c.on_status(f"d{i}", status(f"d{i}", "online"), now=0.0)
    for i in range(4):  # four that never agree, below quorum's limit of 6: it waits
        assert not models(c.on_update(f"d{i}", upd(f"d{i}", delta=axis(i)), now=0.0))
    assert calls == [3, 4]
    # asked again with the same buffer, K and online count: the answer is kept (as
    # --adaptive-k asks at every tick); a change of any of them is worked out again
    assert not c.core._step_ready(3) and calls == [3, 4]
    assert not c.core._step_ready(4) and calls == [3, 4, 4]
    assert not c.core._step_ready(4) and calls == [3, 4, 4]
    assert not models(c.on_update("d4", upd("d4", delta=axis(4)), now=1.0))
    assert calls == [3, 4, 4, 5]
    assert models(c.on_update("d5", upd("d5", delta=axis(5)), now=1.0))  # its limit, 6
