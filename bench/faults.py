"""The fault benchmark: ``python -m bench.faults`` (``make faults``), outside CI's budget.

Real processes and real faults (bench/trial.py), each scenario run to the end of its run
and audited from the coordinator's and the agents' state directories:

- ``coordinator_kills``: the coordinator killed with SIGKILL at 50 random moments of one
  run and restarted each time on its state directory, 8 agents;
- ``broker_restarts``: the broker killed with SIGKILL and restarted 5 times under 50 agents
  (5 processes of 10 real agents each);
- ``partition``: one agent's link blackholed for 120 s, 8 agents;
- ``flapping``: two agents' links cut every 1-4 s for 2 minutes, 8 agents;
- ``soak``: 8 agents for an hour (``--soak-minutes``), the resident memory of the
  coordinator, the broker and the agent hosts sampled every 30 s.

Per scenario, ``bench/faults.json`` holds the updates produced, applied, applied twice,
lost, rejected by reason, dropped by the agents by reason, the recovery seconds, and the
RSS slopes in MiB/h; BENCHMARKS.md gets a table. Targets: 0 lost, 0 applied twice, the
version never backwards, RSS slope near 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import REPO
from bench.proc_stat import rss_mib
from bench.trial import Trial

log = logging.getLogger("bench.faults")

SCENARIOS = ("coordinator_kills", "broker_restarts", "partition", "flapping", "soak")
COORDINATOR = ("--mode", "fedbuff", "--buffer-size", "4", "--buffer-timeout", "20")
HOSTED = ("on_run_end=exit",)


def _timestamp(line: str) -> float:
    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def _first_line_after(path: Path, pattern: str, after: float) -> float | None:
    """Wall time of the first log line matching ``pattern`` at or after ``after``."""
    regex = re.compile(pattern)
    for line in path.read_text(errors="replace").splitlines():
        if len(line) > 23 and regex.search(line):
            try:
                at = _timestamp(line)
            except ValueError:
                continue
            if at >= after:
                return at
    return None


def _slope_mib_per_hour(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per hour."""
    if len(samples) < 3:
        return None
    xs = [t for t, _ in samples]
    ys = [m for _, m in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 3600, 3)


def _finish(trial: Trial, result: dict[str, Any], timeout: float) -> dict[str, Any]:
    trial.wait_finished(timeout)
    audit = trial.audit()
    result.update(audit.as_dict())
    result.pop("lost_ids")
    if audit.lost_ids:
        result["lost_examples"] = audit.lost_ids[:5]
    return result


def _end_run_after(trial: Trial, more: int) -> None:
    """End the run ``more`` versions from now: the coordinator restarted with
    ``--max-versions`` (a resume) ends it there, applies what waits and tells the agents."""
    last = trial.version()
    trial.kill_coordinator()
    trial.start_coordinator("--max-versions", str(last + more))


def coordinator_kills(root: Path, quick: bool) -> dict[str, Any]:
    kills = 5 if quick else 50
    rng = random.Random(7)
    trial = Trial(root, devices=8, coordinator_args=(*COORDINATOR, "--min-devices", "8"),
                  compute_seconds=0.5)
    trial.host_settings = list(HOSTED)
    recovery: list[float] = []
    with trial:
        trial.start_coordinator()
        trial.start_hosts(2)
        trial.wait_version(2, 120)
        for k in range(kills):
            time.sleep(rng.uniform(0.5, 6.0))
            trial.kill_coordinator()
            stored = trial.version()
            time.sleep(rng.uniform(0.0, 2.0))
            restarted = time.monotonic()
            trial.start_coordinator()
            trial.wait_version(stored + 1, 120)
            recovery.append(time.monotonic() - restarted)
            log.info("kill %d/%d at version %d: a new version %.1f s after the restart",
                     k + 1, kills, stored, recovery[-1])
        _end_run_after(trial, 5)
        result = {"kills": kills, "devices": 8,
                  "recovery_seconds_median": round(statistics.median(recovery), 2),
                  "recovery_seconds_max": round(max(recovery), 2)}
        return _finish(trial, result, 300)


