"""Mosquitto's dynamic-security plugin: the fedbus policy as roles, and its control API.

Pure functions only (no MQTT, no files): the initial configuration file that ``fedbus
broker`` writes before Mosquitto first starts, the JSON commands that add, disable, enable,
remove and list devices on a running broker (sent by ``fedbus.provision`` on
``$CONTROL/dynamic-security/v1``), and the reading of the plugin's answers.

The policy of ``broker_config/fedbus.acl`` expressed as roles:

- ``fedbus-admin`` (the account ``fedbus-admin``): the control topics only, nothing under the
  prefix;
- ``fedbus-coordinator`` (the account ``coordinator``): publish, receive, subscribe and
  unsubscribe anything under ``<prefix>/``;
- ``fedbus-device-<id>``, one role per device, granted to the account ``<id>`` alone: publish
  its own update topic; publish and receive its own status topic; receive (and subscribe
  exactly to) the task, the model, the model delta (revision 2.7) and its own receipts.
  Nothing else.
- ``fedbus-operator`` (the account ``fedbus-operator``, for ``fedbus status`` and
  ``fedbus run``): receive and subscribe to the fleet snapshot, the task, the model and
  every device's status; publish the run commands (``<prefix>/control``, revision 2.5),
  nothing else.

Anything no role grants is denied (``defaultACLAccess`` all false but ``unsubscribe``).
Unlike the ACL file, the plugin also checks SUBSCRIBE: a device's subscription to a topic
it may not read is refused in the SUBACK (reason 0x87).

A device's rights live in its own role rather than in a pattern shared by every account
because Mosquitto 2.0.11's plugin does not expand ``%u`` in role topics, and because a
shared role would grant its rights to any certificate the CA signed: on the mutual-TLS
listener (``use_identity_as_username``) Mosquitto never asks the plugin whether the account
exists or is enabled, so only the ACL check stands between a removed device's certificate
and the topics. Disabling a device therefore also takes its role away.

Passwords are stored as the plugin stores them: PBKDF2-HMAC-SHA512, a 12-byte random salt,
64-byte key, base64 (checked against the hash ``mosquitto_ctrl dynsec init`` writes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedbus.errors import FedbusError
from fedbus.topics import Topics, validate_device_id

__all__ = [
    "ADMIN_ROLE",
    "ADMIN_USERNAME",
    "CONTROL_TOPIC",
    "COORDINATOR_ROLE",
    "DEVICE_ROLE_PREFIX",
    "OPERATOR_ROLE",
    "OPERATOR_USERNAME",
    "PLUGIN_PATHS",
    "RESPONSE_TOPIC",
    "DeviceEntry",
    "DynsecError",
    "add_device_commands",
    "add_operator_commands",
    "admin_role",
    "check_new_device_id",
    "coordinator_role",
    "device_role",
    "device_role_name",
    "devices_from_list",
    "disable_device_commands",
    "enable_device_commands",
    "encode_commands",
    "hash_password",
    "initial_config",
    "list_clients_command",
    "operator_role",
    "read_responses",
    "remove_device_commands",
    "with_device_roles",
    "with_operator",
]

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
ADMIN_USERNAME = "fedbus-admin"
ADMIN_ROLE = "fedbus-admin"
COORDINATOR_ROLE = "fedbus-coordinator"
DEVICE_ROLE_PREFIX = "fedbus-device-"
OPERATOR_USERNAME = "fedbus-operator"
OPERATOR_ROLE = "fedbus-operator"
# Where Debian and Raspberry Pi OS install the plugin (first match wins).
PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
_SALT_BYTES = 12
_KEY_BYTES = 64
# What mosquitto_ctrl uses. The passwords fedbus makes are 192-bit random strings, so the
# iteration count protects nothing; a higher one would only cost the broker at every login.
_ITERATIONS = 101
_RESERVED = {ADMIN_USERNAME, "coordinator", OPERATOR_USERNAME}
_BRIDGE_PREFIX = "fedbus-bridge-"  # fedbus.bridge.BRIDGE_USERNAME_PREFIX
_REGION_PREFIX = "fedbus-region-"  # fedbus.bridge.REGION_AGGREGATOR_PREFIX (revision 2.11)


class DynsecError(FedbusError):
    """The plugin refused a command (``command`` and the plugin's ``error`` text), or its
    answer could not be read."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


@dataclass(frozen=True)
class DeviceEntry:
    """One device as the plugin lists it."""

    device_id: str
    enabled: bool  # not disabled, and holding its role (it may publish its updates)


# -- passwords and roles ------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = _ITERATIONS) -> dict[str, Any]:
    """The ``password``, ``salt`` and ``iterations`` fields of a client in the plugin's file."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _KEY_BYTES)
    return {"password": base64.b64encode(key).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def admin_role() -> dict[str, Any]:
    """Send commands and read the answers on the control topics; nothing else."""
    topic = "$CONTROL/dynamic-security/#"
    return {"rolename": ADMIN_ROLE, "acls": [
        _acl(kind, topic)
        for kind in ("publishClientSend", "publishClientReceive", "subscribePattern",
                     "unsubscribePattern")
    ]}


def coordinator_role(prefix: str) -> dict[str, Any]:
    """Everything under the prefix."""
    everything = f"{Topics(prefix).prefix}/#"
    return {"rolename": COORDINATOR_ROLE, "acls": [
        _acl(kind, everything)
        for kind in ("publishClientSend", "publishClientReceive", "subscribePattern",
                     "unsubscribePattern")
    ]}


def device_role_name(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


def device_role(prefix: str, device_id: str) -> dict[str, Any]:
    """What one device may do: the rows of ``broker_config/fedbus.acl`` for this device."""
    validate_device_id(device_id)
    t = Topics(prefix)
    acls = [_acl("publishClientSend", t.update(device_id)),
            _acl("publishClientSend", t.status(device_id))]
    for topic in (t.task, t.model, t.model_delta, t.receipt(device_id), t.status(device_id)):
        acls += [_acl("publishClientReceive", topic), _acl("subscribeLiteral", topic)]
    # the chunks of a model over the broker's packet limit (revision 2.6)
    acls += [_acl("publishClientReceive", t.model_chunks),
             _acl("subscribePattern", t.model_chunks)]
    return {"rolename": device_role_name(device_id), "acls": acls}


def operator_role(prefix: str) -> dict[str, Any]:
    """Read what an operator's status view shows: the fleet snapshot, the task, the model
    and every device's status; publish the run commands (revision 2.5). No update and no
    receipt."""
    t = Topics(prefix)
    acls = [_acl("publishClientSend", t.control)]
    for topic in (t.fleet, t.task, t.model):
        acls += [_acl("publishClientReceive", topic), _acl("subscribeLiteral", topic)]
    for pattern in (t.model_chunks, t.all_status):
        acls += [_acl("publishClientReceive", pattern), _acl("subscribePattern", pattern)]
    return {"rolename": OPERATOR_ROLE, "acls": acls}


def check_new_device_id(device_id: str) -> str:
    """``device_id`` if it may name a new device (ValueError otherwise)."""
    validate_device_id(device_id)
    if device_id in _RESERVED:
        raise ValueError(f"{device_id!r} is reserved for fedbus's own accounts")
    if device_id.startswith(_BRIDGE_PREFIX):
        raise ValueError(f"{device_id!r}: names starting with {_BRIDGE_PREFIX!r} are "
                         "reserved for the accounts of regional bridges")
    if device_id.startswith(_REGION_PREFIX):
        raise ValueError(f"{device_id!r}: names starting with {_REGION_PREFIX!r} are "
                         "reserved for regional aggregators")
    return device_id


# -- the initial file -------------------------------------------------------------------------


def initial_config(prefix: str, *, admin_password: str, coordinator_password: str,
                   devices: Mapping[str, str],
                   operator_password: str | None = None) -> dict[str, Any]:
    """The plugin's configuration file before Mosquitto first starts: the admin and the
    coordinator, ``devices`` (id -> password) each with its own role, and the operator's
    role with, given ``operator_password``, its account."""
    def client(username: str, password: str, role: str) -> dict[str, Any]:
        return {"username": username, **hash_password(password),
                "roles": [{"rolename": role}]}

    for device_id in devices:
        check_new_device_id(device_id)
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": [client(ADMIN_USERNAME, admin_password, ADMIN_ROLE),
                    client("coordinator", coordinator_password, COORDINATOR_ROLE),
                    *([] if operator_password is None else
                      [client(OPERATOR_USERNAME, operator_password, OPERATOR_ROLE)]),
                    *(client(d, p, device_role_name(d)) for d, p in devices.items())],
        "groups": [],
        "roles": [admin_role(), coordinator_role(prefix), operator_role(prefix),
                  *(device_role(prefix, d) for d in devices)],
    }


def with_operator(config: Mapping[str, Any], prefix: str,
                  operator_password: str) -> dict[str, Any] | None:
    """``config`` (the plugin's file, read while the broker is stopped) with the operator's
    role and account added, or its role brought up to date (revision 2.5 lets it publish
    the run commands), and every device's role brought up to date (revision 2.7 lets it
    read the model delta); None if all are as they should be (nothing to change). For
    broker directories made before the operator account existed, or before those
    revisions."""
    clients = list(config.get("clients", []))
    role = operator_role(prefix)
    has_account = any(c.get("username") == OPERATOR_USERNAME for c in clients)
    stored = [r for r in config.get("roles", []) if r.get("rolename") == OPERATOR_ROLE]
    roles = [r for r in config.get("roles", []) if r.get("rolename") != OPERATOR_ROLE]
    devices_current = True
    for i, r in enumerate(roles):
        name = str(r.get("rolename", ""))
        if not name.startswith(DEVICE_ROLE_PREFIX):
            continue
        try:
            want = device_role(prefix, name[len(DEVICE_ROLE_PREFIX):])
        except ValueError:
            continue  # not a role fedbus made
        if _acl_set(r) != _acl_set(want):
            roles[i], devices_current = want, False
    if has_account and stored and _acl_set(stored[0]) == _acl_set(role) and devices_current:
        return None
    if not has_account:
        clients.append({"username": OPERATOR_USERNAME, **hash_password(operator_password),
                        "roles": [{"rolename": OPERATOR_ROLE}]})
    return {**config, "clients": clients, "roles": [*roles, role]}


def with_device_roles(config: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    """``config`` with every device role brought up to date (revision 2.6 lets a device
    read the chunks of a model), or None if they all are. A role keeps its name, so a
    device whose role was taken away (disabled) stays without it."""
    roles = list(config.get("roles", []))
    changed = False
    for i, role in enumerate(roles):
        name = role.get("rolename", "")
        if not isinstance(name, str) or not name.startswith(DEVICE_ROLE_PREFIX):
            continue
        try:
            wanted = device_role(prefix, name[len(DEVICE_ROLE_PREFIX):])
        except ValueError:
            continue
        if _acl_set(role) != _acl_set(wanted):
            roles[i] = {**role, "acls": wanted["acls"]}
            changed = True
    return {**config, "roles": roles} if changed else None


def _acl_set(role: Mapping[str, Any]) -> set[tuple[Any, Any, Any]]:
    """A role's rules as a set: Mosquitto saves them in its own order, with its own keys
    (a priority) beside ours, so two equal roles need not be equal dicts."""
    return {(a.get("acltype"), a.get("topic"), a.get("allow", True))
            for a in role.get("acls", [])}


def add_operator_commands(prefix: str, password: str) -> list[dict[str, Any]]:
    """Create the operator's role and its account on a running broker."""
    return [{"command": "createRole", **operator_role(prefix)},
            {"command": "createClient", "username": OPERATOR_USERNAME, "password": password,
             "roles": [{"rolename": OPERATOR_ROLE}]}]


# -- commands ---------------------------------------------------------------------------------


def add_device_commands(prefix: str, device_id: str, password: str | None) -> list[dict[str, Any]]:
    """Create the device's role, then its account holding it. ``password`` None: an account
    that logs in only with its client certificate (the mutual-TLS listener)."""
    check_new_device_id(device_id)
    role = device_role(prefix, device_id)
    client: dict[str, Any] = {"command": "createClient", "username": device_id,
                              "roles": [{"rolename": role["rolename"]}]}
    if password is not None:
        client["password"] = password
    return [{"command": "createRole", **role}, client]


def disable_device_commands(device_id: str) -> list[dict[str, Any]]:
    """Take the role away (a certificate login keeps no right) and disable the account
    (a password login is refused); the plugin disconnects the device at once."""
    validate_device_id(device_id)
    return [{"command": "removeClientRole", "username": device_id,
             "rolename": device_role_name(device_id)},
            {"command": "disableClient", "username": device_id}]


def enable_device_commands(device_id: str) -> list[dict[str, Any]]:
    validate_device_id(device_id)
    return [{"command": "addClientRole", "username": device_id,
             "rolename": device_role_name(device_id)},
            {"command": "enableClient", "username": device_id}]


def remove_device_commands(device_id: str) -> list[dict[str, Any]]:
    """Delete the account (the plugin disconnects it) and its role."""
    check_new_device_id(device_id)
    return [{"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": device_role_name(device_id)}]


def list_clients_command() -> dict[str, Any]:
    return {"command": "listClients", "verbose": True}


def encode_commands(commands: Sequence[Mapping[str, Any]], correlation: str) -> bytes:
    """One control message; every command carries ``correlation`` plus its index, so the
    answers can be told from those to another admin's commands."""
    tagged = [{**c, "correlationData": f"{correlation}:{i}"} for i, c in enumerate(commands)]
    return json.dumps({"commands": tagged}).encode()


def read_responses(payload: bytes, correlation: str,
                   count: int) -> list[dict[str, Any]] | None:
    """The ``count`` answers to the commands sent under ``correlation``, in order; None if
    ``payload`` answers someone else's commands. Raises ``DynsecError`` naming every
    command the plugin refused (it carries out the others all the same)."""
    try:
        responses = json.loads(payload)["responses"]
        tags = [r.get("correlationData", "") for r in responses]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DynsecError("response", f"unreadable answer from the plugin: {exc}") from None
    mine = [r for r, tag in zip(responses, tags, strict=True)
            if isinstance(tag, str) and tag.rsplit(":", 1)[0] == correlation]
    if not mine:
        return None
    if len(mine) != count:
        raise DynsecError("response", f"expected {count} answers, got {len(mine)}")
    refused = [r for r in mine if "error" in r]
    if refused:
        raise DynsecError(
            str(refused[0].get("command")),
            "; ".join(f"{r['error']}" if i == 0 else f"{r.get('command')}: {r['error']}"
                      for i, r in enumerate(refused)),
        )
    return mine


def devices_from_list(response: Mapping[str, Any]) -> list[DeviceEntry]:
    """The devices in a verbose ``listClients`` answer: every account but fedbus's own."""
    try:
        clients = response["data"]["clients"]
        out = []
        for client in clients:
            username = str(client["username"])
            if username in _RESERVED or username.startswith(_BRIDGE_PREFIX):
                continue
            roles = {str(r["rolename"]) for r in client.get("roles", [])}
            enabled = not client.get("disabled", False) and device_role_name(username) in roles
            out.append(DeviceEntry(username, enabled))
    except (KeyError, TypeError, AttributeError) as exc:
        raise DynsecError("listClients", f"unexpected answer: {exc}") from None
    return sorted(out, key=lambda e: e.device_id)
