"""Run a prepared sweep: local endpoints and served students (if any), Ray trials, results, tracking, promotion.

`run_sweep(prepared, state, address, console)` is what `sweep run` calls after the
preflight checks; every trial's record is written as soon as it finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from dspy_sweeps.errors import SweepError, first_line
from dspy_sweeps.lm.build import endpoint_for
from dspy_sweeps.lm.checks import check_endpoints, is_simulated, one_listing_per_endpoint, served_models
from dspy_sweeps.lm.endpoints import local_endpoints, resolve
from dspy_sweeps.lm.served import served_students
from dspy_sweeps.run.events import TrialEvent
from dspy_sweeps.run.pruning import SweepStudy
from dspy_sweeps.run.spend import CHECKPOINT_S, PROMOTION, SpendLog, remaining
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.imports import restore_program
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.preflight import Prepared
from dspy_sweeps.spec.schema import ModelSpec, Sweep
from dspy_sweeps.state import State
from dspy_sweeps.track.live import LiveProgress, RunningTrials, progress_lines
from dspy_sweeps.track.registry import Decision, best, promote
from dspy_sweeps.track.results import TrialRecord, read_records, records_table, write_records, write_tables
from dspy_sweeps.track.tracking import Trackers, tracking_identity
from dspy_sweeps.track.uri import check_mlflow_server, check_tracking_for_cluster, tracking_uri

if TYPE_CHECKING:
    from dspy_sweeps.lm.gateway import Budget
    from dspy_sweeps.run.hosts import HostPool


@dataclass(frozen=True)
class SweepOutcome:
    records: list[TrialRecord]
    decision: Decision | None


def run_sweep(
    prepared: Prepared,
    state: State,
    address: str | None,
    console: Console,
    resume: bool = False,
    rerun: bool = False,
) -> SweepOutcome:
    """Start what the sweep needs, run its trials, promote the winner, and stop everything again.

    Order: local endpoints (the simulator's plugin), Ray, served students (their replicas are Ray
    actors), trial hosts and the gateway (both starting while the trackers open), trials,
    promotion (which re-scores on the student, so the replicas are still up); then, each in a
    `finally`, the hosts stop, the replicas stop, Ray stops, the local endpoints stop. A run with
    nothing to run (every trial reused, see `reusable`) starts Ray and the rest only if its
    promotion must re-score a champion.
    """
    from dspy_sweeps.run.storage import check_storage

    sweep = prepared.sweep
    if sweep.tracking.mlflow is not None:
        check_mlflow_server(tracking_uri(sweep.tracking.mlflow, state))
    check_storage(storage_uri(sweep, state))
    kept = _finished(state, prepared) if resume else [] if rerun else reusable(state, prepared)
    with (
        one_listing_per_endpoint(),  # one GET /models per endpoint at start-up, however many ask it
        local_endpoints(sweep, prepared.data, state, console) as local,
        ThreadPoolExecutor(1) as background,
        contextlib.ExitStack() as started,
    ):
        # Outside endpoints first: a typo in an api_base costs seconds, not a Ray start-up.
        check_endpoints([(role, resolve(s, local)) for role, s in sweep.roles() if s.serve is None])
        # One budget for every LM call of the sweep: trials, the Ensemble, promotion's re-scoring, and
        # the runs before a --resume (what they spent is in the spend log; a fresh run starts it anew).
        spend = SpendLog(state.spend(sweep.name))
        budget = remaining(sweep.budget, spend.start(resume))
        # Importing MLflow and creating its store takes seconds: done while Ray starts.
        opening = background.submit(Trackers.open, sweep, state, prepared.data.fingerprint, resume)
        services = Services(prepared, state, address, console, local, spend, budget, started)
        if _has_work(prepared, kept):
            services.start()
        # No trial starts before the trackers are open, so a tracker that cannot open costs no LM call.
        trackers = opening.result()
        if services.running is not None:
            records = _run_trials(prepared, state, services.running, trackers, console, resume, kept)
            records += _ensemble(prepared, state, services.running, trackers, records, console)
        else:
            records = _kept_only(prepared, state, trackers, console, kept, resume)
        decision = _promote(prepared, records, trackers, state, services) if sweep.promote else None
        if decision is not None:
            trackers.promoted(decision, best(records))
        trackers.close("FINISHED" if any(r.status == "ok" for r in records) else "FAILED")
    return SweepOutcome(records, decision)


@dataclass(frozen=True)
class Running:
    """What trials run on: the trial hosts, the sweep's gateway, and which models are simulated (by spec JSON)."""

    hosts: HostPool
    gateway: SweepGateway
    simulated: dict[str, bool]


