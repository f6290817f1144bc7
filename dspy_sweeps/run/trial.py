"""One trial: compile the program with one optimizer, score it on val and test.

`run_trial(trial, data, lms)` is a plain function a Ray worker imports; it knows DSPy,
not Ray. It raises on failure, so the caller records the reason instead of a score of 0.
LM accounting (calls, tokens, cost) is the gateway's, filled in by the worker.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspy_sweeps.data import Dataset
from dspy_sweeps.spec.imports import build_program, load_object
from dspy_sweeps.spec.optimizers import bind_settings, optimizer_class
from dspy_sweeps.spec.plan import Trial


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
    reason: str | None = None  # why it failed: "endpoint", "auth", "budget", "error"
    val_score: float | None = None
    test_score: float | None = None
    lm_calls: int = 0  # calls sent to an endpoint
    calls_requested: int = 0
    cache_hits: int = 0
    merged_calls: int = 0
    failed_calls: int = 0
    failed_examples: int = 0  # examples not scored because their LM calls failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    attempts: int = 1  # more than 1: the trial was retried after its worker died, or resumed
    program: str | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    # Per-example scores in split order (None: not scored), for the bootstrap intervals of track/gate.py.
    val_scores: list[float | None] = field(default_factory=list)
    test_scores: list[float | None] = field(default_factory=list)


def run_trial(trial: Trial, data: Dataset, lms: TrialLMs, workdir: Path) -> TrialResult:
    import dspy

    start = time.monotonic()
    metric = load_object(trial.metric, "metric")
    trainset, valset, testset = (to_examples(rows, data.inputs) for rows in (data.train, data.val, data.test))
    with dspy.context(lm=lms.student):
        program = compile_program(trial, build_program(trial.program), metric, lms, trainset, valset, workdir)
        val = evaluate(program, valset, metric, trial.num_threads)
        test = evaluate(program, testset, metric, trial.num_threads)
    return TrialResult(
        trial_id=trial.id,
        status="ok",
        val_score=val.score,
        test_score=test.score,
        failed_examples=val.failed + test.failed,
        duration_s=round(time.monotonic() - start, 3),
        program=json.dumps(program.dump_state(), sort_keys=True, default=str),
        predictions=val.records,
        val_scores=val.scores,
        test_scores=test.scores,
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
            metric=metric,
            prompt_model=lms.teacher,
            task_model=lms.student,
            teacher_settings=teacher_settings,
            seed=trial.seed,
            num_threads=trial.num_threads,
            **bound.init,
        )
        return optimizer.compile(program, trainset=trainset, valset=valset, **bound.compile)
    optimizer = cls(
        metric=feedback_metric(metric),
        reflection_lm=lms.teacher,
        seed=trial.seed,
        num_threads=trial.num_threads,
        log_dir=str(workdir / "gepa"),
        **bound.init,
    )
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


class EndpointFailure(Exception):
    """Too many examples could not be scored because their LM calls failed (not wrong answers)."""


def lm_call_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the LM call failed, as opposed to the program or its answer."""
    from dspy.utils.exceptions import LMAuthError, LMRateLimitError, LMServerError, LMTimeoutError, LMTransportError

    from dspy_sweeps.lm.engine import BudgetSpent

    return (LMTransportError, LMRateLimitError, LMTimeoutError, LMServerError, LMAuthError, BudgetSpent)


@dataclass
class Evaluation:
    score: float  # mean metric over the examples that could be scored
    records: list[dict[str, Any]]
    failed: int  # examples whose LM calls failed: counted apart, never scored 0
    scores: list[float | None] = field(default_factory=list)  # per example, in order; None: not scored


def evaluate(program: Any, examples: list, metric: Callable, num_threads: int, max_failed: float = 0.1) -> Evaluation:
    """Score `program` on `examples`. An example whose LM call failed is not a wrong answer: it
    is counted apart, and past `max_failed` of them the trial fails with reason "endpoint"."""
    import dspy
    from dspy.utils.exceptions import AdapterParseError
    from dspy.utils.parallelizer import ParallelExecutor

    failures, bugs = lm_call_errors(), []

    failed_so_far: list[BaseException] = []
    give_up_after = max_failed * len(examples)

    def score(example: Any) -> tuple[Any, Any, float | None, BaseException | None] | None:
        if len(failed_so_far) > give_up_after:  # the endpoint is down: stop spending calls on it
            return example, None, None, failed_so_far[0]
        try:
            prediction = program(**example.inputs())
        except failures as exc:
            failed_so_far.append(exc)
            return example, None, None, exc
        except AdapterParseError:  # the model answered, badly: a wrong answer
            return example, dspy.Prediction(), 0.0, None
        except Exception as exc:  # the program's own bug fails the trial, it is not a score
            bugs.append(exc)
            return None
        return example, prediction, float(metric(example, prediction)), None

    # ParallelExecutor logs and swallows exceptions; `score` returns them so none is lost.
    executor = ParallelExecutor(num_threads=num_threads, max_errors=len(examples) + 1, disable_progress_bar=True)
    results = executor.execute(score, examples)
    if bugs:
        raise bugs[0]
    failed = [r for r in results if r[3] is not None]
    if len(failed) > max_failed * len(examples):
        cause = failed[0][3]
        raise EndpointFailure(
            f"endpoint: {len(failed)} of {len(examples)} examples could not be scored ({type(cause).__name__}: {cause})"
        )
    scored = [r for r in results if r[3] is None]
    records = [
        {
            "inputs": dict(example.inputs()),
            "prediction": dict(prediction.items()),
            "gold": {k: v for k, v in example.items() if k not in example.inputs().keys()},
            "score": value,
        }
        for example, prediction, value, _ in scored
    ]
    scores = [r[2] if r[3] is None else None for r in results]
    return Evaluation(sum(r["score"] for r in records) / max(len(records), 1), records, len(failed), scores)


def to_examples(rows: list[dict[str, Any]], inputs: tuple[str, ...]) -> list[Any]:
    import dspy

    return [dspy.Example(**row).with_inputs(*inputs) for row in rows]
