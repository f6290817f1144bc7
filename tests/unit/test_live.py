"""Live progress views without trackers: the Pareto front, the running-trials board and table,
the progress lines `sweep status` reads, and the order and batching of the trackers' thread."""

from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from dspy_sweeps.cli.tables import progress_view
from dspy_sweeps.run.events import TrialEvent
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import ModelSpec
from dspy_sweeps.track.background import TrackingThread
from dspy_sweeps.track.live import LiveProgress, RunningTrials, Snapshot, last_snapshot, progress_lines
from dspy_sweeps.track.pareto import pareto_front, ranked
from dspy_sweeps.track.results import TrialRecord

STUDENT = ModelSpec(name="small", model="sim/student")


def trial(trial_id: str, kind: str = "gepa") -> Trial:
    return Trial(trial_id, "pipelines.arith:Solve", "pipelines.arith:exact_match", kind, STUDENT, None, 0)


def record(trial_id: str, val: float | None, cost: float, status: str = "ok") -> TrialRecord:
    result = TrialResult(trial_id, status, val_score=val, cost_usd=cost, error=None if status == "ok" else "boom")
    return TrialRecord.of("demo", trial(trial_id), result, None, "fp")


def event(trial_id: str, step: int, best: float | None, phase: str = "compile") -> TrialEvent:
    return TrialEvent(trial_id, phase, step, best, best, step, 100 * step, 0.001 * step, 0, step / 10)


def test_pareto_front_keeps_trials_no_other_beats_on_score_and_cost() -> None:
    records = [
        record("cheap", 0.50, 0.01),  # cheapest: on the front
        record("mid", 0.70, 0.05),  # on the front
        record("worse", 0.60, 0.06),  # mid scores more for less
        record("tie", 0.70, 0.08),  # same score as mid, dearer
        record("best", 0.90, 0.20),  # highest score: on the front
        record("failed", None, 0.0, status="failed"),  # no score: never on the front
    ]
    assert pareto_front(records) == {"cheap", "mid", "best"}
    assert [r.trial_id for r in ranked(records)] == ["best", "mid", "tie", "worse", "cheap", "failed"]


def test_equal_trials_are_both_on_the_front() -> None:
    assert pareto_front([record("a", 0.5, 0.1), record("b", 0.5, 0.1)]) == {"a", "b"}


def test_running_table_shows_phase_calls_best_cost_and_elapsed() -> None:
    now = [100.0]
    board = RunningTrials(total=3, clock=lambda: now[0])
    board.start(trial("gepa-a"))
    board.update(trial("mipro-b", "mipro_v2"), event("mipro-b", 40, 0.625, phase="val"))  # no start seen
    now[0] = 130.0
    console = Console(record=True, width=120)
    progress = LiveProgress(board, console)
    progress.add_task("trials", total=3, completed=1)
    for renderable in progress.get_renderables():
        console.print(renderable)
    text = console.export_text()
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("│ ") and "-" in line}
    assert "gepa-a" in lines and "mipro-b" in lines
    assert lines["gepa-a"].split("│")[3].strip() == "starting"
    b = [cell.strip() for cell in lines["mipro-b"].split("│")[1:-1]]
    # trial, optimizer, phase, calls, best so far, $, elapsed (4 s at the event + 30 s since)
    assert b == ["mipro-b", "mipro_v2", "val", "40", "0.625", "0.0400", "0:00:34"]
    assert text.index("running") < text.index("trials")  # the table sits above the bar
    assert "1/3" in text

    board.finish("mipro-b")
    board.finish("gepa-a")
    board.update(trial("mipro-b", "mipro_v2"), event("mipro-b", 50, 0.7))  # late, after its end
    assert board.rows() == [] and board.done == 2
    console = Console(record=True, width=120)
    for renderable in progress.get_renderables():
        console.print(renderable)
    assert "running" not in console.export_text()  # with nothing running, only the bar


def test_progress_line_round_trips_and_the_last_whole_one_wins() -> None:
    board = RunningTrials(total=5, done=2)
    board.update(trial("gepa-a"), event("gepa-a", 20, 0.5))
    first = board.snapshot()
    board.update(trial("gepa-a"), event("gepa-a", 30, 0.75))
    second = board.snapshot()
    log = "\n".join(
        [
            "demo: 5 trials",
            first.line(),
            "  none-small  val 0.400",
            second.line(),
            second.line()[:40],  # the driver was cut off mid-line
            "(log stream ended)",
        ]
    )
    found = last_snapshot(log)
    assert found == second
    assert (found.done, found.total) == (2, 5)
    assert [(r.trial_id, r.calls, r.best) for r in found.running] == [("gepa-a", 30, 0.75)]
    assert last_snapshot("no progress here\n") is None


def test_progress_view_for_status() -> None:
    snapshot = Snapshot(at=1000.0, done=2, total=5, running=RunningTrials(5).rows())
    assert progress_view(snapshot, running=True, now=1012.0) == "trials: 2/5 done (as of 12s ago)"
    board = RunningTrials(total=5, done=2)
    board.update(trial("gepa-a"), event("gepa-a", 20, 0.5))
    snapshot = Snapshot(1000.0, 2, 5, board.rows())
    console = Console(record=True, width=120)
    console.print(progress_view(snapshot, running=True, now=1012.0))
    text = console.export_text()
    assert "trials: 2/5 done (as of 12s ago)" in text and "gepa-a" in text and "0.500" in text
    console = Console(record=True, width=120)
    console.print(progress_view(snapshot, running=False, now=1012.0))  # the job ended: no stale table
    assert "gepa-a" not in console.export_text()


