"""The driver's Optuna side of a sweep: which trial runs next, whether a running trial stops, outcomes.

    study = SweepStudy.open(prepared, state, resume=..., finished={id: (status, val) of kept records})
    while (trial := study.next_trial()) is not None: start it        # baselines, then grid or samples
    host's on_event(event) -> study.on_event(event)                  # True: stop this trial
    when it ends: study.trial_finished(trial.id, result)            # COMPLETE, PRUNED or FAIL

The study lives in the state directory (`optuna/<sweep>.log`, Optuna's journal storage: each
report and tell is a line appended to a file, where SQLite took a commit and re-read the trials,
tens of milliseconds per event on the driver with a few hundred trials running), so a
resumed sweep continues the same search: finished trials are not asked again, and a trial
left running by a killed driver is marked failed and its point asked again first. Events feed
the pruner the trial's best score so far at its call-spend steps (`run/progress.py`): a step
the trial passed between two events gets the best it had then, so every trial has a value at
every step it reached and pruners compare trials at equal spend. Baselines are never pruned.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from dspy_sweeps.run.events import TrialEvent
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial, baselines
from dspy_sweeps.spec.preflight import Prepared
from dspy_sweeps.state import State

TRIAL_ID = "trial_id"  # user attribute naming the sweep trial an Optuna trial ran
SUPERSEDED = "superseded"  # study attribute: numbers of trials a killed driver left running, asked again
Ended = tuple[str, float | None]  # a finished trial's status and validation score


def study_storage(state: State, sweep: str) -> Any:
    """The sweep's Optuna storage: a journal file in the state directory."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = state.root / "optuna" / f"{sweep}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


@dataclass
class _Running:
    optuna_trial: Any
    step: int = 0  # last step reported to Optuna
    best: float | None = None


