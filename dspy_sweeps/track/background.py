"""The trackers' worker thread: W&B and MLflow calls in order, off the thread that delivers events.

Events arrive on the driver as trials run, and a tracker can be slow (an `mlflow server` round
trip, a W&B run opening in ~2 s), so the caller only queues. The thread takes everything
waiting at once and logs the events of each trial in one batch (one MLflow request per trial
instead of one per event, every point kept), so a backlog shrinks instead of growing. Order
holds per trial: a start, then its events, then its end. After the first error the thread
does no more tracking; `call` raises that error to whoever waits next.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from dspy_sweeps.records import TrialEvent
from dspy_sweeps.spec.plan import Trial


@dataclass(frozen=True)
class _Start:
    trial: Trial


@dataclass(frozen=True)
class _Event:
    trial: Trial
    event: TrialEvent


@dataclass(frozen=True)
class _Call:
    fn: Callable[[], Any]
    done: Future


class TrackingThread:
    def __init__(self, on_start: Callable[[Trial], None], on_events: Callable[[Trial, list[TrialEvent]], None]) -> None:
        self.on_start, self.on_events = on_start, on_events
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue[_Start | _Event | _Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="tracking", daemon=True)
        self._thread.start()

    def start(self, trial: Trial) -> None:
        self._queue.put(_Start(trial))

    def event(self, trial: Trial, event: TrialEvent) -> None:
        self._queue.put(_Event(trial, event))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the thread after everything queued before it; its result, or the first error."""
        done: Future = Future()
        self._queue.put(_Call(fn, done))
        return done.result()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not self._handle(items):
                return

    def _handle(self, items: list[_Start | _Event | _Call | None]) -> bool:
        batches: dict[str, tuple[Trial, list[TrialEvent]]] = {}
        for item in items:
            if isinstance(item, _Event):
                batches.setdefault(item.trial.id, (item.trial, []))[1].append(item.event)
                continue
            self._flush(batches)  # a start or an end comes after the events queued before it
            if item is None:
                return False
            if isinstance(item, _Start):
                self._guarded(lambda item=item: self.on_start(item.trial))
            else:
                self._run(item)
        self._flush(batches)
        return True

    def _flush(self, batches: dict[str, tuple[Trial, list[TrialEvent]]]) -> None:
        for trial, events in batches.values():
            self._guarded(lambda trial=trial, events=events: self.on_events(trial, events))
        batches.clear()

    def _guarded(self, fn: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            fn()
        except Exception as exc:
            self.error = exc

    def _run(self, call: _Call) -> None:
        if self.error is not None:
            call.done.set_exception(self.error)
            return
        try:
            call.done.set_result(call.fn())
        except Exception as exc:
            self.error = exc
            call.done.set_exception(exc)
