"""``python -m bench [--quick] [--only NAME ...] [--runs N] [--out DIR]``.

Runs the benchmarks (all by default) and writes ``results.json`` and the generated tables of
``BENCHMARKS.md``: by default ``bench/results.json`` and ``BENCHMARKS.md`` at the top of the
repository; with ``--out DIR`` both go to ``DIR`` instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import BENCHMARKS
from bench.harness import REPO, BenchContext, environment

log = logging.getLogger("bench")


# benchmark name -> the bench module whose run(ctx) measures it (imported only when it runs)
_MODULES = {
    "latency": "latency",
    "bytes": "codecs",
    "time_to_accuracy": "tta",
    "footprint": "footprint",
    "decode_worst": "decode_worst",
    "poisoning": "poisoning",
    "privacy": "privacy",
    "flood": "flood",
    "fleet": "fleet",
}


def _runner(name: str):
    if name.startswith("ingest_"):
        from bench import ingest

        return lambda ctx: ingest.run(ctx, name)
    if name == "poisoning_sparse":
        from bench import poisoning

        return poisoning.run_sparse
    if name == "poisoning_adaptive":
        from bench import poisoning

        return poisoning.run_adaptive
    if name not in _MODULES:
        raise ValueError(name)
    return importlib.import_module(f"bench.{_MODULES[name]}").run


# Order: the fleet of agents with equal speeds serves ``bytes`` and then the first profile
# of ``time_to_accuracy`` without being restarted.
ORDER = ("ingest_25k", "ingest_1m", "latency", "footprint", "bytes", "time_to_accuracy",
         "decode_worst", "poisoning", "poisoning_sparse",
         "poisoning_adaptive", "privacy", "flood", "fleet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one run per side: a smoke run, not a measurement")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per side for the timing benchmarks (default: each its own)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write results.json and BENCHMARKS.md here instead of the repo")
    parser.add_argument("--codecs", nargs="+", default=None, metavar="SPEC",
                        help="bytes benchmark: only these codec specs (fp32 is always run)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (logs of every process)")
    return parser.parse_args(argv)


def _load_previous(path: Path, quick: bool) -> dict[str, Any]:
    """Earlier results of the same kind (quick or full) to keep benchmarks not run now."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("quick") != quick or not isinstance(old.get("benchmarks"), dict):
        return {}
    return old["benchmarks"]


def _previous_broker_config(path: Path) -> str:
    """The broker configuration recorded by an earlier run, "" if there is none."""
    try:
        old = json.loads(path.read_text())
        return str(old["environment"]["broker_config"] or "")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("coordinator", "fedbus", "edge_agent"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    out_dir = args.out.resolve() if args.out else REPO / "bench"
    results_path = out_dir / "results.json"
    md_path = (out_dir / "BENCHMARKS.md") if args.out else REPO / "BENCHMARKS.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = [n for n in ORDER if not args.only or n in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="fedbus-bench-"))
    ctx = BenchContext(quick=args.quick, runs=args.runs, workdir=workdir, codecs=args.codecs)
    benchmarks = _load_previous(results_path, args.quick)
    failed: list[str] = []
    started = time.monotonic()
    try:
        for name in selected:
            log.info("=== %s ===", name)
            t0 = time.monotonic()
            try:
                result = _runner(name)(ctx)
            except (Exception, KeyboardInterrupt) as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                log.error("%s failed: %s", name, exc)
                traceback.print_exc()
                failed.append(name)
                result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            result["measured_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            result["seconds"] = round(time.monotonic() - t0, 1)
            result["quick"] = args.quick
            benchmarks[name] = result
            log.info("%s: %.0f s, ratio %s", name, result["seconds"], result.get("ratio"))
    finally:
        ctx.close()
        if args.keep:
            log.info("scratch directory kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    env = environment(ctx.broker_configs)
    if not env.get("broker_config"):  # no broker this time (in-process benchmarks only):
        env["broker_config"] = _previous_broker_config(results_path)  # keep the last one
    results = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "total_seconds": round(time.monotonic() - started, 1),
        "environment": env,
        "benchmarks": {n: benchmarks[n] for n in BENCHMARKS if n in benchmarks},
    }
    tmp = results_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(results_path)
    from bench.report import update_markdown

    update_markdown(md_path, results)
    log.info("wrote %s and %s in %.0f s", results_path, md_path, results["total_seconds"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
