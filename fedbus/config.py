"""Configuration loading: one typed, frozen config object per process.

Every fedbus process (agent, coordinator, demo) describes its settings as a frozen
dataclass and builds it with :func:`load_config`. Each setting is taken from the first
source that has it, in this one order::

    command-line flag  >  environment variable  >  config file (TOML)  >  default

* Flags are the values click parsed; ``None`` means "not given" (declare the options with
  ``default=None``, booleans as ``--x/--no-x``). Only field names may be passed.
* The environment variable of field ``broker_port`` with prefix ``FEDBUS_AGENT`` is
  ``FEDBUS_AGENT_BROKER_PORT``. Its text is converted to the field's type: ``int``,
  ``float``, ``bool`` (1/0, true/false, yes/no, on/off, any case), ``Path``, ``str``,
  ``Literal[...]`` (exact match), ``tuple[X, ...]`` / ``list[X]`` (comma-separated) and
  ``X | None`` (the empty string means None). A set but empty variable is a value, not
  "unset". String flags are converted the same way.
* The config file is TOML and its values must already have the right TOML type (an
  integer for ``int``, an array for a tuple, a string for a path). With ``section="agent"``
  the settings are the keys of the ``[agent]`` table and other tables are left alone; a
  missing table is empty. Keys are the field names; an unknown key is an error, so typos
  are never silently ignored. Relative paths stay relative to the working directory.

A user's mistake is a :class:`~fedbus.errors.ConfigError` whose message is one line naming
the setting, its source, what was given and what was expected; a ``ValueError`` from the
dataclass's ``__post_init__`` becomes a ``ConfigError`` too. Mistakes in the program (a
flag name that is not a field, an annotation this module cannot convert) are ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from fedbus.errors import ConfigError

__all__ = ["config_fields_help", "env_var_name", "load_config"]

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_BOOL_TEXT = "a boolean (true/false, yes/no, on/off, 1/0)"

# type -> (short name for help, "expected ..." text, plural for lists)
_SCALARS: dict[type, tuple[str, str, str]] = {
    str: ("str", "a string", "strings"),
    int: ("int", "an integer", "integers"),
    float: ("float", "a number", "numbers"),
    bool: ("bool", _BOOL_TEXT, "booleans"),
    Path: ("path", "a non-empty path", "paths"),
}
_MISSING = object()


class _Invalid(Exception):
    """Raised inside conversion when a value does not fit its field's type."""


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    type: Any
    default: Any  # _MISSING when the field is required


def env_var_name(prefix: str, field_name: str) -> str:
    """The environment variable of a field.

    ``env_var_name("FEDBUS_AGENT", "broker_port") == "FEDBUS_AGENT_BROKER_PORT"``
    """
    return f"{prefix.rstrip('_')}_{field_name}".upper()


def load_config(
    cls: type[T],
    *,
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    env_prefix: str,
    file: str | Path | None = None,
    section: str | None = None,
) -> T:
    """Build ``cls`` from flags > environment > TOML ``file`` (``[section]``) > defaults.

    ``env`` defaults to ``os.environ``. Raises ``ConfigError`` for any user mistake and
    ``TypeError`` if ``cls`` is not a frozen dataclass of supported field types or
    ``flags`` holds a name that is not one of its fields.
    """
    fields = _fields(cls)
    names = [f.name for f in fields]
    stray = sorted(set(flags) - set(names))
    if stray:
        raise TypeError(f"flags {stray} are not fields of {cls.__name__}; valid: {names}")
    environ: Mapping[str, str] = os.environ if env is None else env
    from_file = _read_file(Path(file), section, names) if file is not None else {}

    values: dict[str, Any] = {}
    for f in fields:
        var = env_var_name(env_prefix, f.name)
        if flags.get(f.name) is not None:
            raw, source, text = flags[f.name], f"flag {_flag(f.name)}", True
        elif var in environ:
            raw, source, text = environ[var], f"env {var}", True
        elif f.name in from_file:
            key = f"{section}.{f.name}" if section is not None else f.name
            raw, source, text = from_file[f.name], f"config file {file}, key {key!r}", False
        elif f.default is _MISSING:
            where = f"under [{section}] " if section is not None else ""
            raise ConfigError(
                f"missing required setting {f.name!r} (flag {_flag(f.name)}, env {var}, "
                f"or key {f.name!r} {where}in the config file)"
            )
        else:
            continue
        try:
            values[f.name] = _convert(raw, f.type, text=text)
        except _Invalid:
            raise ConfigError(
                f"invalid value for setting {f.name!r} from {source}: got {_show(raw)}, "
                f"expected {_expected(f.type, text=text)}"
            ) from None
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def config_fields_help(cls: type, env_prefix: str) -> str:
    """One line per setting of ``cls``: name, type, default and environment variable.

    Starts with click's ``\\b`` marker so a command's ``epilog`` keeps the lines as they are.
    """
    rows = [
        (
            f.name,
            _type_name(f.type),
            "required" if f.default is _MISSING else f"default {_format_default(f.default)}",
            f"env {env_var_name(env_prefix, f.name)}",
        )
        for f in _fields(cls)
    ]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    lines = ["\b", "Settings (flag > environment variable > config file > default):"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[3]]))
    return "\n".join(lines)


