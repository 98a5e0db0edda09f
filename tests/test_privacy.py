"""Central differential privacy: the accountant glue checked against formulas computed here,
independently of dp-accounting, and the noise, clipping and sensitivity of the core's steps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from test_core import TASK, Durable, models, receipts, status, upd

from coordinator.aggregation import l2_norm
from coordinator.config import CoordinatorConfig
from coordinator.core import AggregationConfig, CoordinatorCore
from coordinator.privacy import (
    PrivacySpec,
    clip_update,
    epsilon_spent,
    noise_generator,
    privatize,
    steps_within_budget,
)
from coordinator.staleness import staleness_weight
from coordinator.store import Store

F32 = np.float32
DELTA = 1e-5
SECRET = bytes(range(32))


# -- independent formulas -----------------------------------------------------------------------


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism with sensitivity 1 and noise ``sigma``
    (Balle & Wang 2018, Theorem 8): the eps solving
    ``Phi(1/(2s) - eps*s) - e^eps * Phi(-1/(2s) - eps*s) = delta``, by bisection."""

    def delta_of(eps: float) -> float:
        return _phi(0.5 / sigma - eps * sigma) - math.exp(eps) * _phi(-0.5 / sigma - eps * sigma)

    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if delta_of(mid) > delta:
            low = mid
        else:
            high = mid
    return high


def rdp_epsilon(sigma: float, steps: int, delta: float) -> float:
    """RDP of ``steps`` Gaussian mechanisms is ``steps * a / (2 sigma^2)`` at order ``a``
    (Mironov 2017); converted to (eps, delta) with Canonne, Kamath & Steinke's bound
    ``rdp + log(1 - 1/a) - log(delta * a) / (a - 1)``, minimised over a fine grid of orders."""
    orders = np.concatenate([np.linspace(1.02, 10, 2000), np.linspace(10, 600, 6000)])
    eps = steps * orders / (2 * sigma**2) + np.log1p(-1 / orders) \
        - np.log(delta * orders) / (orders - 1)
    return float(max(0.0, eps.min()))


def test_the_exact_formula_here_agrees_with_the_classic_calibration() -> None:
    # sigma = sqrt(2 ln(1.25/delta)) / eps gives (eps, delta)-DP for eps < 1 (Dwork & Roth,
    # Theorem A.1): the exact epsilon of that sigma is below eps, and not far below
    for target in (0.3, 0.5, 0.9):
        sigma = math.sqrt(2 * math.log(1.25 / DELTA)) / target
        assert 0.6 * target < exact_gaussian_epsilon(sigma, DELTA) <= target


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (2.0, 1), (4.0, 10), (10.0, 100),
                                               (0.8, 30), (25.0, 1000)])
def test_epsilon_is_the_rdp_bound_of_the_composed_gaussian(sigma: float, steps: int) -> None:
    ours = epsilon_spent(sigma, steps, DELTA)
    # the library's orders are a subset of the grid here: never below its minimum, close to it
    independent = rdp_epsilon(sigma, steps, DELTA)
    assert independent - 1e-9 <= ours <= independent * 1.03 + 1e-9
    # and a valid bound: T Gaussians with sigma compose to one Gaussian with sigma/sqrt(T),
    # whose exact epsilon is a lower bound that RDP overshoots by a little
    exact = exact_gaussian_epsilon(sigma / math.sqrt(steps), DELTA)
    assert exact <= ours <= exact * 1.25


def test_epsilon_grows_with_steps_shrinks_with_noise_and_is_zero_before_any_step() -> None:
    assert epsilon_spent(1.0, 0, DELTA) == 0.0
    eps = [epsilon_spent(2.0, t, DELTA) for t in (1, 2, 10, 100)]
    assert eps == sorted(eps) and len(set(eps)) == 4
    assert epsilon_spent(4.0, 10, DELTA) < epsilon_spent(2.0, 10, DELTA)
    # composition: 4 steps at sigma cost what one step at sigma/2 costs
    assert epsilon_spent(3.0, 4, DELTA) == pytest.approx(epsilon_spent(1.5, 1, DELTA), rel=1e-9)
    with pytest.raises(ValueError):
        epsilon_spent(0.0, 1, DELTA)
    with pytest.raises(ValueError):
        epsilon_spent(1.0, 1, 1.5)


