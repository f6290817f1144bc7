"""Measuring instruments for `bench/throughput.py`: simulated endpoints, samplers, the physical limit.

- `Fleet`: n simulated student endpoints (64 slots each, an 8B model on one H100) and one
  simulated teacher, each its own `SimServer` process, with one answer key.
- `Sampler`: a background thread in the bench process that samples, through psutil, the run's
  own processes (the child, Ray's processes it started, the endpoints): peak RSS and CPU time.
- `capacity_bound`, `chain_bound`: the two lower bounds on a sweep's wall time (see BENCHMARKS.md).

Imported by the bench only; it starts nothing on import.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspy_sweeps_sim.launch import SimServer

# vLLM serving an 8B model on one H100 (issue 4): 40 ms to the first token, 4.5 ms a token at
# batch size 1 (slower as the batch grows), 64 sequences at once.
H100_8B = {"max_num_seqs": 64, "ttft_ms": 40.0, "per_token_ms": 4.5}


def psutil_module() -> Any:
    """psutil, which Ray vendors and puts on sys.path when imported (the project does not depend on it)."""
    try:
        import psutil
    except ImportError:
        import psutil
        import ray  # noqa: F401 - side effect: ray/thirdparty_files joins sys.path
    return psutil


class Fleet:
    """`endpoints` student SimServers and one teacher SimServer, all at `time_scale`."""

    def __init__(self, answer_key: Path, workdir: Path, endpoints: int, time_scale: float) -> None:
        self.time_scale = time_scale
        self.students = [
            SimServer(answer_key, workdir / f"student{i}", models=("student",), time_scale=time_scale, **H100_8B)
            for i in range(endpoints)
        ]
        self.teacher = SimServer(answer_key, workdir / "teacher", models=("teacher",), time_scale=time_scale, **H100_8B)

    @property
    def servers(self) -> list[SimServer]:
        return [*self.students, self.teacher]

    def __enter__(self) -> Fleet:
        for server in self.servers:
            server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()

    def overrides(self) -> list[str]:
        """`--set` overrides pointing the bench sweep at this fleet; the student's cap is slots × endpoints."""
        urls = ", ".join(s.base_url for s in self.students)
        return [
            f"students.0.api_base=[{urls}]",
            f"students.0.max_concurrency={H100_8B['max_num_seqs'] * len(self.students)}",
            f"teachers.0.api_base={self.teacher.base_url}",
        ]

    def pids(self) -> set[int]:
        return {s.pid for s in self.servers if s.pid is not None}

    def slot_seconds(self) -> float:
        """Busy slot-seconds of the student endpoints together."""
        return sum(m["slot_seconds"] for s in self.students for m in s.stats()["models"].values())

    def request_logs(self) -> dict[str, list[list[Any]]]:
        """Answered requests of the students (all endpoints) and of the teacher:
        [slot start, slot end (Unix s), decode tokens, body digest, sampled]. Digests identify a body across
        endpoints, so a call sent twice to two replicas counts once as unique."""
        return {
            role: [entry for s in servers for log in s.requests().values() for entry in log]
            for role, servers in (("student", self.students), ("teacher", [self.teacher]))
        }


@dataclass
class ProcessStats:
    peak_rss: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    cpu_s: dict[int, float] = field(default_factory=dict)  # pid -> user+system seconds, last seen
    role: dict[int, str] = field(default_factory=dict)
    peak_hosts: int = 0  # trial hosts alive at once, at most


