"""Regional brokers bridged to a root broker: the bridge section of a regional Mosquitto,
the root's account for each bridge, and the bundle that carries one to the other.

A fleet spread over sites or regions can connect each device to a Mosquitto near it (a
*regional* broker) that bridges to the *root* broker where the coordinator runs. The regional
broker opens one MQTT connection to the root (Mosquitto's bridge) and forwards:

- out (regional -> root): every device's updates and statuses;
- in (root -> regional): the task, the model, its chunks (revision 2.6), the model delta
  (revision 2.7) and the receipts.

Nothing else crosses: the fleet snapshot and the run commands stay on the root (the operator
connects there), and nothing a device writes but its update and status leaves its region.

On the root the bridge logs in as its own account, ``fedbus-bridge-<region>``, with a role
that publishes any device's update and status topic and reads what flows in. It speaks for
every device of its region, so the root cannot tell a device's own publish from the bridge's:
device-signed updates (revision 2.8, ``--require-signed-updates``) are what keeps a device's
identity end to end (docs/protocol.md section 13).

Pure functions here; ``fedbus.broker.LocalBroker`` writes the bundles (root) and appends the
section (regional).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbus.dynsec import hash_password
from fedbus.errors import ConfigError
from fedbus.topics import Topics

__all__ = [
    "BRIDGE_BUNDLE_FILE",
    "BRIDGE_ROLE_PREFIX",
    "BRIDGE_USERNAME_PREFIX",
    "REGION_AGGREGATOR_PREFIX",
    "BridgeBundle",
    "BridgeSpec",
    "bridge_role",
    "bridge_role_name",
    "bridge_topics",
    "bridge_username",
    "bundle_document",
    "check_region",
    "parse_address",
    "read_bridge_bundle",
    "region_aggregator_id",
    "region_of_aggregator",
    "render_bridge",
    "with_bridge_accounts",
]

BRIDGE_USERNAME_PREFIX = "fedbus-bridge-"
# revision 2.11: the update topic of region R's aggregator is <prefix>/update/fedbus-region-R
REGION_AGGREGATOR_PREFIX = "fedbus-region-"
BRIDGE_ROLE_PREFIX = "fedbus-bridge-"
BRIDGE_BUNDLE_FILE = "bridge.json"
# MQTT v5 on the bridge's link, as everywhere in fedbus (Mosquitto 2.0.11 accepts
# `bridge_protocol_version mqttv50`). Measured with 2.0.11: with mqttv50 and with mqttv311
# (try_private) alike, a model published live on the root arrives retained at the regional
# broker, so nothing is lost by v5 here.
PROTOCOL = "mqttv50"
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_QOS = 1


def check_region(region: str) -> str:
    """``region`` if it may name a bridge (lower-case letters, digits and '-', at most 32)."""
    if not _REGION.fullmatch(region):
        raise ConfigError(
            f"invalid region name {region!r}: use 1-32 lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return region


def bridge_username(region: str) -> str:
    return BRIDGE_USERNAME_PREFIX + check_region(region)


def bridge_role_name(region: str) -> str:
    return BRIDGE_ROLE_PREFIX + check_region(region)


def region_aggregator_id(region: str) -> str:
    """The name under which ``region``'s aggregator sends its partial updates (revision
    2.11): its update topic on the root is ``<prefix>/update/fedbus-region-<region>``."""
    return REGION_AGGREGATOR_PREFIX + check_region(region)


def region_of_aggregator(name: str) -> str | None:
    """The region of an aggregator's name (``region_aggregator_id``), else None."""
    if not name.startswith(REGION_AGGREGATOR_PREFIX):
        return None
    region = name[len(REGION_AGGREGATOR_PREFIX):]
    return region if _REGION.fullmatch(region) else None


def bridge_topics(prefix: str, aggregated: str | None = None) -> list[tuple[str, str]]:
    """(topic filter, direction) of every forwarded subscription, seen from the regional
    broker: ``out`` to the root, ``in`` from it.

    ``aggregated``: the region when a regional aggregator (revision 2.11) folds the
    devices' updates there: its partial updates go out instead of the devices' own. What
    comes in is the same (``<prefix>/receipt/+`` carries the aggregator's receipts, and the
    root's bridge role, which subscribes that exact filter, needs no change)."""
    t = Topics(prefix)
    out = t.all_updates if aggregated is None else t.update(region_aggregator_id(aggregated))
    return [(out, "out"), (t.all_status, "out"),
            (t.task, "in"), (t.model, "in"), (t.model_chunks, "in"),
            (t.model_delta, "in"), (t.receipt("+"), "in")]


