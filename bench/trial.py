"""A field trial on one machine, for fault injection: real processes, real faults, an audit.

``Trial`` runs a Mosquitto broker (``fedbus.broker.LocalBroker``), the coordinator as a
``fedbus coordinator`` process with a state directory, and one ``fedbus agent`` process per
device, each with its own state directory and, if asked, behind a ``LinkProxy`` that can cut,
blackhole, refuse or flap its link. Faults are real: ``kill -9`` of the coordinator, of an
agent or of the broker, and broken TCP links.

``audit()`` then reads what every party recorded — the coordinator's ``state.db`` and each
agent's ``agent.db`` (their ledgers of produced updates and their fates) — and counts, for
the updates the agents produced: applied, applied twice, rejected (with a receipt, by
reason), dropped by the agent (by reason, logged), and lost (none of these). It also checks
that the model version never went backwards, neither in the coordinator's own log across
its restarts nor in what any agent trained on.

Used by ``tests/test_faults.py`` (short scenarios, in CI) and ``bench/faults.py`` (the long
matrix, ``make faults``).
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedbus.broker import LocalBroker, default_device_ids
from fedbus.linkfault import LinkProxy
from fedbus.processes import Child, ChildGroup

__all__ = ["Audit", "Trial", "TrialError"]

_MODEL_LINE = re.compile(r"model v(\d+)")
# every update of a trial stays in its agent's ledger, so the audit sees all of them
_LEDGER = 10_000_000
# reasons an agent may give for dropping an update without a receipt; anything else is a bug
AGENT_DROP_REASONS = ("versions behind", "run has ended", "outbox is full", "now runs")


class TrialError(RuntimeError):
    """The trial could not be run (a process died, a wait timed out)."""


@dataclass
class Audit:
    """What became of every update the agents produced."""

    produced: int = 0
    applied: int = 0  # accepted by the coordinator and folded into a version (or waiting)
    applied_twice: int = 0
    lost: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # with a receipt, by reason
    dropped: dict[str, int] = field(default_factory=dict)  # by the agent, by reason
    repeated: int = 0  # copies answered with their first verdict (re-sends, redeliveries)
    versions_backwards: int = 0
    final_version: int = 0
    lost_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.applied_twice or self.versions_backwards)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


class Trial:
    """One broker, one coordinator process and ``devices`` agent processes under ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        devices: int = 4,
        proxied: Sequence[str] = (),
        coordinator_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
        speeds: Sequence[float] = (1.0,),
        compute_seconds: float = 0.4,
        data_seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.devices = default_device_ids(devices)
        self.broker = LocalBroker(self.root / "broker", device_ids=self.devices)
        self.coordinator_args = list(coordinator_args)
        self.agent_args = list(agent_args)
        self.speeds = list(speeds)
        self.compute_seconds = compute_seconds
        self.data_seed = data_seed
        self.proxied = set(proxied)
        self.proxies: dict[str, LinkProxy] = {}
        self.coordinator: Child | None = None
        self.coordinator_starts = 0
        self.agents: dict[str, Child] = {}
        self.hosts: list[Child] = []
        # AgentConfig settings for hosted agents (name=value), e.g. "on_run_end=exit"
        self.host_settings: list[str] = []
        self.group = ChildGroup()
        self._data: dict[str, Path] = {}
        self._eval: Path | None = None

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Trial:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._write_data()
        self.broker.start()
        for device in self.proxied:
            self.proxies[device] = LinkProxy(self.broker.host, self.broker.port).start()

    def close(self) -> None:
        self.group.stop_all(10.0)
        for proxy in self.proxies.values():
            proxy.stop()
        self.broker.stop()

    def _write_data(self) -> None:
        from fedbus.datasets import dirichlet_split, load_digits, train_test_split, write_npz

        x, y = load_digits()
        x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, self.data_seed)
        parts = dirichlet_split(y_train, len(self.devices), 1.0, self.data_seed)
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        for device, idx in zip(self.devices, parts, strict=True):
            self._data[device] = data / f"{device}.npz"
            write_npz(self._data[device], x_train[idx], y_train[idx])
        self._eval = data / "eval.npz"
        write_npz(self._eval, x_test, y_test)

    # -- the coordinator --------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.root / "run"

    def start_coordinator(self, *extra: str) -> Child:
        self.coordinator_starts += 1
        child = Child(
            [sys.executable, "-m", "fedbus", "coordinator",
             "--credentials", str(self.broker.credentials_file),
             "--state-dir", str(self.state_dir), "--eval-data", str(self._eval),
             *self.coordinator_args, *extra],
            log_path=self.root / "logs" / f"coordinator-{self.coordinator_starts}.log",
            name=f"coordinator (start {self.coordinator_starts})",
        )
        self.coordinator = self.group.add(child)
        return child

    def kill_coordinator(self) -> None:
        if self.coordinator is not None:
            self.coordinator.kill()

    def version(self) -> int:
        """The coordinator's stored version (read from its state; -1 before it has one)."""
        try:
            db = sqlite3.connect(f"file:{self.state_dir / 'state.db'}?mode=ro", uri=True,
                                 timeout=5)
        except sqlite3.Error:
            return -1
        try:
            row = db.execute("SELECT version FROM model WHERE id = 0").fetchone()
            return -1 if row is None else int(row[0])
        except sqlite3.Error:
            return -1
        finally:
            db.close()

    def wait_version(self, version: int, timeout: float) -> None:
        self.wait(lambda: self.version() >= version, timeout, f"model version {version}")

    # -- agents ------------------------------------------------------------------------------

    def start_agent(self, device: str, *extra: str) -> Child:
        i = self.devices.index(device)
        where = []
        if device in self.proxies:
            proxy = self.proxies[device]
            where = ["--host", proxy.host, "--port", str(proxy.port)]
        starts = sum(1 for name in self.agents if name == device)
        log = self.root / "logs" / f"{device}.log"
        child = Child(
            [sys.executable, "-m", "fedbus", "agent", "--device-id", device,
             "--data", str(self._data[device]),
             "--credentials", str(self.broker.credentials_file), *where,
             "--state-dir", str(self.root / "agents" / device),
             "--slowdown", repr(float(self.speeds[i % len(self.speeds)])),
             "--compute-seconds", repr(self.compute_seconds), "--seed", str(i),
             "--ledger-size", str(_LEDGER),
             *self.agent_args, *extra],
            log_path=log, name=f"agent {device}", append=log.exists() or starts > 0,
            nice=5,
        )
        self.agents[device] = self.group.add(child)
        return child

    def start_agents(self, *extra: str) -> None:
        for device in self.devices:
            self.start_agent(device, *extra)

    def start_hosts(self, hosts: int, devices: Sequence[str] | None = None) -> list[Child]:
        """Run ``devices`` (default: every device that is not proxied) as real agents in
        ``hosts`` processes (``bench.agents_host``), sharing one torch per process."""
        chosen = [d for d in (devices or self.devices) if d not in self.proxies]
        started = []
        for h in range(hosts):
            mine = chosen[h::hosts]
            if not mine:
                continue
            argv = [sys.executable, "-m", "bench.agents_host",
                    "--credentials", str(self.broker.credentials_file),
                    "--state-root", str(self.root / "agents")]
            for device in mine:
                argv += ["--device", f"{device}={self._data[device]}"]
            argv += ["--set", f"ledger_size={_LEDGER}",
                     "--set", f"compute_seconds={self.compute_seconds}",
                     "--set", f"slowdown={self.speeds[0]}"]
            argv += [f"--set={item}" for item in self.host_settings]
            child = Child(argv, log_path=self.root / "logs" / f"host-{h}.log",
                          name=f"agents host {h}", nice=5,
                          cwd=Path(__file__).resolve().parent.parent)
            self.group.add(child)
            self.hosts.append(child)
            started.append(child)
        return started

    def kill_agent(self, device: str) -> None:
        self.agents[device].kill()

    def agent_log(self, device: str) -> str:
        path = self.root / "logs" / f"{device}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_agent_line(self, device: str, pattern: str, timeout: float, *,
                        after: int = 0) -> int:
        """Wait until ``pattern`` appears in the agent's log past offset ``after``; returns
        the offset just past the match."""
        regex = re.compile(pattern)
        found: list[int] = []

        def seen() -> bool:
            m = regex.search(self.agent_log(device), after)
            if m:
                found.append(m.end())
            return bool(m)

        self.wait(seen, timeout, f"{pattern!r} in {device}'s log")
        return found[0]

    # -- waiting -----------------------------------------------------------------------------

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.1)
        raise TrialError(f"timed out after {timeout:g} s waiting for {what}"
                         f"{self._coordinator_tail()}")

    def _coordinator_tail(self) -> str:
        if self.coordinator is None:
            return ""
        return f"\n--- {self.coordinator.name} ---\n{self.coordinator.log_tail(15)}"

    def wait_finished(self, timeout: float) -> None:
        """Wait for the coordinator to end the run and every agent to exit after it."""
        assert self.coordinator is not None
        code = self.coordinator.wait(timeout, "the coordinator to end the run")
        if code != 0:
            raise TrialError(f"the coordinator exited with code {code}"
                             f"{self._coordinator_tail()}")
        deadline = time.monotonic() + 60
        for child in self.hosts:
            code = child.wait(max(1.0, deadline - time.monotonic()), f"{child.name} to exit")
            if code != 0:
                raise TrialError(f"{child.name} exited with code {code}: {child.log_tail(5)}")
        for device, child in self.agents.items():
            code = child.wait(max(1.0, deadline - time.monotonic()), f"agent {device} to exit")
            if code != 0:
                raise TrialError(f"agent {device} exited with code {code}: "
                                 f"{child.log_tail(5)}")

    # -- the audit --------------------------------------------------------------------------

    def audit(self) -> Audit:
        """Count what became of every update (see the module docstring)."""
        verdicts, history, counters = self._coordinator_record()
        audit = Audit(final_version=max((v for v, _ in history), default=0),
                      repeated=int(counters.get("updates_repeated", 0)))
        accepted = {uid: v for uid, v in verdicts.items() if v["accepted"]}
        # applied twice: a version counting more updates than were accepted, or the same
        # work (device, base version) accepted under two ids
        folded = sum(n for _, n in history)
        pending = sum(1 for v in accepted.values() if v["applied_version"] is None)
        audit.applied_twice = max(0, folded - (len(accepted) - pending))
        work = Counter((v["device"], v["base_version"]) for v in accepted.values())
        audit.applied_twice += sum(n - 1 for n in work.values() if n > 1)
        audit.applied_twice += max(0, int(counters.get("updates_accepted", 0)) - len(accepted))
        rejected: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        for device in self.devices:
            rows = self._agent_ledger(device)
            bases = [base for _, _, base, _, _ in rows]
            audit.versions_backwards += sum(1 for a, b in itertools.pairwise(bases)
                                            if b <= a)
            for uid, _run, _base, fate, detail in rows:
                audit.produced += 1
                verdict = verdicts.get(uid)
                if verdict is not None and verdict["accepted"]:
                    audit.applied += 1
                elif verdict is not None:
                    rejected[str(verdict["reason"])] += 1
                elif fate == "dropped" and any(r in (detail or "") for r in AGENT_DROP_REASONS):
                    dropped[_short_reason(detail or "")] += 1
                else:
                    audit.lost += 1
                    audit.lost_ids.append(f"{device}:{uid} ({fate}: {detail})")
        audit.rejected = dict(rejected)
        audit.dropped = dict(dropped)
        audit.versions_backwards += self._coordinator_went_back()
        return audit

    def _coordinator_record(
        self,
    ) -> tuple[dict[str, dict[str, Any]], list[tuple[int, int]], dict[str, int]]:
        db = sqlite3.connect(f"file:{self.state_dir / 'state.db'}?mode=ro", uri=True)
        try:
            verdicts = {
                uid: {"device": dev, "base_version": base, "accepted": bool(acc),
                      "reason": reason, "applied_version": applied}
                for uid, dev, base, acc, reason, applied in db.execute(
                    "SELECT update_id, device, base_version, accepted, reason, applied_version "
                    "FROM verdicts")
            }
            history = [(int(v), int(n)) for v, n in db.execute(
                "SELECT version, updates FROM history WHERE version > 0 ORDER BY version")]
            row = db.execute("SELECT value FROM meta WHERE key = 'counters'").fetchone()
            counters = json.loads(row[0]) if row else {}
        finally:
            db.close()
        return verdicts, history, counters

    def _agent_ledger(self, device: str) -> list[tuple[str, str, int, str, str | None]]:
        path = self.root / "agents" / device / "agent.db"
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [(str(u), str(r), int(b), str(f), d) for u, r, b, f, d in db.execute(
                "SELECT update_id, run_id, base_version, fate, detail FROM ledger ORDER BY seq")]
        finally:
            db.close()

    def _coordinator_went_back(self) -> int:
        """Versions the coordinator announced lower than one it had announced before."""
        versions: list[int] = []
        for i in range(1, self.coordinator_starts + 1):
            path = self.root / "logs" / f"coordinator-{i}.log"
            if path.exists():
                versions += [int(v) for v in _MODEL_LINE.findall(path.read_text())]
        return sum(1 for a, b in itertools.pairwise(versions) if b < a)


def _short_reason(detail: str) -> str:
    for reason in AGENT_DROP_REASONS:
        if reason in detail:
            return reason
    return detail[:40]
