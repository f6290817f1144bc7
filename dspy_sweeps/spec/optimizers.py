"""Optimizer kinds: their DSPy classes, how sweep settings bind to them, and call estimates.

A sweep names an optimizer kind and its settings; the trial adds the runtime objects
(metric, teacher LM, seed, threads), as torchtune's `config.instantiate` does. Settings
are bound against the real constructor and `compile` signatures, so a typo fails in
`sweep validate`, not an hour into a run.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dspy_sweeps.errors import SweepError

CLASSES = {"bootstrap_fewshot": "BootstrapFewShot", "mipro_v2": "MIPROv2", "gepa": "GEPA"}

# Arguments the platform supplies from the sweep (metric, teacher, seed, ...), never from settings.
PLATFORM_ARGS = {
    "metric",
    "teacher_settings",
    "prompt_model",
    "task_model",
    "reflection_lm",
    "seed",
    "num_threads",
    "log_dir",
    "student",
    "trainset",
    "valset",
    "teacher",
    "requires_permission_to_run",
    "use_wandb",
    "wandb_api_key",
    "wandb_init_kwargs",
    "use_mlflow",
}


@dataclass(frozen=True)
class BoundSettings:
    """A trial's settings split between the optimizer's constructor and its `compile`."""

    init: dict[str, Any]
    compile: dict[str, Any]


def optimizer_class(kind: str) -> type:
    import dspy

    return getattr(dspy, CLASSES[kind])


def bind_settings(kind: str, settings: dict[str, Any], where: str = "optimizers") -> BoundSettings:
    """Bind settings to the optimizer's real signatures; SweepError names a setting that fits neither."""
    if kind == "none":
        if settings:
            raise SweepError(f"{where}: the baseline 'none' takes no settings (got {', '.join(settings)})")
        return BoundSettings({}, {})
    cls = optimizer_class(kind)
    init_params = _params(cls.__init__)
    compile_params = _params(cls.compile)
    init, compiled = {}, {}
    for key, value in settings.items():
        if key in PLATFORM_ARGS:
            raise SweepError(f"{where}.{key}: set by the platform from the sweep file, not an optimizer setting")
        if key in init_params:
            init[key] = value
        elif key in compile_params:
            compiled[key] = value
        else:
            valid = sorted((init_params | compile_params) - PLATFORM_ARGS)
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(valid)}"
            raise SweepError(f"{where}.{key}: {CLASSES[kind]} takes no setting '{key}' ({hint})")
    inspect.signature(cls.__init__).bind_partial(None, **init)
    return BoundSettings(init, compiled)


def _params(fn: Callable) -> set[str]:
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def estimate_calls(kind: str, settings: dict[str, Any], sizes: tuple[int, int, int], predictors: int) -> int:
    """A rough count of LM calls: compile plus scoring the program on val and test."""
    train, val, test = sizes
    evaluation = (val + test) * predictors
    if kind == "none":
        return evaluation
    if kind == "bootstrap_fewshot":
        demos = settings.get("max_bootstrapped_demos", 4)
        return min(train, 4 * demos) * settings.get("max_rounds", 1) * predictors + evaluation
    if kind == "mipro_v2":
        return _mipro_calls(settings, train, val, predictors) + evaluation
    return _gepa_calls(settings, train, val, predictors) + evaluation


def _mipro_calls(settings: dict[str, Any], train: int, val: int, predictors: int) -> int:
    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS

    auto = settings.get("auto", "light")
    n = settings.get("num_candidates") or AUTO_RUN_SETTINGS[auto or "light"]["n"]
    val = min(val, AUTO_RUN_SETTINGS[auto]["val_size"]) if auto else val
    trials = settings.get("num_trials") or int(max(2 * 2 * predictors * math.log2(max(n, 2)), 1.5 * n))
    minibatch = min(settings.get("minibatch_size", 35), val)
    bootstrap = n * min(train, 4 * settings.get("max_bootstrapped_demos", 4))
    proposals = n * predictors + 10
    full_evals = (trials // settings.get("minibatch_full_eval_steps", 5) + 1) * val
    return (bootstrap + trials * minibatch + full_evals) * predictors + proposals


def _gepa_calls(settings: dict[str, Any], train: int, val: int, predictors: int) -> int:
    from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS

    if settings.get("max_metric_calls"):
        metric_calls = settings["max_metric_calls"]
    elif settings.get("max_full_evals"):
        metric_calls = settings["max_full_evals"] * (train + val)
    else:
        import dspy

        n = AUTO_RUN_SETTINGS[settings.get("auto", "light")]["n"]
        # GEPA's own budget rule; it reads only its arguments, so no GEPA (and no LM) is built.
        metric_calls = dspy.GEPA.auto_budget(None, num_preds=predictors, num_candidates=n, valset_size=val)
    reflections = metric_calls // max(settings.get("reflection_minibatch_size", 3), 1) // 2
    return metric_calls * predictors + reflections
