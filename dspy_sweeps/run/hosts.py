"""Trial hosts: long-lived Ray actors that each run many trials at once, on threads.

A trial waits on LM endpoints almost all the time, so it is a thread in a warm process rather
than a process of its own: a host imports DSPy, the optimizers and the sweep's program once
(its `warm` call), then runs every trial it is handed on the actor's thread pool. The driver's
`HostPool` starts the hosts (Ray places them), hands pending trials to hosts with free slots,
forwards the trials' progress events, and when a host dies (SIGKILL, a lost node) re-runs that
host's trials on a fresh host; other hosts' trials never notice.

Every trial runs exactly once at a time and is reported once. A host is dead only when Ray says
its actor died (`ActorDiedError`); the old actor is then killed before its trials run elsewhere.
When Ray says the actor is only unavailable (`ActorUnavailableError`: a network blip, the task
"may or may not have been executed"), the trial is not re-run: the driver asks the same host for
the trial's outcome (`TrialHost.outcome`), which the host keeps until the driver has it.

Like the rest of the Ray layer it knows trials only as work items, each with an id, and a function
`fn(item, shared, channel) -> result`; a trial that raises is reported as failed with its reason
and never stops the others. Items are drawn from an iterable only when a host has room, so a
search can pick its next trial knowing how the earlier ones ended.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dspy_sweeps.run.events import Pruned, TrialEvent

HOST_RETRIES = 2  # times a trial is re-run after its host died; its own exceptions are never retried
CONTROL_THREADS = 4  # actor threads beyond the trial slots, so drain/stop/pid never wait for a trial
POLL_S = 0.5  # how often the driver collects progress events while trials run


@dataclass(frozen=True)
class Outcome:
    trial_id: str
    result: Any  # what the trial function returned; None when it raised or its hosts kept dying
    error: str | None


@dataclass(frozen=True)
class HostPlan:
    hosts: int
    trials_per_host: int
    cpus: float  # reserved in Ray per host


def size_hosts(running: int, trials_per_host: int | None, cpus: float, free_cpus: float, fill: int) -> HostPlan:
    """Hosts for `running` trials at once. By default a host holds `fill` trials (enough to keep one
    endpoint busy) and there is at most one host per free CPU, since a host is one GIL; never more
    hosts than Ray can place, so no trial waits on a host that cannot start."""
    placeable = max(1, int(free_cpus // cpus))
    running = max(running, 1)
    if trials_per_host is None:
        hosts = max(1, min(math.ceil(running / max(fill, 1)), int(free_cpus), placeable))
        return HostPlan(hosts, math.ceil(running / hosts), cpus)
    return HostPlan(max(1, min(math.ceil(running / trials_per_host), placeable)), trials_per_host, cpus)


class Channel:
    """A running trial's line to the driver: its events wait in the host until the driver drains
    them, and once the driver has stopped the trial, its next event raises `Pruned`."""

    def __init__(self, trial_id: str, host: TrialHost) -> None:
        self.trial_id, self._host = trial_id, host

    def emit(self, event: TrialEvent) -> None:
        with self._host.lock:
            if self.trial_id in self._host.stopped:
                raise Pruned(f"trial {self.trial_id} was stopped by the sweep")
            self._host.events.append(event)


class TrialHost:
    """One host process: a threaded Ray actor whose `run` calls execute on the actor's thread pool."""

    def __init__(self, fn: Callable[[Any, Any, Channel], Any], warm: Callable[[], None] | None) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.events: list[TrialEvent] = []
        self.stopped: set[str] = set()
        self._shared: dict[str, Any] = {}
        self._ended = threading.Condition(self.lock)
        self._outcomes: dict[str, Outcome] = {}  # kept until the driver has them (see `outcome`)
        if warm is not None:
            warm()

    def run(self, trial_id: str, item: Any, shared: list[Any], stopped: bool = False) -> Outcome:
        """Run one trial. `shared` holds the sweep's object reference (kept nested, so Ray does not
        fetch and unpickle it for every trial: the host keeps one copy)."""
        if stopped:
            self.stop(trial_id)
        try:
            outcome = Outcome(trial_id, self.fn(item, self._load(shared[0]), Channel(trial_id, self)), None)
        except Exception as exc:
            outcome = Outcome(trial_id, None, f"{type(exc).__name__}: {exc}"[:1000])
        with self._ended:
            self._outcomes[trial_id] = outcome
            self._ended.notify_all()
        return outcome

    def outcome(self, trial_id: str, wait_s: float) -> Outcome | None:
        """The outcome of a trial this host ran, once it has ended (None if it has not within
        `wait_s`); for a driver that lost contact with this host while the trial ran."""
        with self._ended:
            self._ended.wait_for(lambda: trial_id in self._outcomes, timeout=wait_s)
            return self._outcomes.get(trial_id)

    def forget(self, trial_id: str) -> None:
        """The driver has the trial's outcome: the host need not keep it."""
        with self.lock:
            self._outcomes.pop(trial_id, None)

    def _load(self, ref: Any) -> Any:
        import ray

        with self.lock:
            if ref.hex() not in self._shared:
                self._shared[ref.hex()] = ray.get(ref)
            return self._shared[ref.hex()]

    def drain(self) -> list[TrialEvent]:
        with self.lock:
            events, self.events = self.events, []
        return events

    def stop(self, trial_id: str) -> None:
        with self.lock:
            self.stopped.add(trial_id)

    def pid(self) -> int:
        return os.getpid()

    def imported(self, modules: list[str]) -> list[str]:
        """Which of `modules` this host has imported (hosts keep tracking libraries out)."""
        return [m for m in modules if m in sys.modules]


