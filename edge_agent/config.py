"""The edge agent's one typed configuration (flag > environment > file > default)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_agent.policy import TrainingPolicy
from fedbus.tls import BrokerTarget, check_transport_choice
from fedbus.topics import DEFAULT_PREFIX, Topics, validate_device_id

__all__ = ["ENV_PREFIX", "AgentConfig"]

ENV_PREFIX = "FEDBUS_AGENT"


@dataclass(frozen=True)
class AgentConfig(BrokerTarget):
    """Settings of one edge agent process."""

    device_id: str
    data: Path
    host: str = "127.0.0.1"
    port: int | None = None  # None: 8883 with TLS, 1883 without (see broker_port())
    password: str | None = None
    credentials: Path | None = None  # credentials.json written by `fedbus broker`
    # TLS (fedbus.tls): None = TLS beyond loopback or when tls_ca/tls_cert is given
    tls: bool | None = None
    tls_ca: Path | None = None  # CA the broker's certificate must chain to; None: system CAs
    tls_cert: Path | None = None  # client certificate (mTLS; replaces the password)
    tls_key: Path | None = None
    insecure_plaintext: bool = False  # allow plain MQTT to a host beyond loopback
    # the coordinator's Ed25519 public key ("ed25519:..." or a file holding it or a PEM
    # public key): tasks and models must carry its signature. None: accepted unsigned
    coordinator_key: str | None = None
    # this device's Ed25519 private key (PKCS#8 PEM): every update is signed with it
    # (protocol revision 2.8). None: updates are sent unsigned
    signing_key: Path | None = None
    prefix: str = DEFAULT_PREFIX
    # seconds; Mosquitto declares a silent device gone (and sends its Will) after 1.5 x this
    keepalive: int = 15
    threads: int = 1
    seed: int = 0
    slowdown: float = 1.0  # simulation only: behave as a device this many times slower
    # simulation only: an update takes slowdown x this many seconds (training included),
    # whatever the data size; 0: slowdown multiplies the real training time
    compute_seconds: float = 0.0
    export: Path | None = None  # write the int8 model here (.npz) after every training
    max_updates: int = 0  # stop after this many published updates (0 = run until stopped)
    # largest model message taken, whole or in chunks (revision 2.6); also the packet limit
    # assumed until the broker's CONNACK announces its own
    max_model_bytes: int = 8 * 1024 * 1024
    # State kept across restarts (outbox, last version trained, top-k residual): agent.db in
    # this directory; None: see state_path()
    state_dir: Path | None = None
    # what to do when the coordinator ends the run: wait for a new run, or exit (code 0)
    on_run_end: Literal["wait", "exit"] = "wait"
    # exit with an error after this many seconds without a broker connection (0: never)
    connect_timeout: float = 0.0
    # bounds of the outbox (updates waiting for their receipts); past them the oldest go
    outbox_max_updates: int = 8
    outbox_max_bytes: int = 16 * 1024 * 1024
    # updates whose fate the ledger of agent.db keeps (the newest; older rows are deleted)
    ledger_size: int = 1000
    # -- device training policy (edge_agent.policy; docs/operations.md) --
    train_window: tuple[str, ...] = ()  # "HH:MM-HH:MM" local time, any of them; (): any time
    pause_file: Path | None = None  # no training while this path exists
    train_check: str | None = None  # command; training only while it exits with 0
    train_check_shell: bool = False  # run train_check by /bin/sh -c (default: no shell)
    train_check_timeout: float = 10.0  # seconds; slower counts as "no"
    policy_interval: float = 5.0  # seconds between evaluations of the above
    nice: int | None = None  # nice value of the training thread; None: as started
    max_cpu_share: float = 0.0  # most CPU while training, as a share of one core; 0: no cap
    max_memory_mib: int = 0  # resident memory ceiling while training; 0: none

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        Topics(self.prefix)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if self.max_model_bytes < 1024:
            raise ValueError(f"max_model_bytes must be at least 1024, got "
                             f"{self.max_model_bytes}")
        check_transport_choice(
            self.host, self.tls, insecure_plaintext=self.insecure_plaintext,
            ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key,
        )
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.slowdown < 1.0:
            raise ValueError("slowdown must be at least 1.0 (1.0 = real speed)")
        if not (math.isfinite(self.compute_seconds) and self.compute_seconds >= 0):
            raise ValueError(
                f"compute_seconds must be a finite number >= 0, got {self.compute_seconds}"
            )
        if self.max_updates < 0:
            raise ValueError("max_updates must be 0 (unlimited) or more")
        if self.keepalive < 1:
            raise ValueError(f"keepalive must be at least 1 second, got {self.keepalive}")
        if not (math.isfinite(self.connect_timeout) and self.connect_timeout >= 0):
            raise ValueError(
                f"connect_timeout must be a finite number >= 0, got {self.connect_timeout}"
            )
        if self.ledger_size < 1:
            raise ValueError(f"ledger_size must be at least 1, got {self.ledger_size}")
        if self.outbox_max_updates < 1 or self.outbox_max_bytes < 1:
            raise ValueError("outbox_max_updates and outbox_max_bytes must be at least 1")
        self.training_policy()  # a malformed policy setting is one line here

    def training_policy(self) -> TrainingPolicy:
        """The device training policy these settings describe (``ValueError`` if invalid)."""
        return TrainingPolicy.from_settings(
            windows=self.train_window, pause_file=self.pause_file, check=self.train_check,
            check_shell=self.train_check_shell, check_timeout=self.train_check_timeout,
            interval=self.policy_interval, nice=self.nice, cpu_share=self.max_cpu_share,
            memory_mib=self.max_memory_mib,
        )

    def state_path(self) -> Path:
        """``state_dir``, or by default ``$XDG_STATE_HOME/fedbus/<device_id>`` (XDG's
        default for ``$XDG_STATE_HOME`` being ``~/.local/state``)."""
        if self.state_dir is not None:
            return Path(self.state_dir)
        base = os.environ.get("XDG_STATE_HOME", "")
        if not os.path.isabs(base):  # unset, empty or relative: XDG says ignore it
            base = str(Path.home() / ".local" / "state")
        return Path(base) / "fedbus" / self.device_id

