"""`make bench`: measure what users wait for, side by side in one run, into BENCHMARKS.md.

- CLI start-up: `sweep --help` against a bare `python -c pass` (median of 15 runs each).
- The demo sweep cold (empty state dir) against warm (the same sweep again: LM cache hits).

Run: `make bench` (or `.venv/bin/python bench/run.py`).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
COMMAND = "make bench"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def median_time(cmd: list[str], runs: int = 15) -> float:
    timed(cmd)  # warm the file-system cache
    return statistics.median(timed(cmd) for _ in range(runs))


def main() -> None:
    help_s = median_time([str(BIN / "sweep"), "--help"])
    python_s = median_time([sys.executable, "-c", "pass"])
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "DSPY_SWEEPS_STATE": state, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        cold = timed([str(BIN / "sweep"), "run", "sweeps/demo.yaml"], env)
        warm = timed([str(BIN / "sweep"), "run", "sweeps/demo.yaml"], env)
    rows = [
        ("`sweep --help` (median of 15)", f"{help_s:.3f} s", f"{help_s / python_s:.1f}× bare `python -c pass` ({python_s:.3f} s)"),
        ("demo sweep, cold (5 trials, empty state dir)", f"{cold:.1f} s", "goal: ≤ 300 s on 2 cores"),
        ("demo sweep, warm (same sweep again)", f"{warm:.1f} s", f"{warm / cold:.2f}× cold: every LM call from the cache"),
    ]
    table = "\n".join(["| measure | value | compared with |", "| --- | --- | --- |", *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
    print(table)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    (REPO / "BENCHMARKS.md").write_text(
        f"# Benchmarks\n\nProduced by `{COMMAND}` on {machine}, {time.strftime('%Y-%m-%d')}.\n"
        "The demo runs against the simulated endpoint (time-scaled), so its wall time measures the\n"
        "platform (Ray start-up, trial actors, DSPy, tracking, promotion), not any real model.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
