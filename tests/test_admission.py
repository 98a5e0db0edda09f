"""Per-device admission (coordinator.admission), the rate_limited receipt's wire parts
(fedbus.messages) and the agent's hold after one (edge_agent.agent), without a broker.
Expected values worked out by hand in the comments."""

from __future__ import annotations

import math

import msgpack
import pytest

from bench import hostile
from coordinator.admission import Admission, AdmissionPolicy
from edge_agent.agent import rate_limit_hold
from fedbus.envelope import pack
from fedbus.errors import ProtocolError
from fedbus.messages import PEEK_BYTES, Receipt, Update, peek_update_id


def test_a_device_within_its_share_is_never_refused() -> None:
    # share 0.02 s/s: an agent whose every update costs 10 ms of CPU, one a second, uses 1%
    adm = Admission(AdmissionPolicy(share=0.02, burst=0.25))
    for i in range(10_000):
        assert adm.admit("dev-a", float(i)).admitted
        adm.charge("dev-a", 0.010, float(i))


def test_a_device_over_its_share_is_refused_until_its_bucket_refills() -> None:
    adm = Admission(AdmissionPolicy(share=0.02, burst=0.25))
    # messages of 0.1 s at one instant: 0.25 -> 0.15 -> 0.05 -> -0.05; the 4th is refused
    for _ in range(3):
        assert adm.admit("flood", 0.0).admitted
        adm.charge("flood", 0.1, 0.0)
    decision = adm.admit("flood", 0.0)
    assert not decision.admitted
    # -0.05 s refills at 0.02 s/s: back at zero after 2.5 s; said in whole ms, one more
    wait = decision.retry_after
    assert 2.5 < wait <= 2.502 and round(wait * 1000) == wait * 1000
    assert not adm.admit("flood", 2.49).admitted
    assert adm.admit("flood", wait).admitted
    assert 0 < adm.level("flood", wait) <= 0.00004


def test_one_device_over_its_share_does_not_touch_another() -> None:
    adm = Admission(AdmissionPolicy(share=0.01, burst=0.05))
    adm.charge("flood", 1.0, 0.0)  # one message that took a whole second
    assert not adm.admit("flood", 0.5).admitted
    assert adm.admit("honest", 0.5).admitted
    assert adm.level("honest", 0.5) == 0.05  # untracked: a full bucket


def test_a_bucket_never_holds_more_than_the_burst() -> None:
    adm = Admission(AdmissionPolicy(share=0.5, burst=0.2))
    adm.charge("dev", 0.1, 0.0)
    assert adm.level("dev", 1000.0) == 0.2


def test_a_clock_going_backwards_neither_refills_nor_drains() -> None:
    adm = Admission(AdmissionPolicy(share=0.1, burst=1.0))
    adm.charge("dev", 0.5, 10.0)
    assert adm.level("dev", 5.0) == pytest.approx(0.5)
    assert adm.level("dev", 11.0) == pytest.approx(0.6)


def test_share_zero_switches_admission_off() -> None:
    adm = Admission(AdmissionPolicy(share=0.0, burst=0.1))
    adm.charge("flood", 100.0, 0.0)
    assert adm.admit("flood", 0.0).admitted
    assert adm.tracked == 0


def test_full_buckets_are_forgotten() -> None:
    adm = Admission(AdmissionPolicy(share=0.1, burst=0.1))
    for i in range(1023):
        adm.charge(f"dev-{i}", 0.05, 0.0)
    assert adm.tracked == 1023
    # the 1,024th charge prunes: every other bucket has been full again since t = 0.5 s
    adm.charge("last", 0.05, 10.0)
    assert adm.tracked == 1


@pytest.mark.parametrize(("share", "burst"), [(-0.1, 1.0), (1.5, 1.0), (math.nan, 1.0),
                                              (0.1, 0.0), (0.1, math.inf)])
def test_the_policy_refuses_settings_out_of_range(share: float, burst: float) -> None:
    with pytest.raises(ValueError, match="device"):
        AdmissionPolicy(share=share, burst=burst)


# -- the update id, read off the first bytes only ---------------------------------------------


def _update(update_id: str = "u-1") -> bytes:
    return Update(update_id, "dev-a", "t1", 0, 10, {}, {"loss": 0.5}, 1.0,
                  run_id="run-1").pack()


def test_peek_reads_the_id_of_an_agents_update() -> None:
    assert peek_update_id(_update("abc_123")) == "abc_123"
    assert peek_update_id(pack(Update("u-2", "dev-a", "t1", 0, 10, {},
                                      run_id="run-1").to_wire())) == "u-2"


def test_peek_reads_the_id_of_a_4_mib_hostile_payload_from_its_head() -> None:
    payload, _ = hostile.empty_maps_unknown_key()
    assert len(payload) > 4_000_000
    assert peek_update_id(payload) == "hostile-1"


def test_peek_gives_up_on_an_id_beyond_its_window() -> None:
    late = msgpack.packb({"delta": b"\x00" * PEEK_BYTES, "update_id": "late"})
    assert peek_update_id(late) is None
    small = msgpack.packb({"pad": b"\x00" * 100, "update_id": "early-enough"})
    assert peek_update_id(small) == "early-enough"


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"\x00not a map", msgpack.packb([1, 2]),
    msgpack.packb({"update_id": "bad id with spaces"}), msgpack.packb({"update_id": 7}),
    msgpack.packb({"update_id": ["a"]}), msgpack.packb({"other": 1}),
    msgpack.packb({1: 2, "update_id": "x"}),
])
def test_peek_returns_none_for_anything_else(payload: bytes) -> None:
    assert peek_update_id(payload) is None


# -- the receipt's retry_after and the agent's hold --------------------------------------------


def test_retry_after_goes_on_the_wire_only_when_set() -> None:
    plain = Receipt("u-1", False, "stale", "", 3, run_id="r")
    assert "retry_after" not in plain.to_wire()
    limited = Receipt("u-1", False, "rate_limited", "later", 3, run_id="r", retry_after=2.5)
    wire = msgpack.unpackb(pack(limited.to_wire()))
    assert wire["retry_after"] == 2.5
    assert Receipt.from_wire(wire) == limited
    assert Receipt.from_wire(plain.to_wire()).retry_after is None


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, True, "2"])
def test_a_receipt_with_a_bad_retry_after_is_schema(bad: object) -> None:
    wire = Receipt("u-1", False, "rate_limited", "", 3, run_id="r").to_wire()
    wire["retry_after"] = bad
    with pytest.raises(ProtocolError, match="retry_after"):
        Receipt.from_wire(wire)


def test_the_agent_holds_what_the_coordinator_asks_within_bounds() -> None:
    assert rate_limit_hold(2.5, 0.0) == 2.5
    assert rate_limit_hold(2.5, 1.0) == pytest.approx(3.0)  # +20% at most
    assert rate_limit_hold(None, 0.0) == 10.0  # no retry_after: 10 s
    assert rate_limit_hold(0.0, 0.0) == 1.0  # at least a second
    assert rate_limit_hold(1e9, 0.5) == pytest.approx(330.0)  # at most 5 min (+10%)
