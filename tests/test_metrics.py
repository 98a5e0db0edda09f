"""coordinator.metrics: the values after the calls the service makes, the endpoint, and a
port that cannot be bound (no broker needed)."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics, serve_metrics
from coordinator.service import CoordinatorService
from fedbus.errors import ConfigError


def value(metrics: CoordinatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_counters_follow_the_core_by_difference():
    m = CoordinatorMetrics()
    m.sync_counters({"updates_accepted": 0, "rejected_norm": 0, "rejected_stale": 0,
                     "bytes_received": 0, "status_received": 5})
    # every reason the core counts is a label set from the start, at 0
    assert value(m, "fedbus_updates_total", outcome="rejected", reason="stale") == 0
    assert value(m, "fedbus_updates_total", outcome="accepted", reason="none") == 0
    m.sync_counters({"updates_accepted": 3, "rejected_norm": 2, "rejected_stale": 0,
                     "bytes_received": 1000})
    m.sync_counters({"updates_accepted": 4, "rejected_norm": 2, "rejected_stale": 1,
                     "bytes_received": 1500})
    assert value(m, "fedbus_updates_total", outcome="accepted", reason="none") == 4
    assert value(m, "fedbus_updates_total", outcome="rejected", reason="norm") == 2
    assert value(m, "fedbus_updates_total", outcome="rejected", reason="stale") == 1
    assert value(m, "fedbus_update_bytes_received_total") == 1500
    # only update counters become metrics
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    assert not any("status" in n for n in names)


def test_invitations_and_partials_are_exported():
    m = CoordinatorMetrics()
    m.sync_counters({"invitations_sent": 0, "invitations_expired": 0, "partials_accepted": 0,
                     "partial_parts": 0})
    assert value(m, "fedbus_invitations_total", event="expired") == 0
    m.sync_counters({"invitations_sent": 7, "invitations_expired": 2, "partials_accepted": 3,
                     "partial_parts": 12, "invitations_resent": 4})
    assert value(m, "fedbus_invitations_total", event="sent") == 7
    assert value(m, "fedbus_invitations_total", event="resent") == 4
    assert value(m, "fedbus_invitations_total", event="expired") == 2
    assert value(m, "fedbus_partials_accepted_total") == 3
    assert value(m, "fedbus_partial_parts_accepted_total") == 12


def test_a_resumed_run_starts_from_its_stored_counts():
    m = CoordinatorMetrics()
    m.sync_counters({"updates_accepted": 40, "bytes_received": 9000})
    assert value(m, "fedbus_updates_total", outcome="accepted", reason="none") == 40
    m.sync_counters({"updates_accepted": 41, "bytes_received": 9100})
    assert value(m, "fedbus_updates_total", outcome="accepted", reason="none") == 41


def test_versions_latency_and_staleness():
    m = CoordinatorMetrics()
    m.current_version(7)
    assert value(m, "fedbus_model_version") == 7
    assert value(m, "fedbus_model_versions_total") == 0
    # one claim 2.5 s before the version, one 30 s in the future (a device's clock): 0
    m.version(8, (1000.0, 1032.5), now=1002.5)
    assert value(m, "fedbus_model_version") == 8
    assert value(m, "fedbus_model_versions_total") == 1
    assert value(m, "fedbus_update_latency_seconds_count") == 2
    assert value(m, "fedbus_update_latency_seconds_sum") == 2.5
    assert value(m, "fedbus_update_latency_seconds_bucket", le="0.05") == 1
    assert value(m, "fedbus_update_latency_seconds_bucket", le="2.5") == 2
    for s in (0, 1, 1, 12):
        m.accepted(s)
    assert value(m, "fedbus_update_staleness_count") == 4
    assert value(m, "fedbus_update_staleness_sum") == 14
    assert value(m, "fedbus_update_staleness_bucket", le="0.0") == 1
    assert value(m, "fedbus_update_staleness_bucket", le="1.0") == 3
    assert value(m, "fedbus_update_staleness_bucket", le="10.0") == 3
    assert value(m, "fedbus_update_staleness_bucket", le="15.0") == 4


def test_evaluation_bytes_sent_and_devices():
    m = CoordinatorMetrics()
    accuracy = value(m, "fedbus_heldout_accuracy")
    assert accuracy is not None and math.isnan(accuracy)  # not 0 before any evaluation
    m.evaluated(3, 0.91, 0.27)
    assert value(m, "fedbus_evaluated_version") == 3
    assert value(m, "fedbus_heldout_accuracy") == 0.91
    assert value(m, "fedbus_heldout_loss") == 0.27
    assert value(m, "fedbus_bytes_sent_total", kind="receipt") == 0
    m.sent("model", 5000)
    m.sent("model", 5000)
    m.sent("receipt", 120)
    assert value(m, "fedbus_bytes_sent_total", kind="model") == 10000
    assert value(m, "fedbus_bytes_sent_total", kind="receipt") == 120
    assert value(m, "fedbus_bytes_sent_total", kind="task") == 0
    m.online(4)
    m.online(3)
    assert value(m, "fedbus_devices_online") == 3


def test_two_services_in_one_process_do_not_share_metrics():
    a, b = CoordinatorMetrics(), CoordinatorMetrics()
    a.sent("task", 10)
    assert value(a, "fedbus_bytes_sent_total", kind="task") == 10
    assert value(b, "fedbus_bytes_sent_total", kind="task") == 0


def test_the_endpoint_serves_the_registry_and_stops():
    m = CoordinatorMetrics()
    m.sync_counters({"updates_accepted": 2, "rejected_norm": 1})
    server = serve_metrics(m.registry, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for s in families["fedbus_updates"].samples}
    assert samples[("fedbus_updates_total", (("outcome", "accepted"), ("reason", "none")))] == 2
    assert samples[("fedbus_updates_total", (("outcome", "rejected"), ("reason", "norm")))] == 1
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def test_a_port_in_use_is_one_config_error_and_releases_the_state(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics(CoordinatorMetrics().registry, "127.0.0.1", port)
        # the service refuses to run, before any broker connection, and lets go of its state
        config = CoordinatorConfig(port=1, state_dir=tmp_path / "run", metrics_port=port,
                                   model_args='{"in_features": 4, "num_classes": 2}')
        service = CoordinatorService(config, password="x")
        with pytest.raises(ConfigError, match="--metrics-port"):
            service.run()
        CoordinatorService(config, password="x").close()  # the state directory is free


def test_config_checks_the_metrics_port():
    assert CoordinatorConfig().metrics_port == 0  # off by default
    assert CoordinatorConfig().metrics_host == "127.0.0.1"
    with pytest.raises(ValueError, match="metrics_port"):
        CoordinatorConfig(metrics_port=70000)


def test_the_agent_side_never_loads_prometheus_client():
    """prometheus_client is a server extra: the CLI (which `fedbus agent` starts from) and
    every agent module must load without it."""
    code = (
        "import importlib, pkgutil, sys, edge_agent, fedbus.cli\n"
        "for m in pkgutil.walk_packages(edge_agent.__path__, 'edge_agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus_client was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
