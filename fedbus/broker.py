"""A local Mosquitto broker with the fedbus policy, for the demo, the tests and small trials.

``LocalBroker`` writes everything one broker instance needs into a working directory: the
configuration of Mosquitto's dynamic-security plugin (``dynsec.json``, see
``fedbus.dynsec``) with random passwords for the admin account, the coordinator and each
initial device, a certificate authority with the broker's server certificate and a client
certificate per account (``tls/``, see ``fedbus.pki``), the coordinator's Ed25519 signing
key (``signing/coordinator.key``, see ``fedbus.signing``), a ``mosquitto.conf`` made of the
shipped policy (``broker_config/mosquitto.conf``, and after each listener line
``listener.conf`` plus ``tls.conf`` or ``mtls.conf``) plus the instance lines, and
``credentials.json`` (mode 0600) that ``fedbus coordinator``, ``fedbus agent`` and
``fedbus devices`` read. It then runs ``mosquitto`` as a child process and stops it by its
PID. Devices are added and removed while it runs with ``fedbus devices`` (``fedbus.provision``).

Secrets are made once: ``dynsec.json`` is written only into a directory that has none (from
then on Mosquitto owns it and saves every change the admin makes), and the passwords in
``credentials.json`` are read back on every start, never replaced. A directory in use by a
running broker is locked (``broker.lock``, held by the mosquitto process too), and ports
are checked before anything is written, so a second start on a live directory fails
without changing a file.

Three listeners: plain MQTT (only when the broker listens on loopback, unless asked for
explicitly), TLS with password login, and mutual TLS where the client certificate's common
name is the username. Mosquitto needs two TLS listeners for the two ways of logging in.

Restarting on the same working directory keeps the accounts, the CA and the certificates,
the ports (those left at 0 are taken from ``credentials.json``) and the persistence
database, so clients can reconnect with what they already have.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from broker_config import (
    ACL_FILE,
    LISTENER_POLICY_FILE,
    MTLS_POLICY_FILE,
    POLICY_FILE,
    TLS_POLICY_FILE,
)
from fedbus import bridge as bridges
from fedbus import dynsec, pki, revocation, signing
from fedbus.errors import ConfigError, FedbusError
from fedbus.processes import terminate
from fedbus.tls import is_loopback
from fedbus.topics import DEFAULT_PREFIX, Topics

__all__ = [
    "COORDINATOR_USERNAME",
    "DYNSEC_FILE",
    "BrokerError",
    "Credentials",
    "LocalBroker",
    "TlsListeners",
    "default_device_ids",
    "find_free_port",
    "reload_broker",
    "render_acl",
    "render_config",
]

COORDINATOR_USERNAME = "coordinator"
DYNSEC_FILE = "dynsec.json"
LOCK_FILE = "broker.lock"

_INSTALL_HINT = "install the Debian package 'mosquitto' (make setup does this)"
# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_SBIN_DIRS = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 15
_POLL_INTERVAL = 0.02
# Logged once every listener is open.
_READY_MARKER = re.compile(r"mosquitto version \S+ running")
_PORT_IN_USE = "Address already in use"
_DNS_NAME = re.compile(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_MAX_PACKET_LINE = re.compile(r"^max_packet_size[ \t]+[0-9]+[ \t]*$", re.MULTILINE)
_RETAIN_SOURCE_LINE = re.compile(r"^check_retain_source[ \t]+true[ \t]*$", re.MULTILINE)
_ACL_TOPIC_START = re.compile(
    r"^((?:topic|pattern)[ \t]+(?:(?:read|write|readwrite|deny)[ \t]+)?)fedbus(?=/|[ \t]*$)",
    re.MULTILINE,
)


class BrokerError(FedbusError):
    """The local broker could not be started or stopped; the message ends with its log."""


class _PortTakenError(BrokerError):
    """mosquitto could not bind its port because another process holds it."""


@dataclass(frozen=True)
class TlsListeners:
    """The two TLS listeners of one broker instance and the files they use."""

    port: int  # TLS, password login
    mtls_port: int  # mutual TLS, the client certificate's common name is the username
    ca_file: Path
    cert_file: Path
    key_file: Path
    tls_policy: str  # the shipped tls.conf
    mtls_policy: str  # the shipped mtls.conf
    crl_file: Path | None = None  # revoked client certificates (mutual TLS only)


@dataclass(frozen=True)
class Credentials:
    """One MQTT account on the broker."""

    username: str
    password: str = field(repr=False)


def default_device_ids(n: int) -> list[str]:
    """``device-01`` .. ``device-NN`` (at least two digits, more when ``n`` needs them)."""
    if n < 0:
        raise ValueError(f"number of devices must be >= 0, got {n}")
    width = max(2, len(str(n)))
    return [f"device-{i:0{width}d}" for i in range(1, n + 1)]


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (another process may still take it)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(address)
        return int(sock.getsockname()[1])


def render_acl(prefix: str = DEFAULT_PREFIX, template: str | None = None) -> str:
    """The shipped ACL with the first topic level ``fedbus`` of every rule set to ``prefix``.

    Only ``topic`` and ``pattern`` lines change; comments and ``user`` lines stay as they are.
    """
    prefix = _checked_prefix(prefix)
    text = ACL_FILE.read_text() if template is None else template
    return _ACL_TOPIC_START.sub(lambda m: m.group(1) + prefix, text)


def render_config(
    policy: str,
    listener_policy: str,
    *,
    host: str,
    port: int | None,
    plugin: Path,
    dynsec_file: Path,
    data_dir: Path,
    log_file: Path,
    run_as: str | None = None,
    tls: TlsListeners | None = None,
    bridge: str | None = None,
) -> str:
    """``policy`` (the shipped mosquitto.conf) followed by the lines of one instance.

    ``listener_policy`` (the shipped listener.conf) goes right after every ``listener``
    line, because Mosquitto applies those settings to the listener defined before them; on
    the TLS listeners, the shipped tls.conf or mtls.conf and the certificate files follow.
    ``port`` None: no plain MQTT listener. Accounts and access control come from the
    dynamic-security ``plugin`` and its ``dynsec_file``. ``bridge``: a bridge section
    (``fedbus.bridge.render_bridge``), put last, since every line after its ``connection``
    line belongs to it.
    """
    lines = ["# --- This instance (written by fedbus.broker.LocalBroker) ---"]
    if port is not None:
        lines += ["# plain MQTT", f"listener {port} {host}", listener_policy.strip("\n"), ""]
    if tls is not None:
        files = [f"cafile {tls.ca_file}", f"certfile {tls.cert_file}", f"keyfile {tls.key_file}"]
        crl = [] if tls.crl_file is None else [f"crlfile {tls.crl_file}"]
        for title, listen_port, tls_policy, extra in (
            ("TLS, password login", tls.port, tls.tls_policy, []),
            ("mutual TLS, the certificate's common name is the username", tls.mtls_port,
             tls.mtls_policy, crl),
        ):
            lines += [f"# {title}", f"listener {listen_port} {host}",
                      listener_policy.strip("\n"), tls_policy.strip("\n"), *files, *extra,
                      ""]
    lines += [
        f"plugin {plugin}",
        f"plugin_opt_config_file {dynsec_file}",
        # Mosquitto appends the file name to this without a separator.
        f"persistence_location {data_dir}/",
        f"log_dest file {log_file}",
    ]
    if run_as is not None:
        lines.append(f"user {run_as}")
    if bridge is not None:
        lines += ["", "# --- The bridge to the root broker (fedbus.bridge) ---",
                  bridge.strip("\n")]
    return policy.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"


class LocalBroker:
    """A Mosquitto child process with the fedbus policy, accounts, ACL and certificates.

    Use it as a context manager, or call ``start()`` and ``stop()``. A port of 0 picks a
    free one on the first start; later starts (``restart()``) keep it.

    ``plaintext``: open the plain MQTT listener (``port``); None opens it only when ``host``
    is loopback. ``tls_names``: DNS names and IP addresses devices use to reach this broker,
    written into its server certificate besides loopback (and ``host`` when it is a specific
    address). ``max_packet_size``: replaces the shipped policy's 8 MiB (tests use it to play
    a broker with a small limit, such as Mosquitto 2.1's default of 2,000,000 bytes).

    A root broker of regional ones (``fedbus.bridge``): ``bridge_regions`` makes an account
    ``fedbus-bridge-<region>`` for each, with a client certificate, and writes its bundle to
    ``bridges/<region>/``. A regional broker: ``bridge`` is the bundle the root wrote, and
    ``bridge_address`` (host, port) the address this broker reaches the root at, when not
    the bundle's; it bridges with the bundle's client certificate, and its credentials
    file (and so its device bundles) carry the root coordinator's public key.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        device_ids: Sequence[str],
        port: int = 0,
        host: str = "127.0.0.1",
        prefix: str = DEFAULT_PREFIX,
        mosquitto: str = "mosquitto",
        tls_port: int = 0,
        mtls_port: int = 0,
        plaintext: bool | None = None,
        tls_names: Sequence[str] = (),
        max_packet_size: int | None = None,
        bridge_regions: Sequence[str] = (),
        bridge: bridges.BridgeBundle | None = None,
        bridge_address: tuple[str, int] | None = None,
        region_aggregator: bool = False,
    ) -> None:
        self._workdir = _checked_workdir(Path(workdir))
        if max_packet_size is not None and not 20 <= max_packet_size <= 268_435_455:
            raise ConfigError(f"invalid max_packet_size {max_packet_size}: use 20-268435455")
        # None: the shipped policy's (8 MiB); e.g. 2,000,000, Mosquitto 2.1's default
        self._max_packet_size = max_packet_size
        self._host = _checked_host(host)
        self._prefix = _checked_prefix(prefix)
        for name, value in (("port", port), ("tls_port", tls_port), ("mtls_port", mtls_port)):
            if not 0 <= value <= 65535:
                raise ConfigError(f"invalid {name} {value}: use 1-65535, or 0 for a free port")
        self._plaintext = is_loopback(self._host) if plaintext is None else plaintext
        if not self._plaintext and port != 0:
            raise ConfigError(
                f"port {port} is the plain MQTT port, but this broker on {self._host} has no "
                "plain listener (passwords would cross the network in clear text); use the "
                "TLS ports, or ask for plain MQTT explicitly (fedbus broker --insecure-plaintext)"
            )
        self._ports = {"plain": port if self._plaintext else 0, "tls": tls_port,
                       "mtls": mtls_port}
        self._tls_names = _checked_tls_names(self._host, tls_names)
        self._mosquitto = mosquitto
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock_fd: int | None = None
        ids = _checked_device_ids(device_ids)
        previous = _previous_file(self.credentials_file)
        known = _previous_passwords(previous, self.credentials_file)
        for name, value in _previous_ports(previous).items():
            if self._ports[name] == 0 and (name != "plain" or self._plaintext):
                self._ports[name] = value
        self.admin = _account(dynsec.ADMIN_USERNAME, known)
        self.coordinator = _account(COORDINATOR_USERNAME, known)
        # reads the fleet snapshot, task, model and status (fedbus status); writes nothing
        self.operator = _account(dynsec.OPERATOR_USERNAME, known)
        # the initial devices of an earlier start, then those asked for now
        own = (dynsec.ADMIN_USERNAME, COORDINATOR_USERNAME, dynsec.OPERATOR_USERNAME)
        earlier = [d for d in known
                   if d not in own and not d.startswith(bridges.BRIDGE_USERNAME_PREFIX)]
        self.devices: dict[str, Credentials] = {
            d: _account(d, known) for d in dict.fromkeys([*earlier, *ids])
        }
        self._asked = ids
        regions = [bridges.check_region(r) for r in bridge_regions]
        if isinstance(bridge_regions, str) or len(set(regions)) != len(regions):
            raise ConfigError(f"duplicate or malformed bridge regions: {list(bridge_regions)}")
        self.bridges: dict[str, Credentials] = {
            r: _account(bridges.bridge_username(r), known) for r in regions
        }
        self._bridge = bridge
        if region_aggregator and bridge is None:
            raise ConfigError("a regional aggregator runs beside a regional broker: give the "
                              "bridge bundle too (--bridge-bundle)")
        self._bridge_spec = None if bridge is None else bridge.spec(
            bridge_address, aggregated=region_aggregator)

    # -- properties -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def client_host(self) -> str:
        """The host name clients use (``host``, or for a wildcard address the first TLS name,
        else 127.0.0.1): one that the server certificate lists."""
        if self._host in ("0.0.0.0", "::"):
            return self._tls_names[0] if self._tls_names else "127.0.0.1"
        return self._host

    @property
    def plaintext(self) -> bool:
        """Whether the plain MQTT listener is open."""
        return self._plaintext

    @property
    def port(self) -> int:
        """The plain MQTT port (0 until the first ``start()`` picked one). ``ConfigError``
        when this broker has no plain listener."""
        if not self._plaintext:
            raise ConfigError(f"the broker on {self._host} has no plain MQTT listener")
        return self._ports["plain"]

    @property
    def tls_port(self) -> int:
        """The TLS port where clients log in with a password."""
        return self._ports["tls"]

    @property
    def mtls_port(self) -> int:
        """The mutual-TLS port where a client certificate's common name is the username."""
        return self._ports["mtls"]

    @property
    def pid(self) -> int | None:
        """The PID of the running mosquitto, or None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def topics(self) -> Topics:
        return Topics(self._prefix)

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def credentials_file(self) -> Path:
        return self._workdir / "credentials.json"

    @property
    def signing_key_file(self) -> Path:
        """The coordinator's Ed25519 signing key (made once, mode 0600, never replaced); its
        public key is ``signing/coordinator.pub`` and the credentials file's
        ``coordinator_key``."""
        return self._workdir / "signing" / "coordinator.key"

    @property
    def coordinator_key(self) -> str:
        """The coordinator's public key as text (``ed25519:...``), once the broker started."""
        return signing.key_text(signing.load_private_key(self.signing_key_file))

    @property
    def log_file(self) -> Path:
        return self._workdir / "mosquitto.log"

    @property
    def config_file(self) -> Path:
        return self._workdir / "mosquitto.conf"

    @property
    def tls_dir(self) -> Path:
        """The CA (``ca.crt``, ``ca.key``), the server certificate and ``clients/``."""
        return self._workdir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / pki.CA_CERT_FILE

    def client_certificate(self, username: str) -> tuple[Path, Path]:
        """(certificate, key) of ``username``'s client certificate (made by ``start()``)."""
        self.credentials(username)  # a known account
        directory = self.tls_dir / "clients"
        return directory / f"{username}.crt", directory / f"{username}.key"

    @property
    def dynsec_file(self) -> Path:
        """The dynamic-security plugin's accounts and roles (Mosquitto saves every change)."""
        return self._workdir / DYNSEC_FILE

    @property
    def bundles_dir(self) -> Path:
        """Where ``fedbus devices add`` writes the credentials bundle of each device."""
        return self._workdir / "bundles"

    @property
    def bridge_spec(self) -> bridges.BridgeSpec | None:
        """The bridge of a regional broker to its root (None for any other broker)."""
        return self._bridge_spec

    def bridge_bundle_dir(self, region: str) -> Path:
        """Where the bundle of ``region``'s bridge is written (a root broker)."""
        return self._workdir / "bridges" / bridges.check_region(region)

    def credentials(self, username: str) -> Credentials:
        """The account ``username`` (the admin, the coordinator, the operator or an initial
        device)."""
        if username == COORDINATOR_USERNAME:
            return self.coordinator
        if username == dynsec.ADMIN_USERNAME:
            return self.admin
        if username == dynsec.OPERATOR_USERNAME:
            return self.operator
        for account in self.bridges.values():
            if account.username == username:
                return account
        try:
            return self.devices[username]
        except KeyError:
            raise ConfigError(f"no account {username!r} on this broker") from None

    # -- life cycle -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Write the instance files, run mosquitto and wait until it accepts connections.

        Nothing is written when the directory is in use by another broker, when a port
        asked for is taken, or when devices are asked for that a live directory lacks.
        """
        if self.running:
            raise BrokerError(f"broker already running (pid {self.pid})")
        self.stop()  # forget a process that exited on its own
        mosquitto = _find_executable(self._mosquitto)
        plugin = _find_plugin()
        self._workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_directory()
        try:
            self._check_before_writing()
            self._write_files()
            if any(p == 0 for p in self._open_ports().values()):
                self._launch_on_free_ports(mosquitto, plugin, timeout)
            else:
                self._launch(mosquitto, plugin, timeout)
            self._write_credentials_file()
            self._write_bridge_bundles()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto then saves its database), SIGKILL after ``timeout``. Idempotent."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            terminate(proc, timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def kill(self) -> None:
        """SIGKILL, as in a crash: nothing is saved since the last autosave. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.stop()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same ports, accounts and persistence database."""
        self.stop(timeout)
        self.start(timeout)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        ports = ", ".join(f"{k} {v}" for k, v in self._open_ports().items())
        return f"LocalBroker({self._host}: {ports}, prefix={self._prefix!r}, {state})"

    # -- internals ------------------------------------------------------------------------

    def _open_ports(self) -> dict[str, int]:
        return {k: v for k, v in self._ports.items() if k != "plain" or self._plaintext}

    def _lock_directory(self) -> None:
        """Hold ``broker.lock`` (mosquitto inherits it, so it stays held while mosquitto
        runs, even if this process dies); another start on the directory fails at once."""
        path = self._workdir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text().strip() or "?"
            raise ConfigError(
                f"a broker is already running on {self._workdir} (pid {holder}); stop it "
                "first, or add devices to it with `fedbus devices add`"
            ) from None
        self._lock_fd = fd

    def _check_before_writing(self) -> None:
        """A live directory keeps its accounts; the ports asked for must be free."""
        if self.dynsec_file.exists():
            if not self.credentials_file.exists():
                raise ConfigError(
                    f"{self.dynsec_file} exists but {self.credentials_file} does not: the "
                    "admin and coordinator passwords are lost; restore the file, or start "
                    "afresh in a new directory"
                )
            existing = _dynsec_usernames(self.dynsec_file)
            missing = [d for d in self._asked if d not in existing]
            if missing:
                raise ConfigError(
                    f"{self._workdir} already holds a broker's accounts, without "
                    f"{', '.join(missing)}: start it without --device-id/--devices and add "
                    "devices with `fedbus devices add` (removed devices stay removed)"
                )
        for name, port in self._open_ports().items():
            if port != 0 and not _bindable(self._host, port):
                raise ConfigError(
                    f"port {port} ({name}) on {self._host} is already in use by another "
                    "program; nothing was written"
                )

    def _write_files(self) -> None:
        (self._workdir / "data").mkdir(mode=0o700, exist_ok=True)
        # the signing key first: credentials.json names its public half
        signing.ensure_private_key(self.signing_key_file)
        if not self.dynsec_file.exists():
            config = dynsec.initial_config(
                self._prefix, admin_password=self.admin.password,
                coordinator_password=self.coordinator.password,
                devices={d: c.password for d, c in self.devices.items()},
                operator_password=self.operator.password,
            )
            _write_private(self.dynsec_file, json.dumps(config, indent=2) + "\n")
            # credentials.json first holds these secrets before anything can use them
            self._write_credentials_file()
        else:
            self._add_operator()
        self._add_bridges()
        self._write_certificates()

    def _add_operator(self) -> None:
        """A directory made before the operator account existed gets it now, while
        Mosquitto is stopped (the lock is held): the password first, then the account. The
        device roles of a directory made before revision 2.6 get the model's chunk topics."""
        try:
            config = json.loads(self.dynsec_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.dynsec_file}: {exc}") from None
        updated = dynsec.with_operator(config, self._prefix, self.operator.password)
        if updated is not None:
            self._write_credentials_file()
        roles = dynsec.with_device_roles(updated or config, self._prefix)
        if updated is not None or roles is not None:
            _write_private(self.dynsec_file, json.dumps(roles or updated, indent=2) + "\n")

    def _add_bridges(self) -> None:
        """The bridges' accounts and roles, added while Mosquitto is stopped (the lock is
        held): the passwords go into credentials.json first."""
        if not self.bridges:
            return
        try:
            config = json.loads(self.dynsec_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.dynsec_file}: {exc}") from None
        updated = bridges.with_bridge_accounts(
            config, self._prefix, {r: c.password for r, c in self.bridges.items()})
        if updated is not None:
            self._write_credentials_file()
            _write_private(self.dynsec_file, json.dumps(updated, indent=2) + "\n")

    def _write_bridge_bundles(self) -> None:
        """``bridges/<region>/``: bridge.json, the CA and the bridge's client certificate."""
        for region, account in self.bridges.items():
            directory = self.bridge_bundle_dir(region)
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            cert, key = self.client_certificate(account.username)
            for src, name in ((self.ca_file, pki.CA_CERT_FILE), (cert, "bridge.crt"),
                              (key, "bridge.key")):
                _write_private(directory / name, src.read_text())
            bundle = bridges.BridgeBundle(
                region=region, host=self.client_host, tls_port=self._ports["tls"] or None,
                mtls_port=self._ports["mtls"] or None, prefix=self._prefix,
                ca_file=directory / pki.CA_CERT_FILE, username=account.username,
                password=account.password, cert_file=directory / "bridge.crt",
                key_file=directory / "bridge.key", coordinator_key=self.coordinator_key)
            _write_private(directory / bridges.BRIDGE_BUNDLE_FILE, json.dumps(
                bridges.bundle_document(bundle, directory), indent=2) + "\n")

    def _write_certificates(self) -> None:
        """The CA (made once, never replaced), a server certificate that names this broker
        (issued again when it is missing, expires within 30 days or lacks a name), and a
        client certificate for every account that has none."""
        ca, _ = pki.ensure_ca(self.tls_dir)
        cert, key = self.tls_dir / "server.crt", self.tls_dir / "server.key"
        current = cert.read_bytes() if cert.exists() and key.exists() else None
        now = dt.datetime.now(dt.UTC)
        if current is None or not pki.server_certificate_covers(current, self._tls_names,
                                                                now=now):
            for path in (cert, key):
                path.unlink(missing_ok=True)
            pki.issue_server_certificate(ca, self._tls_names, cert, key, now=now)
        clients = self.tls_dir / "clients"
        clients.mkdir(mode=0o700, exist_ok=True)
        for username in [self.coordinator.username, *self.devices,
                         *(c.username for c in self.bridges.values())]:
            cert, key = self.client_certificate(username)
            if not (cert.exists() and key.exists()):
                for path in (cert, key):
                    path.unlink(missing_ok=True)
                pki.issue_client_certificate(ca, username, cert, key, now=now,
                                             register=self.tls_dir)
        revocation.ensure_crl(self.tls_dir, now=now)

    def _tls_listeners(self) -> TlsListeners:
        return TlsListeners(
            port=self._ports["tls"],
            mtls_port=self._ports["mtls"],
            ca_file=self.ca_file,
            cert_file=self.tls_dir / "server.crt",
            key_file=self.tls_dir / "server.key",
            tls_policy=TLS_POLICY_FILE.read_text(),
            mtls_policy=MTLS_POLICY_FILE.read_text(),
            crl_file=self.tls_dir / revocation.CRL_FILE,
        )

    def _config_text(self, plugin: Path) -> str:
        policy = POLICY_FILE.read_text()
        if self._max_packet_size is not None:
            policy, found = _MAX_PACKET_LINE.subn(f"max_packet_size {self._max_packet_size}",
                                                  policy)
            assert found == 1, "the shipped policy sets max_packet_size once"
        if self._bridge_spec is not None:
            # Mosquitto 2.0.11 checks a retained message's source against the ACL before
            # handing it out; the bridge's local side has no username, so the dynamic-
            # security plugin refuses it and the retained task and model that came over the
            # bridge would never reach a device that subscribes later.
            policy, found = _RETAIN_SOURCE_LINE.subn("check_retain_source false", policy)
            assert found == 1, "the shipped policy sets check_retain_source once"
        return render_config(
            policy,
            LISTENER_POLICY_FILE.read_text(),
            host=self._host,
            port=self._ports["plain"] if self._plaintext else None,
            plugin=plugin,
            dynsec_file=self.dynsec_file,
            data_dir=self._workdir / "data",
            log_file=self.log_file,
            # As root, mosquitto would switch to the `mosquitto` user and lose access to
            # these files; it stays the current user when told to be that user.
            run_as=pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None,
            tls=self._tls_listeners(),
            bridge=None if self._bridge_spec is None else bridges.render_bridge(
                self._bridge_spec),
        )

    def _launch_on_free_ports(self, mosquitto: str, plugin: Path, timeout: float) -> None:
        """Pick free ports for those left at 0 and launch; if another process took one
        meanwhile, pick again."""
        wanted = [k for k, v in self._open_ports().items() if v == 0]
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                taken = set(self._open_ports().values())
                for name in wanted:
                    port = find_free_port(self._host)
                    while port in taken:  # the OS may offer the same port twice
                        port = find_free_port(self._host)
                    taken.add(port)
                    self._ports[name] = port
            except OSError as exc:
                raise ConfigError(f"cannot listen on {self._host}: {exc}") from None
            try:
                self._launch(mosquitto, plugin, timeout)
                return
            except BrokerError as exc:
                for name in wanted:
                    self._ports[name] = 0
                if not isinstance(exc, _PortTakenError) or attempt == _PORT_ATTEMPTS:
                    raise

    def _where(self) -> str:
        return f"{self._host} port(s) {', '.join(str(p) for p in self._open_ports().values())}"

    def _launch(self, mosquitto: str, plugin: Path, timeout: float) -> None:
        """Write the config for the current ports, run mosquitto and wait until it is ready."""
        self.config_file.write_text(self._config_text(plugin))
        output = _LaunchOutput(self.log_file, self._workdir / "mosquitto.out")
        with output.stdout_file.open("wb") as out:
            proc = subprocess.Popen(
                [mosquitto, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker
                # the directory lock stays held while mosquitto runs
                pass_fds=() if self._lock_fd is None else (self._lock_fd,),
            )
        self._proc = proc
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{proc.pid}\n".encode(), 0)
        self._finalizer = weakref.finalize(self, terminate, proc, 5.0)
        try:
            self._wait_ready(proc, output, timeout)
        except BrokerError as exc:
            self.stop()
            if _PORT_IN_USE in output.text():
                raise _PortTakenError(
                    f"{self._where()}: a port is already in use by another program"
                    f"{output.tail()}"
                ) from exc
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes], output: _LaunchOutput,
                    timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports = list(self._open_ports().values())
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise BrokerError(
                    f"mosquitto exited with code {code} while starting on "
                    f"{self._where()}{output.tail()}"
                )
            if _READY_MARKER.search(output.log_text()) and all(
                _accepts(self._host, p) for p in ports
            ):
                return
            time.sleep(_POLL_INTERVAL)
        raise BrokerError(
            f"mosquitto did not accept connections on {self._where()} "
            f"within {timeout:g} s{output.tail()}"
        )

    def _write_credentials_file(self) -> None:
        def entry(account: Credentials) -> dict[str, str]:
            cert, key = self.client_certificate(account.username)
            return {**_account_json(account),
                    "cert_file": str(cert.relative_to(self._workdir)),
                    "key_file": str(key.relative_to(self._workdir))}

        data: dict[str, Any] = {
            "host": self.client_host,
            # plain MQTT; null when this broker has none (it listens beyond loopback)
            "port": (self._ports["plain"] or None) if self._plaintext else None,
            "tls": {
                "port": self._ports["tls"] or None,
                "mtls_port": self._ports["mtls"] or None,
                # relative paths are relative to this file's directory
                "ca_file": str(self.ca_file.relative_to(self._workdir)),
            },
            "prefix": self._prefix,
            # the dynamic-security plugin's admin (fedbus devices); no MQTT topic rights
            "admin": _account_json(self.admin),
            # reads the fleet snapshot, task, model and status (fedbus status)
            "operator": _account_json(self.operator),
            # the public key devices verify tasks and models with (fedbus.signing); on a
            # regional broker, the root coordinator's
            "coordinator_key": (self._bridge.coordinator_key
                                if self._bridge is not None and self._bridge.coordinator_key
                                else self.coordinator_key),
            "coordinator": {
                **entry(self.coordinator),
                "signing_key_file": str(self.signing_key_file.relative_to(self._workdir)),
            },
            "devices": {d: entry(c) for d, c in self.devices.items()},
        }
        if self.bridges:  # a root broker: the accounts of its regional bridges
            data["bridges"] = {r: entry(c) for r, c in self.bridges.items()}
        text = json.dumps(data, indent=2) + "\n"
        with contextlib.suppress(OSError):
            if self.credentials_file.read_text() == text:
                return  # unchanged: leave the file alone
        _write_private(self.credentials_file, text)


