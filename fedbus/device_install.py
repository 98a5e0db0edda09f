"""The agent's configuration on a device: its credentials bundle and ``agent.env``.

``deploy/install-agent.sh`` builds the virtualenv, then calls ``python -m fedbus.device_install``
with it to place a device's bundle (from ``fedbus devices add``) where the systemd service
reads it::

    /etc/fedbus/               0750 root:fedbus
        agent.env              0600 root        read by systemd (EnvironmentFile=)
        credentials.json       0640 root:fedbus the bundle's account: holds the password
        ca.crt                 0644
        <device>.crt           0644             (certificate login only)
        <device>.key           0640 root:fedbus (certificate login only)
    /var/lib/fedbus/           0750 fedbus      the service's StateDirectory=
        data/                  0750 fedbus      the local training data (put there by hand)
        state/                 0700 fedbus      the agent's state, one directory per device

The configuration directory is itself a bundle (``FEDBUS_AGENT_CREDENTIALS`` names it), so the
agent reads it exactly as it reads the bundle it came from. Without the service's account
(not root, or a staged ``--root`` without an ``etc/passwd``) nothing is handed to it and the
secrets are 0600.

Planning (:func:`plan_install`) reads the bundle and decides every file, mode and owner;
:func:`apply_install` writes them. A user's mistake is a ``ConfigError``: one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedbus.config import env_var_name
from fedbus.credentials import BUNDLE_FILE, bundle_device, read_credentials
from fedbus.errors import ConfigError

__all__ = [
    "AGENT_ENV_PREFIX",
    "CONFIG_DIR",
    "ENV_FILE",
    "STATE_ROOT",
    "Account",
    "InstallPlan",
    "PlannedDir",
    "PlannedFile",
    "account_ids",
    "agent_env",
    "apply_install",
    "main",
    "plan_install",
]

# edge_agent.config.ENV_PREFIX (not imported: that module pulls in cryptography through
# fedbus.tls; tests check they agree)
AGENT_ENV_PREFIX = "FEDBUS_AGENT"
CONFIG_DIR = PurePosixPath("/etc/fedbus")
STATE_ROOT = PurePosixPath("/var/lib/fedbus")
ENV_FILE = "agent.env"
# characters a value of agent.env must not hold: systemd's EnvironmentFile= would read
# quotes, backslashes and line breaks as syntax
_ENV_UNSAFE = frozenset("\n\r\\\"'")


@dataclass(frozen=True)
class Account:
    """The service's user and group ids."""

    uid: int
    gid: int


@dataclass(frozen=True)
class PlannedFile:
    path: PurePosixPath  # on the target system
    content: bytes
    mode: int
    owner: int | None  # uid; None: whoever runs the install
    group: int | None


@dataclass(frozen=True)
class PlannedDir:
    path: PurePosixPath
    mode: int
    owner: int | None
    group: int | None


@dataclass(frozen=True)
class InstallPlan:
    device: str
    dirs: tuple[PlannedDir, ...]
    files: tuple[PlannedFile, ...]


def account_ids(passwd: str, name: str) -> Account | None:
    """``name``'s uid and primary gid from the text of an ``/etc/passwd``; None if absent."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name:
            try:
                return Account(int(fields[2]), int(fields[3]))
            except ValueError:
                raise ConfigError(f"the passwd entry of {name!r} is malformed") from None
    return None


def _env_value(what: str, value: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(f"{what} must be an absolute path on the device, not {value!r}")
    if value != value.strip() or _ENV_UNSAFE & set(value):
        raise ConfigError(
            f"{what} {value!r}: agent.env cannot hold spaces at either end, quotes, "
            "backslashes or line breaks"
        )
    return value


def agent_env(config_dir: PurePosixPath, data: str, state_dir: PurePosixPath) -> str:
    """The text of ``agent.env``: the agent's settings as ``FEDBUS_AGENT_*`` variables."""
    settings = {
        "credentials": _env_value("the configuration directory", str(config_dir)),
        "data": _env_value("--data", data),
        "state_dir": _env_value("the state directory", str(state_dir)),
    }
    lines = [
        "# fedbus agent settings, read by systemd (fedbus-agent.service, EnvironmentFile=).",
        "# Written by deploy/install-agent.sh. Any setting of `fedbus agent --help` can be",
        "# added as its FEDBUS_AGENT_* variable.",
        *(f"{env_var_name(AGENT_ENV_PREFIX, key)}={value}" for key, value in settings.items()),
    ]
    return "\n".join(lines) + "\n"


