"""``fedbus broker``: run a local Mosquitto with the fedbus policy until Ctrl-C."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

from fedbus.bridge import parse_address, read_bridge_bundle
from fedbus.broker import DYNSEC_FILE, LocalBroker, default_device_ids
from fedbus.errors import FedbusError
from fedbus.topics import DEFAULT_PREFIX

__all__ = ["broker", "command"]

_HEALTH_CHECK_SECONDS = 0.5


@click.command(
    "broker",
    epilog="For a permanent broker on a server (ports 8883/8884, systemd) install the same "
    "policy into the system's Mosquitto instead: see deploy/mosquitto/README.md.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=0, show_default=True,
    help="Plain MQTT port (only on loopback unless --insecure-plaintext); 0 picks a free one.",
)
@click.option(
    "--tls-port", type=click.IntRange(0, 65535), default=0, show_default=True,
    help="TLS port where devices log in with a password (8883 by convention); 0 picks a "
    "free one.",
)
@click.option(
    "--mtls-port", type=click.IntRange(0, 65535), default=0, show_default=True,
    help="Mutual-TLS port where devices log in with their client certificate (8884 by "
    "convention); 0 picks a free one.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True,
    help="Address to listen on. Use 0.0.0.0 to accept devices from your network (TLS only, "
    "unless --insecure-plaintext).",
)
@click.option(
    "--tls-name", "tls_names", multiple=True, metavar="NAME",
    help="DNS name or IP address devices use to reach this broker, written into its "
    "certificate besides loopback and --host (repeatable). The first one goes into "
    "credentials.json when --host is 0.0.0.0.",
)
@click.option(
    "--insecure-plaintext", is_flag=True, default=False,
    help="Also open the plain MQTT port on --host when it is beyond loopback: passwords, "
    "models and updates then cross the network in clear text.",
)
@click.option(
    "--devices", "num_devices", type=click.IntRange(1, 9999), default=None,
    help="Create accounts device-01 .. device-NN in a new --dir [default: 8].",
)
@click.option(
    "--device-id", "device_ids", multiple=True, metavar="ID",
    help="Create an account for this device id in a new --dir (repeatable; replaces "
    "--devices). A directory already in use keeps its accounts: add devices to the running "
    "broker with `fedbus devices add`.",
)
@click.option(
    "--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
    default=Path("fedbus-broker"), show_default=True,
    help="Directory for the broker's files: credentials, the accounts and roles "
    "(dynsec.json), certificates, device bundles, config, log and persistence database. "
    "Reusing it keeps accounts, passwords, ports and retained messages.",
)
@click.option(
    "--prefix", default=DEFAULT_PREFIX, show_default=True,
    help="Topic prefix; the coordinator and the agents must use the same one.",
)
@click.option(
    "--bridge-region", "bridge_regions", multiple=True, metavar="REGION",
    help="Root broker of regional ones: make an account for REGION's bridge and write its "
    "bundle to --dir/bridges/REGION (repeatable). See docs/operations.md.",
)
@click.option(
    "--bridge-bundle", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Regional broker: bridge to the root broker with this bundle (the root's "
    "--dir/bridges/REGION, copied here). Devices connect here; their updates and statuses go "
    "to the root, the task, models and receipts come back.",
)
@click.option(
    "--bridge-to", default=None, metavar="HOST:PORT",
    help="With --bridge-bundle: the root broker's mutual-TLS address as this broker reaches "
    "it [default: the bundle's]. HOST must be a name in the root's certificate.",
)
@click.option(
    "--region-aggregator", is_flag=True, default=False,
    help="With --bridge-bundle: a regional aggregator (`fedbus region-aggregator`, logging in "
    "as this broker's coordinator account) folds the devices' updates here; only its partial "
    "updates cross to the root, not the devices' own (protocol revision 2.11).",
)
def broker(port: int, tls_port: int, mtls_port: int, host: str, tls_names: Sequence[str],
           insecure_plaintext: bool, num_devices: int | None, device_ids: Sequence[str],
           workdir: Path, prefix: str, bridge_regions: Sequence[str],
           bridge_bundle: Path | None, bridge_to: str | None,
           region_aggregator: bool) -> None:
    """Run a local Mosquitto broker with the fedbus access policy.

    It creates an account for the coordinator and one per device, each with a random
    password, and an admin account (fedbus-admin) for `fedbus devices`, and writes them to
    credentials.json in --dir (readable only by you). Accounts live in Mosquitto's
    dynamic-security plugin: `fedbus devices add|disable|enable|remove|list` changes them
    while the broker runs. Each device may write only its own update and status topics and
    read the task, the model and its own receipts; anonymous clients are refused.

    Secrets are made once and never replaced: a second start on the same --dir keeps every
    account, password and port, and a start on a directory whose broker still runs, or on
    a port in use, fails before it writes anything.

    It also makes a certificate authority in --dir/tls (made once, never replaced), the
    broker's certificate and a client certificate per account, and listens with TLS: on
    --tls-port with passwords, on --mtls-port with client certificates (the certificate's
    name is the username). Plain MQTT only on loopback, unless --insecure-plaintext.

    The broker runs until Ctrl-C (or SIGTERM). Needs the `mosquitto` program
    (Debian package 'mosquitto'; `make setup` installs it).

    \b
    Examples:
      fedbus broker                          # 8 devices, free port, ./fedbus-broker
      fedbus broker --host 0.0.0.0 --tls-name broker.lan --tls-port 8883 \\
                    --mtls-port 8884 --devices 20 --dir ./trial
      fedbus broker --device-id kitchen-pi --device-id garage-pi
    """
    if device_ids:
        ids = list(device_ids)
    elif num_devices is not None:
        ids = default_device_ids(num_devices)
    else:  # a directory in use keeps what it has; a new one gets the default fleet
        ids = [] if (workdir / DYNSEC_FILE).exists() else default_device_ids(8)
    try:
        if bridge_to is not None and bridge_bundle is None:
            raise click.ClickException("--bridge-to needs --bridge-bundle")
        if region_aggregator and bridge_bundle is None:
            raise click.ClickException("--region-aggregator needs --bridge-bundle (it is for "
                                       "a regional broker)")
        if bridge_bundle is not None and bridge_regions:
            raise click.ClickException("a regional broker (--bridge-bundle) has no regions "
                                       "of its own (--bridge-region): bridge one level only")
        bundle = None if bridge_bundle is None else read_bridge_bundle(bridge_bundle)
        if bundle is not None and prefix != DEFAULT_PREFIX and prefix != bundle.prefix:
            raise click.ClickException(f"--prefix {prefix} differs from the root broker's "
                                       f"{bundle.prefix} in the bridge bundle")
        local = LocalBroker(
            workdir, device_ids=ids, port=port, host=host,
            prefix=bundle.prefix if bundle is not None else prefix, tls_port=tls_port,
            mtls_port=mtls_port, plaintext=True if insecure_plaintext else None,
            tls_names=tls_names, bridge_regions=bridge_regions, bridge=bundle,
            bridge_address=None if bridge_to is None else parse_address(bridge_to),
            region_aggregator=region_aggregator,
        )
        local.start()
    except FedbusError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        # install the handlers before saying "press Ctrl-C", or an early Ctrl-C aborts
        with _stop_on_signals() as stop:
            click.echo(_summary(local))
            _run_until_stopped(local, stop)
    finally:
        local.stop()
    click.echo("broker stopped")


command = broker


def _run_until_stopped(local: LocalBroker, stop: threading.Event) -> None:
    """Block until ``stop`` (SIGINT/SIGTERM); fail if mosquitto exits on its own meanwhile."""
    while not stop.wait(_HEALTH_CHECK_SECONDS):
        if not local.running:
            raise click.ClickException(
                f"mosquitto exited unexpectedly; see its log: {local.log_file}"
            )


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _bridge_lines(local: LocalBroker) -> list[str]:
    lines = [f"  bridge bundle: {local.bridge_bundle_dir(r)}  (for the region's broker: "
             f"fedbus broker --bridge-bundle DIR)" for r in local.bridges]
    spec = local.bridge_spec
    if spec is not None:
        lines.append(f"  bridged to:    {spec.host}:{spec.port} as {spec.username} (region "
                     f"{spec.region}; the coordinator runs there)")
        if spec.aggregated:
            lines.append("  aggregated:    devices' updates stay here; run `fedbus "
                         f"region-aggregator --region {spec.region}` with this broker's "
                         "credentials.json")
    return lines


def _summary(local: LocalBroker) -> str:
    devices = list(local.devices) or ["<device-id>"]
    shown = devices[0] if len(devices) == 1 else f"{devices[0]} .. {devices[-1]}"
    on = "all interfaces" if local.host in ("0.0.0.0", "::") else local.host
    plain = f"{local.port} (plain MQTT), " if local.plaintext else ""
    where = f"{on}, ports {plain}{local.tls_port} (TLS), {local.mtls_port} (mutual TLS)"
    creds = local.credentials_file
    cert, key = (local.client_certificate(devices[0]) if local.devices
                 else ("tls/clients/<device-id>.crt", "tls/clients/<device-id>.key"))
    return "\n".join([
        f"fedbus broker running (mosquitto pid {local.pid}), listening on {where}",
        f"  CA:            {local.ca_file}  (devices verify the broker with it)",
        f"  topic prefix:  {local.prefix}",
        f"  accounts:      coordinator and {len(local.devices)} initial device(s): {shown}",
        f"  credentials:   {creds}  (passwords: keep this file private)",
        f"  broker log:    {local.log_file}",
        *_bridge_lines(local),
        "",
        "Point the coordinator and the agents at the credentials file, for example:",
        f"  fedbus coordinator --credentials {creds}",
        f"  fedbus agent --device-id {devices[0]} --data <your data> --credentials {creds}",
        "or, with the device's client certificate instead of its password:",
        f"  fedbus agent --device-id {devices[0]} --data <your data> --credentials {creds} \\",
        f"      --tls-cert {cert} --tls-key {key}",
        "Add a device while the broker runs (writes its bundle to "
        f"{local.bundles_dir}/<id>):",
        f"  fedbus devices --credentials {creds} add <id>",
        "",
        "Press Ctrl-C to stop the broker.",
    ])
