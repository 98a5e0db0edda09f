"""Central differential privacy: the Gaussian mechanism on every applied step, and its cost.

With ``--dp-noise σ --dp-clip C`` every aggregation step the coordinator applies (a FedBuff
buffer, a FedAsync update, a FedAvg round) is::

    a = (1/D) · Σ_i w(s_i) · clip_C(Δ_i)  +  N(0, (σ·C/D)² · I)

and then, as without privacy, ``v ← μ·v + a; θ ← θ + η·v`` (momentum and the server
learning rate only post-process ``a``). ``D`` is fixed for the run: the buffer size ``K``
(1 in FedAsync; in FedAvg the same ``--buffer-size``, read as the expected devices per
round), not the number of updates the step happens to hold.

**Sensitivity.** Two runs are neighbours when one device's updates are added or removed
(the unit of privacy is the device account, whatever its data). In one step a device
contributes at most one update (a second one from the same device is refused,
``duplicate_in_round``); that update enters the sum as ``w(s)·clip_C(Δ)``, whose L2 norm is
at most ``C``: the clip makes it at most ``C`` (``clip_update`` clips to ``C·(1 − 10⁻⁶)``, so
float32 rounding cannot leave it above ``C``), and the staleness weight ``w(s)`` is computed
by the server and lies in ``(0, 1]`` for every kind and every staleness
(``coordinator.staleness``), so it can only shorten it. The claimed sample count ``n`` is not
used at all, and ``D`` does not depend on how many updates arrived, so neither a large claim
nor a small step can make one device's share larger. The sum divided by ``D`` therefore has
L2 sensitivity ``C/D``, and the noise's standard deviation is ``σ`` times that: each step is
a Gaussian mechanism with noise multiplier ``σ``.

**Accounting.** The server does not choose which devices take part (devices train when they
like), so there is no sampling to amplify privacy: the accountant assumes the worst, that a
device is in every step. After ``T`` applied steps the run is the ``T``-fold composition of
the Gaussian mechanism with multiplier ``σ``; ``epsilon_spent`` asks Google's
``dp-accounting`` (its Rényi-DP accountant, ``RdpAccountant``, add-or-remove-one neighbours)
for the smallest ``ε`` it can prove at ``δ``. RDP is an upper bound (about 5-10 % above the
exact value for these parameters) and costs well under a millisecond, so it can be asked at
every version.

**Noise.** The noise of version ``v`` comes from a generator keyed with
``BLAKE2b(secret, v)``, the secret being 32 random bytes made when the run starts and kept
only in the state directory (never on the wire, never logged): a restart draws the same
noise for the same version (the same model bytes), and no device can predict it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.aggregation import State, l2_norm
from coordinator.robust import clip_norm

__all__ = [
    "ACCOUNTANT",
    "CLIP_MARGIN",
    "PrivacySpec",
    "clip_update",
    "epsilon_spent",
    "new_noise_secret",
    "noise_generator",
    "privacy_from_settings",
    "privacy_summary",
    "privatize",
    "steps_within_budget",
]

# clip to C·(1 − CLIP_MARGIN): the rounding of float32 (about 6e-8 relative) cannot push a
# clipped update's norm back above C
CLIP_MARGIN = 1e-6
ACCOUNTANT = (
    "dp-accounting RdpAccountant: T-fold composition of the Gaussian mechanism, "
    "no sampling amplification, add-or-remove-one-device neighbours"
)
SECRET_BYTES = 32


def _positive(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _num(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class PrivacySpec:
    """Central DP of one run: noise multiplier ``σ``, clip bound ``C``, the ``δ`` at which
    ``ε`` is reported, and an optional ``ε`` budget after which the run ends."""

    noise: float  # σ: noise standard deviation / sensitivity
    clip: float  # C: L2 bound of every update
    delta: float = 1e-5
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        if not _positive(self.noise):
            raise ValueError(f"the DP noise multiplier must be finite and > 0, got {self.noise!r}")
        if not _positive(self.clip):
            raise ValueError(f"the DP clip bound must be finite and > 0, got {self.clip!r}")
        if not (_positive(self.delta) and self.delta < 1):
            raise ValueError(f"the DP delta must be in (0, 1), got {self.delta!r}")
        if self.epsilon_budget is not None and not _positive(self.epsilon_budget):
            raise ValueError(
                f"the DP epsilon budget must be finite and > 0, got {self.epsilon_budget!r}"
            )

    @property
    def mechanism(self) -> str:
        """What makes the run's steps what they are (part of the run's identity): the
        noise multiplier and the clip bound. ``δ`` and the budget only read the cost."""
        return f"gaussian:{_num(self.noise)}+clip:{_num(self.clip)}"

    def max_steps(self) -> int | None:
        """How many steps the budget allows (None: no budget)."""
        if self.epsilon_budget is None:
            return None
        return steps_within_budget(self.noise, self.delta, self.epsilon_budget)


def privacy_from_settings(
    noise: float, clip: float, delta: float, budget: float
) -> PrivacySpec | None:
    """The ``--dp-*`` settings as a spec: None while ``noise`` is 0 (DP off); ``ValueError``
    with one line when they do not fit together."""
    for name, value in (("dp_noise", noise), ("dp_clip", clip), ("dp_epsilon_budget", budget)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if noise == 0:
        if clip or budget:
            raise ValueError(
                "--dp-clip and --dp-epsilon-budget need --dp-noise (the noise multiplier); "
                "to clip without noise use --aggregator mean+clip:BOUND"
            )
        return None
    if clip == 0:
        raise ValueError("--dp-noise needs --dp-clip: the L2 bound every update is clipped "
                         "to, which the noise is calibrated to")
    spec = PrivacySpec(noise, clip, delta, budget or None)
    if budget and spec.max_steps() == 0:
        raise ValueError(
            f"--dp-epsilon-budget {budget:g} is spent before the first step: one step with "
            f"--dp-noise {noise:g} costs epsilon {epsilon_spent(noise, 1, delta):.3g} at "
            f"delta {delta:g}; raise the noise or the budget"
        )
    return spec


def clip_update(delta: Mapping[str, np.ndarray], clip: float) -> tuple[State, bool]:
    """``delta`` scaled to an L2 norm of at most ``clip`` (strictly: ``clip·(1 − 10⁻⁶)``
    when it is scaled), and whether it was."""
    clipped, scale = clip_norm(delta, clip * (1.0 - CLIP_MARGIN))
    if scale < 1.0 and l2_norm(clipped) > clip:  # pragma: no cover - the margin covers it
        clipped, _ = clip_norm(clipped, clip * (1.0 - 8 * CLIP_MARGIN))
    return clipped, scale < 1.0


def new_noise_secret() -> bytes:
    """32 random bytes from the operating system: the key of a run's noise."""
    return secrets.token_bytes(SECRET_BYTES)


