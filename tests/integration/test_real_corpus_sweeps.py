"""The shipped GSM8K and Banking77 sweeps run end to end through the real `sweep run` CLI.

Run: ``python -m pytest tests/integration/test_real_corpus_sweeps.py -q`` (about a minute
per sweep, mostly Ray start-up). The sweep files are meant for a vLLM student and a cloud
teacher; `--set` overrides swap both for the SIMULATED endpoint (a test double whose
answer key is the sweep's own data), shrink the split and grid, and leave no key or
api_base in play, so the test needs neither a GPU, the internet nor OPENAI_API_KEY.
"""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
MIRROR = REPO.parent / "shared" / "datasets"
SWEEP_BIN = Path(sys.executable).with_name("sweep")

OFFLINE = [
    "students.0.model=sim/student",
    "students.0.api_base=null",  # the simulator's URL is filled in by the CLI, not the file's localhost:8000
    "teachers.0.model=sim/teacher",
    "teachers.0.api_key_env=null",  # the simulated teacher needs no key
    "data.split={train: 20, val: 20, test: 20, seed: 0}",
    "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]",
    "seeds=[0]",  # one bootstrap trial beside the baseline
    "tracking={wandb: null, mlflow: null}",  # the subject is the corpus, not tracking
    "promote=null",
]


def build_corpus(name: str) -> None:
    """`python datasets/build.py NAME` from the local mirror; a completed build is skipped."""
    if not MIRROR.is_dir():
        pytest.fail(f"shared dataset mirror not found at {MIRROR}; these tests need the local copy of {name}")
    env = {**os.environ, "DSPY_SWEEPS_DATA_MIRROR": str(MIRROR)}
    cmd = [sys.executable, "datasets/build.py", name]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")


def run_sweep(name: str, state_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network fetch of LiteLLM's price list
    overrides = [arg for item in OFFLINE for arg in ("--set", item)]
    cmd = [str(SWEEP_BIN), "run", f"sweeps/{name}.yaml", "--state-dir", str(state_dir), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gsm8k", "banking77"])
def test_real_corpus_sweep_runs_offline(name: str, tmp_path: Path) -> None:
    assert SWEEP_BIN.is_file(), f"{SWEEP_BIN} not found; install the project into this venv (pip install -e .)"
    build_corpus(name)

    result = run_sweep(name, tmp_path)

    output = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, output
    assert "SIMULATED" in result.stdout, output
    assert "leaderboard" in result.stdout, output
    records = pq.read_table(tmp_path / "results" / f"{name}.parquet").to_pylist()
    rows = {row["kind"]: row for row in records}
    assert len(records) == 2 and set(rows) == {"none", "bootstrap_fewshot"}, records
    baseline, bootstrap = rows["none"], rows["bootstrap_fewshot"]
    assert [baseline["status"], bootstrap["status"]] == ["ok", "ok"], rows
    assert (baseline["student_model"], bootstrap["teacher_model"]) == ("sim/student", "sim/teacher")
    assert bootstrap["val_score"] > baseline["val_score"], rows
