"""Optimizer settings bound to the real signatures, and LM-call estimates, for every kind in spec/kinds.py.

A sweep names an optimizer kind and its settings; the trial adds the runtime objects by role
(metric, teacher LM, seed, threads), as torchtune's `config.instantiate` does. Settings are
bound against the real constructor and `compile` signatures (and, for a constructor that
passes `**kwargs` on, the class it passes them to), so a typo fails in `sweep validate`, not
an hour into a run.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.kinds import BASELINE, KINDS, PLATFORM_PARAMS, ROLES, Kind, kind_of, weight_training_refusal

DEFAULT_STRATEGY = "p -> w -> p"  # BetterTogether's own default
TEACHER_LMS = ("teacher_settings", "prompt_model", "reflection_lm")


@dataclass(frozen=True)
class BoundSettings:
    """A trial's settings split between the optimizer's constructor and its `compile`; a
    composing optimizer's steps are bound each on its own."""

    init: dict[str, Any]
    compile: dict[str, Any]
    steps: dict[str, Step] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    kind: str
    bound: BoundSettings


def optimizer_class(kind: str, where: str = "optimizers") -> type:
    """The teleprompter class of a short name or an import path (SweepError naming the field if it is none)."""
    from dspy_sweeps.spec.imports import load_object

    cls = load_object(kind_of(kind).path, f"{where}.kind")
    if not (isinstance(cls, type) and callable(getattr(cls, "compile", None))):
        raise SweepError(f"{where}.kind: '{kind}' is not a teleprompter class (a class with a compile method)")
    return cls


@dataclass(frozen=True)
class Signatures:
    """The parameters an optimizer takes: constructor (with what its **kwargs go to) and compile."""

    init: dict[str, inspect.Parameter]
    compile: dict[str, inspect.Parameter]

    @classmethod
    def of(cls, kind: Kind, where: str = "optimizers") -> Signatures:
        optimizer = optimizer_class(kind.name, where)
        init = _params(optimizer.__init__)
        if kind.forwards_to:
            from dspy_sweeps.spec.imports import load_object

            init = {**_params(load_object(kind.forwards_to, "kinds").__init__), **init}
        compile_ = _params(optimizer.compile)
        compile_.pop(next(iter(compile_), ""), None)  # the program being compiled
        return cls(init, compile_)

    def has(self, param: str) -> bool:
        return param in self.init or param in self.compile


def role_params(kind: Kind, signatures: Signatures) -> list[tuple[str, str]]:
    """(parameter, "init" | "compile") for every role parameter the optimizer takes and the platform fills.

    The teacher program goes only to an optimizer with no parameter for the teacher LM; a kind's
    `skip` leaves parameters alone (see spec/kinds.py)."""
    lm_teacher = any(signatures.has(p) for p in TEACHER_LMS)
    found = []
    for param in (p for role in ROLES for p in role.params):
        if param in kind.skip or (param == "teacher" and lm_teacher):
            continue
        found += [
            (param, where)
            for where, params in (("init", signatures.init), ("compile", signatures.compile))
            if param in params
        ]
    return found


def roles_table() -> str:
    """The README's table: each kind and the parameters its roles reach (read from DSPy's signatures)."""
    lines = ["| kind | DSPy class | the platform supplies | notes |", "| --- | --- | --- | --- |"]
    for kind in KINDS.values():
        if kind.trains_weights:
            supplied = "-"
        else:
            params = role_params(kind, Signatures.of(kind))
            supplied = ", ".join(f"`{p}`" if w == "init" else f"`compile({p})`" for p, w in params)
        metric = " (as a feedback metric)" if kind.feedback_metric else ""
        lines.append(f"| `{kind.name}` | {kind.class_name} | {supplied}{metric} | {kind.note} |")
    return "\n".join(lines) + "\n"


def bind_settings(kind: str, settings: dict[str, Any], where: str = "optimizers") -> BoundSettings:
    """Bind settings to the optimizer's real signatures; SweepError names a setting that fits neither."""
    if kind == BASELINE:
        if settings:
            raise SweepError(f"{where}: the baseline 'none' takes no settings (got {', '.join(settings)})")
        return BoundSettings({}, {})
    spec = kind_of(kind)
    if spec.trains_weights:
        raise SweepError(f"{where}.kind: {weight_training_refusal(kind)}")
    signatures = Signatures.of(spec, where)
    init, compiled, steps = {}, {}, {}
    for key, value in settings.items():
        if spec.steps and isinstance(value, dict) and "kind" in value:
            steps[key] = _bind_step(key, value, f"{where}.{key}")
        elif key in PLATFORM_PARAMS:
            raise SweepError(f"{where}.{key}: set by the platform from the sweep file, not an optimizer setting")
        elif key in signatures.init:
            init[key] = value
        elif key in signatures.compile:
            compiled[key] = value
        else:
            raise SweepError(f"{where}.{key}: {_unknown(spec, key, signatures)}")
    _check_required(spec, signatures, {**init, **compiled}, where)
    if spec.steps:
        _check_strategy(kind, settings.get("strategy", DEFAULT_STRATEGY), steps, where)
    return BoundSettings(init, compiled, steps)