class Services:
    """Ray, the served students, the trial hosts and the gateway, started at most once, on first need,
    into `stack` (which stops them in reverse order: the gateway's last spend logged before Ray goes)."""

    def __init__(
        self,
        prepared: Prepared,
        state: State,
        address: str | None,
        console: Console,
        local: dict[str, str],
        spend: SpendLog,
        budget: Budget,
        stack: contextlib.ExitStack,
    ) -> None:
        self.prepared, self.state, self.address, self.console = prepared, state, address, console
        self.local, self.spend, self.budget, self.stack = local, spend, budget, stack
        self.running: Running | None = None

    def start(self) -> Running:
        if self.running is None:
            self.running = self._start()
        return self.running

    def _start(self) -> Running:
        sweep, stack = self.prepared.sweep, self.stack
        stack.enter_context(_ray(sweep, self.state, self.address))
        served = stack.enter_context(served_students(sweep, self.state, self.console))
        hosts = stack.enter_context(_hosts(self.prepared))
        specs = {s.model_dump_json(): s for _, s in sweep.roles()}  # the key trials know their LMs by
        resolved = {k: _resolve(s, self.local, served) for k, s in specs.items()}
        _check_served(sweep, resolved)
        endpoints = {k: endpoint_for(s, resolved[k]) for k, s in specs.items()}
        simulated = {k: is_simulated(s, resolved[k]) for k, s in specs.items()}
        handle = _start_gateway(self.prepared, self.state, endpoints, self.budget)
        gateway = SweepGateway(handle, {key: e.id for key, e in endpoints.items()}, self.spend)
        stack.callback(gateway.log_unfinished)  # however the run ends, before Ray stops
        stack.enter_context(gateway.checkpoints(sweep.budget))
        return Running(hosts, gateway, simulated)


def _has_work(prepared: Prepared, kept: list[TrialRecord]) -> bool:
    """Whether the run has trials to run: a planned trial not kept, a search's next points, an Ensemble."""
    sweep, done = prepared.sweep, {r.trial_id for r in kept}
    return sweep.search is not None or sweep.ensemble is not None or any(t.id not in done for t in prepared.trials)


