"""The Ensemble trial: after the others, the `ensemble.top` best compiled programs combined by DSPy's Ensemble.

`ensemble_trial(prepared, records)` picks the best finished programs (of the best trial's
student, so the ensemble runs on one model); `run_ensemble(prepared, trial, members, gateway,
chain)` rebuilds them from their saved JSON states, combines them with
`dspy.Ensemble(reduce_fn=dspy.majority)` and scores the result on val and test like any trial,
with its LM calls through the sweep's gateway (its cache, its one budget, its accounting). The result is saved, tracked and promoted like any trial's; its
program is saved as its members' JSON states (spec/composite.py), never pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.preflight import Prepared
from dspy_sweeps.spec.schema import ModelSpec
from dspy_sweeps.track.results import TrialRecord

KIND = "ensemble"


def ensemble_trial(prepared: Prepared, records: list[TrialRecord]) -> tuple[Trial, list[TrialRecord]] | None:
    """The ensemble's trial and its members, or None if fewer than two compiled programs finished."""
    sweep, spec = prepared.sweep, prepared.sweep.ensemble
    finished = [r for r in records if r.status == "ok" and r.kind not in ("none", KIND) and r.program_path]
    if spec is None or not finished:
        return None
    ranked = sorted(finished, key=lambda r: (-(r.val_score or 0.0), r.lm_calls, r.trial_id))
    members = [r for r in ranked if r.student == ranked[0].student][: spec.top]
    if len(members) < 2:
        return None
    trials = {t.id: t for t in prepared.trials}
    student = trials[members[0].trial_id].student
    ids = [m.trial_id for m in members]
    digest = hashlib.sha256(" ".join(ids).encode()).hexdigest()[:10]
    settings = {"top": spec.top, "reduce": spec.reduce, "members": ids}
    estimate = len(members) * (len(prepared.data.val) + len(prepared.data.test)) * _predictors(prepared)
    trial = Trial(
        id=f"{KIND}-{student.name}-top{len(members)}-{digest}",
        program=sweep.program,
        metric=sweep.metric,
        kind=KIND,
        student=student,
        teacher=None,
        seed=sweep.seeds[0],
        settings=settings,
        num_threads=sweep.num_threads,
        estimated_calls=estimate,
        embedder=sweep.embedder,
    )
    return trial, members


def run_ensemble(
    prepared: Prepared,
    trial: Trial,
    members: list[TrialRecord],
    gateway: Any,
    chain: Callable[[ModelSpec], tuple[str, ...]],
) -> TrialResult:
    """Build the ensemble from its members' saved programs and score it; failures are its result, not
    the sweep's. `gateway` is the sweep's gateway actor, `chain` the gateway endpoints of a model."""
    from dspy_sweeps.run.worker import failed

    start = time.monotonic()
    try:
        result = _score(prepared, trial, members, gateway, chain)
    except Exception as exc:
        result = failed(trial.id, exc, budget_spent=gateway.exhausted())
    return _accounted(result, gateway, trial.id, time.monotonic() - start)


def _score(
    prepared: Prepared,
    trial: Trial,
    members: list[TrialRecord],
    gateway: Any,
    chain: Callable[[ModelSpec], tuple[str, ...]],
) -> TrialResult:
    import json

    import dspy

    from dspy_sweeps.lm.engine import build_gateway_embedder, build_gateway_lm
    from dspy_sweeps.run.trial import evaluate, to_examples
    from dspy_sweeps.spec.composite import EnsembleProgram
    from dspy_sweeps.spec.imports import load_object, restore_program

    student = build_gateway_lm(trial.student, gateway, chain(trial.student), trial.id)
    embedder = None
    if trial.embedder is not None:
        embedder = build_gateway_embedder(trial.embedder, gateway, chain(trial.embedder)[0], trial.id)
    programs = [restore_program(trial.program, Path(m.program_path).read_text(), embedder) for m in members]
    program = EnsembleProgram(programs, trial.settings["reduce"])
    metric, data = load_object(trial.metric, "metric"), prepared.data
    with dspy.context(lm=student, trace=[]):  # its own trace, as a trial's (run/trial.py)
        val = evaluate(program, to_examples(data.val, data.inputs), metric, trial.num_threads)
        test = evaluate(program, to_examples(data.test, data.inputs), metric, trial.num_threads)
    return TrialResult(
        trial_id=trial.id,
        status="ok",
        val_score=val.score,
        test_score=test.score,
        failed_examples=val.failed + test.failed,
        program=json.dumps(program.dump_state(), sort_keys=True, default=str),
        predictions=val.records,
    )


def _accounted(result: TrialResult, gateway: Any, trial_id: str, seconds: float) -> TrialResult:
    from dspy_sweeps.run.worker import with_spend

    stats = gateway.trial_stats(trial_id, done=True)
    return dataclasses.replace(with_spend(result, stats), duration_s=round(seconds, 3))


def _predictors(prepared: Prepared) -> int:
    from dspy_sweeps.spec.imports import build_program

    return len(build_program(prepared.sweep.program).predictors())
