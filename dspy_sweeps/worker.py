"""What a Ray trial actor runs: build the trial's LMs, point DSPy's cache at the state dir, run it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dspy_sweeps.data import Dataset
from dspy_sweeps.lms import build_lm, resolve
from dspy_sweeps.plan import Trial
from dspy_sweeps.state import State
from dspy_sweeps.trial import TrialLMs, run_trial


@dataclass(frozen=True)
class TrialContext:
    """Shared by every trial of a sweep; Ray puts it in the object store once."""

    sweep: str
    trials: dict[str, Trial]
    data: Dataset
    sim_url: str | None
    state_root: str


def execute_trial(trial_id: str, ctx: TrialContext) -> dict[str, Any]:
    import dspy

    state = State(Path(ctx.state_root))
    # The LM cache is shared by all trials and kept across runs: a re-run pays only for new calls.
    dspy.configure_cache(disk_cache_dir=str(state.cache))
    trial = ctx.trials[trial_id]
    student = build_lm(resolve(trial.student, ctx.sim_url))
    teacher = build_lm(resolve(trial.teacher, ctx.sim_url)) if trial.teacher else student
    workdir = state.trial_dir(ctx.sweep, trial_id)
    workdir.mkdir(parents=True, exist_ok=True)
    return asdict(run_trial(trial, ctx.data, TrialLMs(student, teacher), workdir))
