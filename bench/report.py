"""The throughput benchmark's tables and the issue's goals beside what was measured (Markdown).

`throughput_markdown(results)` is what `bench/throughput.py` prints and `bench/run.py` writes
into BENCHMARKS.md; each missed goal gets a one-line reason built from the run's own numbers.
`python bench/report.py results.pkl` renders the results a `BENCH_KEEP=1` run kept.
"""

from __future__ import annotations

import os
import pickle
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from measure import H100_8B, service_s


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def section_of(markdown: str, heading: str) -> str:
    """The section of `markdown` from the line `heading` up to the next `## ` heading, or ''."""
    start = markdown.find(f"{heading}\n")
    if start < 0:
        return ""
    end = markdown.find("\n## ", start + len(heading))
    return markdown[start : end + 1] if end >= 0 else markdown[start:]


def ideal_rate(run: Any) -> float:
    """Requests per second the endpoints answer with every slot busy, at the run's time scale."""
    slots = H100_8B["max_num_seqs"] * run.endpoints
    return slots / service_s(run.decode_tokens_per_call, H100_8B["max_num_seqs"], run.time_scale)


def rss(run: Any) -> str:
    """The trial hosts' memory: all together, and how many hosts held it."""
    peaks = run.host_peak_rss_mb
    return f"{sum(peaks):.0f} MB in {len(peaks)} host(s)" if peaks else "-"


def host_cpu(run: Any) -> str:
    return f"{sum(run.host_cpu_s):.1f} CPU-s in {len(run.host_cpu_s)} host(s)" if run.host_cpu_s else "-"


def marginal(r: Any) -> tuple[float, float]:
    """CPU-seconds and MB of the trial hosts per additional trial, from the main and the larger sweep."""
    small, big = r.main, r.many
    extra = big.trials - small.trials
    cpu = (sum(big.host_cpu_s) - sum(small.host_cpu_s)) / extra
    memory = (sum(big.host_peak_rss_mb) - sum(small.host_peak_rss_mb)) / extra
    return cpu, memory


