"""The coordinator's one typed configuration (flag > environment > file > default)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from coordinator.admission import AdmissionPolicy
from coordinator.core import AggregationConfig
from coordinator.ingest_workers import MAX_WORKERS
from coordinator.invitations import DEFAULT_CONCURRENCY
from coordinator.privacy import PrivacySpec, privacy_from_settings
from fedbus.codec_spec import parse_codec
from fedbus.preprocess import parse_classes
from fedbus.tls import BrokerTarget, check_transport_choice
from fedbus.topics import DEFAULT_PREFIX, Topics

__all__ = ["ENV_PREFIX", "CoordinatorConfig"]

_CORE = AggregationConfig()  # the core's defaults, for the settings not given here

ENV_PREFIX = "FEDBUS_COORDINATOR"
MODES = ("fedbuff", "fedasync", "fedavg")


@dataclass(frozen=True)
class CoordinatorConfig(BrokerTarget):
    """Settings of the coordinator process: broker, task, aggregation and stopping."""

    # broker
    host: str = "127.0.0.1"
    port: int | None = None  # None: 8883 with TLS, 1883 without (see broker_port())
    username: str = "coordinator"
    password: str | None = None
    credentials: Path | None = None  # credentials.json written by `fedbus broker`
    # TLS (fedbus.tls): None = TLS beyond loopback or when tls_ca/tls_cert is given
    tls: bool | None = None
    tls_ca: Path | None = None  # CA the broker's certificate must chain to; None: system CAs
    tls_cert: Path | None = None  # client certificate (mTLS; replaces the password)
    tls_key: Path | None = None
    insecure_plaintext: bool = False  # allow plain MQTT to a host beyond loopback
    prefix: str = DEFAULT_PREFIX
    # task
    task_id: str = "task-1"
    arch: str = "mlp"
    model_args: str = ""  # JSON object; for mlp, inferred from --eval-data when empty
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    qat: bool = True
    codec: str = "int8"  # codec spec of the updates (fedbus.codec_spec)
    model_codec: str = "fp32"  # codec spec of the model broadcast: fp32|fp16, optionally +zstd
    # None (not given): derived from the model for a new run (coordinator.limits), the
    # recorded value for a resumed one
    max_update_bytes: int | None = None
    # the broker's max_packet_size (broker_config/mosquitto.conf), assumed until the
    # broker's CONNACK announces its own; a model or update larger than the packet limit
    # travels in chunks (protocol revision 2.6)
    max_message_bytes: int = 8 * 1024 * 1024
    # chunked updates (revision 2.6, coordinator.chunk_intake): bytes one device's partial
    # updates may hold (0: twice max_update_bytes plus 64 KiB), bytes all of them may hold,
    # and seconds without a new chunk after which a partial update is dropped
    chunk_memory_per_device: int = 0
    chunk_memory: int = 256 * 1024 * 1024
    chunk_timeout: float = 60.0
    seed: int = 0
    # publish the task only once this many devices are online (0: at once), so the first
    # versions are not made from whichever device happened to connect first
    min_devices: int = 0
    # aggregation
    mode: str = "fedbuff"
    buffer_size: int = 4
    buffer_timeout: float = 60.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_optimizer: str = "sgd"  # coordinator.server_opt: sgd, adam, yogi
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    staleness: str = "poly"  # with staleness_a 1: weight 1 / (1 + s) (coordinator.staleness)
    staleness_a: float = 1.0  # exponent of poly, slope of hinge
    staleness_b: int = 4  # hinge: full weight up to this staleness
    max_staleness: int = 50
    # K, staleness weights and limit follow the fleet (coordinator.fleet_scale)
    fleet_scaling: bool = False
    # K follows the devices' measured speeds, --buffer-size its floor (coordinator.adaptive_k)
    adaptive_k: bool = False
    # at most this many devices train at a time, each invited (protocol revision 2.10,
    # coordinator.invitations); None (not given): 100 with fleet scaling, else 0 (no limit)
    concurrency: int | None = None
    invite_timeout: float = 600.0
    max_norm: float = 100.0
    # the adaptive norm bound (coordinator.norm_bound); norm_multiple 0 switches it off.
    # None (not given): the core's defaults (2, 4, 64, 4), and off under differential
    # privacy, which refuses any of them given with it except norm_multiple 0
    norm_multiple: float | None = None
    norm_reject: float | None = None
    norm_window: int | None = None
    norm_warmup: float | None = None
    round_deadline: float = 30.0
    min_round_updates: int = 1
    # how a step combines its updates (coordinator.aggregator_spec): mean, median,
    # trimmed:FRACTION, krum:F[:M], optionally +clip:BOUND; part of the run's identity.
    # None (not given): DEFAULT_AGGREGATOR for a new run ("mean" with differential privacy),
    # the recorded one for a resumed run
    aggregator: str | None = None
    # central differential privacy (coordinator.privacy), off while dp_noise is 0: Gaussian
    # noise of dp_noise x dp_clip / K on every step, updates clipped to dp_clip; epsilon
    # reported at dp_delta; the run ends before a step would spend more than
    # dp_epsilon_budget (0: no budget). Noise and clip are part of the run's identity. It
    # needs the plain mean and switches the adaptive norm bound off
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    dp_delta: float = 1e-5
    dp_epsilon_budget: float = 0.0
    # the run's durable state (coordinator.store); None: in memory only, nothing survives
    state_dir: Path | None = Path("fedbus-state")
    # Ed25519 private key (PEM) adopted as the state directory's signing key when it has
    # none yet (fedbus.signing); None: from --credentials, else a new key is made there
    signing_key: Path | None = None
    # revision 2.8: refuse every update that is not signed by its device's key (reason
    # "signature"); the keys come from device_keys, read again whenever it changes. None:
    # signing/devices.pub beside --credentials
    require_signed_updates: bool = False
    device_keys: Path | None = None
    # SQLite synchronous mode: normal survives a process crash, full also a power cut
    sync: Literal["normal", "full"] = "normal"
    # exit with an error after this many seconds without a broker connection (0: retry forever)
    connect_timeout: float = 0.0
    # per-device admission (coordinator.admission): the share of the CPU time the
    # coordinator spends handling messages that one device may use sustained, and the
    # seconds of it a quiet device may use at once; a device over it gets rate_limited
    # receipts. 0 share: off
    device_share: float = 0.02
    device_burst: float = 0.25
    # evaluation, stopping
    eval_data: Path | None = None
    # input normalisation carried by the task (fedbus.preprocess): auto (from eval_data when
    # it is a table: a .csv file or a directory of them), eval (from eval_data, any format),
    # off, or a JSON file of mean/std (or scale/offset). Fixed for a run, like the model
    normalize: str = "auto"
    # class names, comma-separated (labels are then names); "" : from eval_data when its
    # labels are names (sorted), else none (labels are class indices). Fixed for a run
    classes: str = ""
    # warn when no update was accepted for this many seconds while some were rejected
    # (coordinator.stall); 0: never
    stall_window: float = 60.0
    # worker processes that decode and check update deltas (coordinator.ingest_workers);
    # 0: this process does all the work (one thread judges each message as it arrives)
    ingest_workers: int = 0
    # "paused": begin paused (no version is made, agents do not train) until the operator
    # resumes the run (`fedbus run resume`); a run paused before stays paused either way
    start: str = "running"
    max_versions: int = 0  # stop after this many new model versions (0 = never)
    duration: float = 0.0  # stop after this many seconds (0 = never)
    target_accuracy: float = 0.0  # stop once held-out accuracy reaches this (0 = never)
    # ... and held: for this many seconds after a version reached it, at least 90% of the
    # versions evaluated reached it too (coordinator.target_hold); 0: stop at the first hit
    target_hold: float = 20.0
    # Prometheus metrics (coordinator.metrics) on http://metrics_host:metrics_port/metrics;
    # 0: no endpoint. Loopback by default: the metrics name devices and the run's progress
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # the live web dashboard (coordinator.dashboard) on http://dashboard_host:dashboard_port/;
    # 0: none. Loopback by default, for the same reason as the metrics (and it has no login)
    dashboard_port: int = 0
    dashboard_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        Topics(self.prefix)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        try:
            parse_codec(self.codec)
        except ValueError as exc:
            raise ValueError(f"codec: {exc}") from None
        try:
            model = parse_codec(self.model_codec)
        except ValueError as exc:
            raise ValueError(f"model_codec: {exc}") from None
        if model.lossy:  # the global model is never sent lossily quantised
            raise ValueError(
                f"model_codec must be fp32 or fp16, optionally +zstd (the model is not sent "
                f"lossily), got {self.model_codec!r}"
            )
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        check_transport_choice(
            self.host, self.tls, insecure_plaintext=self.insecure_plaintext,
            ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key,
        )
        if self.max_update_bytes is not None and self.max_update_bytes < 1:
            raise ValueError(
                f"max_update_bytes must be at least 1 (leave it out to derive it from the "
                f"model), got {self.max_update_bytes}"
            )
        if self.chunk_memory_per_device < 0 or self.chunk_memory < 1:
            raise ValueError("chunk_memory must be at least 1 byte and chunk_memory_per_device "
                             "0 (derived) or more")
        if not (math.isfinite(self.chunk_timeout) and self.chunk_timeout > 0):
            raise ValueError(f"chunk_timeout must be a number of seconds > 0, got "
                             f"{self.chunk_timeout}")
        if self.max_versions < 0 or self.duration < 0:
            raise ValueError("max_versions and duration must not be negative")
        if not (math.isfinite(self.target_hold) and self.target_hold >= 0):
            raise ValueError(f"target_hold must be a number of seconds >= 0, got "
                             f"{self.target_hold}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(
                f"metrics_port must be 1-65535, or 0 for no endpoint, got {self.metrics_port}"
            )
        if not 0 <= self.dashboard_port <= 65535:
            raise ValueError(
                f"dashboard_port must be 1-65535, or 0 for no dashboard, got "
                f"{self.dashboard_port}"
            )
        if self.min_devices < 0:
            raise ValueError(f"min_devices must not be negative, got {self.min_devices}")
        if self.start not in ("running", "paused"):
            raise ValueError(f"start must be running or paused, got {self.start!r}")
        if self.sync not in ("normal", "full"):
            raise ValueError(f"sync must be normal or full, got {self.sync!r}")
        if not (math.isfinite(self.connect_timeout) and self.connect_timeout >= 0):
            raise ValueError(
                f"connect_timeout must be a finite number >= 0, got {self.connect_timeout}"
            )
        self.parsed_model_args()
        self.class_names()
        if not (math.isfinite(self.stall_window) and self.stall_window >= 0):
            raise ValueError(f"stall_window must be a number >= 0, got {self.stall_window}")
        if not (isinstance(self.ingest_workers, int)
                and 0 <= self.ingest_workers <= MAX_WORKERS):
            raise ValueError(f"ingest_workers must be an integer 0-{MAX_WORKERS}, got "
                             f"{self.ingest_workers!r}")
        self.admission()
        self.aggregation()  # one place checks the aggregation settings

    def class_names(self) -> tuple[str, ...] | None:
        """``classes`` as names, or None when not given (``ValueError`` if malformed)."""
        if not self.classes.strip():
            return None
        return parse_classes([c.strip() for c in self.classes.split(",")])

    def admission(self) -> AdmissionPolicy:
        """The per-device admission policy (``ValueError`` if out of range)."""
        return AdmissionPolicy(share=self.device_share, burst=self.device_burst)

    def privacy(self) -> PrivacySpec | None:
        """The run's differential privacy, or None (``ValueError`` if inconsistent)."""
        return privacy_from_settings(
            self.dp_noise, self.dp_clip, self.dp_delta, self.dp_epsilon_budget
        )

    @property
    def effective_concurrency(self) -> int:
        """The concurrency limit in force: as given, else ``DEFAULT_CONCURRENCY`` with fleet
        scaling (which needs fedbuff) and 0 (no limit) without."""
        if self.concurrency is not None:
            return self.concurrency
        return DEFAULT_CONCURRENCY if self.fleet_scaling else 0

    def aggregation(self) -> AggregationConfig:
        """The pure core's aggregation settings (``ValueError`` if inconsistent)."""
        privacy = self.privacy()
        tuning = {"norm_reject": self.norm_reject, "norm_window": self.norm_window,
                  "norm_warmup": self.norm_warmup}
        if privacy is not None:
            given = [f"--{k.replace('_', '-')}" for k, v in tuning.items() if v is not None]
            if given:  # (an explicit norm_multiple is judged by the core: only 0 passes)
                raise ValueError(
                    f"with differential privacy every update is clipped to --dp-clip and the "
                    f"adaptive norm bound is off: drop {', '.join(given)}"
                )
        return AggregationConfig(
            mode=self.mode,
            buffer_size=self.buffer_size,
            buffer_timeout=self.buffer_timeout,
            server_lr=self.server_lr,
            server_momentum=self.server_momentum,
            server_optimizer=self.server_optimizer,
            server_beta1=self.server_beta1,
            server_beta2=self.server_beta2,
            server_tau=self.server_tau,
            staleness=self.staleness,
            staleness_a=self.staleness_a,
            staleness_b=self.staleness_b,
            max_staleness=self.max_staleness,
            fleet_scaling=self.fleet_scaling,
            adaptive_k=self.adaptive_k,
            concurrency=self.effective_concurrency,
            invite_timeout=self.invite_timeout,
            max_norm=self.max_norm,
            norm_multiple=self.norm_multiple,
            norm_reject=_CORE.norm_reject if self.norm_reject is None else self.norm_reject,
            norm_window=_CORE.norm_window if self.norm_window is None else self.norm_window,
            norm_warmup=_CORE.norm_warmup if self.norm_warmup is None else self.norm_warmup,
            round_deadline=self.round_deadline,
            min_round_updates=self.min_round_updates,
            aggregator=self.aggregator,  # None: the core's default (mean under DP)
            privacy=privacy,
        )

    def parsed_model_args(self) -> dict[str, Any]:
        if not self.model_args.strip():
            return {}
        try:
            args = json.loads(self.model_args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model_args is not valid JSON: {exc}") from None
        if not isinstance(args, dict):
            raise ValueError("model_args must be a JSON object, e.g. '{\"hidden\": [64]}'")
        return args

