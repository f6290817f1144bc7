"""Trial tracking: one W&B run and one MLflow child run per trial, under a sweep-level run.

Everything is logged from the driver, so workers never hold tracking credentials. A trial's
runs open when it starts (`trial_started`), get a history point per progress event
(`trial_event`, x-axis: LM calls spent) and close with its summary when it ends (`log_trial`);
the sweep's W&B run (job type `sweep`) and MLflow parent run carry the leaderboard and the
score-versus-cost plot, updated as trials end. The work runs on one background thread (see
`track/background.py`), so a slow tracker never holds up the thread that delivers events.
A do-nothing logger stands in when a tracker is off.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from dspy_sweeps.errors import SweepError
from dspy_sweeps.records import TrialEvent, TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import MlflowSpec, Sweep, WandbSpec
from dspy_sweeps.state import State
from dspy_sweeps.track.background import TrackingThread
from dspy_sweeps.track.pareto import pareto_figure, pareto_front, ranked
from dspy_sweeps.track.results import TrialRecord, read_records

# A pruned trial did what the sweep asked (its status tag says it was pruned); failed and cut ones did not.
ENDED_WELL = ("ok", "pruned")
MLFLOW_PARAM_LIMIT = 6000  # MLflow rejects longer parameter values
MLFLOW_BATCH_LIMIT = 1000  # metrics per log_batch request
FIGURES = (
    "val_score",
    "test_score",
    "lm_calls",
    "calls_requested",
    "cache_hits",
    "merged_calls",
    "failed_calls",
    "failed_examples",
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


class TrialLogger(Protocol):
    def trial_started(self, trial: Trial) -> None: ...
    def trial_events(self, trial: Trial, events: list[TrialEvent]) -> None: ...
    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None: ...
    def log_sweep(self, records: list[TrialRecord]) -> None: ...
    def close(self, status: str) -> None: ...


class NullLogger:
    def trial_started(self, trial: Trial) -> None:
        pass

    def trial_events(self, trial: Trial, events: list[TrialEvent]) -> None:
        pass

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        return None

    def log_sweep(self, records: list[TrialRecord]) -> None:
        pass

    def close(self, status: str) -> None:
        pass


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


class WandbLogger:
    """Offline runs land under the state dir (`wandb sync` uploads them later). An online W&B that
    cannot be reached within `ONLINE_TIMEOUT_S` switches the rest of the sweep to offline runs.

    Several trials' runs are open at once (`reinit="create_new"` gives each its own Run object).
    A history row per event; W&B's own `_step` counts rows, and `calls` is the x-axis its charts use.
    """

    ONLINE_TIMEOUT_S = 20

    def __init__(self, spec: WandbSpec, sweep: str, state: State, fingerprint: str = "") -> None:
        self.spec, self.sweep, self.state, self.fingerprint = spec, sweep, state, fingerprint
        self.mode = spec.mode
        self.runs: dict[str, Any] = {}  # trial id -> its open run
        self.steps: dict[str, int] = {}
        self.sweep_run: Any = None
        os.environ.setdefault("WANDB_SILENT", "true")
        state.wandb.mkdir(parents=True, exist_ok=True)

    def trial_started(self, trial: Trial) -> None:
        if trial.id in self.runs:
            return
        run = self._init(job_type=trial.kind, name=trial.id, config=trial_config(trial, self.fingerprint))
        run.define_metric(STEP)
        run.define_metric("*", step_metric=STEP)
        self.runs[trial.id] = run

    def trial_events(self, trial: Trial, events: list[TrialEvent]) -> None:
        self.trial_started(trial)
        run = self.runs[trial.id]
        for event in events:
            run.log({STEP: event.calls, **event_figures(event)})
            self.steps[trial.id] = max(self.steps.get(trial.id, 0), event.calls)

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        import wandb

        self.trial_started(trial)
        run = self.runs.pop(trial.id)
        run.tags = (*run.tags, record.status, *(["SIMULATED"] if record.simulated else []))
        run.config.update(simulation_flags(record), allow_val_change=True)
        run.log({STEP: final_step(self.steps, trial.id, record), **figures(record)})
        run.summary.update({**figures(record), "status": record.status, "error": record.error or ""})
        if result.predictions:
            table = wandb.Table(columns=["inputs", "prediction", "gold", "score"])
            for p in result.predictions:
                table.add_data(
                    *(json.dumps(p[k], ensure_ascii=False) for k in ("inputs", "prediction", "gold")), p["score"]
                )
            run.log({"val_predictions": table})
        run.finish(exit_code=0 if record.status in ENDED_WELL else 1)
        return None

    def log_sweep(self, records: list[TrialRecord]) -> None:
        """The sweep run's leaderboard and Pareto plot, logged again (a new history row) as each trial ends."""
        import wandb

        if self.sweep_run is None:
            self.sweep_run = self._init(job_type="sweep", name=f"{self.sweep}-sweep")
        rows = leaderboard_rows(records)
        table = wandb.Table(columns=list(LEADERBOARD_COLUMNS), data=[[r[c] for c in LEADERBOARD_COLUMNS] for r in rows])
        png = self.state.wandb / f"{self.sweep}-pareto.png"  # W&B's Image copies the file into the run
        pareto_figure(records, f"{self.sweep}: val score vs cost").savefig(png)
        self.sweep_run.log(
            {
                "leaderboard": table,
                "score_vs_cost": wandb.plot.scatter(table, "cost_usd", "val_score", title="val score vs cost $"),
                "pareto": wandb.Image(str(png)),
                "trials_done": len(records),
            }
        )
        self.sweep_run.summary.update({"pareto_front": sorted(r["trial_id"] for r in rows if r["on_front"])})

    def _init(self, **kwargs: Any) -> Any:
        import wandb

        kwargs.update(project=self.spec.project, entity=self.spec.entity, group=self.sweep, dir=str(self.state.wandb))
        # Runs stay open while the sweep runs, several at once: the driver's terminal output is nobody's log.
        kwargs.update(reinit="create_new", settings=wandb.Settings(console="off"))
        if self.mode == "online":
            try:
                online = wandb.Settings(console="off", init_timeout=self.ONLINE_TIMEOUT_S)
                return wandb.init(mode="online", **{**kwargs, "settings": online})
            except Exception as exc:
                print(
                    f"W&B is unreachable ({type(exc).__name__}); logging offline under {self.state.wandb} (`wandb sync` uploads later)"
                )
                self.mode = "offline"
        return wandb.init(mode=self.mode, **kwargs)

    def close(self, status: str) -> None:
        """Runs of trials that never ended (the sweep stopped first) close as failed."""
        for run in self.runs.values():
            run.finish(exit_code=1)
        self.runs.clear()
        if self.sweep_run is not None:
            self.sweep_run.finish(exit_code=0 if status == "FINISHED" else 1)


