"""Reading the credentials file that ``fedbus broker`` writes for a local broker.

Layout (JSON)::

    {"host": "127.0.0.1",
     "port": 1883,                  # plain MQTT; null when the broker has no plain listener
     "tls": {"port": 8883,          # TLS, password login
             "mtls_port": 8884,     # mutual TLS, client certificate = username
             "ca_file": "tls/ca.crt"},
     "prefix": "fedbus",
     "coordinator_key": "ed25519:...",  # the public key tasks and models are signed with
     "coordinator": {"username": "coordinator", "password": "...",
                     "cert_file": "tls/clients/coordinator.crt",
                     "key_file": "tls/clients/coordinator.key",
                     "signing_key_file": "signing/coordinator.key"},
     "devices": {"device-01": {...same keys but signing_key_file...}}}

Relative paths are relative to the directory of the credentials file. ``tls``, ``cert_file``
and ``key_file`` are absent from files written before fedbus spoke TLS, ``coordinator_key``
and ``signing_key_file`` from files written before tasks and models were signed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbus.errors import ConfigError

__all__ = ["BrokerAccess", "read_credentials"]


@dataclass(frozen=True)
class BrokerAccess:
    host: str
    port: int | None  # plain MQTT, None when the broker has no plain listener
    prefix: str
    username: str
    password: str
    tls_port: int | None = None
    mtls_port: int | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # this account's client certificate, if issued
    key_file: Path | None = None
    coordinator_key: str | None = None  # the coordinator's public key, "ed25519:..."
    signing_key_file: Path | None = None  # this account's signing key (the coordinator's)

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
    """Host, ports, prefix, CA and ``username``'s password from a credentials.json file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"credentials file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc}") from None
    try:
        accounts = dict(data.get("devices", {}))
        if "coordinator" in data:  # a device's own copy may hold its account only
            accounts[data["coordinator"]["username"]] = data["coordinator"]
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
            password=str(account["password"]),
            tls_port=_port(tls.get("port")),
            mtls_port=_port(tls.get("mtls_port")),
            ca_file=_path(base, tls.get("ca_file")),
            cert_file=_path(base, account.get("cert_file")),
            key_file=_path(base, account.get("key_file")),
            coordinator_key=_text(data.get("coordinator_key")),
            signing_key_file=_path(base, account.get("signing_key_file")),
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
