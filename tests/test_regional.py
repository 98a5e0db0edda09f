"""Regional aggregators (protocol revision 2.11): the pure folding (coordinator.regional),
the partial update on the wire, how the root judges one (validation, core), the bridge's
topics, the reserved names and the aggregator's durable state; values worked out by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.journal import Verdict
from coordinator.region_store import RegionStore, StoredPart, StoredPartial
from coordinator.regional import Part, RegionBook, fold, mean_metrics, partial_id
from coordinator.store import Store
from coordinator.validation import Accepted, Rejected, ValidationLimits, validate_update
from fedbus.bridge import (
    BridgeSpec,
    bridge_topics,
    region_aggregator_id,
    region_of_aggregator,
    render_bridge,
)
from fedbus.dynsec import check_new_device_id
from fedbus.errors import ProtocolError
from fedbus.messages import Update
from fedbus.update_codec import encode_delta
from tests.test_core import core, initial, models, receipts

F32 = np.float32


def part(uid: str, values: list[float], n: int = 1, base: int = 0,
         metrics: dict[str, float] | None = None) -> Part:
    return Part(uid, f"d-{uid}", base, n, {"w": np.array(values, F32)}, metrics or {})


# -- folding ---------------------------------------------------------------------------------


def test_fold_is_the_sample_weighted_mean_and_its_weight() -> None:
    # weights 1 and 3 (3 <= 4 x the lower median 1): (1*[1, 0] + 3*[0, 2]) / 4
    delta, weight = fold([part("a", [1, 0], n=1), part("b", [0, 2], n=3)])
    np.testing.assert_allclose(delta["w"], [0.25, 1.5])
    assert delta["w"].dtype == F32 and weight == 4


def test_fold_caps_an_inflated_sample_claim() -> None:
    # claims 2, 2, 2^40: the lower median is 2, so the third weighs 4 x 2 = 8, not 2^40:
    # (2*[1] + 2*[1] + 8*[-1]) / 12 = -1/3, weight 12
    delta, weight = fold([part("a", [1], 2), part("b", [1], 2), part("c", [-1], 2**40)])
    np.testing.assert_allclose(delta["w"], [-1 / 3], rtol=1e-6)
    assert weight == 12
    # with a cap of 1 every update weighs the median claim: the plain mean
    delta, weight = fold([part("a", [1], 2), part("b", [1], 2), part("c", [-1], 2**40)], 1.0)
    np.testing.assert_allclose(delta["w"], [1 / 3], rtol=1e-6)
    assert weight == 6


def test_fold_needs_an_update() -> None:
    with pytest.raises(ValueError):
        fold([])


def test_metrics_are_averaged_when_every_update_reports_them() -> None:
    assert mean_metrics([{"loss": 1.0, "acc": 0.5}, {"loss": 2.0}]) == {"loss": 1.5}
    assert mean_metrics([]) == {}


def test_partial_ids_name_the_region_and_fit_an_update_id() -> None:
    assert partial_id("eu", 7) == "eu.7"
    longest = partial_id("r" * 32, 10**20 - 1)
    assert len(longest) <= 64
    with pytest.raises(ValueError):
        partial_id("eu", -1)


def test_a_partial_closes_when_full_and_folds_one_base_version_only() -> None:
    book = RegionBook(partial_size=2, partial_timeout=10.0)
    assert book.add(part("a", [2], base=3), 0.0) == []
    assert book.add(part("b", [4], base=4), 0.0) == []  # another version: another partial
    assert book.held == 2
    closed = book.add(part("c", [6], base=3), 1.0)
    assert len(closed) == 1
    c = closed[0]
    assert (c.base_version, c.update_ids, c.reason, c.weight) == (3, ("a", "c"), "full", 2)
    np.testing.assert_allclose(c.delta["w"], [4.0])
    assert book.held_ids() == {"b"}


def test_a_partial_closes_at_its_timeout_or_once_a_newer_version_is_out() -> None:
    book = RegionBook(partial_size=8, partial_timeout=10.0, stale_grace=1.0)
    book.add(part("a", [1], base=5), 0.0)
    book.add(part("b", [1], base=6), 0.5)
    assert book.due(0.9, current_version=6) == []  # version 5 is older, but within grace
    closed = book.due(1.0, current_version=6)
    assert [(c.base_version, c.reason) for c in closed] == [(5, "newer_version")]
    assert book.due(10.4, current_version=6) == []
    closed = book.due(10.5, current_version=6)
    assert [(c.base_version, c.reason) for c in closed] == [(6, "timeout")]
    assert book.held == 0


def test_old_versions_are_dropped_and_flush_closes_everything() -> None:
    book = RegionBook(partial_size=8, partial_timeout=10.0)
    for uid, base in (("a", 1), ("b", 2), ("c", 3)):
        book.add(part(uid, [1], base=base), 0.0)
    assert [p.update_id for p in book.drop_older_than(3)] == ["a", "b"]
    assert [(c.base_version, c.reason) for c in book.flush()] == [(3, "flush")]
    with pytest.raises(ValueError):
        RegionBook(partial_size=0, partial_timeout=1.0)


# -- the partial on the wire, and the root's judgement -----------------------------------------


def partial_payload(uid: str = "eu.0", *, parts: int | None = 2, n: int = 2, base: int = 0,
                    dev: str = "fedbus-region-eu", value: float = 0.5) -> bytes:
    delta = encode_delta({"w": np.full((2, 2), value, F32), "b": np.full(2, value, F32)},
                         "fp32")
    return Update(uid, dev, "task1", base, n, delta, run_id="r1", parts=parts).pack()


def test_parts_travel_only_when_set_and_are_checked() -> None:
    payload = partial_payload(parts=3, n=5)
    assert Update.read(payload).parts == 3
    device = Update("u1", "d1", "t", 0, 1, {}, run_id="r1")
    assert "parts" not in device.to_wire() and Update.read(device.pack()).parts is None
    with pytest.raises(ProtocolError, match="must not exceed"):
        Update.read(partial_payload(parts=3, n=2))
    with pytest.raises(ProtocolError, match="at least 1"):
        Update.read(partial_payload(parts=0))


def judge(payload: bytes, topic: str, store: Store, *, partial: bool) -> Any:
    return validate_update(
        payload, topic_device=topic, run_id="r1", task_id="task1",
        expected_shapes={"w": (2, 2), "b": (2,)}, current_version=0,
        limits=ValidationLimits(max_update_bytes=1 << 20, max_norm=100.0, max_staleness=5),
        ledger=store, partial=partial)


def test_only_an_aggregator_sends_parts_and_it_is_not_held_to_one_per_version() -> None:
    store = Store(None)
    refused = judge(partial_payload(dev="d1"), "d1", store, partial=False)
    assert isinstance(refused, Rejected) and refused.reason == "schema"
    refused = judge(partial_payload(parts=None), "fedbus-region-eu", store, partial=True)
    assert isinstance(refused, Rejected) and refused.reason == "schema"
    assert isinstance(judge(partial_payload(), "fedbus-region-eu", store, partial=True),
                      Accepted)


def test_the_root_takes_partials_as_contributions_of_their_weight() -> None:
    c = core(buffer_size=3)  # K counts device updates: the two partials fold 2 + 1
    first = c.on_update("fedbus-region-eu", partial_payload("eu.0", parts=2, n=2), 0.0)
    assert [r.receipt.accepted for r in receipts(first)] == [True]
    assert receipts(first)[0].receipt.detail.startswith("buffered 2/3")
    # a second partial on the same base version is no duplicate_work
    second = c.on_update("fedbus-region-eu", partial_payload("eu.1", parts=1, n=6,
                                                             value=1.0), 0.0)
    assert [r.receipt.accepted for r in receipts(second)] == [True]
    # the plain mean weighs them by n: (2*0.5 + 6*1.0) / 8 = 0.875
    np.testing.assert_allclose(c.state["w"], np.full((2, 2), 0.875), rtol=1e-6)
    counters = c.counters
    assert (counters["partials_accepted"], counters["partial_parts"]) == (2, 3)
    # a copy of a partial (a re-send after the aggregator restarted) is a repeat
    again = c.on_update("fedbus-region-eu", partial_payload("eu.1", parts=1, n=6,
                                                            value=1.0), 0.0)
    assert receipts(again)[0].receipt.repeat and c.version == 1


def test_k_counts_the_device_updates_a_partial_folds_and_a_resumed_core_too() -> None:
    """Revision 2.12: a version is made of K device updates, whether they come whole or
    folded, so the version cadence is the flat run's."""
    from coordinator.core import CoordinatorCore
    from tests.test_core import TASK, upd

    c = core(buffer_size=4)
    assert not models(c.on_update("fedbus-region-eu", partial_payload("eu.0", parts=2), 0.0))
    assert not models(c.on_update("d1", upd("d1", 1.0), 0.0))  # a device's own: 1
    snap = c.store.load()
    again = CoordinatorCore.resume(
        TASK, c.core.config, ledger=c.store, version=snap.version, state=snap.state,
        velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
        round_fixed=snap.round, ended=snap.ended, now=1.0, norms=snap.norms)
    assert again.snapshot()["buffered"] == 2  # two contributions, three device updates
    made = again.on_update("fedbus-region-us", partial_payload(
        "us.0", parts=1, n=1, dev="fedbus-region-us"), 1.0)
    assert len(models(made)) == 1 and again.version == 1


