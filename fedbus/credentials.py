"""Reading the credentials file that ``fedbus broker`` writes for a local broker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedbus.errors import ConfigError

__all__ = ["BrokerAccess", "read_credentials"]


@dataclass(frozen=True)
class BrokerAccess:
    host: str
    port: int
    prefix: str
    username: str
    password: str


def read_credentials(path: str | Path, username: str) -> BrokerAccess:
    """Host, port, prefix and ``username``'s password from a credentials.json file."""
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
        return BrokerAccess(
            host=str(data["host"]),
            port=int(data["port"]),
            prefix=str(data.get("prefix", "fedbus")),
            username=username,
            password=str(accounts[username]["password"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"credentials file {path} is not in the expected format: {exc}") from None