class MlflowLogger:
    """A child run per trial, RUNNING from its start, with metric history by step (LM calls spent);
    params, final metrics, tags and the program (JSON state + metadata) at its end. The parent
    run carries `leaderboard.json` and `pareto.png`, rewritten as trials end."""

    def __init__(self, spec: MlflowSpec, sweep: Sweep, state: State, fingerprint: str, resume: bool = False) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(spec, state)
        self.client = MlflowClient(self.uri)
        self.sweep, self.fingerprint = sweep, fingerprint
        self.runs: dict[str, str] = {}  # trial id -> its RUNNING child run
        self.steps: dict[str, int] = {}
        name = spec.experiment or sweep.name
        experiment = self.client.get_experiment_by_name(name)
        # A local store keeps artifacts in the state dir too (MLflow's default is ./mlruns).
        location = None if self.uri.startswith("http") else (state.root / "mlartifacts").as_uri()
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, location)
        tags = {"dspy_sweeps.sweep": sweep.name, "data_fingerprint": fingerprint}
        previous = self._last_parent(sweep.name) if resume else None
        if previous:
            self._close_interrupted(previous)
        self.parent = previous or self.client.create_run(self.experiment_id, run_name=sweep.name, tags=tags).info.run_id

    def _last_parent(self, sweep: str) -> str | None:
        """A resumed sweep goes on under the parent run it started, so its trials stay together."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`dspy_sweeps.sweep` = '{sweep}'",
            order_by=["attributes.start_time DESC"],
        )
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return parents[0].info.run_id if parents else None

    def _close_interrupted(self, parent: str) -> None:
        """Child runs left RUNNING by a driver that died are closed as KILLED, not reused: the trial
        starts over, and a history that restarts at step 0 inside the old run would mislead."""
        interrupted = self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"
        )
        for run in interrupted:
            self.client.set_tag(run.info.run_id, "status", "interrupted")
            self.client.set_terminated(run.info.run_id, "KILLED")

    def trial_started(self, trial: Trial) -> None:
        from mlflow.entities import Param, RunTag

        if trial.id in self.runs:
            return
        tags = {"mlflow.parentRunId": self.parent, "trial": trial.id, "optimizer": trial.kind, "status": "running"}
        run_id = self.client.create_run(self.experiment_id, run_name=trial.id, tags=tags).info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in trial_config(trial, self.fingerprint).items()]
        self.client.log_batch(run_id, params=params, tags=[RunTag("sweep", self.sweep.name)])
        self.runs[trial.id] = run_id

    def trial_events(self, trial: Trial, events: list[TrialEvent]) -> None:
        from mlflow.entities import Metric

        self.trial_started(trial)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, e.calls) for e in events for k, v in event_figures(e).items()]
        for i in range(0, len(metrics), MLFLOW_BATCH_LIMIT):
            self.client.log_batch(self.runs[trial.id], metrics=metrics[i : i + MLFLOW_BATCH_LIMIT])
        self.steps[trial.id] = max([self.steps.get(trial.id, 0), *(e.calls for e in events)])

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        from mlflow.entities import Metric, RunTag

        self.trial_started(trial)
        run_id = self.runs.pop(trial.id)
        tags = [RunTag("status", record.status)] + ([RunTag("error", record.error)] if record.error else [])
        tags += [RunTag(k, v) for k, v in simulation_tags(record).items()]
        step, now = final_step(self.steps, trial.id, record), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in figures(record).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if result.program:
            self.client.log_text(run_id, result.program, "program/program.json")
            self.client.log_dict(run_id, program_metadata(self.sweep, trial, record), "program/metadata.json")
        self.client.set_terminated(run_id, "FINISHED" if record.status in ENDED_WELL else "FAILED")
        return run_id

    def log_sweep(self, records: list[TrialRecord]) -> None:
        self.client.log_dict(self.parent, {"trials": leaderboard_rows(records)}, "leaderboard.json")
        self.client.log_figure(
            self.parent, pareto_figure(records, f"{self.sweep.name}: val score vs cost"), "pareto.png"
        )

    def close(self, status: str) -> None:
        for run_id in self.runs.values():  # trials that never ended: the sweep stopped first
            self.client.set_terminated(run_id, "KILLED")
        self.runs.clear()
        self.client.set_terminated(self.parent, status)


def tracking_uri(spec: MlflowSpec | None, state: State) -> str:
    """The sweep's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the state dir."""
    return (spec and spec.tracking_uri) or os.environ.get("MLFLOW_TRACKING_URI") or state.mlflow_uri