def test_under_differential_privacy_a_partial_still_counts_as_one() -> None:
    """DP's fixed divisor D = K counts contributions, each clipped to C: a partial folding
    two device updates does not fill a buffer of K = 2 alone."""
    from tests.test_privacy import dp_core

    c = dp_core(buffer_size=2)
    assert not models(c.on_update("fedbus-region-eu", partial_payload("eu.0", parts=2), 0.0))
    made = c.on_update("fedbus-region-us", partial_payload("us.0", dev="fedbus-region-us"), 0.0)
    assert len(models(made)) == 1


def test_quorum_counts_parts_for_k_but_each_partial_is_one_vote() -> None:
    """Under quorum the agreeing deltas must fold K device updates; a partial is still one
    delta in the median and the agreement, whatever its parts."""
    from coordinator.aggregator_spec import parse_aggregator, quorum_readiness

    spec = parse_aggregator("quorum")
    same = [{"w": np.array([1.0, 1.0], F32)} for _ in range(3)]
    flipped = {"w": np.array([-1.0, -1.0], F32)}
    # three agreeing deltas folding 1 + 1 + 2 = 4 device updates: a step of K = 4
    ready, step = quorum_readiness(spec, same, 4, 0, [1, 1, 2])
    assert ready and step is not None and step.kept == (0, 1, 2)
    # a partial folding 3 that disagrees with the two others: the agreeing fold 2 < K = 4,
    # and its 3 parts did not buy it the majority (the median is the others')
    ready, step = quorum_readiness(spec, [same[0], same[1], flipped], 4, 0, [1, 1, 3])
    assert not ready and step is not None and step.kept == (0, 1)
    # below K in device updates: not worked out at all
    assert quorum_readiness(spec, same[:2], 4, 0, [1, 2]) == (False, None)
    # the buffer limit (2K, at most the devices online) counts device updates too
    assert quorum_readiness(spec, [same[0], flipped], 2, 3, [1, 3]) == (True, None)
    with pytest.raises(ValueError):
        quorum_readiness(spec, same, 2, 0, [1, 0, 1])


