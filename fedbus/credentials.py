"""The credentials file that ``fedbus broker`` writes, and a device's credentials bundle.

A **credentials file** names the broker and one or more accounts. ``fedbus broker`` writes
one holding every account (the operator's file); ``fedbus devices add`` writes a **bundle**
for one device: a directory with ``credentials.json`` in the same layout holding that
device's account only, the CA certificate, and for a certificate login the device's
certificate and key. ``read_credentials`` takes either the file or the bundle directory.

Layout (JSON)::

    {"host": "127.0.0.1",
     "port": 1883,                  # plain MQTT; null when the broker has no plain listener
     "tls": {"port": 8883,          # TLS, password login
             "mtls_port": 8884,     # mutual TLS, client certificate = username
             "ca_file": "tls/ca.crt"},
     "prefix": "fedbus",
     "admin": {"username": "fedbus-admin", "password": "..."},
     "operator": {"username": "fedbus-operator", "password": "..."},  # fedbus status
     "coordinator_key": "ed25519:...",  # the public key tasks and models are signed with
     "coordinator": {"username": "coordinator", "password": "...",
                     "cert_file": "tls/clients/coordinator.crt",
                     "key_file": "tls/clients/coordinator.key",
                     "signing_key_file": "signing/coordinator.key"},
     "devices": {"device-01": {...same keys but signing_key_file...}}}

Relative paths are relative to the directory of the credentials file. ``tls``, ``cert_file``
and ``key_file`` are absent from files written before fedbus spoke TLS, ``coordinator_key``
and ``signing_key_file`` from files written before tasks and models were signed. A bundle adds
``"bundle": {"version": 1, "device": "<id>"}``, and its device account holds either a
``password`` or ``cert_file`` and ``key_file`` (then the client logs in with the
certificate, on the mutual-TLS port); it carries ``coordinator_key`` but never a
``signing_key_file``. Readers ignore keys they do not know, so the format can grow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbus.errors import ConfigError
from fedbus.signing import DEVICE_KEYS_FILE

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_VERSION",
    "SIGNING_KEY_FILE",
    "BrokerAccess",
    "BrokerAddress",
    "bundle_device",
    "bundle_document",
    "read_credentials",
    "write_bundle",
    "write_new",
    "write_operator_bundle",
]

BUNDLE_FILE = "credentials.json"
BUNDLE_VERSION = 1
_CA_FILE = "ca.crt"
# a device's Ed25519 key for signing its updates (revision 2.8), in its bundle
SIGNING_KEY_FILE = "signing.key"


@dataclass(frozen=True)
class BrokerAccess:
    host: str
    port: int | None  # plain MQTT, None when the broker has no plain listener
    prefix: str
    username: str
    password: str  # "" when the account logs in with its client certificate only
    tls_port: int | None = None
    mtls_port: int | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # this account's client certificate, if issued
    key_file: Path | None = None
    coordinator_key: str | None = None  # the coordinator's public key, "ed25519:..."
    signing_key_file: Path | None = None  # this account's Ed25519 signing key
    # the device-key file beside the credentials file (revision 2.8; it may not exist)
    device_keys_file: Path | None = None

    def port_for(self, *, tls: bool, client_certificate: bool) -> int:
        """The port to connect to: plain, TLS (password) or mutual TLS."""
        if not tls:
            port, what = self.port, "plain MQTT port (the broker has none beyond loopback: use TLS)"
        elif client_certificate:
            port, what = self.mtls_port, "mutual-TLS port (a broker without TLS?)"
        else:
            port, what = self.tls_port, "TLS port (a broker without TLS?)"
        if port is None:
            raise ConfigError(f"the credentials file names no {what}")
        return port


def read_credentials(path: str | Path, username: str) -> BrokerAccess:
    """Host, ports, prefix, CA and ``username``'s password (or certificate) from a
    credentials file, or from a bundle directory (its ``credentials.json``)."""
    path = _located(Path(path))
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"credentials file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc}") from None
    try:
        accounts = dict(data.get("devices", {}))
        # a device's (or the operator's) own copy may hold its account only
        for own in ("coordinator", "admin", "operator"):
            if own in data:
                accounts[data[own]["username"]] = data[own]
        if username not in accounts:
            known = ", ".join(sorted(accounts)) or "none"
            raise ConfigError(f"{path} has no account {username!r} (it has: {known})")
        account = accounts[username]
        tls = data.get("tls") or {}
        base = path.parent
        return BrokerAccess(
            host=str(data["host"]),
            port=_port(data["port"]),
            prefix=str(data.get("prefix", "fedbus")),
            username=username,
            password=str(account.get("password") or ""),
            tls_port=_port(tls.get("port")),
            mtls_port=_port(tls.get("mtls_port")),
            ca_file=_path(base, tls.get("ca_file")),
            cert_file=_path(base, account.get("cert_file")),
            key_file=_path(base, account.get("key_file")),
            coordinator_key=_text(data.get("coordinator_key")),
            signing_key_file=_path(base, account.get("signing_key_file")),
            device_keys_file=base / DEVICE_KEYS_FILE,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"credentials file {path} is not in the expected format: {exc}") from None


def _port(value: Any) -> int | None:
    if value is None:
        return None
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return port


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _path(base: Path, value: Any) -> Path | None:
    if value is None:
        return None
    return base / str(value)  # an absolute value stays absolute


def _located(path: Path) -> Path:
    return path / BUNDLE_FILE if path.is_dir() else path


def bundle_device(path: str | Path) -> str | None:
    """The device a bundle is for; None for a file that is not a bundle (or unreadable:
    ``read_credentials`` reports that)."""
    try:
        data = json.loads(_located(Path(path)).read_text())
        device = data["bundle"]["device"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return device if isinstance(device, str) else None


@dataclass(frozen=True)
class BrokerAddress:
    """Where devices reach the broker: what every bundle of one broker shares."""

    host: str
    port: int | None  # plain MQTT, None when the broker has none beyond loopback
    tls_port: int | None
    mtls_port: int | None
    prefix: str
    # the coordinator's public key ("ed25519:..."); every bundle carries it when known, so a
    # device verifies tasks and models from its first start
    coordinator_key: str | None = None


def bundle_document(address: BrokerAddress, device_id: str, *, password: str | None,
                    certificate: bool, signing_key: bool = False) -> dict[str, Any]:
    """The ``credentials.json`` of a bundle: the broker, the device's account (its
    ``password``, or with ``certificate`` the files ``<id>.crt`` and ``<id>.key`` beside it;
    with ``signing_key`` its update-signing key ``signing.key`` beside it, revision 2.8)
    and the coordinator's username. Pure."""
    if (password is None) == (not certificate):
        raise ValueError("a bundle holds a password or a certificate, exactly one of them")
    account: dict[str, Any] = {"username": device_id}
    if password is not None:
        account["password"] = password
    else:
        account.update(cert_file=f"{device_id}.crt", key_file=f"{device_id}.key")
    if signing_key:
        account["signing_key_file"] = SIGNING_KEY_FILE
    document: dict[str, Any] = {
        "bundle": {"version": BUNDLE_VERSION, "device": device_id},
        **_broker_fields(address),
        "coordinator": {"username": "coordinator"},
        "devices": {device_id: account},
    }
    if address.coordinator_key is not None:
        document["coordinator_key"] = address.coordinator_key
    return document