def test_progress_lines_off_a_terminal_print_the_board_once_it_changed() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80)  # not a terminal, and narrow: the JSON line must not wrap
    board = RunningTrials(total=2)
    with progress_lines(board, console, every_s=3600):  # no tick during the test: only the last word
        board.update(
            trial("gepa-a-with-a-long-name-that-would-wrap"), event("gepa-a-with-a-long-name-that-would-wrap", 10, 0.5)
        )
        board.finish("gepa-a-with-a-long-name-that-would-wrap")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert last_snapshot(out.getvalue()) == Snapshot(last_snapshot(lines[0]).at, 1, 2, [])


def test_tracking_thread_batches_waiting_events_per_trial_in_order() -> None:
    calls: list[tuple[str, str, list[int]]] = []
    hold, holding = threading.Event(), threading.Event()

    def on_start(t: Trial) -> None:
        calls.append(("start", t.id, []))
        if t.id == "a":  # keep the thread busy while events pile up behind it
            holding.set()
            hold.wait()

    thread = TrackingThread(on_start, lambda t, evs: calls.append(("events", t.id, [e.step for e in evs])))
    thread.start(trial("a"))
    holding.wait()
    for step in (10, 20, 30):
        thread.event(trial("a"), event("a", step, 0.1))
    thread.start(trial("b"))
    thread.event(trial("b"), event("b", 5, 0.1))
    thread.event(trial("a"), event("a", 40, 0.1))
    hold.set()
    assert thread.call(lambda: "end") == "end"
    thread.stop()
    # a's events before b's start went together; after b's start, the rest of both trials' events.
    assert calls == [
        ("start", "a", []),
        ("events", "a", [10, 20, 30]),
        ("start", "b", []),
        ("events", "b", [5]),
        ("events", "a", [40]),
    ]


def test_a_tracker_error_reaches_the_next_caller_and_stops_tracking() -> None:
    seen: list[int] = []

    def on_events(t: Trial, evs: list[TrialEvent]) -> None:
        if evs[0].step == 20:
            raise ConnectionError("mlflow server gone")
        seen.extend(e.step for e in evs)

    thread = TrackingThread(lambda t: None, on_events)
    thread.event(trial("a"), event("a", 10, 0.1))
    thread.call(lambda: None)
    thread.event(trial("b"), event("b", 20, 0.1))
    with pytest.raises(ConnectionError, match="mlflow server gone"):
        thread.call(lambda: "end of a trial")
    thread.event(trial("a"), event("a", 30, 0.1))
    with pytest.raises(ConnectionError):
        thread.call(lambda: None)
    thread.stop()
    assert seen == [10]  # nothing after the error was logged


def test_off_a_terminal_the_live_display_draws_once_not_per_refresh() -> None:
    out = io.StringIO()
    board = RunningTrials(total=2)
    with LiveProgress(board, Console(file=out, width=120)) as progress:
        task = progress.add_task("trials", total=2)
        for step in range(1, 51):
            board.update(trial("gepa-a"), event("gepa-a", step, 0.5))
            progress.refresh()  # what a terminal would redraw 50 times
        board.finish("gepa-a")
        progress.advance(task)
    bars = [line for line in out.getvalue().splitlines() if line.startswith("trials")]
    assert len(bars) == 1 and "1/2" in bars[0]


class CountingLogger:
    """A tracker that counts what it is asked to draw (W&B and MLflow do the same work for real)."""

    def __init__(self) -> None:
        self.sweeps: list[int] = []  # records in each leaderboard drawn

    def trial_started(self, trial: Trial) -> None: ...
    def trial_events(self, trial: Trial, events: list[TrialEvent]) -> None: ...
    def log_trial(self, trial: Trial, record: TrialRecord, result: TrialResult) -> str | None:
        return None

    def log_sweep(self, records: list[TrialRecord]) -> None:
        self.sweeps.append(len(records))

    def promoted(self, record: TrialRecord, alias: str, version: str) -> None: ...
    def close(self, status: str) -> None: ...


def test_the_leaderboard_is_drawn_at_most_every_few_seconds_and_at_close(tmp_path) -> None:
    from dspy_sweeps.track.results import write_records
    from dspy_sweeps.track.tracking import Trackers

    results = tmp_path / "results.parquet"
    ends = [record(f"t{i}", 0.5, 0.01) for i in range(50)]
    write_records(results, ends)  # the engine writes the results file before tracking
    wandb, mlflow = CountingLogger(), CountingLogger()
    trackers = Trackers(wandb, mlflow, results)
    trackers.SWEEP_EVERY_S = 3600.0  # no redraw falls due while the 50 trials end
    for end in ends:
        trackers.log_trial(trial(end.trial_id), end, TrialResult(end.trial_id, "ok"))
    assert mlflow.sweeps == wandb.sweeps == [50]  # the first end draws it; the other 49 do not
    trackers.close("FINISHED")
    assert mlflow.sweeps == wandb.sweeps == [50, 50]  # the last ends are drawn at close
