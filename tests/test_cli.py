"""The CLI as a user meets it: help that works, and mistakes reported as one line."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fedbus.zoo import fit_inputs


def fedbus(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; run in a fresh directory so that nothing it writes
    (a state directory, a report) lands in the repository."""
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run(
            [sys.executable, "-m", "fedbus", *args], capture_output=True, text=True,
            timeout=timeout, cwd=cwd or tmp,
        )


@pytest.mark.parametrize("command", ["broker", "coordinator", "agent", "demo"])
def test_every_command_has_help(command):
    result = fedbus(command, "--help")
    assert result.returncode == 0
    assert "Usage: fedbus " + command in result.stdout
    assert "Traceback" not in result.stderr


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (("coordinator", "--password", "x", "--buffer-size", "0"), "buffer_size"),
        (("coordinator", "--password", "x", "--mode", "fedavg", "--server-momentum", "0.5"),
         "server_momentum"),
        (("coordinator", "--password", "x", "--codec", "topk:2"), "codec"),
        (("coordinator", "--password", "x", "--model-args", "[1]"), "model_args"),
        (("coordinator", "--password", "x", "--min-devices", "-1"), "min_devices"),
        (("coordinator", "--password", "x", "--chunk-timeout", "0"), "chunk_timeout"),
        (("coordinator", "--password", "x", "--aggregator", "krum:1"),
         "aggregator krum:1 needs at least 5 updates per step"),
        (("coordinator", "--password", "x", "--norm-multiple", "0.5"),
         "the norm multiple must be 0 (off) or >= 1"),
        (("coordinator", "--password", "x", "--norm-warmup", "0"), "warm-up fraction"),
        (("coordinator", "--password", "x", "--dp-noise", "1", "--dp-clip", "1",
          "--norm-multiple", "2"), "adaptive norm bound is off"),
        (("coordinator", "--password", "x", "--dp-noise", "1", "--dp-clip", "1",
          "--norm-reject", "3"), "drop --norm-reject"),
        (("coordinator", "--password", "x", "--dp-noise", "1", "--dp-clip", "1",
          "--aggregator", "agree"), "needs --aggregator mean, not agree"),
        (("coordinator",), "no broker password"),
        (("agent", "--device-id", "bad/id", "--data", "x.npz", "--password", "p"), "device id"),
        (("agent", "--device-id", "d1", "--data", "/nonexistent.npz", "--password", "p"),
         "/nonexistent.npz"),
        (("agent", "--device-id", "d1", "--data", "x.npz", "--password", "p",
          "--coordinator-key", "ed25519:short"), "not an Ed25519 public key"),
        (("agent", "--device-id", "d1", "--data", "x.npz", "--password", "p",
          "--coordinator-key", "/nonexistent.pub"), "cannot read the coordinator key file"),
        (("coordinator", "--password", "x", "--signing-key", "/nonexistent.key",
          "--state-dir", ""), "cannot read the signing key"),
    ],
)
def test_configuration_mistakes_are_one_line(args, expected, monkeypatch):
    monkeypatch.delenv("FEDBUS_COORDINATOR_PASSWORD", raising=False)
    monkeypatch.delenv("FEDBUS_AGENT_PASSWORD", raising=False)
    line = _one_error_line(fedbus(*args))
    assert line.startswith("error:") and expected in line, line


def test_fit_inputs_reshapes_flat_rows_and_refuses_other_sizes():
    x = np.zeros((5, 64), np.float32)
    assert fit_inputs(x, (64,)) is x
    assert fit_inputs(x, (1, 8, 8)).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="expects"):
        fit_inputs(x, (1, 28, 28))


def test_a_credentials_file_ranks_below_flags_environment_and_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from edge_agent.config import ENV_PREFIX, AgentConfig
    from fedbus.cli._options import load_process_config
    from fedbus.errors import ConfigError

    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({
        "host": "file-host", "port": 1111, "prefix": "fileprefix",
        "coordinator": {"username": "coordinator", "password": "c"},
        "devices": {"d1": {"username": "d1", "password": "p1"}},
    }))
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nport = 2222\n')
    monkeypatch.setenv("FEDBUS_AGENT_HOST", "env-host")
    monkeypatch.delenv("FEDBUS_AGENT_PREFIX", raising=False)
    monkeypatch.delenv("FEDBUS_AGENT_PORT", raising=False)
    monkeypatch.delenv("FEDBUS_AGENT_PASSWORD", raising=False)
    flags = {"device_id": "d1", "data": str(tmp_path), "credentials": str(creds)}
    cfg, password = load_process_config(
        AgentConfig, flags, env_prefix=ENV_PREFIX, config_file=config, section="agent",
        username=lambda c: c.device_id,
    )
    assert (cfg.host, cfg.port, cfg.prefix, password) == ("env-host", 2222, "fileprefix", "p1")
    # a file without TLS (written before fedbus spoke it) names a plain port only, which
    # beyond loopback takes an explicit --insecure-plaintext
    with pytest.raises(ConfigError, match="plain MQTT to flag-host"):
        load_process_config(
            AgentConfig, {**flags, "host": "flag-host"}, env_prefix=ENV_PREFIX,
            config_file=None, section="agent", username=lambda c: c.device_id,
        )
    cfg, _ = load_process_config(
        AgentConfig, {**flags, "host": "flag-host", "insecure_plaintext": True},
        env_prefix=ENV_PREFIX, config_file=None, section="agent",
        username=lambda c: c.device_id,
    )
    assert (cfg.host, cfg.port, cfg.tls_settings()) == ("flag-host", 1111, None)


