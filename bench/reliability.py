"""`make reliability`: run the fault, bad-input and security tests several times and write
RELIABILITY.md from the figures each case records (see the `reliability` fixture in tests/conftest.py).

Run: `make reliability` (or `.venv/bin/python bench/reliability.py --repeat 3`); `--tests PATH --out FILE`
runs only the reliability tests under PATH and writes their table to FILE.
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
# Counts each case records per run (summed over runs), then what was measured in the faults.
FIGURES = (
    "runs",
    "faults_injected",
    "faults_survived",
    "trials_lost",
    "records_lost",
    "failed_calls_scored",
    "duplicate_versions",
    "secrets_found",
    "payloads_executed",
    "sandbox_escapes",
    "calls_retried",
    "calls_fell_back",
    "trials_retried",
    "metric_calls_spent_again",
    "promotions",
    "versions_created",
)
MEASURED = (
    "records_lost",
    "calls_retried",
    "calls_fell_back",
    "trials_retried",
    "metric_calls_spent_again",
    "promotions",
    "versions_created",
)
SLOWEST = ("recovery_s",)  # seconds from a fault to recovery: the slowest run is reported
GOALS = {
    "trials_lost": 0,
    "records_lost": 0,
    "failed_calls_scored": 0,
    "duplicate_versions": 0,
    "secrets_found": 0,
    "payloads_executed": 0,
    "sandbox_escapes": 0,
}
# The table's columns: a figure, or a measure worked out from them; a measure a case did not take is "-".
COLUMNS = (
    *(f for f in FIGURES if f not in ("promotions", "versions_created")),
    "recovery_s",
    "versions_per_promotion",
)
HEADINGS = {
    "recovery_s": "seconds from fault to recovery (slowest)",
    "versions_per_promotion": "versions per promotion",
}


def run_tests(repeat: int, log: Path, tests: str | None = None) -> list[int]:
    env = {**os.environ, "DSPY_SWEEPS_RELIABILITY_LOG": str(log), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    codes = []
    for i in range(repeat):
        print(f"reliability run {i + 1}/{repeat}", flush=True)
        command = [sys.executable, "-m", "pytest", "-q", "-m", "reliability"]
        command += [tests] if tests else ["-n", "2", "--dist", "loadfile"]
        codes.append(subprocess.run(command, cwd=REPO, env=env).returncode)
    return codes


def aggregate(log: Path) -> tuple[dict[str, dict[str, float]], dict[str, set[str]]]:
    """Figures per case (counts summed, the slowest recovery kept), and the tests (without
    parameters) that recorded each case."""
    always = [f for f in FIGURES if f not in MEASURED]
    cases: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(always, 0))
    tests: dict[str, set[str]] = defaultdict(set)
    for line in log.read_text().splitlines():
        record = json.loads(line)
        figures = cases[record["case"]]
        for figure in FIGURES:
            if figure in record or figure in always:
                figures[figure] = figures.get(figure, 0) + int(record.get(figure, 0))
        for measure in SLOWEST:
            if measure in record:
                figures[measure] = max(figures.get(measure, 0.0), float(record[measure]))
        tests[record["case"]].add(record["test"].split("[")[0])
    return dict(sorted(cases.items())), tests


def render(cases: dict[str, dict[str, float]], tests: dict[str, set[str]], repeat: int, codes: list[int]) -> str:
    header = "| case | " + " | ".join(HEADINGS.get(c, c.replace("_", " ")) for c in COLUMNS) + " | reproduce |"
    rows = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
    for case, figures in cases.items():
        cells = [_cell(column, figures) for column in COLUMNS]
        command = "<br>".join(f"`.venv/bin/python -m pytest {t}`" for t in sorted(tests[case]))
        rows.append(f"| {case} | " + " | ".join(cells) + f" | {command} |")
    passed = sum(code == 0 for code in codes)
    return (
        "# Reliability\n\n"
        f"Produced by `make reliability` ({repeat} runs of `pytest -m reliability`, {time.strftime('%Y-%m-%d')}); "
        f"{passed} of {len(codes)} runs passed every test.\n"
        "Goals: trials lost, records lost, failed calls scored, duplicate versions, secrets found, payloads "
        "executed and sandbox escapes are 0, and a promotion creates at most one version. A figure that misses "
        "its goal is marked **bold**.\n"
        "Measured in the faults: calls retried (resends by the LM gateway), calls that fell back to another "
        "model, trials retried (a trial run again after its worker died), metric calls spent again (GEPA's "
        "metric calls made after its last checkpoint in storage, made again on resume), the seconds from a fault to recovery "
        "(the slowest run), and versions created per promotion; '-' where a case does not measure it.\n\n"
        + "\n".join(rows)
        + "\n"
    )


def _cell(column: str, figures: dict[str, float]) -> str:
    if column == "versions_per_promotion":
        if not figures.get("promotions"):
            return "-"
        ratio = figures["versions_created"] / figures["promotions"]
        return f"**{ratio:.2f}**" if ratio > 1 else f"{ratio:.2f}"
    if column not in figures:
        return "-"
    if column in SLOWEST:
        return f"{figures[column]:.1f}"
    value = int(figures[column])
    return f"**{value}**" if column in GOALS and value != GOALS[column] else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tests", help="only the reliability tests under this path (serially)")
    parser.add_argument("--out", type=Path, default=REPO / "RELIABILITY.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "reliability.jsonl"
        log.touch()
        codes = run_tests(args.repeat, log, args.tests)
        report = render(*aggregate(log), args.repeat, codes)
    args.out.write_text(report)
    print(report)
    sys.exit(0 if all(code == 0 for code in codes) else 1)


if __name__ == "__main__":
    main()
