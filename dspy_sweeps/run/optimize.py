"""Compile a program with any optimizer kind: each of the platform's pieces goes where the table of roles says.

`compile_with(kind, settings, program, supplies)` builds the optimizer and runs its `compile`.
Which constructor or `compile` parameter receives the metric, the teacher, the student LM, the
splits, the seed, the threads or the log folder is read from the signatures by the names in
`spec/kinds.py` ROLES, so a custom teleprompter gets the roles its signature names.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspy_sweeps.spec.kinds import Kind, kind_of
from dspy_sweeps.spec.optimizers import BoundSettings, Signatures, bind_settings, optimizer_class, role_params


@dataclass(frozen=True)
class Supplies:
    """What the platform hands an optimizer."""

    metric: Callable
    metric_path: str
    student: Any  # dspy.LM
    teacher: Any  # dspy.LM
    trainset: list
    valset: list
    seed: int
    threads: int
    log_dir: Path
    embedder: Any = None  # dspy.Embedder, for kinds that take a vectorizer


def compile_with(name: str, settings: dict[str, Any], program: Any, supplies: Supplies) -> Any:
    """The program compiled by the optimizer `name` with `settings` (bound as `sweep validate` binds them)."""
    kind = kind_of(name)
    bound = bind_settings(name, settings)
    signatures = Signatures.of(kind)
    if not signatures.has("seed"):  # the seed still decides something: the order of the train split
        supplies = _shuffled(supplies)
    init, compile_args = _arguments(kind, signatures, supplies, program)
    optimizer = optimizer_class(name)(**init, **bound.init, **_steps(bound, supplies))
    if kind.program_lm:  # BetterTogether wants an LM on every predictor; it is cleared again below
        program.set_lm(supplies.student)
    compiled = optimizer.compile(program, **compile_args, **bound.compile, **_step_compile_args(bound, supplies))
    if kind.program_lm:
        for predictor in compiled.predictors():
            predictor.lm = None  # the saved state must never name an endpoint
    if kind.composite == "knn_fewshot":
        from dspy_sweeps.spec.composite import knn_program

        return knn_program(compiled, optimizer, program, bound.init, supplies.metric_path)
    return compiled


def _arguments(kind: Kind, signatures: Signatures, supplies: Supplies, program: Any) -> tuple[dict, dict]:
    """Every role parameter the optimizer's signatures name, split between constructor and compile."""
    values = _role_values(kind, supplies, program)
    init, compile_args = {}, {}
    for param, where in role_params(kind, signatures):
        (init if where == "init" else compile_args)[param] = values[param]()
    return init, compile_args


def _role_values(kind: Kind, s: Supplies, program: Any) -> dict[str, Callable[[], Any]]:
    """Each role parameter's value, built only if the optimizer takes it."""
    return {
        "metric": lambda: feedback_metric(s.metric) if kind.feedback_metric else s.metric,
        "teacher_settings": lambda: {"lm": s.teacher},
        "prompt_model": lambda: s.teacher,
        "reflection_lm": lambda: s.teacher,
        "teacher": lambda: _on_lm(program, s.teacher),
        "task_model": lambda: s.student,
        "trainset": lambda: s.trainset,
        "valset": lambda: s.valset,
        "seed": lambda: s.seed,
        "num_threads": lambda: s.threads,
        "eval_kwargs": lambda: {"num_threads": s.threads, "display_progress": False, "display_table": False},
        "log_dir": lambda: str(s.log_dir / kind.name.replace(":", "_")),
        "vectorizer": lambda: s.embedder,
    }


def _steps(bound: BoundSettings, supplies: Supplies) -> dict[str, Any]:
    """A composing optimizer's steps, each built with its own roles (BetterTogether's **optimizers)."""
    steps = {}
    for name, step in bound.steps.items():
        kind = kind_of(step.kind)
        init, _ = _arguments(kind, Signatures.of(kind), supplies, None)
        steps[name] = optimizer_class(step.kind)(**init, **step.bound.init)
    return steps


def _step_compile_args(bound: BoundSettings, supplies: Supplies) -> dict[str, Any]:
    """Each step's own compile settings and roles; the composer hands it the splits and the program."""
    if not bound.steps:
        return {}
    args = {}
    for name, step in bound.steps.items():
        kind = kind_of(step.kind)
        _, roles = _arguments(kind, Signatures.of(kind), supplies, None)
        own = {k: v for k, v in roles.items() if k not in ("trainset", "valset", "teacher")}
        args[name] = {**own, **step.bound.compile}
    return {"optimizer_compile_args": args}


def _shuffled(supplies: Supplies) -> Supplies:
    from dataclasses import replace

    trainset = random.Random(supplies.seed).sample(supplies.trainset, len(supplies.trainset))
    return replace(supplies, trainset=trainset)


def _on_lm(program: Any, lm: Any) -> Any:
    """A copy of the program on the teacher LM, for optimizers that take a teacher program."""
    teacher = program.deepcopy()
    teacher.set_lm(lm)
    return teacher


def feedback_metric(metric: Callable) -> Callable:
    """Wrap a plain metric into GEPA's (gold, pred, trace, pred_name, pred_trace) -> score+feedback."""
    import dspy

    def gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = float(metric(gold, pred, trace))
        expected = {k: v for k, v in gold.items() if k not in gold.inputs().keys()}
        got = {k: pred.get(k) for k in expected}
        feedback = "Correct." if score >= 1.0 else f"Incorrect: expected {expected}, got {got}."
        return dspy.Prediction(score=score, feedback=feedback)

    return gepa_metric
