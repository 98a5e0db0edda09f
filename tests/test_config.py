"""Tests for fedbus.config: precedence, conversions, the TOML file and error messages."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
import pytest

from fedbus.config import config_fields_help, env_var_name, load_config
from fedbus.errors import ConfigError

PREFIX = "FEDBUS_TEST"


@dataclass(frozen=True)
class Settings:
    host: str = "localhost"
    port: int = 1883
    ratio: float = 0.5
    tls: bool = False
    data_dir: Path = Path("data")
    ca_file: Path | None = None
    device_id: str | None = None
    max_rounds: int | None = 10
    topics: tuple[str, ...] = ("model",)
    tags: list[str] = field(default_factory=list)
    layers: tuple[int, ...] = (4, 2)
    mode: Literal["fedavg", "fedprox"] = "fedavg"
    level: Literal[1, 2, 3] = 1


@dataclass(frozen=True)
class Required:
    device_id: str
    port: int = 1883


@dataclass(frozen=True)
class Validated:
    port: int = 1883

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range 1-65535")


@dataclass
class NotFrozen:
    port: int = 1883


@dataclass(frozen=True)
class Unsupported:
    mapping: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WithInternal:
    port: int = 1883
    cache: int = field(default=0, init=False)


def load(
    cls: type = Settings,
    *,
    flags: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    file: Path | None = None,
    section: str | None = None,
) -> Any:
    """load_config with an empty environment unless one is given."""
    return load_config(
        cls, flags=flags or {}, env=env or {}, env_prefix=PREFIX, file=file, section=section
    )


def write(tmp_path: Path, text: str, name: str = "fedbus.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- env_var_name ----------------------------------------------------------------------


def test_env_var_name() -> None:
    assert env_var_name("FEDBUS_AGENT", "broker_port") == "FEDBUS_AGENT_BROKER_PORT"


def test_env_var_name_upper_cases_and_tolerates_trailing_underscore() -> None:
    assert env_var_name("fedbus_agent_", "broker_port") == "FEDBUS_AGENT_BROKER_PORT"


# --- precedence ------------------------------------------------------------------------

SOURCES = ("flag", "env", "file")


@pytest.mark.parametrize(
    "present",
    [c for n in range(len(SOURCES) + 1) for c in itertools.combinations(SOURCES, n)],
    ids=lambda c: "+".join(c) or "default",
)
def test_precedence_flag_env_file_default(tmp_path: Path, present: tuple[str, ...]) -> None:
    value = {"flag": 1001, "env": 1002, "file": 1003}
    flags = {"port": value["flag"]} if "flag" in present else {}
    env = {"FEDBUS_TEST_PORT": str(value["env"])} if "env" in present else {}
    file = write(tmp_path, f"port = {value['file']}\n") if "file" in present else None
    expected = next((value[s] for s in SOURCES if s in present), 1883)
    assert load(flags=flags, env=env, file=file).port == expected


def test_sources_combine_per_field(tmp_path: Path) -> None:
    file = write(tmp_path, 'host = "from-file"\nport = 3\nratio = 0.25\ntls = true\n')
    config = load(
        flags={"host": "from-flag", "port": None},
        env={"FEDBUS_TEST_PORT": "2", "FEDBUS_TEST_HOST": "from-env"},
        file=file,
    )
    assert (config.host, config.port, config.ratio, config.tls) == ("from-flag", 2, 0.25, True)
    assert config.layers == (4, 2)  # default


def test_flag_none_falls_through_to_env() -> None:
    assert load(flags={"tls": None}, env={"FEDBUS_TEST_TLS": "yes"}).tls is True


def test_flag_false_is_a_value_and_beats_env() -> None:
    assert load(flags={"tls": False}, env={"FEDBUS_TEST_TLS": "yes"}).tls is False


def test_defaults_only_give_the_dataclass_defaults() -> None:
    config = load()
    assert config == Settings()
    assert type(config) is Settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBUS_TEST_PORT", "4242")
    assert load_config(Settings, flags={}, env_prefix=PREFIX).port == 4242


def test_env_vars_of_other_prefixes_are_ignored() -> None:
    assert load(env={"FEDBUS_OTHER_PORT": "1", "PORT": "2"}).port == 1883


# --- conversions from text (env vars) ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("host", "broker.local", "broker.local"),
        ("host", "", ""),
        ("port", "8883", 8883),
        ("port", " 8883 ", 8883),
        ("port", "-1", -1),
        ("ratio", "0.125", 0.125),
        ("ratio", "2", 2.0),
        ("data_dir", "/var/lib/fedbus", Path("/var/lib/fedbus")),
        ("data_dir", "rel/dir", Path("rel/dir")),
        ("ca_file", "/etc/ca.pem", Path("/etc/ca.pem")),
        ("ca_file", "", None),
        ("device_id", "dev-1", "dev-1"),
        ("device_id", "", None),
        ("max_rounds", "", None),
        ("max_rounds", "7", 7),
        ("topics", "a, b ,c", ("a", "b", "c")),
        ("topics", "single", ("single",)),
        ("topics", "", ()),
        ("tags", "x,y", ["x", "y"]),
        ("tags", "  ", []),
        ("layers", "64,32, 10", (64, 32, 10)),
        ("mode", "fedprox", "fedprox"),
        ("level", "3", 3),
    ],
)
def test_env_conversion(name: str, text: str, expected: Any) -> None:
    value = getattr(load(env={env_var_name(PREFIX, name): text}), name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["1", "true", "True", "TRUE", "yes", "Yes", "on", "ON", " true "])
def test_bool_true_spellings(text: str) -> None:
    assert load(env={"FEDBUS_TEST_TLS": text}).tls is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "NO", "off", "Off"])
def test_bool_false_spellings(tmp_path: Path, text: str) -> None:
    # The default is False, so each source overrides a lower one that says true.
    assert load(flags={"tls": text}, env={"FEDBUS_TEST_TLS": "true"}).tls is False
    assert load(env={"FEDBUS_TEST_TLS": text}, file=write(tmp_path, "tls = true\n")).tls is False


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("tls", "maybe", "expected a boolean (true/false, yes/no, on/off, 1/0)"),
        ("tls", "", "expected a boolean"),
        ("port", "eighty", "expected an integer"),
        ("port", "80.5", "expected an integer"),
        ("port", "", "expected an integer"),
        ("ratio", "half", "expected a number"),
        ("data_dir", "", "expected a non-empty path"),
        ("max_rounds", "many", "expected an integer or empty for none"),
        ("layers", "64,x", "expected a comma-separated list of integers"),
        ("topics", "a,,b", "expected a comma-separated list of strings"),
        ("mode", "FedAvg", "expected one of 'fedavg', 'fedprox'"),
        ("level", "4", "expected one of 1, 2, 3"),
    ],
)
def test_env_conversion_errors(name: str, text: str, expected: str) -> None:
    var = env_var_name(PREFIX, name)
    with pytest.raises(ConfigError) as info:
        load(env={var: text})
    message = str(info.value)
    assert message.startswith(f"invalid value for setting {name!r} from env {var}: ")
    assert f"got {text!r}" in message
    assert expected in message
    assert "\n" not in message


def test_bool_error_message_is_exact() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"FEDBUS_TEST_TLS": "maybe"})
    assert str(info.value) == (
        "invalid value for setting 'tls' from env FEDBUS_TEST_TLS: got 'maybe', "
        "expected a boolean (true/false, yes/no, on/off, 1/0)"
    )


def test_long_given_values_are_shortened() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"FEDBUS_TEST_PORT": "9" * 500 + "x"})
    assert len(str(info.value)) < 200
    assert "..." in str(info.value)


# --- flags -------------------------------------------------------------------------------


def test_flags_accept_values_click_already_converted() -> None:
    config = load(
        flags={
            "port": 8883,
            "ratio": 1,
            "tls": True,
            "data_dir": Path("d"),
            "ca_file": "ca.pem",
            "topics": ("a", "b"),
            "tags": ("t",),
            "layers": ("8", 4),
            "mode": "fedprox",
            "level": 2,
        }
    )
    assert config.port == 8883
    assert config.ratio == 1.0 and type(config.ratio) is float
    assert config.tls is True
    assert config.data_dir == Path("d")
    assert config.ca_file == Path("ca.pem")
    assert config.topics == ("a", "b")
    assert config.tags == ["t"]
    assert config.layers == (8, 4)
    assert config.mode == "fedprox"
    assert config.level == 2


def test_string_flags_are_parsed_like_env_vars() -> None:
    config = load(flags={"port": "8883", "tls": "on", "layers": "3,2", "ca_file": ""})
    assert (config.port, config.tls, config.layers, config.ca_file) == (8883, True, (3, 2), None)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("mode", "sgd", "expected one of 'fedavg', 'fedprox'"),
        ("level", 5, "expected one of 1, 2, 3"),
        ("host", 5, "expected a string"),
        ("port", 1.5, "expected an integer"),
        ("port", True, "expected an integer"),
    ],
)
def test_flag_errors_name_the_flag(name: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(flags={name: value})
    flag = "--" + name.replace("_", "-")
    assert str(info.value).startswith(f"invalid value for setting {name!r} from flag {flag}: ")
    assert f"got {value!r}" in str(info.value)
    assert expected in str(info.value)


def test_flag_name_uses_dashes() -> None:
    with pytest.raises(ConfigError, match="from flag --data-dir:"):
        load(flags={"data_dir": ""})


def test_unknown_flag_name_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="config"):
        load(flags={"config": None, "port": 1})


# --- the config file ---------------------------------------------------------------------


def test_file_values_with_native_toml_types(tmp_path: Path) -> None:
    file = write(
        tmp_path,
        """
        host = "broker"
        port = 8883
        ratio = 1
        tls = true
        data_dir = "store"
        ca_file = ""
        device_id = "dev-7"
        topics = ["a", "b"]
        tags = []
        layers = [16, 8]
        mode = "fedprox"
        level = 3
        """,
    )
    config = load(file=file)
    assert config == Settings(
        host="broker",
        port=8883,
        ratio=1.0,
        tls=True,
        data_dir=Path("store"),
        ca_file=None,
        device_id="dev-7",
        topics=("a", "b"),
        tags=[],
        layers=(16, 8),
        mode="fedprox",
        level=3,
    )
    assert type(config.ratio) is float


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('port = "8883"', "got '8883', expected an integer"),
        ("port = 80.0", "got 80.0, expected an integer"),
        ("ratio = true", "got True, expected a number"),
        ("tls = 1", "got 1, expected a boolean"),
        ('tls = "true"', "got 'true', expected a boolean"),
        ("host = 5", "got 5, expected a string"),
        ('topics = "a,b"', "got 'a,b', expected an array of strings"),
        ('layers = [1, "2"]', "expected an array of integers"),
        ("data_dir = 3", "got 3, expected a non-empty path"),
        ('mode = "avg"', "got 'avg', expected one of 'fedavg', 'fedprox'"),
        ("level = 1.0", "expected one of 1, 2, 3"),
        ("max_rounds = 2.5", "expected an integer or empty for none"),
        ("host = { a = 1 }", "expected a string"),
    ],
)
def test_file_wrong_types(tmp_path: Path, line: str, expected: str) -> None:
    file = write(tmp_path, line + "\n")
    key = line.split(" ")[0]
    with pytest.raises(ConfigError) as info:
        load(file=file)
    message = str(info.value)
    assert message.startswith(
        f"invalid value for setting {key!r} from config file {file}, key {key!r}: "
    )
    assert expected in message
    assert "\n" not in message


def test_file_unknown_key_names_it_and_lists_valid_keys(tmp_path: Path) -> None:
    file = write(tmp_path, "port = 1\nprot = 2\n")
    with pytest.raises(ConfigError) as info:
        load(file=file)
    message = str(info.value)
    assert str(file) in message
    assert "unknown key 'prot'" in message
    assert "did you mean 'port'?" in message
    assert "valid keys: host, port, ratio, tls, data_dir," in message


def test_file_unknown_key_without_close_match(tmp_path: Path) -> None:
    file = write(tmp_path, "zzzzzz = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'zzzzzz'; valid keys: host, port") as info:
        load(file=file)
    assert "did you mean" not in str(info.value)


def test_file_key_for_a_non_init_field_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'cache'; valid keys: port$"):
        load(WithInternal, file=write(tmp_path, "cache = 1\n"))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(file=path)
    assert str(info.value) == f"config file {path}: not found"


def test_missing_file_is_an_error_even_if_flags_give_everything(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(Required, flags={"device_id": "d", "port": 1}, file=tmp_path / "nope.toml")


def test_file_path_may_be_a_string(tmp_path: Path) -> None:
    file = write(tmp_path, "port = 7\n")
    assert load_config(Settings, flags={}, env={}, env_prefix=PREFIX, file=str(file)).port == 7


def test_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read it: Is a directory"):
        load(file=tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "port = \n",
        "port = 1\nport = 2\n",
        "[agent\nport = 1\n",
        'host = "unterminated\n',
    ],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(file=file)
    message = str(info.value)
    assert message.startswith(f"config file {file}: invalid TOML: ")
    assert "line" in message  # the parser says where
    assert "\n" not in message


def test_file_not_utf8(tmp_path: Path) -> None:
    file = tmp_path / "latin1.toml"
    file.write_bytes('host = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"invalid TOML: .*utf-8"):
        load(file=file)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load(file=write(tmp_path, "")) == Settings()


# --- sections ---------------------------------------------------------------------------

SHARED = """
[agent]
port = 1111
topics = ["agent"]

