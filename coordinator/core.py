"""The coordinator's decisions as one pure object: no network, no clock, no threads.

The shell (the MQTT side) feeds ``CoordinatorCore`` what arrives — update payloads, status
payloads, clock ticks, always with the current time ``now`` — and carries out the actions
it returns, in order:

- ``SendReceipt``: publish ``receipt`` on the device's receipt topic;
- ``NewModel``: a new global version exists; publish ``core.model_message(now)`` retained,
  evaluate it, log it;
- ``SendInvite``: with a concurrency limit (protocol revision 2.10,
  ``coordinator.invitations``), publish an ``invite`` on the device's receipt topic. The core
  keeps at most ``concurrency`` invitations open, fills free slots at every status, judged
  update and tick, and refuses an update whose device held none (``not_selected``) once more
  devices contribute than the limit.

The operator may pause the run (``pause``): updates are still judged, and an accepted one
is kept as usual, but no version is made (no buffer applied, no round closed, ``tick``
does nothing) until ``unpause``, which applies what became due meanwhile. ``flush`` (the
end of the run) applies what waits even while paused.

Every input also appends records to the core's journal (``coordinator.journal``): the
verdict of each update id, accepted updates with their payloads, new versions. The shell
writes them (``drain_journal()``) to the durable store in one transaction before it carries
out the actions, so a receipt or a model never announces what a crash could lose. The
core reads its memory of earlier verdicts and work through a ``Ledger`` (the store), and
``CoordinatorCore.resume`` rebuilds it from a stored snapshot: same version, same model
bytes, the same buffer (its updates re-added in the same order with the same weights).

Times (``now``) are seconds on a monotonic clock; only differences are used.

Modes:

- ``fedbuff``: every accepted update is added, weighted, to a running sum (the buffer,
  ``aggregation.WeightedSum``: one model-sized array, whatever K); when it holds
  ``buffer_size`` (K) updates, or as many as devices are online if fewer, or at ``tick``
  once its oldest update has waited ``buffer_timeout`` seconds,
  ``aggregation.fedbuff_apply`` makes the next version. The target is re-checked when a
  device goes offline too, so a device that vanishes cannot hold the buffer back. A regional
  aggregator's partial update (protocol revision 2.11) counts as the device updates it
  folds (its ``parts``, revision 2.12) wherever updates are counted against K; one
  region's partials on one base version fold at most ``region_quota()`` device updates,
  beyond which they are refused as ``region_quota``.
- ``fedasync``: the same with K = 1.
- With a robust aggregator (``AggregationConfig.aggregator``: ``quorum``, ``agree``,
  ``median``, ``trimmed:β``, ``krum:F[:M]``; ``coordinator.aggregator_spec``) the buffer
  keeps the deltas themselves instead of a running sum, each clipped (if the spec has
  ``+clip:B``) and then scaled by its staleness weight ``w(s)``, at most K model copies
  (2K under ``quorum``). At the step, the robust aggregate ``a``
  of those deltas (each counting once, whatever its claimed ``n``) takes the place of the
  mean: ``v ← μ·v + a; θ ← θ + η·v``. A buffer applied with fewer updates than the
  aggregator is defined for (timeout, devices gone offline) uses the coordinate-wise median
  of what it holds (counted as ``robust_fallbacks``). In FedAvg (staleness 0, no momentum)
  a round closes with ``θ ← θ + η·a`` likewise. A capped mean (``mean+cap:C``) keeps the
  deltas the same way and makes ``a`` their mean weighted by the claimed ``n`` capped at
  ``C`` × the step's lower median claim (``robust.cap_sample_counts``). Under ``quorum`` a
  buffer holding K updates is applied only once K of them agree
  (``aggregator_spec.quorum_reached``), or when it holds 2K (no more than the devices
  online), or at the timeout; it is re-checked at every accepted update, from the buffer
  alone, so a resumed core decides the same.
- ``fedavg``: synchronous rounds. A round for version v starts with the devices online at
  that moment. While it has no update yet it stays open: devices coming online join it and
  devices going offline leave it; its clock starts when it first has a device. With its
  first update the set of devices is fixed. Only updates based on v (anything older is
  ``stale``), from a device of the round (else ``not_selected``), one per device (else
  ``duplicate_in_round``) are accepted. The round closes as soon as every device still
  online has reported (devices going offline stop being waited for), or at ``tick`` once
  ``round_deadline`` seconds have passed with at least ``min_round_updates`` updates; with
  fewer, its clock restarts and the version stays.

Norms: after validation (which refuses anything above the fixed ceiling ``max_norm``),
every update meets the adaptive norm bound (``coordinator.norm_bound``; on by default, off
under differential privacy, whose fixed clip ``C`` is the bound): refused as
``norm`` above the reject bound, clipped to the clip bound between the two, decided from
the norms of the last ``norm_window`` accepted updates (or, before 8 are known, from the
global model's norm). The window is journaled (``NormWindow``) and a pending update carries
the bound it was clipped to, so ``resume`` rebuilds and decides the same.

With central differential privacy (``AggregationConfig.privacy``, ``coordinator.privacy``;
the plain mean only) every accepted update is clipped to the DP bound ``C`` and buffered with
its staleness weight alone (its claimed ``n`` is ignored), a device may have one update in a
buffer (a second is ``duplicate_in_round``), and every step, FedBuff, FedAsync or a FedAvg
round, uses ``a = Σ w(s_i)·Δ_i / D + N(0, (σ·C/D)²)`` with a fixed ``D``
(``AggregationConfig.dp_divisor``); the noise of version ``v`` is drawn from a generator keyed
by the run's secret and ``v``, so a resumed run makes the same bytes. Once the version
reaches what the epsilon budget allows, the run ends.

The global state is finite after any sequence of inputs: updates are validated
(``coordinator.validation``) and a step that would produce NaN or infinity is dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from coordinator.adaptive_k import DevicePeriods, adaptive_k, quorum_devices
from coordinator.aggregation import (
    AggregationError,
    State,
    WeightedSum,
    apply_step,
    fedavg_step,
    fedbuff_apply,
    is_finite,
    l2_norm,
    server_step,
)
from coordinator.aggregator_spec import (
    DEFAULT_AGGREGATOR,
    AggregatorSpec,
    capped_mean,
    parse_aggregator,
    quorum_readiness,
    robust_aggregate,
)
from coordinator.fleet_scale import STALENESS_CAP, FleetScale, fleet_scale
from coordinator.invitations import DEFAULT_INVITE_TIMEOUT, Invitations
from coordinator.journal import (
    BufferDropped,
    InvitationsChanged,
    Ledger,
    NormWindow,
    PauseChanged,
    Pending,
    PeriodWindow,
    Record,
    RoundFixed,
    RunEnded,
    Verdict,
    VersionMade,
)
from coordinator.norm_bound import (
    DEFAULT_NORM_MULTIPLE,
    NormDecision,
    NormRule,
    decide_norm,
    pushed,
)
from coordinator.privacy import (
    PrivacySpec,
    clip_update,
    epsilon_spent,
    noise_generator,
    privatize,
)
from coordinator.robust import clip_norm
from coordinator.server_opt import SERVER_OPTIMIZERS, adaptive_step, fits_moments
from coordinator.staleness import STALENESS_KINDS, staleness_weight
from coordinator.validation import (
    REJECT_REASONS,
    Accepted,
    DeltaChecked,
    Rejected,
    Repeated,
    ValidationLimits,
    validate_update,
)
from fedbus.bridge import REGION_AGGREGATOR_PREFIX
from fedbus.codec_spec import CodecSpec, parse_codec
from fedbus.envelope import DecodeLimits
from fedbus.errors import ProtocolError
from fedbus.messages import GlobalModel, Receipt, Status, Task, Update
from fedbus.topics import DEVICE_ID_PATTERN
from fedbus.update_codec import decode_update_delta, encode_update_delta

__all__ = [
    "MODES",
    "ONLINE_STATES",
    "Action",
    "AggregationConfig",
    "CoordinatorCore",
    "Judged",
    "NewModel",
    "SendInvite",
    "SendReceipt",
]

_log = logging.getLogger(__name__)
# --adaptive-k: the recent versions whose making time is kept (an update based on an older
# one gives no period sample)
MADE_AT_KEPT = 1024

MODES: tuple[str, ...] = ("fedbuff", "fedasync", "fedavg")
ONLINE_STATES: tuple[str, ...] = ("online", "training", "idle")
# a status whose error has one of these kinds says the device cannot take part in the task
# (its data or the model do not fit): online, but not counted on for a step or a round
ASIDE_ERROR_KINDS: tuple[str, ...] = ("data", "model")
# reject reasons validate_update decides before it reads the ledger, and "duplicate"
_JUDGED_BEFORE_LOOKUP = frozenset(
    {"device_mismatch", "retained", "wrong_run", "wrong_task", "duplicate"}
)
STATUS_LIMITS = DecodeLimits(
    max_bytes=4096, max_bin_len=0, max_str_len=256, max_array_len=16, max_map_len=32
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pos(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True)
class AggregationConfig:
    """How the coordinator aggregates; checked on construction (``ValueError``)."""

    mode: str = "fedbuff"
    buffer_size: int = 4  # K; fedasync always uses 1
    # fedbuff: apply a partial buffer once its oldest update has waited this long, so fewer
    # active devices than K cannot stall the model (0 disables the timeout)
    buffer_timeout: float = 60.0
    server_lr: float = 1.0
    server_momentum: float = 0.0  # fedbuff/fedasync only; sgd only
    # how a step's aggregate moves the model (coordinator.server_opt): sgd (server_lr and
    # server_momentum), or adam/yogi (FedAdam/FedYogi: server_lr, the betas and tau);
    # fedbuff/fedasync only
    server_optimizer: str = "sgd"
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # a kind of coordinator.staleness; the default poly with a = 1 weighs 1 / (1 + s)
    # (chosen by measurement: BENCHMARKS.md, "Staying at the target")
    staleness: str = "poly"
    staleness_a: float = 1.0  # exponent of "poly", slope of "hinge"
    staleness_b: int = 4  # "hinge": full weight up to this staleness
    # the hard bound; with the default weights an update 50 versions behind weighs 1/51
    max_staleness: int = 50  # fedavg always uses 0
    # fedbuff: K and the staleness limit follow the contributing devices
    # (coordinator.fleet_scale), buffer_size and max_staleness being their floors; the task
    # announces fleet_scale.STALENESS_CAP as its bound
    fleet_scaling: bool = False
    # fedbuff: K follows the devices' measured speeds (coordinator.adaptive_k), buffer_size
    # its floor and the devices contributing (or the concurrency limit) its ceiling
    adaptive_k: bool = False
    # fedbuff: at most this many devices train at a time, each invited (protocol revision
    # 2.10, coordinator.invitations); 0: no limit, every device trains when it can. With
    # fleet scaling, K and the staleness limit follow min(contributing devices, concurrency)
    concurrency: int = 0
    invite_timeout: float = DEFAULT_INVITE_TIMEOUT  # seconds an invitation stays open
    max_norm: float = 100.0  # the fixed ceiling: anything above it is rejected
    # the adaptive norm bound (coordinator.norm_bound): clip above norm_multiple x the median
    # norm of the last norm_window accepted updates, reject above norm_reject x that bound;
    # norm_multiple 0 switches it off (only max_norm applies)
    # None (not given): DEFAULT_NORM_MULTIPLE, or 0 (off) under differential privacy
    norm_multiple: float | None = None
    norm_reject: float = 4.0
    norm_window: int = 64
    norm_warmup: float = 4.0  # before 8 norms are known: clip above this x the model's norm
    round_deadline: float = 30.0  # fedavg, seconds
    min_round_updates: int = 1  # fedavg: needed to close a round at its deadline
    # how a step combines its updates (coordinator.aggregator_spec): a spec string such as
    # "median" or "krum:1+clip:5", parsed on construction, or a parsed AggregatorSpec
    # None (not given): DEFAULT_AGGREGATOR, or "mean" under differential privacy
    aggregator: AggregatorSpec | str | None = None
    # central differential privacy (coordinator.privacy): every update clipped, equal
    # weights, Gaussian noise on every applied step; None: off. It needs the plain mean and
    # the adaptive norm bound off (its fixed clip is the bound)
    privacy: PrivacySpec | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        # the defaults: quorum and the adaptive bound, or, under differential privacy, whose
        # sensitivity argument needs a fixed clip and equal weights, the plain mean without it
        private = self.privacy is not None
        if self.aggregator is None:
            object.__setattr__(self, "aggregator", "mean" if private else DEFAULT_AGGREGATOR)
        if self.norm_multiple is None:
            object.__setattr__(
                self, "norm_multiple", 0.0 if private else DEFAULT_NORM_MULTIPLE
            )
        if isinstance(self.aggregator, str):
            try:
                object.__setattr__(self, "aggregator", parse_aggregator(self.aggregator))
            except ValueError as exc:
                raise ValueError(f"aggregator {exc}") from None
        elif not isinstance(self.aggregator, AggregatorSpec):
            raise ValueError(f"aggregator must be a spec string, got {self.aggregator!r}")
        if not (_is_int(self.buffer_size) and self.buffer_size >= 1):
            raise ValueError(f"buffer_size must be an integer >= 1, got {self.buffer_size!r}")
        t = self.buffer_timeout
        if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
                and t >= 0):
            raise ValueError(f"buffer_timeout must be finite and >= 0, got {t!r}")
        if not _is_pos(self.server_lr):
            raise ValueError(f"server_lr must be finite and > 0, got {self.server_lr!r}")
        m = self.server_momentum
        if not (isinstance(m, int | float) and math.isfinite(m) and 0 <= m < 1):
            raise ValueError(f"server_momentum must be in [0, 1), got {m!r}")
        if self.mode == "fedavg" and m != 0:
            raise ValueError("server_momentum is not supported in fedavg mode; set it to 0")
        self._check_server_optimizer()
        if self.staleness not in STALENESS_KINDS:
            raise ValueError(
                f"staleness must be one of {', '.join(STALENESS_KINDS)}, got {self.staleness!r}"
            )
        a = self.staleness_a
        if not (isinstance(a, int | float) and math.isfinite(a) and a >= 0):
            raise ValueError(f"staleness_a must be finite and >= 0, got {a!r}")
        if not (_is_int(self.staleness_b) and self.staleness_b >= 0):
            raise ValueError(f"staleness_b must be an integer >= 0, got {self.staleness_b!r}")
        if not (_is_int(self.max_staleness) and self.max_staleness >= 0):
            raise ValueError(f"max_staleness must be an integer >= 0, got {self.max_staleness!r}")
        self._check_fleet_scaling()
        self._check_adaptive_k()
        self._check_concurrency()
        if not _is_pos(self.max_norm):
            raise ValueError(f"max_norm must be finite and > 0, got {self.max_norm!r}")
        self.norm_rule  # noqa: B018 - checks the adaptive bound's settings
        if not _is_pos(self.round_deadline):
            raise ValueError(f"round_deadline must be finite and > 0, got {self.round_deadline!r}")
        if not (_is_int(self.min_round_updates) and self.min_round_updates >= 1):
            raise ValueError(
                f"min_round_updates must be an integer >= 1, got {self.min_round_updates!r}"
            )
        self._check_aggregator_fits()
        self._check_privacy_fits()

    def _check_fleet_scaling(self) -> None:
        if not self.fleet_scaling:
            return
        if self.mode != "fedbuff":
            raise ValueError(f"fleet scaling needs fedbuff mode, not {self.mode}")
        if self.privacy is not None:
            raise ValueError("fleet scaling cannot be used with differential privacy "
                             "(its noise is scaled by a fixed K)")
        if self.max_staleness > STALENESS_CAP:
            raise ValueError(f"with fleet scaling max_staleness (its floor) must be at most "
                             f"{STALENESS_CAP}, got {self.max_staleness}")

    def _check_adaptive_k(self) -> None:
        if not self.adaptive_k:
            return
        if self.mode != "fedbuff":
            raise ValueError(f"adaptive K needs fedbuff mode, not {self.mode}")
        if self.fleet_scaling:
            raise ValueError("adaptive K and fleet scaling both set K: choose one "
                             "(fleet scaling for large fleets, adaptive K for mixed speeds)")
        if self.privacy is not None:
            raise ValueError("adaptive K cannot be used with differential privacy "
                             "(its noise is scaled by a fixed K)")

    def _check_concurrency(self) -> None:
        if not (_is_int(self.concurrency) and self.concurrency >= 0):
            raise ValueError(f"concurrency must be an integer >= 0, got {self.concurrency!r}")
        if not _is_pos(self.invite_timeout):
            raise ValueError(f"invite_timeout must be finite and > 0, got "
                             f"{self.invite_timeout!r}")
        if self.concurrency and self.mode != "fedbuff":
            raise ValueError(f"concurrency needs fedbuff mode, not {self.mode}")

    def _check_server_optimizer(self) -> None:
        kind = self.server_optimizer
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, "
                             f"got {kind!r}")
        for label, beta in (("server_beta1", self.server_beta1),
                            ("server_beta2", self.server_beta2)):
            if not (isinstance(beta, int | float) and math.isfinite(beta) and 0 <= beta < 1):
                raise ValueError(f"{label} must be in [0, 1), got {beta!r}")
        if not _is_pos(self.server_tau):
            raise ValueError(f"server_tau must be finite and > 0, got {self.server_tau!r}")
        if kind == "sgd":
            return
        if self.mode == "fedavg":
            raise ValueError(f"server_optimizer {kind} is not supported in fedavg mode; "
                             "use sgd")
        if self.server_momentum != 0:
            raise ValueError(f"server_momentum is for the sgd server optimizer; {kind} has "
                             "its own (server_beta1): set server_momentum to 0")

    @property
    def keeps_server_state(self) -> bool:
        """Steps carry optimizer state (sgd momentum, adam or yogi moments) to the next."""
        return self.server_momentum > 0 or self.server_optimizer != "sgd"

    def _check_privacy_fits(self) -> None:
        """DP's noise is calibrated to a sum of equally weighted, clipped updates: only the
        plain mean is that, and the clip is DP's own."""
        if self.privacy is None:
            return
        if not isinstance(self.privacy, PrivacySpec):
            raise ValueError(f"privacy must be a PrivacySpec, got {self.privacy!r}")
        spec = self.spec
        if spec.robust:
            raise ValueError(
                f"differential privacy (--dp-noise) needs --aggregator mean, not {spec}: its "
                "noise is calibrated to a sum of clipped updates, which a robust aggregate is not"
            )
        if spec.clip is not None:
            raise ValueError(
                f"with differential privacy every update is clipped to --dp-clip: drop "
                f"+clip:{spec.clip:g} from --aggregator {spec}"
            )
        if spec.cap is not None:
            raise ValueError(
                f"with differential privacy every update weighs the same: drop +cap from "
                f"--aggregator {spec}"
            )
        if self.norm_rule.enabled:
            raise ValueError(
                f"with differential privacy every update is clipped to --dp-clip and the "
                f"adaptive norm bound is off (it would make one device's clip depend on the "
                f"others' norms): drop --norm-multiple {self.norm_multiple:g} or set it to 0"
            )

    def _check_aggregator_fits(self) -> None:
        """A robust aggregator that needs more updates than a full buffer can hold is
        refused; FedAvg rounds vary in size, so there a small round falls back to the
        median (``robust_aggregate``)."""
        spec = self.spec
        k = self.effective_buffer_size
        if self.mode == "fedavg" or spec.min_updates <= k:
            if spec.kind == "krum" and spec.m is not None and self.mode != "fedavg" \
                    and spec.m > k - spec.f:
                raise ValueError(
                    f"aggregator {spec}: M = {spec.m} is more than K - F = {k - spec.f} "
                    f"updates of a full buffer (K = {k})"
                )
            return
        if self.mode == "fedasync":
            raise ValueError(
                f"aggregator {spec} needs at least {spec.min_updates} updates per step, but "
                "fedasync applies each update alone: use --mode fedbuff with --buffer-size "
                f"{spec.min_updates} or more"
            )
        raise ValueError(
            f"aggregator {spec} needs at least {spec.min_updates} updates per step: raise "
            f"--buffer-size from {k} to {spec.min_updates} or more"
        )

    @property
    def norm_rule(self) -> NormRule:
        """The adaptive norm bound's settings (``ValueError`` if they are invalid)."""
        window = self.norm_window
        min_samples = NormRule.min_samples
        if isinstance(window, int) and not isinstance(window, bool) and window >= 1:
            min_samples = min(min_samples, window)
        multiple = self.norm_multiple
        assert multiple is not None  # resolved on construction
        return NormRule(multiple=multiple, reject=self.norm_reject,
                        window=window, min_samples=min_samples,
                        warmup_fraction=self.norm_warmup)

    @property
    def spec(self) -> AggregatorSpec:
        """The parsed aggregator."""
        assert isinstance(self.aggregator, AggregatorSpec)
        return self.aggregator

    @property
    def effective_buffer_size(self) -> int:
        """K actually used: 1 for fedasync, ``buffer_size`` otherwise (unused by fedavg)."""
        return 1 if self.mode == "fedasync" else self.buffer_size

    @property
    def dp_divisor(self) -> int:
        """With differential privacy, the fixed ``D`` every step's sum is divided by: ``K``
        (1 in fedasync; in fedavg ``buffer_size``, the expected devices per round)."""
        return self.effective_buffer_size

    @property
    def effective_max_staleness(self) -> int:
        """Staleness bound the task announces: 0 for fedavg, ``STALENESS_CAP`` with fleet
        scaling (the limit in force follows the fleet below it), else ``max_staleness``."""
        if self.mode == "fedavg":
            return 0
        return STALENESS_CAP if self.fleet_scaling else self.max_staleness

    def scaled(self, devices: int) -> FleetScale:
        """K and the staleness limit in force with ``devices``
        contributing: ``coordinator.fleet_scale`` with fleet scaling, else fixed. Under a
        concurrency limit at most ``concurrency`` of them train at a time: the fleet that
        makes staleness is that many, and K keeps an update's age at about
        ``fleet_scale.STALENESS_TARGET`` versions."""
        if self.concurrency:
            devices = min(devices, self.concurrency)
        if self.fleet_scaling:
            return fleet_scale(devices, self.buffer_size, self.max_staleness,
                               bounded=bool(self.concurrency))
        return FleetScale(self.effective_buffer_size, self.effective_max_staleness)


