"""The adaptive norm bound (coordinator.norm_bound), with values worked out by hand, and the
core's use of it: clipped between the bounds, refused above, remembered across a resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_core import TASK, core, receipts, upd

from coordinator.core import AggregationConfig, CoordinatorCore
from coordinator.norm_bound import NormRule, decide_norm, pushed, window_median
from coordinator.store import Store

RULE = NormRule(multiple=2.0, reject=4.0, window=4, min_samples=3, warmup_fraction=0.5)


def test_median_of_odd_and_even_windows() -> None:
    assert window_median([3.0, 1.0, 2.0]) == 2.0
    assert window_median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError, match="empty"):
        window_median([])


def test_the_window_keeps_the_newest() -> None:
    assert pushed((), 1.0, 3) == (1.0,)
    assert pushed((1.0, 2.0, 3.0), 4.0, 3) == (2.0, 3.0, 4.0)
    assert pushed((1.0, 2.0), 5.0, 1) == (5.0,)


def test_with_a_full_window_clip_above_twice_the_median_reject_above_four_times_that() -> None:
    window = (1.0, 2.0, 3.0)  # median 2: clip bound 4, reject bound 16
    keep = decide_norm(RULE, 4.0, window, model_norm=100.0)
    assert (keep.action, keep.clip_bound, keep.reject_bound) == ("keep", 4.0, 16.0)
    assert "median norm 2" in keep.basis
    assert decide_norm(RULE, 4.5, window, 100.0).action == "clip"
    assert decide_norm(RULE, 16.0, window, 100.0).action == "clip"
    assert decide_norm(RULE, 16.5, window, 100.0).action == "reject"
    # only the newest `window` (4) norms count: (2, 3, 10, 10) has median 6.5 -> clip 13
    assert decide_norm(RULE, 1.0, (1.0, 2.0, 3.0, 10.0, 10.0), 1.0).clip_bound == 13.0


def test_before_min_samples_the_bound_is_half_the_models_norm_and_nothing_is_refused() -> None:
    d = decide_norm(RULE, 3.0, (1.0, 1.0), model_norm=10.0)  # 2 of 3 known: warm-up
    assert (d.action, d.clip_bound, d.reject_bound) == ("keep", 5.0, None)
    assert d.basis.startswith("warm-up")
    assert decide_norm(RULE, 6.0, (), 10.0).action == "clip"
    # however long: clipped, so its norm enters the window and the bound can adapt
    assert decide_norm(RULE, 1e6, (), 10.0).action == "clip"
    # a zero model gives no warm-up bound: everything is kept (the ceiling still applies)
    assert decide_norm(RULE, 1e6, (), 0.0).action == "keep"


def test_off_and_degenerate_windows_keep_everything() -> None:
    off = NormRule(multiple=0)
    assert decide_norm(off, 1e9, (1.0,) * 10, 1.0).action == "keep"
    assert decide_norm(RULE, 5.0, (0.0, 0.0, 0.0), 1.0).action == "keep"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"multiple": 0.5}, "multiple"),
        ({"multiple": math.inf}, "multiple"),
        ({"reject": 0.9}, "reject"),
        ({"window": 0}, "window"),
        ({"window": 4, "min_samples": 5}, "at least min_samples"),
        ({"warmup_fraction": 0.0}, "warm-up"),
    ],
)
def test_bad_rules_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NormRule(**kwargs)
    if "min_samples" not in kwargs:
        key = {"multiple": "norm_multiple", "reject": "norm_reject", "window": "norm_window",
               "warmup_fraction": "norm_warmup"}
        with pytest.raises(ValueError, match=match):
            AggregationConfig(**{key[k]: v for k, v in kwargs.items()})


def test_the_core_clips_between_the_bounds_and_refuses_above() -> None:
    # fedasync on a model of ones (norm sqrt(6)): warm-up clip bound sqrt(6)/2, reject
    # bound 4 x that = 2 sqrt(6); a delta of all v has norm v sqrt(6)
    ones = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    c = core(mode="fedasync", norm_multiple=2.0, norm_warmup=0.5, initial=ones)
    small = receipts(c.on_update("d1", upd("d1", 0.25), now=0.0))[0].receipt
    assert small.accepted and "clipped" not in small.detail
    assert c.state["b"][0] == pytest.approx(1.25)
    big = receipts(c.on_update("d2", upd("d2", 1.0, base=1), now=0.0))[0].receipt
    assert big.accepted and "clipped from L2 norm 2.449 to" in big.detail
    # model 1.25 everywhere: bound 1.25 sqrt(6)/2, so the step adds 0.625 per entry
    assert c.state["b"][0] == pytest.approx(1.875)
    assert c.counters["updates_clipped"] == 1
    assert c.store.load().norms == pytest.approx((0.25 * math.sqrt(6), math.sqrt(6)))
    # warm-up (2 of 8 norms known): even a very long update is only clipped, to half the
    # model's norm (1.875 sqrt(6) / 2 per the model of 1.875 everywhere)
    far = receipts(c.on_update("d3", upd("d3", 30.0, base=2), now=0.0))[0].receipt
    assert far.accepted and "warm-up" not in far.detail and "clipped" in far.detail
    assert c.state["b"][0] == pytest.approx(1.875 * 1.5)
    # with 8 norms known, above 4 x (2 x their median) is refused with the reason norm
    for i in range(5):
        c.on_update(f"e{i}", upd(f"e{i}", 0.25, base=c.version), now=0.0)
    assert len(c.store.load().norms) == 8 and c.counters["rejected_norm"] == 0
    refused = receipts(c.on_update("d9", upd("d9", 3.0, base=c.version), now=0.0))[0].receipt
    assert not refused.accepted and refused.reason == "norm"
    assert "median norm" in refused.detail and c.counters["rejected_norm"] == 1


def test_a_resumed_core_decides_as_the_stopped_one_would() -> None:
    cfg = {"mode": "fedbuff", "buffer_size": 16, "aggregator": "mean", "norm_multiple": 2.0}
    c = core(**cfg)
    for i, value in enumerate((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)):
        assert receipts(c.on_update(f"d{i}", upd(f"d{i}", value), now=0.0))[0].receipt.accepted
    # window of 8 norms: median 0.45 sqrt(6), clip bound 0.9 sqrt(6), reject 3.6 sqrt(6)
    snap = c.store.load()
    again = CoordinatorCore.resume(
        TASK, AggregationConfig(**cfg), ledger=Store(None), version=snap.version,
        state=snap.state, velocity=snap.velocity, counters=snap.counters, pending=(),
        round_fixed=None, ended=None, now=0.0, norms=snap.norms,
    )
    assert again.snapshot()["norm_bound"] == pytest.approx(0.9 * math.sqrt(6))
    for dev, value, accepted in (("y", 3.7, False), ("z", 3.5, True)):
        ours = receipts(c.on_update(dev, upd(dev, value, uid=f"v{value}"), now=0.0))[0]
        theirs = receipts(again.on_update(dev, upd(dev, value, uid=f"v{value}"), now=0.0))[0]
        assert ours.receipt.accepted is theirs.receipt.accepted is accepted
        # (the resumed core was given no pending updates: only the buffer count differs)
        assert ours.receipt.detail.split(";")[-1] == theirs.receipt.detail.split(";")[-1]
