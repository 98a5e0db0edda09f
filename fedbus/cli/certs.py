"""``fedbus certs``: the certificate authority, the broker's certificate and device
certificates for a broker that ``fedbus broker`` does not run (a system Mosquitto)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import click

from fedbus import pki, revocation
from fedbus.errors import FedbusError
from fedbus.topics import validate_device_id

__all__ = ["certs"]


@click.command(
    "certs",
    epilog="Files are never overwritten: --renew moves the old certificate and key aside "
    "(*.old-<time>) before issuing new ones. The CA key is made once and never replaced.",
)
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
    default=Path("fedbus-pki"), show_default=True,
    help="Directory of the CA (ca.crt, ca.key), the broker's server.crt/server.key and "
    "clients/<id>.crt/.key. `fedbus broker --dir D` uses D/tls.",
)
@click.option(
    "--server-name", "server_names", multiple=True, metavar="NAME",
    help="DNS name or IP address devices use to reach the broker (repeatable); issues "
    "server.crt for them and loopback.",
)
@click.option(
    "--device", "devices", multiple=True, metavar="ID",
    help="Issue a client certificate whose name is this device id (repeatable); "
    "`coordinator` for the coordinator.",
)
@click.option(
    "--days", type=click.IntRange(1, 36500), default=pki.CLIENT_DAYS, show_default=True,
    help="Validity of the certificates issued now (never beyond the CA's).",
)
@click.option(
    "--ca-days", type=click.IntRange(1, 36500), default=pki.CA_DAYS, show_default=True,
    help="Validity of the CA when it is made.",
)
@click.option(
    "--renew", is_flag=True, default=False,
    help="Issue the named certificates again even if they exist (the old files are kept "
    "as *.old-<time>).",
)
def certs(directory: Path, server_names: Sequence[str], devices: Sequence[str], days: int,
          ca_days: int, renew: bool) -> None:
    """Make a certificate authority and issue broker and device certificates.

    The first run makes the CA in --dir (ca.key mode 0600: keep it off the broker if you
    can). Devices trust ca.crt; each one can log in with its own certificate on the
    broker's mutual-TLS listener, its common name being the device id (the MQTT username).

    \b
    Examples:
      fedbus certs --dir ./pki --server-name broker.lan --server-name 192.168.1.10
      fedbus certs --dir ./pki --device device-09          # add a device
      fedbus certs --dir ./pki --device device-09 --renew  # renew its certificate
    """
    try:
        for device in devices:
            if device != "coordinator":
                validate_device_id(device)
        ca, created = pki.ensure_ca(directory, days=ca_days)
        click.echo(f"{'made' if created else 'using'} CA {directory / pki.CA_CERT_FILE} "
                   f"(valid until {ca.certificate.not_valid_after_utc:%Y-%m-%d})")
        if server_names:
            cert, key = directory / "server.crt", directory / "server.key"
            if _free(cert, key, renew):
                pki.issue_server_certificate(ca, server_names, cert, key, days=days)
                click.echo(f"issued {cert} for {', '.join(server_names)} and loopback")
            else:
                click.echo(f"kept {cert} (exists; --renew to issue it again)")
        if devices:
            (directory / "clients").mkdir(mode=0o700, exist_ok=True)
        for device in devices:
            cert = directory / "clients" / f"{device}.crt"
            key = directory / "clients" / f"{device}.key"
            if _free(cert, key, renew):
                pki.issue_client_certificate(ca, device, cert, key, days=days,
                                             register=directory)
                click.echo(f"issued {cert} and {key.name} for {device}")
            else:
                click.echo(f"kept {cert} (exists; --renew to issue it again)")
        crl = revocation.ensure_crl(directory)
        click.echo(f"revocation list {crl} (the broker's crlfile on the mutual-TLS listener)")
    except (FedbusError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _free(cert: Path, key: Path, renew: bool) -> bool:
    """True when the pair can be issued: absent, or moved aside because of ``renew``."""
    present = [p for p in (cert, key) if p.exists()]
    if not present:
        return True
    if not renew:
        return False
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for path in present:
        path.rename(path.with_name(f"{path.name}.old-{stamp}"))
    return True