def write_bundle(directory: Path, address: BrokerAddress, device_id: str, *, ca_pem: bytes,
                 password: str | None = None, certificate_pem: bytes | None = None,
                 key_pem: bytes | None = None, signing_key_pem: bytes | None = None) -> Path:
    """Create the bundle ``directory`` (mode 0700; it must not exist): ``credentials.json``
    (0600), ``ca.crt``, for a certificate login ``<id>.crt`` and ``<id>.key`` (0600), and
    with ``signing_key_pem`` the device's update-signing key ``signing.key`` (0600).
    Nothing is ever overwritten. Returns the directory."""
    certificate = certificate_pem is not None
    if certificate != (key_pem is not None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    document = bundle_document(address, device_id, password=password, certificate=certificate,
                               signing_key=signing_key_pem is not None)
    _new_bundle_dir(directory)
    write_new(directory / _CA_FILE, ca_pem, 0o644)
    if signing_key_pem is not None:
        write_new(directory / SIGNING_KEY_FILE, signing_key_pem, 0o600)
    if certificate_pem is not None and key_pem is not None:
        write_new(directory / f"{device_id}.key", key_pem, 0o600)
        write_new(directory / f"{device_id}.crt", certificate_pem, 0o644)
    write_new(directory / BUNDLE_FILE, (json.dumps(document, indent=2) + "\n").encode(),
               0o600)
    return directory


def write_operator_bundle(directory: Path, address: BrokerAddress, *, password: str,
                          ca_pem: bytes) -> Path:
    """Create the operator's bundle ``directory`` (mode 0700; it must not exist):
    ``credentials.json`` (0600) with the ``operator`` account only, and ``ca.crt``."""
    from fedbus.dynsec import OPERATOR_USERNAME

    document: dict[str, Any] = {
        "bundle": {"version": BUNDLE_VERSION, "operator": OPERATOR_USERNAME},
        **_broker_fields(address),
        "operator": {"username": OPERATOR_USERNAME, "password": password},
    }
    _new_bundle_dir(directory)
    write_new(directory / _CA_FILE, ca_pem, 0o644)
    write_new(directory / BUNDLE_FILE, (json.dumps(document, indent=2) + "\n").encode(), 0o600)
    return directory


def _broker_fields(address: BrokerAddress) -> dict[str, Any]:
    """What every bundle says of the broker: host, ports (the CA beside the file), prefix."""
    return {
        "host": address.host,
        "port": address.port,
        "tls": {"port": address.tls_port, "mtls_port": address.mtls_port,
                "ca_file": _CA_FILE},
        "prefix": address.prefix,
    }


def _new_bundle_dir(directory: Path) -> None:
    """Make a bundle's directory (0700); an existing one is never written into."""
    try:
        directory.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        raise ConfigError(
            f"{directory} already exists; fedbus never overwrites credentials (move it away "
            "first)"
        ) from None
    except FileNotFoundError:
        raise ConfigError(f"cannot create {directory}: its parent does not exist") from None


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` and ``mode``; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
