"""What the trackers log about a trial and a sweep, the same in W&B and MLflow: a trial's settings
(config / params), its final figures, a history point per progress event, simulation flags and the
leaderboard rows."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dspy_sweeps.records import TrialEvent
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.track.pareto import pareto_front, ranked
from dspy_sweeps.track.results import TrialRecord

# A pruned trial did what the sweep asked (its status tag says it was pruned); failed and cut ones did not.
ENDED_WELL = ("ok", "pruned")
FIGURES = (
    "val_score",
    "test_score",
    "lm_calls",
    "calls_requested",
    "cache_hits",
    "merged_calls",
    "failed_calls",
    "failed_examples",
    "format_failures",
    "adapter_fallbacks",
    "teacher_retries",
    "teacher_as_text",
    "prompt_tokens",
    "completion_tokens",
    "latency_s",
    "cost_usd",
    "duration_s",
    "attempts",
    "retries",
    "gave_up",
    "fell_back",
)
# The x-axis of a trial's history in W&B (and MLflow's step): the LM calls it had spent at the event,
# not the event's bucketed step, which only the pruner needs; charts get a point per evaluation.
STEP = "calls"


def trial_config(trial: Trial, fingerprint: str) -> dict[str, Any]:
    """The settings that define a trial, flat, as W&B config and MLflow params; known at its start.
    Whether its models were simulated is known once its endpoints answered: see `simulation_flags`."""
    teacher = trial.teacher if trial.teacher and trial.kind != "none" else None
    return {
        "trial_id": trial.id,
        "optimizer": trial.kind,
        "seed": trial.seed,
        "student": trial.student.name,
        "teacher": teacher.name if teacher else "",
        "student_model": trial.student.model,
        "teacher_model": teacher.model if teacher else "",
        "program": trial.program,
        "metric": trial.metric,
        "data_fingerprint": fingerprint,
        **{f"settings.{k}": v for k, v in trial.settings.items()},
    }


def simulation_flags(record: TrialRecord) -> dict[str, bool]:
    """Whether a trial's scores are simulated (its student's, its teacher's), as W&B config."""
    return {
        "simulated": record.simulated,
        "student_simulated": record.student_simulated,
        "teacher_simulated": record.teacher_simulated,
    }


def simulation_tags(record: TrialRecord) -> dict[str, str]:
    """The same as MLflow tags (runs and registered versions)."""
    return {k: str(v).lower() for k, v in simulation_flags(record).items()}


def figures(record: TrialRecord) -> dict[str, float]:
    return {k: float(getattr(record, k)) for k in FIGURES if getattr(record, k) is not None}


def event_figures(event: TrialEvent) -> dict[str, float]:
    """One history point: the score of this evaluation under its phase (`val_score`, ...), and spend so far."""
    point = {
        "lm_calls": float(event.calls),
        "tokens": float(event.tokens),
        "cost_usd": event.cost_usd,
        "failed_calls": float(event.failed_calls),
        "elapsed_s": event.elapsed_s,
    }
    if event.score is not None:
        point[f"{event.phase}_score"] = event.score
    if event.best is not None:
        point["best_score"] = event.best
    return point


def final_step(steps: dict[str, int], trial_id: str, record: TrialRecord) -> int:
    """The end's point goes after the trial's last event, so the final figures are the latest values."""
    return max(steps.pop(trial_id, 0), record.calls_requested)


def leaderboard_rows(records: list[TrialRecord]) -> list[dict[str, Any]]:
    """The leaderboard as W&B and MLflow store it: ranked, with each trial's place on the Pareto front."""
    front = pareto_front(records)
    return [{"rank": i, **asdict(r), "on_front": r.trial_id in front} for i, r in enumerate(ranked(records), 1)]


LEADERBOARD_COLUMNS = (
    "rank",
    "trial_id",
    "kind",
    "student",
    "teacher",
    "seed",
    "status",
    "val_score",
    "test_score",
    "lm_calls",
    "cost_usd",
    "duration_s",
    "on_front",
)