def check_mlflow_server(uri: str, timeout_s: float = 10) -> None:
    """An http(s) tracking URI must answer before trials spend LM calls that it could not record.

    Any HTTP answer counts (a 401 from an auth proxy is MLflow's to explain); only a server
    that cannot be reached is refused. The URI is shown without its credentials.
    """
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    shown = (
        parts._replace(netloc=f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname).geturl().rstrip("/")
    )
    try:
        with urllib.request.urlopen(f"{shown}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise SweepError(
            f"tracking.mlflow: no MLflow server answers at {shown} ({reason}); start it, "
            "or unset MLFLOW_TRACKING_URI to track in the state dir"
        ) from None


def program_metadata(sweep: Sweep, trial: Trial, record: TrialRecord) -> dict[str, Any]:
    """What `sweep pull` and `dspy_sweeps.load` need to rebuild the program; no keys, only variable names."""
    from importlib.metadata import version

    return {
        "sweep": sweep.name,
        "trial_id": trial.id,
        "program": trial.program,
        "metric": trial.metric,
        "optimizer": trial.kind,
        "settings": trial.settings,
        "seed": trial.seed,
        "student": trial.student.model_dump(),
        "teacher": trial.teacher.model_dump() if trial.teacher else None,
        "embedder": trial.embedder.model_dump() if trial.embedder else None,
        "inputs": list(sweep.data.inputs),
        "val_score": record.val_score,
        "test_score": record.test_score,
        "student_simulated": record.student_simulated,
        "teacher_simulated": record.teacher_simulated,
        "data_fingerprint": record.data_fingerprint,
        "versions": {pkg: version(pkg) for pkg in ("dspy", "dspy-sweeps", "mlflow", "ray")},
    }


