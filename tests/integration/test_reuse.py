"""A fresh `sweep run` keeps the trials an earlier run finished unchanged, and runs only the rest;
`--rerun` runs them all again, on cached answers. Through the real CLI against a simulator this
test owns; the unchanged demo's run that reuses everything is in `test_demo_sweep.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sweep_helpers import UNTRACKED, pointed_at, rows, sweep_cli

from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


def ended(out: str) -> set[str]:
    """The trials whose end the run reported (`  TRIAL  val …`)."""
    return set(re.findall(r"^  (\S+)  val ", out, re.MULTILINE))


def test_a_changed_grid_runs_only_its_new_trials_and_rerun_runs_every_one(sim: SimServer, tmp_path: Path) -> None:
    def run(demos: str, *more: str):
        grid = f"optimizers=[{{kind: bootstrap_fewshot, max_bootstrapped_demos: {demos}}}]"
        result = sweep_cli(
            "run", "sweeps/demo.yaml", *pointed_at(sim), "--set", grid, *UNTRACKED, *more, state=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result, {r["trial_id"]: r for r in rows(tmp_path)}

    first, before = run("[1, 2]")
    assert len(ended(first.stdout)) == 3 and set(before) == ended(first.stdout)
    one, two = (next(t for t, r in before.items() if f'"max_bootstrapped_demos": {k}' in r["settings"]) for k in (1, 2))
    baseline = next(t for t, r in before.items() if r["kind"] == "none")

    second, after = run("[2, 3]")
    assert "reused: 2 finished trials of an earlier run" in second.stdout and "1 to run" in second.stdout
    (new,) = ended(second.stdout)
    assert set(after) == {baseline, two, new}, "the file holds this run's trials: the dropped setting's is gone"
    assert after[two] == before[two] and after[baseline] == before[baseline], "reused rows are the rows they were"
    trials = tmp_path / "trials" / "demo"
    assert (trials / two).is_dir() and not (trials / one).exists(), "a reused trial keeps its folder, a dropped one not"

    third, again = run("[2, 3]", "--rerun")
    assert "reused" not in third.stdout and ended(third.stdout) == set(again) == {baseline, two, new}
    assert all(again[t]["duration_s"] != after[t]["duration_s"] for t in again), "every trial ran again"
    assert sum(r["lm_calls"] for r in again.values()) == 0, "... on the answers the LM cache kept"


def test_resume_and_rerun_together_are_refused_in_one_line(tmp_path: Path) -> None:
    result = sweep_cli("run", "sweeps/demo.yaml", "--resume", "--rerun", state=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --resume keeps the trials that finished and --rerun runs them again: give one of them"
    ]
    assert not (tmp_path / "results").exists()