def test_a_region_folds_at_most_its_quota_of_device_updates_per_version() -> None:
    """Revision 2.12: a region's partials on one base version fold at most the devices
    online (at least K) device updates; beyond, `region_quota` (counted, remembered), so a
    hostile region cannot fill version after version from one base."""
    c = core(buffer_size=4)  # no presence known: the quota is K = 4
    assert c.core.region_quota() == 4
    for uid in ("eu.0", "eu.1"):
        assert receipts(c.on_update("fedbus-region-eu", partial_payload(uid), 0.0))[
            0].receipt.accepted
    assert c.version == 1  # 2 + 2 device updates made a version
    over = partial_payload("eu.2", parts=1, n=1)
    refused = receipts(c.on_update("fedbus-region-eu", over, 0.0))[0].receipt
    assert (refused.accepted, refused.reason) == (False, "region_quota")
    assert "would fold 5 device updates, more than the 4" in refused.detail
    assert c.counters["rejected_region_quota"] == 1
    again = receipts(c.on_update("fedbus-region-eu", over, 0.0))[0].receipt
    assert again.repeat and again.reason == "region_quota"
    # another region, and the same region on the new version, have their own quota
    assert receipts(c.on_update("fedbus-region-us", partial_payload(
        "us.0", dev="fedbus-region-us"), 0.0))[0].receipt.accepted
    assert receipts(c.on_update("fedbus-region-eu", partial_payload(
        "eu.3", parts=4, n=4, base=1), 0.0))[0].receipt.accepted
    # a resumed root goes on from the stored tally
    from coordinator.core import CoordinatorCore
    from tests.test_core import TASK, status

    snap = c.store.load()
    assert snap.region_parts == {("fedbus-region-eu", 0): 4, ("fedbus-region-us", 0): 2,
                                 ("fedbus-region-eu", 1): 4}
    resumed = CoordinatorCore.resume(
        TASK, c.core.config, ledger=c.store, version=snap.version, state=snap.state,
        velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
        round_fixed=snap.round, ended=snap.ended, now=1.0, norms=snap.norms,
        region_parts=snap.region_parts)
    late = resumed.on_update("fedbus-region-eu", partial_payload("eu.4", parts=1, n=1), 1.0)
    assert receipts(late)[0].receipt.reason == "region_quota"
    # the quota follows the devices online (each trains once per version)

    for i in range(6):
        c.on_status(f"d{i}", status(f"d{i}", "online"), 0.0)
    assert c.core.region_quota() == 6


