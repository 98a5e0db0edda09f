"""``fedbus agent``: run the edge agent on a device."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import click

from edge_agent.config import ENV_PREFIX, AgentConfig
from fedbus.cli._options import TLS_HELPS, config_options, load_process_config

__all__ = ["agent"]

log = logging.getLogger("fedbus.agent")

HELPS = {
    "device_id": "This device's id; also its MQTT username and client id (default with a "
    "bundle from `fedbus devices add`: its device).",
    "data": "Local training data: .csv, .npz (arrays x and y) or a directory of them.",
    "host": "Broker host.",
    "port": "Broker port (default 8883 with TLS, 1883 without).",
    "password": "MQTT password; prefer the environment variable over the flag.",
    "credentials": "credentials.json from `fedbus broker`, or the bundle directory from "
    "`fedbus devices add`: supplies host, port, prefix, the CA, the password or client "
    "certificate, and the coordinator's public key (its TLS port unless --no-tls or "
    "--port is given).",
    **TLS_HELPS,
    "coordinator_key": "The coordinator's public key (ed25519:... text, or a file holding it or "
    "a PEM public key): tasks and models without its valid signature are ignored. Default: "
    "the credentials file's coordinator_key; with neither, tasks and models are accepted "
    "unsigned (a warning at start-up).",
    "signing_key": "This device's Ed25519 private key (PEM): every update is signed with it "
    "(protocol revision 2.8), for a coordinator that requires signed updates. Default: the "
    "bundle's signing.key (from `fedbus devices add` or `bundle`); with none, updates are "
    "sent unsigned.",
    "prefix": "Topic prefix shared with the coordinator.",
    "keepalive": "MQTT keepalive in seconds; the broker declares a silent device offline after "
    "1.5 times this.",
    "threads": "Torch threads for training (one is fastest for small networks).",
    "seed": "Seed for local shuffling and stochastic rounding.",
    "slowdown": "Simulation: behave as a device this many times slower (sleeps after training).",
    "compute_seconds": "Simulation: each update takes slowdown x this many seconds, training "
    "included, whatever the data size (0: slowdown multiplies the real training time).",
    "export": "After every local training, save the int8 model here (.npz, runs without "
    "torch via fedbus.export.Int8Model).",
    "max_updates": "Stop after publishing this many updates (0: run until stopped).",
    "max_model_bytes": "Largest model message taken, whole or reassembled from chunks "
    "(protocol revision 2.6); also the packet limit assumed until the broker's CONNACK "
    "announces its own.",
    "state_dir": "Directory for state kept across restarts (agent.db: the outbox of updates "
    "waiting for receipts, the last version trained on, the top-k residual). Default: "
    "$XDG_STATE_HOME/fedbus/<device-id>, i.e. ~/.local/state/fedbus/<device-id>.",
    "on_run_end": "When the coordinator ends the run: wait for a new run, or exit (code 0).",
    "connect_timeout": "Exit with an error after this many seconds without a broker "
    "connection (0: retry forever).",
    "outbox_max_updates": "Most updates kept waiting for their receipts; past it the oldest "
    "is dropped (logged).",
    "outbox_max_bytes": "Most bytes of updates kept waiting for their receipts.",
    "ledger_size": "How many of the newest updates the ledger in agent.db keeps the fate of "
    "(accepted, rejected and why, dropped and why).",
    # device training policy (docs/operations.md, "Device training policy")
    "train_window": "Train only inside these local-time windows, comma-separated HH:MM-HH:MM "
    "(e.g. 22:00-06:00,12:00-13:00; may cross midnight). Default: any time.",
    "pause_file": "Do not train while this file exists (updates already made are still sent).",
    "train_check": "Train only while this command exits with status 0; run without a shell "
    "(words split like a shell would), output discarded, every --policy-interval.",
    "train_check_shell": "Run --train-check through /bin/sh -c (pipes, &&, variables).",
    "train_check_timeout": "Seconds --train-check may take; a slower one is killed and "
    "counts as no.",
    "policy_interval": "Seconds between evaluations of the window, pause file and check "
    "(also during training, which a pause stops at the next batch).",
    "nice": "Nice value of the training thread (-20..19; below the current one needs "
    "CAP_SYS_NICE). Default: as started.",
    "max_cpu_share": "Most CPU time training may take, as a share of one core (0.5: half a "
    "core), held by sleeping between batches. 0: no cap.",
    "max_memory_mib": "Ceiling on resident memory (MiB) while training: over it the training "
    "stops and that model version is skipped, with an error line. 0: none.",
}


@click.command(
    epilog="Settings come from flags, then FEDBUS_AGENT_* environment variables, then the "
    "[agent] table of --config, then defaults."
)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None,
    help="TOML file with an [agent] table of the settings below.",
)
@config_options(AgentConfig, HELPS, ENV_PREFIX)
def agent(config_file: Path | None, **flags: Any) -> None:
    """Run an edge agent: train on local data, publish compressed updates.

    The agent connects to the broker (retrying with backoff while it is unreachable),
    waits for the coordinator's task and retained global model, trains on its local data
    with quantization-aware training, and publishes the encoded change. It trains again
    each time a newer global model arrives. Stop it with Ctrl-C or SIGTERM.

    \b
    Example, against a broker started with `fedbus broker --dir ./trial`:
      fedbus agent --device-id device-01 --data ./my-data.npz \\
                   --credentials ./trial/credentials.json
    """
    from edge_agent.agent import Agent, LocalData
    from fedbus.datasets import load_local_data

    cfg, password = load_process_config(
        AgentConfig, flags, env_prefix=ENV_PREFIX, config_file=config_file, section="agent",
        username=lambda c: c.device_id, identity="device_id",
    )
    if cfg.coordinator_key:  # a bad key is one line before the data is loaded
        from fedbus.signing import load_public_key

        load_public_key(cfg.coordinator_key)
    if cfg.signing_key is not None:
        from fedbus.signing import load_private_key

        load_private_key(cfg.signing_key)
    x, y = load_local_data(cfg.data)
    runner = Agent(cfg, LocalData(x, y), password=password)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.stop())
    stats = runner.run()
    log.info(
        "agent %s done: %d updates published, %d accepted, %d rejected, %d bytes uploaded",
        cfg.device_id, stats.updates_published, stats.receipts_accepted,
        stats.receipts_rejected, stats.bytes_uploaded,
    )
    if stats.receipts_rate_limited:
        log.warning("%d update(s) refused unjudged as rate_limited: this device sent more "
                    "than its share of the coordinator's time", stats.receipts_rate_limited)
    if stats.bad_signatures:
        log.warning("%d task or model message(s) ignored: not signed by the coordinator",
                    stats.bad_signatures)
