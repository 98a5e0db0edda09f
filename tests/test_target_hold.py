"""The stable-target decision (coordinator.target_hold), with injected times."""

from __future__ import annotations

import pytest

from coordinator.target_hold import Evaluated, TargetWatch, first_held


def evals(*points: tuple[float, float]) -> list[Evaluated]:
    """(time, accuracy) pairs; versions numbered from 1."""
    return [Evaluated(t, v, a) for v, (t, a) in enumerate(points, start=1)]


SPIKE_THEN_STABLE = evals(
    (0, 0.80), (2, 0.93), (4, 0.85), (6, 0.88), (8, 0.90),  # a spike at t=2 falls back
    (10, 0.94), (13, 0.95), (16, 0.93), (19, 0.92), (22, 0.95), (25, 0.96), (28, 0.94),
    (31, 0.95),
)


def test_hold_zero_is_the_first_hit():
    judged = first_held(SPIKE_THEN_STABLE, 0.93, 0.0, now=2.0)
    assert judged is not None and judged.candidate.version == 2 and judged.versions == 0
    assert judged.describe() == "reached accuracy 0.930 (v2)"
    assert first_held(SPIKE_THEN_STABLE, 0.93, 0.0, now=1.9) is None


def test_a_spike_that_falls_back_does_not_stop_the_run():
    # 10 s: the spike v2 (t=2): (2, 12] holds 0.85 0.88 0.90 0.94, 1 of 4; then v6, v7 and
    # v8 each see 2 of 3; v10 (t=22): (22, 32] holds 0.96 0.94 0.95, 3 of 3
    assert first_held(SPIKE_THEN_STABLE, 0.93, 10.0, now=31.9) is None
    judged = first_held(SPIKE_THEN_STABLE, 0.93, 10.0, now=32.0)
    assert judged is not None and judged.held
    assert (judged.candidate.version, judged.versions, judged.above) == (10, 3, 3)
    assert judged.decided_at == 32.0
    assert judged.describe() == (
        "reached accuracy 0.950 (v10): target 0.93 held by 100% of 3 versions over 10 s")


def test_ninety_percent_of_the_window_must_reach_the_target():
    # 20 s: v2 (t=2) 4 of 8; v6 (t=10) 5 of 6 (83%); v7 (t=13) 5 of 6; v8 (t=16) 4 of 5;
    # v10 (t=22): (22, 42] holds 0.96 0.94 0.95, 3 of 3, decided at 42
    assert first_held(SPIKE_THEN_STABLE, 0.93, 20.0, now=41.9) is None
    judged = first_held(SPIKE_THEN_STABLE, 0.93, 20.0, now=42.0)
    assert judged is not None
    assert (judged.candidate.version, judged.versions, judged.above) == (10, 3, 3)
    # a run that ended at t=31 never saw v10's window close: no stable target
    assert first_held(SPIKE_THEN_STABLE, 0.93, 20.0, now=31.0) is None
    # at 80%, v6's 5 of 6 is enough
    judged = first_held(SPIKE_THEN_STABLE, 0.93, 20.0, fraction=0.8, now=31.0)
    assert judged is not None and judged.candidate.version == 6


def test_no_newer_version_evaluated_holds():
    judged = first_held(evals((0, 0.5), (5, 0.95)), 0.93, 20.0, now=25.0)
    assert judged is not None and judged.versions == 0
    assert judged.describe().endswith("held by no newer version evaluated over 20 s")


def test_the_watch_decides_as_the_pure_function_and_forgets_what_it_judged():
    watch = TargetWatch(0.93, 10.0)
    decisions = []
    for e in SPIKE_THEN_STABLE:
        watch.add([e])
        decisions.append(watch.decide(e.at))
    assert decisions == [None] * len(SPIKE_THEN_STABLE)  # the last is at t=31
    late = watch.decide(32.0)
    assert late is not None and late == first_held(SPIKE_THEN_STABLE, 0.93, 10.0, now=32.0)
    assert [m.candidate.version for m in watch.missed] == [2, 6, 7, 8]
    assert watch.missed[0].describe() == (
        "reached accuracy 0.930 (v2): target 0.93 not held: only 25% of 4 versions over 10 s")
    assert watch.decide(1e9) is late  # once held, held


