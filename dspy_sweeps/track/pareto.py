"""Score versus cost: the trials no other trial beats on both, and the plot that marks them.

A trial is on the Pareto front when no other finished trial has a validation score at least as
high for at most its cost, and is better on one of the two. The plot is what W&B and MLflow
show for a sweep (`pareto.png`); matplotlib draws it off-screen (Agg), on the driver.
"""

from __future__ import annotations

from typing import Any

from dspy_sweeps.track.results import TrialRecord


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    """The leaderboard's order: finished trials best first (val score, then fewer LM calls), failed last."""
    return sorted(records, key=lambda r: (r.status != "ok", -(r.val_score or 0.0), r.lm_calls, r.trial_id))


def pareto_front(records: list[TrialRecord]) -> set[str]:
    """Ids of the finished trials that no other finished trial dominates on (val score up, cost down)."""
    scored = [r for r in records if r.status == "ok" and r.val_score is not None]
    return {r.trial_id for r in scored if not any(_dominates(q, r) for q in scored if q.trial_id != r.trial_id)}


def _dominates(q: TrialRecord, r: TrialRecord) -> bool:
    assert q.val_score is not None and r.val_score is not None
    at_least = q.val_score >= r.val_score and q.cost_usd <= r.cost_usd
    return at_least and (q.val_score > r.val_score or q.cost_usd < r.cost_usd)


def pareto_figure(records: list[TrialRecord], title: str) -> Any:
    """A matplotlib figure: every finished trial by cost and val score, the front marked and joined."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a driver; also keeps a desktop backend from opening windows
    from matplotlib.figure import Figure

    front = pareto_front(records)
    scored = [r for r in records if r.status == "ok" and r.val_score is not None]
    on = sorted((r for r in scored if r.trial_id in front), key=lambda r: r.cost_usd)
    off = [r for r in scored if r.trial_id not in front]
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    axes = figure.subplots()
    axes.scatter([r.cost_usd for r in off], [r.val_score for r in off], color="0.6", label="dominated")
    axes.plot([r.cost_usd for r in on], [r.val_score for r in on], "o-", color="tab:red", label="Pareto front")
    for r in on:
        axes.annotate(r.trial_id, (r.cost_usd, r.val_score), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes.set_xlabel("cost $ (LM calls priced)")
    axes.set_ylabel("val score")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure
