"""Click options generated from a typed config dataclass, so each setting is declared once.

Every option defaults to ``None`` ("not given") so that ``fedbus.config.load_config`` can
apply the one precedence: flag > environment > config file > default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from fedbus.config import env_var_name

__all__ = ["TLS_HELPS", "config_options", "load_process_config"]

T = typing.TypeVar("T")

# Help texts of the TLS settings the agent and the coordinator share (fedbus.tls.BrokerTarget).
TLS_HELPS = {
    "tls": "TLS, verifying the broker's certificate (CA and host name). Default: on for any "
    "host beyond loopback, with --tls-ca/--tls-cert, and with --credentials of a TLS broker; "
    "--no-tls: plain MQTT.",
    "tls_ca": "CA certificate (PEM) the broker's certificate must chain to (default: from "
    "--credentials, else the system's trusted CAs).",
    "tls_cert": "Client certificate (PEM) for mutual TLS; its common name is the MQTT "
    "username, and no password is needed. Connect to the broker's mTLS port.",
    "tls_key": "Private key (PEM) of --tls-cert.",
    "insecure_plaintext": "Allow plain MQTT (--no-tls) to a host beyond loopback: passwords, "
    "models and updates then cross the network in clear text.",
}


def _click_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    if hint is Path:
        # text, not path_type=Path: Path("") would be ".", and the config layer must see the
        # empty string that means "none" for an optional path (--state-dir '')
        return click.Path()
    if hint in (int, float, str, bool):
        return hint
    return str


def config_options(
    cls: type, helps: Mapping[str, str], env_prefix: str, *, hidden: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding ``--<field>`` for every field of ``cls`` that has a help text."""
    hints = typing.get_type_hints(cls)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for field in reversed(dataclasses.fields(cls)):
            if field.name not in helps:
                continue
            flag = "--" + field.name.replace("_", "-")
            default = field.default if field.default is not dataclasses.MISSING else None
            extra = f"[env {env_var_name(env_prefix, field.name)}"
            if default not in (None, "", ()) and field.name != "password":
                extra += f"; default {default}"
            extra += "]"
            hint = _click_type(hints[field.name])
            decls = [f"{flag}/--no-{flag[2:]}"] if hint is bool else [flag]
            func = click.option(
                *decls,
                field.name,
                type=None if hint is bool else hint,
                default=None,
                help=f"{helps[field.name]} {extra}",
                hidden=field.name in hidden,
            )(func)
        return func

    return decorate


def load_process_config(
    cls: type[T],
    flags: Mapping[str, Any],
    *,
    env_prefix: str,
    config_file: Path | None,
    section: str,
    username: Callable[[T], str],
    identity: str | None = None,
) -> tuple[T, str]:
    """Load a process config and its broker password ("" when a client certificate logs in).

    A ``credentials`` file (from ``fedbus broker``) fills in host, port, prefix and the CA
    where no flag, environment variable or config-file key gave them (so it ranks just above
    the defaults, keeping the one precedence), and the password when none was given
    otherwise. Its port is the TLS one (the mutual-TLS one with ``tls_cert``) unless TLS is
    turned off or a port is given. An account of the file without a password but with a
    client certificate logs in with that certificate (unless ``tls_cert`` is given).

    ``identity``: the setting naming the account (``device_id``); when a bundle (a
    credentials file for one device, from ``fedbus devices add``) is given by flag or
    environment and nothing else names the account, the bundle's device is used.
    Likewise the coordinator's public key (an agent's ``coordinator_key``) and the
    coordinator's ``signing_key``.
    """
    from fedbus.config import load_config
    from fedbus.credentials import bundle_device, read_credentials
    from fedbus.errors import ConfigError

    def load(values: Mapping[str, Any]) -> T:
        return load_config(cls, flags=values, env_prefix=env_prefix, file=config_file,
                           section=section)

    if identity is not None and flags.get(identity) is None:
        bundle = flags.get("credentials") or os.environ.get(
            env_var_name(env_prefix, "credentials"))
        unnamed = (env_var_name(env_prefix, identity) not in os.environ
                   and identity not in _file_keys(config_file, section))
        device = bundle_device(bundle) if bundle and unnamed else None
        if device is not None:
            flags = {**flags, identity: device}
    cfg = load(flags)
    password: str | None = cfg.password  # type: ignore[attr-defined]
    creds = cfg.credentials  # type: ignore[attr-defined]
    if creds is not None:
        access = read_credentials(creds, username(cfg))
        filled = dict(flags)
        in_file = _file_keys(config_file, section)

        def given(key: str) -> bool:
            return (filled.get(key) is not None or env_var_name(env_prefix, key) in os.environ
                    or key in in_file)

        for key, value in (("host", access.host), ("prefix", access.prefix)):
            if not given(key):
                filled[key] = value
        if (not access.password and access.cert_file is not None
                and access.key_file is not None and not given("tls_cert")):
            filled["tls_cert"], filled["tls_key"] = access.cert_file, access.key_file
        cfg = load(filled)
        tls: bool | None = cfg.tls  # type: ignore[attr-defined]
        cert = cfg.tls_cert  # type: ignore[attr-defined]
        if not given("port"):
            if tls is None:  # the broker's own choice: TLS when it offers it
                tls = access.tls_port is not None
                filled["tls"] = tls
            filled["port"] = access.port_for(tls=tls, client_certificate=cert is not None)
        on = tls if tls is not None else cfg.uses_tls()  # type: ignore[attr-defined]
        if on and not given("tls_ca") and access.ca_file is not None:
            filled["tls_ca"] = access.ca_file
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if "coordinator_key" in names and access.coordinator_key and not given(
            "coordinator_key"
        ):
            filled["coordinator_key"] = access.coordinator_key
        if "signing_key" in names and access.signing_key_file and not given("signing_key"):
            filled["signing_key"] = access.signing_key_file
        if "device_keys" in names and access.device_keys_file and not given("device_keys"):
            filled["device_keys"] = access.device_keys_file
        cfg = load(filled)
        password = password or access.password
    cert = cfg.tls_cert  # type: ignore[attr-defined]
    if cert is not None:
        _check_identity(Path(cert), username(cfg))
        return cfg, password or ""
    if not password:
        var = env_var_name(env_prefix, "password")
        raise ConfigError(
            f"no broker password: give --credentials, --password or {var} (or a client "
            "certificate with --tls-cert and --tls-key)"
        )
    return cfg, password


def _check_identity(cert: Path, username: str) -> None:
    """With mTLS the broker takes the certificate's common name as the username: it must be
    the one this process acts as."""
    from fedbus.errors import ConfigError
    from fedbus.pki import certificate_identity

    try:
        identity = certificate_identity(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the client certificate {cert}: {exc}") from None
    if identity != username:
        raise ConfigError(
            f"the client certificate {cert} is for {identity!r}, not {username!r}: the broker "
            "takes the certificate's name as the username"
        )


def _file_keys(config_file: Path | None, section: str) -> set[str]:
    """The keys of ``[section]`` in the TOML config file (load_config has checked it)."""
    if config_file is None:
        return set()
    try:
        with open(config_file, "rb") as fh:
            table = tomllib.load(fh).get(section, {})
    except (OSError, tomllib.TOMLDecodeError):
        return set()
    return set(table) if isinstance(table, dict) else set()
