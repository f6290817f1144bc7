"""Progress events from inside running trials, and a pruned trial's record.

Run: ``.venv/bin/python -m pytest -q -n 0 tests/integration/test_progress_events.py``. Trials run
in-process (`run_trial` in threads, as a trial host runs them) against the simulated endpoint on
loopback, with `TrialStream` as their event sink; no Ray.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sweep_helpers import REPO, demo_answer_key

from dspy_sweeps.data import load_dataset
from dspy_sweeps.lm.build import build_lm
from dspy_sweeps.run.events import TrialEvent
from dspy_sweeps.run.progress import TrialStream, step_of
from dspy_sweeps.run.trial import TrialLMs, run_trial
from dspy_sweeps.sim.launch import SimServer
from dspy_sweeps.spec.plan import plan_trials
from dspy_sweeps.spec.schema import ModelSpec, load_sweep

OPTIMIZERS = [
    "optimizers=[{kind: mipro_v2, auto: null, num_candidates: 3, num_trials: 6, minibatch_size: 5},"
    " {kind: gepa, max_metric_calls: 60}]"
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sim")
    with SimServer(demo_answer_key(root / "key.jsonl"), root / "sim", time_scale=0.01) as server:
        yield server


def lms_for(sim: SimServer, student: str = "student") -> TrialLMs:
    def lm(name: str):
        return build_lm(ModelSpec(name=name, model=f"openai/{name}", api_base=sim.base_url), cache=False)

    return TrialLMs(lm(student), lm("teacher"))


def sweep_trials(overrides: list[str]):
    sweep = load_sweep(REPO / "sweeps/demo.yaml", ["data.split={train: 10, val: 10, test: 10, seed: 0}", *overrides])
    return sweep, load_dataset(sweep.data), [t for t in plan_trials(sweep) if t.kind != "none"]


def test_mipro_and_gepa_trials_stream_events_at_increasing_steps(sim: SimServer, tmp_path: Path) -> None:
    _, data, trials = sweep_trials(OPTIMIZERS)
    events: dict[str, list[TrialEvent]] = {t.id: [] for t in trials}
    results = {}

    def run(trial) -> None:
        stream = TrialStream(trial.id, events[trial.id].append)
        results[trial.kind] = run_trial(trial, data, lms_for(sim), tmp_path / trial.id, stream)

    threads = [threading.Thread(target=run, args=(t,)) for t in trials]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {k: r.status for k, r in results.items()} == {"mipro_v2": "ok", "gepa": "ok"}
    for trial in trials:
        seen = events[trial.id]
        assert len(seen) >= 5, (trial.kind, seen)
        assert {e.trial_id for e in seen} == {trial.id}
        assert [e.step for e in seen] == sorted(e.step for e in seen)
        assert seen[-1].step > seen[0].step
        assert all(e.step == step_of(e.calls) for e in seen)
        assert [e.calls for e in seen] == sorted(e.calls for e in seen) and seen[-1].tokens > 0
        assert {"compile", "val", "test"} <= {e.phase for e in seen}, {e.phase for e in seen}
        # the best so far never drops, and is what the trial scored on val at the end at least
        bests = [e.best for e in seen if e.best is not None]
        assert bests == sorted(bests)
        val = next(e for e in seen if e.phase == "val")
        assert val.score == results[trial.kind].val_score and val.best >= val.score
