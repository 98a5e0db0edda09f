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

__all__ = ["config_options", "load_process_config"]

T = typing.TypeVar("T")


def _click_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    if hint is Path:
        return click.Path(path_type=Path)
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
            if default not in (None, "") and field.name != "password":
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
) -> tuple[T, str]:
    """Load a process config and its broker password.

    A ``credentials`` file (from ``fedbus broker``) fills in host, port and prefix where no
    flag, environment variable or config-file key gave them (so it ranks just above the
    defaults, keeping the one precedence), and the password when none was given otherwise.
    """
    from fedbus.config import load_config
    from fedbus.credentials import read_credentials
    from fedbus.errors import ConfigError

    cfg = load_config(cls, flags=flags, env_prefix=env_prefix, file=config_file, section=section)
    password: str | None = cfg.password  # type: ignore[attr-defined]
    creds = cfg.credentials  # type: ignore[attr-defined]
    if creds is not None:
        access = read_credentials(creds, username(cfg))
        filled = dict(flags)
        in_file = _file_keys(config_file, section)
        for key, value in (("host", access.host), ("port", access.port), ("prefix", access.prefix)):
            given = (filled.get(key) is not None or env_var_name(env_prefix, key) in os.environ
                     or key in in_file)
            if not given:
                filled[key] = value
        cfg = load_config(cls, flags=filled, env_prefix=env_prefix, file=config_file,
                          section=section)
        password = password or access.password
    if not password:
        var = env_var_name(env_prefix, "password")
        raise ConfigError(f"no broker password: give --credentials, --password or {var}")
    return cfg, password


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