def test_a_tls_credentials_file_chooses_the_port_and_the_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from edge_agent.config import ENV_PREFIX, AgentConfig
    from fedbus import pki
    from fedbus.cli._options import load_process_config
    from fedbus.errors import ConfigError

    for var in ("HOST", "PORT", "PREFIX", "PASSWORD", "TLS", "TLS_CA", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"{ENV_PREFIX}_{var}", raising=False)
    ca, _ = pki.ensure_ca(tmp_path / "tls")
    pki.issue_client_certificate(ca, "d1", tmp_path / "tls" / "d1.crt", tmp_path / "tls" / "d1.key")
    pki.issue_client_certificate(ca, "d2", tmp_path / "tls" / "d2.crt", tmp_path / "tls" / "d2.key")
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({
        "host": "127.0.0.1", "port": 1111, "prefix": "fedbus",
        "tls": {"port": 8883, "mtls_port": 8884, "ca_file": "tls/ca.crt"},
        "coordinator": {"username": "coordinator"},
        "devices": {"d1": {"username": "d1", "password": "p1"}},
    }))
    base = {"device_id": "d1", "data": str(tmp_path), "credentials": str(creds)}

    def load(**flags: object) -> tuple[AgentConfig, str]:
        return load_process_config(AgentConfig, {**base, **flags}, env_prefix=ENV_PREFIX,
                                   config_file=None, section="agent",
                                   username=lambda c: c.device_id)

    cfg, password = load()  # TLS with the password, the CA beside the file
    assert (cfg.broker_port(), cfg.tls_ca, password) == (8883, tmp_path / "tls" / "ca.crt", "p1")
    assert cfg.tls_settings() is not None
    cert, key = str(tmp_path / "tls" / "d1.crt"), str(tmp_path / "tls" / "d1.key")
    cfg, _ = load(tls_cert=cert, tls_key=key)  # mutual TLS
    assert cfg.broker_port() == 8884
    cfg, _ = load(tls=False)  # plain MQTT on loopback when asked
    assert (cfg.broker_port(), cfg.tls_settings()) == (1111, None)
    cfg, _ = load(port=2222)  # an explicit port on loopback (a proxy, say): plain as before
    assert (cfg.broker_port(), cfg.tls_settings()) == (2222, None)
    with pytest.raises(ConfigError, match="is for 'd2', not 'd1'"):
        load(tls_cert=str(tmp_path / "tls" / "d2.crt"), tls_key=str(tmp_path / "tls" / "d2.key"))


def test_an_empty_state_dir_keeps_nothing_on_disk(tmp_path: Path) -> None:
    """--state-dir '' means memory only; it used to become Path('') == '.' and write
    state.db, lock and signing.key into the current directory."""
    result = fedbus("coordinator", "--state-dir", "", "--password", "x", "--port", "1",
                    "--connect-timeout", "1", cwd=tmp_path)
    # no --eval-data, so the model cannot be built: an error after the state step
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: cannot build model" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_json_logs_are_one_object_per_line():
    import json
    import logging

    from fedbus.logformat import JsonFormatter

    record = logging.LogRecord("coordinator.service", logging.WARNING, "f.py", 1,
                               "update %s rejected:\nnorm", ("u1",), None)
    record.device = "dev-1"  # as logging's extra= puts it
    record.payload = b"\x00"  # not JSON: its repr
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "WARNING" and obj["logger"] == "coordinator.service"
    assert obj["message"] == "update u1 rejected:\nnorm"
    assert obj["device"] == "dev-1" and obj["payload"] == "b'\\x00'"
    assert obj["time"].endswith("+00:00") and isinstance(obj["ts"], float)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_cli_logs_json_when_asked(tmp_path):
    import json

    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "--log-format", "json", "coordinator",
         "--host", "127.0.0.1", "--port", str(_closed_port()), "--no-tls",
         "--password", "x", "--state-dir", str(tmp_path / "run"), "--connect-timeout", "1",
         "--model-args", '{"in_features": 4, "num_classes": 2}'],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines, result.stderr
    records = [json.loads(line) for line in lines]
    assert any(r["logger"] == "fedbus.transport" for r in records)