def test_a_device_cannot_pass_its_update_off_as_a_partial() -> None:
    c = core()
    refused = receipts(c.on_update("d1", partial_payload(dev="d1"), 0.0))[0].receipt
    assert (refused.accepted, refused.reason) == (False, "schema")
    assert initial()["w"].sum() == c.state["w"].sum() == 0


# -- bridge topics and names --------------------------------------------------------------------


def test_an_aggregated_region_bridges_its_partials_instead_of_the_devices_updates() -> None:
    assert region_aggregator_id("eu") == "fedbus-region-eu"
    assert region_of_aggregator("fedbus-region-eu") == "eu"
    assert region_of_aggregator("eu-01") is None
    topics = bridge_topics("fedbus", "eu")
    assert ("fedbus/update/fedbus-region-eu", "out") in topics
    assert ("fedbus/update/+", "out") not in topics
    assert ("fedbus/status/+", "out") in topics and ("fedbus/receipt/+", "in") in topics
    assert {t for t, d in topics if d == "in"} == {t for t, d in bridge_topics("fedbus")
                                                    if d == "in"}
    spec = BridgeSpec(region="eu", host="root", port=8884, prefix="fedbus",
                      ca_file="/ca.crt", username="fedbus-bridge-eu",  # type: ignore[arg-type]
                      password="pw", aggregated=True)
    text = render_bridge(spec)
    assert "topic fedbus/update/fedbus-region-eu out 1\n" in text
    assert "topic fedbus/update/+" not in text


def test_aggregator_names_are_no_device_ids() -> None:
    with pytest.raises(ValueError, match="regional aggregators"):
        check_new_device_id("fedbus-region-eu")


# -- the aggregator's durable state ---------------------------------------------------------------


def test_the_region_store_is_a_ledger_and_keeps_parts_until_their_partial_is_made() -> None:
    store = RegionStore(None)
    accepted = Verdict("u1", "d1", b"x", 3, True, None, "ok", 3, 0, 10)
    store.judged(accepted, norm=1.5, part=StoredPart("u1", "d1", 3, None, b"payload"))
    store.judged(Verdict("u2", "d2", b"y", 3, False, "norm", "big", 3, None, 10))
    assert store.verdict("u1") == accepted and store.verdict("u3") is None
    assert store.work("d1", 3) == "u1" and store.work("d2", 3) is None
    assert [p.update_id for p in store.open_parts()] == ["u1"] and store.norms(8) == [1.5]
    assert store.next_seq() == 0
    store.made(StoredPartial("eu.0", 3, 1, b"partial"), ["u1"])
    assert store.open_parts() == [] and store.next_seq() == 1
    assert [p.partial_id for p in store.unanswered()] == ["eu.0"]
    assert store.answered("eu.0", "accepted") and not store.answered("eu.0", "accepted")
    assert store.unanswered() == [] and store.verdict_of("eu.0") == "accepted"
    # the first verdict of an id stays (a later "duplicate" never overwrites it)
    store.judged(Verdict("u1", "d9", b"z", 3, False, "duplicate", "", 3, None, 1))
    assert store.verdict("u1") == accepted
    store.close()