@dataclass
class SweepStudy:
    prepared: Prepared
    study: Any
    queue: list[Trial]  # trials to start before sampling: baselines, a plain grid, re-asked points
    total: int  # Optuna trials the sweep runs in all (a plain grid: its trials; a search: search.trials)
    prunes: bool
    ended: dict[str, Ended]  # how each finished trial ended, by id: a point sampled again is not re-run
    running: dict[str, _Running] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(
        cls, prepared: Prepared, state: State, resume: bool, finished: dict[str, Ended] | None = None
    ) -> SweepStudy:
        import optuna

        from dspy_sweeps.spec import search

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sweep = prepared.sweep
        storage = study_storage(state, sweep.name)
        if not resume and sweep.name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            optuna.delete_study(study_name=sweep.name, storage=storage)  # a fresh run is a fresh search
        study = optuna.create_study(
            storage=storage,
            study_name=sweep.name,
            direction="maximize",
            pruner=search.build_pruner(sweep.prune),
            load_if_exists=True,
        )
        if sweep.search:  # seeded past the trials a resumed study has, or it would draw the same points again
            study.sampler = search.sampler(sweep, started=len(study.trials))
        planned = baselines(sweep, prepared.basis) if sweep.search else prepared.trials
        total = search.trial_count(sweep) if sweep.search else sum(t.kind != "none" for t in planned)
        ended = dict(finished or {})
        queue = [t for t in planned if t.id not in ended]
        self = cls(prepared, study, queue, total, prunes=sweep.prune is not None, ended=ended)
        self._supersede_stale()
        return self

    def _supersede_stale(self) -> None:
        """Trials a killed driver left RUNNING: failed, and their points asked again first."""
        from optuna.trial import TrialState

        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        superseded = self.study.user_attrs.get(SUPERSEDED, []) + [t.number for t in stale]
        self.study.set_user_attr(SUPERSEDED, superseded)
        for frozen in stale:
            self.study.tell(frozen.number, state=TrialState.FAIL)
            if self.prepared.sweep.search is not None:
                self.study.enqueue_trial(frozen.params)

    def next_trial(self) -> Trial | None:
        """The next trial to start, or None when every trial has been started."""
        from dspy_sweeps.spec import search

        with self._lock:
            while self.queue:
                trial = self.queue.pop(0)
                self._start(trial, None if trial.kind == "none" else self.study.ask())
                return trial
            while self.prepared.sweep.search is not None and self._asked() < self.total:
                asked = self.study.ask()
                trial = search.suggest(self.prepared.sweep, asked, self.prepared.basis)
                if trial.id in self.ended or trial.id in self.running:  # a point sampled again: its outcome stands
                    self._tell_known(asked, self.ended.get(trial.id))
                    continue
                self._start(trial, asked)
                return _estimated(trial, self.prepared)
            return None

    def _tell_known(self, asked: Any, ended: Ended | None) -> None:
        """A trial whose point already ran (or is running: None) gets that outcome, not a second run."""
        from optuna.trial import TrialState

        status, val = ended or ("running", None)
        if status == "ok" and val is not None:
            _tell(self.study, asked, val)
        else:
            _tell(self.study, asked, state=TrialState.PRUNED if status == "pruned" else TrialState.FAIL)

    def remaining(self) -> int:
        """Trials still to start: the queued ones, then a search's points not asked yet."""
        unasked = self.total - self._asked() if self.prepared.sweep.search is not None else 0
        return len(self.queue) + max(unasked, 0)

    def _start(self, trial: Trial, asked: Any) -> None:
        if asked is not None:
            asked.set_user_attr(TRIAL_ID, trial.id)
            self.running[trial.id] = _Running(asked)

    def _asked(self) -> int:
        from optuna.trial import TrialState

        superseded = set(self.study.user_attrs.get(SUPERSEDED, []))
        trials = self.study.get_trials(deepcopy=False)  # a WAITING trial is a re-asked point, not yet started
        return sum(t.number not in superseded and t.state != TrialState.WAITING for t in trials)

    def on_event(self, event: TrialEvent) -> bool:
        """Report the trial's best so far at its step; True when the pruner says stop it."""
        with self._lock:
            run = self.running.get(event.trial_id)
            if not self.prunes or run is None or event.best is None or event.phase == "test":
                return False  # no pruner, a baseline, nothing scored yet, or a trial that has finished its work
            step = max(run.step, 1)
            while step * 2 <= event.step:  # steps passed since the last event: the best it had then
                step *= 2
                if run.best is not None and step < event.step:
                    run.optuna_trial.report(run.best, step)
            if event.step > run.step:  # within the same step Optuna keeps the first value
                run.optuna_trial.report(event.best, event.step)
                run.step = event.step
            run.best = event.best
            return self.prunes and run.optuna_trial.should_prune()

    def trial_finished(self, trial_id: str, result: TrialResult) -> None:
        """Tell the study how the trial ended: its val score, pruned, or failed (never a score of 0)."""
        from optuna.trial import TrialState

        with self._lock:
            run = self.running.pop(trial_id, None)
            self.ended[trial_id] = (result.status, result.val_score)
            if run is None:
                return
            if result.status == "ok" and result.val_score is not None:
                _tell(self.study, run.optuna_trial, result.val_score)
            elif result.status == "pruned":
                _tell(self.study, run.optuna_trial, state=TrialState.PRUNED)
            else:
                _tell(self.study, run.optuna_trial, state=TrialState.FAIL)


def _tell(study: Any, trial: Any, value: float | None = None, state: Any = None) -> None:
    """`study.tell`. Once every grid point is visited, GridSampler asks the study to stop, which
    raises outside `study.optimize`; the outcome is stored before it asks, and `next_trial` counts."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def _estimated(trial: Trial, prepared: Prepared) -> Trial:
    import dataclasses

    from dspy_sweeps.spec.imports import build_program
    from dspy_sweeps.spec.optimizers import estimate_calls

    data = prepared.data
    sizes = (len(data.train), len(data.val), len(data.test))
    predictors = len(build_program(prepared.sweep.program).predictors())
    return dataclasses.replace(trial, estimated_calls=estimate_calls(trial.kind, trial.settings, sizes, predictors))