def cpu_parts(run: Any) -> str:
    parts = sorted(run.cpu_s.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {seconds:.0f}" for name, seconds in parts if seconds >= 0.5)


def main_table(r: Any) -> str:
    a, b = r.main, r.sequential
    overhead = r.overhead
    direct, gateway = overhead["dspy.LM direct"], overhead["gateway"]
    rows = [
        ["wall time", f"{a.wall_s:.1f} s", f"{b.wall_s:.1f} s", f"{a.limit_s:.1f} s"],
        [
            "calls requested / sent / unique",
            f"{a.requested:,} / {a.sent:,} / {a.unique:,}",
            f"{b.requested:,} / {b.sent:,} / {b.unique:,}",
            f"- / {a.unique:,} / {a.unique:,}",
        ],
        ["calls sent / unique", f"{a.sent / a.unique:.3f}", f"{b.sent / b.unique:.3f}", "1.000"],
        [
            "endpoint utilisation: over the run / first call to last",
            f"{a.utilisation:.2f} / {a.utilisation_active:.2f}",
            f"{b.utilisation:.2f} / {b.utilisation_active:.2f}",
            "1.00",
        ],
        ["efficiency (physical limit / wall)", f"{a.efficiency:.2f}", f"{b.limit_s / b.wall_s:.2f}", "1.00"],
        ["speed-up over the sequential loop", f"{b.wall_s / a.wall_s:.1f}×", "1.0×", f"{b.wall_s / a.limit_s:.1f}×"],
        [
            "throughput (calls sent / s)",
            f"{a.sent / a.wall_s:.1f}",
            f"{b.sent / b.wall_s:.1f}",
            f"{a.unique / a.limit_s:.1f}",
        ],
        ["first endpoint call after the start", f"{a.first_call_s:.1f} s", f"{b.first_call_s:.1f} s", "0 s"],
        [
            "per-call latency, p50 (endpoint answering at once)",
            f"{gateway['p50_ms']:.2f} ms",
            f"{direct['p50_ms']:.2f} ms",
            f"added: {gateway['p50_ms'] - direct['p50_ms']:+.2f} ms",
        ],
        [
            "client CPU per call (caller + gateway actor)",
            f"{gateway['cpu_ms']:.2f} ms ({gateway['caller_cpu_ms']:.2f} + {gateway['gateway_cpu_ms']:.2f})",
            f"{direct['cpu_ms']:.2f} ms",
            f"added: {gateway['cpu_ms'] - direct['cpu_ms']:+.2f} ms",
        ],
        ["peak RSS of the trial hosts", rss(a), "-", "-"],
        ["CPU of the trial hosts (start-up and trials)", host_cpu(a), "-", "-"],
        ["trials running at once, at most", str(a.peak_trials), "1", "-"],
        [
            "CPU-seconds by part (cores busy)",
            f"{cpu_parts(a)} ({a.cpu_busy:.0%})",
            f"{cpu_parts(b)} ({b.cpu_busy:.0%})",
            "-",
        ],
        ["trials failed", str(a.failed), str(b.failed), "-"],
    ]
    return table(["measure", "(a) platform sweep", "(b) sequential plain DSPy", "(c) physical limit"], rows)


def sequential_lines(r: Any) -> str:
    """Per optimizer kind: the loop's wall time per trial and the longest chain in it."""
    kinds: dict[str, list[tuple[float, float]]] = {}
    for kind, wall, chain in r.sequential_trials:
        kinds.setdefault(kind, []).append((wall, chain))
    parts = [
        f"{kind} {statistics.mean(w for w, _ in v):.1f} s (chain {statistics.mean(c for _, c in v):.1f} s)"
        for kind, v in kinds.items()
    ]
    return "Sequential loop, mean wall time per trial (and its longest chain of calls): " + ", ".join(parts) + "."


def scaling_table(r: Any) -> str:
    base = {run.trials: run.throughput for run in r.scaling if run.endpoints == 1}
    rows = [
        [
            str(run.endpoints),
            str(run.trials),
            f"{run.time_scale:g}",
            f"{run.wall_s:.1f}",
            f"{run.wall_s / run.time_scale:.1f}",
            f"{run.first_call_s:.1f}",
            f"{run.sent:,}",
            f"{run.unique:,}",
            f"{run.throughput:.1f}",
            f"{run.throughput / base[run.trials]:.2f}×",
            f"{run.active_throughput:.1f}",
            f"{run.utilisation:.2f} / {run.utilisation_active:.2f}",
            f"{run.efficiency:.2f}",
            str(run.peak_trials),
            f"{run.cpu_busy:.0%}",
            rss(run),
        ]
        for run in r.scaling
    ]
    header = [
        "endpoints",
        "trials",
        "time scale",
        "wall (s)",
        "wall (simulated s)",
        "first call (s)",
        "calls sent",
        "unique",
        "throughput (calls / simulated s)",
        "vs 1 endpoint",
        "first call to last (calls / simulated s)",
        "utilisation (run / active)",
        "efficiency",
        "trials at once (most)",
        "cores busy",
        "peak RSS of the trial hosts",
    ]
    return table(header, rows)


@dataclass(frozen=True)
class Goal:
    text: str
    measured: str
    met: bool
    reason: str = ""


def goals(r: Any) -> list[Goal]:
    a, b = r.main, r.sequential
    direct, gateway = r.overhead["dspy.LM direct"], r.overhead["gateway"]
    busy = f"cores {a.cpu_busy:.0%} busy over the run"
    start = (
        f"first call {a.first_call_s:.0f} s after `sweep run` started, in a {a.wall_s:.0f} s run "
        f"(Ray start-up, then {len(a.host_cpu_s)} trial host(s) warming up on {os.cpu_count()} cores)"
    )
    bound = (
        f"too few calls are ready at once: at full batch the unique calls need {a.capacity_s:.0f} s of the endpoint, "
        f"the longest trial ({kind_of(r.chain_trial)}) {a.chain_s:.0f} s of calls in sequence"
        if a.chain_s > a.capacity_s
        else "calls in flight fell short of the slots"
    )
    bound += (
        f"; at most {a.peak_trials} trials ran at once × {r.platform_threads} DSPy threads = "
        f"{a.peak_trials * r.platform_threads} calls in flight for {64 * a.endpoints} slots"
    )
    by_trials: dict[int, dict[int, Any]] = {}
    for run in r.scaling:
        by_trials.setdefault(run.trials, {})[run.endpoints] = run
    most_work = max(
        t for t, runs in by_trials.items() if len(runs) > 1
    )  # the most trials run on several endpoint counts
    big = by_trials[most_work]
    most, one = big[max(big)], big[1]
    ratio = most.throughput / one.throughput
    resent = a.sent - a.unique
    added_ms, added_cpu = gateway["p50_ms"] - direct["p50_ms"], gateway["cpu_ms"] - direct["cpu_ms"]
    speedup = b.wall_s / a.wall_s
    return [
        Goal(
            "calls sent / unique calls = 1.00",
            f"{a.sent / a.unique:.3f}",
            resent == 0,
            f"{resent} bodies sent more than once, {a.resent_sampled} of them sampled (temperature > 0): the gateway keeps "
            "each trial's draws distinct, by design (plain DSPy: "
            f"{b.sent - b.unique})",
        ),
        Goal(
            "endpoint utilisation ≥ 0.90 while trials are runnable",
            f"{a.utilisation_active:.2f} from first call to last, {a.utilisation:.2f} over the run",
            a.utilisation_active >= 0.9,
            f"{bound}; {busy}",
        ),
        Goal("efficiency ≥ 0.80", f"{a.efficiency:.2f}", a.efficiency >= 0.8, f"{start}; {busy}"),
        Goal(
            "added latency ≤ 2 ms p50",
            f"{added_ms:+.2f} ms",
            added_ms <= 2,
            f"gateway path {gateway['p50_ms']:.2f} ms against {direct['p50_ms']:.2f} ms for dspy.LM",
        ),
        Goal(
            "added client CPU ≤ 1 ms per call",
            f"{added_cpu:+.2f} ms",
            added_cpu <= 1,
            f"gateway path {gateway['cpu_ms']:.2f} ms ({gateway['caller_cpu_ms']:.2f} in the trial, "
            f"{gateway['gateway_cpu_ms']:.2f} in the gateway actor) against {direct['cpu_ms']:.2f} ms for dspy.LM",
        ),
        Goal(
            f"speed-up over the sequential loop ≥ 10× at {a.trials} trials",
            f"{speedup:.1f}×",
            speedup >= 10,
            f"the physical limit allows {b.wall_s / a.limit_s:.1f}×; {start}",
        ),
        Goal(
            f"throughput with {max(big)} endpoints ≥ 3.2× that with 1 ({most_work} trials)",
            f"{ratio:.2f}× ({most.active_throughput / one.active_throughput:.2f}× first call to last)",
            ratio >= 3.2,
            f"{max(big)} endpoints {most.utilisation_active:.2f} busy from first call to last, 1 endpoint "
            f"{one.utilisation_active:.2f}; at most {most.peak_trials} trials ran at once, so at most "
            f"{most.peak_trials * r.platform_threads} calls were in flight for {64 * max(big)} slots",
        ),
    ]


def host_goals(r: Any) -> list[Goal]:
    """Issue 8: trials as threads in warm hosts."""
    a, b, big, joined = r.main, r.sequential, r.many, r.joined
    cpu, memory = marginal(r)
    first = max(a.first_call_s, big.first_call_s)
    speedup, joined_speedup, limit = b.wall_s / a.wall_s, b.wall_s / joined.wall_s, b.wall_s / a.limit_s
    hosts_mb = sum(big.host_peak_rss_mb)
    start = f"`sweep run` reaches its first call after {a.first_call_s:.0f} s (Ray start-up and host warm-up among it)"
    return [
        Goal(
            "CPU to start one more concurrent trial ≤ 0.3 CPU-s",
            f"{cpu:.2f} CPU-s",
            cpu <= 0.3,
            f"the hosts' CPU per additional trial, {a.trials} → {big.trials} trials, includes the trial's own DSPy "
            "work (adapters, parsing), not only its start",
        ),
        Goal(
            "memory per additional concurrent trial ≤ 40 MB",
            f"{memory:.1f} MB",
            memory <= 40,
            f"the hosts' peak RSS, {a.trials} → {big.trials} trials",
        ),
        Goal(
            f"first endpoint call after `sweep run` starts ≤ 15 s, cold, {a.trials} and {big.trials} trials",
            f"{a.first_call_s:.1f} s / {big.first_call_s:.1f} s",
            first <= 15,
            "from the process's launch: imports, preflight, Ray start-up, hosts warming up",
        ),
        Goal(
            f"speed-up over the sequential plain-DSPy loop ≥ 4×, {a.trials} trials, cold",
            f"{speedup:.1f}×",
            speedup >= 4,
            f"{start}; the limit allows {limit:.1f}×",
        ),
        Goal(
            "the same, joining a running Ray (`--address`) ≥ 7×",
            f"{joined_speedup:.1f}× (limit {limit:.1f}×)",
            joined_speedup >= 7,
            f"first call after {joined.first_call_s:.0f} s without a Ray to start; {joined.wall_s:.0f} s in all",
        ),
        Goal(
            f"{big.trials} trials at once on {os.cpu_count()} cores, trial processes ≤ 3 GB",
            f"{big.peak_trials} at once, {hosts_mb:.0f} MB in {len(big.host_peak_rss_mb)} host(s)",
            big.peak_trials == big.trials and hosts_mb <= 3072,
            f"{big.peak_trials} of {big.trials} trials overlapped in time",
        ),
    ]


def kind_of(trial_id: str) -> str:
    return trial_id.split("-")[0]


def goals_table(issue: str, listed: list[Goal]) -> str:
    rows = [[g.text, g.measured, "met" if g.met else "missed", "" if g.met else g.reason] for g in listed]
    return table([f"goal ({issue})", "measured", "", "why, where missed"], rows)


def setup_lines(r: Any) -> str:
    a = r.main
    train, val, test = r.sizes.split
    return (
        f"Simulated endpoints like vLLM serving an 8B model on one H100: time to first token "
        f"{H100_8B['ttft_ms']:.0f} ms, {H100_8B['per_token_ms']} ms a token × (1 + b/100) at b running, "
        f"{H100_8B['max_num_seqs']} sequences each; chain-of-thought answers of {a.decode_tokens_per_call:.0f} tokens on "
        f"average. Time scale {a.time_scale:g} per endpoint (n endpoints: n × it), so the ideal rate is "
        f"{ideal_rate(a):.0f} requests/s in every configuration (under 60 on {os.cpu_count()} cores). "
        f"Sweep `bench/sweep.yaml`: {a.trials} trials (baseline + BootstrapFewShot, MIPROv2, GEPA × seeds), "
        f"split {train}/{val}/{test}, DSPy threads per trial {r.platform_threads} on the platform (the sweep's "
        f"`num_threads`) and {r.sequential_threads} in the loop (DSPy's default). The physical limit is the larger "
        f"of the unique calls' service time over the endpoints' capacity ({a.capacity_s:.1f} s) and the longest "
        f"chain of calls that ran one after another in one trial of the sequential loop ({a.chain_s:.1f} s, "
        f"{r.chain_trial})."
    )


def warnings(r: Any) -> list[str]:
    """What makes a run's numbers suspect, said before the tables."""
    out = []
    failed = sum(run.failed for run in [r.sequential, *r.scaling])
    if failed:
        out.append(f"**Warning:** {failed} trials failed (see the tables); their calls are missing from the figures.")
    if ideal_rate(r.main) >= 60:
        out.append(f"**Warning:** the ideal rate is {ideal_rate(r.main):.0f} requests/s, over 60: raise TIME_SCALE.")
    return out


def throughput_markdown(r: Any) -> str:
    return "\n\n".join(
        [
            *warnings(r),
            setup_lines(r),
            main_table(r),
            sequential_lines(r),
            "Endpoints and work: the same sweep on 1, 2 and 4 student endpoints (`api_base` a list, "
            "`max_concurrency` 64 × endpoints) and more trials, every trial of a sweep at once. Throughput is "
            "calls sent per simulated second (wall / time scale).",
            scaling_table(r),
            goals_table("issue 8: trial hosts", host_goals(r)),
            goals_table("issue 4", goals(r)),
        ]
    )


if __name__ == "__main__":
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]  # unpickling imports `throughput`
    with open(sys.argv[1], "rb") as f:
        print(throughput_markdown(pickle.load(f)))
