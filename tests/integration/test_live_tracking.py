"""Live tracking, driven the way the driver drives it: a trial starts, reports events, ends.

Real W&B offline runs (read back from their `.wandb` files) and a real `mlflow server` on
loopback; no Ray: the transport that delivers events calls these same `Trackers` methods.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from wandb_reader import OfflineRun, read_runs

from dspy_sweeps.run.events import TrialEvent
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import ModelSpec, load_sweep
from dspy_sweeps.state import State
from dspy_sweeps.track.mlflow_runs import MlflowLogger
from dspy_sweeps.track.results import TrialRecord, write_records
from dspy_sweeps.track.tracking import NullLogger, Trackers
from dspy_sweeps.track.wandb_runs import WandbLogger

REPO = Path(__file__).resolve().parents[2]
STUDENT = ModelSpec(name="small", model="sim/student")
TEACHER = ModelSpec(name="big", model="sim/teacher")
EVENTS = 6


def make_trial(trial_id: str, kind: str = "mipro_v2") -> Trial:
    return Trial(trial_id, "pipelines.arith:Solve", "pipelines.arith:exact_match", kind, STUDENT, TEACHER, 0)


def events(trial: Trial, n: int = EVENTS) -> list[TrialEvent]:
    """A trial's evaluations: steps 10, 20, ... LM calls; scores rise, the best so far with them."""
    scores = [0.2 + 0.1 * i for i in range(n)]
    return [
        TrialEvent(
            trial.id,
            "compile",
            10 * (i + 1),
            s,
            max(scores[: i + 1]),
            10 * (i + 1),
            500 * (i + 1),
            0.001 * (i + 1),
            0,
            1.5 * (i + 1),
        )
        for i, s in enumerate(scores)
    ]


def end(
    trial: Trial, val: float, cost: float, results: Path, done: list[TrialRecord]
) -> tuple[TrialRecord, TrialResult]:
    """The trial's record, saved to the results file first, as the engine does."""
    result = TrialResult(trial.id, "ok", val_score=val, test_score=val, lm_calls=70, calls_requested=70, cost_usd=cost)
    record = TrialRecord.of("demo", trial, result, None, "fp")
    done.append(record)
    write_records(results, done)
    return record, result


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    """Poll a file another process writes (wandb-core) until `check` holds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.5)
    return value


@pytest.fixture
def live_wandb(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """wandb-core writes an open run's file every 15 s by default; 1 s keeps the test short."""
    import wandb

    monkeypatch.setenv("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", "1")
    yield
    wandb.teardown()  # flush and stop W&B's service, so finished runs' files are complete


def by_name(runs: list[OfflineRun]) -> dict[str, OfflineRun]:
    return {r.name: r for r in runs}


