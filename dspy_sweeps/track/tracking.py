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

import hashlib
import time
from pathlib import Path
from typing import Protocol

from dspy_sweeps.records import TrialEvent, TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import Sweep, Tracking
from dspy_sweeps.state import State
from dspy_sweeps.track.background import TrackingThread
from dspy_sweeps.track.mlflow_runs import MlflowLogger
from dspy_sweeps.track.registry import Decision
from dspy_sweeps.track.results import TrialRecord, read_records
from dspy_sweeps.track.uri import tracking_uri
from dspy_sweeps.track.wandb_runs import WandbLogger


class TrialLogger(Protocol):
    def trial_started(self, trial: Trial) -> None: ...
    def trial_events(self, trial: Trial, events: list[TrialEvent]) -> None: ...
    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None: ...
    def log_sweep(self, records: list[TrialRecord]) -> None: ...
    def promoted(self, record: TrialRecord, alias: str, version: str) -> None: ...
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

    def promoted(self, record: TrialRecord, alias: str, version: str) -> None:
        pass

    def close(self, status: str) -> None:
        pass


def tracking_identity(sweep: Sweep, state: State) -> str:
    """Which trackers a run logs to, as a digest (the URI may hold credentials): its W&B settings,
    and its MLflow settings with the store they resolve to. A record tracked under another identity
    has its runs elsewhere, so a run keeps it only by running it again (`run/engine.py reusable`)."""
    spec = sweep.tracking
    stores = {
        "wandb": spec.wandb.model_dump() if _wandb_on(spec) else None,
        "mlflow": {**spec.mlflow.model_dump(), "uri": tracking_uri(spec.mlflow, state)} if spec.mlflow else None,
    }
    return hashlib.sha256(repr(sorted(stores.items())).encode()).hexdigest()[:16]


def _wandb_on(spec: Tracking) -> bool:
    return spec.wandb is not None and spec.wandb.mode != "disabled"


class Trackers:
    """W&B and MLflow behind one set of calls, their work done in order on one background thread.

    `trial_started` and `trial_event` only queue (the event transport must never wait on a
    tracker); `log_trial` and `close` wait for the queue to get to them, and raise the first
    error any tracker hit, so a broken tracker stops the sweep at the next trial's end.
    """

    SWEEP_EVERY_S = 10.0  # the leaderboard, Pareto front and plots: redrawn at most this often, and at close

    def __init__(
        self, wandb: TrialLogger, mlflow: TrialLogger, results: Path | None = None, identity: str = ""
    ) -> None:
        self.wandb, self.mlflow, self.results, self.identity = wandb, mlflow, results, identity
        self.ended: set[str] = set()  # a late event for an ended trial must not open a new run
        self.swept_at: float | None = None  # when the sweep's leaderboard was last drawn
        self.unswept: TrialRecord | None = None  # the latest end not drawn yet
        self.work = TrackingThread(self._started, self._events)

    @classmethod
    def open(cls, sweep: Sweep, state: State, fingerprint: str, resume: bool = False) -> Trackers:
        from concurrent.futures import ThreadPoolExecutor

        spec = sweep.tracking
        wandb = WandbLogger(spec.wandb, sweep.name, state, fingerprint, sweep.data) if _wandb_on(spec) else NullLogger()
        with ThreadPoolExecutor(1) as pool:
            # W&B's sweep run starts its service process while MLflow imports and opens its store.
            opened = pool.submit(wandb.open_sweep_run) if isinstance(wandb, WandbLogger) else None
            mlflow = MlflowLogger(spec.mlflow, sweep, state, fingerprint, resume) if spec.mlflow else NullLogger()
            if opened is not None:
                opened.result()
        return cls(wandb, mlflow, state.results(sweep.name), tracking_identity(sweep, state))

    @property
    def tracks(self) -> bool:
        """Whether any tracker is on: with none, a trial's end has nothing to record but its row."""
        return not (isinstance(self.wandb, NullLogger) and isinstance(self.mlflow, NullLogger))

    def trial_started(self, trial: Trial) -> None:
        self.work.start(trial)

    def trial_event(self, trial: Trial, event: TrialEvent) -> None:
        self.work.event(trial, event)

    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        """The trial's end: close its runs with their summary and update the sweep's leaderboard.
        Returns the trial's MLflow run id (promotion registers from it)."""
        return self.work.call(lambda: self._ended(trial, record, result))

    def kept(self, records: list[TrialRecord]) -> None:
        """A run that ran no trial: the sweep-level runs still get its leaderboard, of the kept trials."""
        if records:
            self.unswept = records[-1]

    def promoted(self, decision: Decision, winner: TrialRecord | None) -> None:
        """After promotion: the champion's W&B program artifact takes the alias, its LoggedModel says so."""
        if not decision.promoted or winner is None or decision.alias is None or decision.version is None:
            return
        alias, version = decision.alias, decision.version
        self.work.call(lambda: [lg.promoted(winner, alias, version) for lg in (self.mlflow, self.wandb)])

    def close(self, status: str) -> None:
        try:
            self.work.call(self._sweep_drawn)
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
        self.unswept = record
        # Drawing the leaderboard reads every record: done per trial end it would grow with the sweep.
        if self.swept_at is None or time.monotonic() - self.swept_at >= self.SWEEP_EVERY_S:
            self._sweep_drawn()
        return run_id

    def _sweep_drawn(self) -> None:
        """The sweep's leaderboard, Pareto front and plots, from the results file (which holds every
        finished trial of this sweep, resumed ones too: it is written before tracking)."""
        if self.unswept is None:
            return
        records = read_records(self.results) if self.results else [self.unswept]
        for logger in (self.mlflow, self.wandb):
            logger.log_sweep(records)
        self.swept_at, self.unswept = time.monotonic(), None