@dataclass(eq=False)
class _Host:
    handle: Any
    running: set[str] = field(default_factory=set)
    draining: Any = None  # the drain call in flight, if any


class HostPool:
    """The driver's side: starts the hosts, hands them trials as they have room, and collects
    outcomes and events. `close()` kills the hosts."""

    def __init__(self, fn: Callable[[Any, Any, Channel], Any], warm: Callable[[], None] | None, plan: HostPlan) -> None:
        import ray

        self.plan = plan
        self._actor = ray.remote(
            num_cpus=plan.cpus, max_concurrency=plan.trials_per_host + CONTROL_THREADS, max_restarts=0
        )(TrialHost)
        self._fn, self._warm = fn, warm
        # Created now, warmed in the background: Ray runs each constructor while the driver goes on.
        self.hosts = [self._start() for _ in range(plan.hosts)]
        self._stopped: set[str] = set()

    def _start(self) -> _Host:
        return _Host(self._actor.remote(self._fn, self._warm))

    def pids(self) -> list[int]:
        """The live hosts' process ids (for benchmarks and fault tests)."""
        import ray

        return ray.get([h.handle.pid.remote() for h in self.hosts])

    def stop(self, trial_id: str) -> None:
        """Stop a trial early: its next event raises `Pruned` (also if it has not started yet)."""
        self._stopped.add(trial_id)
        for host in self.hosts:
            if trial_id in host.running:
                host.handle.stop.remote(trial_id)

    def run(
        self,
        items: Iterable[Any],
        shared: Any,
        *,
        parallelism: int | None,
        on_outcome: Callable[[Outcome], None],
        on_event: Callable[[TrialEvent], None] | None = None,
        on_start: Callable[[str], None] | None = None,
        id_of: Callable[[Any], str] = str,
    ) -> list[Outcome]:
        """Run `fn(item, shared, channel)` for every item, at most `parallelism` at once (default:
        as many as the hosts hold); `on_start` sees each trial id as it is handed to a host,
        `on_outcome` each outcome as it lands (after that trial's last events). An item is drawn
        only when a host has room for it."""
        import ray

        shared_ref = [ray.put(shared)]
        work = _Work(iter(items), id_of)
        limit = parallelism or self.plan.hosts * self.plan.trials_per_host
        runs: dict[Any, tuple[_Host, str]] = {}
        outcomes: list[Outcome] = []
        reported: set[str] = set()
        while work.retries or runs or work.more():
            self._submit(work, runs, shared_ref, limit, on_start)
            ready, _ = ray.wait(list(runs), num_returns=1, timeout=POLL_S)
            self._forward(on_event, block=False)
            for ref in ready:
                host, trial_id = runs.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:  # not dead: ask the same host again
                    runs[host.handle.outcome.remote(trial_id, POLL_S)] = (host, trial_id)
                    continue
                except ray.exceptions.RayActorError as exc:  # ActorDiedError (or its creation failed)
                    host.running.discard(trial_id)
                    outcome = self._host_died(host, trial_id, exc, work.deaths)
                    if outcome is None:
                        work.retries.append(trial_id)
                        continue
                else:
                    if outcome is None:  # the host that lost contact is still running the trial
                        runs[host.handle.outcome.remote(trial_id, POLL_S)] = (host, trial_id)
                        continue
                    host.running.discard(trial_id)
                    host.handle.forget.remote(trial_id)
                    self._forward(on_event, block=True, only=host)
                if trial_id in reported:  # a record is written once per trial, whatever happened
                    continue
                reported.add(trial_id)
                outcomes.append(outcome)
                on_outcome(outcome)
        return outcomes

    def _submit(
        self,
        work: _Work,
        runs: dict[Any, tuple[_Host, str]],
        shared_ref: list,
        limit: int,
        on_start: Callable[[str], None] | None,
    ) -> None:
        while len(runs) < limit:
            host = min(self.hosts, key=lambda h: len(h.running))
            if len(host.running) >= self.plan.trials_per_host:
                return
            taken = work.take()
            if taken is None:
                return
            trial_id, item = taken
            host.running.add(trial_id)
            stopped = trial_id in self._stopped
            runs[host.handle.run.remote(trial_id, item, shared_ref, stopped)] = (host, trial_id)
            if on_start is not None and trial_id not in work.deaths:  # a retry keeps the runs it opened
                on_start(trial_id)

    def _host_died(self, host: _Host, trial_id: str, exc: Exception, deaths: dict[str, int]) -> Outcome | None:
        """Replace a dead host (once) and say whether its trial runs again (None) or has failed.
        The old actor is killed first: no process of it may still write the trial's folder."""
        import ray

        if host in self.hosts:
            ray.kill(host.handle, no_restart=True)
            self.hosts[self.hosts.index(host)] = self._start()
        deaths[trial_id] = deaths.get(trial_id, 0) + 1
        if deaths[trial_id] <= HOST_RETRIES:
            return None
        return Outcome(trial_id, None, f"its host died {deaths[trial_id]} times; last: {_reason(exc)}")

    def _forward(self, on_event: Callable[[TrialEvent], None] | None, block: bool, only: _Host | None = None) -> None:
        """Hand the hosts' buffered events to `on_event`. Not blocking: a host still warming up
        answers on a later round. Blocking (for one host whose trial just ended): all of its events."""
        import ray

        for host in [only] if only is not None else self.hosts:
            if host.draining is None:
                host.draining = host.handle.drain.remote()
            ready, _ = ray.wait([host.draining], timeout=None if block else 0)
            if block:
                ready += [host.handle.drain.remote()]  # events sent after the drain in flight was served
            for ref in ready:
                try:
                    events = ray.get(ref)
                except ray.exceptions.RayActorError:
                    events = []  # a dead host: its trials' runs report that
                for event in events if on_event is not None else ():
                    on_event(event)
            if ready:
                host.draining = None

    def close(self) -> None:
        import ray

        for host in self.hosts:
            ray.kill(host.handle)


class _Work:
    """The trials still to start: those whose host died first, then new ones drawn from `items`."""

    def __init__(self, items: Iterator[Any], id_of: Callable[[Any], str]) -> None:
        self.items, self.id_of = items, id_of
        self.by_id: dict[str, Any] = {}
        self.retries: list[str] = []
        self.deaths: dict[str, int] = {}
        self._next: Any = None
        self._done = False

    def more(self) -> bool:
        """Whether `items` has another trial (drawing it now, if none is waiting)."""
        if self._next is None and not self._done:
            self._next = next(self.items, None)
            self._done = self._next is None
        return self._next is not None

    def take(self) -> tuple[str, Any] | None:
        if self.retries:
            trial_id = self.retries.pop(0)
            return trial_id, self.by_id[trial_id]
        if not self.more():
            return None
        item, self._next = self._next, None
        trial_id = self.id_of(item)
        self.by_id[trial_id] = item
        return trial_id, item


def _reason(error: BaseException | None) -> str:
    """The root cause in one line: Ray wraps errors in its own types."""
    while error is not None and getattr(error, "cause", None) is not None:
        error = error.cause
    if error is None:
        return "unknown error"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:500]
