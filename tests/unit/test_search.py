"""Search spaces and pruners in the sweep file: bad input through the CLI, plans, and a resumed study.

Run: ``.venv/bin/python -m pytest -q -n 0 tests/unit/test_search.py``. No LM is called: a resumed
search is driven through `SweepStudy` with the outcomes a driver would tell it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dspy_sweeps.run.trial import TrialResult

BOOTSTRAP = {"kind": "bootstrap_fewshot", "max_bootstrapped_demos": {"int": [1, 4]}}

BAD = {
    "float range over an int setting": (
        {
            "search": {"kind": "random", "trials": 4},
            "optimizers": [{**BOOTSTRAP, "max_bootstrapped_demos": {"float": [0.5, 3.0]}}],
        },
        "optimizers.0.max_bootstrapped_demos: a float distribution does not fit this int setting",
    ),
    "empty choice": (
        {
            "search": {"kind": "tpe", "trials": 4},
            "optimizers": [{**BOOTSTRAP, "max_bootstrapped_demos": {"choice": []}}],
        },
        "optimizers.0.max_bootstrapped_demos: a choice needs at least one value",
    ),
    "pruner setting Optuna does not take": (
        {"prune": {"kind": "successive_halving", "min_resources": 4}},
        "prune.min_resources: SuccessiveHalvingPruner takes no setting 'min_resources'",
    ),
    "pruner value Optuna refuses": (
        {"prune": {"kind": "successive_halving", "reduction_factor": 1}},
        "prune.reduction_factor: The value of `reduction_factor` is 1",
    ),
    "distribution without a search": (
        {"optimizers": [BOOTSTRAP]},
        "optimizers.0.max_bootstrapped_demos: a distribution needs a search section",
    ),
    "random search without a trial count": (
        {"search": {"kind": "random"}, "optimizers": [BOOTSTRAP]},
        "search.trials: a random search needs a number of trials",
    ),
    "unknown search kind": (
        {"search": {"kind": "bayes", "trials": 3}, "optimizers": [BOOTSTRAP]},
        "search.kind: Input should be 'grid', 'random' or 'tpe'",
    ),
    "grid over a float range without a step": (
        {"search": {"kind": "grid"}, "optimizers": [{"kind": "mipro_v2", "init_temperature": {"float": [0.1, 1.0]}}]},
        "optimizers.0.init_temperature: a grid search needs a step for a float range",
    ),
}


def sweep_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dspy_sweeps.cli.main", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_search_or_prune_exits_2_with_one_line_naming_the_field(case: str, sweep_file, repo: Path) -> None:
    changes, message = BAD[case]
    run = sweep_cli("validate", str(sweep_file(changes)), cwd=repo)
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_plan_prints_the_space_and_the_trial_count(sweep_file, repo: Path) -> None:
    path = sweep_file(
        {
            "search": {"kind": "tpe", "trials": 5, "seed": 3},
            "prune": {"kind": "median", "n_startup_trials": 2},
            "optimizers": [BOOTSTRAP, {"kind": "mipro_v2", "init_temperature": {"float": [0.1, 1.5], "log": True}}],
        }
    )
    run = sweep_cli("plan", str(path), cwd=repo)
    assert run.returncode == 0, run.stderr
    assert "search: tpe, 5 trials, seed 3" in run.stdout
    assert "max_bootstrapped_demos: int in [1, 4]" in run.stdout
    assert "init_temperature: float in [0.1, 1.5] log" in run.stdout
    assert "prune: median" in run.stdout
    assert "6 trials" in run.stdout  # the five sampled, and the baseline


def test_grid_search_visits_every_point_once(sweep_file) -> None:
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps.spec.search import grid_points, preview, trial_count

    sweep = load_sweep(sweep_file({"search": {"kind": "grid"}, "seeds": [0, 1], "optimizers": [BOOTSTRAP]}))
    assert len(grid_points(sweep)) == trial_count(sweep) == 8  # demos 1..4 × seeds 0, 1
    assert len({t.id for t in preview(sweep, "")}) == 8


def finish(study, trial, status: str = "ok", score: float = 0.5) -> None:
    study.trial_finished(trial.id, TrialResult(trial.id, status, val_score=score if status == "ok" else None))


@pytest.mark.parametrize("kind", ["grid", "random", "tpe"])
def test_resumed_search_continues_its_study_without_repeating_finished_trials(
    kind: str, sweep_file, tmp_path: Path
) -> None:
    import optuna

    from dspy_sweeps.run.pruning import SweepStudy, study_storage
    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps.state import State

    changes = {"search": {"kind": kind, "trials": 3, "seed": 0}, "optimizers": [BOOTSTRAP], "seeds": [0, 1]}
    prepared = prepare(load_sweep(sweep_file(changes)))
    state = State(tmp_path / "state")

    first = SweepStudy.open(prepared, state, resume=False)
    baseline = first.next_trial()
    assert baseline.kind == "none"
    finish(first, baseline)
    started = [first.next_trial() for _ in range(3)]
    assert first.next_trial() is None  # three trials in all
    finish(first, started[0], score=0.4)
    finish(first, started[1], status="pruned")
    # the driver is killed here: started[2] is left running in the study

    kept = {baseline.id: ("ok", 0.2), started[0].id: ("ok", 0.4), started[1].id: ("pruned", None)}
    second = SweepStudy.open(prepared, state, resume=True, finished=kept)
    again = second.next_trial()
    assert again is not None and again.id == started[2].id  # the interrupted point first, same trial
    assert second.next_trial() is None  # nothing finished is asked again
    finish(second, again, score=0.6)

    study = optuna.load_study(study_name=prepared.sweep.name, storage=study_storage(state, prepared.sweep.name))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"], states
    assert study.best_value == 0.6 and study.trials[3].params == study.trials[2].params

    fresh = SweepStudy.open(prepared, state, resume=False)  # without --resume: a new search
    assert fresh.next_trial().kind == "none" and len(fresh.study.trials) == 0


def test_a_grid_search_runs_out_of_points_cleanly(sweep_file, tmp_path: Path) -> None:
    """Optuna's GridSampler asks the study to stop after the last point; the outcome still counts."""
    import optuna

    from dspy_sweeps.run.pruning import SweepStudy, study_storage
    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps.state import State

    changes = {"search": {"kind": "grid"}, "optimizers": [{**BOOTSTRAP, "max_bootstrapped_demos": [1, 2]}]}
    prepared = prepare(load_sweep(sweep_file(changes)))
    study = SweepStudy.open(prepared, State(tmp_path), resume=False)
    finish(study, study.next_trial())  # the baseline
    points = [study.next_trial(), study.next_trial()]
    assert study.next_trial() is None
    assert {t.settings["max_bootstrapped_demos"] for t in points} == {1, 2}
    for trial in points:
        finish(study, trial)
    stored = optuna.load_study(
        study_name=prepared.sweep.name, storage=study_storage(State(tmp_path), prepared.sweep.name)
    )
    assert [t.state.name for t in stored.trials] == ["COMPLETE", "COMPLETE"]