def bridge_role(prefix: str, region: str) -> dict[str, Any]:
    """The root's dynamic-security role of one region's bridge: publish every device's
    update and status (``out``), receive and subscribe exactly the ``in`` filters."""
    acls: list[dict[str, Any]] = []
    for topic, direction in bridge_topics(prefix):
        if direction == "out":
            acls.append({"acltype": "publishClientSend", "topic": topic, "allow": True})
        else:
            acls += [{"acltype": "publishClientReceive", "topic": topic, "allow": True},
                     {"acltype": "subscribeLiteral", "topic": topic, "allow": True}]
    return {"rolename": bridge_role_name(region), "acls": acls}


def with_bridge_accounts(config: Mapping[str, Any], prefix: str,
                         passwords: Mapping[str, str]) -> dict[str, Any] | None:
    """The plugin's file ``config`` (read while the root broker is stopped) with an account
    and a role for every region of ``passwords`` (region -> password) that lacks them, and
    every bridge role brought up to date; None when nothing changes."""
    clients = list(config.get("clients", []))
    roles = list(config.get("roles", []))
    names = {c.get("username") for c in clients}
    changed = False
    for region, password in passwords.items():
        role = bridge_role(prefix, region)
        found = [i for i, r in enumerate(roles) if r.get("rolename") == role["rolename"]]
        if not found:
            roles.append(role)
            changed = True
        elif {(a.get("acltype"), a.get("topic")) for a in roles[found[0]].get("acls", [])} \
                != {(a["acltype"], a["topic"]) for a in role["acls"]}:
            roles[found[0]] = {**roles[found[0]], "acls": role["acls"]}
            changed = True
        if bridge_username(region) not in names:
            clients.append({"username": bridge_username(region), **hash_password(password),
                            "roles": [{"rolename": role["rolename"]}]})
            changed = True
    return {**config, "clients": clients, "roles": roles} if changed else None


@dataclass(frozen=True)
class BridgeSpec:
    """One regional broker's bridge to the root."""

    region: str
    host: str  # the root broker, as its server certificate names it
    port: int  # its TLS port (password) or mutual-TLS port (certificate)
    prefix: str
    ca_file: Path  # the root's CA certificate
    username: str  # fedbus-bridge-<region>
    password: str | None = None  # password login; None: client certificate
    cert_file: Path | None = None
    key_file: Path | None = None
    # revision 2.11: a regional aggregator runs beside this broker (bridge_topics)
    aggregated: bool = False

    def __post_init__(self) -> None:
        check_region(self.region)
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"invalid root broker port {self.port}: use 1-65535")
        if (self.password is None) == (self.cert_file is None):
            raise ConfigError("a bridge logs in with either a password or a certificate")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a bridge certificate needs its key file (and the other way)")
        for text in (self.host, self.username, self.password or "", str(self.ca_file),
                     str(self.cert_file or ""), str(self.key_file or "")):
            if any(c.isspace() for c in text):
                raise ConfigError(f"{text!r} contains white space, which mosquitto.conf "
                                  "cannot hold in this option")