def test_dropped_parts_are_gone(tmp_path: Any) -> None:
    path = tmp_path / "region.db"
    store = RegionStore(path)
    store.judged(Verdict("u1", "d1", b"x", 0, True, None, "", 0, 0, 1),
                 part=StoredPart("u1", "d1", 0, 2.0, b"p"))
    store.set_run("r1")
    store.close()
    again = RegionStore(path)  # what a restarted aggregator finds
    assert again.run() == "r1" and [p.clip for p in again.open_parts()] == [2.0]
    again.dropped(["u1"])
    assert again.open_parts() == []
    again.close()



# -- the aggregator's process, driven message by message (no broker) ------------------------------


class Recorder:
    """A transport that keeps what is published (the aggregator's only output)."""

    def __init__(self, settings: Any, **_: Any) -> None:
        self.settings = settings
        self.fatal = None
        self.max_packet_size = 8 * 1024 * 1024
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> Any:
        from fedbus.transport import PublishResult

        self.published.append((topic, payload))
        result = PublishResult(topic, len(payload))
        result._resolve(True, "")
        return result


def aggregator(state_dir: Any, **settings: Any) -> Any:
    from coordinator.region_service import RegionAggregator, RegionConfig

    config = RegionConfig(region="eu", state_dir=state_dir, partial_size=2, norm_multiple=0,
                          **settings)
    return RegionAggregator(config, "pw", transport=Recorder)


def feed(agg: Any, topic: str, payload: bytes) -> None:
    from fedbus.transport import Message

    agg._on_message(Message(topic, payload, False))


def device_update(uid: str, device: str, value: float) -> bytes:
    delta = encode_delta({"w": np.full((2, 2), value, F32), "b": np.full(2, value, F32)},
                         "fp32")
    return Update(uid, device, "task1", 0, 1, delta, run_id="r1").pack()


def start_run(agg: Any, key: Any = None, *, run: str = "r1", created_at: float = 0.0,
              version: int = 0) -> None:
    """The root's task and model of ``run`` reach the aggregator, signed with ``key``."""
    from fedbus.envelope import pack
    from fedbus.messages import GlobalModel, ModelSpec, Task, TrainSpec
    from fedbus.signing import sign_message

    def signed(topic: str, body: bytes) -> bytes:
        return body if key is None else sign_message(key, topic, body)

    task = Task("task1", ModelSpec("mlp"), TrainSpec(), run_id=run, created_at=created_at)
    feed(agg, "fedbus/task", signed("fedbus/task", pack(task.to_wire())))
    tensors, compression = encode_delta(initial(), "fp32"), None
    model = GlobalModel("task1", version, tensors, compression=compression, run_id=run)
    feed(agg, "fedbus/model", signed("fedbus/model", pack(model.to_wire())))


def receipts_to(agg: Any, device: str) -> list[Any]:
    from fedbus.envelope import unpack
    from fedbus.messages import Receipt

    return [Receipt.from_wire(unpack(p, "receipt")) for t, p in agg.client.published
            if t == f"fedbus/receipt/{device}"]