class Trackers:
    """W&B and MLflow behind one set of calls, their work done in order on one background thread.

    `trial_started` and `trial_event` only queue (the event transport must never wait on a
    tracker); `log_trial` and `close` wait for the queue to get to them, and raise the first
    error any tracker hit, so a broken tracker stops the sweep at the next trial's end.
    """

    def __init__(self, wandb: TrialLogger, mlflow: TrialLogger, results: Path | None = None) -> None:
        self.wandb, self.mlflow, self.results = wandb, mlflow, results
        self.ended: set[str] = set()  # a late event for an ended trial must not open a new run
        self.work = TrackingThread(self._started, self._events)

    @classmethod
    def open(cls, sweep: Sweep, state: State, fingerprint: str, resume: bool = False) -> Trackers:
        spec = sweep.tracking
        wandb = (
            WandbLogger(spec.wandb, sweep.name, state, fingerprint)
            if spec.wandb and spec.wandb.mode != "disabled"
            else NullLogger()
        )
        mlflow = MlflowLogger(spec.mlflow, sweep, state, fingerprint, resume) if spec.mlflow else NullLogger()
        return cls(wandb, mlflow, state.results(sweep.name))

    def trial_started(self, trial: Trial) -> None:
        self.work.start(trial)

    def trial_event(self, trial: Trial, event: TrialEvent) -> None:
        self.work.event(trial, event)

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        """The trial's end: close its runs with their summary and update the sweep's leaderboard.
        Returns the trial's MLflow run id (promotion registers from it)."""
        return self.work.call(lambda: self._ended(trial, record, result))

    def close(self, status: str) -> None:
        try:
            self.work.call(lambda: [logger.close(status) for logger in (self.wandb, self.mlflow)])
        finally:
            self.work.stop()

    def _started(self, trial: Trial) -> None:
        if trial.id in self.ended:
            return
        self.mlflow.trial_started(trial)
        self.wandb.trial_started(trial)

    def _events(self, trial: Trial, events: list[TrialEvent]) -> None:
        if trial.id in self.ended:
            return
        self.mlflow.trial_events(trial, events)
        self.wandb.trial_events(trial, events)

    def _ended(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        self.ended.add(trial.id)
        run_id = self.mlflow.log_trial(trial, record, result)
        self.wandb.log_trial(trial, record, result)
        # The results file holds every finished trial of this sweep, resumed ones too (written before tracking).
        records = read_records(self.results) if self.results else [record]
        for logger in (self.mlflow, self.wandb):
            logger.log_sweep(records)
        return run_id


def is_local_tracking_uri(uri: str) -> bool:
    """True for a URI only one machine can use: sqlite:, file:, or a plain path."""
    if uri.strip().lower() in ("databricks", "databricks-uc"):  # MLflow's names for a Databricks workspace
        return False
    scheme = urlparse(uri).scheme.lower()
    return scheme in ("sqlite", "file") or len(scheme) <= 1  # "" is a plain path, "c" a Windows drive


def check_tracking_for_cluster(tracking_uri: str, alive_nodes: int) -> None:
    """Refuse a machine-local MLflow store when the cluster has more than one alive node.

    The engine calls it once Ray is up, with Ray's count of alive nodes (tracking knows no Ray):
    the trials run on other nodes, and the job's driver (which logs to MLflow) runs on a node
    whose disk the user never sees.
    """
    if not is_local_tracking_uri(tracking_uri):
        return
    if alive_nodes > 1:
        raise SweepError(
            f"MLflow tracking URI {tracking_uri}: a sqlite:/// or file MLflow URI cannot be shared by a "
            f"multi-node cluster ({alive_nodes} nodes); run an MLflow server (cluster/mlflow) and set MLFLOW_TRACKING_URI"
        )