def test_wandb_runs_open_at_start_and_hold_a_history_row_per_event(tmp_path: Path, live_wandb: None) -> None:
    import wandb
    from wandb.sdk.wandb_run import Run

    state = State(tmp_path)
    sweep = load_sweep(REPO / "sweeps/demo.yaml")
    trackers = Trackers(WandbLogger(sweep.tracking.wandb, "demo", state, "fp"), NullLogger(), state.results("demo"))
    a, b = make_trial("mipro-a"), make_trial("gepa-b", "gepa")
    trackers.trial_started(a)
    trackers.trial_started(b)  # two trials' runs open at once on the driver
    for event in events(a):
        trackers.trial_event(a, event)
    for event in events(b, 3):
        trackers.trial_event(b, event)
    trackers.work.call(lambda: None)  # everything queued so far has reached W&B

    # While both trials still run, their offline files already hold their history.
    assert all(isinstance(r, Run) for r in trackers.wandb.runs.values())
    running = wait_for(
        lambda: (
            (runs := by_name(read_runs(state.wandb / "wandb")))
            and len(runs.get("mipro-a", OfflineRun("", "", "")).history) >= EVENTS
            and runs
        ),
        "mipro-a's history rows while it runs",
    )
    assert running["mipro-a"].exit_code is None  # not finished
    assert [row["calls"] for row in running["mipro-a"].history] == [10, 20, 30, 40, 50, 60]
    assert [row["best_score"] for row in running["mipro-a"].history][-1] == pytest.approx(0.7)
    assert running["mipro-a"].config["optimizer"] == "mipro_v2"

    done: list[TrialRecord] = []
    trackers.log_trial(a, *end(a, 0.8, 0.05, state.results("demo"), done))
    trackers.log_trial(b, *end(b, 0.6, 0.01, state.results("demo"), done))
    trackers.close("FINISHED")
    wandb.teardown()

    runs = by_name(read_runs(state.wandb / "wandb"))
    assert set(runs) == {"mipro-a", "gepa-b", "demo-sweep"}
    trial_a, trial_b, sweep_run = runs["mipro-a"], runs["gepa-b"], runs["demo-sweep"]
    assert len(trial_a.history) == EVENTS + 1 and len(trial_b.history) == 3 + 1  # + the end's row
    assert trial_a.history[-1]["val_score"] == 0.8 and trial_a.history[-1]["calls"] == 70
    assert trial_a.summary["val_score"] == 0.8 and trial_a.summary["status"] == "ok"
    assert trial_a.exit_code == 0 and trial_b.exit_code == 0
    # The sweep run: job type `sweep`, one leaderboard row per trial end, the last with both trials.
    assert sweep_run.job_type == "sweep"
    assert [row["trials_done"] for row in sweep_run.history] == [1, 2]
    (path,) = (state.wandb / "wandb").glob("offline-run-*/files/" + sweep_run.history[-1]["leaderboard/path"])
    table = json.loads(path.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    # a scores 0.8 for $0.05, b 0.6 for $0.01: neither beats the other on both, so both are on the front.
    assert [(r["trial_id"], r["rank"], r["on_front"]) for r in rows] == [("mipro-a", 1, True), ("gepa-b", 2, True)]
    assert sweep_run.summary["pareto_front"] == ["gepa-b", "mipro-a"]
    assert sweep_run.history[-1]["pareto/_type"] == "image-file"


def test_mlflow_child_run_is_running_with_history_before_the_trial_ends(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    state = State(tmp_path)
    sweep = load_sweep(REPO / "sweeps/demo.yaml", [f"tracking.mlflow.tracking_uri={mlflow_server}"])
    sweep = sweep.model_copy(update={"name": "live-mlflow"})
    trackers = Trackers(
        NullLogger(), MlflowLogger(sweep.tracking.mlflow, sweep, state, "fp"), state.results(sweep.name)
    )
    a, b = make_trial("mipro-a"), make_trial("boot-b", "bootstrap_fewshot")
    trackers.trial_started(a)
    for event in events(a):
        trackers.trial_event(a, event)
    trackers.work.call(lambda: None)  # the queue has reached the server

    client = MlflowClient(mlflow_server)
    run_id = trackers.mlflow.runs["mipro-a"]
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["status"] == "running"
    assert run.data.tags["mlflow.parentRunId"] == trackers.mlflow.parent
    assert run.data.params["optimizer"] == "mipro_v2" and run.data.params["data_fingerprint"] == "fp"
    best = client.get_metric_history(run_id, "best_score")
    assert [(m.step, round(m.value, 3)) for m in sorted(best, key=lambda m: m.step)] == [
        (10, 0.2),
        (20, 0.3),
        (30, 0.4),
        (40, 0.5),
        (50, 0.6),
        (60, 0.7),
    ]

    done: list[TrialRecord] = []
    assert trackers.log_trial(a, *end(a, 0.8, 0.05, state.results(sweep.name), done)) == run_id
    # b never sent an event (today's runner): its run opens at its end.
    b_run = trackers.log_trial(b, *end(b, 0.9, 0.02, state.results(sweep.name), done))
    trackers.trial_event(a, events(a)[-1])  # an event that arrives after a's end opens no new run
    trackers.close("FINISHED")

    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["status"] == "ok"
    assert finished.data.metrics["val_score"] == 0.8
    calls = client.get_metric_history(run_id, "lm_calls")
    assert max(calls, key=lambda m: m.step).step == 70 and max(calls, key=lambda m: m.step).value == 70
    assert client.get_run(b_run).info.status == "FINISHED"
    children = client.search_runs(
        [trackers.mlflow.experiment_id], f"tags.mlflow.parentRunId = '{trackers.mlflow.parent}'"
    )
    assert sorted(r.info.run_name for r in children) == ["boot-b", "mipro-a"]
    parent = trackers.mlflow.parent
    assert {f.path for f in client.list_artifacts(parent)} >= {"leaderboard.json", "pareto.png"}
    board = json.loads(Path(client.download_artifacts(parent, "leaderboard.json", str(tmp_path / "dl"))).read_text())
    # b scores higher for less: it dominates a.
    assert [(t["trial_id"], t["on_front"]) for t in board["trials"]] == [("boot-b", True), ("mipro-a", False)]
    png = Path(client.download_artifacts(parent, "pareto.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_closes_a_child_run_its_dead_driver_left_running(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    state = State(tmp_path)
    sweep = load_sweep(REPO / "sweeps/demo.yaml", [f"tracking.mlflow.tracking_uri={mlflow_server}"])
    sweep = sweep.model_copy(update={"name": "live-resume"})
    first = Trackers(NullLogger(), MlflowLogger(sweep.tracking.mlflow, sweep, state, "fp"), state.results(sweep.name))
    a = make_trial("mipro-a")
    first.trial_started(a)
    first.trial_event(a, events(a, 1)[0])
    first.work.call(lambda: None)
    orphan = first.mlflow.runs["mipro-a"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(orphan).info.status == "RUNNING"  # the driver "dies" here: nothing closes it

    resumed = MlflowLogger(sweep.tracking.mlflow, sweep, state, "fp", resume=True)
    assert resumed.parent == first.mlflow.parent
    closed = client.get_run(orphan)
    assert closed.info.status == "KILLED" and closed.data.tags["status"] == "interrupted"
    resumed.trial_started(a)
    assert resumed.runs["mipro-a"] != orphan  # the re-run trial gets a fresh run
