"""Unit tests for optimizer settings: binding to DSPy's real signatures, and LM-call estimates.

Run: ``.venv/bin/python -m pytest tests/unit/test_optimizers.py -q``. Imports DSPy (a few
seconds once) but builds no LM and calls none.
"""

from __future__ import annotations

import inspect
from typing import Any

import dspy
import pytest
from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS as GEPA_AUTO
from dspy.utils import DummyLM

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.kinds import KINDS
from dspy_sweeps.spec.optimizers import bind_settings, estimate_calls, optimizer_class


def error_of(kind: str, settings: dict[str, Any], where: str = "optimizers.0") -> str:
    with pytest.raises(SweepError) as info:
        bind_settings(kind, settings, where=where)
    return str(info.value)


def metric(gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> float:
    return 1.0  # GEPA's five-argument form, which the other optimizers accept too


BOOTSTRAP = {"max_bootstrapped_demos": 2, "max_rounds": 2}
GEPA = {"auto": "heavy", "reflection_minibatch_size": 2}


@pytest.mark.parametrize(
    ("kind", "settings", "init", "compile_"),
    [
        ("mipro_v2", {"auto": "light", "minibatch_size": 10}, {"auto": "light"}, {"minibatch_size": 10}),
        (
            "mipro_v2",
            {"auto": None, "num_candidates": 3, "num_trials": 4, "minibatch_full_eval_steps": 2},
            {"auto": None, "num_candidates": 3},
            {"num_trials": 4, "minibatch_full_eval_steps": 2},
        ),
        ("bootstrap_fewshot", BOOTSTRAP, BOOTSTRAP, {}),
        ("gepa", GEPA, GEPA, {}),
    ],
)
def test_settings_go_to_the_constructor_or_compile(kind: str, settings: dict, init: dict, compile_: dict) -> None:
    bound = bind_settings(kind, settings)
    assert (bound.init, bound.compile) == (init, compile_)
    # The split is usable as is: the optimizer builds, and compile accepts the rest.
    cls = optimizer_class(kind)
    extra = {"reflection_lm": DummyLM([])} if kind == "gepa" else {}
    with dspy.context(lm=DummyLM([])):  # MIPROv2 wants an LM to exist; none is called
        assert isinstance(cls(metric=metric, **extra, **bound.init), cls)
    inspect.signature(cls.compile).bind(None, dspy.Predict("q -> a"), trainset=[], **bound.compile)


@pytest.mark.parametrize(
    ("kind", "typo", "right"),
    [
        ("mipro_v2", "minibatch_sise", "minibatch_size"),
        ("mipro_v2", "num_trails", "num_trials"),
        ("bootstrap_fewshot", "max_bootstraped_demos", "max_bootstrapped_demos"),
        ("gepa", "max_metric_call", "max_metric_calls"),
    ],
)
def test_unknown_setting_names_the_nearest_one(kind: str, typo: str, right: str) -> None:
    message = error_of(kind, {typo: 1})
    assert message.startswith(f"optimizers.0.{typo}: ")
    assert message.endswith(f"takes no setting '{typo}' (did you mean '{right}'?)")


def test_unknown_setting_with_no_near_match_lists_the_valid_ones() -> None:
    message = error_of("bootstrap_fewshot", {"zzz": 1})
    assert "valid: " in message and "max_bootstrapped_demos" in message and "max_rounds" in message
    assert "metric" not in message.split("valid: ")[1].split(", "), "platform arguments are not offered"


@pytest.mark.parametrize("kind", ["bootstrap_fewshot", "mipro_v2", "gepa"])
@pytest.mark.parametrize("setting", ["metric", "seed", "teacher_settings", "num_threads", "reflection_lm"])
def test_platform_arguments_are_refused(kind: str, setting: str) -> None:
    message = error_of(kind, {setting: 1})
    assert message == f"optimizers.0.{setting}: set by the platform from the sweep file, not an optimizer setting"


def test_baseline_takes_no_settings() -> None:
    assert error_of("none", {"max_rounds": 2}) == "optimizers.0: the baseline 'none' takes no settings (got max_rounds)"
    bound = bind_settings("none", {})
    assert (bound.init, bound.compile) == ({}, {})


# --- call estimates -----------------------------------------------------------------------

SETTINGS = [
    ("none", {}),
    ("bootstrap_fewshot", {}),
    ("bootstrap_fewshot", {"max_bootstrapped_demos": 8, "max_rounds": 2}),
    ("mipro_v2", {"auto": "light"}),
    ("mipro_v2", {"auto": None, "num_candidates": 4, "num_trials": 6}),
    ("gepa", {"auto": "light"}),
    ("gepa", {"max_metric_calls": 200}),
    ("gepa", {"max_full_evals": 2}),
]


@pytest.mark.parametrize(("kind", "settings"), SETTINGS)
def test_estimate_is_positive_and_grows_with_val(kind: str, settings: dict) -> None:
    small = estimate_calls(kind, settings, (20, 10, 20), predictors=1)
    large = estimate_calls(kind, settings, (20, 50, 20), predictors=1)
    assert 0 < small < large


@pytest.mark.parametrize(("kind", "settings"), SETTINGS)
def test_estimate_grows_with_predictors(kind: str, settings: dict) -> None:
    assert estimate_calls(kind, settings, (20, 20, 20), 1) < estimate_calls(kind, settings, (20, 20, 20), 3)


def test_baseline_estimate_is_scoring_val_and_test() -> None:
    assert estimate_calls("none", {}, (100, 20, 30), predictors=2) == (20 + 30) * 2


@pytest.mark.parametrize("auto", ["light", "medium", "heavy"])
@pytest.mark.parametrize(("val", "predictors"), [(10, 1), (50, 1), (50, 3), (200, 2)])
def test_gepa_auto_estimate_covers_gepas_own_budget(auto: str, val: int, predictors: int) -> None:
    gepa = dspy.GEPA(metric=lambda *args: 0.0, auto=auto, reflection_lm=dspy.LM("openai/unused"))
    # the metric-call budget GEPA itself sets for `auto` (its compile calls this with these arguments)
    budget = gepa.auto_budget(num_preds=predictors, num_candidates=GEPA_AUTO[auto]["n"], valset_size=val)
    estimate = estimate_calls("gepa", {"auto": auto}, (50, val, 20), predictors)
    # Each metric call runs the program once: one LM call per predictor.
    assert budget * predictors <= estimate < 2 * budget * predictors


def test_explicit_gepa_budget_is_used() -> None:
    small = estimate_calls("gepa", {"max_metric_calls": 100}, (20, 20, 20), 1)
    large = estimate_calls("gepa", {"max_metric_calls": 1000}, (20, 20, 20), 1)
    assert 100 <= small < 1000 <= large < 2000


# --- every kind in the table ------------------------------------------------------------

TINY = {
    "bootstrap_rs": {"num_candidate_programs": 2},
    "bootstrap_optuna": {"max_demos": 2, "num_candidate_programs": 3},
    "labeled_fewshot": {"k": 2},
    "knn_fewshot": {"k": 2},
    "copro": {"breadth": 2, "depth": 1},
    "simba": {"bsize": 4, "max_steps": 2},
    "infer_rules": {"num_candidates": 2},
    "better_together": {"strategy": "p -> q", "p": {"kind": "bootstrap_fewshot"}, "q": {"kind": "copro", "breadth": 2}},
    "avatar": {"max_iters": 2},
}


@pytest.mark.parametrize("kind", sorted(set(KINDS) - {"bootstrap_finetune"}))
def test_every_kind_binds_and_has_an_estimate_that_grows_with_val(kind: str) -> None:
    settings = TINY.get(kind, {})
    bind_settings(kind, settings)
    small = estimate_calls(kind, settings, (20, 10, 20), predictors=1)
    large = estimate_calls(kind, settings, (20, 50, 20), predictors=1)
    assert 0 < small < large


def test_settings_forwarded_by_kwargs_bind_to_the_class_that_takes_them() -> None:
    # KNNFewShot and InferRules pass **kwargs on to BootstrapFewShot.
    bound = bind_settings("knn_fewshot", {"k": 3, "max_bootstrapped_demos": 1})
    assert bound.init == {"k": 3, "max_bootstrapped_demos": 1}
    assert "max_bootstraped_demos" in error_of("infer_rules", {"max_bootstraped_demos": 1})


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("bootstrap_finetune", {}, "optimizers.0.kind: bootstrap_finetune trains the student's weights"),
        (
            "better_together",
            {"strategy": "p -> w", "p": {"kind": "copro"}, "w": {"kind": "bootstrap_finetune"}},
            "optimizers.0.w.kind: bootstrap_finetune trains the student's weights",
        ),
        ("better_together", {}, "optimizers.0: better_together needs its steps"),
        (
            "better_together",
            {"strategy": "p -> x", "p": {"kind": "copro"}},
            "optimizers.0.strategy: step 'x' is not defined (steps: p)",
        ),
        ("knn_fewshot", {}, "optimizers.0: KNNFewShot needs the setting 'k'"),
        ("bootstrap_optuna", {}, "optimizers.0: BootstrapFewShotWithOptuna needs the setting 'max_demos'"),
        ("simba", {"bsize": 4, "vectorizer": 1}, "optimizers.0.vectorizer: set by the platform"),
        ("mypkg_missing.opt:Nope", {}, "optimizers.0.kind: cannot import module 'mypkg_missing.opt'"),
    ],
)
def test_refusals_are_one_line_naming_the_field(kind: str, settings: dict, message: str) -> None:
    assert error_of(kind, settings).startswith(message)


def test_a_custom_teleprompter_binds_against_its_own_signature() -> None:
    custom = "tests.assets.teleprompters:BestLabeledDemos"
    bound = bind_settings(custom, {"k": 3, "candidates": 2})
    assert (bound.init, bound.compile) == ({"k": 3, "candidates": 2}, {})
    assert error_of(custom, {"kk": 3}).endswith("BestLabeledDemos takes no setting 'kk' (did you mean 'k'?)")
    assert (
        error_of(custom, {"seed": 3})
        == "optimizers.0.seed: set by the platform from the sweep file, not an optimizer setting"
    )


def test_a_class_that_is_no_teleprompter_is_refused() -> None:
    assert error_of("pipelines.arith:exact_match", {}).endswith(
        "is not a teleprompter class (a class with a compile method)"
    )


def test_readme_table_of_kinds_is_the_one_the_table_of_roles_gives(repo) -> None:
    from dspy_sweeps.spec.optimizers import roles_table

    assert roles_table() in (repo / "README.md").read_text(), "regenerate the README table with roles_table()"
