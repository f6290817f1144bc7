"""The throughput benchmark (issue 4): the platform against plain DSPy and the physical limit.

Run: `.venv/bin/python bench/throughput.py` (prints the tables), or `make bench` (adds the
start-up figures and writes BENCHMARKS.md). `BENCH_QUICK=1` shrinks every size for a check
that the bench works, in a few minutes; its numbers mean little. `BENCH_KEEP=1` keeps the
working folder (children's logs, results, Ray's trial folders) and prints where it is.

Every measured run is a child process (`throughput.py platform|sequential|overhead ...`), so
each gets a fresh Ray and a fresh DSPy, and this process only starts the simulated endpoints
(`measure.Fleet`) and samples them and Ray's processes (`measure.Sampler`):

- platform: `engine.run_sweep` on `bench/sweep.yaml` against 1, 2 or 4 student endpoints, on a
  Ray it starts (cold) or, with `--address`, on a Ray head already running (`ray start`);
- sequential: the same trials one after another in one process with `dspy.LM`s from
  `lms.build_lm`, DSPy's default threads and its disk cache: what users do today;
- overhead: N calls of one shape through GatewayEngine and the gateway actor against the same
  through `dspy.LM`, on an endpoint that answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "bench" / "sweep.yaml"
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # as a script: the project and measure.py

# One student endpoint's ideal rate stays under 60 requests/s on 2 cores at this time scale;
# n endpoints run at n × it, so every configuration's ideal rate is the same (see BENCHMARKS.md).
TIME_SCALE = 1.2


@dataclass(frozen=True)
class Sizes:
    split: tuple[int, int, int]  # train, val, test rows
    main_trials: int
    scaling: tuple[tuple[int, int], ...]  # (endpoints, trials); (1, main_trials) and (1, many) are needed
    many: int  # the larger sweep: marginal CPU and memory per trial come from it and the main one
    overhead_calls: int

    @classmethod
    def pick(cls) -> Sizes:
        if os.environ.get("BENCH_QUICK"):
            return cls((10, 10, 10), 4, ((1, 4), (2, 4), (1, 7)), 7, 100)
        return cls((10, 10, 10), 16, ((1, 16), (2, 16), (4, 16), (1, 64), (4, 64)), 64, 400)


def sweep_overrides(sizes: Sizes, trials: int, extra: list[str] = ()) -> list[str]:
    if (trials - 1) % 3:
        raise ValueError(f"{trials} trials: the bench sweep has 1 baseline + 3 optimizers × seeds")
    train, val, test = sizes.split
    seeds = list(range((trials - 1) // 3))
    return [f"data.split={{train: {train}, val: {val}, test: {test}, seed: 0}}", f"seeds={seeds}", *extra]


# -- children: each measured run in its own process -------------------------------------------


def platform_child(args: argparse.Namespace) -> dict[str, Any]:
    """One sweep through the engine's programmatic API, exactly as `sweep run` does it."""
    from measure import psutil_module
    from rich.console import Console

    from dspy_sweeps.run.engine import run_sweep
    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps.state import State

    prepared = prepare(load_sweep(args.sweep, args.set))
    state = State(Path(args.state))
    state.root.mkdir(parents=True, exist_ok=True)
    with (state.root / "console.log").open("w") as log:
        cpu_at_start, start = time.process_time(), time.time()
        outcome = run_sweep(prepared, state, args.address, Console(file=log, width=240))
        end = time.time()
    trials = [
        {
            "id": r.trial_id,
            # A trial writes `host` in its folder as it starts (see run/worker.py).
            "start": (begun := state.trial_dir(prepared.sweep.name, r.trial_id).joinpath("host").stat().st_mtime),
            "end": begun + r.duration_s,
            "kind": r.kind,
            "status": r.status,
            "error": r.error,
            "duration_s": r.duration_s,
            "requested": r.calls_requested,
            "sent": r.lm_calls,
            "cache_hits": r.cache_hits,
            "merged": r.merged_calls,
            "val": r.val_score,
            "format_failures": r.format_failures,
            "teacher_retries": r.teacher_retries,
        }
        for r in outcome.records
    ]
    launched = psutil_module().Process().create_time()  # as `sweep run` would: imports and preflight count
    return {"start": start, "end": end, "launched": launched, "cpu_at_start": cpu_at_start, "trials": trials}


