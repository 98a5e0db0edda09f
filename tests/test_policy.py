"""The device training policy: pure decisions (edge_agent.policy), the gate that applies them
(edge_agent.gate) with injected observations, real commands, a real CPU cap and nice value,
and the agent skipping a version over its memory ceiling (in-memory broker)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inmemory import Running, wait_for

from edge_agent.config import AgentConfig
from edge_agent.gate import TrainingGate, apply_nice, run_check
from edge_agent.policy import (
    CheckResult,
    Decision,
    TimeWindow,
    TrainingPolicy,
    cpu_pacing_delay,
    decide,
    memory_block,
    parse_window,
    parse_windows,
    transition_message,
)
from fedbus.config import load_config
from fedbus.errors import ConfigError

MIB = 1024 * 1024


def _at(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


# -- windows ----------------------------------------------------------------------------


def test_a_window_is_start_inclusive_end_exclusive_and_may_cross_midnight() -> None:
    night = parse_window("22:00-06:00")
    assert night == TimeWindow(22 * 60, 6 * 60)
    inside = ["22:00", "23:59", "00:00", "05:59"]
    outside = ["06:00", "12:00", "21:59"]
    assert [night.contains(_at(t)) for t in inside] == [True] * 4
    assert [night.contains(_at(t)) for t in outside] == [False] * 3
    lunch = parse_window(" 12:30-13:05 ")
    assert [lunch.contains(_at(t)) for t in ("12:29", "12:30", "13:04", "13:05")] == [
        False, True, True, False]
    whole = parse_window("00:00-24:00")
    assert all(whole.contains(m) for m in (0, 720, 1439))
    assert str(parse_window("7:05-24:00")) == "07:05-24:00"


@pytest.mark.parametrize(("text", "says"), [
    ("22-06", "is not HH:MM-HH:MM"),
    ("22:00 - 06:00", "is not HH:MM-HH:MM"),
    ("25:00-06:00", "hours must be 00-23"),
    ("24:00-06:00", "hours must be 00-23"),
    ("22:00-24:30", "24:00 only as an end"),
    ("22:60-06:00", "minutes 00-59"),
    ("06:00-06:00", "is empty"),
    ("00:00-00:00", "is empty"),
])
def test_malformed_windows_are_one_line_errors(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        parse_window(text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


def test_any_of_several_windows_allows_training_and_the_reason_names_the_next() -> None:
    policy = TrainingPolicy(windows=parse_windows(["22:00-06:00", "12:00-13:00"]))
    assert decide(policy=policy, minute=_at("23:00")).train
    assert decide(policy=policy, minute=_at("12:15")).train
    assert decide(policy=policy, minute=_at("09:00")) == Decision(
        False, "outside the training window 22:00-06:00,12:00-13:00 (next opens at 12:00)")
    assert decide(policy=policy, minute=_at("13:00")).reason.endswith("(next opens at 22:00)")
    assert decide(policy=TrainingPolicy(), minute=_at("09:00")).train  # no window: any time


# -- decisions --------------------------------------------------------------------------


def test_the_window_decides_first_then_the_pause_file_then_the_command() -> None:
    policy = TrainingPolicy(windows=(parse_window("22:00-06:00"),),
                            pause_file=Path("/run/pause"), check=("ok",), check_timeout=3)
    night, day = _at("23:00"), _at("12:00")
    no = CheckResult(returncode=1)
    assert "outside the training window" in decide(
        policy=policy, minute=day, pause_file_exists=True, check=no).reason
    assert decide(policy=policy, minute=night, pause_file_exists=True, check=no).reason == (
        "pause file /run/pause exists")
    assert decide(policy=policy, minute=night, pause_file_exists=False, check=no).reason == (
        "the check command exited with 1")
    assert decide(policy=policy, minute=night, pause_file_exists=False,
                  check=CheckResult(timed_out=True)).reason == (
        "the check command took more than 3 s")
    assert decide(policy=policy, minute=night, pause_file_exists=False,
                  check=CheckResult(error="No such file or directory")).reason == (
        "cannot run the check command: No such file or directory")
    assert decide(policy=policy, minute=night, pause_file_exists=False,
                  check=CheckResult(returncode=0)) == Decision(True)


def test_a_transition_is_said_once_and_allowed_at_start_says_nothing() -> None:
    go, file, late = Decision(True), Decision(False, "pause file p exists"), Decision(
        False, "outside the training window 22:00-06:00 (next opens at 22:00)")
    assert transition_message(None, go) is None
    assert transition_message(None, file) == "training paused: pause file p exists"
    assert transition_message(go, go) is None
    assert transition_message(file, file) is None
    assert transition_message(go, file) == "training paused: pause file p exists"
    assert transition_message(file, late) == f"training still paused: {late.reason}"
    assert transition_message(file, go) == "training resumed (was paused: pause file p exists)"


def test_cpu_pacing_holds_cpu_time_to_the_share_of_wall_time() -> None:
    # 0.3 s of CPU in 0.4 s of wall time at a cap of half a core: 0.6 s in all, sleep 0.2 s
    assert cpu_pacing_delay(0.3, 0.4, 0.5) == pytest.approx(0.2)
    assert cpu_pacing_delay(0.1, 0.4, 0.5) == 0.0  # under the cap
    assert cpu_pacing_delay(2.0, 1.0, 1.5) == pytest.approx(1 / 3)  # two threads, 1.5 cores
    assert cpu_pacing_delay(5.0, 1.0, 0.0) == 0.0  # no cap


def test_memory_block_names_the_resident_memory_and_the_ceiling() -> None:
    assert memory_block(300 * MIB, 0) is None
    assert memory_block(300 * MIB, 300 * MIB) is None
    assert memory_block(301 * MIB, 300 * MIB) == (
        "resident memory 301 MiB is over the ceiling of 300 MiB (max_memory_mib)")


def test_settings_are_validated_and_the_command_never_goes_through_a_shell_unless_asked(
) -> None:
    policy = TrainingPolicy.from_settings(check="/usr/bin/on-mains --min 'battery 40'",
                                          memory_mib=512)
    assert policy.check == ("/usr/bin/on-mains", "--min", "battery 40")
    assert policy.memory_bytes == 512 * MIB
    shell = TrainingPolicy.from_settings(check="test -f /a && test -f /b", check_shell=True)
    assert shell.check == ("/bin/sh", "-c", "test -f /a && test -f /b")
    for bad, says in [({"check_timeout": 0.0}, "train_check_timeout"),
                      ({"interval": float("nan")}, "policy_interval"),
                      ({"nice": -21}, "nice must be"), ({"cpu_share": -0.5}, "max_cpu_share"),
                      ({"memory_mib": -1}, "max_memory_mib"),
                      ({"check_shell": True}, "needs a train_check")]:
        with pytest.raises(ValueError, match=says):
            TrainingPolicy.from_settings(**bad)


def test_the_agent_config_takes_windows_from_flag_environment_and_file(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('[agent]\ndevice_id = "d1"\ndata = "x.npz"\n'
                    'train_window = ["22:00-06:00", "12:00-13:00"]\nnice = 10\n')

    def load(flags: dict[str, Any], env: dict[str, str]) -> AgentConfig:
        return load_config(AgentConfig, flags=flags, env=env, env_prefix="FEDBUS_AGENT",
                           file=file, section="agent")

    cfg = load({}, {})
    assert cfg.training_policy().windows == parse_windows(["22:00-06:00", "12:00-13:00"])
    assert cfg.training_policy().nice == 10
    cfg = load({}, {"FEDBUS_AGENT_TRAIN_WINDOW": "01:00-02:00", "FEDBUS_AGENT_NICE": ""})
    assert [str(w) for w in cfg.training_policy().windows] == ["01:00-02:00"]
    assert cfg.nice is None
    cfg = load({"train_window": "03:00-04:00,05:00-06:00"}, {"FEDBUS_AGENT_TRAIN_WINDOW": "x"})
    assert [str(w) for w in cfg.training_policy().windows] == ["03:00-04:00", "05:00-06:00"]
    with pytest.raises(ConfigError, match="'9:00-5pm' is not HH:MM-HH:MM"):
        load({"train_window": "9:00-5pm"}, {})


# -- the gate, observations injected --------------------------------------------------------


class Fake:
    """A clock, a local minute, a pause file, a check command and CPU time under test control."""

    def __init__(self) -> None:
        self.now = 0.0
        self.minute = _at("23:00")
        self.file = False
        self.returncode = 0
        self.checks = 0
        self.cpu = 0.0
        self.kib = 100 * 1024
        self.slept: list[float] = []
        self.changes: list[Decision] = []

    def check(self, argv: tuple[str, ...], timeout: float) -> CheckResult:
        self.checks += 1
        return CheckResult(returncode=self.returncode)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def gate(self, policy: TrainingPolicy) -> TrainingGate:
        return TrainingGate(
            policy, sleep=self.sleep, on_change=self.changes.append, clock=lambda: self.now,
            minute=lambda: self.minute, path_exists=lambda p: self.file, check=self.check,
            cpu_time=lambda: self.cpu, resident_kib=lambda field: self.kib,
            reset_peak=lambda: True,
        )


POLICY = TrainingPolicy(windows=(parse_window("22:00-06:00"),), pause_file=Path("p"),
                        check=("true",), interval=5.0)


def test_the_gate_polls_every_interval_and_logs_each_transition_once(caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.gate")
    fake = Fake()
    gate = fake.gate(POLICY)
    assert gate.poll().train and fake.checks == 1
    fake.file = True
    assert gate.poll().train  # within the interval: the last decision
    fake.now += 5
    for _ in range(10):  # ten polls while paused: one line
        assert not gate.poll().train
        fake.now += 5
    fake.minute = _at("07:00")  # the window closes too: one more line
    gate.poll()
    fake.now += 5
    fake.file, fake.minute = False, _at("22:00")
    checks = fake.checks
    assert gate.poll().train
    assert fake.checks == checks + 1  # the command is run only once the window is open
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.gate"]
    assert lines == [
        "training paused: pause file p exists",
        "training still paused: outside the training window 22:00-06:00 (next opens at 22:00)",
        "training resumed (was paused: outside the training window 22:00-06:00 (next opens at "
        "22:00))",
    ]
    assert [d.train for d in fake.changes] == [False, False, True]


def test_the_check_command_is_not_run_outside_the_window_nor_with_the_pause_file() -> None:
    fake = Fake()
    fake.minute = _at("12:00")
    gate = fake.gate(POLICY)
    assert not gate.poll().train and fake.checks == 0
    fake.minute, fake.file = _at("23:00"), True
    assert not gate.poll(force=True).train and fake.checks == 0
    fake.file, fake.returncode = False, 3
    assert gate.poll(force=True).reason == "the check command exited with 3"
    assert fake.checks == 1


def test_the_gate_paces_batches_to_the_cpu_share_and_stops_on_pause_or_memory() -> None:
    fake = Fake()
    gate = fake.gate(TrainingPolicy(pause_file=Path("p"), interval=1.0, cpu_share=0.25,
                                    memory_bytes=200 * MIB))
    assert gate.begin_training() is None
    fake.cpu += 0.1  # a batch: 0.1 s of CPU in 0.1 s
    fake.now += 0.1
    assert gate.between_batches() is False
    assert fake.slept == [pytest.approx(0.3)]  # 0.1 s of CPU may take 0.4 s of wall time
    fake.cpu += 0.05
    fake.now += 0.05
    assert gate.between_batches() is False
    assert fake.slept[-1] == pytest.approx(0.15)  # 0.15 s of CPU: 0.6 s in all
    fake.file = True
    fake.now += 1.0  # the interval passed: the pause file is seen at the next batch
    assert gate.between_batches() is True
    assert gate.interruption == "pause file p exists" and not gate.over_memory
    fake.file = False
    fake.kib = 201 * 1024
    assert gate.begin_training() == (
        "resident memory 201 MiB is over the ceiling of 200 MiB (max_memory_mib)")
    fake.kib = 150 * 1024
    assert gate.begin_training() is None
    fake.kib = 250 * 1024  # the peak during a batch
    assert gate.between_batches() is True and gate.over_memory


def test_a_check_command_that_cannot_run_is_refused_when_the_agent_is_made(
    tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="'no-such-check-cmd' not found in PATH"):
        TrainingGate(TrainingPolicy(check=("no-such-check-cmd",)), sleep=time.sleep)
    script = tmp_path / "check.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(ConfigError, match=f"{script} is not an executable file"):
        TrainingGate(TrainingPolicy(check=(str(script),)), sleep=time.sleep)
    script.chmod(0o755)
    TrainingGate(TrainingPolicy(check=(str(script),)), sleep=time.sleep)


# -- real commands, CPU time and priority -------------------------------------------------


def test_run_check_gives_the_exit_status_and_kills_a_slow_command(tmp_path: Path) -> None:
    assert run_check(("true",), 5) == CheckResult(returncode=0)
    assert run_check(("sh", "-c", "exit 7"), 5) == CheckResult(returncode=7)
    started = time.monotonic()
    assert run_check(("sleep", "10"), 0.2) == CheckResult(timed_out=True)
    assert time.monotonic() - started < 5
    missing = run_check((str(tmp_path / "nothing"),), 5)
    assert missing.returncode is None and missing.error
    # no shell: a shell operator is an argument, not a pipe
    out = tmp_path / "written"
    assert run_check(("echo", "x", ">", str(out)), 5).returncode == 0 and not out.exists()


def test_a_real_training_stays_within_its_cpu_share() -> None:
    from edge_agent.train import train_local
    from fedbus.datasets import load_digits
    from fedbus.messages import TrainSpec
    from fedbus.zoo import build_model

    x, y = load_digits()
    model = build_model("mlp", {"in_features": 64, "num_classes": 10, "hidden": [32]})
    share = 0.3
    gate = TrainingGate(TrainingPolicy(cpu_share=share), sleep=time.sleep)
    spec = TrainSpec(epochs=1, batch_size=32, lr=0.05)
    train_local(model, x[:64], y[:64], spec, seed=0)  # warm-up, uncapped
    cpu0, wall0 = time.process_time(), time.monotonic()
    assert gate.begin_training() is None
    result = train_local(model, x[:480], y[:480], spec, seed=0,
                         should_stop=gate.between_batches)
    gate.end_training()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    print(f"cpu {cpu:.3f} s in {wall:.3f} s")
    assert not result.stopped and result.steps == 15
    # the cap holds (up to one batch of CPU, a few ms); the test process's other threads
    # are idle. On a loaded machine the share can only be lower.
    assert cpu / wall <= share * 1.1 + 0.02, (cpu, wall)
    assert gate.last_cpu_share is not None and gate.last_cpu_share <= share * 1.1 + 0.02
    assert wall >= cpu / share * 0.9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_the_memory_ceiling_sees_a_peak_that_is_already_freed() -> None:
    from edge_agent.gate import _status_kib

    now = _status_kib("VmRSS")
    assert now is not None
    gate = TrainingGate(TrainingPolicy(memory_bytes=(now + 48 * 1024) * 1024), sleep=time.sleep)
    assert gate.begin_training() is None  # resets the peak to what is resident now
    spike = b"\x01" * (96 * MIB)  # written, so resident
    del spike
    assert gate.between_batches() is True and gate.over_memory
    assert gate.interruption is not None and "over the ceiling" in gate.interruption
    assert gate.begin_training() is None  # the next training starts from a fresh peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_nice_applies_to_the_training_thread_only() -> None:
    seen: dict[str, int] = {}

    def trainer() -> None:
        apply_nice(min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7))
        seen["trainer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = threading.Thread(target=lambda: seen.update(
            torch=os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        child.start()
        child.join()
        try:
            apply_nice(seen["trainer"] - 1)
        except ConfigError as exc:
            seen["refused"] = "CAP_SYS_NICE" in str(exc)

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=trainer)
    thread.start()
    thread.join()
    assert seen["trainer"] == min(19, own + 7) == seen["torch"]  # inherited by its threads
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    if os.geteuid() != 0:
        assert seen["refused"]


# -- the agent over its memory ceiling (in-memory broker) ------------------------------------


def test_an_agent_over_its_memory_ceiling_skips_the_version_with_one_error(
    tmp_path: Path, caplog
) -> None:
    from edge_agent.agent import Agent, LocalData
    from fedbus.memory_transport import MemoryBroker

    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(0)
    data = LocalData(rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 2, 40))
    broker = MemoryBroker()
    coordinator = Running(broker, mode="fedasync")
    config = AgentConfig(device_id="dev-a", data=tmp_path / "unused.npz",
                         state_dir=tmp_path / "a", max_memory_mib=1)
    agent = Agent(config, data, password="x", transport_factory=broker.factory)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent.stats.last_version == 0, what="version 0 skipped")
    finally:
        agent.stop()
        thread.join(10)
        coordinator.stop()
        broker.close()
    assert agent.stats.updates_published == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("skipping v0: resident memory ")
    assert errors[0].endswith("is over the ceiling of 1 MiB (max_memory_mib)")


def test_a_refused_nice_value_is_one_line_naming_the_privilege(monkeypatch) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "setpriority", refuse)
    with pytest.raises(ConfigError, match=r"^cannot set nice -5 \(now -?\d+\): a nice value "
                       r"below the current one needs root or CAP_SYS_NICE$"):
        apply_nice(-5)


def test_a_pause_during_training_stops_it_at_a_batch_and_sends_nothing(
    tmp_path: Path, caplog
) -> None:
    from edge_agent.agent import Agent, LocalData
    from fedbus.memory_transport import MemoryBroker

    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(0)
    data = LocalData(rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 2, 40))
    broker = MemoryBroker()
    coordinator = Running(broker, mode="fedasync", epochs=1000, batch_size=1)  # seconds
    pause = tmp_path / "pause"
    config = AgentConfig(device_id="dev-a", data=tmp_path / "unused.npz",
                         state_dir=tmp_path / "a", pause_file=pause, policy_interval=0.05)
    agent = Agent(config, data, password="x", transport_factory=broker.factory)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: coordinator.service.core.devices.get("dev-a") == "training",
                 what="the training")
        pause.touch()
        wait_for(lambda: any("training on v0 stopped" in r.getMessage()
                             for r in caplog.records), what="the training to stop")
        wait_for(lambda: coordinator.service.core.devices.get("dev-a") == "idle",
                 what="status idle")
        assert agent.stats.updates_published == 0
        assert agent.stats.last_version is None  # v0 is trained again once allowed
    finally:
        agent.stop()
        thread.join(10)
        coordinator.stop()
        broker.close()
    stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert stopped == [f"training on v0 stopped: pause file {pause} exists"]