def _unknown(spec: Kind, key: str, signatures: Signatures) -> str:
    valid = sorted((signatures.init.keys() | signatures.compile.keys()) - PLATFORM_PARAMS)
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(valid) or 'none'}"
    return f"{spec.class_name} takes no setting '{key}' ({hint})"


def _check_required(spec: Kind, signatures: Signatures, given: dict[str, Any], where: str) -> None:
    """A parameter without a default that neither the platform nor the settings supply."""
    for name, param in {**signatures.init, **signatures.compile}.items():
        if param.default is inspect.Parameter.empty and name not in PLATFORM_PARAMS and name not in given:
            raise SweepError(f"{where}: {spec.class_name} needs the setting '{name}'")


def _bind_step(name: str, value: dict[str, Any], where: str) -> Step:
    from dspy_sweeps.spec.kinds import kind_error

    kind = value["kind"]
    if (error := kind_error(kind)) is not None:
        raise SweepError(f"{where}.kind: {error}")
    step = kind_of(kind)
    if kind == BASELINE or step.steps:
        raise SweepError(f"{where}.kind: a step is one optimizer, not {kind!r}")
    if step.trains_weights:
        raise SweepError(f"{where}.kind: {weight_training_refusal(kind)}")
    settings = {k: v for k, v in value.items() if k != "kind"}
    return Step(kind, bind_settings(kind, settings, where))


def _check_strategy(kind: str, strategy: Any, steps: dict[str, Step], where: str) -> None:
    if not steps:
        raise SweepError(
            f"{where}: {kind} needs its steps, e.g. p: {{kind: bootstrap_fewshot}}, and strategy: 'p' "
            "(its default steps fine-tune weights, which a sweep cannot host yet)"
        )
    names = str(strategy).split(" -> ")
    missing = [n for n in names if n not in steps]
    if missing:
        raise SweepError(
            f"{where}.strategy: step '{missing[0]}' is not defined (steps: {', '.join(steps)}); "
            "write it as 'p -> q' over the steps given"
        )


def check_program(kind: str, program: Any, program_path: str, where: str) -> None:
    """Refuse an optimizer that cannot compile this program (before any LM is called)."""
    spec = kind_of(kind)
    if spec.needs_avatar and not (hasattr(program, "actor") and hasattr(program, "tools")):
        raise SweepError(
            f"{where}.kind: {kind} optimizes a dspy.Avatar agent (it reads the program's actor and tools); "
            f"{program_path} is not one"
        )


def check_sizes(kind: str, settings: dict[str, Any], train: int, where: str) -> None:
    """Settings DSPy would only refuse once the trial runs (after LM calls were spent)."""
    if kind == "simba" and settings.get("bsize", 32) > train:
        raise SweepError(
            f"{where}.bsize: SIMBA's minibatch of {settings.get('bsize', 32)} is larger than the train split "
            f"({train} rows); set bsize to {train} or less"
        )
    if kind == "copro" and settings.get("breadth", 10) <= 1:
        raise SweepError(f"{where}.breadth: COPRO needs a breadth above 1 (got {settings['breadth']})")