def sequential_child(args: argparse.Namespace) -> dict[str, Any]:
    """The same trials as a plain loop: one process, `dspy.LM` straight to the endpoint, DSPy's
    default settings (threads, retries) and its memory + disk cache in a fresh directory."""
    import dspy
    from dspy.utils.callback import BaseCallback

    from dspy_sweeps.lm.build import build_lm
    from dspy_sweeps.run.trial import TrialLMs, run_trial
    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.spec.schema import load_sweep

    class CountCalls(BaseCallback):  # every LM call DSPy makes, cache hits included
        def __init__(self) -> None:
            self.calls, self.lock = 0, threading.Lock()

        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            with self.lock:
                self.calls += 1

    prepared = prepare(load_sweep(args.sweep, args.set))
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=f"{args.state}/dspy_cache")
    counter = CountCalls()
    dspy.configure(callbacks=[counter])
    threads = dspy.settings.num_threads  # DSPy's default
    trials, cpu_at_start, start = [], time.process_time(), time.time()
    for trial in prepared.trials:
        begin = time.time()
        student = build_lm(trial.student)
        teacher = build_lm(trial.teacher) if trial.teacher else student
        workdir = Path(args.state) / "trials" / trial.id
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            result = run_trial(
                dataclasses.replace(trial, num_threads=threads), prepared.data, TrialLMs(student, teacher), workdir
            )
            status, val, formats = result.status, result.val_score, (result.format_failures, result.teacher_retries)
        except Exception as exc:
            status, val, formats = f"failed: {type(exc).__name__}: {exc}"[:200], None, (0, 0)
        trials.append(
            {"id": trial.id, "kind": trial.kind, "status": status, "start": begin, "end": time.time(), "val": val}
            | {"format_failures": formats[0], "teacher_retries": formats[1]}
        )
    return {
        "start": start,
        "end": time.time(),
        "cpu_at_start": cpu_at_start,
        "trials": trials,
        "requested": counter.calls,
        "threads": threads,
    }


def overhead_child(args: argparse.Namespace) -> dict[str, Any]:
    """Per-call latency and client CPU: GatewayEngine + gateway actor against `dspy.LM` direct."""
    import dspy
    from measure import H100_8B, psutil_module

    from dspy_sweeps.data import load_dataset
    from dspy_sweeps.lm.build import build_lm, endpoint_for
    from dspy_sweeps.lm.engine import build_gateway_lm
    from dspy_sweeps.lm.gateway import Budget
    from dspy_sweeps.run import runner
    from dspy_sweeps.spec.imports import build_program
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps_sim import write_answer_key
    from dspy_sweeps_sim.launch import SimServer

    sweep = load_sweep(args.sweep, args.set)
    data = load_dataset(sweep.data)
    state = Path(args.state)
    key = write_answer_key(data, state / "key.jsonl")
    signature = build_program(sweep.program).predictors()[0].signature
    questions = [row["question"] for row in data.rows]

    def messages(i: int) -> list[dict[str, Any]]:  # one shape, distinct bodies: nothing is cached or merged
        question = f"{questions[i % len(questions)]} (call {i})"
        return dspy.ChatAdapter().format(signature, demos=[], inputs={"question": question})

    with SimServer(key, state / "sim", models=("student",), time_scale=1e-6, **H100_8B) as sim:
        spec = sweep.students[0].model_copy(update={"api_base": sim.base_url})
        dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(state / "dspy_cache"))
        direct = build_lm(spec)
        runner.start_ray(None, REPO)
        try:
            endpoint = endpoint_for(spec, spec)
            gateway = runner.start_gateway([endpoint], state / "gateway_cache", Budget())
            gateway_proc = psutil_module().Process(
                runner.ray.get(gateway.shards[0].__ray_call__.remote(lambda _: os.getpid()))
            )
            routed = build_gateway_lm(spec, gateway, (endpoint.id,), "overhead")
            return _time_paths({"dspy.LM direct": direct, "gateway": routed}, messages, args.calls, gateway_proc)
        finally:
            runner.stop_ray()


