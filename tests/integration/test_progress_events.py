"""Progress events from inside running trials, and a pruned trial's record.

Run: ``.venv/bin/python -m pytest -q -n 0 tests/integration/test_progress_events.py``. Trials run
in-process (`run_trial` in threads, as a trial host runs them) against the simulated endpoint on
loopback, with `TrialStream` as their event sink; no Ray.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import dspy
import pytest
from sweep_helpers import REPO, demo_answer_key

from dspy_sweeps.data import load_dataset
from dspy_sweeps.lm.build import build_lm
from dspy_sweeps.run.events import TrialEvent
from dspy_sweeps.run.hosts import Channel, TrialHost
from dspy_sweeps.run.progress import TrialStream, step_of
from dspy_sweeps.run.trial import TrialLMs, run_trial
from dspy_sweeps.spec.plan import plan_trials
from dspy_sweeps.spec.schema import ModelSpec, load_sweep
from dspy_sweeps_sim.launch import SimServer

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
    return sweep, load_dataset(sweep.data), [t for t in plan_trials(sweep, "") if t.kind != "none"]


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


class Driver:
    """The production stop path with no Ray in between: a trial's events go into a trial host's
    `Channel`, the driver drains them from the host and answers "stop" with `TrialHost.stop`, and
    the trial's next event raises `Pruned` in the channel, as on a real host."""

    def __init__(self, trial_id: str, answer) -> None:
        self.host = TrialHost(lambda *args: None, None)
        self.channel, self.answer = Channel(trial_id, self.host), answer
        self.seen: list[TrialEvent] = []
        self.answers: list[bool] = []

    def send(self, event: TrialEvent) -> None:
        self.channel.emit(event)
        for drained in self.host.drain():  # the driver's side (run/hosts.py HostPool forwards them)
            self.seen.append(drained)
            self.answers.append(bool(self.answer(drained)))
            if self.answers[-1]:
                self.host.stop(drained.trial_id)


def host(trial, data, lms, workdir: Path, study) -> tuple[object, list[TrialEvent], list[bool]]:
    """What a trial host and the driver do for one trial: events to the study, its answer back."""
    driver = Driver(trial.id, study.on_event)
    stream = TrialStream(trial.id, driver.send)
    seen, answers = driver.seen, driver.answers
    result = run_trial(trial, data, lms, workdir, stream)
    # the gateway's accounting in a sweep; here the trial's own meter stands in for it
    result.calls_requested, result.failed_calls = stream.spend.calls, stream.spend.failed_calls
    result.cost_usd = stream.spend.cost_usd
    study.trial_finished(trial.id, result)
    return result, seen, answers


def test_a_trial_on_the_simulators_weak_profile_is_pruned_recorded_pruned_with_its_calls(
    sim: SimServer, tmp_path: Path
) -> None:
    """A weak student (the simulator's student profile) against a strong one (its teacher profile
    served as a student): by the constants of those profiles (sim/answers.py) the weak trial's best
    so far trails the strong one's at the same spend, and the median pruner stops it. The subject
    is the stop and the record (a test on the simulator, not of a real weak model)."""
    import optuna

    from dspy_sweeps.run.pruning import SweepStudy, study_storage
    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.state import State
    from dspy_sweeps.track.registry import best
    from dspy_sweeps.track.results import TrialRecord, leaderboard, write_records

    students = (
        f"students=[{{name: sound, model: openai/teacher, api_base: '{sim.base_url}'}},"
        f" {{name: hopeless, model: openai/student, api_base: '{sim.base_url}'}}]"
    )
    sweep, data, _ = sweep_trials(
        [
            students,
            f"teachers=[{{name: big, model: openai/teacher, api_base: '{sim.base_url}'}}]",
            "optimizers=[{kind: mipro_v2, auto: null, num_candidates: 3, num_trials: 6, minibatch_size: 5}]",
            "prune={kind: median, n_startup_trials: 1}",
            "tracking={wandb: null, mlflow: null}",
            "promote=null",
        ]
    )
    prepared = prepare(sweep)
    state = State(tmp_path / "state")
    study = SweepStudy.open(prepared, state, resume=False)
    lms = {s.name: build_lm(s.model_copy(update={"name": s.name}), cache=False) for s in sweep.students}
    teacher = build_lm(sweep.teachers[0], cache=False)
    outcomes = {}
    while (trial := study.next_trial()) is not None:  # one at a time: the sound trial completes first
        trial_lms = TrialLMs(lms[trial.student.name], teacher)
        outcomes[(trial.kind, trial.student.name)] = (trial, *host(trial, data, trial_lms, tmp_path / trial.id, study))

    sound, sound_result, _, _ = outcomes[("mipro_v2", "sound")]
    hopeless, result, seen, answers = outcomes[("mipro_v2", "hopeless")]
    assert sound_result.status == "ok" and sound_result.val_score > 0
    assert result.status == "pruned", (result.error, [(e.phase, e.step, e.best) for e in seen])
    # stopped within one evaluation: the event the driver answered "stop" to is the trial's last
    assert answers.index(True) == len(answers) - 1
    assert "val" not in {e.phase for e in seen}  # it never reached the platform's val and test scoring
    assert 0 < result.calls_requested < sound_result.calls_requested
    assert result.val_score == max(e.best for e in seen)  # its best candidate, kept with its score
    assert result.program is not None and result.test_score is None

    records = [TrialRecord.of(sweep.name, t, r, None, data.fingerprint) for t, r, _, _ in outcomes.values()]
    write_records(state.results(sweep.name), records)
    rows = {r["trial_id"]: r for r in leaderboard(state.results(sweep.name))}
    assert rows[hopeless.id]["status"] == "pruned" and rows[hopeless.id]["error"]
    assert rows[hopeless.id]["calls_requested"] == result.calls_requested  # its spend stays in the accounting
    assert best(records).trial_id != hopeless.id
    stored = optuna.load_study(study_name=sweep.name, storage=study_storage(state, sweep.name))
    assert [t.state.name for t in stored.trials] == ["COMPLETE", "PRUNED"]


