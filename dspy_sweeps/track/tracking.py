"""Trial tracking: one W&B run and one MLflow child run per trial, under a parent run per sweep.

Both are logged from the driver as trials finish, so workers never hold tracking
credentials. A do-nothing logger stands in when a tracker is off.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

from dspy_sweeps.errors import SweepError
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import MlflowSpec, Sweep, WandbSpec
from dspy_sweeps.state import State
from dspy_sweeps.track.results import TrialRecord

MLFLOW_PARAM_LIMIT = 6000  # MLflow rejects longer parameter values
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
)


class TrialLogger(Protocol):
    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None: ...
    def close(self, status: str) -> None: ...


class NullLogger:
    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        return None

    def close(self, status: str) -> None:
        pass


def trial_config(trial: Trial, record: TrialRecord) -> dict[str, Any]:
    """The settings that define a trial, flat, as W&B config and MLflow params."""
    return {
        "trial_id": trial.id,
        "optimizer": trial.kind,
        "seed": trial.seed,
        "student": record.student,
        "teacher": record.teacher or "",
        "student_model": record.student_model,
        "teacher_model": record.teacher_model or "",
        "student_simulated": record.student_simulated,
        "teacher_simulated": record.teacher_simulated,
        "program": trial.program,
        "metric": trial.metric,
        "data_fingerprint": record.data_fingerprint,
        **{f"settings.{k}": v for k, v in trial.settings.items()},
    }


def simulation_tags(record: TrialRecord) -> dict[str, str]:
    """Whether a trial's scores are simulated, as MLflow tags (runs and registered versions)."""
    return {
        "simulated": str(record.simulated).lower(),
        "student_simulated": str(record.student_simulated).lower(),
        "teacher_simulated": str(record.teacher_simulated).lower(),
    }


def figures(record: TrialRecord) -> dict[str, float]:
    return {k: float(getattr(record, k)) for k in FIGURES if getattr(record, k) is not None}


class WandbLogger:
    """Offline runs land under the state dir (`wandb sync` uploads them later). An online W&B that
    cannot be reached within `ONLINE_TIMEOUT_S` switches the rest of the sweep to offline runs."""

    ONLINE_TIMEOUT_S = 20

    def __init__(self, spec: WandbSpec, sweep: str, state: State) -> None:
        self.spec, self.sweep, self.state = spec, sweep, state
        self.mode = spec.mode
        os.environ.setdefault("WANDB_SILENT", "true")
        state.wandb.mkdir(parents=True, exist_ok=True)

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        import wandb

        run = self._init(
            project=self.spec.project,
            entity=self.spec.entity,
            group=self.sweep,
            job_type=trial.kind,
            name=trial.id,
            config=trial_config(trial, record),
            dir=str(self.state.wandb),
            reinit="create_new",
            tags=[record.status, *(["SIMULATED"] if record.simulated else [])],
        )
        run.summary.update({**figures(record), "status": record.status, "error": record.error or ""})
        if result.predictions:
            table = wandb.Table(columns=["inputs", "prediction", "gold", "score"])
            for p in result.predictions:
                table.add_data(
                    *(json.dumps(p[k], ensure_ascii=False) for k in ("inputs", "prediction", "gold")), p["score"]
                )
            run.log({"val_predictions": table})
        run.finish(exit_code=0 if record.status == "ok" else 1)
        return None

    def _init(self, **kwargs: Any) -> Any:
        import wandb

        if self.mode == "online":
            try:
                return wandb.init(mode="online", settings=wandb.Settings(init_timeout=self.ONLINE_TIMEOUT_S), **kwargs)
            except Exception as exc:
                print(
                    f"W&B is unreachable ({type(exc).__name__}); logging offline under {self.state.wandb} (`wandb sync` uploads later)"
                )
                self.mode = "offline"
        return wandb.init(mode=self.mode, **kwargs)

    def close(self, status: str) -> None:
        pass


