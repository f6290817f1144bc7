"""The pruning, search and event-overhead benchmark (issue 9).

Run: `.venv/bin/python bench/pruning.py` (prints Markdown tables); `BENCH_QUICK=1` shrinks it to
check that it works (its numbers mean little). `bench/run.py` can call `pruning_markdown()`.

Trials run in this process the way a trial host runs them: `run_trial` on threads (at most
`parallelism` at once), each with a `TrialStream` whose events go to the driver's `SweepStudy`,
which answers "stop" for a pruned trial; the trials' LMs are `dspy.LM`s straight to the
simulated endpoint (a test/demo double, time-scaled; no LM cache, so every call is made).
Calls are the trials' own meters (calls requested).

- pruning: 16 MIPROv2 trials over two students, 8 on a strong simulated student (the simulator's
  teacher profile served as a student) and 8 on the weak one (its student profile), interleaved;
  the same sweep with `prune: successive_halving` and without. Goal: calls ≤ 50 % and the same winner.
  A reduced try (2026-11-30, loaded machine) gave 58 %, same winner: the weak student is not
  hopeless (MIPROv2 lifts it to 0.5-0.6 val against 0.8-0.9), and a pruned trial has already
  spent the 50-90 calls before its first evaluation.
- search: grid, random and TPE over one space of BootstrapFewShot settings and both students;
  calls spent until the run's best val score is first reached, and in all.
- event overhead (`overhead`, which `bench/scale.py` runs): the same MIPROv2 trials with events on
  (a TrialStream to a driver) and off (`events=None`: no DSPy hooks), in pairs of alternating
  order; wall time and this process's CPU. Goal: ≤ 3 % apart.
"""

from __future__ import annotations

import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
QUICK = bool(os.environ.get("BENCH_QUICK"))
# A MIPROv2 trial whose search (minibatch and full evaluations) outweighs its bootstrapping and
# proposals: calls spent before its first evaluation cannot be saved by any pruner.
MIPRO = (
    "{kind: mipro_v2, auto: null, num_candidates: 3, num_trials: 40, minibatch_size: 5,"
    " max_bootstrapped_demos: 2, max_labeled_demos: 2}"
)


@dataclass
class Finished:
    trial_id: str
    student: str
    status: str
    val: float | None
    calls: int
    calls_so_far: int  # every trial's calls when this one finished


@dataclass
class SweepRun:
    finished: list[Finished] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def calls(self) -> int:
        return sum(f.calls for f in self.finished)

    def winner(self) -> Finished | None:
        ok = [f for f in self.finished if f.status == "ok" and f.val is not None and not f.trial_id.startswith("none")]
        return min(ok, key=lambda f: (-f.val, f.calls, f.trial_id), default=None)

    def calls_to_best(self) -> int | None:
        best = self.winner()
        return next((f.calls_so_far for f in self.finished if f.status == "ok" and f.val == best.val), None)


def prepared_sweep(sim_url: str, overrides: list[str]) -> Any:
    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.spec.schema import load_sweep

    students = (
        f"students=[{{name: strong, model: openai/teacher, api_base: '{sim_url}'}},"
        f" {{name: weak, model: openai/student, api_base: '{sim_url}'}}]"
    )
    base = [
        "data.split={train: 10, val: 10, test: 10, seed: 0}",
        students,
        f"teachers=[{{name: big, model: openai/teacher, api_base: '{sim_url}'}}]",
        "tracking={wandb: null, mlflow: null}",
        "promote=null",
    ]
    return prepare(load_sweep(REPO / "sweeps/demo.yaml", base + overrides))


