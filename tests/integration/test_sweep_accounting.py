"""Sweep-level accounting through the real CLI against a simulator this test owns: the trials'
token counts equal the endpoint's own, and a spent budget stops the sweep with trials marked cut."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from sweep_helpers import UNTRACKED, demo_answer_key, pointed_at, sim_total, sweep_cli

from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimServer]:
    with SimServer(demo_answer_key(tmp_path / "key.jsonl"), tmp_path / "sim", time_scale=0.02) as server:
        yield server


def sweep_run(sim: SimServer, state: Path, *overrides: str):
    grid = ["--set", "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: [2, 4]}]", *UNTRACKED]
    return sweep_cli("run", "sweeps/demo.yaml", *pointed_at(sim), *grid, *overrides, state=state)


def test_trial_token_counts_equal_the_endpoints_own(sim: SimServer, tmp_path: Path) -> None:
    result = sweep_run(sim, tmp_path / "state")
    assert result.returncode == 0, result.stderr[-3000:]
    sent, prompt, completion = duckdb.sql(
        f"SELECT sum(lm_calls), sum(prompt_tokens), sum(completion_tokens) FROM '{tmp_path}/state/results/demo.parquet'"
    ).fetchone()
    assert sent == sim_total(sim, "vllm:request_success_total") > 0
    assert prompt == sim_total(sim, "vllm:prompt_tokens_total")
    assert completion == sim_total(sim, "vllm:generation_tokens_total")


def test_a_spent_budget_stops_the_sweep_and_marks_cut_trials(sim: SimServer, tmp_path: Path) -> None:
    # $3.6M an hour is $1,000 a second: a few milliseconds of endpoint time spend $1.
    result = sweep_run(
        sim,
        tmp_path / "state",
        "--set",
        "students.0.cost_per_hour=3600000",
        "--set",
        "budget={max_usd: 1.0}",
        "--set",
        "parallelism=1",
    )
    assert result.returncode == 1, "no trial finished, so the sweep fails"
    rows = duckdb.sql(f"SELECT status, error FROM '{tmp_path}/state/results/demo.parquet'").fetchall()
    assert len(rows) == 3 and {status for status, _ in rows} == {"cut"}
    assert sum("not started" in error for _, error in rows) == 2
    assert sim_total(sim, "vllm:request_success_total") < 150, "the first trial must be stopped early"