def _time_paths(lms: dict[str, Any], messages: Any, calls: int, gateway_proc: Any) -> dict[str, Any]:
    """Alternate blocks of calls over the paths (noise hits both alike); CPU = this process + the gateway's."""
    # DSPy's adapters call `lm(messages=...)`, which DSPy 3.4 marks deprecated: it is the path trials take.
    warnings.filterwarnings("ignore", "Passing OpenAI-style message", DeprecationWarning)
    latency: dict[str, list[float]] = {name: [] for name in lms}
    caller, actor = dict.fromkeys(lms, 0.0), dict.fromkeys(lms, 0.0)
    counter = iter(range(10**9))
    for lm in lms.values():  # warm-up: connections, imports, the actor's first call
        for _ in range(10):
            lm(messages=messages(next(counter)))
    blocks = 4
    for _ in range(blocks):
        for name, lm in lms.items():
            prompts = [messages(next(counter)) for _ in range(calls // blocks)]  # formatting is not the path's cost
            gw_before, before = sum(gateway_proc.cpu_times()[:2]), time.process_time()
            for prompt in prompts:
                t = time.perf_counter()
                lm(messages=prompt)
                latency[name].append(time.perf_counter() - t)
            caller[name] += time.process_time() - before
            actor[name] += sum(gateway_proc.cpu_times()[:2]) - gw_before
    n = calls // blocks * blocks
    return {
        name: {
            "p50_ms": statistics.median(v) * 1000,
            "cpu_ms": (caller[name] + actor[name]) / n * 1000,
            "caller_cpu_ms": caller[name] / n * 1000,
            "gateway_cpu_ms": actor[name] / n * 1000,
            "calls": n,
        }
        for name, v in latency.items()
    }


CHILDREN = {"platform": platform_child, "sequential": sequential_child, "overhead": overhead_child}


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(CHILDREN))
    parser.add_argument("--sweep", default=str(SWEEP))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--state", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--address", default=None, help="platform: join this running Ray instead of starting one")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.chdir(REPO)
    result = CHILDREN[args.mode](args)
    Path(args.out).write_text(json.dumps(result))