def _bundle_name(field: str, path: Path | None, bundle: Path) -> str | None:
    """The file name of a path the bundle's credentials.json names: a plain name beside it
    (as ``fedbus devices add`` writes them), so that the copy works from any directory."""
    if path is None:
        return None
    if path.parent != bundle or path.name in ("", ".", "..", BUNDLE_FILE, ENV_FILE):
        raise ConfigError(
            f"the bundle's {field} must be a file name beside credentials.json, not {path}"
        )
    return path.name


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def plan_install(bundle: Path, *, data: str, account: Account | None,
                 config_dir: PurePosixPath = CONFIG_DIR,
                 state_root: PurePosixPath = STATE_ROOT) -> InstallPlan:
    """Every directory and file of the agent's configuration, from a device's ``bundle``
    directory. Reads the bundle; writes nothing."""
    if not bundle.is_dir():
        raise ConfigError(f"{bundle} is not a directory: give the bundle directory that "
                          "`fedbus devices add` wrote")
    device = bundle_device(bundle)
    if device is None:
        raise ConfigError(f"{bundle} is not a device's bundle (no bundle.device in its "
                          f"{BUNDLE_FILE}): make one with `fedbus devices add`")
    access = read_credentials(bundle, device)  # checks the layout and the account
    if access.ca_file is None:
        raise ConfigError(f"the bundle {bundle} names no CA certificate")
    if not access.password and (access.cert_file is None or access.key_file is None):
        raise ConfigError(f"the bundle {bundle} holds neither a password nor a certificate "
                          "and key for " + repr(device))

    uid = account.uid if account is not None else None
    gid = account.gid if account is not None else None
    secret = 0o640 if account is not None else 0o600
    owned_by_root = 0 if account is not None else None
    files = [
        PlannedFile(config_dir / ENV_FILE,
                    agent_env(config_dir, data, state_root / "state" / device).encode(),
                    0o600, owned_by_root, owned_by_root),
        PlannedFile(config_dir / BUNDLE_FILE, _read(bundle / BUNDLE_FILE), secret,
                    owned_by_root, gid),
    ]
    for field, path, is_secret in (("ca_file", access.ca_file, False),
                                   ("cert_file", access.cert_file, False),
                                   ("key_file", access.key_file, True)):
        name = _bundle_name(field, path, bundle)
        if name is None or path is None:
            continue
        files.append(PlannedFile(config_dir / name, _read(path),
                                 secret if is_secret else 0o644,
                                 owned_by_root, gid if is_secret else owned_by_root))
    dirs = (
        PlannedDir(config_dir, 0o750, owned_by_root, gid),
        PlannedDir(state_root, 0o750, uid, gid),
        PlannedDir(state_root / "data", 0o750, uid, gid),
        PlannedDir(state_root / "state", 0o700, uid, gid),
    )
    return InstallPlan(device, dirs, tuple(files))


def _under(root: Path, path: PurePosixPath) -> Path:
    return root / path.relative_to("/")


def _chown(path: Path | int, owner: int | None, group: int | None) -> None:
    if owner is None and group is None:
        return
    uid, gid = -1 if owner is None else owner, -1 if group is None else group
    if isinstance(path, int):
        os.fchown(path, uid, gid)
    else:
        os.chown(path, uid, gid)


def apply_install(plan: InstallPlan, root: Path = Path("/")) -> list[str]:
    """Create the plan's directories (modes and owners set, contents kept) and replace its
    files atomically, under ``root``. Returns one line per file written."""
    for d in plan.dirs:
        target = _under(root, d.path)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        _chown(target, d.owner, d.group)
        target.chmod(d.mode)
    done = []
    for f in plan.files:
        target = _under(root, f.path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), f.mode)
                _chown(out.fileno(), f.owner, f.group)
                out.write(f.content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        done.append(f"{f.mode:04o} {target}")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedbus.device_install",
        description="Place a device's credentials bundle and agent.env for the fedbus-agent "
        "service (called by deploy/install-agent.sh).",
    )
    parser.add_argument("--bundle", type=Path, required=True,
                        help="the bundle directory from `fedbus devices add`")
    parser.add_argument("--data", default=str(STATE_ROOT / "data"),
                        help="the local training data on the device (default %(default)s)")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="install under this directory instead of / (default /)")
    parser.add_argument("--user", default="fedbus",
                        help="the service's account, looked up in ROOT/etc/passwd")
    args = parser.parse_args(argv)
    try:
        account = None
        passwd = args.root / "etc" / "passwd"
        if os.geteuid() == 0 and passwd.is_file():
            account = account_ids(passwd.read_text(), args.user)
        if account is None:
            print(f"no account {args.user!r} to hand the files to (not root, or none in "
                  f"{passwd}): secrets are 0600, owned by this user", file=sys.stderr)
        plan = plan_install(args.bundle, data=args.data, account=account)
        for line in apply_install(plan, args.root):
            print(line)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"device {plan.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
