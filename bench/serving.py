"""Serving benchmark (issue 11): `sweep serve` against calling the loaded program in-process.

Against the simulated student answering at once (time scale 10⁻⁶), at 1, 16 and 64 concurrent
clients: requests per second and p50 / p99 latency for the service (HTTP clients on keep-alive
connections, in this process) and for the same program called in-process from as many threads,
the way the service calls it (`serve.app.predict_once`: its own DSPy context and LM copy). Then
the alias moves twice while 16 clients keep asking: failed requests and versions served.

`make bench` calls `serving_markdown(run_serving(ServingSizes.pick()))`; on its own:
`.venv/bin/python bench/serving.py` (BENCH_QUICK=1 for a short check).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
MODEL = "bench-serving"
CLIENTS = (1, 16, 64)


@dataclass(frozen=True)
class ServingSizes:
    requests: int  # per client count, spread over the clients
    switch_s: float  # seconds of load around each alias move

    @classmethod
    def pick(cls) -> ServingSizes:
        return cls(120, 2.0) if os.environ.get("BENCH_QUICK") else cls(1200, 5.0)


@dataclass
class Level:
    clients: int
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int


@dataclass
class ServingResults:
    service: list[Level]
    in_process: list[Level]
    switch_failed: int = 0
    switch_versions: dict[str, int] = field(default_factory=dict)
    switch_requests: int = 0


def register_version(uri: str, tmp: Path, note: str) -> str:
    """Register the demo program (with one demo saying `note`, so versions differ) and give it `champion`."""
    import dspy
    from mlflow.tracking import MlflowClient

    from dspy_sweeps.track.registry import Registration, _register, program_sha
    from dspy_sweeps.track.results import TrialRecord
    from pipelines.arith import Solve

    program = Solve()
    program.solve.predict.demos = [dspy.Example(question="What is 1 plus 1?", reasoning=note, answer="2")]
    program_json = json.dumps(program.dump_state(), sort_keys=True, default=str)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench") or client.get_experiment(
        client.create_experiment("bench", (tmp / "artifacts").as_uri())
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    client.log_text(run_id, program_json, "program/program.json")
    meta = {"program": "pipelines.arith:Solve", "student": {"name": "small", "model": "sim/student"}, "sweep": MODEL}
    client.log_dict(run_id, {**meta, "inputs": ["question"]}, "program/metadata.json")
    numbers = dict.fromkeys(
        ("lm_calls", "calls_requested", "cache_hits", "merged_calls", "failed_calls", "failed_examples"), 0
    )
    record = TrialRecord(
        sweep=MODEL,
        trial_id=note,
        kind="none",
        settings="{}",
        student="sim/student",
        teacher=None,
        seed=0,
        status="ok",
        error=None,
        reason=None,
        val_score=0.5,
        test_score=0.5,
        estimated_calls=0,
        prompt_tokens=0,
        completion_tokens=0,
        latency_s=0.0,
        cost_usd=0.0,
        duration_s=0.0,
        program_path=None,
        data_fingerprint="bench",
        **numbers,
    )
    registration = Registration(record, run_id, program_sha(program_json), test_scores=[], gain=None)
    version = _register(MODEL, registration, program, uri, gate="passed")
    client.set_registered_model_alias(MODEL, "champion", version)
    return version


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(clients: int, requests: int, one: Callable[[Any], tuple[bool, str]], make: Callable[[], Any]) -> Level:
    """`clients` threads share `requests` calls of `one(state)`; each thread has its own `make()` state."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    per_client = max(1, requests // clients)
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        state, mine = make(), []
        ready.wait()
        for _ in range(per_client):
            start = time.perf_counter()
            ok, _ = one(state)
            mine.append(time.perf_counter() - start)
            if not ok:
                with lock:
                    failed[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return Level(
        clients, len(latencies) / wall, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3, failed[0]
    )


def http_predict(port: int, body: bytes) -> tuple[Callable[[Any], tuple[bool, str]], Callable[[], Any]]:
    def make() -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def one(conn: http.client.HTTPConnection) -> tuple[bool, str]:
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        return response.status == 200, json.loads(payload).get("version", "") if response.status == 200 else ""

    return one, make


def start_service(uri: str, api_base: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cmd = [str(REPO / ".venv/bin/sweep"), "serve", f"{MODEL}@champion", "--port", "0", "--api-base", api_base]
    cmd += ["--tracking-uri", uri, "--concurrency", "64", "--poll-seconds", "0.5", "--state-dir", str(tmp / "state")]
    process = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp / "serve.log").open("w"),
        text=True,
        start_new_session=True,
    )
    line = process.stdout.readline()
    if not line.startswith("serving "):
        raise RuntimeError(f"sweep serve did not start: {line}{(tmp / 'serve.log').read_text()[-2000:]}")
    return process, int(line.split(" at ", 1)[1].split()[0].rstrip(",").rsplit(":", 1)[1])