[coordinator]
port = 2222
not_an_agent_key = true
"""


def test_section_reads_its_own_table(tmp_path: Path) -> None:
    file = write(tmp_path, SHARED)
    agent = load(file=file, section="agent")
    assert (agent.port, agent.topics) == (1111, ("agent",))


def test_section_ignores_other_tables_even_with_foreign_keys(tmp_path: Path) -> None:
    file = write(tmp_path, SHARED)
    with pytest.raises(ConfigError, match="unknown key 'not_an_agent_key' in \\[coordinator\\]"):
        load(file=file, section="coordinator")
    assert load(file=file, section="agent").port == 1111


def test_missing_section_is_empty(tmp_path: Path) -> None:
    assert load(file=write(tmp_path, SHARED), section="demo") == Settings()


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    file = write(tmp_path, "agent = 5\n")
    with pytest.raises(ConfigError, match=r"'agent' must be a table \(\[agent\]\), got 5"):
        load(file=file, section="agent")


def test_without_section_tables_are_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'agent'"):
        load(file=write(tmp_path, SHARED))


def test_section_key_appears_in_errors(tmp_path: Path) -> None:
    file = write(tmp_path, '[agent]\nport = "x"\n')
    with pytest.raises(ConfigError, match=r"from config file .*, key 'agent\.port': got 'x'"):
        load(file=file, section="agent")


def test_env_beats_section_value(tmp_path: Path) -> None:
    config = load(env={"FEDBUS_TEST_PORT": "5"}, file=write(tmp_path, SHARED), section="agent")
    assert config.port == 5


# --- required fields and validation -------------------------------------------------------


def test_missing_required_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load(Required)
    assert str(info.value) == (
        "missing required setting 'device_id' (flag --device-id, env FEDBUS_TEST_DEVICE_ID, "
        "or key 'device_id' in the config file)"
    )


def test_missing_required_setting_names_the_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"or key 'device_id' under \[agent\] in the config"):
        load(Required, file=write(tmp_path, "[agent]\nport = 1\n"), section="agent")


@pytest.mark.parametrize(
    "source",
    ["flag", "env", "file"],
)
def test_required_setting_from_any_source(tmp_path: Path, source: str) -> None:
    config = load(
        Required,
        flags={"device_id": "d1"} if source == "flag" else {},
        env={"FEDBUS_TEST_DEVICE_ID": "d1"} if source == "env" else {},
        file=write(tmp_path, 'device_id = "d1"\n') if source == "file" else None,
    )
    assert config == Required(device_id="d1")


def test_post_init_value_error_becomes_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load(Validated, env={"FEDBUS_TEST_PORT": "70000"})
    assert str(info.value) == "port 70000 is out of range 1-65535"
    assert isinstance(info.value.__cause__, ValueError)


def test_post_init_passes_valid_values() -> None:
    assert load(Validated, env={"FEDBUS_TEST_PORT": "8883"}).port == 8883


# --- the dataclass itself ------------------------------------------------------------------


def test_not_a_frozen_dataclass_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="frozen"):
        load(NotFrozen)
    with pytest.raises(TypeError, match="not a dataclass"):
        load(dict)


def test_unsupported_annotation_is_a_type_error_even_if_unset() -> None:
    with pytest.raises(TypeError, match=r"Unsupported\.mapping: unsupported type"):
        load(Unsupported)


# --- help --------------------------------------------------------------------------------


def test_help_lists_every_field_with_type_default_and_env_var() -> None:
    text = config_fields_help(Settings, PREFIX)
    lines = text.splitlines()
    assert lines[0] == "\b"
    assert "flag > environment variable > config file > default" in lines[1]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == [f.name for f in dataclasses.fields(Settings)]
    for name, line in rows.items():
        assert line.rstrip().endswith(f"env {env_var_name(PREFIX, name)}")
    assert "int" in rows["port"] and "default 1883" in rows["port"]
    assert "bool" in rows["tls"] and "default false" in rows["tls"]
    assert "path or none" in rows["ca_file"] and "default none" in rows["ca_file"]
    assert "list of int" in rows["layers"] and "default '4,2'" in rows["layers"]
    assert "default ''" in rows["tags"]
    assert "fedavg|fedprox" in rows["mode"] and "default 'fedavg'" in rows["mode"]
    assert "default 'data'" in rows["data_dir"]


def test_help_marks_required_fields() -> None:
    text = config_fields_help(Required, "FEDBUS_AGENT")
    assert "required" in text.splitlines()[2]
    assert "FEDBUS_AGENT_DEVICE_ID" in text


def test_help_survives_click_epilog_wrapping() -> None:
    command = click.Command("agent", epilog=config_fields_help(Settings, PREFIX))
    rendered = command.get_help(click.Context(command))
    for f in dataclasses.fields(Settings):
        var = env_var_name(PREFIX, f.name)
        assert any(
            line.split()[:1] == [f.name] and line.rstrip().endswith(var)
            for line in rendered.splitlines()
        ), f"{f.name} not on one line with {var}"
