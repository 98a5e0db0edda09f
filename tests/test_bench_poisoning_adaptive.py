"""The poisoning benchmark's adaptive-K variant drives the core as ``--adaptive-k`` runs it.

In process, one version of digits: fast enough for the unit suite. Adaptive K is worked out
from the devices online, so a simulation that never told the core who is online would measure
a fixed K = 5 under another name.
"""

from __future__ import annotations

import logging

import pytest

from bench import poisoning


def test_adaptive_variant_steps_with_the_measured_k(caplog: pytest.LogCaptureFixture) -> None:
    # quiet the core's refusals for this test only: caplog puts the level back afterwards,
    # where a bare setLevel left it at ERROR for every later test of the same worker
    caplog.set_level(logging.ERROR, logger="coordinator")
    adaptive = poisoning.simulate("digits", poisoning.ADAPTIVE, "none", 0, 1)
    assert adaptive["versions"] == 1
    # nothing hostile: quorum with a fixed K = 5 (or adaptive K told of no device online)
    # steps at the fifth update, all agreeing; under adaptive K with ten devices online the
    # ones not measured yet still count as fast, so K and the first step grow past 5
    assert poisoning.K < adaptive["accepted"] <= poisoning.DEVICES
    assert "--adaptive-k --staleness-a 0.5" in poisoning._spec(poisoning.ADAPTIVE)


def test_adaptive_sizes_compare_with_the_default() -> None:
    for sizes in (poisoning.ADAPTIVE_FULL, poisoning.ADAPTIVE_QUICK):
        assert {"mean", poisoning.ADAPTIVE} <= set(sizes.configs)  # mean: the reference
    assert "default" in poisoning.ADAPTIVE_FULL.configs
    assert poisoning.ADAPTIVE not in poisoning.FULL.configs  # poisoning's own table unchanged
