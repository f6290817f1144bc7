"""Unit tests for planning: a sweep's grids × students × teachers × seeds, plus baselines.

Run: ``.venv/bin/python -m pytest tests/unit/test_plan.py -q``. Pure logic over loaded sweep
files; no data is read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dspy_sweeps.spec.plan import expand_grid, plan_trials
from dspy_sweeps.spec.schema import load_sweep

BASIS = "basis0"  # a stand-in for trial_basis (data fingerprint, threads, sources)

SweepFile = Callable[..., Path]


def test_demo_plan_is_a_baseline_then_each_optimizer(repo: Path) -> None:
    trials = plan_trials(load_sweep(repo / "sweeps" / "demo.yaml"), BASIS)
    assert [(t.kind, t.settings) for t in trials] == [
        ("none", {}),
        ("bootstrap_fewshot", {"max_bootstrapped_demos": 2}),
        ("bootstrap_fewshot", {"max_bootstrapped_demos": 4}),
        ("mipro_v2", {"auto": "light"}),
        ("gepa", {"auto": "light"}),
    ]
    baseline = trials[0]
    assert baseline.teacher is None and baseline.id.startswith("none-small-s0-")
    assert all(t.teacher is not None and t.teacher.name == "big" for t in trials[1:])
    assert all(t.program == "pipelines.arith:Solve" and t.metric == "pipelines.arith:exact_match" for t in trials)


def test_trial_ids_are_unique_and_stable_across_loads(repo: Path) -> None:
    first = [t.id for t in plan_trials(load_sweep(repo / "sweeps" / "demo.yaml"), BASIS)]
    second = [t.id for t in plan_trials(load_sweep(repo / "sweeps" / "demo.yaml"), BASIS)]
    assert first == second
    assert len(set(first)) == len(first)


def test_grid_times_students_times_seeds(sweep_file: SweepFile) -> None:
    path = sweep_file(
        {
            "students": [{"name": "small", "model": "sim/student"}, {"name": "tiny", "model": "sim/tiny"}],
            "optimizers": [
                {"kind": "bootstrap_fewshot", "max_bootstrapped_demos": [1, 2], "max_labeled_demos": [0, 2, 4]}
            ],
            "seeds": [0, 1],
        }
    )
    trials = plan_trials(load_sweep(path), BASIS)
    baselines, compiled = trials[:2], trials[2:]
    # One baseline per student (a baseline compiles nothing, so seeds do not multiply it).
    assert [(t.kind, t.student.name, t.seed) for t in baselines] == [("none", "small", 0), ("none", "tiny", 0)]
    assert len(compiled) == 2 * 3 * 2 * 2
    cells = {(*t.settings.values(), t.student.name, t.seed) for t in compiled}
    assert len(cells) == 24
    assert len({t.id for t in trials}) == 26


def test_every_teacher_is_crossed_with_every_student(sweep_file: SweepFile) -> None:
    path = sweep_file(
        {
            "students": [{"name": "a", "model": "sim/a"}, {"name": "b", "model": "sim/b"}],
            "teachers": [{"name": "x", "model": "sim/x"}, {"name": "y", "model": "sim/y"}],
            "optimizers": [{"kind": "mipro_v2", "auto": "light"}],
        }
    )
    compiled = [t for t in plan_trials(load_sweep(path), BASIS) if t.kind != "none"]
    assert Counter((t.student.name, t.teacher.name) for t in compiled) == Counter(
        {("a", "x"): 1, ("a", "y"): 1, ("b", "x"): 1, ("b", "y"): 1}
    )


def test_without_teachers_the_student_teaches_itself(sweep_file: SweepFile) -> None:
    trials = plan_trials(load_sweep(sweep_file({"teachers": []})), BASIS)
    assert len(trials) == 5
    assert all(t.teacher is None for t in trials)


def test_none_in_optimizers_does_not_duplicate_baselines(sweep_file: SweepFile, sweep_dict: dict) -> None:
    path = sweep_file({"optimizers": [{"kind": "none"}, *sweep_dict["optimizers"], {"kind": "none"}]})
    kinds = [t.kind for t in plan_trials(load_sweep(path), BASIS)]
    assert kinds.count("none") == 1
    assert len(kinds) == 5


def test_changing_a_setting_changes_only_that_trials_id(sweep_file: SweepFile) -> None:
    before = {t.label: t.id for t in plan_trials(load_sweep(sweep_file()), BASIS)}
    after = {t.label: t.id for t in plan_trials(load_sweep(sweep_file(), ["optimizers.1.auto=medium"]), BASIS)}
    assert "mipro_v2(auto=medium)" in after and "mipro_v2(auto=light)" not in after
    assert after["mipro_v2(auto=medium)"] != before["mipro_v2(auto=light)"]
    unchanged = {label: trial_id for label, trial_id in before.items() if not label.startswith("mipro_v2")}
    assert {label: after[label] for label in unchanged} == unchanged


def test_changing_a_model_or_seed_changes_the_ids(sweep_file: SweepFile) -> None:
    base = [t.id for t in plan_trials(load_sweep(sweep_file()), BASIS)]
    hotter = [t.id for t in plan_trials(load_sweep(sweep_file(), ["students.0.temperature=0.9"]), BASIS)]
    reseeded = [t.id for t in plan_trials(load_sweep(sweep_file(), ["seeds=[5]"]), BASIS)]
    assert not set(base) & set(hotter)
    assert not set(base) & set(reseeded)
    assert all("-s5-" in trial_id for trial_id in reseeded)


def test_expand_grid_keeps_scalars_and_crosses_lists() -> None:
    assert expand_grid({}) == [{}]
    assert expand_grid({"auto": "light"}) == [{"auto": "light"}]
    assert expand_grid({"a": [1, 2], "b": "x", "c": [True, False]}) == [
        {"a": 1, "b": "x", "c": True},
        {"a": 1, "b": "x", "c": False},
        {"a": 2, "b": "x", "c": True},
        {"a": 2, "b": "x", "c": False},
    ]


def test_every_input_of_the_result_is_part_of_the_trial_ids(sweep_file: SweepFile, tmp_path: Path, monkeypatch) -> None:
    """The data (its fingerprint covers files, query and split), the thread count and the source of the
    program's and the metric's modules: a change to any of them gives every trial a new id."""
    from dspy_sweeps.spec.plan import trial_basis

    sweep = load_sweep(sweep_file())
    base = trial_basis(sweep, "fp-a")
    assert trial_basis(sweep, "fp-a") == base
    assert trial_basis(sweep, "fp-b") != base
    assert trial_basis(load_sweep(sweep_file(), ["num_threads=3"]), "fp-a") != base
    ids = {t.id for t in plan_trials(sweep, base)}
    assert not ids & {t.id for t in plan_trials(sweep, trial_basis(sweep, "fp-b"))}

    package = tmp_path / "edited_pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "prog.py").write_text("def metric(example, prediction, trace=None):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    edited = load_sweep(sweep_file(), ["metric=edited_pipeline.prog:metric"])
    before = trial_basis(edited, "fp-a")
    (package / "prog.py").write_text("def metric(example, prediction, trace=None):\n    return 0.0\n")
    assert trial_basis(edited, "fp-a") != before