def render_bridge(spec: BridgeSpec) -> str:
    """The lines of a Mosquitto 2.0 bridge section (``connection`` ...) for ``spec``.

    Put it at the end of the regional broker's mosquitto.conf: every line after
    ``connection`` belongs to the bridge until the next ``connection`` or ``listener``."""
    name = bridge_username(spec.region)
    lines = [
        f"connection {name}",
        f"address {spec.host}:{spec.port}",
        f"bridge_protocol_version {PROTOCOL}",
        # the root keeps the bridge's subscriptions and queues receipts and models while
        # the link is down; the regional broker keeps updates queued for the root
        "cleansession false",
        # the root may be restarted: keep trying; no $SYS state topic (the root's ACL would
        # refuse it, and it names the bridge to every reader)
        "notifications false",
        "try_private true",
        "restart_timeout 2 30",
        # the root replaces the client id by the username (use_username_as_clientid)
        f"remote_clientid {spec.username}",
        f"local_clientid {name}-local",
        f"bridge_cafile {spec.ca_file}",
        "bridge_insecure false",
        "bridge_require_ocsp false",
        "bridge_tls_version tlsv1.2",
    ]
    if spec.password is not None:
        lines += [f"remote_username {spec.username}", f"remote_password {spec.password}"]
    else:
        lines += [f"bridge_certfile {spec.cert_file}", f"bridge_keyfile {spec.key_file}"]
    lines += [f"topic {topic} {direction} {_QOS}" for topic, direction in bridge_topics(
        spec.prefix, spec.region if spec.aggregated else None)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BridgeBundle:
    """What the root's operator hands to a regional broker (``bridges/<region>/``)."""

    region: str
    host: str
    tls_port: int | None
    mtls_port: int | None
    prefix: str
    ca_file: Path
    username: str
    password: str | None
    cert_file: Path | None
    key_file: Path | None
    coordinator_key: str | None  # the root coordinator's public key (devices verify with it)

    def spec(self, address: tuple[str, int] | None = None,
             use_certificate: bool = True, aggregated: bool = False) -> BridgeSpec:
        """The bridge of this bundle, to ``address`` (host, port) or the bundle's own;
        ``aggregated``: a regional aggregator runs beside the regional broker."""
        cert = use_certificate and self.cert_file is not None
        if not cert and self.password is None:
            raise ConfigError("the bridge bundle has neither a certificate nor a password")
        port = self.mtls_port if cert else self.tls_port
        if address is None:
            if port is None:
                raise ConfigError("the bridge bundle names no TLS port of the root broker")
            address = (self.host, port)
        return BridgeSpec(
            region=self.region, host=address[0], port=address[1], prefix=self.prefix,
            ca_file=self.ca_file, username=self.username,
            password=None if cert else self.password,
            cert_file=self.cert_file if cert else None,
            key_file=self.key_file if cert else None, aggregated=aggregated,
        )


def bundle_document(bundle: BridgeBundle, base: Path) -> dict[str, Any]:
    """``bundle`` as the JSON of ``bridge.json``, paths relative to ``base``."""
    def rel(path: Path | None) -> str | None:
        return None if path is None else str(Path(path).relative_to(base))

    return {"bridge": {"version": 1, "region": bundle.region}, "host": bundle.host,
            "tls": {"port": bundle.tls_port, "mtls_port": bundle.mtls_port,
                    "ca_file": rel(bundle.ca_file)},
            "prefix": bundle.prefix, "coordinator_key": bundle.coordinator_key,
            "account": {"username": bundle.username, "password": bundle.password,
                        "cert_file": rel(bundle.cert_file), "key_file": rel(bundle.key_file)}}


def read_bridge_bundle(directory: Path) -> BridgeBundle:
    """The bundle in ``directory`` (written by the root's ``fedbus broker --bridge-region``)."""
    path = Path(directory) / BRIDGE_BUNDLE_FILE
    try:
        data = json.loads(path.read_text())
        return _bundle_from(data, path.parent.resolve())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: give the directory the root broker wrote "
                          "with --bridge-region (bridges/<region>)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a fedbus bridge bundle ({exc})") from None


def _bundle_from(data: Mapping[str, Any], base: Path) -> BridgeBundle:
    def path(value: Any) -> Path | None:
        return None if value is None else base / str(value)

    def port(value: Any) -> int | None:
        return None if value is None else int(value)

    account, tls = data["account"], data["tls"]
    ca = path(tls["ca_file"])
    if ca is None:
        raise ValueError("no ca_file")
    return BridgeBundle(
        region=check_region(str(data["bridge"]["region"])), host=str(data["host"]),
        tls_port=port(tls.get("port")), mtls_port=port(tls.get("mtls_port")),
        prefix=Topics(str(data["prefix"])).prefix, ca_file=ca,
        username=str(account["username"]),
        password=None if account.get("password") is None else str(account["password"]),
        cert_file=path(account.get("cert_file")), key_file=path(account.get("key_file")),
        coordinator_key=None if data.get("coordinator_key") is None
        else str(data["coordinator_key"]),
    )


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) as (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"invalid address {text!r}: use HOST:PORT, e.g. root.example:8884")
    return host, int(port)