def run_sweep(prepared: Any, state_dir: Path, parallelism: int, events: bool = True, order_seed: int = 0) -> SweepRun:
    """Every trial the study hands out, `parallelism` at a time, events to the study."""
    from dspy_sweeps.lm.build import build_lm
    from dspy_sweeps.run.hosts import Channel, TrialHost
    from dspy_sweeps.run.progress import TrialStream
    from dspy_sweeps.run.pruning import SweepStudy
    from dspy_sweeps.run.trial import TrialLMs, run_trial
    from dspy_sweeps.state import State

    sweep = prepared.sweep
    lms = {s.name: build_lm(s, cache=False) for s in sweep.students}
    teacher = build_lm(sweep.teachers[0], cache=False)
    study = SweepStudy.open(prepared, State(state_dir), resume=False)
    if sweep.search is None:  # a grid in an order that mixes strong and weak trials
        random.Random(order_seed).shuffle(study.queue)
        study.queue.sort(key=lambda t: t.kind != "none")
    run, streams, lock = SweepRun(), {}, threading.Lock()
    events_in: queue.Queue = queue.Queue()  # as a trial host buffers them: trials never wait on the driver
    host = TrialHost(lambda *args: None, None)  # the production stop path: its Channel raises Pruned once stopped

    def driver() -> None:
        while (event := events_in.get()) is not None:
            host.drain()
            if study.on_event(event):
                host.stop(event.trial_id)

    def sender(trial_id: str) -> Any:
        channel = Channel(trial_id, host)

        def send(event: Any) -> None:
            channel.emit(event)
            events_in.put(event)

        return send

    def worker() -> None:
        while (trial := study.next_trial()) is not None:
            stream = TrialStream(trial.id, send=sender(trial.id))
            with lock:
                streams[trial.id] = stream
            trial_lms = TrialLMs(lms[trial.student.name], teacher)
            result = run_trial(trial, prepared.data, trial_lms, state_dir / trial.id, stream if events else None)
            study.trial_finished(trial.id, result)
            with lock:
                so_far = sum(s.spend.calls for s in streams.values())
                run.finished.append(
                    Finished(trial.id, trial.student.name, result.status, result.val_score, stream.spend.calls, so_far)
                )

    start, cpu = time.monotonic(), time.process_time()
    consumer = threading.Thread(target=driver)
    consumer.start()
    threads = [threading.Thread(target=worker) for _ in range(parallelism)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events_in.put(None)
    consumer.join()
    run.wall_s, run.cpu_s = time.monotonic() - start, time.process_time() - cpu
    return run


def pruning(sim_url: str, root: Path) -> list[list[str]]:
    seeds = list(range(4 if QUICK else 8))
    # min_resource in LM calls: Optuna's "auto" waits for a finished trial, and all start at once
    prune = "prune={kind: successive_halving, min_resource: 32, reduction_factor: 2}"
    common = [f"optimizers=[{MIPRO}]", f"seeds={seeds}"]
    runs = {
        "no pruning": run_sweep(prepared_sweep(sim_url, common), root / "off", parallelism=4),
        "successive halving": run_sweep(prepared_sweep(sim_url, [*common, prune]), root / "on", parallelism=4),
    }
    full = runs["no pruning"].calls
    rows = []
    for name, run in runs.items():
        win = run.winner()
        pruned = [f for f in run.finished if f.status == "pruned"]
        weak_pruned = sum(f.student == "weak" for f in pruned)
        rows.append(
            [
                name,
                str(sum(not f.trial_id.startswith("none") for f in run.finished)),
                f"{run.calls:,} ({run.calls / full:.0%})",
                f"{len(pruned)} ({weak_pruned} weak)",
                f"{win.trial_id} ({win.val:.2f})" if win else "-",
                f"{run.wall_s:.0f} s",
            ]
        )
    same = runs["no pruning"].winner().trial_id == runs["successive halving"].winner().trial_id
    ratio = runs["successive halving"].calls / full
    rows.append(["goal", "", f"≤ 50 %: {'met' if ratio <= 0.5 else 'missed'}", "", f"same winner: {same}", ""])
    return rows


def search(sim_url: str, root: Path) -> list[list[str]]:
    space = "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: {int: [1, 4]}, max_labeled_demos: [0, 4]}]"
    trials = 4 if QUICK else 8
    rows = []
    for kind in ("grid", "random", "tpe"):
        count = "" if kind == "grid" else f", trials: {trials}"
        prepared = prepared_sweep(sim_url, [space, f"search={{kind: {kind}, seed: 0{count}}}"])
        run = run_sweep(prepared, root / kind, parallelism=2)
        win = run.winner()
        rows.append(
            [
                kind,
                str(sum(not f.trial_id.startswith("none") for f in run.finished)),
                f"{win.val:.2f}",
                f"{run.calls_to_best():,}",
                f"{run.calls:,}",
            ]
        )
    return rows


def overhead(sim_url: str, root: Path) -> list[list[str]]:
    """Events on against off: the same MIPROv2 trials one at a time on one DSPy thread, in pairs
    run in alternating order; each pair's difference, and their median and range. (With 8 trials
    on 8 threads, their contention for the GIL spread identical runs by more than the goal.)"""
    seeds = [0] if QUICK else [0, 1]
    overrides = [f"optimizers=[{MIPRO}]", f"seeds={seeds}", "students.1.model=openai/teacher", "num_threads=1"]
    prepared = prepared_sweep(sim_url, overrides)
    pairs = 1 if QUICK else 5
    walls: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    run_sweep(prepared, root / "warm", parallelism=1)  # imports and first-call costs
    for n in range(pairs):
        for on in (True, False) if n % 2 == 0 else (False, True):
            run = run_sweep(prepared, root / f"{on}-{n}", parallelism=1, events=on)
            walls[on].append(run.wall_s)
            cpus[on].append(run.cpu_s)
    rows = []
    for label, values in (("wall time", walls), ("client CPU", cpus)):
        apart = sorted(on / off - 1 for on, off in zip(values[True], values[False]))
        median = statistics.median(apart)
        rows.append(
            [
                label,
                f"{statistics.median(values[True]):.2f} s",
                f"{statistics.median(values[False]):.2f} s",
                f"{median:+.1%} ({apart[0]:+.1%} to {apart[-1]:+.1%}) ({'met' if median <= 0.03 else 'missed'})",
            ]
        )
    return rows


OVERHEAD_COLUMNS = ["measure", "events on", "events off", "apart, median of 5 pairs (range) (goal ≤ 3 %)"]


def pruning_markdown() -> str:
    from report import table

    from dspy_sweeps_sim import write_answer_key
    from dspy_sweeps_sim.launch import SimServer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepared = prepared_sweep("http://127.0.0.1:9/v1", [])
        key = write_answer_key(prepared.data, root / "key.jsonl")
        with SimServer(key, root / "sim", models=("student", "teacher"), time_scale=0.01) as sim:
            parts = [
                "### Pruning: 16 MIPROv2 trials, half on a weak student\n\n"
                + table(["sweep", "trials", "calls", "pruned", "winner (val)", "wall"], pruning(sim.base_url, root)),
                "### Search: calls until the best val score is first reached\n\n"
                + table(["search", "trials", "best val", "calls to best", "calls in all"], search(sim.base_url, root)),
                "Event overhead (issue 9's measure, and a goal of issue 17) is in the Scale section.",
            ]
    return "\n\n".join(parts)


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    print(pruning_markdown())