def test_a_gepa_trial_told_to_stop_ends_at_its_next_evaluation(sim: SimServer, tmp_path: Path) -> None:
    """GEPA catches a candidate's errors and keeps going; a stop must still end it."""
    _, data, trials = sweep_trials(["optimizers=[{kind: gepa, max_metric_calls: 200}]"])
    driver = Driver(trials[0].id, lambda event: len(driver.seen) == 3)  # the answer to the third event: stop
    seen = driver.seen
    result = run_trial(trials[0], data, lms_for(sim), tmp_path / "gepa", TrialStream(trials[0].id, driver.send))
    assert result.status == "pruned", result
    assert len(seen) == 3, [(e.phase, e.score) for e in seen]  # nothing evaluated after the stop reported
    assert result.test_score is None


def test_copro_scores_on_train_never_pass_as_val_scores(sim: SimServer, tmp_path: Path) -> None:
    """COPRO scores its candidates on the train split; here train (20) is larger than val (10), so
    a split told by its size would take every COPRO score for a val score. The events say "train",
    the best so far stays empty until the platform's own val score, and a COPRO trial pruned before
    that keeps no train-scored candidate as its val score."""
    _, data, trials = sweep_trials(
        ["data.split={train: 20, val: 10, test: 10, seed: 0}", "optimizers=[{kind: copro, breadth: 3, depth: 1}]"]
    )
    assert len(data.train) > len(data.val)
    seen: list[TrialEvent] = []
    result = run_trial(trials[0], data, lms_for(sim), tmp_path / "copro", TrialStream(trials[0].id, seen.append))
    assert result.status == "ok", result.error
    compiling = [e for e in seen if e.phase not in ("val", "test")]
    assert compiling and {e.phase for e in compiling} == {"train"}, [(e.phase, e.score) for e in seen]
    assert all(e.best is None for e in compiling)
    val = next(e for e in seen if e.phase == "val")
    assert val.best == val.score == result.val_score

    driver = Driver(trials[0].id, lambda event: True)  # the driver's answer to COPRO's first train score: stop
    pruned_seen = driver.seen
    stream = TrialStream(trials[0].id, driver.send)
    pruned = run_trial(trials[0], data, lms_for(sim), tmp_path / "copro-pruned", stream)
    assert pruned.status == "pruned", pruned
    assert [e.phase for e in pruned_seen] == ["train"]  # stopped in COPRO's search, before any val score
    assert pruned.val_score is None and pruned.program is None  # no val-scored candidate existed yet


def test_a_finished_trial_leaves_no_prediction_behind_in_its_host(sim: SimServer, tmp_path: Path) -> None:
    """A host runs trial after trial in one process: DSPy's process-wide trace (up to 10,000
    predictions, each holding its predictor and inputs) must not keep a finished trial's work."""
    _, data, trials = sweep_trials([OPTIMIZERS[0].split(", {kind: gepa")[0] + "]"])
    assert [t.kind for t in trials] == ["mipro_v2"]

    def predictions() -> int:
        gc.collect()
        return sum(isinstance(o, dspy.Prediction) for o in gc.get_objects())

    before, traced = predictions(), len(dspy.settings.trace)
    results = []
    worker = threading.Thread(  # a trial host's thread: DSPy's settings are the process's, not a copy
        target=lambda: results.append(run_trial(trials[0], data, lms_for(sim), tmp_path / "t", None))
    )
    worker.start()
    worker.join()
    assert results[0].status == "ok", results[0].error
    assert len(dspy.settings.trace) == traced
    assert predictions() <= before