class MlflowLogger:
    """Child runs carry params, metrics, tags and the program (JSON state + metadata)."""

    def __init__(self, spec: MlflowSpec, sweep: Sweep, state: State, fingerprint: str, resume: bool = False) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(spec, state)
        self.client = MlflowClient(self.uri)
        self.sweep = sweep
        name = spec.experiment or sweep.name
        experiment = self.client.get_experiment_by_name(name)
        # A local store keeps artifacts in the state dir too (MLflow's default is ./mlruns).
        location = None if self.uri.startswith("http") else (state.root / "mlartifacts").as_uri()
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, location)
        tags = {"dspy_sweeps.sweep": sweep.name, "data_fingerprint": fingerprint}
        previous = self._last_parent(sweep.name) if resume else None
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

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        from mlflow.entities import Metric, Param, RunTag

        tags = {"mlflow.parentRunId": self.parent, "trial": trial.id, "optimizer": trial.kind, "status": record.status}
        tags |= simulation_tags(record)
        if record.error:
            tags["error"] = record.error
        run_id = self.client.create_run(self.experiment_id, run_name=trial.id, tags=tags).info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in trial_config(trial, record).items()]
        metrics = [Metric(k, v, 0, 0) for k, v in figures(record).items()]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("sweep", self.sweep.name)])
        if result.program:
            self.client.log_text(run_id, result.program, "program/program.json")
            self.client.log_dict(run_id, program_metadata(self.sweep, trial, record), "program/metadata.json")
        self.client.set_terminated(run_id, "FINISHED" if record.status == "ok" else "FAILED")
        return run_id

    def close(self, status: str) -> None:
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
        "inputs": list(sweep.data.inputs),
        "val_score": record.val_score,
        "test_score": record.test_score,
        "student_simulated": record.student_simulated,
        "teacher_simulated": record.teacher_simulated,
        "data_fingerprint": record.data_fingerprint,
        "versions": {pkg: version(pkg) for pkg in ("dspy", "dspy-sweeps", "mlflow", "ray")},
    }


@dataclass
class Trackers:
    wandb: TrialLogger
    mlflow: TrialLogger

    @classmethod
    def open(cls, sweep: Sweep, state: State, fingerprint: str, resume: bool = False) -> Trackers:
        spec = sweep.tracking
        wandb = (
            WandbLogger(spec.wandb, sweep.name, state) if spec.wandb and spec.wandb.mode != "disabled" else NullLogger()
        )
        mlflow = MlflowLogger(spec.mlflow, sweep, state, fingerprint, resume) if spec.mlflow else NullLogger()
        return cls(wandb, mlflow)

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        """Log to both; returns the trial's MLflow run id (promotion registers from it)."""
        run_id = self.mlflow.log_trial(trial, record, result)
        self.wandb.log_trial(trial, record, result)
        return run_id

    def close(self, status: str) -> None:
        self.wandb.close(status)
        self.mlflow.close(status)


def is_local_tracking_uri(uri: str) -> bool:
    """True for a URI only one machine can use: sqlite:, file:, or a plain path."""
    if uri.strip().lower() in ("databricks", "databricks-uc"):  # MLflow's names for a Databricks workspace
        return False
    scheme = urlparse(uri).scheme.lower()
    return scheme in ("sqlite", "file") or len(scheme) <= 1  # "" is a plain path, "c" a Windows drive


def check_tracking_for_cluster(tracking_uri: str) -> None:
    """Refuse a machine-local MLflow store when Ray has more than one alive node.

    Call after Ray is initialised: the trials run on other nodes, and the job's driver
    (which logs to MLflow) runs on a node whose disk the user never sees.
    """
    if not is_local_tracking_uri(tracking_uri):
        return
    import ray

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    if alive > 1:
        raise SweepError(
            f"MLflow tracking URI {tracking_uri}: a sqlite:/// or file MLflow URI cannot be shared by a "
            f"multi-node cluster ({alive} nodes); run an MLflow server (cluster/mlflow) and set MLFLOW_TRACKING_URI"
        )
