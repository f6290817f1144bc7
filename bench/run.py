"""`make bench`: measure what users wait for, side by side in one run, into BENCHMARKS.md.

- CLI start-up: `sweep --help` against a bare `python -c pass` (median of 15 runs each).
- The demo sweep cold (empty state dir) against the same sweep again: with `--rerun` (every trial
  runs again, every LM call from the cache), then as it is (every trial reused, nothing to run).
- With `BENCH_SUITE=1`: the test suite as CI runs it (`make test`), on the same machine.
- Pruning and search (issue 9, `bench/pruning.py`): calls spent with and without successive
  halving, calls to the best validation score for grid, random and TPE, events on against off.
- Serving (issue 11, `bench/serving.py`): `sweep serve` against the loaded program in-process at
  1, 16 and 64 clients, and the alias moving twice under load.
- Scale (issue 17, `bench/scale.py`): the gateway's CPU per call at 16 and 1,000 trials, calls/s
  through 1 and 4 gateway shards, sent/unique with shards, event overhead, and the driver's time
  per trial end in 100- and 1,000-trial sweeps.
- Throughput (issue 4, `bench/throughput.py`): the platform's sweep against the same trials as
  a sequential loop of plain DSPy and the physical limit; per-call overhead of the gateway;
  1, 2 and 4 endpoints with more and more trials; the issue's goals beside the numbers.
- Real server (issue 15, `bench/real.py`): a sweep on llama.cpp serving SmolLM2-135M against the
  same trials as a plain-DSPy loop on that server, its slot utilisation from `/metrics`.
  `BENCH_ONLY=real make bench` runs this section alone and rewrites only it in BENCHMARKS.md.

Run: `make bench` (or `.venv/bin/python bench/run.py`), about 25 minutes on 2 quiet cores.
`BENCH_QUICK=1 make bench` shrinks every size to check the bench itself (about 9 minutes); it
prints its tables and leaves BENCHMARKS.md alone.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
COMMAND = "make bench"
QUICK = bool(os.environ.get("BENCH_QUICK"))
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def median_time(cmd: list[str], runs: int = 15) -> float:
    timed(cmd)  # warm the file-system cache
    return statistics.median(timed(cmd) for _ in range(runs))


def startup_table() -> str:
    from report import table

    runs = 5 if QUICK else 15
    help_s = median_time([str(BIN / "sweep"), "--help"], runs)
    python_s = median_time([sys.executable, "-c", "pass"], runs)
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "DSPY_SWEEPS_STATE": state, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        cold = timed([str(BIN / "sweep"), "run", "sweeps/demo.yaml"], env)
        rerun = timed([str(BIN / "sweep"), "run", "sweeps/demo.yaml", "--rerun"], env)
        reused = timed([str(BIN / "sweep"), "run", "sweeps/demo.yaml"], env)
    rows = [
        [
            f"`sweep --help` (median of {runs})",
            f"{help_s:.3f} s",
            f"{help_s / python_s:.1f}× bare `python -c pass` ({python_s:.3f} s)",
        ],
        ["demo sweep, cold (5 trials, empty state dir)", f"{cold:.1f} s", "goal: ≤ 300 s on 2 cores"],
        [
            "demo sweep again, `--rerun`",
            f"{rerun:.1f} s",
            f"{rerun / cold:.2f}× cold: every trial runs again, every LM call from the cache",
        ],
        [
            "demo sweep again, unchanged",
            f"{reused:.1f} s",
            f"{reused / cold:.2f}× cold: every trial reused, no Ray started (goal: ≤ 0.3, issues 8 and 17: "
            f"{'met' if reused / cold <= 0.3 else 'missed'})",
        ],
    ]
    if os.environ.get("BENCH_SUITE"):  # the suite as CI runs it: another ~15 minutes, so only when asked
        suite = timed(["make", "test"])
        verdict = "met" if suite < 900 else "missed"
        rows.append(
            ["`make test` (the suite as CI runs it)", f"{suite / 60:.1f} min", f"goal: < 15 min (issue 17: {verdict})"]
        )
    return table(["measure", "value", "compared with"], rows)


def main() -> None:
    if os.environ.get("BENCH_ONLY") == "real":
        import real

        real.main()
        return
    from pruning import pruning_markdown
    from real import HEADING, real_markdown, run_real
    from report import section_of, throughput_markdown
    from scale import scale_markdown
    from serving import ServingSizes, run_serving, serving_markdown
    from throughput import Sizes, run_throughput

    started, load_before = time.monotonic(), os.getloadavg()[0]
    startup = startup_table()
    print(startup, flush=True)

    def progress(message: str) -> None:
        print(f"-- {message}", flush=True)

    throughput = throughput_markdown(run_throughput(Sizes.pick(), progress=progress))
    print(throughput)
    progress("pruning and search")
    pruning = pruning_markdown()
    print(pruning)
    serving = serving_markdown(run_serving(ServingSizes.pick(), progress=progress))
    print(serving)
    scale = scale_markdown(progress)
    print(scale)
    real_md = real_markdown(run_real(progress))
    print(real_md)
    minutes = (time.monotonic() - started) / 60
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()} "
        f"(load average {load_before:.1f} before it, {os.getloadavg()[0]:.1f} at its end, its own llama-server's "
        "included: above ~0.5 before, other work shared the cores)"
    )
    if QUICK:
        print(f"\nBENCH_QUICK: {minutes:.1f} min; BENCHMARKS.md left as it was")
        return
    before = (REPO / "BENCHMARKS.md").read_text()
    kept = "".join(section_of(before, heading) for heading in MEASURED_ELSEWHERE)
    (REPO / "BENCHMARKS.md").write_text(
        f"# Benchmarks\n\nProduced by `{COMMAND}` on {machine}, {time.strftime('%Y-%m-%d')}, in {minutes:.0f} minutes.\n"
        "Everything but the two real-model sections runs against the simulated endpoint (a test/demo\n"
        "double, time-scaled), so those figures measure the platform (Ray, trial hosts, DSPy, the LM\n"
        "gateway), never a real model; the real-model sections run one on llama.cpp.\n\n"
        "## Start-up\n\n"
        f"{startup}\n\n"
        "## Throughput (issues 4 and 8)\n\n"
        f"{HOSTS}\n\n"
        f"{throughput}\n\n"
        "## Pruning and search (issue 9)\n\n"
        f"{pruning}\n\n"
        "## Serving (issue 11)\n\n"
        f"{serving}\n\n"
        "## Scale (issue 17)\n\n"
        f"{scale}\n\n"
        f"{HEADING}\n\n{real_md}\n\n"
        f"{kept}"
        f"{NOTES}"
    )


# Sections measured outside this bench, from a fresh clone (`make test` alone, `make demo-real`): kept.
MEASURED_ELSEWHERE = ("## The test suite (issues 8 and 17)", "## Real demo from a fresh clone (issue 15)")

HOSTS = """Trials run as threads in warm trial hosts (`dspy_sweeps/run/hosts.py`), not as Ray Tune
trials: Tune gave each trial an actor process of its own (6.2 CPU-s and 232 MB to start, measured in
the previous run of this bench: 81 s for 16 trials, first call after 62 s, 1.7× the sequential loop),
and retrying a dead actor was the only Tune feature in use. Hosts keep that (a dead host's trials run
again on a fresh host, in their folders) and the figures below are with hosts."""

NOTES = """## How the figures are made

