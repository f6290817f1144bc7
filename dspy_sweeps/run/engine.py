"""Run a prepared sweep: simulator and served students (if any), Ray trials, results, tracking, promotion.

`run_sweep(prepared, state, address, console)` is what `sweep run` calls after the
preflight checks; every trial's record is written as soon as it finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from dspy_sweeps.data import Dataset
from dspy_sweeps.errors import SweepError, first_line
from dspy_sweeps.lm.build import endpoint_for, resolve
from dspy_sweeps.lm.checks import check_endpoints, is_simulated, served_models
from dspy_sweeps.lm.served import served_students
from dspy_sweeps.run.events import TrialEvent
from dspy_sweeps.run.pruning import SweepStudy
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.imports import restore_program
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.preflight import Prepared
from dspy_sweeps.spec.schema import ModelSpec, Sweep
from dspy_sweeps.state import State
from dspy_sweeps.track.live import LiveProgress, RunningTrials, progress_lines
from dspy_sweeps.track.registry import Decision, best, promote
from dspy_sweeps.track.results import TrialRecord, read_records, write_records
from dspy_sweeps.track.tracking import Trackers, check_mlflow_server, check_tracking_for_cluster, tracking_uri

if TYPE_CHECKING:
    from dspy_sweeps.run.hosts import HostPool


@dataclass(frozen=True)
class SweepOutcome:
    records: list[TrialRecord]
    decision: Decision | None


def run_sweep(
    prepared: Prepared, state: State, address: str | None, console: Console, resume: bool = False
) -> SweepOutcome:
    """Start what the sweep needs, run its trials, promote the winner, and stop everything again.

    Order: simulator, Ray, served students (their replicas are Ray actors), trial hosts (warming
    up while endpoints are checked and trackers open), trials, promotion (which re-scores on the
    student, so the replicas are still up); then, each in a `finally`, the hosts stop, the
    replicas stop, Ray stops, the simulator stops.
    """
    sweep = prepared.sweep
    if sweep.tracking.mlflow is not None:
        check_mlflow_server(tracking_uri(sweep.tracking.mlflow, state))
    key = _answer_key(prepared, state)
    with simulator(sweep, key, state, console) as sim_url, ThreadPoolExecutor(1) as background:
        # Outside endpoints first: a typo in an api_base costs seconds, not a Ray start-up.
        check_endpoints([(role, resolve(s, sim_url)) for role, s in sweep.roles() if s.serve is None])
        # Importing MLflow and creating its store takes seconds: done while Ray starts.
        opening = background.submit(Trackers.open, sweep, state, prepared.data.fingerprint, resume)
        with (
            _ray(sweep, state, address),
            served_students(sweep, state, key, console) as served,
            _hosts(prepared) as hosts,
        ):
            specs = {s.model_dump_json(): s for _, s in sweep.roles()}  # the key trials know their LMs by
            resolved = {k: _resolve(s, sim_url, served) for k, s in specs.items()}
            _check_served(sweep, resolved)
            endpoints = {k: endpoint_for(s, resolved[k]) for k, s in specs.items()}
            simulated = {k: is_simulated(s, resolved[k]) for k, s in specs.items()}
            trackers = opening.result()
            records = _run_trials(prepared, state, endpoints, trackers, console, resume, hosts, simulated)
            records += _ensemble(prepared, state, endpoints, trackers, records, console, simulated)
            decision = _promote(prepared, records, trackers, state, resolved) if sweep.promote else None
            trackers.close("FINISHED" if any(r.status == "ok" for r in records) else "FAILED")
    return SweepOutcome(records, decision)


@contextlib.contextmanager
def _ray(sweep: Sweep, state: State, address: str | None) -> Iterator[None]:
    from dspy_sweeps.run import runner

    with _stderr_to(state.root / "logs" / "ray.log"):  # Ray's core prints its token-auth notice there
        runner.start_ray(address, Path.cwd())
    try:
        check_tracking_for_cluster(tracking_uri(sweep.tracking.mlflow, state))
        yield
    finally:
        runner.stop_ray()


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """This process's stderr (the file descriptor, which native code writes to) appended to `path`."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _hosts(prepared: Prepared) -> Iterator[HostPool]:
    """The sweep's trial hosts, sized from the sweep file and the CPUs Ray has free."""
    import functools

    import ray

    from dspy_sweeps.run.hosts import HostPool, size_hosts
    from dspy_sweeps.run.worker import execute_trial, warm

    sweep, total = prepared.sweep, len(prepared.trials)
    fill = max(1, min(s.max_concurrency for s in sweep.students) // sweep.num_threads)
    free = ray.available_resources().get("CPU", 0.0)
    plan = size_hosts(min(sweep.parallelism or total, total), sweep.hosts.trials_per_host, sweep.hosts.cpus, free, fill)
    kinds = tuple(sorted({t.kind for t in prepared.trials}))
    pool = HostPool(execute_trial, functools.partial(warm, sweep.program, sweep.metric, kinds), plan)
    try:
        yield pool
    finally:
        pool.close()


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
    hosts: HostPool,
    simulated: dict[str, bool],
) -> list[TrialRecord]:
    """Every trial on the trial hosts, all LM calls through one gateway; each record is saved and
    tracked as it lands. `simulated` says, by spec, which models answer from the simulator (their
    records say so)."""
    from dspy_sweeps.lm.gateway import Budget
    from dspy_sweeps.run import runner
    from dspy_sweeps.run.hosts import Outcome
    from dspy_sweeps.run.worker import TrialContext

    sweep = prepared.sweep
    records = _finished(state, prepared) if resume else []
    done = {r.trial_id for r in records}
    kept = {r.trial_id: (r.status, r.val_score) for r in records}
    study = SweepStudy.open(prepared, state, resume, kept) if sweep.search or sweep.prune else None
    trials: dict[str, Trial] = {}  # every trial started, by id: a search samples them as it goes

    def to_run() -> Iterator[Trial]:
        planned = (t for t in prepared.trials if t.id not in done)
        for trial in iter(study.next_trial, None) if study else planned:
            trials[trial.id] = trial
            yield trial

    budget = Budget(sweep.budget.max_lm_calls, sweep.budget.max_usd)
    gateway = runner.start_gateway(list({e.id: e for e in endpoints.values()}.values()), state.cache, budget)
    endpoint_ids = {key: e.id for key, e in endpoints.items()}
    ctx = TrialContext(sweep.name, prepared.data, gateway, endpoint_ids, str(state.root))
    total = len(done) + (study.remaining() if study else len(prepared.trials) - len(done))
    board = RunningTrials(total, done=len(records))
    with LiveProgress(board, console) as progress, progress_lines(board, progress.console):
        task = progress.add_task("trials", total=total, completed=len(records))
        if records:
            progress.console.print(f"  resuming: {len(records)} finished trials kept, {total - len(done)} to run")

        def on_start(trial_id: str) -> None:
            board.start(trials[trial_id])
            trackers.trial_started(trials[trial_id])

        def on_event(event: TrialEvent) -> None:
            trial = trials[event.trial_id]
            board.update(trial, event)
            trackers.trial_event(trial, event)
            if study is not None and study.on_event(event):
                hosts.stop(event.trial_id)

        def on_outcome(outcome: Outcome) -> None:
            trial, result = trials[outcome.trial_id], _result(outcome)
            if study is not None:
                study.trial_finished(trial.id, result)
            program_path = _save_program(state, sweep.name, trial.id, result)
            record = TrialRecord.of(sweep.name, trial, result, program_path, prepared.data.fingerprint, simulated)
            records.append(record)
            board.finish(trial.id)
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

        hosts.run(
            to_run(),
            ctx,
            parallelism=sweep.parallelism,
            on_outcome=on_outcome,
            on_event=on_event,
            on_start=on_start,
            id_of=_trial_id,
        )
    return records


