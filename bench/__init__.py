"""fedbus benchmark harness: ``python -m bench [--quick] [--only NAME ...] [--runs N]``.

Every benchmark runs ours and a baseline as alternating runs (ours, baseline, ours, ...) on
the same machine, against a Mosquitto that the harness starts on a free port, so that drift
of a shared, noisy machine hits both sides. Only the ratios mean anything.

Modules: ``harness`` (processes, broker, environment, statistics, the agent fleet),
``procs`` (the child processes: coordinator, bare subscriber, publisher, probes), one
module per benchmark (``ingest``, ``latency``, ``codecs``, ``tta``, ``footprint``,
``decode_worst`` with the payloads of ``hostile``, ``poisoning``, ``privacy``: accuracy
against epsilon in an in-process simulation, ``flood``: honest receipt latency while one
device floods, ``fleet``: 100 to 5,000 virtual devices of ``fleet_sim`` against the real
broker and coordinator) and
``report`` (results.json to the tables of BENCHMARKS.md).
"""

BENCHMARKS: tuple[str, ...] = (
    "ingest_25k",
    "ingest_1m",
    "latency",
    "bytes",
    "time_to_accuracy",
    "footprint",
    "decode_worst",
    "poisoning",
    "poisoning_sparse",
    "poisoning_adaptive",
    "privacy",
    "flood",
    "fleet",
)

__all__ = ["BENCHMARKS"]