- **(a) platform**: `engine.run_sweep` on `bench/sweep.yaml` (tracking and promotion off), in a
  child process; wall time from `run_sweep`'s call to its return, Ray start-up included.
- **(b) sequential**: the same trials in one process, one after another, `run_trial` with
  `dspy.LM`s from `lms.build_lm` straight to the endpoint, DSPy's default threads and its memory
  and disk cache (fresh directory). Calls requested are counted by a DSPy callback.
- **(c) physical limit**: the larger of two lower bounds. Capacity: the unique calls' service
  time with every slot busy (40 ms + tokens × 4.5 ms × 1.64), over slots × endpoints, for the
  students and for the teacher, whichever is busier. Chain: the sequential loop runs one trial
  at a time far below capacity, so calls of a trial that did not overlap could not be sent
  together (a dependency, or DSPy's thread count); the heaviest set of pairwise non-overlapping
  calls of one trial, each weighted by its service time alone on the endpoint (batch 1), is
  found exactly by weighted interval scheduling over the endpoint's request log (`GET
  /sim/requests`). Calls DSPy's cache answered do not reach the log and weigh nothing.
- **sent / unique**: every answered request carries a digest of its body (`/sim/requests`);
  unique counts distinct digests over all endpoints.
- **utilisation**: the students' busy slot-seconds (`slot_seconds` in `/sim/stats`, the integral
  of running requests over time) over slots × wall time, and over the span from the first call
  to the last (start-up and shutdown excluded).
- **added latency and CPU**: the same N calls (one shape, distinct bodies, so nothing is cached)
  one at a time through `GatewayEngine` and the gateway actor and through `dspy.LM`, in
  alternating blocks, against an endpoint at time scale 10⁻⁶; CPU is the calling process's
  plus the gateway actor's.
- **memory and CPU by part**: psutil samples the child and every process it started (Ray's GCS,
  raylet, workers) and the endpoints every second; a trial host is a `ray::TrialHost` worker.
  Marginal CPU and memory per trial: the hosts' CPU-seconds and summed peak RSS in the 64-trial
  sweep minus those in the 16-trial sweep, over the 48 extra trials.
- **first call**: from the launch of the process that runs the sweep (imports, preflight, Ray
  start-up and host warm-up all count) to the endpoints' first request.
- **trials at once**: from each trial's start (its folder's `host` file) and its duration.
- **joining a running Ray**: a head started beforehand with `ray start --head` on loopback, the
  sweep run with `--address`; its processes are not the sweep's, so only wall time is compared.
- **time scale**: n endpoints run at n × the base time scale, so every configuration asks the
  2 cores for the same ideal request rate (under 60/s, as the issue sets); throughput is compared
  in calls per simulated second. This keeps client CPU from deciding the endpoint comparison, but
  it also gives the single gateway actor n × the real time per call: its CPU per call (above)
  bounds what one gateway serves.
"""


if __name__ == "__main__":
    main()
