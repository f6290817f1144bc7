"""Search and pruning through `sweep run`: Optuna picks the trials the hosts run, the streamed
events prune a loser, and `--resume` continues the same study.

Run: ``.venv/bin/python -m pytest -q -n 0 tests/integration/test_search_sweeps.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_helpers import UNTRACKED, rows, sweep_cli

from dspy_sweeps.run.pruning import study_storage
from dspy_sweeps.state import State
from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


def study_states(state: Path) -> list[str]:
    import optuna

    study = optuna.load_study(study_name="demo", storage=study_storage(State(state), "demo"))
    return [t.state.name for t in study.trials]


def test_a_trial_on_the_simulators_weak_profile_is_pruned_in_a_sweep(tmp_path: Path) -> None:
    """Relies on the simulator's profiles (sim/answers.py): its teacher profile served as a student
    (sound) scores above its student profile (hopeless) by their tuned constants, so this tests the
    pruning path of a sweep on the simulator, not that a real hopeless trial is found. One trial at a time, so the sound one sets the bar the median pruner holds the
    hopeless one to at equal LM spend. The simulator answers at a tenth of real time, so a trial
    takes seconds: the driver's stop reaches it while it runs, as it does a real model's."""
    from sweep_helpers import demo_answer_key

    key = demo_answer_key(tmp_path / "key.jsonl")
    with SimServer(key, tmp_path / "sim", models=("student", "teacher"), time_scale=0.1) as slow:
        run, base = _pruned_sweep(slow.base_url, tmp_path / "state")
    assert run.returncode == 0, run.stderr[-3000:]
    records = {(r["kind"], r["student"]): r for r in rows(base)}
    sound, hopeless = records[("mipro_v2", "sound")], records[("mipro_v2", "hopeless")]
    assert sound["status"] == "ok", sound
    assert hopeless["status"] == "pruned", hopeless
    assert hopeless["test_score"] is None and 0 < hopeless["calls_requested"] < sound["calls_requested"]
    assert "PRUNED" in study_states(base) and "COMPLETE" in study_states(base)


def _pruned_sweep(base: str, state: Path):
    """`sweep run` of a sound and a hopeless MIPROv2 trial under the median pruner."""
    args = [
        "run",
        "sweeps/demo.yaml",
        "--set",
        f"students=[{{name: sound, model: openai/teacher, api_base: '{base}'}},"
        f" {{name: hopeless, model: openai/student, api_base: '{base}'}}]",
        "--set",
        f"teachers=[{{name: big, model: openai/teacher, api_base: '{base}'}}]",
        "--set",
        "optimizers=[{kind: mipro_v2, auto: null, num_candidates: 3, num_trials: 6, minibatch_size: 5}]",
        "--set",
        "prune={kind: median, n_startup_trials: 1}",
        "--set",
        "parallelism=1",
        *UNTRACKED,
    ]
    return sweep_cli(*args, state=state), state


def test_a_resumed_search_continues_its_study(sim: SimServer, tmp_path: Path) -> None:
    args = [
        "run",
        "sweeps/demo.yaml",
        "--set",
        f"students=[{{name: student, model: openai/student, api_base: '{sim.base_url}'}}]",
        "--set",
        f"teachers=[{{name: big, model: openai/teacher, api_base: '{sim.base_url}'}}]",
        "--set",
        "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: {int: [1, 4]}, max_rounds: {int: [1, 2]}}]",
        "--set",
        "search={kind: random, trials: 2, seed: 3}",
        *UNTRACKED,
    ]
    first = sweep_cli(*args, state=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {r["trial_id"]: r for r in rows(tmp_path)}
    assert sorted(r["kind"] for r in before.values()) == ["bootstrap_fewshot", "bootstrap_fewshot", "none"]
    assert study_states(tmp_path) == ["COMPLETE", "COMPLETE"]

    resumed = sweep_cli(*args, "--set", "search.trials=3", "--resume", state=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r["trial_id"]: r for r in rows(tmp_path)}
    assert set(before) < set(after) and len(after) == 4, "one more trial, the finished ones kept"
    assert all(after[t]["duration_s"] == r["duration_s"] for t, r in before.items()), "no finished trial ran again"
    assert study_states(tmp_path) == ["COMPLETE", "COMPLETE", "COMPLETE"]
