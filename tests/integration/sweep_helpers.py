"""Helpers for tests that run the demo sweep through the CLI against a simulator they own
(so they can read its counters and inject its faults)."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from dspy_sweeps.data import load_dataset
from dspy_sweeps.spec.schema import load_sweep
from dspy_sweeps_sim import write_answer_key
from dspy_sweeps_sim.launch import SimServer

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / ".venv" / "bin" / "sweep"
BOOTSTRAP_ONLY = "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]"
# For tests whose subject is not tracking: no MLflow store or W&B runs to set up (and no promotion).
UNTRACKED = ("--set", "tracking={wandb: null, mlflow: null}", "--set", "promote=null")


def demo_answer_key(path: Path) -> Path:
    return write_answer_key(load_dataset(load_sweep(REPO / "sweeps/demo.yaml").data), path)


def pointed_at(sim: SimServer, students: tuple[str, ...] = ("student",)) -> list[str]:
    """--set overrides that make the demo's students and teacher "real" endpoints on `sim`."""
    entries = ", ".join(
        f"{{name: {m}, model: openai/{m}, api_base: '{sim.base_url}', timeout_s: 10}}" for m in students
    )
    return [
        "--set",
        f"students=[{entries}]",
        "--set",
        "teachers.0.model=openai/teacher",
        "--set",
        f"teachers.0.api_base={sim.base_url}",
    ]


def sweep_cli(
    *args: str, state: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
    cmd = [str(SWEEP), *args, "--state-dir", str(state)]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def sim_total(sim: SimServer, name: str) -> float:
    text = urllib.request.urlopen(sim.root_url + "/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def rows(state: Path) -> list[dict]:
    """The demo sweep's result records in `state`."""
    # One open file: the sweep replaces this file while the fault threads poll it.
    return pq.read_table(state / "results" / "demo.parquet").to_pylist()


# What the libraries underneath print when nothing stops them (issue 15 saw each in `sweep run`,
# `pull` or `ask`): Ray's token-auth warning, MLflow's and Alembic's start-up lines, MLflow's
# artifact download bars, tqdm bars, Python warnings and Ray's worker-log prefixes.
LIBRARY_NOISE = {
    "Ray's token warning": r"Token authentication is (enabled|disabled)",
    "MLflow's tables": r"Creating initial MLflow database tables|alembic|Context impl SQLiteImpl",
    "MLflow's download bars": r"Downloading artifacts",
    "a tqdm bar": r"\d+%\|.*\||\d+it/s\]|it/s\]",
    "a Python warning": r"\w+Warning: ",
    "a library's log line": r"^(INFO|WARNING|DEBUG)\b|\b(INFO|WARNING) (mlflow|ray|dspy|litellm|alembic)",
    "a Ray worker's log": r"\((raylet|pid=\d+|TrialHost|Gateway\w*)[^)]*\)",
}


def library_noise(*outputs: str) -> list[str]:
    return [
        f"{name}: {line!r}"
        for output in outputs
        for line in output.splitlines()
        for name, pattern in LIBRARY_NOISE.items()
        if re.search(pattern, line)
    ]