def test_the_budget_allows_the_last_step_that_stays_within_it() -> None:
    for budget in (2.0, 8.0, 30.0):
        t = steps_within_budget(3.0, DELTA, budget)
        assert t >= 1
        assert epsilon_spent(3.0, t, DELTA) <= budget < epsilon_spent(3.0, t + 1, DELTA)
    assert steps_within_budget(0.5, DELTA, 1.0) == 0  # one step already costs ~10.7


def test_a_spec_checks_itself_and_names_its_mechanism() -> None:
    spec = PrivacySpec(1.0, 0.5, epsilon_budget=8.0)
    assert spec.mechanism == "gaussian:1+clip:0.5"
    assert spec.max_steps() == steps_within_budget(1.0, DELTA, 8.0)
    assert PrivacySpec(1.0, 0.5).max_steps() is None
    for bad in ({"noise": 0.0}, {"clip": -1.0}, {"delta": 1.0}, {"epsilon_budget": 0.0},
                {"noise": math.inf}):
        kwargs: dict[str, Any] = {"noise": 1.0, "clip": 1.0, **bad}
        with pytest.raises(ValueError):
            PrivacySpec(**kwargs)


# -- noise and clipping -----------------------------------------------------------------------


def test_the_noise_has_the_calibrated_spread_and_is_keyed_by_secret_and_version() -> None:
    total = {"w": np.full((400, 500), 3.0, F32), "b": np.zeros(7, F32)}
    out = privatize(total, divisor=4, clip=0.5, noise=2.0, rng=noise_generator(SECRET, 1))
    assert list(out) == ["w", "b"] and out["w"].dtype == np.float32
    noise = out["w"].astype(np.float64) - 0.75
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.01)  # sigma C / D
    again = privatize(total, divisor=4, clip=0.5, noise=2.0, rng=noise_generator(SECRET, 1))
    assert all(again[k].tobytes() == out[k].tobytes() for k in out)
    # the order of the mapping does not change the draw
    flipped = privatize({"b": total["b"], "w": total["w"]}, divisor=4, clip=0.5, noise=2.0,
                        rng=noise_generator(SECRET, 1))
    assert all(flipped[k].tobytes() == out[k].tobytes() for k in out)
    for rng in (noise_generator(SECRET, 2), noise_generator(bytes(32), 1)):
        other = privatize(total, divisor=4, clip=0.5, noise=2.0, rng=rng)
        assert other["w"].tobytes() != out["w"].tobytes()
    with pytest.raises(ValueError):
        noise_generator(b"short", 1)


def test_clipping_leaves_every_update_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3, 3e30):
        delta = {"w": (rng.standard_normal((30, 40)) * scale).astype(F32),
                 "b": (rng.standard_normal(40) * scale).astype(F32)}
        clipped, was = clip_update(delta, 0.7)
        assert l2_norm(clipped) <= 0.7
        assert was == (l2_norm(delta) > 0.7 * (1 - 1e-6))
    small = {"w": np.full(3, 0.1, F32)}
    same, was = clip_update(small, 1.0)
    assert not was and same["w"].tobytes() == small["w"].tobytes()


# -- the core ---------------------------------------------------------------------------------


def dp_core(noise: float = 1.0, clip: float = 1.0, budget: float | None = None,
            **config: Any) -> Any:
    store = Store(None)
    start = {"w": np.zeros((2, 2), F32), "b": np.zeros(2, F32)}
    spec = PrivacySpec(noise, clip, DELTA, budget)
    c = CoordinatorCore(TASK, start, AggregationConfig(privacy=spec, **config), ledger=store,
                        noise_secret=SECRET)
    store.create_run(TASK.run_id, TASK.to_wire(), 0.0, c.state, c.counters,
                     privacy=spec.mechanism, noise_secret=SECRET)
    return Durable(c, store)


