"""One trial: compile the program with one optimizer, score it on val and test.

`run_trial(trial, data, lms, workdir, events)` is a plain function a trial host imports; it knows
DSPy, not Ray. It raises on failure, so the caller records the reason instead of a score of 0.
LM accounting (calls, tokens, cost) is the gateway's, filled in by the worker.

While it runs, every evaluation (the optimizer's and the platform's val and test) is reported
to `events` with the trial's spend so far (see `run/progress.py`). A trial the driver prunes
stops within one evaluation and comes back "pruned", with the best program its optimizer had
scored on the validation split (never one scored on train) and that score as its val score (no test score: scoring a
loser on test would spend what pruning saved).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspy_sweeps.data import Dataset
from dspy_sweeps.records import ExampleTrace, TrialResult
from dspy_sweeps.run.events import NoEvents, TrialEvents
from dspy_sweeps.run.formats import FormatCounts, SweepStop, format_adapter
from dspy_sweeps.run.optimize import Supplies, compile_with
from dspy_sweeps.spec.imports import build_program, load_object
from dspy_sweeps.spec.kinds import BASELINE
from dspy_sweeps.spec.plan import Trial


@dataclass(frozen=True)
class TrialLMs:
    student: Any
    teacher: Any
    embedder: Any = None  # a dspy.Embedder on the sweep's embedder model, for kinds that take one
    priced: frozenset[str] = frozenset()  # the models whose calls are priced from LiteLLM's map as they land


def run_trial(
    trial: Trial,
    data: Dataset,
    lms: TrialLMs,
    workdir: Path,
    events: TrialEvents | None = None,
    formats: FormatCounts | None = None,
) -> TrialResult:
    """`formats` collects the trial's malformed answers (the caller keeps it, so a trial that raises
    still has its counts); see run/formats.py."""
    import dspy

    from dspy_sweeps.run.progress import (
        TRIAL_KEY,
        Candidate,
        Splits,
        Stopped,
        TrialProgress,
        TrialStream,
        hook_evaluate,
        state_of,
    )

    start = time.monotonic()
    # No events (None): no hooks in DSPy at all, the baseline the events' overhead is measured from.
    hooked = events is not None
    events = events or NoEvents()
    # A TrialStream carries the spend its events report; other sinks (NoEvents) get a meter of their own.
    spend = events.spend if isinstance(events, TrialStream) else TrialStream(trial.id, lambda e: None).spend
    metric = load_object(trial.metric, "metric")
    trainset, valset, testset = (to_examples(rows, data.inputs) for rows in (data.train, data.val, data.test))
    progress = TrialProgress(events, spend, Splits.of(trainset, valset), lms.priced)
    tolerate_concurrent_progress_bars()
    if hooked:
        hook_evaluate()
    hooks = {"usage_tracker": progress, TRIAL_KEY: progress} if hooked else {}
    formats = formats if formats is not None else FormatCounts()
    program = build_program(trial.program)
    outputs = frozenset(name for p in program.predictors() for name in p.signature.output_fields)
    adapter = format_adapter(formats, outputs if lms.teacher is not lms.student else None)
    # A malformed answer is an exception inside DSPy's evaluations: with DSPy's default limit (10 per
    # evaluation) a small model's wrong format would cancel an optimizer's whole evaluation. Failed
    # LM calls are bounded by the gateway's retries and the trial's own evaluation (`evaluate`).
    max_errors = len(trainset) + len(valset) + len(testset) + 1
    # DSPy's history is off, and its trace is the trial's own: a host would otherwise keep up to 10,000
    # entries per LM and module, and 10,000 predictions (with their inputs and predictors) in the
    # process-wide trace, holding finished trials' programs after they end.
    with dspy.context(lm=lms.student, adapter=adapter, max_errors=max_errors, disable_history=True, trace=[], **hooks):
        try:
            program = compile_program(trial, program, metric, lms, trainset, valset, workdir, progress.guard)
        except Stopped:
            return _pruned(trial, progress, progress.best, start)
        except SweepStop as stop:  # a refused key or the spent budget, through the optimizer's handlers
            raise stop.cause from None
        val = evaluate(program, valset, metric, trial.num_threads)
        progress.report("val", val.score)
        if progress.pruned is not None:  # pruned on its final val score: the compiled program is its best
            return _pruned(trial, progress, Candidate(val.score, state_of(program)), start)
        test = evaluate(program, testset, metric, trial.num_threads, trace=trial.trace_examples, priced=lms.priced)
        progress.report("test", test.score)  # the trial is done: a prune now has nothing left to stop
    return TrialResult(
        trial_id=trial.id,
        status="ok",
        val_score=val.score,
        test_score=test.score,
        failed_examples=val.failed + test.failed,
        **format_fields(formats),
        duration_s=round(time.monotonic() - start, 3),
        program=state_of(program),
        predictions=val.records,
        val_scores=val.scores,
        test_scores=test.scores,
        test_traces=test.traces,
    )


def format_fields(formats: FormatCounts) -> dict[str, int]:
    """A trial result's format counts."""
    return {
        "format_failures": formats.failures,
        "adapter_fallbacks": formats.fallback_calls,
        "teacher_retries": formats.teacher_retries,
        "teacher_as_text": formats.teacher_as_text,
    }


def _pruned(trial: Trial, progress: Any, best: Any, start: float) -> TrialResult:
    """A pruned trial keeps the best candidate scored on the val split so far, if any."""
    return TrialResult(
        trial_id=trial.id,
        status="pruned",
        error=str(progress.pruned) if progress.pruned else "pruned",
        reason="pruned",
        val_score=best.score if best else None,
        duration_s=round(time.monotonic() - start, 3),
        program=best.program if best else None,
    )


