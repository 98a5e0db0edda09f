"""K that follows the fleet's measured speeds (``--adaptive-k``, issue 10). Pure: no clock.

No fixed K suits every fleet (BENCHMARKS.md, "What limits time to accuracy"): with K the whole
fleet, FedBuff makes exactly synchronous rounds, as fast as FedAvg under equal speeds but
held to the slowest device under 1:2:4; with K = 4 of 10 it is 2.4x faster under 1:2:4 and
0.71x under equal speeds (its updates are stale for nothing). The rule here: **K = the number
of devices about as fast as the fastest**, so a fleet of equal devices steps with all of
them, and a mixed one with its fast group, the slower ones adding stale-weighted updates.

What is measured, only what the coordinator itself sees (never a time a message claims):
the time an accepted update of a device arrived, and the time the coordinator made the
version it is based on. An agent trains once per version, on the newest, starting when it
has both its previous update sent and a newer version, so one update's training took about

    sample = arrived - max(previous accepted arrival of the device, base version made at)

(``period_sample``; a device's first update is timed from its base version alone). Not the
interval between arrivals: with K = the fleet, every device waits for the slowest and all
intervals look equal, and K would never leave the fleet. A device's period is the median of
its last ``WINDOW`` samples (``DevicePeriods``). The core re-checks K at every accepted
update and every tick: a device counted as fast that has been busy for longer than that
leaves the fast group, so K goes down while it is late.

``adaptive_k``: the reference is the ``floor``-th fastest period (``floor``: the configured
``--buffer-size``), K the number of devices within ``FAST_FACTOR`` of it, never below
``floor`` nor above ``ceiling`` (the devices contributing). Fewer than ``floor`` periods
known (a run's first updates): ``floor``.

How a hostile device could game it, and the bound: it controls only when its own updates
arrive (one accepted update per device per base version) and which base version it names.
Arriving late, or naming an old base, makes it look slow: it leaves the fast group, K goes
down by one, never below ``floor``. Sending an update at once after each version makes it
look fastest: it joins the fast group, K goes up by one. Because the reference is the
``floor``-th fastest, not the fastest, fewer than ``floor`` such devices cannot pull the
reference below the honest fast group, so ``m`` colluding devices move K by at most ``m``,
within [``floor``, ``ceiling``]. K only paces the steps: every update is still judged, and
weighed, clipped and aggregated as with a fixed K.

With ``quorum`` (``coordinator.aggregator_spec``), a full buffer waits for more updates until
K of them agree, up to a limit worked out from the devices online (``buffer_limit``). Under
adaptive K the devices expected before the next fast period are the K counted fast, so
``quorum_devices`` makes that limit K itself: the step is made of the updates among those K
that agree, as ``agree`` would, instead of waiting for a device known to be slower. Measured
(BENCHMARKS.md, "What limits time to accuracy"): with the limit counted on every device
online, a long tail's buffer of the 9 fast updates, not all agreeing, waited for the
straggler's, and 0.93 held later than with K = 4. The price (BENCHMARKS.md, "Poisoning under
adaptive K"): with K at its floor and two hostile devices of ten first in every step of five,
MNIST lost 3.2 points to inflated claims and 6.1 to label flipping, against 0.4 and 2.7 with a
fixed K that waits; with K free to rise (the hostile devices, being fastest, raise it) at most
1.0.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["FAST_FACTOR", "WINDOW", "DevicePeriods", "adaptive_k", "period_sample",
           "quorum_devices"]

# "about as fast as the fastest": within 1.5x, so devices 2x slower (1:2:4) fall outside
# with room for the jitter of real arrival times
FAST_FACTOR = 1.5
# samples kept per device; its period is their median (one odd sample does not move it)
WINDOW = 5


def period_sample(arrived: float, previous: float | None, base_made: float | None
                  ) -> float | None:
    """How long one update's training took, from the coordinator's own times: its arrival,
    the device's previous accepted arrival (None: its first update, timed from its base),
    and when its base version was made. None when that is unknown (a base made before a
    restart). A device that started late looks slower than it is, never faster."""
    if base_made is None:
        return None
    sample = arrived - (base_made if previous is None else max(previous, base_made))
    return sample if sample >= 0 else None


def adaptive_k(devices: Iterable[tuple[float | None, float]], floor: int, ceiling: int,
               factor: float = FAST_FACTOR) -> int:
    """K for ``devices``, each ``(period, busy)``: its measured period (None if unknown) and
    how long its current update has been under way (0 if it waits for a new version). The
    reference is the ``floor``-th fastest known period; K the number of devices within
    ``factor`` of it (a known one by the larger of its period and ``busy``, an unknown one
    by ``busy``, so a device not yet measured counts until it has taken too long), bounded
    by ``floor`` and ``ceiling`` (``ceiling`` wins; at least 1). Fewer than ``floor`` known
    periods: ``floor``. ``ValueError`` for bounds below 1 or a factor below 1."""
    if floor < 1 or ceiling < 1:
        raise ValueError(f"floor and ceiling must be >= 1, got {floor} and {ceiling}")
    if not factor >= 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    listed = list(devices)
    known = sorted(p for p, _ in listed if p is not None)
    if len(known) < floor:
        return min(floor, ceiling)
    bound = factor * known[floor - 1]
    fast = sum(1 for p, busy in listed if max(busy, p or 0.0) <= bound)
    return min(max(floor, fast), ceiling)


def quorum_devices(k: int, online: int) -> int:
    """The device count a ``quorum`` buffer of adaptive target ``k`` works its limit out
    from (``aggregator_spec.buffer_limit``): ``k``, the devices expected within the fast
    period, never more than ``online`` when that is known (> 0). So the limit is ``k``: a
    full buffer is stepped with those of its updates that agree."""
    if k < 1 or online < 0:
        raise ValueError(f"need k >= 1 and online >= 0, got k={k}, online={online}")
    return min(k, online) if online else k


@dataclass
class DevicePeriods:
    """Each device's last ``WINDOW`` period samples (a resumed core gets them back) and the
    arrival of its last accepted update (this process's clock only: not kept across a
    restart, so the first update after one gives no sample)."""

    samples: dict[str, tuple[float, ...]] = field(default_factory=dict)
    last_arrival: dict[str, float] = field(default_factory=dict)
    last_base: dict[str, int] = field(default_factory=dict)  # base of its last update

    def observe(self, device: str, arrived: float, base: int, base_made: float | None
                ) -> tuple[float, ...] | None:
        """An accepted update of ``device``, based on version ``base`` (made at
        ``base_made``), arrived; its new window if it gave a sample."""
        sample = period_sample(arrived, self.last_arrival.get(device), base_made)
        self.last_arrival[device] = arrived
        self.last_base[device] = base
        if sample is None:
            return None
        window = (*self.samples.get(device, ()), sample)[-WINDOW:]
        self.samples[device] = window
        return window

    def period(self, device: str) -> float | None:
        """The device's period: the median of its samples, None if it has none."""
        window = self.samples.get(device)
        return statistics.median(window) if window else None

    def busy(self, device: str, now: float, version: int, made: Mapping[int, float],
             started: float) -> float:
        """How long ``device``'s current update has been under way at ``now``, the newest
        version being ``version``: 0 if it waits (its last update was based on the newest),
        else since it could start (its last arrival, or the making of the first version
        newer than its base, whichever came later); a device not heard from yet, since
        ``started`` (when this process began to count)."""
        arrived = self.last_arrival.get(device)
        if arrived is None:
            return max(0.0, now - started)
        base = self.last_base[device]
        if base >= version:
            return 0.0
        return max(0.0, now - max(arrived, made.get(base + 1, arrived)))

    def view(self, devices: Iterable[str], now: float, version: int,
             made: Mapping[int, float], started: float) -> list[tuple[float | None, float]]:
        """``adaptive_k``'s input for ``devices``."""
        return [(self.period(d), self.busy(d, now, version, made, started)) for d in devices]

    @classmethod
    def restored(cls, samples: Mapping[str, Iterable[float]]) -> DevicePeriods:
        return cls({d: tuple(float(v) for v in s)[-WINDOW:] for d, s in samples.items() if s})
