"""``fedbus status``: the fleet and the run, live, from any machine with the operator's
credentials (over MQTT only)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fedbus.cli._options import TLS_HELPS, config_options, load_process_config
from fedbus.dynsec import OPERATOR_USERNAME
from fedbus.tls import BrokerTarget, check_transport_choice
from fedbus.topics import DEFAULT_PREFIX, Topics

if TYPE_CHECKING:
    from fedbus.transport import ConnectionSettings

__all__ = ["StatusConfig", "status"]

ENV_PREFIX = "FEDBUS_STATUS"


@dataclass(frozen=True)
class StatusConfig(BrokerTarget):
    """Settings of one ``fedbus status`` process."""

    host: str = "127.0.0.1"
    port: int | None = None  # None: 8883 with TLS, 1883 without
    username: str = OPERATOR_USERNAME
    password: str | None = None
    credentials: Path | None = None  # the operator's credentials file or bundle
    tls: bool | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_plaintext: bool = False
    prefix: str = DEFAULT_PREFIX
    timeout: float = 10.0  # seconds to wait for the broker and the first snapshot

    def __post_init__(self) -> None:
        Topics(self.prefix)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not 0.5 <= self.timeout <= 3600:
            raise ValueError(f"timeout must be 0.5-3600 seconds, got {self.timeout}")
        check_transport_choice(
            self.host, self.tls, insecure_plaintext=self.insecure_plaintext,
            ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key,
        )

    def settings(self, password: str) -> ConnectionSettings:
        """How the operator connects: no session kept, room for a large snapshot."""
        from fedbus.transport import ConnectionSettings

        return ConnectionSettings(
            host=self.host, port=self.broker_port(), client_id=self.username,
            username=self.username, password=password, session_expiry=0,
            tls=self.tls_settings(), max_packet_size=16 * 1024 * 1024,
        )


HELPS = {
    "host": "Broker host.",
    "port": "Broker port (default 8883 with TLS, 1883 without).",
    "username": "The operator account (made by `fedbus broker` and `fedbus devices init`).",
    "password": "Its MQTT password; prefer the environment variable over the flag.",
    "credentials": "The operator's credentials file (credentials.json of `fedbus broker "
    "--dir`) or the bundle of `fedbus devices operator`: supplies host, port, prefix, CA and "
    "password.",
    **TLS_HELPS,
    "prefix": "Topic prefix of the run.",
    "timeout": "Seconds to wait for the broker and for the first snapshot.",
}


@click.command(
    "status",
    epilog="Settings come from flags, then FEDBUS_STATUS_* environment variables, then the "
    "[status] table of --config, then defaults.",
)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None,
    help="TOML file with a [status] table of the settings below.",
)
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one snapshot as JSON and exit (for scripts).")
@click.option("--once", is_flag=True, default=False,
              help="Print one snapshot as a text table and exit.")
@click.option("--refresh", type=click.FloatRange(0.2, 60), default=1.0, show_default=True,
              help="Seconds between redraws of the live view.")
@config_options(StatusConfig, HELPS, ENV_PREFIX)
def status(config_file: Path | None, as_json: bool, once: bool, refresh: float,
           **flags: Any) -> None:
    """Show every device and the run, live: the coordinator's fleet snapshot.

    Per device: online or offline, last seen, agent version, the model version it last
    trained on, updates accepted and rejected (by reason), bytes, mean staleness, its last
    local loss and int8 accuracy, its last error. For the run: version, held-out accuracy,
    updates per second, bytes. The coordinator publishes the snapshot (retained) at most
    every 2 s; only the operator account may read it. Ctrl-C leaves the live view.

    \b
    Examples, against a broker started with `fedbus broker --dir ./trial`:
      fedbus status --credentials trial/credentials.json
      fedbus status --credentials trial/credentials.json --json | jq .run
    """
    from coordinator.fleet_watch import FleetWatcher
    from fedbus.errors import ConfigError

    if as_json and once:
        raise ConfigError("--json and --once both print one snapshot: choose one")
    cfg, password = load_process_config(
        StatusConfig, flags, env_prefix=ENV_PREFIX, config_file=config_file,
        section="status", username=lambda c: c.username,
    )
    if not as_json:
        try:
            import rich  # noqa: F401
        except ImportError:
            raise ConfigError("fedbus status shows its table with rich: pip install "
                              "'fedbus[operator]' (or use --json)") from None
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("fedbus.transport").setLevel(logging.WARNING)
    watcher = FleetWatcher(cfg.settings(password), cfg.prefix, timeout=cfg.timeout)
    watcher.start()
    try:
        _show(watcher, as_json=as_json, once=once, refresh=refresh)
    finally:
        watcher.stop()


def _show(watcher: Any, *, as_json: bool, once: bool, refresh: float) -> None:
    from coordinator.fleet_view import read_fleet

    snapshot = read_fleet(watcher.first_payload())
    if as_json:
        click.echo(json.dumps(snapshot, indent=2))
        return
    from rich.console import Console
    from rich.live import Live

    from coordinator.fleet_view import fleet_view

    if once:
        # a pipe or a file gets the whole table, not 80 columns of it
        width = None if sys.stdout.isatty() else max(160, shutil.get_terminal_size().columns)
        Console(width=width, highlight=False).print(fleet_view(snapshot, time.time()))
        return
    with Live(fleet_view(snapshot, time.time()), refresh_per_second=4,
              auto_refresh=False) as live:
        while True:
            payload = watcher.next_payload(refresh)
            if payload is not None:
                snapshot = read_fleet(payload)
            fatal = watcher.fatal()
            if fatal is not None:
                raise fatal
            live.update(fleet_view(snapshot, time.time()), refresh=True)
