"""`make reliability`: run the fault, bad-input and security tests several times and write
RELIABILITY.md from the figures each case records (see the `reliability` fixture in tests/conftest.py).

Run: `make reliability` (or `.venv/bin/python bench/reliability.py --repeat 3`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = (
    "runs",
    "faults_injected",
    "faults_survived",
    "trials_lost",
    "failed_calls_scored",
    "duplicate_versions",
    "secrets_found",
    "payloads_executed",
    "sandbox_escapes",
)
GOALS = {
    "trials_lost": 0,
    "failed_calls_scored": 0,
    "duplicate_versions": 0,
    "secrets_found": 0,
    "payloads_executed": 0,
    "sandbox_escapes": 0,
}


def run_tests(repeat: int, log: Path) -> list[int]:
    env = {**os.environ, "DSPY_SWEEPS_RELIABILITY_LOG": str(log), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    codes = []
    for i in range(repeat):
        print(f"reliability run {i + 1}/{repeat}", flush=True)
        command = [sys.executable, "-m", "pytest", "-q", "-m", "reliability", "-n", "2", "--dist", "loadfile"]
        codes.append(subprocess.run(command, cwd=REPO, env=env).returncode)
    return codes


def aggregate(log: Path) -> tuple[dict[str, dict[str, int]], dict[str, set[str]]]:
    """Figures summed per case, and the tests (without parameters) that recorded each case."""
    cases: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIGURES, 0))
    tests: dict[str, set[str]] = defaultdict(set)
    for line in log.read_text().splitlines():
        record = json.loads(line)
        for figure in FIGURES:
            cases[record["case"]][figure] += int(record.get(figure, 0))
        tests[record["case"]].add(record["test"].split("[")[0])
    return dict(sorted(cases.items())), tests


def render(cases: dict[str, dict[str, int]], tests: dict[str, set[str]], repeat: int, codes: list[int]) -> str:
    header = "| case | " + " | ".join(f.replace("_", " ") for f in FIGURES) + " | reproduce |"
    rows = [header, "|" + " --- |" * (len(FIGURES) + 2)]
    for case, figures in cases.items():
        cells = [_cell(f, figures[f]) for f in FIGURES]
        command = "<br>".join(f"`.venv/bin/python -m pytest {t}`" for t in sorted(tests[case]))
        rows.append(f"| {case} | " + " | ".join(cells) + f" | {command} |")
    passed = sum(code == 0 for code in codes)
    return (
        "# Reliability\n\n"
        f"Produced by `make reliability` ({repeat} runs of `pytest -m reliability`, {time.strftime('%Y-%m-%d')}); "
        f"{passed} of {len(codes)} runs passed every test.\n"
        "Goals: every figure from 'trials lost' on is 0. A figure that misses its goal is marked **bold**.\n\n"
        + "\n".join(rows)
        + "\n"
    )


def _cell(figure: str, value: int) -> str:
    return f"**{value}**" if figure in GOALS and value != GOALS[figure] else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "reliability.jsonl"
        log.touch()
        codes = run_tests(args.repeat, log)
        report = render(*aggregate(log), args.repeat, codes)
    (REPO / "RELIABILITY.md").write_text(report)
    print(report)
    sys.exit(0 if all(code == 0 for code in codes) else 1)


if __name__ == "__main__":
    main()