class _LaunchOutput:
    """What one mosquitto start wrote: its log (appended to) and its stdout/stderr."""

    def __init__(self, log_file: Path, stdout_file: Path) -> None:
        self.log_file = log_file
        self.stdout_file = stdout_file
        self._log_offset = log_file.stat().st_size if log_file.exists() else 0

    def log_text(self) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def text(self) -> str:
        try:
            stdout = self.stdout_file.read_text(errors="replace")
        except FileNotFoundError:
            stdout = ""
        return stdout + self.log_text()

    def tail(self) -> str:
        lines = [line for line in self.text().splitlines() if line.strip()]
        if not lines:
            return f" (no output; see {self.log_file})"
        shown = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"\n--- last lines of mosquitto's output ({self.log_file}) ---\n{shown}"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _find_executable(name: str) -> str:
    if os.sep in name:
        found = name if os.access(name, os.X_OK) and Path(name).is_file() else None
    else:
        found = shutil.which(name) or shutil.which(name, path=_SBIN_DIRS)
    if found is None:
        raise ConfigError(f"{Path(name).name} not found: {_INSTALL_HINT}")
    return found


_RELOADED_MARKER = "Reloading config."


def reload_broker(workdir: Path, *, timeout: float = 5.0) -> int | None:
    """Have the mosquitto of a ``LocalBroker`` directory (``fedbus broker --dir``) read its
    certificates and revocation list again (SIGHUP), and wait until it logged the reload.

    Returns its PID, or None when no broker runs on ``workdir``. Mosquitto 2.0.11 keeps
    every session over a SIGHUP and re-reads its plugin's file (which the plugin saves on
    every change), so nobody is disconnected (tests/test_revocation.py)."""
    workdir = Path(workdir)
    try:
        fd = os.open(workdir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds the lock: no broker runs here
        except BlockingIOError:
            pass
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = "mosquitto"  # no /proc: trust the lock, which only mosquitto holds
    if not comm.startswith("mosquitto"):
        raise BrokerError(f"{workdir / LOCK_FILE} names pid {pid}, which is {comm!r}, "
                          "not mosquitto")
    log_file = workdir / "mosquitto.log"
    start = log_file.stat().st_size if log_file.exists() else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return None
    except PermissionError:
        raise BrokerError(f"not allowed to signal mosquitto (pid {pid}) to re-read its "
                          "revocation list: run this as the broker's user") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), log_file.open("rb") as fh:
            fh.seek(start)
            if _RELOADED_MARKER.encode() in fh.read():
                return pid
        time.sleep(_POLL_INTERVAL)
    raise BrokerError(f"mosquitto (pid {pid}) did not log a reload within {timeout:g} s; "
                      f"see {log_file}")


