"""Rich tables for the terminal: the plan, the leaderboard, a job's progress, the promotion decision.

The running-trials table itself lives in `track/live.py`, beside the progress bar it is drawn above.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table

from dspy_sweeps.spec.preflight import Prepared
from dspy_sweeps.track.registry import Decision

if TYPE_CHECKING:
    from dspy_sweeps.track.live import Snapshot


def plan_table(prepared: Prepared) -> Table:
    """The trials with estimated calls and cost (every call priced at the dearer of the trial's
    student and teacher, for a typical call: an upper estimate, not a bill)."""
    from dspy_sweeps.lm.prices import typical_call_usd

    prices = {m.model_dump_json(): typical_call_usd(m) for m in prepared.sweep.models}
    table = Table(title=f"{prepared.sweep.name}: {len(prepared.trials)} trials")
    for column in ("trial", "optimizer", "student", "teacher", "seed", "est. LM calls", "est. $"):
        table.add_column(column, justify="right" if column.startswith(("seed", "est")) else "left")
    total: float | None = 0.0
    for t in prepared.trials:
        teacher = t.teacher.name if t.teacher and t.kind != "none" else "-"
        models = [t.student, t.teacher] if t.teacher and t.kind != "none" else [t.student]
        price = [prices[m.model_dump_json()] for m in models]
        usd = None if None in price else t.estimated_calls * max(price)
        total = None if usd is None or total is None else total + usd
        table.add_row(t.id, t.label, t.student.name, teacher, str(t.seed), f"{t.estimated_calls:,}", _usd(usd))
    if prepared.sweep.ensemble is not None:  # its calls are mostly served from the cache: an upper estimate
        spec = prepared.sweep.ensemble
        table.add_row(
            "ensemble",
            f"ensemble(top={spec.top}, reduce={spec.reduce})",
            "best",
            "-",
            "-",
            f"{prepared.ensemble_calls:,}",
            "?",
        )
    budget = prepared.sweep.budget
    table.caption = (
        f"about {prepared.estimated_calls:,} LM calls and {_usd(total)} in all "
        f"(budget: {budget.max_lm_calls or 'no'} calls, {_usd(budget.max_usd) if budget.max_usd else 'no'} $); "
        "self-hosted students cost their busy time, known after the run"
    )
    return table


def _usd(value: float | None) -> str:
    return "?" if value is None else f"${value:,.2f}"


def leaderboard_table(rows: list[dict[str, Any]], title: str = "leaderboard", confidence: float = 0.95) -> Table:
    """Trials best first, each beside its own student's baseline (uncompiled) score.

    The val score is in-sample: MIPROv2, GEPA and the random searches chose their programs by it,
    so its bootstrap interval says how noisy the figure is, not how the program will do. The gain
    over the baseline is therefore measured on the held-out test split (a paired bootstrap over the
    same test examples), as the promotion decision is. SIMULATED marks scores that came from the
    simulated endpoint."""
    from dspy_sweeps.track.gate import mean_interval, paired_gain

    baselines = {r["student"]: r for r in rows if r["kind"] == "none" and r["status"] == "ok"}
    ordered = sorted(rows, key=lambda r: (r["status"] != "ok", -(r["val_score"] or 0), r["lm_calls"]))
    caption = (
        f"val (in-sample: the split the optimizers tuned on): {confidence:.0%} bootstrap interval over its examples; "
        f"test gain: paired {confidence:.0%} bootstrap interval over the held-out test examples against the baseline"
    )
    table = Table(title=title, caption=caption)
    longest = max((len(r["trial_id"]) for r in rows), default=5)
    for column in (
        "#",
        "trial",
        "val (in-sample)",
        "test",
        "baseline test",
        "test gain",
        "scores",
        "calls sent/asked",
        "tokens",
        "cost $",
        "time s",
        "status",
    ):
        # A trial id is what `sweep pull`, the trial's folder and its runs are named by: never cut short.
        width = {"min_width": longest, "no_wrap": True} if column == "trial" else {}
        table.add_column(column, justify="left" if column in ("trial", "scores", "status") else "right", **width)
    for rank, r in enumerate(ordered, 1):
        base = baselines.get(r["student"])
        ok = r["status"] == "ok"
        val = mean_interval(r.get("val_scores") or [], confidence) if ok else None
        compiled = ok and base is not None and r["kind"] != "none"
        gain = paired_gain(r.get("test_scores") or [], base.get("test_scores") or [], confidence) if compiled else None
        table.add_row(
            str(rank),
            r["trial_id"],
            val.plain() if val else _score(r["val_score"]),
            _score(r["test_score"]),
            _score(base["test_score"] if base else None),
            _gain(r, base, gain),
            "[yellow]SIMULATED[/]" if _simulated(r) else "real",
            f"{r['lm_calls']:,}/{r['calls_requested']:,}",
            f"{(r['prompt_tokens'] or 0) + (r['completion_tokens'] or 0):,}",
            f"{r['cost_usd']:.4f}",
            f"{r['duration_s']:.1f}",
            "ok" if ok else f"[red]{r['status']}[/]: {r['error']}",
        )
    return table


def progress_view(snapshot: Snapshot, running: bool, now: float | None = None) -> RenderableType:
    """`sweep status`: trials done, and while the job runs, the running trials as its driver last printed them."""
    from dspy_sweeps.track.live import running_table

    age = max(0.0, (now or time.time()) - snapshot.at)
    line = f"trials: {snapshot.done}/{snapshot.total} done (as of {age:.0f}s ago)"
    if not running or not snapshot.running:
        return line
    return Group(line, running_table(snapshot.running))


def _simulated(row: dict[str, Any]) -> bool:
    """Rows from before the flags were kept: a student model whose local endpoint plugin declares its
    answers simulated (`sim/...`) says so."""
    from dspy_sweeps.lm.endpoints import simulated
    from dspy_sweeps.spec.schema import ModelSpec

    if row.get("student_simulated") or row.get("teacher_simulated"):
        return True
    return simulated(ModelSpec(name="student", model=str(row.get("student_model") or row["student"])))


def _gain(row: dict[str, Any], base: dict[str, Any] | None, gain: Any) -> str:
    if gain is not None:
        return gain.signed()
    if (
        row["status"] != "ok"
        or base is None
        or row["kind"] == "none"
        or None in (row["test_score"], base["test_score"])
    ):
        return "-"
    return f"{row['test_score'] - base['test_score']:+.3f}"  # no per-example scores (an older record)


def decision_line(decision: Decision) -> str:
    simulated = " ([yellow]SIMULATED[/] scores)" if decision.simulated else ""
    if decision.promoted:
        return f"[green]promoted[/] v{decision.version} as @{decision.alias}{simulated}: {decision.reason}"
    return f"[yellow]not promoted[/]{simulated}: {decision.reason}"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
