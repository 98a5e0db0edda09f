"""``fedbus devices``: add, disable, enable, remove and list devices on a running broker."""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedbus.credentials import BrokerAccess, BrokerAddress
from fedbus.errors import ConfigError
from fedbus.signing import DEVICE_KEYS_FILE, key_text, private_key_pem, register_device_key

if TYPE_CHECKING:
    from fedbus.provision import DynsecAdmin

__all__ = ["devices"]

_DEFAULT_CREDENTIALS = Path("fedbus-broker") / "credentials.json"


@click.group(
    "devices",
    epilog="Everything goes over MQTT as the broker's admin account (fedbus-admin, in the "
    "credentials file): no restart, no other device disconnected, no shell on the broker.",
)
@click.option(
    "--credentials", type=click.Path(path_type=Path), default=_DEFAULT_CREDENTIALS,
    show_default=True, envvar="FEDBUS_DEVICES_CREDENTIALS",
    help="The operator's credentials file with the admin account (credentials.json of "
    "`fedbus broker --dir`) [env FEDBUS_DEVICES_CREDENTIALS].",
)
@click.option(
    "--timeout", type=click.FloatRange(0.5, 300), default=10.0, show_default=True,
    help="Seconds to wait for the broker and for each answer.",
)
@click.pass_context
def devices(ctx: click.Context, credentials: Path, timeout: float) -> None:
    """Manage the devices of a running broker (Mosquitto's dynamic-security plugin).

    \b
    Examples, against a broker started with `fedbus broker --dir ./trial`:
      fedbus devices --credentials trial/credentials.json add kitchen-pi
      fedbus devices --credentials trial/credentials.json add garage-pi --certificate
      fedbus devices --credentials trial/credentials.json list
      fedbus devices --credentials trial/credentials.json disable kitchen-pi
      fedbus devices --credentials trial/credentials.json remove kitchen-pi
    """
    ctx.obj = (credentials, timeout)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("fedbus.transport").setLevel(logging.WARNING)


@devices.command("init")
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="New directory for the operator's credentials.json, the broker's dynsec.json and "
    "ca.crt (and later bundles/).",
)
@click.option("--host", required=True,
              help="The broker's name or address as devices reach it (in its certificate).")
@click.option("--tls-port", type=click.IntRange(1, 65535), default=8883, show_default=True,
              help="The broker's TLS port (password logins).")
@click.option("--mtls-port", type=click.IntRange(1, 65535), default=8884, show_default=True,
              help="The broker's mutual-TLS port (certificate logins).")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="The CA certificate the broker's certificate chains to "
              "(ca.crt of `fedbus certs`).")
@click.option("--prefix", default="fedbus", show_default=True, help="Topic prefix.")
def init(directory: Path, host: str, tls_port: int, mtls_port: int, ca_file: Path,
         prefix: str) -> None:
    """Accounts for a system Mosquitto with the dynamic-security plugin.

    Writes, into a new --dir: dynsec.json (install it where the broker's
    plugin_opt_config_file points, owned by the mosquitto user: see
    deploy/mosquitto/README.md), holding the admin, coordinator and operator accounts and
    roles; credentials.json (mode 0600) with their passwords, the broker's address and the
    CA, for `fedbus devices --credentials`, `fedbus coordinator --credentials` and `fedbus
    status --credentials`; and a copy of the CA. Then add devices with `fedbus devices add`
    once the broker runs.
    """
    import json

    from fedbus import dynsec
    from fedbus.credentials import write_new
    from fedbus.topics import Topics

    try:
        Topics(prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        ca_pem = ca_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the CA certificate {ca_file}: {exc}") from None
    admin, coordinator = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    operator = secrets.token_urlsafe(24)
    config = dynsec.initial_config(prefix, admin_password=admin,
                                   coordinator_password=coordinator, devices={},
                                   operator_password=operator)
    credentials = {
        "host": host, "port": None,
        "tls": {"port": tls_port, "mtls_port": mtls_port, "ca_file": "ca.crt"},
        "prefix": prefix,
        "admin": {"username": dynsec.ADMIN_USERNAME, "password": admin},
        "coordinator": {"username": "coordinator", "password": coordinator},
        "operator": {"username": dynsec.OPERATOR_USERNAME, "password": operator},
        "devices": {},
    }
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        raise ConfigError(f"{directory} already exists; fedbus never overwrites credentials "
                          "(choose a new directory)") from None
    write_new(directory / "ca.crt", ca_pem, 0o644)
    write_new(directory / "dynsec.json", (json.dumps(config, indent=2) + "\n").encode(), 0o600)
    write_new(directory / "credentials.json",
               (json.dumps(credentials, indent=2) + "\n").encode(), 0o600)
    click.echo(f"wrote {directory}/dynsec.json (for the broker) and "
               f"{directory}/credentials.json (the operator's, mode 0600)")


@devices.command("add")
@click.argument("device_id")
@click.option(
    "--certificate", is_flag=True, default=False,
    help="Log in with a client certificate (mutual TLS) instead of a password: issues one "
    "with the CA of --pki; the account then has no password.",
)
@click.option(
    "--pki", "pki_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Directory of the CA (ca.crt, ca.key) for --certificate [default: tls/ beside the "
    "credentials file, where `fedbus broker` keeps it].",
)
@click.option(
    "--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where to write the device's credentials bundle (a new directory) [default: "
    "bundles/<id> beside the credentials file].",
)
@click.pass_obj
def add(obj: tuple[Path, float], device_id: str, certificate: bool, pki_dir: Path | None,
        bundle_dir: Path | None) -> None:
    """Create DEVICE_ID's account and write its credentials bundle.

    The bundle (a directory, mode 0700) holds credentials.json (mode 0600: the broker's
    host, ports and prefix, and the device's password or certificate), ca.crt, and with
    --certificate the device's certificate and key. Copy it to the device and run
    `fedbus agent --credentials BUNDLE --data ...`. It is written before the account is
    made, never over an existing one, and removed again if the broker refuses the account
    (kept, with a message, if the broker's answer never comes).
    """
    from fedbus import dynsec, pki
    from fedbus.credentials import read_credentials, write_bundle

    credentials, timeout = obj
    try:
        dynsec.check_new_device_id(device_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    access = read_credentials(credentials, dynsec.ADMIN_USERNAME)
    base = _operator_dir(credentials)
    target = bundle_dir or base / "bundles" / device_id
    address, ca_pem = _bundle_base(credentials, access, target)
    signer = Ed25519PrivateKey.generate()  # the device's update-signing key (revision 2.8)
    if certificate:
        if access.mtls_port is None:
            raise ConfigError(f"{credentials} names no mutual-TLS port (tls.mtls_port)")
        ca = pki.load_ca(pki_dir or base / "tls")
        issued = pki.build_client_certificate(ca, pki.new_key(), device_id,
                                              now=_now())
        password = None
        write_bundle(target, address, device_id, ca_pem=ca_pem,
                     certificate_pem=issued.certificate_pem, key_pem=issued.key_pem,
                     signing_key_pem=private_key_pem(signer))
        # so that `disable` and `remove` can revoke it
        pki.record_issued(pki_dir or base / "tls", issued.certificate_pem)
    else:
        password = secrets.token_urlsafe(24)
        write_bundle(target, address, device_id, ca_pem=ca_pem, password=password,
                     signing_key_pem=private_key_pem(signer))
    from fedbus.provision import AdminError, DynsecError

    admin = _admin(credentials, timeout)
    try:
        admin.connect()
    except BaseException:
        shutil.rmtree(target)  # made above, holding a secret no account accepts
        raise
    try:
        admin.add_device(device_id, password)
    except DynsecError:
        shutil.rmtree(target)  # the broker refused: no account has this secret
        raise
    except (AdminError, KeyboardInterrupt):
        # sent, but no answer: the account may exist with this secret, so keep it
        raise AdminError(
            f"no answer from the broker about {device_id}; its bundle is kept in {target}: "
            "check with `fedbus devices list`, and `remove` it or move the bundle away"
        ) from None
    finally:
        admin.close()
    _register_key(credentials, device_id, signer)
    how = "its client certificate" if certificate else "its password"
    click.echo(f"added {device_id} (logs in with {how}); bundle: {target}")
    click.echo("  copy it to the device, then: fedbus agent --credentials <the copied "
               "directory> --data <your data>")


@devices.command("operator")
@click.option(
    "--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where to write the operator's bundle (a new directory) [default: bundles/"
    "fedbus-operator beside the credentials file].",
)
@click.pass_obj
def operator(obj: tuple[Path, float], bundle_dir: Path | None) -> None:
    """Write the operator's credentials bundle, for `fedbus status` on another machine.

    The operator account (fedbus-operator) reads the fleet snapshot, the task, the model
    and every device's status, and writes nothing. The bundle (mode 0700) holds
    credentials.json (mode 0600) and ca.crt. A credentials file from before the operator
    account existed has no password for it: the account is then made on the running broker
    (over MQTT, as the admin) with a new password that only the bundle holds.
    """
    from fedbus import dynsec
    from fedbus.credentials import read_credentials, write_operator_bundle
    from fedbus.provision import DynsecError

    credentials, timeout = obj
    admin_access = read_credentials(credentials, dynsec.ADMIN_USERNAME)
    target = bundle_dir or _operator_dir(credentials) / "bundles" / dynsec.OPERATOR_USERNAME
    address, ca_pem = _bundle_base(credentials, admin_access, target)
    try:
        password = read_credentials(credentials, dynsec.OPERATOR_USERNAME).password
    except ConfigError:
        password = ""
    if password:
        write_operator_bundle(target, address, password=password, ca_pem=ca_pem)
        click.echo(f"wrote the operator's bundle: {target}")
    else:
        password = secrets.token_urlsafe(24)
        write_operator_bundle(target, address, password=password, ca_pem=ca_pem)
        try:
            with _admin(credentials, timeout) as admin:
                admin.send(dynsec.add_operator_commands(admin_access.prefix, password))
        except DynsecError as exc:
            shutil.rmtree(target)  # the broker refused: no account has this password
            raise ConfigError(
                f"the broker refused to make the operator account ({exc.error}); if it has "
                "one already, its password is in the bundle written when it was made"
            ) from None
        except BaseException:
            shutil.rmtree(target)
            raise
        click.echo(f"made the operator account on the broker; its bundle: {target}")
    click.echo("  on the operator's machine: fedbus status --credentials <the copied directory>")


@devices.command("bundle")
@click.argument("device_id")
@click.option(
    "--certificate", is_flag=True, default=False,
    help="Put the device's client certificate and key (made by `fedbus broker` in "
    "tls/clients/) in the bundle instead of its password: it then logs in on the mutual-TLS "
    "port.",
)
@click.option(
    "--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where to write the bundle (a new directory) [default: bundles/<id> beside the "
    "credentials file].",
)
@click.pass_obj
def bundle(obj: tuple[Path, float], device_id: str, certificate: bool,
           bundle_dir: Path | None) -> None:
    """Write the credentials bundle of DEVICE_ID, an account the credentials file already
    holds (the devices `fedbus broker --devices N` made), for the device install.

    Nothing is sent to the broker: the bundle carries the account's existing password (or
    its client certificate and key), the broker's address, the CA and the coordinator's
    public key, as `fedbus devices add` writes one. It is never written over an existing
    directory. It also holds a new update-signing key (signing.key), registered in
    signing/devices.pub beside the credentials file in place of any earlier bundle's.
    """
    from fedbus.credentials import read_credentials, write_bundle

    credentials, _ = obj
    access = read_credentials(credentials, device_id)
    if certificate and (access.cert_file is None or access.key_file is None):
        raise ConfigError(f"{credentials} holds no client certificate for {device_id}")
    if certificate and access.mtls_port is None:
        raise ConfigError(f"{credentials} names no mutual-TLS port (tls.mtls_port)")
    if not certificate and not access.password:
        raise ConfigError(f"{credentials} holds no password for {device_id}")
    try:
        cert_pem = access.cert_file.read_bytes() if certificate and access.cert_file else None
        key_pem = access.key_file.read_bytes() if certificate and access.key_file else None
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    target = bundle_dir or _operator_dir(credentials) / "bundles" / device_id
    address, ca_pem = _bundle_base(credentials, access, target)
    signer = Ed25519PrivateKey.generate()
    write_bundle(target, address, device_id, ca_pem=ca_pem,
                 password=None if certificate else access.password,
                 certificate_pem=cert_pem, key_pem=key_pem,
                 signing_key_pem=private_key_pem(signer))
    _register_key(credentials, device_id, signer)
    how = "its client certificate" if certificate else "its password"
    click.echo(f"wrote {device_id}'s bundle (logs in with {how}): {target}")
    click.echo("  copy it to the device, then: fedbus agent --credentials <the copied "
               "directory> --data <your data>")


_PKI_OPTION = click.option(
    "--pki", "pki_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Directory of the CA (ca.crt, ca.key, crl.pem) whose revocation list the broker's "
    "mutual-TLS listener reads [default: tls/ beside the credentials file, where `fedbus "
    "broker` keeps it].",
)


@devices.command("disable")
@click.argument("device_id")
@_PKI_OPTION
@click.pass_obj
def disable(obj: tuple[Path, float], device_id: str, pki_dir: Path | None) -> None:
    """Disconnect DEVICE_ID now and refuse it until `enable`; its account and bundle stay.

    Its client certificates are put on hold in the CA's revocation list, and a broker
    that `fedbus broker` runs re-reads it (SIGHUP, no session dropped), so the
    certificate is refused at the TLS handshake; a system Mosquitto needs `systemctl
    reload mosquitto`.
    """
    with _admin(*obj) as admin:
        note = _revoke(obj[0], device_id, pki_dir, hold=True)
        admin.disable_device(device_id)
    click.echo(f"disabled {device_id} (disconnected; `fedbus devices enable {device_id}` "
               f"lets it back in){note}")


@devices.command("enable")
@click.argument("device_id")
@_PKI_OPTION
@click.pass_obj
def enable(obj: tuple[Path, float], device_id: str, pki_dir: Path | None) -> None:
    """Let a disabled DEVICE_ID log in again with its old credentials (its certificates
    leave the revocation list; those of a removed device never do)."""
    with _admin(*obj) as admin:
        note = _revoke(obj[0], device_id, pki_dir, hold=None)
        admin.enable_device(device_id)
    click.echo(f"enabled {device_id}{note}")


@devices.command("remove")
@click.argument("device_id")
@_PKI_OPTION
@click.pass_obj
def remove(obj: tuple[Path, float], device_id: str, pki_dir: Path | None) -> None:
    """Delete DEVICE_ID's account: it is disconnected now and refused from then on.

    Its client certificates are revoked for good in the CA's revocation list (refused at
    the TLS handshake once the broker re-read it: see `disable`)."""
    with _admin(*obj) as admin:
        note = _revoke(obj[0], device_id, pki_dir, hold=False)
        admin.remove_device(device_id)
    register_device_key(_operator_dir(obj[0]) / DEVICE_KEYS_FILE, device_id, None)
    bundle = _operator_dir(obj[0]) / "bundles" / device_id
    gone = f"; its bundle {bundle} no longer logs in" if bundle.exists() else ""
    click.echo(f"removed {device_id}{gone}{note}")


def _revoke(credentials: Path, device_id: str, pki_dir: Path | None, *,
            hold: bool | None) -> str:
    """Revoke (``hold`` True: until enabled; False: for good) or let back in (None)
    DEVICE_ID's client certificates in the CA's revocation list, then have a local
    broker re-read it. Done before the account changes, so that the device, once
    disconnected, meets the new list when it reconnects. Returns a note for the output."""
    from fedbus import revocation
    from fedbus.broker import reload_broker

    base = _operator_dir(credentials)
    directory = pki_dir or base / "tls"
    if not (directory / "ca.key").exists():
        if pki_dir is not None:
            raise ConfigError(f"{directory} holds no CA key (ca.key): cannot revoke "
                              "certificates with it")
        return (f"\n  {directory} holds no CA key: client certificates were not revoked "
                "(give --pki with the CA's directory if this device has one)")
    known = [base / "tls" / "clients" / f"{device_id}.crt",
             base / "bundles" / device_id / f"{device_id}.crt"]
    certificates = [p.read_bytes() for p in known if p.is_file()]
    if hold is None:
        serials = revocation.lift_hold(directory, device_id, certificates=certificates)
    else:
        serials = revocation.revoke(directory, device_id, hold=hold,
                                    certificates=certificates)
    if not serials:
        return ""
    what = "let back in" if hold is None else "on hold" if hold else "revoked"
    count = f"{len(serials)} client certificate{'s' if len(serials) > 1 else ''}"
    crl = directory / revocation.CRL_FILE
    if reload_broker(base) is not None:
        return f"\n  {count} {what} in {crl}; the broker re-read it (no session dropped)"
    return (f"\n  {count} {what} in {crl}; install it where the broker's crlfile points and "
            "reload the broker (systemctl reload mosquitto) for its TLS handshake to follow")


@devices.command("list")
@click.pass_obj
def list_(obj: tuple[Path, float]) -> None:
    """The broker's devices and whether each may log in."""
    with _admin(*obj) as admin:
        entries = admin.list_devices()
    if not entries:
        click.echo("no devices")
        return
    width = max(len(e.device_id) for e in entries)
    for entry in entries:
        click.echo(f"{entry.device_id:<{width}}  {'enabled' if entry.enabled else 'disabled'}")


def _bundle_base(credentials: Path, access: BrokerAccess,
                 target: Path) -> tuple[BrokerAddress, bytes]:
    """What every bundle holds besides its account: the broker's address (from ``access``)
    and the CA certificate; makes ``target``'s parent (0700)."""
    if access.ca_file is None:
        raise ConfigError(f"{credentials} names no CA (tls.ca_file): a bundle needs it")
    try:
        ca_pem = access.ca_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the CA certificate {access.ca_file}: {exc}") from None
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    address = BrokerAddress(access.host, access.port, access.tls_port, access.mtls_port,
                            access.prefix, access.coordinator_key)
    return address, ca_pem


def _register_key(credentials: Path, device_id: str, key: Ed25519PrivateKey) -> None:
    """Put the public half of ``device_id``'s update-signing key in the device-key file
    that the coordinator reads (revision 2.8), replacing an earlier one."""
    path = _operator_dir(credentials) / DEVICE_KEYS_FILE
    register_device_key(path, device_id, key.public_key())
    click.echo(f"  its update-signing key {key_text(key)} is registered in {path}")


def _operator_dir(credentials: Path) -> Path:
    return credentials if credentials.is_dir() else credentials.parent


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _admin(credentials: Path, timeout: float) -> DynsecAdmin:
    from fedbus import dynsec
    from fedbus.credentials import read_credentials
    from fedbus.provision import DynsecAdmin, admin_settings

    access = read_credentials(credentials, dynsec.ADMIN_USERNAME)
    return DynsecAdmin(admin_settings(access), access.prefix, timeout=timeout)