def expected_noise(version: int, divisor: int, noise: float, clip: float) -> dict:
    zero = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    return privatize(zero, divisor=divisor, clip=clip, noise=noise,
                     rng=noise_generator(SECRET, version))


def vec(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, F32), "b": np.full(2, value, F32)}


def test_a_fedbuff_step_ignores_claims_clips_weighs_by_staleness_and_adds_the_noise() -> None:
    c = dp_core(noise=0.5, clip=1.0, buffer_size=3, buffer_timeout=0.0)
    c.on_update("d1", upd("d1", 0.1, n=1), now=0.0)
    c.on_update("d2", upd("d2", 5.0, n=2**40), now=0.0)  # norm 12.2, and a huge claim
    assert c.version == 0 and c.counters["updates_clipped"] == 1
    c.on_update("d3", upd("d3", 0.2, n=3), now=0.0)
    assert c.version == 1
    noise = expected_noise(1, 3, 0.5, 1.0)
    clipped = 1.0 * (1 - 1e-6) / math.sqrt(6)  # d2's value per coordinate once clipped
    for name, value in c.state.items():
        want = (0.1 + clipped + 0.2) / 3 + noise[name]
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
    # a stale update: its weight (the default 1/(1+s): 1/2) scales it down (never up); a
    # partial buffer is still divided by K = 3
    c.on_update("d4", upd("d4", 0.3, base=0), now=1.0)
    before = c.state
    c.flush(now=2.0)
    noise = expected_noise(2, 3, 0.5, 1.0)
    w = staleness_weight(1, "poly", a=1.0)
    assert w == 0.5
    for name, value in c.state.items():
        np.testing.assert_allclose(value, before[name] + w * 0.3 / 3 + noise[name], rtol=1e-5,
                                   atol=1e-6)


def test_one_device_moves_a_step_by_at_most_c_over_k_whatever_it_claims() -> None:
    """Sensitivity: two cores with the same secret, one with device X's update in the step and
    one without, differ by at most C/K (the noise is the same draw)."""
    clip, k = 0.8, 4
    with_x = dp_core(noise=1.0, clip=clip, buffer_size=k, buffer_timeout=0.0)
    without = dp_core(noise=1.0, clip=clip, buffer_size=k, buffer_timeout=0.0)
    for c in (with_x, without):
        c.on_update("d1", upd("d1", 0.2), now=0.0)
        c.on_update("d2", upd("d2", -0.1), now=0.0)
    with_x.on_update("x", upd("x", 30.0, n=2**40), now=0.0)  # norm 73
    for c in (with_x, without):
        c.flush(now=1.0)
        assert c.version == 1
    diff = {k_: with_x.state[k_].astype(np.float64) - without.state[k_] for k_ in with_x.state}
    assert l2_norm(diff) <= clip / k * (1 + 1e-5)
    assert l2_norm(diff) == pytest.approx(clip / k, rel=1e-4)


def test_a_device_gets_one_update_per_step() -> None:
    c = dp_core(buffer_size=2)
    c.on_update("d1", upd("d1", 0.1), now=0.0)
    c.on_update("d2", upd("d2", 0.1), now=0.0)
    assert c.version == 1
    assert receipts(c.on_update("d3", upd("d3", 0.1, base=0), now=0.0))[0].receipt.accepted
    # d3's second update, on the newer model (other work, so not duplicate_work), would
    # double its share of the step
    (receipt,) = receipts(c.on_update("d3", upd("d3", 0.1, base=1, n=7), now=0.0))
    assert (receipt.receipt.accepted, receipt.receipt.reason) == (False, "duplicate_in_round")
    assert c.buffered == 1
    c.on_update("d1", upd("d1", 0.1, base=1), now=0.0)
    assert c.version == 2
    # a new step: d3 may contribute again
    assert receipts(c.on_update("d3", upd("d3", 0.1, base=2), now=0.0))[0].receipt.accepted


@pytest.mark.parametrize("mode", ["fedbuff", "fedasync", "fedavg"])
def test_resume_makes_the_same_noisy_bytes(mode: str) -> None:
    c = dp_core(noise=2.0, clip=0.5, mode=mode, buffer_size=2, server_momentum=0.0)
    for d in ("d1", "d2"):
        c.on_status(d, status(d, "online"), now=0.0)
    c.on_update("d1", upd("d1", 0.3), now=1.0)
    c.on_update("d2", upd("d2", -0.4), now=1.0)
    c.on_update("d1", upd("d1", 0.2, base=c.version), now=2.0)
    snap = c.store.load()
    assert snap.noise_secret == SECRET and snap.privacy == "gaussian:2+clip:0.5"
    again = CoordinatorCore.resume(
        TASK, c.core.config, ledger=c.store, version=snap.version, state=snap.state,
        velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
        round_fixed=snap.round, ended=snap.ended, now=10.0, noise_secret=snap.noise_secret,
    )
    assert again.version == c.version and again.buffered == c.buffered
    for name, value in c.state.items():
        assert again.state[name].tobytes() == value.tobytes()
    for d in ("d1", "d2"):
        again.on_status(d, status(d, "online"), now=10.0)
    last = upd("d2", 0.25, base=c.version, uid="last")
    assert models(again.on_update("d2", last, now=11.0))  # not committed: the store is c's
    assert models(c.on_update("d2", last, now=11.0))
    for name, value in c.state.items():
        assert again.state[name].tobytes() == value.tobytes()
    with pytest.raises(ValueError, match="noise secret"):
        CoordinatorCore(TASK, snap.state, c.core.config, ledger=c.store)


def test_the_run_ends_when_the_budget_allows_no_further_step() -> None:
    budget = 3.0
    allowed = steps_within_budget(4.0, DELTA, budget)
    c = dp_core(noise=4.0, clip=1.0, budget=budget, mode="fedasync")
    for i in range(allowed):
        assert models(c.on_update("d1", upd("d1", 0.1, base=i), now=float(i)))
    assert c.version == allowed
    assert c.ended is not None and c.ended.startswith("privacy budget spent: epsilon")
    (receipt,) = receipts(c.on_update("d1", upd("d1", 0.1, base=allowed), now=99.0))
    assert receipt.receipt.reason == "run_ended"
    assert c.flush(now=100.0) == [] and c.version == allowed


def test_a_fedavg_round_is_summed_and_divided_by_the_buffer_size() -> None:
    c = dp_core(noise=1.0, clip=1.0, mode="fedavg", buffer_size=4)
    for d in ("d1", "d2"):
        c.on_status(d, status(d, "online"), now=0.0)
    c.on_update("d1", upd("d1", 0.4, n=100), now=1.0)
    c.on_update("d2", upd("d2", 0.2, n=1), now=1.0)
    assert c.version == 1
    noise = expected_noise(1, 4, 1.0, 1.0)
    for name, value in c.state.items():
        np.testing.assert_allclose(value, 0.6 / 4 + noise[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dp_noise": 1.0}, "needs --dp-clip"),
        ({"dp_clip": 1.0}, "need --dp-noise"),
        ({"dp_epsilon_budget": 5.0}, "need --dp-noise"),
        ({"dp_noise": 1.0, "dp_clip": 1.0, "aggregator": "median"}, "needs --aggregator mean"),
        ({"dp_noise": 1.0, "dp_clip": 1.0, "aggregator": "mean+clip:2"}, "drop \\+clip:2"),
        ({"dp_noise": 1.0, "dp_clip": 1.0, "aggregator": "mean+cap:2"}, "drop \\+cap"),
        ({"dp_noise": 0.5, "dp_clip": 1.0, "dp_epsilon_budget": 1.0}, "before the first step"),
        ({"dp_noise": 1.0, "dp_clip": 1.0, "dp_delta": 0.0}, "delta must be in"),
        ({"dp_noise": -1.0}, "finite number >= 0"),
    ],
)
def test_inconsistent_privacy_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoordinatorConfig(**kwargs)
    assert CoordinatorConfig(dp_noise=1.0, dp_clip=1.0).aggregation().privacy is not None