class Sampler(threading.Thread):
    """Sample the run's processes (RSS, CPU time) every `period` seconds until stopped."""

    def __init__(self, fleet: Fleet, driver_pid: int | None = None, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.fleet, self.driver_pid, self.period = fleet, driver_pid, period
        self.procs = ProcessStats()
        self.stopping = threading.Event()
        self.psutil = psutil_module()

    def run(self) -> None:
        while not self.stopping.is_set():
            self._sample_processes()
            self.stopping.wait(self.period)
        self._sample_processes()

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def _sample_processes(self) -> None:
        """RSS and CPU of the run's own processes: the child, everything it started (Ray's
        GCS, raylet and workers descend from the driver that called ray.init), the endpoints.
        Other Ray clusters on the machine are not ours and are left out."""
        psutil = self.psutil
        procs = []
        try:
            driver = psutil.Process(self.driver_pid) if self.driver_pid else None
            procs = [driver, *driver.children(recursive=True)] if driver else []
        except psutil.NoSuchProcess:
            pass
        for pid in self.fleet.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        hosts = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    role = _role(proc.pid, proc.cmdline(), self.driver_pid, self.fleet.pids())
                    rss, cpu = proc.memory_info().rss, proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.procs.role[proc.pid] = role
            self.procs.peak_rss[proc.pid] = max(self.procs.peak_rss.get(proc.pid, 0), rss)
            # children_* holds CPU of exited children the process waited for (short helpers).
            self.procs.cpu_s[proc.pid] = cpu.user + cpu.system
            hosts += role == "trial hosts"
        self.procs.peak_hosts = max(self.procs.peak_hosts, hosts)

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, seconds in self.procs.cpu_s.items():
            out[self.procs.role[pid]] = out.get(self.procs.role[pid], 0.0) + seconds
        return out

    def host_peaks(self) -> list[int]:
        return [rss for pid, rss in self.procs.peak_rss.items() if self.procs.role[pid] == "trial hosts"]

    def host_cpu(self) -> list[float]:
        return [cpu for pid, cpu in self.procs.cpu_s.items() if self.procs.role[pid] == "trial hosts"]


def _role(pid: int, cmdline: list[str], driver_pid: int | None, sims: set[int]) -> str:
    """Which part of the run a process is: Ray names its workers `ray::<actor class>.<method>`."""
    cmd = " ".join(cmdline)
    if pid == driver_pid:
        return "driver"
    if pid in sims:
        return "simulated endpoints"
    if cmd.startswith("ray::GatewayCore"):
        return "gateway actor"
    if cmd.startswith("ray::TrialHost"):
        return "trial hosts"
    return "Ray system"


# -- lower bounds on wall time ----------------------------------------------------------------


def service_s(decode_tokens: float, batch: int, time_scale: float, calls: float = 1) -> float:
    """Seconds `calls` requests decoding `decode_tokens` in all occupy a slot at batch size `batch`."""
    ms = calls * H100_8B["ttft_ms"] + decode_tokens * H100_8B["per_token_ms"] * (1 + batch / 100)
    return ms * time_scale / 1000


def capacity_bound(unique: int, decode_tokens: int, endpoints: int, time_scale: float) -> float:
    """The unique calls' service time over the endpoints' capacity. Throughput per endpoint,
    slots / service time, is highest with every slot busy, so the full batch gives the bound."""
    slots = H100_8B["max_num_seqs"]
    return service_s(decode_tokens, slots, time_scale, unique) / (slots * endpoints)


def chain_bound(log: list[list[Any]], start: float, end: float, time_scale: float) -> float:
    """The longest chain of calls that ran one after another inside [start, end].

    Calls are the endpoints' answered requests ([slot start, slot end, tokens, ...]); a chain
    is a set of them with no two overlapping in time, weighted by what each would take alone on
    the endpoint (batch size 1). In the sequential loop one trial runs at a time, far below the
    endpoint's capacity, so calls that did not overlap did not because the trial could not send
    them together: a dependency, or DSPy's thread count. Weighted interval scheduling finds the
    heaviest such chain exactly (dynamic programming over calls sorted by end time).
    """
    calls = sorted((e for e in log if start <= e[0] and e[1] <= end), key=lambda e: e[1])
    ends = [c[1] for c in calls]
    best = [0.0] * (len(calls) + 1)  # best[i]: heaviest chain among the first i calls
    for i, call in enumerate(calls):
        j = bisect.bisect_right(ends, call[0], 0, i)  # calls that ended before this one began
        best[i + 1] = max(best[i], best[j] + service_s(call[2], 1, time_scale))
    return best[-1]
