"""Run a prepared sweep: simulator (if any), Ray trials, results, tracking, promotion.

`run_sweep(prepared, state, address, console)` is what `sweep run` calls after the
preflight checks; every trial's record is written as soon as it finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dspy_sweeps.config import Sweep
from dspy_sweeps.data import Dataset
from dspy_sweeps.imports import restore_program
from dspy_sweeps.lms import check_endpoints, endpoint_for, resolve
from dspy_sweeps.preflight import Prepared
from dspy_sweeps.registry import Decision, best, promote
from dspy_sweeps.results import TrialRecord, write_records
from dspy_sweeps.state import State
from dspy_sweeps.tracking import Trackers, tracking_uri
from dspy_sweeps.trial import TrialResult


@dataclass(frozen=True)
class SweepOutcome:
    records: list[TrialRecord]
    decision: Decision | None


def run_sweep(prepared: Prepared, state: State, address: str | None, console: Console) -> SweepOutcome:
    from dspy_sweeps import runner

    sweep = prepared.sweep
    with simulator(sweep, prepared.data, state, console) as sim_url:
        check_endpoints([(role, resolve(s, sim_url)) for role, s in _roles(sweep)])
        endpoints = {s.model_dump_json(): endpoint_for(s, resolve(s, sim_url)) for _, s in _roles(sweep)}
        trackers = Trackers.open(sweep, state, prepared.data.fingerprint)
        records: list[TrialRecord] = []
        trials = {t.id: t for t in prepared.trials}
        with _progress(console, len(trials)) as progress:
            task = progress.add_task("trials", total=len(trials))

            def on_outcome(outcome: runner.Outcome) -> None:
                trial = trials[outcome.trial_id]
                result = _result(outcome)
                program_path = _save_program(state, sweep.name, trial.id, result)
                record = TrialRecord.of(sweep.name, trial, result, program_path, prepared.data.fingerprint)
                records.append(record)
                write_records(state.results(sweep.name), records)
                trackers.log_trial(trial, record, result)
                progress.advance(task)
                status = f"{record.val_score:.3f}" if record.status == "ok" else f"[red]{record.status}[/]: {record.error}"
                progress.console.print(f"  {trial.id}  val {status}")

            from dspy_sweeps.gateway import Budget
            from dspy_sweeps.worker import TrialContext, execute_trial

            runner.start_ray(address, Path.cwd())
            try:
                budget = Budget(sweep.budget.max_lm_calls, sweep.budget.max_usd)
                gateway = runner.start_gateway(list({e.id: e for e in endpoints.values()}.values()), state.cache, budget)
                endpoint_ids = {key: e.id for key, e in endpoints.items()}
                ctx = TrialContext(sweep.name, trials, prepared.data, gateway, endpoint_ids, str(state.root))
                runner.run_trials(
                    list(trials), execute_trial, ctx, name=sweep.name, storage=state.ray,
                    parallelism=sweep.parallelism, on_outcome=on_outcome,
                )  # fmt: skip
            finally:
                runner.stop_ray()
        decision = _promote(prepared, records, trackers, state, sim_url) if sweep.promote else None
        trackers.close("FINISHED" if any(r.status == "ok" for r in records) else "FAILED")
    return SweepOutcome(records, decision)


def _roles(sweep: Sweep) -> Iterator[tuple[str, object]]:
    yield from ((f"students.{i}", s) for i, s in enumerate(sweep.students))
    yield from ((f"teachers.{i}", s) for i, s in enumerate(sweep.teachers))


def _result(outcome) -> TrialResult:
    if outcome.error is not None:
        return TrialResult(trial_id=outcome.trial_id, status="failed", error=outcome.error)
    return TrialResult(**outcome.result)


def _save_program(state: State, sweep: str, trial_id: str, result: TrialResult) -> Path | None:
    if result.program is None:
        return None
    path = state.program(sweep, trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(result.program)
    os.replace(tmp, path)
    return path


def _promote(prepared: Prepared, records: list[TrialRecord], trackers: Trackers, state: State, sim_url: str | None) -> Decision:
    sweep = prepared.sweep
    winner = best(records)
    if winner is None:
        return Decision(False, "no trial finished, so there is nothing to promote")
    program = restore_program(sweep.program, Path(winner.program_path).read_text())
    student = resolve(next(s for s in sweep.students if s.model == winner.student), sim_url)

    def rescore(program_json: str) -> float:
        from dspy_sweeps.imports import load_object
        from dspy_sweeps.lms import build_lm
        from dspy_sweeps.trial import evaluate, to_examples

        champion = restore_program(sweep.program, program_json)
        champion.set_lm(build_lm(student))
        metric = load_object(sweep.metric, "metric")
        score, _ = evaluate(champion, to_examples(prepared.data.test, prepared.data.inputs), metric, sweep.num_threads)
        return score

    uri = tracking_uri(sweep.tracking.mlflow, state)
    return promote(sweep.promote, winner, trackers.mlflow.run_ids[winner.trial_id], program, uri, rescore)


@contextlib.contextmanager
def simulator(sweep: Sweep, data: Dataset, state: State, console: Console) -> Iterator[str | None]:
    """Start the simulated endpoint when the sweep names `sim/` models; its answer key is the sweep's data."""
    models = sorted({m.model.removeprefix("sim/") for m in sweep.models if m.simulated})
    if not models:
        yield None
        return
    from dspy_sweeps.sim.launch import SimServer

    workdir = state.sim / sweep.name
    key = write_answer_key(data, workdir / "answer_key.jsonl")
    spec = sweep.sim
    with SimServer(
        key, workdir, models=models, max_num_seqs=spec.max_num_seqs, ttft_ms=spec.ttft_ms,
        per_token_ms=spec.per_token_ms, time_scale=spec.time_scale,
    ) as sim:  # fmt: skip
        console.print(f"[yellow]SIMULATED[/] LM endpoint (test/demo double, not a real model) at {sim.base_url}")
        yield sim.base_url


def write_answer_key(data: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in data.rows:
            record = {
                "inputs": {k: str(row[k]) for k in data.inputs},
                "labels": {k: str(row[k]) for k in data.labels},
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _progress(console: Console, total: int) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )  # fmt: skip