def test_without_choices_dp_gets_the_plain_mean_and_no_adaptive_bound() -> None:
    """DP's sensitivity needs a fixed clip and equal weights: the defaults (quorum and the
    adaptive norm bound) give way to the mean and no adaptive bound, when not asked for."""
    private = CoordinatorConfig(dp_noise=1.0, dp_clip=1.0).aggregation()
    assert str(private.spec) == "mean" and private.privacy is not None
    assert private.norm_multiple == 0 and not private.norm_rule.enabled
    core = AggregationConfig(privacy=PrivacySpec(1.0, 1.0))
    assert str(core.spec) == "mean" and not core.norm_rule.enabled
    plain = CoordinatorConfig().aggregation()  # without DP the defences stay the default
    assert str(plain.spec) == "quorum" and plain.norm_rule.enabled
    assert plain.norm_multiple == 2.0
    # an explicit "off" and an explicit mean are what DP uses anyway
    explicit = CoordinatorConfig(dp_noise=1.0, dp_clip=1.0, aggregator="mean",
                                 norm_multiple=0.0).aggregation()
    assert str(explicit.spec) == "mean" and not explicit.norm_rule.enabled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm_multiple": 2.0}, "drop --norm-multiple 2"),
        ({"norm_reject": 4.0}, "drop --norm-reject"),
        ({"norm_window": 16, "norm_warmup": 3.0}, "drop --norm-window, --norm-warmup"),
        ({"aggregator": "agree"}, "needs --aggregator mean, not agree"),
    ],
)
def test_dp_refuses_an_explicit_adaptive_bound_or_robust_aggregator(
    kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        CoordinatorConfig(dp_noise=1.0, dp_clip=1.0, **kwargs)
    CoordinatorConfig(**kwargs)  # the same settings without DP are fine
    if "norm_multiple" in kwargs:
        with pytest.raises(ValueError, match="adaptive norm bound is off"):
            AggregationConfig(privacy=PrivacySpec(1.0, 1.0), norm_multiple=2.0)


def test_a_dp_run_judges_no_update_by_the_others_norms() -> None:
    """After ten small updates a long one (within C) is refused by the default adaptive bound
    without DP, and taken as it is (C is the only clip) with DP."""
    private = dp_core(noise=1.0, clip=100.0, mode="fedasync")
    store = Store(None)
    plain_core = CoordinatorCore(TASK, {"w": np.zeros((2, 2), F32), "b": np.zeros(2, F32)},
                                 AggregationConfig(mode="fedasync"), ledger=store)
    store.create_run(TASK.run_id, TASK.to_wire(), 0.0, plain_core.state, plain_core.counters)
    plain = Durable(plain_core, store)
    for c in (private, plain):
        for i in range(10):
            c.on_update(f"d{i}", upd(f"d{i}", 0.01, base=i), now=float(i))
        assert c.version == 10
        c.on_update("x", upd("x", 5.0, base=10), now=10.0)  # norm 12.2: 500 x the others
    assert plain.counters["rejected_norm"] == 1 and plain.version == 10
    assert private.version == 11 and private.counters["updates_clipped"] == 0
    assert private.counters.get("rejected_norm", 0) == 0


def test_the_demo_takes_the_same_privacy_settings() -> None:
    from coordinator.demo import DemoConfig

    with pytest.raises(ValueError, match="needs --aggregator mean"):
        DemoConfig(dp_noise=1.0, dp_clip=1.0, aggregator="median")
    with pytest.raises(ValueError, match="needs --dp-clip"):
        DemoConfig(dp_noise=1.0)
    assert DemoConfig(dp_noise=1.0, dp_clip=1.0).dp_noise == 1.0
