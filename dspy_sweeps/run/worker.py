"""What a Ray trial actor runs: build the trial's LMs on the sweep's gateway, run it, add its accounting."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dspy_sweeps.data import Dataset
from dspy_sweeps.lm.engine import build_gateway_embedder, build_gateway_lm
from dspy_sweeps.run.trial import TrialLMs, TrialResult, run_trial
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.state import State


@dataclass(frozen=True)
class TrialContext:
    """Shared by every trial of a sweep; Ray puts it in the object store once."""

    sweep: str
    trials: dict[str, Trial]
    data: Dataset
    gateway: Any  # the gateway actor's handle
    endpoint_ids: dict[str, str]  # ModelSpec JSON -> gateway endpoint id
    state_root: str


def execute_trial(trial_id: str, ctx: TrialContext) -> dict[str, Any]:
    import ray

    trial = ctx.trials[trial_id]
    if ray.get(ctx.gateway.exhausted.remote()):
        return asdict(TrialResult(trial_id, "cut", error="not started: the sweep's budget is spent"))
    student = _lm(ctx, trial.student, trial_id)
    teacher = _lm(ctx, trial.teacher, trial_id) if trial.teacher else student
    workdir = State(Path(ctx.state_root)).trial_dir(ctx.sweep, trial_id)
    workdir.mkdir(parents=True, exist_ok=True)
    attempt = _next_attempt(workdir)
    try:
        result = run_trial(trial, ctx.data, TrialLMs(student, teacher, _embedder(ctx, trial)), workdir)
    except Exception as exc:
        result = failed(trial_id, exc, budget_spent=ray.get(ctx.gateway.exhausted.remote()))
    stats = ray.get(ctx.gateway.trial_stats.remote(trial_id))
    return asdict(
        dataclasses.replace(
            result,
            attempts=attempt,
            lm_calls=stats.sent,
            calls_requested=stats.requested,
            cache_hits=stats.cache_hits,
            merged_calls=stats.merged,
            failed_calls=stats.failed,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            latency_s=round(stats.latency_s, 3),
            cost_usd=round(stats.cost_usd, 6),
        )
    )


def _next_attempt(workdir: Path) -> int:
    """Which run of this trial this is. A trial retried after its worker died (or resumed after the
    driver died) finds its folder used; GEPA, whose log_dir is in it, resumes from its saved state."""
    counter = workdir / "attempts"
    attempt = int(counter.read_text().strip() or 0) + 1 if counter.is_file() else 1
    counter.write_text(str(attempt))
    return attempt


def failed(trial_id: str, exc: BaseException, budget_spent: bool) -> TrialResult:
    """A failed trial and why: the budget, a refused key, the endpoint, or the program itself."""
    from dspy import lm15
    from dspy.utils.exceptions import LMAuthError

    from dspy_sweeps.run.trial import EndpointFailure, lm_call_errors

    message = f"{type(exc).__name__}: {exc}"[:1000]
    if budget_spent:
        return TrialResult(
            trial_id, "cut", error=f"stopped when the sweep's budget was spent ({type(exc).__name__})", reason="budget"
        )
    if isinstance(exc, (LMAuthError, lm15.AuthError)):
        return TrialResult(trial_id, "failed", error=str(exc).strip().splitlines()[0], reason="auth")
    if isinstance(exc, (EndpointFailure, *lm_call_errors())):
        return TrialResult(trial_id, "failed", error=message, reason="endpoint")
    return TrialResult(trial_id, "failed", error=message, reason="error")


def _embedder(ctx: TrialContext, trial: Trial) -> Any:
    if trial.embedder is None:
        return None
    return build_gateway_embedder(
        trial.embedder, ctx.gateway, ctx.endpoint_ids[trial.embedder.model_dump_json()], trial.id
    )


def _lm(ctx: TrialContext, spec: Any, trial_id: str) -> Any:
    return build_gateway_lm(spec, ctx.gateway, ctx.endpoint_ids[spec.model_dump_json()], trial_id)
