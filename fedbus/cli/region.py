"""``fedbus region-aggregator``: fold a region's device updates into partial updates for
the root coordinator (protocol revision 2.11). Imported only when the command runs (it
loads coordinator code, which a device never needs)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import click

from coordinator.region_service import RegionConfig
from fedbus.cli._options import TLS_HELPS, config_options, load_process_config

__all__ = ["region_aggregator"]

ENV_PREFIX = "FEDBUS_REGION"

HELPS = {
    "region": "This region's name, as the root broker's --bridge-region named it.",
    "host": "The regional broker's host.",
    "port": "The regional broker's port (default 8883 with TLS, 1883 without).",
    "username": "The regional broker's account to log in with (its coordinator account: a "
    "regional broker has no coordinator of its own).",
    "password": "Its MQTT password; prefer the environment variable over the flag.",
    "credentials": "The regional broker's credentials.json (of `fedbus broker --dir DIR "
    "--bridge-bundle ... --region-aggregator`): supplies host, port, prefix, CA and password.",
    **TLS_HELPS,
    "prefix": "Topic prefix of the run.",
    "state_dir": "Directory of the aggregator's durable state (made if missing; a restart "
    "on it resumes: nothing accepted is lost, no partial is applied twice).",
    "partial_size": "Device updates folded into one partial update.",
    "partial_timeout": "Seconds a partial may wait for more updates before it is sent.",
    "partial_codec": "How partials are encoded: fp32, fp16, int8 or int4, optionally +zstd.",
    "max_norm": "Fixed ceiling of a device update's L2 norm (as the coordinator's).",
    "norm_multiple": "Adaptive norm bound: clip at this x the median of recent norms (0: off).",
    "sample_cap": "A device's claimed sample count weighs at most this x the partial's "
    "lower median claim.",
    "resend_after": "Seconds before a partial the root has not answered is sent again.",
    "coordinator_key": "The root coordinator's public key (ed25519:... text, or a file holding "
    "it or a PEM public key): tasks and models must carry its signature. Default: the "
    "credentials file's coordinator_key (the regional broker has it from the bridge bundle); "
    "with neither, tasks and models are accepted unsigned.",
    "require_signed_updates": "Refuse every device update that is not signed with its "
    "device's own key (protocol revision 2.8; receipt reason signature). Use it whenever the "
    "root coordinator runs with --require-signed-updates: the root sees only this "
    "aggregator's signature on a partial.",
    "device_keys": "The region's device-key file (<device-id> ed25519:<key> per line), read "
    "again whenever it changes. Default: signing/devices.pub beside --credentials.",
    "duration": "Seconds to run, then send what is open and stop (default: until Ctrl-C).",
    "sync": "SQLite synchronous mode: normal (survives a crash of the process) or full "
    "(also a power cut).",
}


@click.command(
    "region-aggregator",
    epilog="Settings come from flags, then FEDBUS_REGION_* environment variables, then the "
    "[region] table of --config, then defaults.",
)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None,
    help="TOML file with a [region] table of the settings below.",
)
@config_options(RegionConfig, HELPS, ENV_PREFIX)
def region_aggregator(config_file: Path | None, **flags: Any) -> None:
    """Fold this region's device updates into partial updates for the root coordinator.

    Runs beside a regional broker started with `--bridge-bundle ... --region-aggregator`.
    It judges every device update exactly as the coordinator does, answers the device,
    and sends one partial update (a weighted mean, its weight and how many updates it
    folds) per --partial-size updates of one model version, which the root takes as one
    contribution. Devices change nothing. See docs/operations.md.

    \b
    Example, on the regional broker's machine:
      fedbus region-aggregator --region eu --credentials ./eu/credentials.json \\
          --state-dir ./eu-region
    """
    from coordinator.region_service import RegionAggregator, summary_line

    cfg, password = load_process_config(
        RegionConfig, flags, env_prefix=ENV_PREFIX, config_file=config_file,
        section="region", username=lambda c: c.username,
    )
    aggregator = RegionAggregator(cfg, password)
    previous = {sig: signal.signal(sig, lambda *_: aggregator.stop())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        counters = aggregator.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logging.getLogger(__name__).info("stopped: %s", summary_line(counters))
    click.echo(f"region {cfg.region}: {summary_line(counters)}")