@dataclass
class SweepGateway:
    """The sweep's gateway as the driver passes it on: its handle, the endpoint id of each model
    (by spec JSON), and the log each trial's spend is added to as it ends."""

    handle: Any
    endpoint_ids: dict[str, str]
    spend: SpendLog
    logged_calls: int = 0  # by this run
    logged_usd: float = 0.0

    def chain(self, spec: ModelSpec) -> tuple[str, ...]:
        """The gateway endpoints of a model and its fallbacks, in order."""
        return tuple(self.endpoint_ids[s.model_dump_json()] for s in (spec, *spec.fallbacks))

    def log(self, trial_id: str, calls: int, usd: float) -> None:
        self.spend.add(trial_id, calls, usd)
        self.logged_calls += calls
        self.logged_usd += usd

    @contextlib.contextmanager
    def checkpoints(self, budget: Any) -> Iterator[None]:
        """With a budget set: the ledger's running total into the spend log every `CHECKPOINT_S`,
        on a thread, so a driver killed outright has its running trials' spend counted on --resume."""
        import threading

        if budget.max_lm_calls is None and budget.max_usd is None:
            yield
            return
        stop = threading.Event()

        def write() -> None:
            last = 0
            while not stop.wait(CHECKPOINT_S):
                try:
                    calls, usd = self.handle.spent()
                except Exception:  # the gateway is gone: the run is ending, and says why elsewhere
                    return
                if calls > last:
                    self.spend.checkpoint(calls, usd)
                    last = calls

        thread = threading.Thread(target=write, name="spend-checkpoints", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def log_unfinished(self) -> None:
        """At the end of the run, however it ended: what the gateway sent for trials that never
        finished (a run stopped by an error or Ctrl-C), so a --resume still counts them."""
        try:
            totals = self.handle.totals()
            ledger_calls, ledger_usd = self.handle.spent()
        except Exception:  # the gateway itself is gone: what it sent since the last entry is lost
            return
        usd = (ledger_usd if ledger_calls else totals.cost_usd) - self.logged_usd
        if totals.sent > self.logged_calls:
            self.log("unfinished", totals.sent - self.logged_calls, round(max(usd, 0.0), 6))


@contextlib.contextmanager
def _ray(sweep: Sweep, state: State, address: str | None) -> Iterator[None]:
    from dspy_sweeps.run import runner
    from dspy_sweeps.run.storage import check_storage_for_cluster

    with _stderr_to(state.root / "logs" / "ray.log"):  # Ray's core prints its token-auth notice there
        runner.start_ray(address, Path.cwd(), code_packages(sweep))
    try:
        check_tracking_for_cluster(tracking_uri(sweep.tracking.mlflow, state), runner.alive_nodes())
        check_storage_for_cluster(sweep.storage is not None, storage_uri(sweep, state))
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


def _resolve(spec: ModelSpec, local: dict[str, str], served: dict[str, list[str]]) -> ModelSpec:
    """The spec as it is called: a local endpoint's model at its URL, a served student at its replicas."""
    if spec.serve is not None:
        return spec.model_copy(update={"api_base": list(served[spec.name]), "serve": None})
    return resolve(spec, local)


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
    running: Running,
    trackers: Trackers,
    console: Console,
    resume: bool,
    kept: list[TrialRecord],
) -> list[TrialRecord]:
    """Every trial but the `kept` ones on the trial hosts, all LM calls through the sweep's gateway;
    each record is saved, its spend logged and tracked as it lands (off the driver's loop, see
    `TrialEnds`)."""
    from dspy_sweeps.run.storage import clear_sweep
    from dspy_sweeps.run.worker import TrialContext

    sweep, gateway, hosts = prepared.sweep, running.gateway, running.hosts
    results = {r.trial_id: (r.status, r.val_score) for r in kept}
    study = SweepStudy.open(prepared, state, resume, results) if sweep.search or sweep.prune else None
    storage = storage_uri(sweep, state)
    if not resume:  # a fresh run inherits no checkpoints but its reused trials'; --resume carries them on
        clear_sweep(storage, sweep.name, keep={r.trial_id for r in kept})
    ctx = TrialContext(sweep.name, prepared.data, gateway.handle, gateway.endpoint_ids, storage)
    loop = TrialLoop(prepared, state, trackers, hosts, gateway, study, running.simulated, kept, resume)
    with LiveProgress(loop.board, console) as progress, progress_lines(loop.board, progress.console):
        loop.show(progress)
        try:
            hosts.run(
                loop.to_run(),
                ctx,
                parallelism=sweep.parallelism,
                on_outcome=loop.on_outcome,
                on_event=loop.on_event,
                on_start=loop.on_start,
                id_of=_trial_id,
            )
        except BaseException:
            loop.ends.close(raise_error=False)  # the trials that finished are saved and tracked still
            raise
        return loop.ends.close()


def _start_gateway(prepared: Prepared, state: State, endpoints: dict[str, Any], budget: Budget) -> Any:
    """The sweep's gateway shards, as many as `gateway.shards` says or the sweep's size needs."""
    from dspy_sweeps.run import runner

    sweep, total = prepared.sweep, len(prepared.trials)
    distinct = list({e.id: e for e in endpoints.values()}.values())
    shards = runner.gateway_shards(sweep.gateway.shards, min(sweep.parallelism or total, total), len(distinct))
    return runner.start_gateway(distinct, state.cache, budget, shards)