# --- the dataclass ---------------------------------------------------------------------


def _fields(cls: type) -> list[_Field]:
    """The init fields of a frozen dataclass with resolved, supported types."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    # @dataclass sets __dataclass_params__ on every dataclass, but typeshed's
    # DataclassInstance (what is_dataclass narrows to) declares only __dataclass_fields__.
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        try:
            _expected(hints[f.name], text=True)  # raises TypeError if unsupported
        except TypeError as exc:
            raise TypeError(f"{cls.__name__}.{f.name}: {exc}") from None
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        out.append(_Field(f.name, hints[f.name], default))
    return out


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; ``X`` -> ``(X, False)``; other unions are refused."""
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(args) != 2 or len(rest) != 1:
            raise TypeError(f"unsupported union {tp}: only 'X | None' is supported")
        return rest[0], True
    return tp, False


def _item_type(tp: Any) -> Any:
    """The item type of ``tuple[X, ...]`` or ``list[X]``, else None."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if origin is list and len(args) == 1:
        return args[0]
    return None


def _literal_options(tp: Any) -> tuple[Any, ...]:
    options = get_args(tp)
    if not all(type(o) in (str, int) for o in options):
        raise TypeError(f"unsupported {tp}: Literal options must be str or int")
    return options


def _expected(tp: Any, *, text: bool) -> str:
    """What a value of type ``tp`` must look like; ``TypeError`` if ``tp`` is unsupported."""
    inner, optional = _split_optional(tp)
    item = _item_type(inner)
    if item is None:
        description = _expected_scalar(inner, plural=False)
    elif text:
        description = f"a comma-separated list of {_expected_scalar(item, plural=True)}"
    else:
        description = f"an array of {_expected_scalar(item, plural=True)}"
    return f"{description} or empty for none" if optional else description


def _expected_scalar(tp: Any, *, plural: bool) -> str:
    if get_origin(tp) is Literal:
        options = ", ".join(repr(o) for o in _literal_options(tp))
        return f"values from {options}" if plural else f"one of {options}"
    if tp in _SCALARS:
        return _SCALARS[tp][2 if plural else 1]
    raise TypeError(f"unsupported type {tp}")


def _type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    item = _item_type(inner)
    name = _scalar_name(inner) if item is None else f"list of {_scalar_name(item)}"
    return f"{name} or none" if optional else name


def _scalar_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(o) for o in _literal_options(tp))
    return _SCALARS[tp][0]


# --- values ----------------------------------------------------------------------------


def _convert(value: Any, tp: Any, *, text: bool) -> Any:
    """``value`` as type ``tp``; strings are parsed only if ``text``. Raises ``_Invalid``."""
    inner, optional = _split_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value == "")):
        return None
    item = _item_type(inner)
    if item is None:
        return _convert_scalar(value, inner, text=text)
    if isinstance(value, str) and text:
        parts = [part.strip() for part in value.split(",")] if value.strip() else []
        if "" in parts:
            raise _Invalid
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise _Invalid
    items = [_convert_scalar(part, item, text=text) for part in parts]
    return tuple(items) if get_origin(inner) is tuple else items


def _convert_scalar(value: Any, tp: Any, *, text: bool) -> Any:
    parse = text and isinstance(value, str)
    if get_origin(tp) is Literal:
        for option in get_args(tp):
            if (type(value) is type(option) and value == option) or (
                parse and value == str(option)
            ):
                return option
        raise _Invalid
    if tp is bool:
        if isinstance(value, bool):
            return value
        if parse and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Invalid
    if tp is int or tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if tp is int and not isinstance(value, int):
                raise _Invalid
            return tp(value)
        if parse:
            try:
                return tp(value)
            except ValueError:
                raise _Invalid from None
        raise _Invalid
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid
    # Path, the only scalar left (_fields has checked the annotation)
    if isinstance(value, os.PathLike):
        return Path(value)
    if isinstance(value, str) and value:
        return Path(value)
    raise _Invalid


# --- the file --------------------------------------------------------------------------


def _read_file(path: Path, section: str | None, names: list[str]) -> dict[str, Any]:
    """The settings table of a TOML file, with every key checked against ``names``."""
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"config file {path}: invalid TOML: {message}") from None
    table: Any = document if section is None else document.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"config file {path}: {section!r} must be a table ([{section}]), got {_show(table)}"
        )
    for key in table:
        if key not in names:
            where = f" in [{section}]" if section is not None else ""
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"config file {path}: unknown key {key!r}{where}{hint}; "
                f"valid keys: {', '.join(names)}"
            )
    return table


# --- display ---------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` of a given value, shortened; always one line."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _format_default(value: Any) -> str:
    """A default as one would write it in an environment variable."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return repr(",".join(str(v) for v in value))
    if isinstance(value, str | Path):
        return repr(str(value))
    return str(value)