def test_a_crashed_aggregator_loses_no_accepted_update_and_sends_no_partial_twice(
    tmp_path: Any,
) -> None:
    first = aggregator(tmp_path)
    start_run(first)
    feed(first, "fedbus/update/d1", device_update("u1", "d1", 1.0))
    assert [r.accepted for r in receipts_to(first, "d1")] == [True]
    # a device cannot send as another (the topic is its identity), nor twice the same work
    feed(first, "fedbus/update/d2", device_update("u9", "d1", 1.0))
    feed(first, "fedbus/update/d1", device_update("u2", "d1", 5.0))
    assert [r.reason for r in receipts_to(first, "d2")] == ["device_mismatch"]
    assert [r.reason for r in receipts_to(first, "d1")][1:] == ["duplicate_work"]
    # the process dies here: no flush, nothing sent up; a new one starts on the same state
    second = aggregator(tmp_path)
    start_run(second)
    feed(second, "fedbus/update/d1", device_update("u1", "d1", 1.0))  # the outbox re-sends
    repeat = receipts_to(second, "d1")
    assert [(r.accepted, r.repeat) for r in repeat] == [(True, True)]
    feed(second, "fedbus/update/d3", device_update("u3", "d3", 3.0))
    ups = [p for t, p in second.client.published if t == "fedbus/update/fedbus-region-eu"]
    assert len(ups) == 1
    sent = Update.read(ups[0])
    # signed with the aggregator's own key, kept in its state directory across restarts
    from fedbus.signing import verify_message

    verify_message(first._signer.public_key(), "fedbus/update/fedbus-region-eu", ups[0])
    assert (sent.update_id, sent.parts, sent.num_samples, sent.base_version) == ("eu.0", 2,
                                                                               2, 0)
    # the mean of 1.0 and 3.0, int8-encoded: 2.0 within its rounding
    from fedbus.update_codec import decode_update_delta

    got = decode_update_delta(sent.delta, sent.compression, expected_shapes={"w": (2, 2),
                                                                            "b": (2,)})
    np.testing.assert_allclose(got["w"], np.full((2, 2), 2.0), rtol=0.01)
    # unanswered, it goes again after a restart, byte for byte (the root repeats its verdict)
    third = aggregator(tmp_path)
    start_run(third)
    third._tick(1e9)
    again = [p for t, p in third.client.published if t == "fedbus/update/fedbus-region-eu"]
    assert again == ups
    # once the root answers, it is never sent again
    from fedbus.envelope import pack
    from fedbus.messages import Receipt

    feed(third, "fedbus/receipt/fedbus-region-eu", pack(Receipt(
        update_id="eu.0", run_id="r1", accepted=True, reason=None, detail="", model_version=0,
        staleness=0).to_wire()))
    third._tick(2e9)
    assert [p for t, p in third.client.published
            if t == "fedbus/update/fedbus-region-eu"] == ups
    assert third.counters["partials_accepted"] == 1
    for agg in (first, second, third):
        agg.store.close()


PARTIAL_VECTOR = bytes.fromhex(
    "8ca17602a46b696e64a6757064617465a97570646174655f6964a465752e37a3646576b06665646275"
    "732d726567696f6e2d6575a372756eb0685235745771324c6d5a387658633145a47461736ba8646967"
    "6974732d31a462617365 0ca16eccb4a16d82a46c6f7373ca3f000000a3616363ca3f600000a56465"
    "6c746180a27473cb41da556e40000000a57061727473 03".replace(" ", ""))


def test_the_partial_test_vector_of_the_protocol_page() -> None:
    """docs/protocol.md 7.3.1: the bytes of a partial with an empty delta."""
    made = Update("eu.7", "fedbus-region-eu", "digits-1", 12, 180, {},
                  metrics={"loss": 0.5, "acc": 0.875}, sent_at=1767225600.0,
                  run_id="hR5tWq2LmZ8vXc1E", parts=3).pack()
    assert made == PARTIAL_VECTOR and len(made) == 145
    assert Update.read(PARTIAL_VECTOR).parts == 3


def test_after_the_run_ended_updates_are_refused_as_the_coordinator_would(
    tmp_path: Any,
) -> None:
    from fedbus.envelope import pack
    from fedbus.messages import ModelSpec, Task, TrainSpec

    agg = aggregator(tmp_path)
    start_run(agg)
    ended = Task("task1", ModelSpec("mlp"), TrainSpec(), state="ended",
                 end_reason="reached 2 model versions", run_id="r1")
    feed(agg, "fedbus/task", pack(ended.to_wire()))
    feed(agg, "fedbus/update/d1", device_update("u1", "d1", 1.0))
    assert [(r.accepted, r.reason) for r in receipts_to(agg, "d1")] == [(False, "run_ended")]
    assert agg.book.held == 0 and agg.store.open_parts() == []
    agg.store.close()


def test_a_retained_update_is_refused_and_cleared(tmp_path: Any) -> None:
    from fedbus.transport import Message

    agg = aggregator(tmp_path)
    start_run(agg)
    agg._on_message(Message("fedbus/update/d1", device_update("u1", "d1", 1.0), True))
    assert [r.reason for r in receipts_to(agg, "d1")] == ["retained"]
    assert ("fedbus/update/d1", b"") in agg.client.published
    agg.store.close()