def test_the_watch_keeps_only_open_candidates():
    watch = TargetWatch(0.9, 5.0)
    for t in range(1000):
        watch.add([Evaluated(float(t), t, 0.95 if t % 2 else 0.5)])  # every other one fails
        assert watch.decide(float(t)) is None
    assert len(watch._kept) <= 7  # bounded by the window, not the run
    assert watch.pending is not None and watch.pending.at >= 993


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="hold"):
        TargetWatch(0.9, -1.0)
    with pytest.raises(ValueError, match="fraction"):
        TargetWatch(0.9, 1.0, fraction=0.0)


def test_the_benchmark_times_a_stable_target_with_the_same_rule():
    from bench.tta import _stable_tta, _tta

    history = [{"version": e.version, "seconds": e.at + 5.0, "accuracy": e.accuracy}
               for e in SPIKE_THEN_STABLE]
    history.insert(3, {"version": 99, "seconds": 9.5, "accuracy": None})  # not evaluated
    run = {"first_update_seconds": 5.0, "history": history}
    assert _tta(run, 0.93) == 2.0  # the spike
    # the history ends at t=31: no window of v10 (t=22) has closed
    assert _stable_tta(run, 0.93, 20.0) is None
    assert _stable_tta(run, 0.93, 10.0) is None  # decided at t=32, after the end
    history.append({"version": 14, "seconds": 37.0, "accuracy": None})  # the run went on
    assert _stable_tta(run, 0.93, 10.0) == 22.0
    assert _stable_tta(run, 0.93, 0.0) == 2.0  # hold 0: the first hit


def test_the_benchmark_reports_each_devices_share_of_updates_against_its_data():
    from bench.stability import held_share
    from bench.tta import device_shares

    run = {"accepted_at": {"d1": [1.0, 2.0, 3.0], "d2": [2.5], "d3": []}}
    shares = device_shares(run, {"d1": 50, "d2": 30, "d3": 20})
    assert shares["d1"] == {"updates": 3, "update_share": 0.75, "data_share": 0.5}
    assert shares["d2"] == {"updates": 1, "update_share": 0.25, "data_share": 0.3}
    assert shares["d3"] == {"updates": 0, "update_share": 0.0, "data_share": 0.2}  # shut out
    history = [{"seconds": s, "accuracy": a} for s, a in
               [(1.0, 0.5), (2.0, 0.93), (3.0, 0.92), (4.0, None), (5.0, 0.95), (30.0, 0.1)]]
    # after the first hit at t=2: t=3 (below), t=5 (above); t=4 unevaluated, t=30 too late
    assert held_share({"history": history}, 0.93, 20.0) == 0.5
    assert held_share({"history": history}, 0.99, 20.0) is None


def test_the_benchmark_counts_updates_that_overran_their_simulated_period():
    from bench.harness import training_seconds
    from bench.tta import overrun_counts

    log = ("12:00:01 edge_agent: update u1 trained on v3: 117 samples, loss 0.412, acc 0.901 "
           "(int8 0.899) in 0.42s; sent 5123 bytes\n"
           "12:00:02 edge_agent: training took 1.31 s, more than the simulated 0.50 s\n"
           "12:00:02 edge_agent: update u2 trained on v5: 117 samples, loss 0.3, acc 0.9 "
           "(int8 n/a) in 1.31s; sent 5120 bytes\n")
    assert training_seconds(log) == [0.42, 1.31]
    run = {"training_seconds": {"d1": [0.42, 1.31], "d2": [1.5, 1.9], "d3": []}}
    # d2 is four times slower: a period of 2 s, so 1.9 s of training is on time
    assert overrun_counts(run, {"d1": 0.5, "d2": 2.0, "d3": 0.5}) == {
        "updates": 4, "overrun": 1, "devices_overrunning": 1}
    assert overrun_counts({}, {"d1": 0.5}) == {"updates": 0, "overrun": 0,
                                              "devices_overrunning": 0}
