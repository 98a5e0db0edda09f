"""The coordinator's Prometheus metrics: one registry per service, fed with values the
service already has (the core's counters, its receipts and versions, device presence), and
an optional HTTP endpoint that serves it.

Each ``CoordinatorMetrics`` owns its own ``CollectorRegistry`` (never prometheus_client's
global one), so several services in one process, and tests, do not collide. Only the
coordinator imports this module; agents never load prometheus_client.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedbus.errors import ConfigError

__all__ = ["STALENESS_BUCKETS", "CoordinatorMetrics", "MetricsServer", "serve_metrics"]

_UNKNOWN = object()  # a counter sync_counters has not seen yet

# versions behind; the default --max-staleness is 10
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 10, 15, 20, 50)
# seconds from a device's publish claim to the version that applied its update
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

SentKind = Literal["model", "receipt", "task"]


class CoordinatorMetrics:
    """The metrics of one coordinator: call the methods with values the service has."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.updates = Counter(
            "fedbus_updates", "Updates judged (copies that only repeat a verdict excluded), by "
            "outcome (accepted, rejected) and rejection reason (none when accepted); totals of "
            "the run, a resumed run starting from its stored counts.",
            ["outcome", "reason"], registry=r,
        )
        self.rate_limited = Counter(
            "fedbus_updates_rate_limited", "Updates refused unjudged (rate_limited) because "
            "their device was over its share of the coordinator's time (--device-share); "
            "counted by this process.", registry=r,
        )
        self.model_version = Gauge(
            "fedbus_model_version", "The current global model version.", registry=r
        )
        self.versions = Counter(
            "fedbus_model_versions", "Global model versions made by this process.", registry=r
        )
        self.accuracy = Gauge(
            "fedbus_heldout_accuracy", "Held-out accuracy of the last evaluated version.",
            registry=r,
        )
        self.loss = Gauge(
            "fedbus_heldout_loss", "Held-out loss of the last evaluated version.", registry=r
        )
        self.evaluated_version = Gauge(
            "fedbus_evaluated_version", "The last model version evaluated on held-out data.",
            registry=r,
        )
        self.bytes_received = Counter(
            "fedbus_update_bytes_received", "Bytes of update payloads received (judged "
            "updates; totals of the run).", registry=r,
        )
        self.bytes_sent = Counter(
            "fedbus_bytes_sent", "Bytes of payloads published, by kind (model, receipt, task).",
            ["kind"], registry=r,
        )
        self.devices_online = Gauge(
            "fedbus_devices_online", "Devices whose last status is online, training or idle.",
            registry=r,
        )
        self.staleness = Histogram(
            "fedbus_update_staleness", "Staleness of accepted updates: versions between the "
            "one an update was trained on and the current one when it arrived.",
            buckets=STALENESS_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "fedbus_update_latency_seconds", "Seconds from an update's publish time, as the "
            "device claims it (its ts field: a device's clock, not checked), to the version "
            "that applied it; a claim in the future counts as 0.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.invitations = Counter(
            "fedbus_invitations", "Invitations to train (protocol revision 2.10, "
            "--concurrency), by event: sent, expired (withdrawn unused after "
            "--invite-timeout), or resent (an open invitation sent again to a device that "
            "lost it, revision 2.13); totals of the run.", ["event"], registry=r,
        )
        self.partials = Counter(
            "fedbus_partials_accepted", "Partial updates of regional aggregators accepted "
            "(protocol revision 2.11); totals of the run.", registry=r,
        )
        self.partial_parts = Counter(
            "fedbus_partial_parts_accepted", "Device updates folded into the accepted partial "
            "updates (the sum of their parts); totals of the run.", registry=r,
        )
        for kind in ("model", "receipt", "task"):
            self.bytes_sent.labels(kind=kind)
        for gauge in (self.accuracy, self.loss, self.evaluated_version):
            gauge.set(math.nan)  # nothing evaluated yet (no --eval-data, or not yet)
        self._seen: dict[str, int] = {}
        self._children: dict[str, Any] = {}  # core counter -> its exported child (or None)

    def sync_counters(self, counters: Mapping[str, int]) -> None:
        """Bring the update counters up to the core's ``counters`` (updates_accepted,
        rejected_<reason>, bytes_received, invitations_*, partials_accepted, partial_parts):
        each counter grows by what changed since the last call. Counts that went down (never,
        in one run) are ignored. Called for every update: each counter's labelled child is
        looked up once."""
        children = self._children
        seen = self._seen
        for key, value in counters.items():
            child = children.get(key, _UNKNOWN)
            if child is _UNKNOWN:  # first sight: its series exists from now on, at 0
                child = children[key] = self._child(key)
            if child is None:
                continue
            grown = value - seen.get(key, 0)
            if grown > 0:
                child.inc(grown)
                seen[key] = value

    def _child(self, key: str) -> Any:
        """The counter that follows the core's counter ``key`` (None: not exported)."""
        if key == "updates_accepted":
            return self.updates.labels(outcome="accepted", reason="none")
        if key.startswith("rejected_"):
            return self.updates.labels(outcome="rejected", reason=key[len("rejected_"):])
        if key == "bytes_received":
            return self.bytes_received
        if key in ("invitations_sent", "invitations_expired", "invitations_resent"):
            return self.invitations.labels(event=key[len("invitations_"):])
        if key == "partials_accepted":
            return self.partials
        if key == "partial_parts":
            return self.partial_parts
        return None

    def accepted(self, staleness: int) -> None:
        """An update was accepted ``staleness`` versions behind."""
        self.staleness.observe(staleness)

    def version(self, version: int, sent_at: Iterable[float], now: float) -> None:
        """Version ``version`` was made at ``now`` (wall clock) from updates the devices say
        they published at ``sent_at``."""
        for ts in sent_at:
            self.latency.observe(max(0.0, now - ts))
        self.versions.inc()
        self.model_version.set(version)

    def current_version(self, version: int) -> None:
        """The version the run is at (on start or resume), without counting it as made."""
        self.model_version.set(version)

    def evaluated(self, version: int, accuracy: float, loss: float) -> None:
        self.evaluated_version.set(version)
        self.accuracy.set(accuracy)
        self.loss.set(loss)

    def sent(self, kind: SentKind, nbytes: int) -> None:
        self.bytes_sent.labels(kind=kind).inc(nbytes)

    def refused(self) -> None:
        """An update was refused unjudged (rate_limited)."""
        self.rate_limited.inc()

    def online(self, devices: int) -> None:
        self.devices_online.set(devices)


class MetricsServer:
    """An HTTP endpoint serving a registry at ``/metrics``; ``stop()`` closes it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread (port 0: any
    free port). A port that cannot be bound is a ``ConfigError``."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
            "--metrics-port (or 0 to switch the endpoint off)"
        ) from None
    return MetricsServer(server, thread)