def test_a_root_requiring_signed_updates_takes_the_partials_signed_by_the_regions_key(
    tmp_path: Any,
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedbus.signing import sign_message, update_signature_problem

    region, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = {"fedbus-region-eu": region.public_key()}
    c = core()
    c.core.update_signatures = lambda device, payload: update_signature_problem(
        keys, f"fedbus/update/{device}", device, payload)
    topic = "fedbus/update/fedbus-region-eu"
    forged = sign_message(other, topic, partial_payload("eu.0"))
    refused = receipts(c.on_update("fedbus-region-eu", forged, 0.0))[0].receipt
    assert (refused.accepted, refused.reason) == (False, "signature")
    signed = sign_message(region, topic, partial_payload("eu.1"))
    assert receipts(c.on_update("fedbus-region-eu", signed, 0.0))[0].receipt.accepted


def test_with_the_roots_key_only_a_task_and_model_it_signed_are_followed(tmp_path: Any) -> None:
    """A hostile regional broker (or anyone who may write the model topic there) cannot
    make the aggregator judge against a forged model or task (docs/protocol.md 7.3.1)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedbus.signing import key_text

    root, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    agg = aggregator(tmp_path, coordinator_key=key_text(root))
    start_run(agg)  # unsigned: ignored
    start_run(agg, forger)  # signed, but not by the root: ignored
    assert agg.counters["bad_signatures"] == 4
    assert agg._task is None and agg._shapes is None
    feed(agg, "fedbus/update/d1", device_update("u1", "d1", 1.0))
    assert receipts_to(agg, "d1") == []  # kept until a genuine model says what to judge
    start_run(agg, root)
    assert agg._version == 0 and agg.counters["bad_signatures"] == 4
    assert [r.accepted for r in receipts_to(agg, "d1")] == [True]
    # a forged newer model changes nothing
    start_run(agg, forger, version=5)
    assert agg._version == 0 and agg.counters["bad_signatures"] == 6
    agg.store.close()
    # a restarted aggregator never goes back to a genuine task of a run that began earlier
    # (replayed by whoever may write the task topic)
    again = aggregator(tmp_path, coordinator_key=key_text(root))
    start_run(again, root, run="r0", created_at=-1.0)
    assert again._task is None and again.store.run() == "r1"
    start_run(again, root, run="r2", created_at=1.0)  # a newer run is followed
    assert again._task is not None and again.store.run() == "r2"
    again.store.close()


def test_with_signed_updates_required_a_device_update_needs_its_own_key(tmp_path: Any) -> None:
    """A root that requires signed updates sees only the region's signature on a partial,
    so the aggregator checks each device's own (revision 2.8), keys read from the region's
    device-key file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedbus.errors import ConfigError
    from fedbus.signing import register_device_key, sign_message

    with pytest.raises(ConfigError, match="device-key file"):
        aggregator(tmp_path / "none", require_signed_updates=True)
    keys = tmp_path / "signing" / "devices.pub"
    d1 = Ed25519PrivateKey.generate()
    register_device_key(keys, "d1", d1.public_key())
    agg = aggregator(tmp_path / "state", require_signed_updates=True, device_keys=keys)
    start_run(agg)
    feed(agg, "fedbus/update/d1", device_update("u1", "d1", 1.0))  # unsigned
    feed(agg, "fedbus/update/d1", sign_message(Ed25519PrivateKey.generate(),
                                               "fedbus/update/d1",
                                               device_update("u2", "d1", 1.0)))  # wrong key
    feed(agg, "fedbus/update/d2", sign_message(d1, "fedbus/update/d2",
                                               device_update("u3", "d2", 1.0)))  # no key
    feed(agg, "fedbus/update/d1", sign_message(d1, "fedbus/update/d1",
                                               device_update("u4", "d1", 1.0)))
    got = [(r.update_id, r.accepted, r.reason) for r in receipts_to(agg, "d1")]
    assert got == [("u1", False, "signature"), ("u2", False, "signature"),
                   ("u4", True, None)]
    assert [r.reason for r in receipts_to(agg, "d2")] == ["signature"]
    assert agg.book.held == 1 and agg.counters["updates_rejected"] == 3
    agg.store.close()