def _params(fn: Callable) -> dict[str, inspect.Parameter]:
    return {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


# --- call estimates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    train: int
    val: int
    test: int
    predictors: int


def estimate_calls(kind: str, settings: dict[str, Any], sizes: tuple[int, int, int], predictors: int) -> int:
    """A rough count of LM calls: compile plus scoring the program on val and test."""
    s = Sizes(*sizes, predictors)
    scoring = (s.val + s.test) * predictors
    if kind == "knn_fewshot":  # every call bootstraps on its k neighbours, and embeds its input
        per_call = min(settings["k"], settings.get("max_bootstrapped_demos", 4)) * predictors + predictors + 1
        return (s.val + s.test) * per_call + math.ceil(s.train / 200)
    if kind == BASELINE:
        return scoring
    return compile_calls(kind, settings, s) + scoring


def compile_calls(kind: str, settings: dict[str, Any], s: Sizes) -> int:
    estimate = ESTIMATES.get(kind, _custom_calls)
    return int(estimate(settings, s))


def _bootstrap_calls(settings: dict[str, Any], s: Sizes, train: int | None = None) -> int:
    demos = settings.get("max_bootstrapped_demos", 4)
    return min(train or s.train, 4 * demos) * settings.get("max_rounds", 1) * s.predictors


def _random_search_calls(settings: dict[str, Any], s: Sizes) -> int:
    # Three seeds besides the candidates: zero-shot, labels only, and unshuffled.
    candidates = settings.get("num_candidate_programs", 16) + 3
    return candidates * (_bootstrap_calls(settings, s) + s.val * s.predictors)


def _optuna_calls(settings: dict[str, Any], s: Sizes) -> int:
    bootstrap = _bootstrap_calls({**settings, "max_bootstrapped_demos": settings["max_demos"]}, s)
    return bootstrap + settings.get("num_candidate_programs", 16) * s.val * s.predictors


def _copro_calls(settings: dict[str, Any], s: Sizes) -> int:
    breadth, depth = settings.get("breadth", 10), settings.get("depth", 3)
    return depth * s.predictors * (breadth * s.train + 1) + s.train * s.predictors


def _simba_calls(settings: dict[str, Any], s: Sizes) -> int:
    steps, bsize, n = (
        settings.get("max_steps", 8),
        min(settings.get("bsize", 32), s.train),
        settings.get("num_candidates", 6),
    )
    per_step = 2 * bsize * n * s.predictors + n
    return steps * per_step + (steps + 1) * s.train * s.predictors


def _infer_rules_calls(settings: dict[str, Any], s: Sizes) -> int:
    n = settings.get("num_candidates", 10)
    return _bootstrap_calls(settings, s) + n * s.predictors * (1 + s.val)


def _better_together_calls(settings: dict[str, Any], s: Sizes) -> int:
    strategy = str(settings.get("strategy", DEFAULT_STRATEGY)).split(" -> ")
    steps = {k: v for k, v in settings.items() if isinstance(v, dict) and "kind" in v}
    total = (len(strategy) + 1) * s.val * s.predictors  # each step's program, and the first, scored on val
    for name in strategy:
        step = {k: v for k, v in steps.get(name, {}).items() if k != "kind"}
        total += compile_calls(steps.get(name, {}).get("kind", ""), step, s)
    return total


def _avatar_calls(settings: dict[str, Any], s: Sizes) -> int:
    return settings.get("max_iters", 10) * (s.train * s.predictors + 2)


def _custom_calls(settings: dict[str, Any], s: Sizes) -> int:
    """A teleprompter the table does not know: assume it runs the program over train and val once."""
    return (s.train + s.val) * s.predictors


def _mipro_calls(settings: dict[str, Any], s: Sizes) -> int:
    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS

    train, val, predictors = s.train, s.val, s.predictors
    auto = settings.get("auto", "light")
    n = settings.get("num_candidates") or AUTO_RUN_SETTINGS[auto or "light"]["n"]
    val = min(val, AUTO_RUN_SETTINGS[auto]["val_size"]) if auto else val
    trials = settings.get("num_trials") or int(max(2 * 2 * predictors * math.log2(max(n, 2)), 1.5 * n))
    minibatch = min(settings.get("minibatch_size", 35), val)
    bootstrap = n * min(train, 4 * settings.get("max_bootstrapped_demos", 4))
    proposals = n * predictors + 10
    full_evals = (trials // settings.get("minibatch_full_eval_steps", 5) + 1) * val
    return (bootstrap + trials * minibatch + full_evals) * predictors + proposals


def _gepa_calls(settings: dict[str, Any], s: Sizes) -> int:
    from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS

    if settings.get("max_metric_calls"):
        metric_calls = settings["max_metric_calls"]
    elif settings.get("max_full_evals"):
        metric_calls = settings["max_full_evals"] * (s.train + s.val)
    else:
        n = AUTO_RUN_SETTINGS[settings.get("auto", "light")]["n"]
        metric_calls = gepa_auto_budget(num_preds=s.predictors, num_candidates=n, valset_size=s.val)
    reflections = metric_calls // max(settings.get("reflection_minibatch_size", 3), 1) // 2
    return metric_calls * s.predictors + reflections


def gepa_auto_budget(num_preds: int, num_candidates: int, valset_size: int) -> int:
    """GEPA's own budget rule for `auto`, asked of a GEPA instance (its public method); building one
    makes no LM call. AUTO_RUN_SETTINGS, which has no public form, is pinned by tests/unit/test_private_apis.py."""
    import dspy

    gepa = dspy.GEPA(metric=_no_metric, auto="light", reflection_lm=dspy.LM("openai/unused"))
    return gepa.auto_budget(num_preds=num_preds, num_candidates=num_candidates, valset_size=valset_size)


def _no_metric(gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> float:
    return 0.0


ESTIMATES: dict[str, Callable[[dict[str, Any], Sizes], int]] = {
    "bootstrap_fewshot": _bootstrap_calls,
    "bootstrap_rs": _random_search_calls,
    "bootstrap_optuna": _optuna_calls,
    "labeled_fewshot": lambda settings, s: 0,
    "mipro_v2": _mipro_calls,
    "copro": _copro_calls,
    "simba": _simba_calls,
    "gepa": _gepa_calls,
    "infer_rules": _infer_rules_calls,
    "better_together": _better_together_calls,
    "avatar": _avatar_calls,
}
