"""Which finished trials a fresh `sweep run` keeps instead of running again (`run/engine.py
reusable`): only what would come out the same, with its runs in this run's trackers. No LM is
called; the runs themselves are in tests/integration/test_reuse.py and test_demo_sweep.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dspy_sweeps.records import TrialResult
from dspy_sweeps.run.engine import reusable
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.preflight import Prepared, prepare
from dspy_sweeps.spec.schema import load_sweep
from dspy_sweeps.state import State
from dspy_sweeps.track.results import TrialRecord, write_records
from dspy_sweeps.track.tracking import tracking_identity

REPO = Path(__file__).resolve().parents[2]
GRID = "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: [1, 2, 3, 4, 5]}]"


def finished(prepared: Prepared, state: State, trial: Trial) -> TrialRecord:
    """The record an earlier run of this sweep left for `trial`: ok, tracked here, its program saved."""
    program = state.program(prepared.sweep.name, trial.id)
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text("{}")
    result = TrialResult(trial_id=trial.id, status="ok", val_score=0.5, test_score=0.5, program="{}")
    record = TrialRecord.of(prepared.sweep.name, trial, result, program, prepared.data.fingerprint)
    return dataclasses.replace(record, tracked=True, tracked_by=tracking_identity(prepared.sweep, state))


def test_only_unchanged_finished_trials_tracked_by_these_trackers_are_reused(tmp_path: Path) -> None:
    prepared = prepare(load_sweep(REPO / "sweeps/demo.yaml", [GRID]))
    state = State(tmp_path)
    kept, failed, untracked, elsewhere, lost, other_data = prepared.trials
    dropped = dataclasses.replace(kept, id="bootstrap_fewshot-dropped-from-the-grid")
    records = [
        finished(prepared, state, kept),
        dataclasses.replace(finished(prepared, state, failed), status="failed", error="boom"),
        dataclasses.replace(finished(prepared, state, untracked), tracked=False),
        dataclasses.replace(finished(prepared, state, elsewhere), tracked_by="another-mlflow-store"),
        finished(prepared, state, lost),
        dataclasses.replace(finished(prepared, state, other_data), data_fingerprint="another-split"),
        finished(prepared, state, dropped),
    ]
    Path(records[4].program_path).unlink()
    write_records(state.results(prepared.sweep.name), records)
    assert [r.trial_id for r in reusable(state, prepared)] == [kept.id]

    # The same records under other trackers, or for a sweep whose study decides its trials: none.
    moved = prepare(load_sweep(REPO / "sweeps/demo.yaml", [GRID, "tracking.mlflow.tracking_uri=http://127.0.0.1:9"]))
    assert reusable(state, moved) == []
    pruned = prepare(load_sweep(REPO / "sweeps/demo.yaml", [GRID, "prune={kind: median}"]))
    assert reusable(state, pruned) == []
