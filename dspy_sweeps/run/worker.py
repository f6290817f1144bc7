"""What a trial host runs: build the trial's LMs on the sweep's gateway, run it, add its accounting.

`warm` is what a host imports once before its first trial; `execute_trial` runs one trial on one
of the host's threads and turns the trial's evaluations into progress events for the driver.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspy_sweeps.data import Dataset
from dspy_sweeps.lm.engine import build_gateway_embedder, build_gateway_lm
from dspy_sweeps.run.events import Pruned
from dspy_sweeps.run.formats import FormatCounts
from dspy_sweeps.run.progress import TrialStream
from dspy_sweeps.run.storage import TrialFolder, pushing
from dspy_sweeps.run.trial import TrialLMs, TrialResult, format_fields, run_trial
from dspy_sweeps.spec.imports import load_object
from dspy_sweeps.spec.optimizers import optimizer_class
from dspy_sweeps.spec.plan import Trial


@dataclass(frozen=True)
class TrialContext:
    """Shared by every trial of a sweep; Ray puts it in the object store once."""

    sweep: str
    data: Dataset
    gateway: Any  # the sweep's `Gateway` handle (lm/gateway.py)
    endpoint_ids: dict[str, str]  # ModelSpec JSON -> gateway endpoint id
    storage: str  # the sweep's trial storage URI (run/storage.py), which every node reaches


def warm(program: str, metric: str, kinds: tuple[str, ...]) -> None:
    """Import DSPy, the sweep's optimizers, program and metric once, before a host's first trial."""
    import dspy  # noqa: F401  (most of a host's start-up; done before any trial waits on it)

    for kind in kinds:
        if kind != "none":
            optimizer_class(kind)
    load_object(program, "program")
    load_object(metric, "metric")


def execute_trial(trial: Trial, ctx: TrialContext, channel: Any) -> TrialResult:
    """Run one trial on a host's thread; `channel` carries its events to the driver (see hosts.py)."""
    import ray

    trial_id = trial.id
    if ctx.gateway.exhausted():
        return TrialResult(trial_id, "cut", error="not started: the sweep's budget is spent")
    student = _lm(ctx, trial.student, trial_id)
    teacher = _lm(ctx, trial.teacher, trial_id) if trial.teacher else student
    # The trial's folder from storage into a working folder on this node (GEPA resumes from it).
    folder = TrialFolder(ctx.storage, ctx.sweep, trial_id)
    workdir = folder.restore()
    # Which process runs the trial (machine, pid, Ray node address), for finding its logs or its host.
    (workdir / "host").write_text(f"{platform.node()} {os.getpid()} {ray.util.get_node_ip_address()}\n")
    attempt = folder.next_attempt()  # counted, and pushed with the host file, before the trial starts
    # The trial's spend and evaluations, as events through the host's channel (which raises Pruned
    # once the driver has stopped the trial; see run/progress.py for how that stops the optimizer);
    # after each, what changed in the trial's folder goes up to storage.
    events = TrialStream(trial_id, send=pushing(folder, channel.emit))
    formats = FormatCounts()  # kept here, so a trial that raises still reports its malformed answers
    try:
        lms = TrialLMs(student, teacher, _embedder(ctx, trial), priced(trial))
        result = run_trial(trial, ctx.data, lms, workdir, events, formats)
    except Exception as exc:
        log_failure(workdir / TRIAL_LOG, attempt, exc)
        result = failed(trial_id, exc, budget_spent=ctx.gateway.exhausted())
    folder.finish(result.program, result.val_scores, result.test_scores)
    stats = ctx.gateway.trial_stats(trial_id, done=True)
    return dataclasses.replace(with_spend(result, stats), attempts=attempt, **format_fields(formats))


TRIAL_LOG = "trial.log"  # in the trial's folder: the full text of what ended it (the record keeps one line)


def log_failure(path: Path, attempt: int, exc: BaseException) -> None:
    import traceback

    with path.open("a") as log:
        log.write(f"--- attempt {attempt}: {type(exc).__name__}\n")
        log.write("".join(traceback.format_exception(exc)))


def with_spend(result: TrialResult, stats: Any) -> TrialResult:
    """`result` with the trial's LM spend as the gateway counted it (its `CallStats`)."""
    return dataclasses.replace(
        result,
        lm_calls=stats.sent,
        calls_requested=stats.requested,
        cache_hits=stats.cache_hits,
        merged_calls=stats.merged,
        failed_calls=stats.failed,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        latency_s=round(stats.latency_s, 3),
        cost_usd=round(stats.cost_usd, 6),
        retries=stats.retries,
        gave_up=stats.gave_up,
        fell_back=stats.fell_back,
        calls_by_model=stats.by_model,
    )


def failed(trial_id: str, exc: BaseException, budget_spent: bool) -> TrialResult:
    """A trial that ended without scores and why: stopped by the sweep (pruned), the budget, a
    refused key, the endpoint, or the program itself."""
    from dspy import lm15
    from dspy.utils.exceptions import LMAuthError

    from dspy_sweeps.errors import first_line
    from dspy_sweeps.run.trial import EndpointFailure, lm_call_errors

    # One line for the leaderboard (an AdapterParseError's text is the whole malformed answer); the
    # full text is in the trial's log.
    message = f"{type(exc).__name__}: {first_line(exc)}"
    if isinstance(exc, Pruned):  # not a failure: the driver stopped a loser
        return TrialResult(trial_id, "pruned", reason="pruned")
    if budget_spent:
        return TrialResult(
            trial_id, "cut", error=f"stopped when the sweep's budget was spent ({type(exc).__name__})", reason="budget"
        )
    if isinstance(exc, (LMAuthError, lm15.AuthError)):
        return TrialResult(trial_id, "failed", error=str(exc).strip().splitlines()[0], reason="auth")
    if isinstance(exc, (EndpointFailure, *lm_call_errors())):
        return TrialResult(trial_id, "failed", error=message, reason="endpoint")
    return TrialResult(trial_id, "failed", error=message, reason="error")


def priced(trial: Trial) -> frozenset[str]:
    """The trial's cloud models that LiteLLM's map prices, priced by the trial as calls land (the
    gateway's count is the one records keep). Not self-hosted ones, nor a plugin's such as the
    simulator's, whose local endpoint is called by another name (`openai/...` at its URL). Decided
    once per trial: asked per call, LiteLLM imported itself on the first calls and, for a model it
    lacks, printed its provider list on every call (half a trial host's CPU in a cached re-run of
    the demo)."""
    from dspy_sweeps.lm.prices import typical_call_usd

    specs = [s for s in (trial.student, trial.teacher) if s is not None]
    return frozenset(s.model for s in specs if typical_call_usd(s))


def _embedder(ctx: TrialContext, trial: Trial) -> Any:
    if trial.embedder is None:
        return None
    return build_gateway_embedder(
        trial.embedder, ctx.gateway, ctx.endpoint_ids[trial.embedder.model_dump_json()], trial.id
    )


def _lm(ctx: TrialContext, spec: Any, trial_id: str) -> Any:
    chain = tuple(ctx.endpoint_ids[s.model_dump_json()] for s in (spec, *spec.fallbacks))
    return build_gateway_lm(spec, ctx.gateway, chain, trial_id)
