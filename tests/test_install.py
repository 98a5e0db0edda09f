"""The one-command device install: deploy/install-agent.sh, its systemd unit, the placing of a
device's bundle (fedbus.device_install), and an agent process that loads nothing of the
coordinator's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from edge_agent.config import ENV_PREFIX
from fedbus.broker import LocalBroker
from fedbus.credentials import BrokerAddress, write_bundle
from fedbus.datasets import write_npz
from fedbus.device_install import (
    AGENT_ENV_PREFIX,
    Account,
    account_ids,
    agent_env,
    apply_install,
    plan_install,
)
from fedbus.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "install-agent.sh"
UNIT = REPO / "deploy" / "systemd" / "fedbus-agent.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
EXPOSURE_AIM = 4.0
# what only the coordinator's host needs (pyproject.toml's server extra): never in an agent.
# Not tqdm: torch.hub imports it whenever it is installed (it is not in an agent's venv).
SERVER_ONLY = ("coordinator", "sklearn", "matplotlib", "prometheus_client", "dp_accounting",
               "scipy")
ADDRESS = BrokerAddress("broker.lan", None, 8883, 8884, "fedbus", "ed25519:" + "A" * 43)
ACCOUNT = Account(uid=999, gid=998)


# -- pins and names --------------------------------------------------------------------------

def test_the_torch_pin_is_the_same_everywhere() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.replace(" ", "") for d in deps if re.match(r"torch\b", d)]
    makefile = re.search(r"^TORCH_PIN := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    script = re.search(r'^TORCH_PIN="(\S+)"$', SCRIPT.read_text(), re.M)
    assert makefile and script
    assert pin == makefile.group(1) == script.group(1) == "torch==2.13.0"


def test_the_env_prefix_is_the_agents() -> None:
    assert AGENT_ENV_PREFIX == ENV_PREFIX


# -- planning the files (pure, no broker) -----------------------------------------------------

def _modes(plan) -> dict[str, tuple[int, int | None, int | None]]:
    return {str(f.path): (f.mode, f.owner, f.group) for f in plan.files}


def test_a_password_bundle_becomes_etc_fedbus(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", ADDRESS, "pi-01", ca_pem=b"CA", password="pw")
    plan = plan_install(bundle, data="/srv/data.npz", account=ACCOUNT)
    assert plan.device == "pi-01"
    assert _modes(plan) == {
        "/etc/fedbus/agent.env": (0o600, 0, 0),
        "/etc/fedbus/credentials.json": (0o640, 0, 998),  # the password: root and fedbus
        "/etc/fedbus/ca.crt": (0o644, 0, 0),
    }
    files = {str(f.path): f.content for f in plan.files}
    assert files["/etc/fedbus/credentials.json"] == (bundle / "credentials.json").read_bytes()
    assert files["/etc/fedbus/agent.env"].decode().splitlines()[-3:] == [
        "FEDBUS_AGENT_CREDENTIALS=/etc/fedbus",
        "FEDBUS_AGENT_DATA=/srv/data.npz",
        "FEDBUS_AGENT_STATE_DIR=/var/lib/fedbus/state/pi-01",
    ]
    dirs = {str(d.path): (d.mode, d.owner, d.group) for d in plan.dirs}
    assert dirs == {"/etc/fedbus": (0o750, 0, 998), "/var/lib/fedbus": (0o750, 999, 998),
                    "/var/lib/fedbus/data": (0o750, 999, 998),
                    "/var/lib/fedbus/state": (0o700, 999, 998)}


def test_a_certificate_bundle_keeps_its_key_from_everyone_else(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", ADDRESS, "pi-02", ca_pem=b"CA",
                          certificate_pem=b"CERT", key_pem=b"KEY")
    modes = _modes(plan_install(bundle, data="/var/lib/fedbus/data", account=ACCOUNT))
    assert modes["/etc/fedbus/pi-02.key"] == (0o640, 0, 998)
    assert modes["/etc/fedbus/pi-02.crt"] == (0o644, 0, 0)
    # without the service's account nothing is group-readable
    modes = _modes(plan_install(bundle, data="/var/lib/fedbus/data", account=None))
    assert modes["/etc/fedbus/pi-02.key"] == (0o600, None, None)
    assert modes["/etc/fedbus/credentials.json"] == (0o600, None, None)


def test_what_is_not_a_device_bundle_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        plan_install(tmp_path / "missing", data="/d", account=None)
    operators = tmp_path / "op"
    operators.mkdir()
    (operators / "credentials.json").write_text('{"host": "h", "port": 1883, "devices": {}}')
    with pytest.raises(ConfigError, match="not a device's bundle"):
        plan_install(operators, data="/d", account=None)
    moved = write_bundle(tmp_path / "m", ADDRESS, "pi-03", ca_pem=b"CA", password="pw")
    text = (moved / "credentials.json").read_text().replace('"ca.crt"', '"tls/ca.crt"')
    (moved / "credentials.json").write_text(text)
    with pytest.raises(ConfigError, match=r"file name beside credentials\.json"):
        plan_install(moved, data="/d", account=None)
    (moved / "credentials.json").write_text(text.replace('"tls/ca.crt"', '"ca.crt"'))
    (moved / "ca.crt").unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        plan_install(moved, data="/d", account=None)


@pytest.mark.parametrize("data", ["data.npz", "/srv/a\nFEDBUS_AGENT_HOST=evil", "/srv/x ",
                                  '/srv/"q"', "/srv/back\\slash"])
def test_agent_env_refuses_what_systemd_would_misread(data: str) -> None:
    with pytest.raises(ConfigError):
        agent_env(PurePosixPath("/etc/fedbus"), data, PurePosixPath("/var/lib/fedbus/s"))


def test_account_ids_from_passwd() -> None:
    passwd = "root:x:0:0:root:/root:/bin/bash\nfedbus:x:999:995::/var/lib/fedbus:/sbin/nologin\n"
    assert account_ids(passwd, "fedbus") == Account(999, 995)
    assert account_ids(passwd, "fed") is None
    with pytest.raises(ConfigError):
        account_ids("fedbus:x:abc:1::/:/bin/sh", "fedbus")


def test_apply_replaces_files_and_keeps_the_data(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = write_bundle(tmp_path / "b1", ADDRESS, "pi-01", ca_pem=b"CA1", password="one")
    apply_install(plan_install(first, data="/var/lib/fedbus/data", account=None), root)
    (root / "var/lib/fedbus/data/mine.npz").write_bytes(b"data")
    second = write_bundle(tmp_path / "b2", ADDRESS, "pi-01", ca_pem=b"CA2", password="two")
    apply_install(plan_install(second, data="/var/lib/fedbus/data", account=None), root)
    etc = root / "etc/fedbus"
    assert (etc / "ca.crt").read_bytes() == b"CA2"
    assert '"two"' in (etc / "credentials.json").read_text()
    assert sorted(p.name for p in etc.iterdir()) == ["agent.env", "ca.crt", "credentials.json"]
    assert stat.S_IMODE((etc / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    assert (root / "var/lib/fedbus/data/mine.npz").read_bytes() == b"data"


# -- the systemd unit -------------------------------------------------------------------------

def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60)


def _check_unit(unit: Path, tmp_path: Path, python: str) -> None:
    """``systemd-analyze verify`` without a warning (it exits 0 even on unknown keys), and
    ``security`` at most EXPOSURE_AIM. verify checks that ExecStart is executable: the copy
    points at ``python``."""
    text = unit.read_text()
    assert "\nExecStart=/opt/fedbus/venv/bin/python -m fedbus agent\n" in text
    copy = tmp_path / "fedbus-agent.service"
    copy.write_text(text.replace("/opt/fedbus/venv/bin/python", python))
    verify = _analyze("verify", str(copy))
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = _analyze("security", "--offline=true", str(copy))
    found = re.search(r"Overall exposure level for fedbus-agent\.service: (\d+\.\d+)",
                      security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found.group(1)) <= EXPOSURE_AIM, security.stdout


def test_the_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    _check_unit(UNIT, tmp_path, sys.executable)


# -- the script, end to end --------------------------------------------------------------------

def test_the_script_explains_itself_and_refuses_mistakes() -> None:
    shown = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "--root DIR" in shown.stdout and "--no-torch" in shown.stdout
    for args, message in ((["--colour"], "unknown argument --colour"),
                          (["--venv", "venv"], "--venv must be an absolute path"),
                          (["--root", "/tmp", "--bundle", "/nonexistent"], "not a bundle")):
        bad = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.startswith("install-agent: error:") and message in bad.stderr
        assert len(bad.stderr.splitlines()) == 1


def _source_copy(dest: Path) -> Path:
    """What pip installs: the package's files of this checkout (a copy, so the build leaves
    nothing in the checkout and runs beside other tests)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fedbus", "edge_agent", "coordinator", "broker_config"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _venv_with_this_environments_packages(path: Path) -> None:
    """A virtualenv whose own site-packages is empty but which sees this environment's
    packages (torch, numpy, pip, ...) through a .pth file: the script reuses it, and pip finds
    torch and the other dependencies installed, so the test downloads nothing."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=60)
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    (site / "this-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} from the agent:\n{path.read_text(errors='replace')}")


@pytest.mark.broker
@pytest.mark.slow
def test_install_then_the_installed_agent_connects_without_coordinator_modules(
        broker: LocalBroker, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    as_root = os.geteuid() == 0 and shutil.which("useradd") is not None
    if as_root:  # the script adds the user with useradd --prefix
        for name in ("passwd", "group", "shadow", "gshadow"):
            (root / "etc" / name).touch()
    venv = root / "opt/fedbus/venv"
    _venv_with_this_environments_packages(venv)
    bundle = write_bundle(
        tmp_path / "bundle",
        BrokerAddress(broker.host, broker.port, broker.tls_port, broker.mtls_port,
                      broker.prefix, broker.coordinator_key),
        "dev-a", ca_pem=broker.ca_file.read_bytes(), password=broker.credentials("dev-a").password)

    env = {**os.environ, "PIP_NO_BUILD_ISOLATION": "0"}  # setuptools is there already
    done = subprocess.run(
        [str(SCRIPT), "--root", str(root), "--bundle", str(bundle), "--no-torch",
         "--from", str(_source_copy(tmp_path / "src"))],
        capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "staged under" in done.stdout and "systemctl enable --now fedbus-agent" in done.stdout

    etc = root / "etc/fedbus"
    expected = {"agent.env": 0o600, "credentials.json": 0o640 if as_root else 0o600,
                "ca.crt": 0o644}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in etc.iterdir()} == expected
    settings = dict(line.split("=", 1) for line in (etc / "agent.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert settings == {"FEDBUS_AGENT_CREDENTIALS": "/etc/fedbus",
                        "FEDBUS_AGENT_DATA": "/var/lib/fedbus/data",
                        "FEDBUS_AGENT_STATE_DIR": "/var/lib/fedbus/state/dev-a"}
    if as_root:
        (entry,) = [line for line in (root / "etc/passwd").read_text().splitlines()
                    if line.startswith("fedbus:")]
        uid, gid = (int(v) for v in entry.split(":")[2:4])
        assert etc.stat().st_gid == gid and (etc / "credentials.json").stat().st_gid == gid
        assert (root / "var/lib/fedbus/state").stat().st_uid == uid
    unit = root / "etc/systemd/system/fedbus-agent.service"
    assert unit.read_text() == UNIT.read_text()
    _check_unit(unit, tmp_path, str(venv / "bin/python"))

    # fedbus itself is in the virtualenv, nothing of the server extra is
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    own = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert "fedbus" in own and not own & {"sklearn", "scikit_learn", "matplotlib",
                                          "prometheus_client", "dp_accounting"}
    helped = subprocess.run([str(venv / "bin/fedbus"), "agent", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--credentials" in helped.stdout

    # the service's command, with agent.env's settings (paths under the staging root):
    # it connects, and imports nothing of the coordinator's
    write_npz(root / "var/lib/fedbus/data/local.npz", [[0.0] * 4] * 8, [0, 1] * 4)
    env = {**os.environ, "FEDBUS_LOG_LEVEL": "debug", "PYTHONPATH": "",
           **{k: str(root) + v for k, v in settings.items()}}
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        agent = subprocess.Popen([str(venv / "bin/python"), "-X", "importtime", "-m", "fedbus",
                                  "agent"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(log, "torch warm-up took", agent, 60)  # connected, idle, waiting for a task
        _wait_for(log, "connected to", agent, 30)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    text = log.read_text()
    imported = {m.group(1).strip().split(".")[0]
                for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \| (.+)$", text, re.M)}
    assert {"fedbus", "edge_agent", "torch", "paho"} <= imported
    assert not imported & set(SERVER_ONLY), sorted(imported & set(SERVER_ONLY))
    assert "as dev-a" in text and "broker verified" in text
