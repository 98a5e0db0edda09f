"""Buffer size and staleness limit that follow the fleet (issue 10).

With ``N`` devices contributing, each training once per period, and a step every ``K``
updates, the fleet makes about ``N / K`` versions while one device trains: an update is
about ``N / K`` versions old when it arrives, however fresh its device, and the slowest
device of a 1:4 fleet about twice that. A fixed ``K`` makes that age grow as ``N`` and a
fixed staleness limit shuts a large fleet's slow devices out. Fleet scaling
(``--fleet-scaling``) follows the fleet instead:

- ``K = max(K₀, ⌈√N⌉)`` (``K₀``: ``--buffer-size``), so steps and staleness both grow as
  ``√N`` rather than one of them as ``N``;
- the limit ``max(L₀, ⌈4N / K⌉)`` (``L₀``: ``--max-staleness``): twice the age of the
  slowest device of a 1:4 fleet, never above ``STALENESS_CAP``, the bound the task
  announces.

- once the fleet needs a larger buffer than the floor (``K > K₀``), the staleness weight
  ``sqrt``, ``1/√(1+s)``, instead of the configured one. The default ``1/(1+s)`` was chosen on
  8-10 devices, where updates are a few versions old; in a large fleet every update is about
  ``N / K`` versions old, and ``1/(1+s)`` shrinks every step with it. Measured with the fleet
  benchmark (one run each, 2026-12-03): held-out accuracy after about 1,200 applied updates
  0.858 against 0.733 at 100 devices and 0.694 against 0.448 at 1,000.

Under a concurrency limit (protocol revision 2.10, ``coordinator.invitations``: at most ``C``
devices train at a time) the devices training are bounded, and K also keeps an update's age
at about ``STALENESS_TARGET`` versions: ``K = max(K₀, ⌈√N⌉, ⌈N / STALENESS_TARGET⌉)`` with
``N ≤ C`` (15 for 100). Why: with ``K = √C = 10`` every update is about 10 versions old on
average, and a step from updates that old sits at the edge of the delay's instability, so the
mix of the fleet's speeds decided how well it learned. Within the limit the fast devices train
most often (most updates about 5 versions old); beyond it every device gets the same turn (a
third of the updates about 15 versions old); with equal speeds every update is about 10 old.
Measured in virtual time (``bench.fleet_virtual``, 6 seeds, held-out accuracy after about
1,200 applied updates, 2026-12-03): K = 10 gave 0.873 at 100 devices against 0.829 at 5,000,
and 0.53 and 0.24 with equal speeds; K = 15 gave 0.874 and 0.874; K = 20 (about 4.5 versions)
0.867 and 0.870, but learned more slowly on the real fleet (BENCHMARKS.md, "Fleet"). Without a
limit the fleet, and with it ``N / STALENESS_TARGET``, is unbounded (a buffer of thousands of
updates, a handful of versions per run), so there only the square root holds.

The weights stay in plain versions: weighing staleness in units of the fleet's own (``N / 2K``
versions) was measured; it learned faster at 100 and 1,000 devices but was unstable
(BENCHMARKS.md, "Fleet"). For ``N ≤ 16`` with the defaults (``K₀ = 4``, ``L₀ = 50``) this is
exactly the fixed setting. Pure; the core calls ``fleet_scale`` with the
number of devices it counts as contributing, or with the concurrency limit if that is smaller
(protocol revision 2.10, ``coordinator.invitations``: at most that many train at a time, so
they are the fleet whose staleness K and the limit follow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LARGE_FLEET_WEIGHT", "STALENESS_CAP", "STALENESS_TARGET", "FleetScale",
           "fleet_scale"]

# the staleness bound a task announces under fleet scaling: the limit in force follows the
# fleet below it (an agent drops what is older; the coordinator rejects as stale what is
# older than the limit in force)
STALENESS_CAP = 1000


# under a concurrency limit: about how many versions old an update is on average (see above);
# K is at least the devices training over it
STALENESS_TARGET = 7

# the staleness weight of a fleet larger than the floors cover (see above)
LARGE_FLEET_WEIGHT = "sqrt"


@dataclass(frozen=True)
class FleetScale:
    buffer_size: int  # K
    max_staleness: int  # the limit in force
    weight: str | None = None  # the staleness weight in force instead of the configured one


def fleet_scale(devices: int, buffer_size: int, max_staleness: int, *,
                bounded: bool = False) -> FleetScale:
    """The settings for ``devices`` contributing devices, from the configured floors
    ``buffer_size`` (K₀ ≥ 1) and ``max_staleness`` (L₀ ≥ 0, at most ``STALENESS_CAP``);
    ``bounded``: ``devices`` is at most a concurrency limit, and K keeps the age of an update
    at about ``STALENESS_TARGET``. ``ValueError`` for a negative count or floors out of
    range."""
    if devices < 0:
        raise ValueError(f"devices must be >= 0, got {devices}")
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    if not 0 <= max_staleness <= STALENESS_CAP:
        raise ValueError(f"max_staleness must be in [0, {STALENESS_CAP}], got {max_staleness}")
    k = max(buffer_size, math.isqrt(devices - 1) + 1 if devices > 0 else 0)
    if bounded:
        k = max(k, -(-devices // STALENESS_TARGET))
    limit = min(STALENESS_CAP, max(max_staleness, -(-4 * devices // k)))
    return FleetScale(k, limit, LARGE_FLEET_WEIGHT if k > buffer_size else None)
