"""One trial: compile the program with one optimizer, score it on val and test.

`run_trial(trial, data, lms)` is a plain function a Ray worker imports; it knows DSPy,
not Ray. It raises on failure, so the caller records the reason instead of a score of 0.
LM accounting (calls, tokens, cost) is the gateway's, filled in by the worker.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dspy_sweeps.data import Dataset
from dspy_sweeps.imports import build_program, load_object
from dspy_sweeps.optimizers import bind_settings, optimizer_class
from dspy_sweeps.plan import Trial


@dataclass(frozen=True)
class TrialLMs:
    student: Any
    teacher: Any


@dataclass
class TrialResult:
    """What a trial produced; `program` is DSPy's JSON state of the compiled program."""

    trial_id: str
    status: str  # "ok" | "failed" | "cut" (stopped by the sweep's budget)
    error: str | None = None
    val_score: float | None = None
    test_score: float | None = None
    lm_calls: int = 0  # calls sent to an endpoint
    calls_requested: int = 0
    cache_hits: int = 0
    merged_calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    program: str | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)


def run_trial(trial: Trial, data: Dataset, lms: TrialLMs, workdir: Path) -> TrialResult:
    import dspy

    start = time.monotonic()
    metric = load_object(trial.metric, "metric")
    trainset, valset, testset = (to_examples(rows, data.inputs) for rows in (data.train, data.val, data.test))
    with dspy.context(lm=lms.student):
        program = compile_program(trial, build_program(trial.program), metric, lms, trainset, valset, workdir)
        val_score, predictions = evaluate(program, valset, metric, trial.num_threads)
        test_score, _ = evaluate(program, testset, metric, trial.num_threads)
    return TrialResult(
        trial_id=trial.id,
        status="ok",
        val_score=val_score,
        test_score=test_score,
        duration_s=round(time.monotonic() - start, 3),
        program=json.dumps(program.dump_state(), sort_keys=True, default=str),
        predictions=predictions,
    )


def compile_program(
    trial: Trial, program: Any, metric: Callable, lms: TrialLMs, trainset: list, valset: list, workdir: Path
) -> Any:
    """Compile with the trial's optimizer; the teacher bootstraps, proposes and reflects."""
    if trial.kind == "none":
        return program
    bound = bind_settings(trial.kind, trial.settings)
    cls = optimizer_class(trial.kind)
    teacher_settings = {"lm": lms.teacher}
    if trial.kind == "bootstrap_fewshot":
        trainset = random.Random(trial.seed).sample(trainset, len(trainset))
        optimizer = cls(metric=metric, teacher_settings=teacher_settings, **bound.init)
        return optimizer.compile(program, trainset=trainset, **bound.compile)
    if trial.kind == "mipro_v2":
        optimizer = cls(
            metric=metric, prompt_model=lms.teacher, task_model=lms.student, teacher_settings=teacher_settings,
            seed=trial.seed, num_threads=trial.num_threads, **bound.init,
        )  # fmt: skip
        return optimizer.compile(program, trainset=trainset, valset=valset, **bound.compile)
    optimizer = cls(
        metric=feedback_metric(metric), reflection_lm=lms.teacher, seed=trial.seed,
        num_threads=trial.num_threads, log_dir=str(workdir / "gepa"), **bound.init,
    )  # fmt: skip
    return optimizer.compile(program, trainset=trainset, valset=valset, **bound.compile)


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


def evaluate(program: Any, examples: list, metric: Callable, num_threads: int) -> tuple[float, list[dict]]:
    """Mean metric in [0, 1] and one record per example (inputs, outputs, gold labels, score)."""
    import dspy

    evaluator = dspy.Evaluate(devset=examples, metric=metric, num_threads=num_threads, display_progress=False)
    result = evaluator(program)
    records = [
        {
            "inputs": dict(example.inputs()),
            "prediction": dict(prediction.items()) if prediction is not None else {},
            "gold": {k: v for k, v in example.items() if k not in example.inputs().keys()},
            "score": float(score),
        }
        for example, prediction, score in result.results
    ]
    return result.score / 100.0, records


def to_examples(rows: list[dict[str, Any]], inputs: tuple[str, ...]) -> list[Any]:
    import dspy

    return [dspy.Example(**row).with_inputs(*inputs) for row in rows]