_bars_lock = threading.Lock()


class _BarInstances(weakref.WeakSet):
    """tqdm's registry of live bars, whose `remove` forgives a bar already gone."""

    def remove(self, item: Any) -> None:
        self.discard(item)


def tolerate_concurrent_progress_bars() -> None:
    """Every DSPy evaluation makes a tqdm bar (disabled ones too), and a host runs many trials on
    threads: under that, a disabled bar's own `_instances.remove(self)` (tqdm 4.70) raises
    KeyError now and then (12 threads each running 300 `ParallelExecutor`s met 1 to 9 of them per
    run; one cost a sweep's trial), which ended the trial. tqdm's other removal already ignores it;
    this makes them alike, once per process."""
    import tqdm

    with _bars_lock:
        if not isinstance(tqdm.tqdm._instances, _BarInstances):
            tqdm.tqdm._instances = _BarInstances(tqdm.tqdm._instances)


def compile_program(
    trial: Trial,
    program: Any,
    metric: Callable,
    lms: TrialLMs,
    trainset: list,
    valset: list,
    workdir: Path,
    guard: Callable[[Callable], Callable] = lambda metric: metric,
) -> Any:
    """Compile with the trial's optimizer; the table of roles (spec/kinds.py) says who gets what."""
    if trial.kind == BASELINE:
        return program
    supplies = Supplies(
        metric=guard(metric),
        metric_path=trial.metric,
        student=lms.student,
        teacher=lms.teacher,
        trainset=trainset,
        valset=valset,
        seed=trial.seed,
        threads=trial.num_threads,
        log_dir=workdir,
        embedder=lms.embedder,
    )
    return compile_with(trial.kind, trial.settings, program, supplies)


class EndpointFailure(Exception):
    """Too many examples could not be scored because their LM calls failed (not wrong answers)."""


def lm_call_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the LM call failed, as opposed to the program or its answer. A request the
    server refuses (HTTP 400, e.g. a prompt over a llama.cpp slot's context) is one: counted per
    call, never retried (the gateway passes a 400 straight on)."""
    from dspy.utils.exceptions import (
        LMAuthError,
        LMInvalidRequestError,
        LMRateLimitError,
        LMServerError,
        LMTimeoutError,
        LMTransportError,
    )

    from dspy_sweeps.errors import BudgetSpent

    return (
        LMTransportError,
        LMRateLimitError,
        LMTimeoutError,
        LMServerError,
        LMAuthError,
        LMInvalidRequestError,
        BudgetSpent,
    )


@dataclass
class Evaluation:
    score: float  # mean metric over the examples that could be scored
    records: list[dict[str, Any]]
    failed: int  # examples whose LM calls failed: counted apart, never scored 0
    scores: list[float | None] = field(default_factory=list)  # per example, in order; None: not scored
    traces: list[ExampleTrace] = field(default_factory=list)


def evaluate(
    program: Any,
    examples: list,
    metric: Callable,
    num_threads: int,
    max_failed: float = 0.1,
    trace: int = 0,
    priced: frozenset[str] = frozenset(),
) -> Evaluation:
    """Score `program` on `examples`. An example whose LM call failed is not a wrong answer: it
    is counted apart, and past `max_failed` of them the trial fails with reason "endpoint".
    The first `trace` examples are recorded with their LM calls (`records.py`)."""
    import dspy
    from dspy.utils.exceptions import AdapterParseError
    from dspy.utils.parallelizer import ParallelExecutor

    failures, bugs = lm_call_errors(), []

    failed_so_far: list[BaseException] = []
    give_up_after = max_failed * len(examples)
    traced = {id(e): i for i, e in enumerate(examples[:trace])}
    traces: list[ExampleTrace] = []

    def score(example: Any) -> tuple[Any, Any, float | None, BaseException | None] | None:
        if id(example) not in traced:
            return scored_one(example)
        return recorded_one(example, traced[id(example)])

    def recorded_one(example: Any, index: int) -> tuple[Any, Any, float | None, BaseException | None] | None:
        from dspy_sweeps.run.recorder import ExampleRecorder, recorded

        recorder, start = ExampleRecorder(dspy.settings.usage_tracker, priced), time.time_ns()
        outcome = recorded(lambda: scored_one(example), recorder)
        prediction, value, exc = (outcome[1], outcome[2], outcome[3]) if outcome else (None, None, None)
        gold = {k: v for k, v in example.items() if k not in example.inputs().keys()}
        error = f"{type(exc).__name__}: {exc}" if exc is not None else None
        traces.append(
            ExampleTrace(
                index,
                dict(example.inputs()),
                dict(prediction.items()) if prediction is not None else None,
                gold,
                value,
                error,
                start,
                time.time_ns(),
                recorder.calls,
            )
        )
        return outcome

    def scored_one(example: Any) -> tuple[Any, Any, float | None, BaseException | None] | None:
        if len(failed_so_far) > give_up_after:  # the endpoint is down: stop spending calls on it
            return example, None, None, failed_so_far[0]
        try:
            try:
                prediction = program(**example.inputs())
            except SweepStop as stop:  # in the trial's own scoring, a failed call like the others
                raise stop.cause from None
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
    mean = sum(r["score"] for r in records) / max(len(records), 1)
    return Evaluation(mean, records, len(failed), scores, sorted(traces, key=lambda t: t.index))


def to_examples(rows: list[dict[str, Any]], inputs: tuple[str, ...]) -> list[Any]:
    import dspy

    return [dspy.Example(**row).with_inputs(*inputs) for row in rows]