def run_serving(sizes: ServingSizes, progress: Callable[[str], None] = print) -> ServingResults:
    from dspy_sweeps.data import load_dataset
    from dspy_sweeps.serve.app import predict_once
    from dspy_sweeps.serve.program import StudentConfig, load_version
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps_sim import write_answer_key
    from dspy_sweeps_sim.launch import SimServer

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        uri = f"sqlite:///{tmp}/mlflow.db"
        key = write_answer_key(load_dataset(load_sweep(REPO / "sweeps/demo.yaml").data), tmp / "key.jsonl")
        question = json.loads(key.read_text().splitlines()[0])["inputs"]["question"]
        register_version(uri, tmp, "v1")
        with SimServer(key, tmp / "sim", models=("student",), time_scale=1e-6, max_num_seqs=256) as sim:
            loaded = load_version(uri, MODEL, "1", StudentConfig(api_base=sim.base_url, lm_retries=0))
            service, port = start_service(uri, sim.base_url, tmp)
            try:
                results = ServingResults([], [])
                one, make = http_predict(port, json.dumps({"question": question}).encode())
                drive(4, 40, one, make)  # warm both paths: connections, imports, caches
                drive(4, 40, lambda _: (bool(predict_once(loaded, {"question": question}).outputs), ""), lambda: None)
                for clients in CLIENTS:
                    progress(f"serving: {clients} clients")
                    results.service.append(drive(clients, sizes.requests, one, make))
                    in_process = lambda _: (bool(predict_once(loaded, {"question": question}).outputs), "")  # noqa: E731
                    results.in_process.append(drive(clients, sizes.requests, in_process, lambda: None))
                progress("serving: alias moves twice under load")
                switch(results, port, question, uri, tmp, sizes)
            finally:
                os.killpg(service.pid, signal.SIGTERM)
                service.wait(timeout=60)
    return results


def switch(results: ServingResults, port: int, question: str, uri: str, tmp: Path, sizes: ServingSizes) -> None:
    """16 clients ask until two alias moves have been followed; every answer's version is counted."""
    one, make = http_predict(port, json.dumps({"question": question}).encode())
    stop, lock = threading.Event(), threading.Lock()

    def client() -> None:
        conn = make()
        while not stop.is_set():
            try:
                ok, version = one(conn)
            except OSError:
                ok, version, conn = False, "", make()
            with lock:
                results.switch_requests += 1
                results.switch_failed += 0 if ok else 1
                if ok:
                    results.switch_versions[version] = results.switch_versions.get(version, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(sizes.switch_s)
    for note in ("v2", "v3"):
        version = register_version(uri, tmp, note)
        deadline = time.monotonic() + 120
        while results.switch_versions.get(version, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(sizes.switch_s)
    stop.set()
    for thread in threads:
        thread.join()


def serving_markdown(results: ServingResults) -> str:
    from report import table

    rows = []
    for service, local in zip(results.service, results.in_process):
        rows.append(
            [
                str(service.clients),
                f"{service.rps:.0f}",
                f"{local.rps:.0f}",
                f"{service.rps / local.rps:.2f}",
                f"{service.p50_ms:.2f} / {service.p99_ms:.2f}",
                f"{local.p50_ms:.2f} / {local.p99_ms:.2f}",
                f"{service.p50_ms - local.p50_ms:+.2f}",
                str(service.failed + local.failed),
            ]
        )
    header = ["clients", "service req/s", "in-process req/s", "ratio", "service p50 / p99 (ms)"]
    header += ["in-process p50 / p99 (ms)", "added p50 (ms)", "failed"]
    at16 = next(i for i, level in enumerate(results.service) if level.clients == 16)
    added = results.service[0].p50_ms - results.in_process[0].p50_ms
    ratio = results.service[at16].rps / results.in_process[at16].rps
    served = ", ".join(f"v{v}: {n}" for v, n in sorted(results.switch_versions.items()))
    goals = [
        ["service adds ≤ 3 ms at p50 (1 client)", f"{added:+.2f} ms", "met" if added <= 3 else "missed"],
        ["≥ 80% of in-process throughput at 16 clients", f"{ratio:.0%}", "met" if ratio >= 0.8 else "missed"],
        [
            "0 failed requests while the alias moves twice",
            f"{results.switch_failed} of {results.switch_requests} ({served})",
            "met" if results.switch_failed == 0 and len(results.switch_versions) == 3 else "missed",
        ],
    ]
    return (
        "Against the simulated student answering at once (time scale 10⁻⁶); the service is `sweep serve` "
        "(uvicorn, one process, --concurrency 64), its clients keep-alive HTTP connections from threads of the "
        "bench process; in-process is the same program called from as many threads as the service calls it "
        "(its own DSPy context and LM copy per request).\n\n"
        + table(header, rows)
        + "\n\n"
        + table(["goal (issue 11)", "measured", ""], goals)
    )


if __name__ == "__main__":
    print(serving_markdown(run_serving(ServingSizes.pick(), progress=lambda m: print(f"-- {m}", flush=True))))