def noise_generator(secret: bytes, version: int) -> np.random.Generator:
    """The generator of version ``version``'s noise: PCG64 seeded with
    ``BLAKE2b-256(version, key=secret)``. One-way in the secret, so the noise of one version
    (even if someone learnt it) tells nothing about another's."""
    if not (isinstance(secret, bytes) and len(secret) >= 16):
        raise ValueError("the noise secret must be at least 16 bytes")
    if not (isinstance(version, int) and version >= 0):
        raise ValueError(f"version must be an integer >= 0, got {version!r}")
    digest = hashlib.blake2b(
        version.to_bytes(8, "big"), key=secret[:64], digest_size=32, person=b"fedbus-dp-noise"
    ).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        int.from_bytes(digest, "big")
    )))


def privatize(
    total: Mapping[str, np.ndarray], *, divisor: int, clip: float, noise: float,
    rng: np.random.Generator,
) -> State:
    """``total / divisor + N(0, (noise·clip/divisor)²)`` per coordinate, as new float32
    arrays. The noise is drawn in float64, tensor by tensor in sorted name order (so the
    same generator gives the same noise whatever the mapping's order)."""
    if not (isinstance(divisor, int) and divisor >= 1):
        raise ValueError(f"divisor must be an integer >= 1, got {divisor!r}")
    if not (_positive(clip) and _positive(noise)):
        raise ValueError(f"clip and noise must be finite and > 0, got {clip!r}, {noise!r}")
    std = noise * clip / divisor
    out: State = {}
    for name in sorted(total):
        value = np.asarray(total[name], dtype=np.float64)
        draw = rng.standard_normal(value.shape)
        out[name] = (value / divisor + std * draw).astype(np.float32)
    return {name: out[name] for name in total}


@functools.lru_cache(maxsize=4096)
def epsilon_spent(noise: float, steps: int, delta: float) -> float:
    """The ``ε`` (at ``delta``) of ``steps`` compositions of the Gaussian mechanism with
    noise multiplier ``noise``, from ``dp-accounting``'s RDP accountant; 0 for no step."""
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not _positive(noise):
        raise ValueError(f"noise must be finite and > 0, got {noise!r}")
    if not (_positive(delta) and delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if steps == 0:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), steps)
    return float(accountant.get_epsilon(delta))


def steps_within_budget(noise: float, delta: float, budget: float) -> int:
    """The largest ``T`` with ``epsilon_spent(noise, T, delta) <= budget`` (0 if one step
    already costs more). ``ε`` grows with ``T``, so this doubles then bisects."""
    if not _positive(budget):
        raise ValueError(f"budget must be finite and > 0, got {budget!r}")
    if epsilon_spent(noise, 1, delta) > budget:
        return 0
    low, high = 1, 2
    while epsilon_spent(noise, high, delta) <= budget:
        low, high = high, high * 2
        if high > 1 << 40:  # pragma: no cover - a budget no run reaches
            return low
    while high - low > 1:
        mid = (low + high) // 2
        if epsilon_spent(noise, mid, delta) <= budget:
            low = mid
        else:
            high = mid
    return low


def privacy_summary(spec: PrivacySpec, steps: int, divisor: int) -> dict[str, Any]:
    """Plain values for logs, reports and the run summary."""
    return {
        "mechanism": "gaussian",
        "noise_multiplier": spec.noise,
        "clip": spec.clip,
        "divisor": divisor,
        "noise_std": spec.noise * spec.clip / divisor,
        "delta": spec.delta,
        "steps": steps,
        "epsilon": epsilon_spent(spec.noise, steps, spec.delta),
        "epsilon_budget": spec.epsilon_budget,
        "max_steps": spec.max_steps(),
        "accountant": ACCOUNTANT,
    }