def broker_restarts(root: Path, quick: bool) -> dict[str, Any]:
    devices, restarts = (10, 2) if quick else (50, 5)
    trial = Trial(root, devices=devices,
                  coordinator_args=(*COORDINATOR, "--min-devices", str(devices),
                                    "--buffer-size", "10"),
                  compute_seconds=1.0)
    trial.host_settings = list(HOSTED)
    recovery: list[float] = []
    with trial:
        trial.start_coordinator()
        trial.start_hosts(max(1, devices // 10))
        trial.wait_version(3, 300)
        for r in range(restarts):
            time.sleep(10)
            trial.broker.kill()
            at = trial.version()
            time.sleep(3)
            started = time.monotonic()
            trial.broker.start()
            trial.wait_version(at + 1, 180)
            recovery.append(time.monotonic() - started)
            log.info("broker restart %d/%d: a new version %.1f s after it was back", r + 1,
                     restarts, recovery[-1])
        _end_run_after(trial, 3)
        result = {"restarts": restarts, "devices": devices,
                  "recovery_seconds_median": round(statistics.median(recovery), 2),
                  "recovery_seconds_max": round(max(recovery), 2)}
        return _finish(trial, result, 400)


def _started_with_proxies(trial: Trial, proxied: tuple[str, ...]) -> None:
    """The coordinator, the unproxied agents in one host process, each proxied agent as a
    ``fedbus agent`` process of its own (its link is the proxy's), a few versions made."""
    trial.host_settings = list(HOSTED)
    trial.start_coordinator()
    trial.start_hosts(1)
    for device in proxied:
        trial.start_agent(device)
    trial.wait_version(3, 120)


def _eight_devices(root: Path, proxied: tuple[str, ...]) -> Trial:
    return Trial(root, devices=8, proxied=proxied,
                 coordinator_args=(*COORDINATOR, "--min-devices", "8"),
                 agent_args=("--on-run-end", "exit"), compute_seconds=0.5)


def partition(root: Path, quick: bool) -> dict[str, Any]:
    seconds = 30.0 if quick else 120.0
    victim = "device-08"
    with _eight_devices(root, (victim,)) as trial:
        _started_with_proxies(trial, (victim,))
        before = trial.version()
        trial.proxies[victim].blackhole()
        time.sleep(seconds)
        during = trial.version() - before
        healed = time.time()
        trial.proxies[victim].heal()
        log_path = trial.root / "logs" / f"{victim}.log"
        trial.wait(lambda: _first_line_after(log_path, r"update \S+ accepted", healed)
                   is not None, 120, "the partitioned device's next accepted update")
        back = _first_line_after(log_path, r"update \S+ accepted", healed)
        _end_run_after(trial, 5)
        log_text = log_path.read_text(errors="replace")
        result = {"partition_seconds": seconds, "devices": 8,
                  "versions_during_partition": during,
                  "recovery_seconds": round((back or healed) - healed, 2),
                  "stale_rejects_of_the_partitioned_device": log_text.count("rejected: stale")}
        return _finish(trial, result, 300)


def flapping(root: Path, quick: bool) -> dict[str, Any]:
    seconds = 30.0 if quick else 120.0
    flappers = ("device-07", "device-08")
    with _eight_devices(root, flappers) as trial:
        _started_with_proxies(trial, flappers)
        flaps = [trial.proxies[d].start_flapping(down=(1.0, 4.0), up=(1.0, 4.0),
                                                 rng=random.Random(i))
                 for i, d in enumerate(flappers)]
        time.sleep(seconds)
        downs = [f.stop() for f in flaps]
        _end_run_after(trial, 5)
        result = {"flapping_seconds": seconds, "devices": 8, "link_cuts": sum(downs)}
        return _finish(trial, result, 300)


def soak(root: Path, quick: bool, minutes: float) -> dict[str, Any]:
    seconds = 120.0 if quick else minutes * 60
    trial = Trial(root, devices=8, coordinator_args=(*COORDINATOR, "--min-devices", "8"),
                  compute_seconds=1.0)
    trial.host_settings = list(HOSTED)
    samples: dict[str, list[tuple[float, float]]] = {"coordinator": [], "broker": [],
                                                     "agents_host": []}
    with trial:
        coordinator = trial.start_coordinator()
        hosts = trial.start_hosts(1)
        trial.wait_version(2, 120)
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            now = time.monotonic() - start
            for name, pid_rss in (("coordinator", _rss(coordinator)),
                                  ("agents_host", _rss(hosts[0])),
                                  ("broker", rss_mib(trial.broker.pid))):
                if pid_rss is not None:
                    samples[name].append((now, pid_rss))
            time.sleep(30.0 if not quick else 5.0)
        versions = trial.version()
        _end_run_after(trial, 3)
        # the first tenth is warm-up (imports, first versions, page cache of SQLite)
        result: dict[str, Any] = {"soak_seconds": seconds, "devices": 8, "versions": versions}
        for name, points in samples.items():
            steady = [p for p in points if p[0] >= seconds / 10]
            result[f"rss_mib_{name}_start"] = round(points[0][1], 1) if points else None
            result[f"rss_mib_{name}_end"] = round(points[-1][1], 1) if points else None
            result[f"rss_slope_mib_per_h_{name}"] = _slope_mib_per_hour(steady)
        return _finish(trial, result, 300)


def _rss(child: Any) -> float | None:
    memory = child.rss()
    return None if memory is None else memory.rss_mib


def _table(results: dict[str, Any]) -> str:
    rows = ["| scenario | produced | applied | applied twice | lost | version backwards | "
            "rejected (reason: n) | dropped by agents | recovery s (median / max) | "
            "RSS slope MiB/h |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in SCENARIOS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {name} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "0"
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(r["dropped"].items())) or "0"
        if "recovery_seconds_median" in r:
            recovery = f"{r['recovery_seconds_median']} / {r['recovery_seconds_max']}"
        else:
            recovery = str(r.get("recovery_seconds", "–"))
        slope = r.get("rss_slope_mib_per_h_coordinator")
        slope_text = "–" if slope is None else (
            f"coordinator {slope}, broker {r.get('rss_slope_mib_per_h_broker')}, "
            f"agents {r.get('rss_slope_mib_per_h_agents_host')}")
        rows.append(
            f"| {name} | {r['produced']} | {r['applied']} | {r['applied_twice']} | {r['lost']} "
            f"| {r['versions_backwards']} | {rejected} | {dropped} | {recovery} | {slope_text} |"
        )
    return "\n".join(rows)


def update_markdown(path: Path, results: dict[str, Any], header: str) -> None:
    begin, end = "<!-- faults:begin -->", "<!-- faults:end -->"
    block = f"{begin}\n{header}\n\n{_table(results)}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## Faults\n\n{block}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short versions (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="NAME")
    parser.add_argument("--soak-minutes", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None,
                        help="write faults.json and BENCHMARKS.md here instead of the repo")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    out = args.out.resolve() if args.out else REPO / "bench"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "faults.json"
    md_path = (out / "BENCHMARKS.md") if args.out else REPO / "BENCHMARKS.md"
    try:
        previous = json.loads(json_path.read_text())["scenarios"]
    except (OSError, ValueError, KeyError):
        previous = {}
    results = {} if args.quick else dict(previous)
    scratch = Path(tempfile.mkdtemp(prefix="fedbus-faults-"))
    runners: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
        "coordinator_kills": coordinator_kills,
        "broker_restarts": broker_restarts,
        "partition": partition,
        "flapping": flapping,
        "soak": lambda root, quick: soak(root, quick, args.soak_minutes),
    }
    failed = []
    started = time.monotonic()
    try:
        for name in args.only or SCENARIOS:
            log.info("=== %s ===", name)
            t0 = time.monotonic()
            try:
                result = runners[name](scratch / name, args.quick)
            except Exception as exc:
                log.exception("%s failed", name)
                failed.append(name)
                result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            result["seconds"] = round(time.monotonic() - t0, 1)
            result["measured_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            results[name] = result
            log.info("%s: %s", name, json.dumps(result)[:400])
            json_path.write_text(json.dumps({
                "quick": args.quick, "scenarios": results,
                "total_seconds": round(time.monotonic() - started, 1),
            }, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            log.info("scratch kept in %s", scratch)
    header = (f"`python -m bench.faults{' --quick' if args.quick else ''}` "
              f"({dt.date.today().isoformat()}; see bench/faults.py for the scenarios; "
              "numbers from bench/faults.json).")
    update_markdown(md_path, results, header)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