def _find_plugin() -> Path:
    for candidate in dynsec.PLUGIN_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise ConfigError(
        "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) not found in "
        f"{', '.join(str(Path(p).parent) for p in dynsec.PLUGIN_PATHS)}: {_INSTALL_HINT}"
    )


def _bindable(host: str, port: int) -> bool:
    """False when another program listens on ``port`` of ``host`` right now (other bind
    errors are left for mosquitto to report)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return exc.errno != errno.EADDRINUSE
    return True


def _dynsec_usernames(path: Path) -> set[str]:
    """The accounts in the plugin's file (Mosquitto keeps it up to date)."""
    try:
        data = json.loads(path.read_text())
        return {str(c["username"]) for c in data.get("clients", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, replacing the file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    os.replace(tmp, path)


def _account(username: str, known: dict[str, str]) -> Credentials:
    return Credentials(username, known.get(username) or secrets.token_urlsafe(24))


def _account_json(account: Credentials) -> dict[str, str]:
    return {"username": account.username, "password": account.password}


def _previous_file(path: Path) -> dict[str, Any]:
    """An earlier start's credentials file ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a fedbus credentials file ({exc}); move it away to start afresh"
        ) from None


def _previous_passwords(data: dict[str, Any], path: Path) -> dict[str, str]:
    """Passwords from an earlier start's credentials file, so restarts keep them."""
    if not data:
        return {}
    try:
        accounts = [data["coordinator"], *data.get("devices", {}).values()]
        accounts += [data[own] for own in ("admin", "operator") if own in data]
        accounts += list(data.get("bridges", {}).values())
        return {str(a["username"]): str(a["password"]) for a in accounts}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{path} is not a fedbus credentials file ({exc}); move it away to start afresh"
        ) from None


def _previous_ports(data: dict[str, Any]) -> dict[str, int]:
    """The ports of an earlier start, kept when the new one leaves them at 0 (so that the
    devices' bundles stay right)."""
    found_tls = data.get("tls")
    tls: dict[str, Any] = found_tls if isinstance(found_tls, dict) else {}
    found = {"plain": data.get("port"), "tls": tls.get("port"), "mtls": tls.get("mtls_port")}
    return {k: v for k, v in found.items() if isinstance(v, int) and 0 < v <= 65535}


def _checked_device_ids(device_ids: Sequence[str]) -> list[str]:
    if isinstance(device_ids, str):
        raise ConfigError("device_ids must be a list of ids, not one string")
    ids = list(device_ids)
    for device_id in ids:
        try:
            dynsec.check_new_device_id(device_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    duplicates = sorted({d for d in ids if ids.count(d) > 1})
    if duplicates:
        raise ConfigError(f"duplicate device ids: {', '.join(duplicates)}")
    return ids


def _checked_prefix(prefix: str) -> str:
    try:
        return Topics(prefix).prefix
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _checked_host(host: str) -> str:
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"invalid host {host!r}")
    return host


def _checked_tls_names(host: str, names: Sequence[str]) -> list[str]:
    """``names`` checked, plus ``host`` itself unless it is a wildcard address (the server
    certificate always names loopback too)."""
    if isinstance(names, str):
        raise ConfigError("tls_names must be a list of names, not one string")
    out = [n.strip() for n in names]
    if host not in ("0.0.0.0", "::"):
        out.append(host)
    for name in out:
        if not (_is_ip(name) or _DNS_NAME.fullmatch(name)):
            raise ConfigError(f"invalid TLS name {name!r}: give a DNS name or an IP address")
    return list(dict.fromkeys(out))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _checked_workdir(workdir: Path) -> Path:
    # The paths go into mosquitto.conf, one option per line.
    if any(c in str(workdir) for c in "\r\n"):
        raise ConfigError(f"broker directory {str(workdir)!r} contains a line break")
    return workdir.resolve()