def _trial_id(trial: Trial) -> str:
    return trial.id


def _ensemble(
    prepared: Prepared,
    state: State,
    endpoints: dict[str, Any],
    trackers: Trackers,
    records: list,
    console: Console,
    simulated: dict[str, bool],
) -> list[TrialRecord]:
    """The Ensemble trial (run/ensemble.py), saved and tracked like the others; none without `ensemble:`."""
    from dspy_sweeps.run.ensemble import ensemble_trial, run_ensemble

    planned = ensemble_trial(prepared, records)
    if planned is None:
        return []
    trial, members = planned
    result = run_ensemble(prepared, trial, members, sum(r.lm_calls for r in records), endpoints, state)
    path = _save_program(state, prepared.sweep.name, trial.id, result)
    record = TrialRecord.of(prepared.sweep.name, trial, result, path, prepared.data.fingerprint, simulated)
    write_records(state.results(prepared.sweep.name), [*records, record])
    record = dataclasses.replace(record, mlflow_run_id=trackers.log_trial(trial, record, result), tracked=True)
    write_records(state.results(prepared.sweep.name), [*records, record])
    status = f"{record.val_score:.3f}" if record.status == "ok" else f"[red]{record.status}[/]: {record.error}"
    console.print(f"  {trial.id}  val {status}")
    return [record]


def _finished(state: State, prepared: Prepared) -> list[TrialRecord]:
    """For --resume: the trials of this plan that already finished (or were pruned) on the same data;
    for a search, every such trial of the sweep (its study knows which points they were)."""
    planned = {t.id for t in prepared.trials}
    return [
        r
        for r in read_records(state.results(prepared.sweep.name))
        if r.status in ("ok", "pruned")
        and r.tracked
        and (r.trial_id in planned or prepared.sweep.search is not None)
        and r.data_fingerprint == prepared.data.fingerprint
    ]


def _result(outcome) -> TrialResult:
    if outcome.error is not None:
        return TrialResult(trial_id=outcome.trial_id, status="failed", error=outcome.error, reason="error")
    return outcome.result


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
        from dspy_sweeps.lm.build import build_embedder, build_lm
        from dspy_sweeps.run.trial import evaluate, to_examples
        from dspy_sweeps.spec.imports import load_object

        embedder = build_embedder(resolved[sweep.embedder.model_dump_json()]) if sweep.embedder else None
        champion = restore_program(sweep.program, program_json, embedder)
        champion.set_lm(build_lm(student))
        metric = load_object(sweep.metric, "metric")
        return evaluate(
            champion, to_examples(prepared.data.test, prepared.data.inputs), metric, sweep.num_threads
        ).scores

    uri = tracking_uri(sweep.tracking.mlflow, state)
    baseline = functools.partial(_baseline_scores, prepared, records, winner, rescore)
    return promote(sweep.promote, winner, winner.mlflow_run_id, program, uri, rescore, baseline)


def _baseline_scores(prepared: Prepared, records: list[TrialRecord], winner: TrialRecord, rescore: Any) -> list:
    """The winner's student uncompiled, per test example: its baseline trial's, else scored now (the
    gate a first version must pass when there is no champion)."""
    from dspy_sweeps.run.progress import state_of
    from dspy_sweeps.spec.imports import build_program
    from dspy_sweeps.spec.kinds import BASELINE

    same = winner.student, "ok", winner.data_fingerprint
    for r in records:
        if r.kind == BASELINE and (r.student, r.status, r.data_fingerprint) == same and r.test_scores:
            return list(r.test_scores)
    return rescore(state_of(build_program(prepared.sweep.program)))


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