class TrialLoop:
    """The driver's side of the running trials: what happens at a trial's start, at each of its
    events and at its end. Each is O(1) in the number of trials: an end is queued to `TrialEnds`."""

    def __init__(
        self,
        prepared: Prepared,
        state: State,
        trackers: Trackers,
        hosts: HostPool,
        gateway: SweepGateway,
        study: SweepStudy | None,
        simulated: dict[str, bool],
        kept: list[TrialRecord],
        resume: bool,
    ) -> None:
        self.prepared, self.state, self.trackers, self.hosts = prepared, state, trackers, hosts
        self.gateway, self.study, self.simulated, self.resume = gateway, study, simulated, resume
        self.done = {r.trial_id for r in kept}
        self.trials: dict[str, Trial] = {}  # every trial started, by id: a search samples them as it goes
        self.total = len(self.done) + (study.remaining() if study else len(prepared.trials) - len(self.done))
        self.board = RunningTrials(self.total, done=len(kept))
        self.ends = TrialEnds(state.results(prepared.sweep.name), trackers, kept)
        self.progress: Any = None
        self.task: Any = None

    def show(self, progress: Any) -> None:
        self.progress = progress
        self.task = progress.add_task("trials", total=self.total, completed=len(self.done))
        if self.done:
            progress.console.print(_kept_line(len(self.done), self.total - len(self.done), self.resume))

    def to_run(self) -> Iterator[Trial]:
        planned = (t for t in self.prepared.trials if t.id not in self.done)
        for trial in iter(self.study.next_trial, None) if self.study else planned:
            self.trials[trial.id] = trial
            yield trial

    def on_start(self, trial_id: str) -> None:
        self.board.start(self.trials[trial_id])
        self.trackers.trial_started(self.trials[trial_id])

    def on_event(self, event: TrialEvent) -> None:
        trial = self.trials[event.trial_id]
        self.board.update(trial, event)
        self.trackers.trial_event(trial, event)
        if self.study is not None and self.study.on_event(event):
            self.hosts.stop(event.trial_id)

    def on_outcome(self, outcome: Any) -> None:
        sweep = self.prepared.sweep
        trial, result = self.trials[outcome.trial_id], _result(outcome)
        if self.study is not None:
            self.study.trial_finished(trial.id, result)
        path = _save_program(self.state, sweep.name, trial.id, result)
        record = TrialRecord.of(sweep.name, trial, result, path, self.prepared.data.fingerprint, self.simulated)
        self.gateway.log(trial.id, record.lm_calls, record.cost_usd)
        self.ends.put(trial, record, result)
        self.board.finish(trial.id)
        self.progress.advance(self.task)
        self.progress.console.print(f"  {trial.id}  val {_status(record)}")
        if record.reason == "auth":  # a refused key fails every trial that uses it: stop now
            raise SweepError(f"{record.error}; sweep stopped (finished trials are kept: fix the key, then --resume)")
        if record.status != "ok" and (dead := self.gateway.handle.dead_shard()) is not None:
            raise SweepError(
                f"the LM gateway's shard {dead} died, and with it the sweep's counts and budget; sweep stopped "
                "(finished trials are kept: --resume)"
            )


def _status(record: TrialRecord) -> str:
    status = f"{record.val_score:.3f}" if record.status == "ok" else f"[red]{record.status}[/]: {record.error}"
    return status + (" [yellow]SIMULATED[/]" if record.simulated and record.status == "ok" else "")