def run_child(
    mode: str, overrides: list[str], workdir: Path, env: dict[str, str] | None = None, **options: Any
) -> tuple[subprocess.Popen, Path]:
    out = workdir / f"{mode}.json"
    cmd = [sys.executable, __file__, mode, "--state", str(workdir / "state"), "--out", str(out)]
    cmd += [arg for o in overrides for arg in ("--set", o)]
    cmd += [arg for k, v in options.items() if v is not None for arg in (f"--{k}", str(v))]
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    with (workdir / f"{mode}.log").open("w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out


def finish_child(process: subprocess.Popen, out: Path) -> dict[str, Any]:
    if process.wait() != 0 or not out.exists():
        tail = "\n".join(out.with_suffix(".log").read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"bench child {out.stem} failed (exit {process.returncode}):\n{tail}")
    return json.loads(out.read_text())


# -- the parent: endpoints, samplers, numbers -------------------------------------------------


@dataclass
class Run:
    """One measured sweep (platform or sequential) and what the endpoints and processes saw."""

    label: str
    endpoints: int
    trials: int
    time_scale: float
    wall_s: float
    requested: int
    sent: int
    unique: int
    resent_sampled: int  # sends beyond the first of a body with temperature > 0
    utilisation: float  # student endpoints: busy slot-seconds over slots × wall time
    utilisation_active: float  # the same from the first call to the last
    first_call_s: float  # from the start of the run to the endpoints' first call
    active_s: float  # from the endpoints' first call to their last answer
    capacity_s: float  # lower bound: unique calls' service time over the endpoints' capacity
    decode_tokens_per_call: float  # mean over the students' unique calls
    failed: int
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU-seconds by part of the run
    host_peak_rss_mb: list[float] = field(default_factory=list)  # each trial host's peak
    host_cpu_s: list[float] = field(default_factory=list)  # CPU-seconds of each trial host, start-up included
    peak_hosts: int = 0  # trial hosts alive at once, at most (sampled every second)
    peak_trials: int = 0  # trials running at once, at most (from their start and end times)
    cache_hits: int = 0
    merged: int = 0
    chain_s: float = 0.0  # lower bound: the longest chain, from the sequential run

    @property
    def limit_s(self) -> float:
        return max(self.capacity_s, self.chain_s)

    @property
    def efficiency(self) -> float:
        return self.limit_s / self.wall_s

    @property
    def throughput(self) -> float:
        """Calls sent per simulated second (wall / time scale), comparable across time scales."""
        return self.sent / (self.wall_s / self.time_scale)

    @property
    def active_throughput(self) -> float:
        """The same over the span from the first call to the last: without start-up and shutdown,
        which take real seconds whatever the time scale."""
        return self.sent / (self.active_s / self.time_scale)

    @property
    def cpu_busy(self) -> float:
        """Share of the machine's cores the run's processes kept busy."""
        return sum(self.cpu_s.values()) / ((os.cpu_count() or 1) * self.wall_s)


@dataclass
class Results:
    sizes: Sizes
    overhead: dict[str, dict[str, float]]
    main: Run
    sequential: Run
    chain_trial: str
    scaling: list[Run]
    sequential_threads: int
    sequential_trials: list[tuple[str, float, float]]  # (kind, wall, chain) per trial of the loop
    platform_threads: int  # DSPy threads per trial in the platform's sweep (the sweep's num_threads)
    joined: Run  # the main sweep again, joining a Ray head that was already running

    @property
    def many(self) -> Run:
        return next(r for r in self.scaling if (r.endpoints, r.trials) == (1, self.sizes.many))


def run_throughput(sizes: Sizes, progress: Any = print) -> Results:
    from dspy_sweeps.data import load_dataset
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps_sim import write_answer_key

    root = Path(tempfile.mkdtemp(prefix="dspy-sweeps-bench-"))
    sweep = load_sweep(SWEEP, sweep_overrides(sizes, sizes.main_trials))
    data = load_dataset(sweep.data)
    key = write_answer_key(data, root / "key.jsonl")

    progress(f"overhead: {sizes.overhead_calls} calls through each path")
    workdir = Path(tempfile.mkdtemp(prefix="overhead-", dir=root))
    overhead = finish_child(*run_child("overhead", sweep_overrides(sizes, 4), workdir, calls=sizes.overhead_calls))
    progress(f"sequential loop of plain DSPy: {sizes.main_trials} trials")
    sequential, seq_result, seq_log = measure_run("sequential", "sequential", sizes, key, 1, sizes.main_trials, root)
    chains = chains_of(seq_result, seq_log, TIME_SCALE)
    chain_trial = max(chains, key=lambda t: chains[t][2])
    chain_s = chains[chain_trial][2]
    sequential.chain_s = chain_s
    scaling = []
    for endpoints, trials in sizes.scaling:
        progress(f"platform: {trials} trials on {endpoints} endpoint(s)")
        run = measure_run("platform", "platform", sizes, key, endpoints, trials, root)[0]
        run.chain_s = chain_s * endpoints  # the chain scales with the time scale
        scaling.append(run)
    main = next(r for r in scaling if (r.endpoints, r.trials) == (1, sizes.main_trials))
    progress(f"platform: {sizes.main_trials} trials joining a Ray head that is already running")
    joined = measure_joined(sizes, key, root)
    joined.chain_s = chain_s
    results = Results(
        sizes,
        overhead,
        main,
        sequential,
        chain_trial,
        scaling,
        seq_result["threads"],
        list(chains.values()),
        sweep.num_threads,
        joined,
    )
    if os.environ.get("BENCH_KEEP"):
        (root / "results.pkl").write_bytes(pickle.dumps(results))  # `python bench/report.py <it>` renders it again
        progress(f"kept: {root} (logs, results.pkl, Ray's trial folders)")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return results


def measure_joined(sizes: Sizes, key: Path, root: Path) -> Run:
    """The main sweep with `--address` of a Ray head started beforehand (`ray start`, as on a cluster
    or a laptop that keeps one running): no Ray start-up in the sweep. The head's processes are not
    the sweep's children, so only its own process is sampled."""
    sys.path.insert(0, str(REPO / "tests"))
    from ray_head import start_head  # the tests' loopback head: token auth, free ports, own process group

    head = start_head(dashboard=False, num_cpus=os.cpu_count() or 2)
    try:
        env = {"RAY_ADDRESS": head.address, **head.env}
        return measure_run("platform", "joined", sizes, key, 1, sizes.main_trials, root, env, head.address)[0]
    finally:
        head.stop()


def measure_run(
    mode: str,
    label: str,
    sizes: Sizes,
    key: Path,
    endpoints: int,
    trials: int,
    root: Path,
    env: dict[str, str] | None = None,
    address: str | None = None,
) -> tuple[Run, dict, list]:
    """Start a fleet, run one child against it while sampling, and reduce what was seen to a Run."""
    from measure import Fleet, Sampler

    time_scale = TIME_SCALE * endpoints
    workdir = Path(tempfile.mkdtemp(prefix=f"{mode}-{endpoints}x{trials}-", dir=root))
    with Fleet(key, workdir / "sims", endpoints, time_scale) as fleet:
        overrides = sweep_overrides(sizes, trials, fleet.overrides())
        process, out = run_child(mode, overrides, workdir, env, address=address)
        sampler = Sampler(fleet, driver_pid=process.pid)
        sampler.start()
        try:
            result = finish_child(process, out)
        finally:
            sampler.stop()
        logs = fleet.request_logs()
        slot_s = fleet.slot_seconds()
    run = _reduce(label, endpoints, time_scale, result, logs, slot_s, sampler)
    return run, result, logs["student"] + logs["teacher"]


def _reduce(
    label: str, endpoints: int, time_scale: float, result: dict, logs: dict, slot_s: float, sampler: Any
) -> Run:
    from measure import H100_8B, capacity_bound

    wall = result["end"] - result["start"]
    slots = H100_8B["max_num_seqs"] * endpoints
    student = {e[3]: e[2] for e in logs["student"]}  # unique bodies -> decode tokens
    teacher = {e[3]: e[2] for e in logs["teacher"]}
    sampled = {e[3] for role in logs.values() for e in role if e[4]}
    every = [e[3] for role in logs.values() for e in role]
    first = min((e[0] for e in logs["student"]), default=result["start"])
    last = max((e[1] for e in logs["student"]), default=result["end"])
    active = sum(e[1] - e[0] for e in logs["student"])  # every student call lies between first and last
    cpu = sampler.cpu_by_role()
    cpu["driver"] = cpu.get("driver", 0.0) - result["cpu_at_start"]  # its imports and preflight come before the run
    trials = result["trials"]
    return Run(
        label=label,
        endpoints=endpoints,
        trials=len(trials),
        time_scale=time_scale,
        wall_s=wall,
        requested=result.get("requested") or sum(t.get("requested", 0) for t in trials),
        sent=len(every),
        unique=len(student) + len(teacher),
        resent_sampled=sum(1 for d in every if d in sampled) - len(sampled),
        utilisation=slot_s / (slots * wall),
        utilisation_active=active / (slots * max(last - first, 1e-9)),
        first_call_s=first - result.get("launched", result["start"]),
        active_s=last - first,
        # Student and teacher are separate endpoints: the busier one bounds the sweep.
        capacity_s=max(
            capacity_bound(len(student), sum(student.values()), endpoints, time_scale),
            capacity_bound(len(teacher), sum(teacher.values()), 1, time_scale),
        ),
        decode_tokens_per_call=sum(student.values()) / max(len(student), 1),
        failed=sum(t["status"] != "ok" for t in trials),
        cpu_s=cpu,
        host_peak_rss_mb=[b / 2**20 for b in sampler.host_peaks()],
        host_cpu_s=sampler.host_cpu(),
        peak_hosts=sampler.procs.peak_hosts,
        peak_trials=_most_at_once([(t["start"], t["end"]) for t in trials]),
        cache_hits=sum(t.get("cache_hits", 0) for t in trials),
        merged=sum(t.get("merged", 0) for t in trials),
    )


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one moment."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def chains_of(result: dict[str, Any], log: list, time_scale: float) -> dict[str, tuple[str, float, float]]:
    """Each trial of the sequential loop: its kind, its wall time and its longest chain of calls."""
    from measure import chain_bound

    return {
        t["id"]: (t["kind"], t["end"] - t["start"], chain_bound(log, t["start"], t["end"], time_scale))
        for t in result["trials"]
    }


def main() -> None:
    from report import throughput_markdown

    results = run_throughput(Sizes.pick())
    print(throughput_markdown(results))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
    child_main(sys.argv[1:])
elif __name__ == "__main__":
    main()
