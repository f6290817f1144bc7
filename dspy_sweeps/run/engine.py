"""Run a prepared sweep: simulator and served students (if any), Ray trials, results, tracking, promotion.

`run_sweep(prepared, state, address, console)` is what `sweep run` calls after the
preflight checks; every trial's record is written as soon as it finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dspy_sweeps.data import Dataset
from dspy_sweeps.errors import SweepError, first_line
from dspy_sweeps.lm.build import endpoint_for, resolve
from dspy_sweeps.lm.checks import check_endpoints, is_simulated, served_models
from dspy_sweeps.lm.served import served_students
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.imports import restore_program
from dspy_sweeps.spec.preflight import Prepared
from dspy_sweeps.spec.schema import ModelSpec, Sweep
from dspy_sweeps.state import State
from dspy_sweeps.track.registry import Decision, best, promote
from dspy_sweeps.track.results import TrialRecord, read_records, write_records
from dspy_sweeps.track.tracking import Trackers, check_mlflow_server, check_tracking_for_cluster, tracking_uri


@dataclass(frozen=True)
class SweepOutcome:
    records: list[TrialRecord]
    decision: Decision | None


def run_sweep(
    prepared: Prepared, state: State, address: str | None, console: Console, resume: bool = False
) -> SweepOutcome:
    """Start what the sweep needs, run its trials, promote the winner, and stop everything again.

    Order: simulator, Ray, served students (their replicas are Ray actors), endpoint checks,
    trials, promotion (which re-scores on the student, so the replicas are still up); then, each
    in a `finally`, the replicas stop, Ray stops, the simulator stops.
    """
    sweep = prepared.sweep
    if sweep.tracking.mlflow is not None:
        check_mlflow_server(tracking_uri(sweep.tracking.mlflow, state))
    key = _answer_key(prepared, state)
    with simulator(sweep, key, state, console) as sim_url, ThreadPoolExecutor(1) as background:
        # Outside endpoints first: a typo in an api_base costs seconds, not a Ray start-up.
        check_endpoints([(role, resolve(s, sim_url)) for role, s in _roles(sweep) if s.serve is None])
        # Importing MLflow and creating its store takes seconds: done while Ray starts.
        opening = background.submit(Trackers.open, sweep, state, prepared.data.fingerprint, resume)
        with _ray(sweep, state, address), served_students(sweep, state, key, console) as served:
            specs = {s.model_dump_json(): s for _, s in _roles(sweep)}  # the key trials know their LMs by
            resolved = {k: _resolve(s, sim_url, served) for k, s in specs.items()}
            _check_served(sweep, resolved)
            endpoints = {k: endpoint_for(s, resolved[k]) for k, s in specs.items()}
            simulated = {k: is_simulated(s, resolved[k]) for k, s in specs.items()}
            trackers = opening.result()
            records = _run_trials(prepared, state, endpoints, trackers, console, resume, simulated)
            decision = _promote(prepared, records, trackers, state, resolved) if sweep.promote else None
            trackers.close("FINISHED" if any(r.status == "ok" for r in records) else "FAILED")
    return SweepOutcome(records, decision)


@contextlib.contextmanager
def _ray(sweep: Sweep, state: State, address: str | None) -> Iterator[None]:
    from dspy_sweeps.run import runner

    runner.start_ray(address, Path.cwd())
    try:
        check_tracking_for_cluster(tracking_uri(sweep.tracking.mlflow, state))
        yield
    finally:
        runner.stop_ray()


def _resolve(spec: ModelSpec, sim_url: str | None, served: dict[str, list[str]]) -> ModelSpec:
    """The spec as it is called: a simulated model at the simulator, a served student at its replicas."""
    if spec.serve is not None:
        return spec.model_copy(update={"api_base": list(served[spec.name]), "serve": None})
    return resolve(spec, sim_url)


def _check_served(sweep: Sweep, resolved: dict[str, ModelSpec]) -> None:
    """Each replica answers GET /models and serves the name requests will use (`serve.model`)."""
    for i, student in enumerate(sweep.students):
        if student.serve is None:
            continue
        for base in resolved[student.model_dump_json()].api_bases:
            models = served_models(base, f"students.{i} ({student.name})")
            if models and student.serve.model not in models:
                raise SweepError(
                    f"students.{i}.serve: the server at {base} serves {sorted(models)}, not {student.serve.model!r}, "
                    "the name requests use (drop --served-model-name from args, or serve that name)"
                )


def _run_trials(
    prepared: Prepared,
    state: State,
    endpoints: dict[str, Any],
    trackers: Trackers,
    console: Console,
    resume: bool,
    simulated: dict[str, bool],
) -> list[TrialRecord]:
    """Every trial on Ray, all LM calls through one gateway; each record is saved and tracked as it lands.
    `simulated` says, by spec, which models answer from the simulator (their records say so)."""
    from dspy_sweeps.lm.gateway import Budget
    from dspy_sweeps.run import runner
    from dspy_sweeps.run.worker import TrialContext, execute_trial

    sweep, trials = prepared.sweep, {t.id: t for t in prepared.trials}
    records = _finished(state, prepared) if resume else []
    pending = [trial_id for trial_id in trials if trial_id not in {r.trial_id for r in records}]
    budget = Budget(sweep.budget.max_lm_calls, sweep.budget.max_usd)
    gateway = runner.start_gateway(list({e.id: e for e in endpoints.values()}.values()), state.cache, budget)
    endpoint_ids = {key: e.id for key, e in endpoints.items()}
    ctx = TrialContext(sweep.name, trials, prepared.data, gateway, endpoint_ids, str(state.root))
    with _progress(console, len(trials)) as progress:
        task = progress.add_task("trials", total=len(trials), completed=len(records))
        if records:
            progress.console.print(f"  resuming: {len(records)} finished trials kept, {len(pending)} to run")

        def on_outcome(outcome: runner.Outcome) -> None:
            trial, result = trials[outcome.trial_id], _result(outcome)
            program_path = _save_program(state, sweep.name, trial.id, result)
            record = TrialRecord.of(sweep.name, trial, result, program_path, prepared.data.fingerprint, simulated)
            records.append(record)
            write_records(state.results(sweep.name), records)  # saved before tracking, which may fail
            try:
                run_id = trackers.log_trial(trial, record, result)
            except Exception as exc:
                raise SweepError(
                    f"tracking failed for trial {trial.id} ({type(exc).__name__}: {first_line(exc)}); "
                    f"finished trials are saved in {state.results(sweep.name)}: fix it, then --resume"
                ) from None
            records[-1] = dataclasses.replace(record, mlflow_run_id=run_id, tracked=True)
            write_records(state.results(sweep.name), records)
            progress.advance(task)
            status = f"{record.val_score:.3f}" if record.status == "ok" else f"[red]{record.status}[/]: {record.error}"
            status += " [yellow]SIMULATED[/]" if record.simulated and record.status == "ok" else ""
            progress.console.print(f"  {trial.id}  val {status}")
            if record.reason == "auth":  # a refused key fails every trial that uses it: stop now
                raise SweepError(
                    f"{record.error}; sweep stopped (finished trials are kept: fix the key, then --resume)"
                )

        if pending:
            runner.run_trials(
                pending,
                execute_trial,
                ctx,
                name=sweep.name,
                storage=state.ray,
                parallelism=sweep.parallelism,
                on_outcome=on_outcome,
            )
    return records


def _finished(state: State, prepared: Prepared) -> list[TrialRecord]:
    """For --resume: the trials of this plan that already finished on the same data."""
    planned = {t.id for t in prepared.trials}
    return [
        r
        for r in read_records(state.results(prepared.sweep.name))
        if r.status == "ok" and r.tracked and r.trial_id in planned and r.data_fingerprint == prepared.data.fingerprint
    ]


def _roles(sweep: Sweep) -> Iterator[tuple[str, ModelSpec]]:
    yield from ((f"students.{i}", s) for i, s in enumerate(sweep.students))
    yield from ((f"teachers.{i}", s) for i, s in enumerate(sweep.teachers))


def _result(outcome) -> TrialResult:
    if outcome.error is not None:
        return TrialResult(trial_id=outcome.trial_id, status="failed", error=outcome.error, reason="error")
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


def _promote(
    prepared: Prepared, records: list[TrialRecord], trackers: Trackers, state: State, resolved: dict[str, ModelSpec]
) -> Decision:
    sweep = prepared.sweep
    winner = best(records)
    if winner is None:
        return Decision(False, "no trial finished, so there is nothing to promote")
    program = restore_program(sweep.program, Path(winner.program_path).read_text())
    # The winner's own student, by name (a record resumed from before names were kept holds the model string).
    student = resolved[next(s for s in sweep.students if winner.student in (s.name, s.model)).model_dump_json()]

    def rescore(program_json: str) -> list[float | None]:
        from dspy_sweeps.lm.build import build_lm
        from dspy_sweeps.run.trial import evaluate, to_examples
        from dspy_sweeps.spec.imports import load_object

        champion = restore_program(sweep.program, program_json)
        champion.set_lm(build_lm(student))
        metric = load_object(sweep.metric, "metric")
        return evaluate(
            champion, to_examples(prepared.data.test, prepared.data.inputs), metric, sweep.num_threads
        ).scores

    uri = tracking_uri(sweep.tracking.mlflow, state)
    return promote(sweep.promote, winner, winner.mlflow_run_id, program, uri, rescore)


def _answer_key(prepared: Prepared, state: State) -> Path | None:
    """The simulated endpoint's answer key (the sweep's own data), if a simulated model or a
    served student on the `sim` engine needs one; no other engine is ever given it."""
    sweep = prepared.sweep
    if not any(m.simulated for m in sweep.models) and not any(s.serve.engine == "sim" for s in sweep.served if s.serve):
        return None
    return write_answer_key(prepared.data, state.sim / sweep.name / "answer_key.jsonl")


@contextlib.contextmanager
def simulator(sweep: Sweep, key: Path | None, state: State, console: Console) -> Iterator[str | None]:
    """Start the simulated endpoint when the sweep names `sim/` models; `key` is the sweep's answer key."""
    models = sorted({m.model.removeprefix("sim/") for m in sweep.models if m.simulated})
    if not models:
        yield None
        return
    from dspy_sweeps.sim.launch import SimServer

    assert key is not None
    spec = sweep.sim
    with SimServer(
        key,
        state.sim / sweep.name,
        models=models,
        max_num_seqs=spec.max_num_seqs,
        ttft_ms=spec.ttft_ms,
        per_token_ms=spec.per_token_ms,
        time_scale=spec.time_scale,
    ) as sim:
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
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