class TrialEnds:
    """Finished trials on their way to the results file and the trackers, on a thread of their own,
    so the driver never waits for W&B or MLflow at a trial's end.

    The thread takes every end queued (waiting `BATCH_S` for more), writes the results file once
    for all of them (before tracking, which may fail), tracks each, and writes the file again as
    each is tracked (with its MLflow run id: a killed driver's --resume re-runs no tracked trial),
    each write converting only the batch's rows (earlier batches stay Arrow tables), so the Python
    work per end stays flat. The backlog is bounded
    (`put` waits when `BACKLOG` ends are queued); a tracking error stops the sweep at the next
    end, naming the trial; `close` flushes and returns every record."""

    BACKLOG = 256
    BATCH_S = 1.0

    def __init__(self, path: Path, trackers: Trackers, records: list[TrialRecord]) -> None:
        import queue
        import threading

        self.path, self.trackers, self.records = path, trackers, list(records)
        self.tables = [records_table(self.records)] if self.records else []  # the file's rows so far
        self.error: Exception | None = None  # the first failure: raised on the driver at the next end
        self._queue: queue.Queue = queue.Queue(self.BACKLOG)
        self._thread = threading.Thread(target=self._loop, name="trial-ends", daemon=True)
        self._thread.start()

    def put(self, trial: Trial, record: TrialRecord, result: TrialResult) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((trial, record, result))

    def close(self, raise_error: bool = True) -> list[TrialRecord]:
        self._queue.put(None)
        self._thread.join()
        if self.error is not None and raise_error:
            raise self.error
        return self.records

    def _loop(self) -> None:
        import queue
        import time

        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.BATCH_S
            while batch[-1] is not None:
                try:
                    batch.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            ends = [end for end in batch if end is not None]
            if ends:
                try:
                    self._save(ends)
                except Exception as exc:  # a full disk, say: the driver raises it, nothing dies silently here
                    self.error = self.error or exc
            if batch[-1] is None:
                return

    def _save(self, ends: list[tuple[Trial, TrialRecord, TrialResult]]) -> None:
        batch = [record for _, record, _ in ends]
        # Saved before tracking, which may fail; the rows of earlier batches are converted once.
        write_tables(self.path, [*self.tables, records_table(batch)])
        self.records += batch
        if self.error is None:
            for i, (trial, record, result) in enumerate(ends):
                try:
                    run_id = self.trackers.log_trial(trial, record, result)
                except Exception as exc:
                    self.error = _tracking_error(exc, trial, self.path)
                    break
                batch[i] = dataclasses.replace(
                    record, mlflow_run_id=run_id, tracked=True, tracked_by=self.trackers.identity
                )
                if self.trackers.tracks and i + 1 < len(ends):
                    # tracked is on disk as soon as it is true: a killed driver re-runs no tracked trial
                    write_tables(self.path, [*self.tables, records_table(batch)])
        self.records[len(self.records) - len(batch) :] = batch
        self.tables.append(records_table(batch))
        write_tables(self.path, self.tables)


def _tracking_error(exc: Exception, trial: Trial, results: Path) -> Exception:
    """What stops the sweep when a trial's tracking failed: a full state directory (the local MLflow
    store's SQLite says "database or disk is full"; W&B's files raise ENOSPC itself) is the disk's
    error, which `sweep run` names as such."""
    import errno

    if "disk is full" in str(exc) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return OSError(errno.ENOSPC, "No space left on device")
    return SweepError(
        f"tracking failed for trial {trial.id} ({type(exc).__name__}: {first_line(exc)}); "
        f"finished trials are saved in {results}: fix it, then --resume"
    )


def _trial_id(trial: Trial) -> str:
    return trial.id


def code_packages(sweep: Sweep) -> list[str]:
    """The top-level packages the sweep imports by path (program, metric, custom optimizers)."""
    paths = [sweep.program, sweep.metric, *(o.kind for o in sweep.optimizers if ":" in o.kind)]
    return sorted({p.partition(":")[0].split(".")[0] for p in paths})


def storage_uri(sweep: Sweep, state: State) -> str:
    """Where the sweep's trial checkpoints live: its `storage:` (or --storage), else the state dir."""
    return sweep.storage or str(state.root)


def _ensemble(
    prepared: Prepared,
    state: State,
    running: Running,
    trackers: Trackers,
    records: list,
    console: Console,
) -> list[TrialRecord]:
    """The Ensemble trial (run/ensemble.py), saved and tracked like the others; none without `ensemble:`."""
    from dspy_sweeps.run.ensemble import ensemble_trial, run_ensemble

    planned = ensemble_trial(prepared, records)
    if planned is None:
        return []
    trial, members = planned
    gateway = running.gateway
    result = run_ensemble(prepared, trial, members, gateway.handle, gateway.chain)
    gateway.log(trial.id, result.lm_calls, result.cost_usd)
    path = _save_program(state, prepared.sweep.name, trial.id, result)
    record = TrialRecord.of(prepared.sweep.name, trial, result, path, prepared.data.fingerprint, running.simulated)
    write_records(state.results(prepared.sweep.name), [*records, record])
    record = dataclasses.replace(
        record, mlflow_run_id=trackers.log_trial(trial, record, result), tracked=True, tracked_by=trackers.identity
    )
    write_records(state.results(prepared.sweep.name), [*records, record])
    status = f"{record.val_score:.3f}" if record.status == "ok" else f"[red]{record.status}[/]: {record.error}"
    console.print(f"  {trial.id}  val {status}")
    return [record]