@dataclass(frozen=True)
class SendReceipt:
    """Publish ``receipt`` on ``device_id``'s receipt topic."""

    device_id: str
    receipt: Receipt


@dataclass(frozen=True)
class NewModel:
    """Global version ``version`` was made: publish ``model_message()``, evaluate, log.
    ``sent_at``: the publish times its updates claim (their ``ts``; for metrics), of those
    accepted by this process (not known for updates restored on resume)."""

    version: int
    reason: str
    sent_at: tuple[float, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class SendInvite:
    """Revision 2.10: publish an ``invite`` (made at ``version``) on ``device_id``'s receipt
    topic: the device may train once. Revision 2.13: ``invite_id`` names the invitation (the
    same again when it is sent again); random, so compared explicitly where it matters."""

    device_id: str
    version: int
    invite_id: str | None = field(default=None, compare=False)


Action = SendReceipt | NewModel | SendInvite


@dataclass(frozen=True)
class Judged:
    """What became of one update message, for fleet statistics (``coordinator.fleet``):
    ``outcome`` is ``accepted``, ``rejected`` (with its ``reason``) or ``repeated`` (a copy
    answered with the earlier verdict); ``size`` its bytes; ``metrics`` the device's claimed
    training metrics (``m``) of an accepted update, else empty."""

    device_id: str
    outcome: str
    reason: str | None
    size: int
    staleness: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class _Round:
    """One FedAvg round (mutable, private to the core)."""

    number: int
    version: int
    started_at: float | None
    participants: set[str]
    waiting: set[str]
    reported: dict[str, tuple[dict[str, np.ndarray], int, str]] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        """No update yet: devices may still join or leave."""
        return not self.reported


def _clip_bound(decision: NormDecision) -> float | None:
    """The adaptive bound an accepted update is clipped to, None if it is kept as is."""
    return decision.clip_bound if decision.action == "clip" else None


def _frozen(state: Mapping[str, np.ndarray], *, copy: bool = True) -> dict[str, np.ndarray]:
    """float32 C-contiguous read-only arrays; ``copy=False`` only for arrays nobody else holds."""
    out = {}
    for name, value in state.items():
        arr = np.array(value, dtype=np.float32, copy=True if copy else None, order="C")
        arr.setflags(write=False)
        out[name] = arr
    return out


class CoordinatorCore:
    """Validates updates, keeps presence and decides when to make a new global version."""

    def __init__(
        self,
        task: Task,
        initial_state: Mapping[str, np.ndarray],
        config: AggregationConfig,
        *,
        ledger: Ledger,
        max_update_bytes: int | None = None,
        start_version: int = 0,
        model_codec: str | CodecSpec = "fp32",
        velocity: Mapping[str, np.ndarray] | None = None,
        counters: Mapping[str, int] | None = None,
        noise_secret: bytes | None = None,
    ) -> None:
        if config.privacy is not None and noise_secret is None:
            raise ValueError("a run with differential privacy needs its noise secret")
        if not (_is_int(start_version) and start_version >= 0):
            raise ValueError(f"start_version must be an integer >= 0, got {start_version!r}")
        state = _frozen(initial_state)
        if not state:
            raise ValueError("initial_state has no tensors")
        empty = sorted(name for name, a in state.items() if a.size == 0)
        if empty:
            raise ValueError(f"initial_state has empty tensors: {empty}")
        if not is_finite(state):
            raise ValueError("initial_state holds NaN or infinity")
        self.task = task
        self.config = config
        # revision 2.8: when set (by the service, when it requires signed updates), why an
        # update payload from a device is not signed by that device's registered key
        self.update_signatures: Callable[[str, bytes], str | None] | None = None
        self.model_codec = (
            model_codec if isinstance(model_codec, CodecSpec) else parse_codec(model_codec)
        )
        self._ledger = ledger
        self._journal: list[Record] = []
        # the judgement of the last on_update (each call judges exactly one message)
        self.last_judged: Judged | None = None
        self._state = state
        self._version = start_version
        self._shapes = {name: a.shape for name, a in state.items()}
        self._limits = ValidationLimits(
            max_update_bytes=task.max_update_bytes
            if max_update_bytes is None
            else max_update_bytes,
            max_norm=config.max_norm,
            max_staleness=config.effective_max_staleness,
        )
        self._norm_rule = config.norm_rule
        # L2 norms of the most recently accepted updates, oldest first (norm_bound)
        self._norms: tuple[float, ...] = ()
        self._model_norm = l2_norm(state)
        self._buffer = WeightedSum(self._shapes)  # the mean: a running sum
        # a robust aggregator or a capped mean: the buffered deltas themselves (clipped,
        # staleness-scaled) and their claimed sample counts
        self._kept: list[State] | None = [] if config.spec.keeps_deltas else None
        self._kept_n: list[int] = []
        # quorum: the step the last readiness check worked out, with the kept list and its
        # length it was worked out from (a step of exactly those deltas reuses it)
        self._agreed: tuple[list[State], int, State] | None = None
        # quorum: (first buffered id, buffered, K, online) of the last check found not ready
        self._not_ready: tuple[str, int, int, int] | None = None
        self._buffer_ids: list[str] = []  # update ids in the buffer, in order
        # revision 2.12: how many device updates each buffered update stands for (a
        # partial: its parts), in order; K and quorum's limit count these
        self._buffer_parts: list[int] = []
        # revision 2.12: the device updates each region's accepted partials folded, by
        # (aggregator, base version), for the bases within the staleness bound (durable: a
        # resumed core rebuilds it from the stored verdicts)
        self._region_parts: dict[tuple[str, int], int] = {}
        # the publish time (ts) each accepted, not yet applied update claims, by update id
        self._sent_at: dict[str, float] = {}
        # differential privacy: the key of the noise, the devices with an update in the
        # buffer (one each per step) and the steps the epsilon budget allows
        self._noise_secret = noise_secret
        self._buffer_devices: set[str] = set()
        self._max_steps = None if config.privacy is None else config.privacy.max_steps()
        self._buffer_since: float | None = None  # when the oldest buffered update arrived
        if velocity is not None and not self._fits_server_state(state, velocity):
            _log.warning("the stored server optimizer state does not fit --server-optimizer "
                         "%s: it starts afresh", config.server_optimizer)
            velocity = None
        self._velocity: dict[str, np.ndarray] | None = (
            None if velocity is None else _frozen(velocity)
        )
        self._devices: dict[str, str] = {}
        self._aside: set[str] = set()  # online devices whose status says they cannot take part
        # devices whose last state is online, training or idle: kept as statuses arrive, so
        # that counting them costs nothing per update however large the fleet
        self._online: set[str] = set()
        # revision 2.10: the open invitations and the devices waiting for one (None: no limit)
        self._invitations: Invitations | None = (
            Invitations(config.concurrency, config.invite_timeout) if config.concurrency
            else None
        )
        self._ended: str | None = None
        # the operator's pause (its reason) or None: no new version is made while paused
        self._paused: str | None = None
        self._counters: dict[str, int] = dict.fromkeys(
            [
                "updates_received",
                "updates_accepted",
                "updates_rejected",
                "updates_repeated",
                "bytes_received",
                "bytes_accepted",
                "models_published",
                "aggregation_failed",
                "buffer_timeouts",
                "status_received",
                "status_malformed",
                "round_restarts",
                "updates_clipped",
                "robust_fallbacks",
                "partials_accepted",
                "partial_parts",
                "invitations_sent",
                "invitations_expired",
                "invitations_resent",
                *(f"rejected_{reason}" for reason in REJECT_REASONS),
            ],
            0,
        )
        if counters:
            self._counters.update(counters)
        # --adaptive-k: the devices' measured periods, and when each recent version was made
        # (this process's clock; the latest input's time)
        self._periods = DevicePeriods()
        self._made_at: dict[int, float] = {}
        self._clock: float | None = None
        self._started_at: float | None = None  # this process's first input
        self._round: _Round | None = None
        if config.mode == "fedavg":
            self._round = _Round(0, start_version, None, set(), set())

    @classmethod
    def resume(
        cls,
        task: Task,
        config: AggregationConfig,
        *,
        ledger: Ledger,
        version: int,
        state: Mapping[str, np.ndarray],
        velocity: Mapping[str, np.ndarray] | None,
        counters: Mapping[str, int],
        pending: Sequence[Pending],
        round_fixed: RoundFixed | None,
        ended: str | None,
        now: float,
        model_codec: str | CodecSpec = "fp32",
        noise_secret: bytes | None = None,
        norms: Sequence[float] = (),
        paused: str | None = None,
        periods: Mapping[str, Sequence[float]] | None = None,
        region_parts: Mapping[tuple[str, int], int] | None = None,
        invitations: Sequence[str] = (),
        invitation_ids: Mapping[str, str] | None = None,
    ) -> CoordinatorCore:
        """A core at a stored state: ``pending`` (accepted, not yet applied updates, in
        arrival order) are decoded again and put back exactly where they were, the FedBuff
        running sum re-added in the same order with the same weights (the same bytes), each
        clipped to the adaptive bound it was clipped to when accepted. ``norms``: the stored
        window of accepted norms, so the next decisions are those the stopped core would
        have made. ``paused``: the stored pause's reason (a paused run resumes paused).
        ``periods``: the devices' stored period samples (``--adaptive-k``); updates based on
        a version made before the restart give no new sample. ``region_parts``: the parts of
        the accepted partials by (aggregator, base version), the region quota's tally.
        ``invitations``: the devices that held an open invitation, oldest first; under a
        concurrency limit they hold it again, each with a whole timeout from ``now`` and its
        stored id from ``invitation_ids`` (``Invitations.restored``)."""
        core = cls(
            task, state, config, ledger=ledger, start_version=version,
            model_codec=model_codec, velocity=velocity, counters=counters,
            noise_secret=noise_secret,
        )
        core._norms = tuple(float(v) for v in norms)[-core._norm_rule.window:]
        core._periods = DevicePeriods.restored(periods or {})
        core._region_parts = dict(region_parts or {})  # the region quota's tally
        if core._invitations is not None and invitations:
            core._invitations = Invitations.restored(
                core._invitations.concurrency, core._invitations.timeout, tuple(invitations),
                now, invitation_ids)
        core._clock = core._started_at = now  # the version resumed at: made before
        core._ended = ended
        core._paused = paused
        rnd = core._round
        if rnd is not None and round_fixed is not None:
            rnd.number = round_fixed.number
            rnd.version = round_fixed.version
            rnd.participants = set(round_fixed.participants)
            rnd.started_at = now
        for entry in pending:
            delta = core._prepared(core._decode_stored(entry), entry.clip, count=False)
            if rnd is not None:
                rnd.reported[entry.device_id] = (delta, entry.num_samples, entry.update_id)
                continue
            core._buffer_add(delta, entry.num_samples, entry.coef, entry.update_id,
                             entry.device_id, core._stored_parts(entry))
            core._buffer_since = now
        if rnd is not None:
            rnd.waiting = rnd.participants - set(rnd.reported)
        if ended is None:
            core._end_if_budget_spent()
        return core

    def _counted_parts(self, parts: int | None) -> int:
        """What an accepted update counts for against K (revision 2.12): a partial its
        ``parts``, a device's update 1; under differential privacy every update 1 (its
        fixed divisor ``D`` = K counts contributions, each clipped to ``C``)."""
        return 1 if parts is None or self.config.privacy is not None else parts

    def _stored_parts(self, entry: Pending) -> int:
        """``_counted_parts`` of a stored accepted update."""
        if not entry.device_id.startswith(REGION_AGGREGATOR_PREFIX):
            return 1
        assert self._limits.decode is not None
        update = Update.read(entry.payload,
                             replace(self._limits.decode, max_unknown_bytes=None))
        return self._counted_parts(update.parts)

    def _decode_stored(self, entry: Pending) -> dict[str, np.ndarray]:
        """An accepted update's delta, decoded again from its stored payload (without the
        unknown-bytes budget: an update accepted before it existed stays readable)."""
        assert self._limits.decode is not None
        update = Update.read(
            entry.payload, replace(self._limits.decode, max_unknown_bytes=None)
        )
        return decode_update_delta(
            update.delta, update.compression, expected_shapes=self._shapes
        )

    # -- read-only views -------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The current global version."""
        return self._version

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current global model (a new dict of read-only arrays, never mutated later)."""
        return dict(self._state)

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters."""
        return dict(self._counters)

    @property
    def devices(self) -> dict[str, str]:
        """Presence: device id -> last reported state (cleared devices are absent)."""
        return dict(self._devices)

    def online_devices(self) -> set[str]:
        """Devices whose last state is online, training or idle."""
        return set(self._online)

    def online_count(self) -> int:
        """How many devices are online (``len(online_devices())`` without the copy)."""
        return len(self._online)

    def contributing_count(self) -> int:
        """How many devices contribute (``len(contributing_devices())``, without building
        the set: per update, with thousands of devices)."""
        return len(self._online) - len(self._aside & self._online)

    def contributing_devices(self) -> set[str]:
        """Online devices, except those whose status reports that they cannot take part in
        the task (an error of kind data or model): the ones a step or a round counts on."""
        return self.online_devices() - self._aside

    @property
    def ended(self) -> str | None:
        """Why the run ended, or None while it goes on."""
        return self._ended

    @property
    def paused(self) -> str | None:
        """The reason the run is paused, or None while it goes on."""
        return self._paused

    @property
    def delta_check(self) -> tuple[dict[str, tuple[int, ...]], ValidationLimits]:
        """The shapes and limits an update's delta is checked against (steps 11 to 15 of
        ``validate_update``: what an ingest worker needs to check it ahead)."""
        return dict(self._shapes), self._limits

    @property
    def buffered(self) -> int:
        """Accepted updates waiting to be applied (FedBuff buffer or open FedAvg round)."""
        return len(self._round.reported) if self._round is not None else len(self._buffer_ids)

    def drain_journal(self) -> list[Record]:
        """The records of every input since the last call, for the store, in order."""
        if self._invitations is not None and self._invitations.changes:
            changes = self._invitations.drain_changes()
            ids = self._invitations.ids
            self._journal.append(InvitationsChanged(
                tuple(changes.items()),
                tuple((d, ids[d]) for d, opened in changes.items() if opened and d in ids)))
        records, self._journal = self._journal, []
        return records

    # -- inputs ----------------------------------------------------------------------------

    def on_update(
        self, topic_device: str, payload: bytes, now: float, *, retained: bool = False,
        prechecked: DeltaChecked | None = None,
    ) -> list[Action]:
        """An update payload arrived on ``topic_device``'s update topic (``retained``: the
        message carried the retain flag). ``prechecked``: its delta already decoded and
        checked by an ingest worker (``coordinator.validation.check_delta``)."""
        self.last_judged = None
        self._tick_clock(now)
        if self.config.fleet_scaling:
            self._follow_fleet()
        # revision 2.11: a regional aggregator's partial update, one weighted contribution
        partial = topic_device.startswith(REGION_AGGREGATOR_PREFIX)
        result = validate_update(
            payload,
            topic_device=topic_device,
            run_id=self.task.run_id,
            task_id=self.task.task_id,
            expected_shapes=self._shapes,
            current_version=self._version,
            limits=self._limits,
            ledger=self._ledger,
            retained=retained,
            signature_check=self.update_signatures,
            partial=partial,
            prechecked=prechecked,
        )
        if isinstance(result, Repeated):
            self.last_judged = Judged(topic_device, "repeated", result.verdict.reason,
                                      result.size, result.verdict.staleness)
            return self._repeat(topic_device, result.verdict)
        self._counters["updates_received"] += 1
        self._counters["bytes_received"] += result.size
        invited = self._invitations is None or self._invitations.consume(topic_device)
        actions = self._judge(topic_device, result, now, invited)
        return actions + self._invite(now)

    def _judge(self, topic_device: str, result: Accepted | Rejected, now: float,
               invited: bool) -> list[Action]:
        if isinstance(result, Rejected):
            return self._reject(
                topic_device, result.reason, result.detail, result.update_id,
                base_version=result.base_version, digest=result.digest, size=result.size,
            )
        limit = self._invitations
        if not invited and limit is not None and self.contributing_count() > limit.concurrency:
            # a fleet within the limit is invited whole: an update without an invitation
            # (an agent older than revision 2.10) is what an invitation would have allowed
            return self._reject(
                topic_device, "not_selected",
                f"this run trains by invitation (at most {limit.concurrency} "
                "devices at a time) and the device held none",
                result.update.update_id, base_version=result.update.base_version,
                digest=result.digest, size=result.size,
            )
        if self._ended is not None:
            return self._reject(
                topic_device, "run_ended", f"the run has ended: {self._ended}",
                result.update.update_id, base_version=result.update.base_version,
                digest=result.digest, size=result.size,
            )
        decision = decide_norm(self._norm_rule, result.norm, self._norms, self._model_norm)
        if decision.action == "reject":
            assert decision.reject_bound is not None
            return self._reject(
                topic_device, "norm",
                f"L2 norm {result.norm:.6g} exceeds the adaptive bound "
                f"{decision.reject_bound:.4g} ({self._norm_rule.reject:g} x the clip bound, "
                f"{decision.basis})",
                result.update.update_id, base_version=result.update.base_version,
                digest=result.digest, size=result.size,
            )
        if self._round is not None:
            return self._accept_in_round(topic_device, result, now, decision)
        over = self._region_quota_problem(topic_device, result.update)
        if over is not None:
            return self._reject(
                topic_device, "region_quota", over, result.update.update_id,
                base_version=result.update.base_version, digest=result.digest,
                size=result.size,
            )
        return self._accept_buffered(topic_device, result, now, decision)

    def region_quota(self) -> int:
        """Revision 2.12: the most device updates one region's partials may fold on one
        base version: the devices counted online (each trains at most once per version),
        at least K."""
        return max(self.config.effective_buffer_size, self.contributing_count())

    def _region_quota_problem(self, device_id: str, update: Update) -> str | None:
        """Why a partial would take its region past the quota of one base version (None:
        it does not, or ``update`` is a device's own)."""
        if update.parts is None:
            return None
        oldest = self._version - self._limits.max_staleness
        for key in [k for k in self._region_parts if k[1] < oldest]:
            del self._region_parts[key]
        had = self._region_parts.get((device_id, update.base_version), 0)
        quota = self.region_quota()
        if had + update.parts <= quota:
            return None
        return (f"{device_id}'s partials on base version {update.base_version} would fold "
                f"{had + update.parts} device updates, more than the {quota} a region may "
                "send on one version (the devices online, at least K)")

    def on_status(self, device_id: str, payload: bytes, now: float) -> list[Action]:
        """A (retained) status payload arrived for ``device_id``; empty means cleared."""
        self._tick_clock(now)
        self._counters["status_received"] += 1
        if not (isinstance(device_id, str) and DEVICE_ID_PATTERN.match(device_id)):
            return self._bad_status(device_id, "invalid device id")
        state: str | None
        aware, known = False, None  # revision 2.13: the invitation its status names
        if len(payload) == 0:
            state = None
        else:
            try:
                status = Status.read(payload, STATUS_LIMITS)
            except ProtocolError as exc:
                return self._bad_status(device_id, f"{exc.reason}: {exc.detail}")
            except Exception as exc:  # hostile input never escapes
                return self._bad_status(device_id, f"{type(exc).__name__}: {exc}")
            if status.device_id != device_id:
                return self._bad_status(device_id, f"status names device {status.device_id!r}")
            state = status.state
            aware, known = status.invite_aware, status.invite
            if status.error is not None and status.error_kind in ASIDE_ERROR_KINDS:
                self._aside.add(device_id)
            else:
                self._aside.discard(device_id)
        if state is None:
            self._devices.pop(device_id, None)
            self._aside.discard(device_id)
            self._online.discard(device_id)
        else:
            self._devices[device_id] = state
            if state in ONLINE_STATES:
                self._online.add(device_id)
            else:
                self._online.discard(device_id)
        contributes = state in ONLINE_STATES and device_id not in self._aside
        if self._invitations is not None:
            self._invitations.on_presence(device_id, contributes, state == "training", now)
            # an invitation opened by this very status is not sent twice: resend first
            invites = self._resend(device_id, state, aware, known, now) + self._invite(now)
            if invites:
                return invites + self._on_presence_change(device_id, state, contributes, now)
        return self._on_presence_change(device_id, state, contributes, now)

    def _on_presence_change(self, device_id: str, state: str | None, contributes: bool,
                            now: float) -> list[Action]:
        if self._round is None:
            if contributes or not self._buffer_ids:
                return []
            if sum(self._buffer_parts) >= self._buffer_target():
                _log.info(
                    "device %s %s: applying the buffer of %d update(s) now", device_id,
                    "cannot take part" if state in ONLINE_STATES else "went offline",
                    len(self._buffer_ids),
                )
                return self._apply_buffer()
            return []
        if contributes:
            self._round_device_online(device_id, now)
            return []
        return self._round_device_offline(device_id, now)

    def tick(self, now: float) -> list[Action]:
        """Time passes: applies a FedBuff buffer past its timeout; closes or restarts a
        FedAvg round whose deadline has passed. Nothing while the run is paused: a buffer
        or a round that became due is applied when it resumes."""
        self._tick_clock(now)
        if self._paused is not None:
            return []
        actions: list[Action] = []
        if self._invitations is not None:
            expired = self._invitations.expire(now)
            if expired:
                self._counters["invitations_expired"] += len(expired)
                _log.info("%d invitation(s) unused after %.0f s: their slots go to others",
                          len(expired), self._invitations.timeout)
            actions = self._invite(now)
            if self._ended is None:  # (not while paused: returned above)
                actions += self._send_again(self._invitations.resends_due(now))
        return actions + self._tick_aggregation(now)

    def _resend(self, device_id: str, state: str | None, aware: bool, known: str | None,
                now: float) -> list[Action]:
        """Revision 2.13: the open invitation of a device whose status says it does not know
        it (it restarted before using it), sent again with its id (``Invitations.resend``:
        or at a later tick, if it was sent within the grace); not once the run has ended or
        while it is paused."""
        if self._invitations is None or self._ended is not None or self._paused is not None:
            return []
        again = self._invitations.resend(device_id, state, aware, known, now)
        return [] if again is None else self._send_again([(device_id, again)])

    def _send_again(self, lost: list[tuple[str, str]]) -> list[Action]:
        self._counters["invitations_resent"] += len(lost)
        for device_id, invite_id in lost:
            _log.info("device %s does not know its invitation %s (restarted?): sending it "
                      "again", device_id, invite_id)
        return [SendInvite(device_id, self._version, invite_id) for device_id, invite_id in lost]

    def _invite(self, now: float) -> list[Action]:
        """Invitations for the free slots (revision 2.10), none once the run has ended or
        while it is paused."""
        if self._invitations is None or self._ended is not None or self._paused is not None:
            return []
        chosen = self._invitations.invite(now)
        self._counters["invitations_sent"] += len(chosen)
        return [SendInvite(device, self._version, self._invitations.id_of(device))
                for device in chosen]

    def _tick_aggregation(self, now: float) -> list[Action]:
        timeout = self.config.buffer_timeout
        since = self._buffer_since
        if self._buffer_ids and since is not None and timeout > 0 and now >= since + timeout:
            self._counters["buffer_timeouts"] += 1
            _log.info(
                "applying %d buffered update(s) after %.0f s without reaching K=%d",
                len(self._buffer_ids), now - since, self.config.effective_buffer_size,
            )
            return self._apply_buffer()
        if self.config.adaptive_k and self._buffer_ids and self._step_ready(
                self._buffer_target()):
            # K went down with time: a device counted as fast has taken too long since
            return self._apply_buffer()
        rnd = self._round
        if rnd is None or rnd.started_at is None:
            return []
        if now < rnd.started_at + self.config.round_deadline:
            return []
        if len(rnd.reported) >= self.config.min_round_updates:
            _log.info(
                "round %d closes at its deadline with %d of %d devices",
                rnd.number,
                len(rnd.reported),
                len(rnd.participants),
            )
            return self._close_round(now)
        self._counters["round_restarts"] += 1
        rnd.started_at = now
        _log.warning(
            "round %d (version %d) reached its deadline with %d of %d needed updates; "
            "restarting its clock",
            rnd.number,
            rnd.version,
            len(rnd.reported),
            self.config.min_round_updates,
        )
        return []

    def flush(self, now: float) -> list[Action]:
        """Apply what waits: the FedBuff buffer however full, or a FedAvg round that has at
        least one update. Used when the run ends, so no update that got an "accepted"
        receipt is left out (a pause does not hold it back: the run ends)."""
        self._tick_clock(now)
        paused, self._paused = self._paused, None
        try:
            if self._round is not None:
                return self._close_round(now) if self._round.reported else []
            return self._apply_buffer() if self._buffer_ids else []
        finally:
            self._paused = paused

    def pause(self, reason: str) -> bool:
        """The operator pauses the run: updates are still judged and an accepted one is
        kept (buffered or in the round), but no new version is made until ``unpause``.
        False (nothing changes) if the run is paused already or has ended."""
        if self._paused is not None or self._ended is not None:
            return False
        self._paused = reason
        self._journal.append(PauseChanged(True, reason))
        return True

    def unpause(self, now: float) -> list[Action] | None:
        """The operator resumes a paused run: what became due meanwhile is applied now (a
        full buffer, a round every online participant has reported to); the buffer timeout
        and the round deadline then apply as before. None if the run was not paused (or
        has ended)."""
        self._tick_clock(now)
        if self._paused is None or self._ended is not None:
            return None
        self._paused = None
        self._journal.append(PauseChanged(False))
        rnd = self._round
        if rnd is not None:
            if rnd.reported and not rnd.waiting:
                return self._close_round(now)
            return []
        if self._buffer_ids and sum(self._buffer_parts) >= self._buffer_target():
            return self._apply_buffer()
        return []

    def end(self, reason: str) -> None:
        """The run is over: later updates are rejected as ``run_ended``."""
        if self._ended is None:
            self._ended = reason
            self._journal.append(RunEnded(reason))

    # -- outputs ---------------------------------------------------------------------------

    def model_message(self, now: float) -> GlobalModel:
        """The current global model as a ``GlobalModel`` message, in ``model_codec``
        (``now``: its ``created_at``, wall-clock seconds)."""
        tensors, compression = encode_update_delta(
            self._state, self.model_codec, rng=np.random.default_rng(self._version)
        )
        return GlobalModel(
            task_id=self.task.task_id,
            run_id=self.task.run_id,
            version=self._version,
            tensors=tensors,
            created_at=now,
            compression=compression,
        )

    def snapshot(self) -> dict[str, Any]:
        """Plain values for metrics and reports."""
        rnd = self._round
        round_info = None
        if rnd is not None:
            round_info = {
                "number": rnd.number,
                "version": rnd.version,
                "participants": len(rnd.participants),
                "reported": len(rnd.reported),
                "waiting": len(rnd.waiting),
                "started_at": rnd.started_at,
                "deadline": None
                if rnd.started_at is None
                else rnd.started_at + self.config.round_deadline,
            }
        return {
            "mode": self.config.mode,
            "aggregator": str(self.config.spec),
            "version": self._version,
            "buffered": len(self._buffer_ids),
            # --adaptive-k: the K in force now
            "buffer_size": self._buffer_target() if self.config.adaptive_k
            else self.config.effective_buffer_size,
            "devices_known": len(self._devices),
            "devices_online": self.online_count(),
            "ended": self._ended,
            "paused": self._paused,
            "counters": dict(self._counters),
            "round": round_info,
            "norm_bound": decide_norm(
                self._norm_rule, 0.0, self._norms, self._model_norm
            ).clip_bound,
        }

    # -- internals -------------------------------------------------------------------------

    def _bad_status(self, device_id: str, detail: str) -> list[Action]:
        self._counters["status_malformed"] += 1
        _log.warning("ignored status of %r: %s", device_id, detail)
        return []

    def _reject(
        self, device_id: str, reason: str, detail: str, update_id: str | None, *,
        base_version: int | None = None, digest: bytes = b"", size: int | None = None,
    ) -> list[Action]:
        self._counters["updates_rejected"] += 1
        self.last_judged = Judged(device_id, "rejected", reason, size or 0)
        key = f"rejected_{reason}"
        self._counters[key] = self._counters.get(key, 0) + 1
        _log.warning(
            "rejected update %s from %s: %s (%s)", update_id or "?", device_id, reason, detail
        )
        if update_id is None:  # nothing the device could correlate a receipt with
            return []
        receipt = Receipt(
            update_id=update_id,
            run_id=self.task.run_id,
            accepted=False,
            reason=reason,
            detail=detail,
            model_version=self._version,
        )
        if base_version is not None and reason not in _JUDGED_BEFORE_LOOKUP:
            # remembered, so a copy of this message gets this verdict again. Not remembered:
            # what is checked before the ledger is read (a copy is refused the same way
            # again anyway), and "duplicate", which must not overwrite the verdict of the
            # update whose id it reused
            self._journal.append(Verdict(
                update_id, device_id, digest, base_version, False, reason, detail,
                self._version, None, size,
            ))
        return [SendReceipt(device_id, receipt)]

    def _repeat(self, device_id: str, verdict: Verdict) -> list[Action]:
        """A copy of an update already judged: the same verdict again, nothing else."""
        self._counters["updates_repeated"] += 1
        _log.info(
            "update %s from %s arrived again: repeating its verdict (%s)", verdict.update_id,
            device_id, "accepted" if verdict.accepted else verdict.reason,
        )
        receipt = Receipt(
            update_id=verdict.update_id,
            run_id=self.task.run_id,
            accepted=verdict.accepted,
            reason=verdict.reason,
            detail=verdict.detail,
            model_version=verdict.model_version,
            staleness=verdict.staleness,
            repeat=True,
        )
        return [SendReceipt(device_id, receipt)]

    def _accept(
        self, device_id: str, acc: Accepted, detail: str, coef: float, clip: float | None
    ) -> SendReceipt:
        update = acc.update
        if clip is not None:
            detail += f"; clipped from L2 norm {acc.norm:.4g} to {clip:.4g}"
        self._norms = pushed(self._norms, acc.norm, self._norm_rule.window)
        self._journal.append(NormWindow(self._norms))
        self._counters["updates_accepted"] += 1
        self._counters["bytes_accepted"] += acc.size
        if update.parts is not None:  # a partial: the device updates it folds
            self._counters["partials_accepted"] += 1
            self._counters["partial_parts"] += update.parts
            key = (device_id, update.base_version)
            self._region_parts[key] = self._region_parts.get(key, 0) + update.parts
        self.last_judged = Judged(device_id, "accepted", None, acc.size, acc.staleness,
                                  dict(update.metrics))
        self._sent_at[update.update_id] = update.sent_at
        self._journal.append(Verdict(
            update.update_id, device_id, acc.digest, update.base_version, True, None, detail,
            self._version, acc.staleness, acc.size, update.parts,
        ))
        self._journal.append(Pending(
            update.update_id, device_id, update.base_version, update.num_samples,
            acc.staleness, coef, acc.payload,
            self._round.number if self._round is not None else None, clip,
        ))
        receipt = Receipt(
            update_id=update.update_id,
            run_id=self.task.run_id,
            accepted=True,
            reason=None,
            detail=detail,
            model_version=self._version,
            staleness=acc.staleness,
        )
        return SendReceipt(device_id, receipt)

    def _follow_fleet(self) -> None:
        """The staleness limit in force, from the devices contributing now."""
        limit = self.config.scaled(self.contributing_count()).max_staleness
        if limit != self._limits.max_staleness:
            self._limits = replace(self._limits, max_staleness=limit)

    def _buffer_target(self) -> int:
        """K, but never more than the devices known to be online: each agent trains once per
        version, so a smaller fleet could otherwise fill the buffer only through the timeout.
        With no presence known (no status messages), K as configured. ``--adaptive-k``: K
        from the contributing devices' measured periods (``coordinator.adaptive_k``), at
        most the concurrency limit (at most that many train at a time)."""
        online = self.contributing_count()
        k = self.config.scaled(online).buffer_size
        cfg = self.config
        if cfg.adaptive_k and online:
            ceiling = min(online, cfg.concurrency) if cfg.concurrency else online
            view = self._periods.view(self.contributing_devices(), self._clock or 0.0,
                                      self._version, self._made_at, self._started_at or 0.0)
            k = adaptive_k(view, cfg.buffer_size, ceiling)
        if online:
            return min(k, online)
        # every known device is offline: nothing more will come, apply what is there;
        # with no presence known at all (no status messages), K as configured
        return 1 if self._devices else k

    def _tick_clock(self, now: float) -> None:
        self._clock = now
        if self._started_at is None:
            self._started_at = now
            self._made_at.setdefault(self._version, now)

    def _observe_period(self, device_id: str, now: float, base_version: int) -> None:
        """``--adaptive-k``: an accepted update's training time, from the coordinator's own
        times (its arrival, the device's previous one, when its base version was made)."""
        window = self._periods.observe(device_id, now, base_version,
                                       self._made_at.get(base_version))
        if window is not None:
            self._journal.append(PeriodWindow(device_id, window))

    def _accept_buffered(
        self, device_id: str, acc: Accepted, now: float, decision: NormDecision
    ) -> list[Action]:
        if self.config.adaptive_k:
            self._observe_period(device_id, now, acc.update.base_version)
        k = self._buffer_target()
        cfg = self.config
        if not self._buffer_ids:
            self._buffer_since = now
        kind = cfg.staleness
        if cfg.fleet_scaling:  # a large fleet's weight (coordinator.fleet_scale)
            kind = cfg.scaled(self.contributing_count()).weight or kind
        weight = staleness_weight(acc.staleness, kind, a=cfg.staleness_a, b=cfg.staleness_b)
        n = acc.update.num_samples
        if cfg.privacy is not None and device_id in self._buffer_devices:
            return self._reject(
                device_id, "duplicate_in_round", "the device already has an update in this "
                "step (differential privacy: one update per device per step)",
                acc.update.update_id, base_version=acc.update.base_version, digest=acc.digest,
            )
        # the mean weighs by n x staleness in its running sum; kept deltas are scaled by
        # their staleness weight alone (a robust aggregator counts each once, a capped mean
        # weighs them by their capped n when the step is made), and so is every update under
        # differential privacy (its n is ignored: coordinator.privacy)
        coef = weight if self._kept is not None or cfg.privacy is not None else n * weight
        clip = _clip_bound(decision)
        self._buffer_add(self._prepared(acc.delta, clip), n, coef, acc.update.update_id,
                         device_id, self._counted_parts(acc.update.parts))
        count = sum(self._buffer_parts)
        actions: list[Action] = [
            self._accept(device_id, acc, f"buffered {count}/{k}", coef, clip)
        ]
        if self._step_ready(k):
            actions.extend(self._apply_buffer())
        return actions

    def _step_ready(self, k: int) -> bool:
        """The buffer holds ``k`` updates (``quorum``: ``k`` that agree, or its limit), a
        partial counting as the device updates it folds (revision 2.12)."""
        if sum(self._buffer_parts) < k:
            return False
        if self._kept is None:
            return True
        online = self.contributing_count()
        if self.config.adaptive_k:  # quorum waits for no device slower than the K counted fast
            online = quorum_devices(k, online)
        # the buffer only grows between steps and update ids are unique, so its first id
        # and length name its contents: a check that found the same buffer, K and online
        # count not ready (--adaptive-k re-checks at every tick) is not worked out again
        key = (self._buffer_ids[0] if self._buffer_ids else "", len(self._buffer_ids), k, online)
        if key == self._not_ready:
            return False
        ready, step = quorum_readiness(self.config.spec, self._kept, k, online,
                                       self._buffer_parts, self._kept_n)
        self._agreed = None if step is None else (self._kept, len(self._kept), step.aggregate)
        self._not_ready = None if ready else key
        return ready

    def _prepared(
        self, delta: Mapping[str, np.ndarray], clip: float | None, *, count: bool = True
    ) -> State:
        """``delta`` scaled down to the DP clip bound under differential privacy, to the
        aggregator's fixed clip bound (``+clip:B``) if it has one, then to the adaptive bound
        ``clip`` it was given when accepted (never under DP, which switches the adaptive
        bound off): the same operations, in the same order, when a stored update is put
        back on resume."""
        out = dict(delta)
        scaled = False
        privacy = self.config.privacy
        if privacy is not None:
            out, scaled = clip_update(out, privacy.clip)
        for bound in (self.config.spec.clip, clip):
            if bound is not None:
                out, scale = clip_norm(out, bound)
                scaled = scaled or scale < 1.0
        if count and scaled:
            self._counters["updates_clipped"] += 1
        return out

    def _buffer_add(
        self, delta: Mapping[str, np.ndarray], num_samples: int, coef: float, update_id: str,
        device_id: str, parts: int = 1,
    ) -> None:
        """Into the running sum (the mean: ``coef = n · w(s)``) or kept as ``coef · delta``
        (``coef = w(s)``), one float32 model copy per update."""
        if self._kept is None:
            self._buffer.add(delta, num_samples=num_samples, coef=coef)
        else:
            c = np.float32(coef)
            self._kept.append({name: np.multiply(delta[name], c) for name in self._shapes})
            self._kept_n.append(num_samples)
        self._buffer_ids.append(update_id)
        self._buffer_parts.append(parts)
        self._buffer_devices.add(device_id)

    def _apply_buffer(self) -> list[Action]:
        if not self._may_step():
            return []
        count = len(self._buffer_ids)
        ids, self._buffer_ids = tuple(self._buffer_ids), []
        self._buffer_parts = []
        self._buffer_since = None
        self._buffer_devices.clear()
        cfg = self.config
        kept, self._kept = self._kept, (None if self._kept is None else [])
        claims, self._kept_n = self._kept_n, []
        try:
            if cfg.privacy is not None:
                new_state, velocity = self._server_update(
                    self._privatized(self._buffer.total()))
            elif kept is None and cfg.server_optimizer == "sgd":
                new_state, velocity = fedbuff_apply(
                    self._state,
                    self._buffer,
                    server_lr=cfg.server_lr,
                    momentum=cfg.server_momentum,
                    velocity=self._velocity,
                )
            elif kept is None:
                new_state, velocity = self._server_update(self._buffer.mean())
            else:
                agreed = self._agreed_step(kept)
                aggregate = (
                    agreed if agreed is not None
                    else self._robust(kept, f"the buffer at version {self._version}", claims)
                    if cfg.spec.robust else capped_mean(cfg.spec, kept, claims)
                )
                new_state, velocity = self._server_update(aggregate)
        except AggregationError as exc:
            self._counters["aggregation_failed"] += 1
            self._journal.append(BufferDropped(ids, str(exc)))
            for uid in ids:
                self._sent_at.pop(uid, None)
            _log.error(
                "dropped a buffer of %d updates at version %d: %s", count, self._version, exc
            )
            return []
        finally:
            self._buffer.clear()
        if cfg.keeps_server_state:
            self._velocity = _frozen(velocity, copy=False)
        return [self._publish(new_state, f"{cfg.mode}: {count} update(s)", ids)]

    def _agreed_step(self, kept: list[State]) -> State | None:
        """The step the readiness check worked out from exactly ``kept`` (the same list, not
        grown since), else None; forgotten either way."""
        agreed, self._agreed = self._agreed, None
        if agreed is None or agreed[0] is not kept or agreed[1] != len(kept):
            return None
        return agreed[2]

    @staticmethod
    def _fits_server_state(state: Mapping[str, np.ndarray],
                           velocity: Mapping[str, np.ndarray]) -> bool:
        """A stored velocity (sgd: the model's names) or moments (adam, yogi) of this model;
        whichever optimizer the run now uses decides whether it is used (see __init__)."""
        if fits_moments(state, velocity):
            return True
        return set(velocity) == set(state) and all(
            np.shape(velocity[n]) == np.shape(a) for n, a in state.items())

    def _server_update(self, aggregate: Mapping[str, np.ndarray]) -> tuple[State, State]:
        """The server optimizer's step from a step's ``aggregate``: ``(new_state, its new
        velocity or moments)``; ``AggregationError`` if the model would not be finite."""
        cfg = self.config
        if cfg.server_optimizer == "sgd":
            velocity = self._velocity
            if velocity is not None and fits_moments(self._state, velocity):
                velocity = None
            return server_step(self._state, aggregate, server_lr=cfg.server_lr,
                               momentum=cfg.server_momentum, velocity=velocity)
        moments = self._velocity
        if moments is not None and not fits_moments(self._state, moments):
            moments = None  # a momentum velocity of an earlier sgd run: start afresh
        new_state, new_moments = adaptive_step(
            self._state, aggregate, kind=cfg.server_optimizer, server_lr=cfg.server_lr,
            beta1=cfg.server_beta1, beta2=cfg.server_beta2, tau=cfg.server_tau,
            moments=moments)
        if not (is_finite(new_moments) and is_finite(new_state)):
            raise AggregationError(
                f"{cfg.server_optimizer} step produced a non-finite model; model kept")
        return new_state, new_moments

    def _privatized(self, total: Mapping[str, np.ndarray]) -> State:
        """The DP step's aggregate from the sum of its weighted, clipped updates: divided by
        the fixed ``D``, plus the noise of the version it makes (coordinator.privacy)."""
        privacy = self.config.privacy
        assert privacy is not None and self._noise_secret is not None
        return privatize(
            total, divisor=self.config.dp_divisor, clip=privacy.clip, noise=privacy.noise,
            rng=noise_generator(self._noise_secret, self._version + 1),
        )

    def _may_step(self) -> bool:
        """False while the run is paused, and once the epsilon budget allows no further
        step: what waits stays unapplied."""
        if self._paused is not None:
            return False
        if self._max_steps is None or self._version < self._max_steps:
            return True
        waiting = self.buffered
        if waiting:
            _log.warning(
                "%d accepted update(s) not applied: the privacy budget allows no step past "
                "version %d", waiting, self._max_steps,
            )
        return False

    def _end_if_budget_spent(self) -> None:
        privacy = self.config.privacy
        if privacy is None or self._max_steps is None or self._version < self._max_steps:
            return
        epsilon = epsilon_spent(privacy.noise, self._version, privacy.delta)
        reason = (
            f"privacy budget spent: epsilon {epsilon:.3g} at delta {privacy.delta:g} after "
            f"{self._version} steps (budget {privacy.epsilon_budget:g})"
        )
        _log.warning("the run ends: %s", reason)
        self.end(reason)

    def _robust(self, deltas: Sequence[Mapping[str, np.ndarray]], what: str,
                claims: Sequence[int]) -> State:
        spec = self.config.spec
        aggregate, fell_back = robust_aggregate(spec, deltas, claims)
        if fell_back:
            self._counters["robust_fallbacks"] += 1
            _log.warning(
                "%s holds %d update(s), fewer than %s needs (%d): used their coordinate-wise "
                "median", what, len(deltas), spec, spec.min_updates,
            )
        return aggregate

    def _publish(
        self, new_state: Mapping[str, np.ndarray], reason: str, applied: tuple[str, ...]
    ) -> NewModel:
        self._state = _frozen(new_state, copy=False)  # fresh arrays from aggregation
        self._model_norm = l2_norm(self._state)
        self._version += 1
        if self.config.adaptive_k and self._clock is not None:
            self._made_at[self._version] = self._clock
            self._made_at.pop(self._version - MADE_AT_KEPT, None)
        self._counters["models_published"] += 1
        self._journal.append(VersionMade(
            self._version, dict(self._state),
            None if self._velocity is None else dict(self._velocity), applied, reason,
        ))
        self._end_if_budget_spent()
        sent_at = tuple(self._sent_at.pop(uid) for uid in applied if uid in self._sent_at)
        return NewModel(self._version, reason, sent_at)

    # FedAvg rounds

    def _accept_in_round(
        self, device_id: str, acc: Accepted, now: float, decision: NormDecision
    ) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        update = acc.update
        if device_id not in rnd.participants:
            return self._reject(
                device_id, "not_selected", f"device is not part of round {rnd.number}",
                update.update_id, base_version=update.base_version, digest=acc.digest,
            )
        if device_id in rnd.reported:
            return self._reject(
                device_id, "duplicate_in_round", f"device already reported in round {rnd.number}",
                update.update_id, base_version=update.base_version, digest=acc.digest,
            )
        if rnd.is_open:  # its first update fixes the round's participants
            self._journal.append(
                RoundFixed(rnd.number, rnd.version, tuple(sorted(rnd.participants)))
            )
        clip = _clip_bound(decision)
        rnd.reported[device_id] = (
            self._prepared(acc.delta, clip), update.num_samples, update.update_id
        )
        rnd.waiting.discard(device_id)
        if rnd.started_at is None:
            rnd.started_at = now
        actions: list[Action] = [
            self._accept(
                device_id,
                acc,
                f"round {rnd.number}: {len(rnd.reported)}/{len(rnd.participants)} reported",
                float(update.num_samples), clip,
            )
        ]
        if not rnd.waiting:
            actions.extend(self._close_round(now))
        return actions

    def _round_device_online(self, device_id: str, now: float) -> None:
        rnd = self._round
        assert rnd is not None
        if rnd.is_open:
            rnd.participants.add(device_id)
            rnd.waiting.add(device_id)
            if rnd.started_at is None:
                rnd.started_at = now
        elif device_id in rnd.participants and device_id not in rnd.reported:
            rnd.waiting.add(device_id)  # came back during its round: wait for it again

    def _round_device_offline(self, device_id: str, now: float) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        rnd.waiting.discard(device_id)
        if rnd.is_open:
            rnd.participants.discard(device_id)
            if not rnd.participants:
                rnd.started_at = None
            return []
        if not rnd.waiting:
            return self._close_round(now)
        return []

    def _close_round(self, now: float) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        deltas = [delta for delta, _, _ in rnd.reported.values()]
        samples = [n for _, n, _ in rnd.reported.values()]
        ids = tuple(uid for _, _, uid in rnd.reported.values())
        actions: list[Action] = []
        if not self._may_step():
            return actions
        try:
            spec = self.config.spec
            if self.config.privacy is not None:
                total = WeightedSum(self._shapes)  # FedAvg: no staleness, each counts once
                for delta, n in zip(deltas, samples, strict=True):
                    total.add(delta, num_samples=n, coef=1.0)
                new_state = apply_step(
                    self._state, self._privatized(total.total()),
                    server_lr=self.config.server_lr,
                )
            elif spec.keeps_deltas:
                aggregate = (
                    self._robust(deltas, f"round {rnd.number}", samples)
                    if spec.robust else capped_mean(spec, deltas, samples)
                )
                new_state = apply_step(self._state, aggregate, server_lr=self.config.server_lr)
            else:
                new_state = fedavg_step(
                    self._state, deltas, samples, server_lr=self.config.server_lr
                )
        except AggregationError as exc:
            self._counters["aggregation_failed"] += 1
            self._journal.append(BufferDropped(ids, str(exc)))
            for uid in ids:
                self._sent_at.pop(uid, None)
            _log.error(
                "dropped round %d (%d updates) at version %d: %s",
                rnd.number,
                len(deltas),
                self._version,
                exc,
            )
        else:
            actions.append(self._publish(
                new_state, f"fedavg: round {rnd.number}, {len(deltas)} update(s)", ids
            ))
        online = self.contributing_devices()
        self._round = _Round(
            number=rnd.number + 1,
            version=self._version,
            started_at=now if online else None,
            participants=set(online),
            waiting=set(online),
        )
        return actions
