"""The virtual-time model of the fleet benchmark's learning (bench.fleet_virtual)."""

from __future__ import annotations

from bench.fleet_virtual import run


def test_invitations_rotate_through_a_fleet_larger_than_the_limit() -> None:
    within = run(3, concurrency=3, updates=12, shard=8, k=3)
    larger = run(30, concurrency=3, updates=12, shard=8, k=3)
    # 12 applied updates at K = 3: 4 versions either way
    assert within.versions == larger.versions == 4
    # within the limit the same 3 devices train again; beyond it each waits its turn
    assert within.devices_trained == 3
    assert larger.devices_trained >= 12
    assert 0.0 <= larger.accuracy <= 1.0 and larger.staleness >= 0.0
