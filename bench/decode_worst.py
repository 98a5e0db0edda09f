"""What the worst update payloads (``bench.hostile``) cost the coordinator to judge.

``python -m bench.decode_worst [--code DIR] [--json]``: for each shape, in a fresh child
process, ``validate_update`` on the payload: the reason, the time (best of 3, without
tracemalloc), the tracemalloc peak and the growth of the process's peak RSS (VmHWM) while
judging it. ``--code DIR`` imports ``coordinator``/``fedbus`` from another checkout (for
example ``git archive main`` unpacked in /tmp) to measure old and new code side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.hostile import DEVICE, MAX_UPDATE_BYTES, RUN, SHAPES, TASK, VERSION

__all__ = ["measure", "measure_in_child"]

REPO = Path(__file__).resolve().parent.parent


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(shape: str) -> dict[str, Any]:
    """Judge one hostile payload in this process and report what it cost."""
    import time
    import tracemalloc

    from coordinator.validation import ValidationLimits, validate_update

    payload, model = SHAPES[shape]()
    limits = ValidationLimits(max_update_bytes=MAX_UPDATE_BYTES, max_norm=100.0,
                              max_staleness=10)

    class Ledger:
        def verdict(self, _update_id: str) -> None:
            return None

        def work(self, _device: str, _base: int) -> None:
            return None

    def judge() -> Any:
        return validate_update(payload, topic_device=DEVICE, run_id=RUN,
                               task_id=TASK, expected_shapes=model,
                               current_version=VERSION, limits=limits,
                               ledger=Ledger())

    hwm0 = _hwm_bytes()
    result = judge()
    hwm = _hwm_bytes() - hwm0
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        judge()
        seconds.append(time.perf_counter() - t0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    judge()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"shape": shape, "payload_bytes": len(payload),
            "reason": getattr(result, "reason", "accepted"),
            "detail": getattr(result, "detail", "")[:120],
            "seconds": round(min(seconds), 4), "tracemalloc_peak_bytes": peak,
            "peak_over_payload": round(peak / len(payload), 2), "rss_growth_bytes": hwm}


def measure_in_child(shape: str, code: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    paths = [str(REPO)] if code is None else [str(code), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    script = ("import json, sys; from bench.decode_worst import measure; "
              f"print(json.dumps(measure({shape!r})))")
    if code is not None:  # the old code first on the path, bench from here
        script = (f"import sys; sys.path.insert(0, {str(code)!r}); import coordinator, fedbus; "
                  f"sys.path.insert(1, {str(REPO)!r}); " + script)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_worst", description=__doc__)
    parser.add_argument("--code", type=Path, default=None,
                        help="import coordinator and fedbus from this checkout instead")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--only", nargs="+", choices=sorted(SHAPES), metavar="SHAPE")
    args = parser.parse_args(argv)
    for shape in args.only or SHAPES:
        row = measure_in_child(shape, args.code)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            mib = 1 << 20
            print(f"{shape:24} {row['payload_bytes']:>9,} B  {row['reason']:>10}  "
                  f"{row['seconds'] * 1000:8.1f} ms  "
                  f"peak {row['tracemalloc_peak_bytes'] / mib:7.1f} MiB "
                  f"({row['peak_over_payload']:6.2f}x)  "
                  f"RSS +{row['rss_growth_bytes'] / mib:6.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
