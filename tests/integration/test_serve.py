"""`sweep serve` as a user runs it: a real `mlflow server`, the simulated student on loopback, the
service in its own process, plain HTTP. Predictions, health, readiness, metrics, 422 on a bad body,
502/503/504 by kind of LM failure, following the alias under load, a version that fails to load,
and bad input exiting 2.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import REPO, SWEEP, Served, call, metric, new_model, register, wait_for
from sweep_helpers import demo_answer_key

from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    workdir = tmp_path_factory.mktemp("serve-sim")
    with SimServer(demo_answer_key(workdir / "key.jsonl"), workdir, models=("student",), time_scale=0.01) as sim:
        yield sim


@pytest.fixture(scope="module")
def question(student: SimServer) -> str:
    return json.loads(student.answer_key.read_text().splitlines()[0])["inputs"]["question"]


@pytest.fixture(scope="module")
def served(mlflow_server: str, student: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("served")
    model = new_model()
    register(tmp, mlflow_server, model, 0.5)
    args = ("--api-base", student.base_url, "--lm-retries", "0", "--lm-timeout", "2")
    service = Served(f"{model}@champion", mlflow_server, tmp, *args)
    try:
        yield service
    finally:
        service.stop()


def test_predict_health_ready_docs_and_metrics(served: Served, question: str) -> None:
    status, _, body = call(served.url, "/predict", {"question": question})
    assert status == 200, body
    assert set(body["outputs"]) == {"reasoning", "answer"} and body["outputs"]["answer"]
    assert body["version"] == "1"
    assert body["lm_calls"] == 1 and body["prompt_tokens"] > 0 and body["completion_tokens"] > 0
    assert call(served.url, "/health")[:1] == (200,)
    status, _, ready = call(served.url, "/ready")
    assert status == 200 and ready["ready"] is True and ready["version"] == "1"
    status, _, schema = call(served.url, "/openapi.json")
    request_schema = schema["components"]["schemas"]["PredictRequest"]
    assert status == 200 and request_schema["required"] == ["question"]
    assert call(served.url, "/docs")[0] == 200
    _, headers, text = call(served.url, "/metrics")
    assert headers["content-type"].startswith("text/plain")
    assert metric(text, "sweep_serve_requests_total", route="/predict", status="200") >= 1
    assert metric(text, "sweep_serve_lm_calls_total") >= 1
    assert metric(text, "sweep_serve_lm_tokens_total", kind="prompt") >= body["prompt_tokens"]
    assert metric(text, "sweep_serve_request_seconds_count", route="/predict") >= 1
    assert 'sweep_serve_version{alias="champion"' in text and 'version="1"} 1.0' in text


def test_a_malformed_body_gets_422_naming_the_field(served: Served) -> None:
    status, _, body = call(served.url, "/predict", {"questoin": "typo"})
    assert status == 422
    named = {tuple(error["loc"]) for error in body["detail"]}
    assert ("body", "question") in named and ("body", "questoin") in named
    status, _, body = call(served.url, "/predict", {"question": ["not", "a", "string"]})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "question"]
    _, _, text = call(served.url, "/metrics")
    assert metric(text, "sweep_serve_requests_total", route="/predict", status="422") == 2


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("fault", "status", "kind"),
    [("error500", 502, "endpoint_down"), ("rate_limit", 503, "rate_limited"), ("hang", 504, "timed_out")],
)
def test_a_failed_lm_call_is_an_error_status_by_kind_never_an_answer(
    served: Served, student: SimServer, question: str, fault: str, status: int, kind: str
) -> None:
    before = student.stats()["models"]["student"]["faults"].get(fault, 0)
    student.set_faults(fault, count=1, **({"hang_seconds": 30} if fault == "hang" else {}))
    try:
        got, headers, body = call(served.url, "/predict", {"question": question})
    finally:
        student.set_faults("ok")
    hit = student.stats()["models"]["student"]["faults"].get(fault, 0) - before
    _, _, text = call(served.url, "/metrics")
    assert hit == 1, "the fault was not hit"
    assert got == status and body["kind"] == kind and "outputs" not in body, body
    if fault == "rate_limit":
        assert float(headers["retry-after"]) > 0
    assert metric(text, "sweep_serve_errors_total", kind=kind) >= 1
    assert call(served.url, "/predict", {"question": question})[0] == 200  # and it serves again


def test_an_alias_that_moves_twice_under_load_fails_no_request(
    mlflow_server: str, student: SimServer, question: str, tmp_path: Path
) -> None:
    model = new_model()
    register(tmp_path, mlflow_server, model, 0.5)
    served = Served(
        f"{model}@champion", mlflow_server, tmp_path, "--api-base", student.base_url, "--poll-seconds", "0.2"
    )
    seen: dict[str, int] = {}
    failures: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    started = threading.Barrier(9)  # eight clients and this test: the load runs before the alias moves

    def client() -> None:
        first = True
        while not stop.is_set():
            status, _, body = call(served.url, "/predict", {"question": question})
            with lock:
                if status == 200:
                    seen[body["version"]] = seen.get(body["version"], 0) + 1
                else:
                    failures.append(f"{status}: {body}")
            if first:
                started.wait(timeout=120)
                first = False

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        started.wait(timeout=120)
        for version in (register(tmp_path, mlflow_server, model, 0.6), register(tmp_path, mlflow_server, model, 0.7)):
            wait_for(lambda v=version: seen.get(v, 0) >= 5, f"requests answered by v{version}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        _, _, text = call(served.url, "/metrics")
        served.stop()
    assert failures == []
    assert set(seen) == {"1", "2", "3"} and all(seen.values())
    assert metric(text, "sweep_serve_switches_total") == 2
    assert metric(text, "sweep_serve_version", model=model, alias="champion", version="3") == 1
    assert served.stderr().count("moved from v") == 2


@pytest.mark.reliability
def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    mlflow_server: str, student: SimServer, question: str, tmp_path: Path
) -> None:
    model = new_model()
    register(tmp_path, mlflow_server, model, 0.5)
    served = Served(
        f"{model}@champion", mlflow_server, tmp_path, "--api-base", student.base_url, "--poll-seconds", "0.2"
    )
    try:
        broken = register(tmp_path, mlflow_server, model, 0.9, program="pipelines.arith:NoSuchProgram")
        wait_for(
            lambda: metric(call(served.url, "/metrics")[2], "sweep_serve_load_failures_total") == 1, "the failed load"
        )
        status, _, body = call(served.url, "/predict", {"question": question})
        call(served.url, "/metrics")  # a few more polls pass meanwhile: still one log line
    finally:
        served.stop()
    lines = [line for line in served.stderr().splitlines() if "failed to load" in line]
    assert status == 200 and body["version"] == "1"
    assert len(lines) == 1 and f"v{broken}" in lines[0] and "NoSuchProgram" in lines[0], served.stderr()


@pytest.mark.reliability
def test_bad_input_exits_2_with_one_line(mlflow_server: str, tmp_path: Path) -> None:
    model = new_model()
    register(tmp_path, mlflow_server, model, 0.5)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        cases = {
            "unknown model": ([f"nope-{model}@champion", "--tracking-uri", mlflow_server], "no such registered model"),
            "unknown alias": ([f"{model}@nope", "--tracking-uri", mlflow_server], "no such registered model"),
            "port in use": ([f"{model}@champion", "--tracking-uri", mlflow_server, "--port", busy], "already in use"),
            "registry down": ([f"{model}@champion", "--tracking-uri", "http://127.0.0.1:9"], "does not answer"),
        }
        done = {
            case: subprocess.run(
                [str(SWEEP), "serve", *args, "--state-dir", str(tmp_path / "state")],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            for case, (args, _) in cases.items()
        }
    clean = {
        case: d.returncode == 2 and len(d.stderr.strip().splitlines()) == 1 and cases[case][1] in d.stderr
        for case, d in done.items()
    }
    assert all(clean.values()), {case: (d.returncode, d.stderr) for case, d in done.items()}
