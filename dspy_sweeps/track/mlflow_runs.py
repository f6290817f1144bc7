"""MLflow: a child run per trial under the sweep's parent run, through an `MlflowClient` for the
sweep's URI (MLflow's global tracking URI is never set)."""

from __future__ import annotations

import json
import time
from typing import Any

from dspy_sweeps.records import TrialEvent, TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import MlflowSpec, Sweep
from dspy_sweeps.state import State
from dspy_sweeps.track.datasets import mlflow_inputs, split_inputs
from dspy_sweeps.track.figures import (
    ENDED_WELL,
    event_figures,
    figures,
    final_step,
    leaderboard_rows,
    simulation_tags,
    trial_config,
)
from dspy_sweeps.track.pareto import pareto_figure
from dspy_sweeps.track.results import TrialRecord
from dspy_sweeps.track.traces import log_traces
from dspy_sweeps.track.uri import tracking_uri

MLFLOW_PARAM_LIMIT = 6000  # MLflow rejects longer parameter values
MLFLOW_BATCH_LIMIT = 1000  # metrics per log_batch request
MODEL_ID_TAG = "dspy_sweeps.model_id"  # on a trial's run: its LoggedModel, which promotion registers


class MlflowLogger:
    """A child run per trial, RUNNING from its start, with metric history by step (LM calls spent);
    params, final metrics, tags and the program (JSON state + metadata) at its end. The parent
    run carries `leaderboard.json` and `pareto.png`, rewritten as trials end.

    As MLflow 3 users expect: the data's train/val/test splits are inputs of the parent run and of
    every trial run; a finished trial's program is a LoggedModel (its run's output) with the val
    and test scores linked to it and to their split; the first test examples' evaluation of each
    finished trial are traces linked to both (`track/traces.py`)."""

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
        self.inputs = split_inputs(sweep, fingerprint)
        self.client.log_inputs(self.parent, mlflow_inputs(self.inputs))

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
        self.client.log_inputs(run_id, mlflow_inputs(self.inputs))
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
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus, RunTag

        self.trial_started(trial)
        run_id = self.runs.pop(trial.id)
        tags = [RunTag("status", record.status)] + ([RunTag("error", record.error)] if record.error else [])
        tags += [RunTag(k, v) for k, v in simulation_tags(record).items()]
        if result.program:
            self.client.log_text(run_id, result.program, "program/program.json")
            self.client.log_dict(run_id, program_metadata(self.sweep, trial, record), "program/metadata.json")
        model_id = self._log_model(trial, record, result, run_id) if result.program and record.status == "ok" else None
        step = final_step(self.steps, trial.id, record)
        tags += [RunTag(MODEL_ID_TAG, model_id)] if model_id else []
        self.client.log_batch(run_id, metrics=self._final_metrics(record, step, model_id), tags=tags)
        if model_id:
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])
            self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            log_traces(self.uri, self.experiment_id, run_id, model_id, result.test_traces, self._trace_tags(trial))
        self.client.set_terminated(run_id, "FINISHED" if record.status in ENDED_WELL else "FAILED")
        return run_id

    def _log_model(self, trial: Trial, record: TrialRecord, result: TrialResult, run_id: str) -> str:
        """The trial's program as a LoggedModel of its run, its JSON state and metadata as artifacts
        (promotion adds the `mlflow.dspy` flavour to the champion's)."""
        import tempfile
        from pathlib import Path

        tags = {"sweep": self.sweep.name, "trial": trial.id, **simulation_tags(record)}
        params = {k: str(v)[:MLFLOW_PARAM_LIMIT] for k, v in trial_config(trial, self.fingerprint).items()}
        model = self.client.create_logged_model(
            self.experiment_id, name=trial.id, source_run_id=run_id, tags=tags, params=params, model_type="dspy-program"
        )
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "program.json").write_text(result.program or "")
            (Path(tmp) / "metadata.json").write_text(json.dumps(program_metadata(self.sweep, trial, record)))
            self.client.log_model_artifacts(model.model_id, tmp)
        return model.model_id

    def _final_metrics(self, record: TrialRecord, step: int, model_id: str | None) -> list[Any]:
        """The trial's figures at its last step, linked to its LoggedModel; val and test also to their split."""
        from mlflow.entities import Metric

        now, by_split = int(time.time() * 1000), {i.split: i for i in self.inputs}
        metrics = []
        for key, value in figures(record).items():
            split = by_split.get(key.removesuffix("_score")) if key.endswith("_score") else None
            data = {"dataset_name": split.name, "dataset_digest": split.digest} if split else {}
            metrics.append(Metric(key, value, now, step, model_id=model_id, **data))
        return metrics

    def _trace_tags(self, trial: Trial) -> dict[str, str]:
        return {"sweep": self.sweep.name, "trial": trial.id, "split": "test"}

    def promoted(self, record: TrialRecord, alias: str, version: str) -> None:
        """The registered version's LoggedModel says so (the registry itself is `track/registry.py`'s)."""
        run_id = record.mlflow_run_id
        model_id = self.client.get_run(run_id).data.tags.get(MODEL_ID_TAG) if run_id else None
        if model_id:
            self.client.set_logged_model_tags(
                model_id, {"registered": f"{self.sweep.promote.model}/{version}", "alias": alias}
            )

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
