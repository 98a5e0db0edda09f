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

The staleness weights stay ``w(s)`` in plain versions: weighing staleness in units of the
fleet's own (``N / 2K`` versions) was measured; it learned faster at 100 and 1,000 devices but
was unstable (BENCHMARKS.md, "Fleet"). For ``N ≤ 16`` with the defaults (``K₀ = 4``,
``L₀ = 50``) this is exactly the fixed setting. Pure; the core calls ``fleet_scale`` with the
number of devices it counts as contributing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["STALENESS_CAP", "FleetScale", "fleet_scale"]

# the staleness bound a task announces under fleet scaling: the limit in force follows the
# fleet below it (an agent drops what is older; the coordinator rejects as stale what is
# older than the limit in force)
STALENESS_CAP = 1000


@dataclass(frozen=True)
class FleetScale:
    buffer_size: int  # K
    max_staleness: int  # the limit in force


def fleet_scale(devices: int, buffer_size: int, max_staleness: int) -> FleetScale:
    """The settings for ``devices`` contributing devices, from the configured floors
    ``buffer_size`` (K₀ ≥ 1) and ``max_staleness`` (L₀ ≥ 0, at most ``STALENESS_CAP``).
    ``ValueError`` for a negative count or floors out of range."""
    if devices < 0:
        raise ValueError(f"devices must be >= 0, got {devices}")
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    if not 0 <= max_staleness <= STALENESS_CAP:
        raise ValueError(f"max_staleness must be in [0, {STALENESS_CAP}], got {max_staleness}")
    k = max(buffer_size, math.isqrt(devices - 1) + 1 if devices > 0 else 0)
    limit = min(STALENESS_CAP, max(max_staleness, -(-4 * devices // k)))
    return FleetScale(k, limit)
