"""The running trials, as the terminal shows them and as `sweep status` reads them from a job's log.

`RunningTrials` is the driver's board: the event transport updates it from its thread, the
display reads it from Rich's refresh thread. On a terminal, `LiveProgress` draws the board as a
table above the progress bar. Where stdout is not a terminal (CI, a Ray job's log) Rich draws
nothing until the end, so `progress_lines` prints the board as one JSON line at most every few
seconds, only when it changed; `sweep status JOB` finds the last such line in the job's log (the
one place a submitter can read without credentials) and shows the same table.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dspy_sweeps.records import TrialEvent
from dspy_sweeps.spec.plan import Trial

MARK = "dspy-sweeps progress: "  # a progress line in a job's log starts with this
EVERY_S = 10.0


@dataclass(frozen=True)
class RunningTrial:
    """One row of the live table."""

    trial_id: str
    label: str
    phase: str
    calls: int
    best: float | None
    cost_usd: float
    elapsed_s: float


@dataclass(frozen=True)
class Snapshot:
    """The board at one moment, as a job's log carries it."""

    at: float  # unix time
    done: int
    total: int
    running: list[RunningTrial] = field(default_factory=list)

    def line(self) -> str:
        return MARK + json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, line: str) -> Snapshot:
        data = json.loads(line.removeprefix(MARK))
        return cls(data["at"], data["done"], data["total"], [RunningTrial(**r) for r in data["running"]])


def last_snapshot(log: str) -> Snapshot | None:
    """The newest progress line in a job's log; a line cut off mid-write (or garbled) is passed over."""
    for line in reversed(log.splitlines()):
        if line.startswith(MARK):
            try:
                return Snapshot.parse(line)
            except (ValueError, KeyError, TypeError):
                continue
    return None


class RunningTrials:
    """Trials between their start and their end, with their latest event. Thread-safe."""

    def __init__(self, total: int, done: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.clock = total, done, clock
        self.version = 0  # bumped on every change, so a printer can skip an unchanged board
        self._lock = threading.Lock()
        self._trials: dict[str, tuple[Trial, float, TrialEvent | None]] = {}
        self._finished: set[str] = set()  # an event that arrives after its trial's end must not revive it

    def start(self, trial: Trial) -> None:
        with self._lock:
            if trial.id not in self._trials and trial.id not in self._finished:
                self._trials[trial.id] = (trial, self.clock(), None)
                self.version += 1

    def update(self, trial: Trial, event: TrialEvent) -> None:
        """An event for a trial the board has not seen starts it (the transport may skip the start)."""
        with self._lock:
            if trial.id in self._finished:
                return
            _, started, _ = self._trials.get(trial.id, (trial, self.clock() - event.elapsed_s, None))
            self._trials[trial.id] = (trial, started, event)
            self.version += 1

    def finish(self, trial_id: str) -> None:
        with self._lock:
            self._trials.pop(trial_id, None)
            self._finished.add(trial_id)
            self.done += 1
            self.version += 1

    def rows(self) -> list[RunningTrial]:
        now = self.clock()
        with self._lock:
            trials = list(self._trials.values())
        return [_row(trial, now - started, event) for trial, started, event in trials]

    def snapshot(self) -> Snapshot:
        return Snapshot(round(time.time(), 1), self.done, self.total, self.rows())


def _row(trial: Trial, elapsed_s: float, event: TrialEvent | None) -> RunningTrial:
    elapsed_s = round(elapsed_s, 1)
    if event is None:
        return RunningTrial(trial.id, trial.label, "starting", 0, None, 0.0, elapsed_s)
    return RunningTrial(trial.id, trial.label, event.phase, event.calls, event.best, event.cost_usd, elapsed_s)


def running_table(rows: Iterable[RunningTrial], title: str = "running") -> Table:
    """Running trials: phase, LM calls spent, best score so far, cost and time so far."""
    table = Table(title=title, title_justify="left")
    for column in ("trial", "optimizer", "phase", "calls", "best so far", "cost $", "elapsed"):
        table.add_column(column, justify="left" if column in ("trial", "optimizer", "phase") else "right")
    for r in sorted(rows, key=lambda r: r.trial_id):
        best = "-" if r.best is None else f"{r.best:.3f}"
        table.add_row(r.trial_id, r.label, r.phase, f"{r.calls:,}", best, f"{r.cost_usd:.4f}", _clock(r.elapsed_s))
    return table


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(max(seconds, 0)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class LiveProgress(Progress):
    """Rich's progress bar with the running trials drawn above it (nothing while none run)."""

    def __init__(self, board: RunningTrials, console: Console) -> None:
        self.board = board  # before Progress's own __init__, which renders once
        super().__init__(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

    def get_renderables(self) -> Iterable[RenderableType]:
        rows = self.board.rows()
        if rows:
            yield running_table(rows)
        yield self.make_tasks_table(self.tasks)


@contextlib.contextmanager
def progress_lines(board: RunningTrials, console: Console, every_s: float = EVERY_S) -> Iterator[None]:
    """Off a terminal, print the board as a progress line whenever it changed, at most every `every_s`."""
    if console.is_terminal:
        yield
        return
    stop = threading.Event()
    printed = -1

    def emit() -> None:
        nonlocal printed
        if board.version != printed:
            printed = board.version
            console.print(board.snapshot().line(), soft_wrap=True, markup=False, highlight=False)

    def loop() -> None:
        while not stop.wait(every_s):
            emit()

    thread = threading.Thread(target=loop, name="progress-lines", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        emit()  # the last word: what had finished when the trials stopped