def reusable(state: State, prepared: Prepared) -> list[TrialRecord]:
    """For a fresh run of a grid sweep: the planned trials an earlier run finished, which this run
    keeps instead of running again.

    A trial's id digests everything that decides its result (optimizer, settings, models, seed,
    data, and the program's and metric's source: `spec/plan.py`), and the LM cache answers every
    call it would make with the answer it got before (sampled ones too), so running it again would
    compute the same program and the same scores. Kept: `ok`, tracked by the same trackers (its
    MLflow run is in this run's store, for promotion), on the same data, its program file still
    there. A search or a pruned sweep keeps none: its study decides which trials run and when they
    stop (`--resume` continues it). `--rerun` runs every trial again."""
    sweep = prepared.sweep
    if sweep.search is not None or sweep.prune is not None:
        return []
    planned, identity = {t.id for t in prepared.trials}, tracking_identity(sweep, state)
    return [
        r
        for r in read_records(state.results(sweep.name))
        if r.status == "ok"
        and r.tracked
        and r.tracked_by == identity
        and r.trial_id in planned
        and r.data_fingerprint == prepared.data.fingerprint
        and r.program_path is not None
        and Path(r.program_path).is_file()
    ]


def _kept_only(
    prepared: Prepared, state: State, trackers: Trackers, console: Console, kept: list[TrialRecord], resume: bool
) -> list[TrialRecord]:
    """A run with nothing to run: its kept trials are its results (the file holds them, as it would
    after running them) and the trackers' sweep-level runs show them."""
    write_records(state.results(prepared.sweep.name), kept)
    trackers.kept(kept)
    console.print(_kept_line(len(kept), 0, resume))
    return list(kept)


def _kept_line(kept: int, to_run: int, resume: bool) -> str:
    if resume:
        return f"  resuming: {kept} finished trials kept, {to_run} to run"
    return (
        f"  reused: {kept} finished trials of an earlier run, unchanged (same settings, models, data and code; "
        f"every LM call they make is cached), {to_run} to run; --rerun runs them again"
    )


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
    prepared: Prepared, records: list[TrialRecord], trackers: Trackers, state: State, services: Services
) -> Decision:
    sweep = prepared.sweep
    winner = best(records)
    if winner is None:
        return Decision(False, "no trial finished, so there is nothing to promote")
    program = restore_program(sweep.program, Path(winner.program_path).read_text())
    # The winner's own student, by name (a record resumed from before names were kept holds the model string).
    student = next(s for s in sweep.students if winner.student in (s.name, s.model))

    def rescore(program_json: str) -> list[float | None]:
        """The champion's scores on this sweep's test split, its LM calls through the sweep's gateway."""
        from dspy_sweeps.lm.engine import build_gateway_embedder, build_gateway_lm
        from dspy_sweeps.run.trial import evaluate, to_examples
        from dspy_sweeps.spec.imports import load_object

        gateway = services.start().gateway  # a run that ran no trial starts Ray only now
        embedder = None
        if sweep.embedder is not None:
            embedder = build_gateway_embedder(
                sweep.embedder, gateway.handle, gateway.chain(sweep.embedder)[0], PROMOTION
            )
        champion = restore_program(sweep.program, program_json, embedder)
        champion.set_lm(build_gateway_lm(student, gateway.handle, gateway.chain(student), PROMOTION))
        metric = load_object(sweep.metric, "metric")
        return evaluate(
            champion, to_examples(prepared.data.test, prepared.data.inputs), metric, sweep.num_threads
        ).scores

    uri = tracking_uri(sweep.tracking.mlflow, state)
    baseline = functools.partial(_baseline_scores, prepared, records, winner, rescore)
    try:
        return promote(sweep.promote, winner, winner.mlflow_run_id, program, uri, rescore, baseline)
    finally:
        if services.running is not None:
            gateway = services.running.gateway
            stats = gateway.handle.trial_stats(PROMOTION, done=True)
            if stats.requested:
                gateway.log(PROMOTION, stats.sent, stats.cost_usd)


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
