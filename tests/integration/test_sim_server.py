"""Integration tests for the SIMULATED OpenAI-compatible LM endpoint, driven by the real DSPy client.

Run: ``python -m pytest tests/integration/test_sim_server.py -q``. Each server runs as a
subprocess through `SimServer` with time_scale ~0.001, so the suite takes a few seconds.
"""

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspy_sweeps_sim import SimServer
from dspy_sweeps_sim.answers import HINTS

QUESTIONS = [f"What is {a} times {b}?" for a in range(2, 12) for b in range(2, 9)]  # 70 keyed questions
EVALUATED, DEMO_SOURCE = QUESTIONS[:50], QUESTIONS[50:]


def gold(question: str) -> str:
    words = question.split()
    return str(int(words[2]) * int(words[4].rstrip("?")))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "key.jsonl"
    rows = ({"inputs": {"question": q}, "labels": {"answer": gold(q)}} for q in QUESTIONS)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def server(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    with SimServer(key_file, tmp_path_factory.mktemp("sim-work"), time_scale=0.001) as sim:
        yield sim


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def metric(text: str, name: str, model: str) -> float:
    prefix = f'{name}{{model_name="{model}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).removeprefix(prefix))


def program(demos: int, hints: bool) -> dspy.Module:
    cot = dspy.ChainOfThought("question -> answer")
    if hints:
        cot.predict.signature = cot.predict.signature.with_instructions("Multiply the numbers. " + " ".join(HINTS))
    cot.predict.demos = [
        dspy.Example(question=q, reasoning="Multiply the two numbers.", answer=gold(q)) for q in DEMO_SOURCE[:demos]
    ]
    return cot


def accuracy(server: SimServer, model: str, module: dspy.Module) -> float:
    lm = dspy.LM(f"openai/{model}", api_base=server.base_url, api_key="sim-key", cache=False)
    module.set_lm(lm)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: module(question=q).answer, EVALUATED))
    return sum(a == gold(q) for a, q in zip(answers, EVALUATED)) / len(EVALUATED)


def test_dspy_program_quality_follows_model_demos_and_hints(server: SimServer) -> None:
    teacher_best = accuracy(server, "teacher", program(demos=4, hints=True))
    student_bare = accuracy(server, "student", program(demos=0, hints=False))
    student_best = accuracy(server, "student", program(demos=4, hints=True))
    assert teacher_best >= 0.8
    assert student_bare <= 0.5
    assert student_best >= student_bare + 0.25


def test_json_adapter_round_trip(server: SimServer) -> None:
    lm = dspy.LM("openai/teacher", api_base=server.base_url, api_key="sim-key", cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = program(demos=4, hints=True)(question=EVALUATED[0])
    assert prediction.answer.lstrip("-").isdigit() and len(prediction.reasoning.split()) >= 40


def test_openai_wire_format(server: SimServer) -> None:
    chat = {"model": "student", "messages": [{"role": "user", "content": "Hello"}], "n": 3, "temperature": 0}
    status, headers, body = http(f"{server.base_url}/chat/completions", chat)
    reply = json.loads(body)
    assert status == 200 and headers["x-simulated"] == "true"
    assert reply["model"] == "student" and reply["id"] and reply["created"] > 0
    assert [c["finish_reason"] for c in reply["choices"]] == ["stop"] * 3
    assert len({c["message"]["content"] for c in reply["choices"]}) == 1  # greedy choices are identical
    usage = reply["usage"]
    assert usage["prompt_tokens"] == 2 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    status, _, body = http(f"{server.base_url}/completions", {"model": "teacher", "prompt": "Hello"})
    assert status == 200 and json.loads(body)["choices"][0]["text"]

    status, headers, body = http(f"{server.base_url}/models")
    assert [m["id"] for m in json.loads(body)["data"]] == ["student", "teacher"]

    status, headers, body = http(f"{server.base_url}/chat/completions", {**chat, "stream": True})
    assert status == 400 and headers["x-simulated"] == "true" and b"stream" in body
    status, _, _ = http(f"{server.base_url}/chat/completions", {**chat, "model": "gpt-4o"})
    assert status == 404


def test_metrics_report_vllm_gauges_and_counters(server: SimServer) -> None:
    http(f"{server.base_url}/chat/completions", {"model": "teacher", "messages": [{"role": "user", "content": "Hi"}]})
    status, headers, body = http(server.base_url.removesuffix("/v1") + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'sim_info{simulated="true"} 1' in text
    for model in ("student", "teacher"):
        assert metric(text, "vllm:num_requests_running", model) == 0
        assert metric(text, "vllm:num_requests_waiting", model) == 0
    assert metric(text, "vllm:request_success_total", "teacher") >= 1
    assert metric(text, "vllm:prompt_tokens_total", "teacher") >= 1
    assert metric(text, "vllm:generation_tokens_total", "teacher") >= 1


def test_batch_cap_queues_extra_requests_and_stop_kills_the_process_group(key_file: Path, tmp_path: Path) -> None:
    # Slow enough (~25 ms a request) that 10 concurrent requests really overlap.
    sim = SimServer(key_file, tmp_path, max_num_seqs=2, time_scale=0.05).start()
    metrics_url = sim.base_url.removesuffix("/v1") + "/metrics"
    request = {"model": "student", "messages": [{"role": "user", "content": "Hello"}]}
    waiting_seen: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            waiting_seen.append(metric(http(metrics_url)[2].decode(), "vllm:num_requests_waiting", "student"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: http(f"{sim.base_url}/chat/completions", request)[0], range(10)))
    done.set()
    sampler.join()
    text = http(metrics_url)[2].decode()
    pid = sim.pid
    sim.stop()
    sim.stop()  # idempotent

    assert statuses == [200] * 10
    assert metric(text, "sim_peak_running", "student") == 2
    assert max(waiting_seen) > 0
    assert "SIMULATED OpenAI-compatible LM endpoint" in (tmp_path / "sim.log").read_text()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with code") as error:
        SimServer(tmp_path / "missing.jsonl", tmp_path).start()
    assert "missing.jsonl" in str(error.value)


def test_stats_count_unique_bodies_busy_slot_seconds_and_log_requests(key_file: Path, tmp_path: Path) -> None:
    # time_scale 0.1: one 40 ms ttft plus ~1 token of decode is ~4.5 ms of slot time per request.
    with SimServer(key_file, tmp_path, models=("student",), time_scale=0.1) as sim:
        hello = {"model": "student", "messages": [{"role": "user", "content": "Hello"}]}
        again = {"messages": [{"content": "Hello", "role": "user"}], "model": "student"}  # same body, other key order
        other = {"model": "student", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7}
        with ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(lambda b: http(f"{sim.base_url}/chat/completions", b)[0], [hello, again, other]))
        stats = sim.stats()
        log = sim.requests()["student"]
        assert sim.requests(since=2)["student"] == log[2:]
        assert http(sim.root_url + "/sim/requests?since=x")[0] == 400

    counters = stats["models"]["student"]
    assert statuses == [200] * 3 and counters["ok"] == 3
    assert counters["unique_requests"] == 2
    assert stats["latency"] == {"max_num_seqs": 64, "ttft_ms": 40.0, "per_token_ms": 4.5, "time_scale": 0.1}
    assert len(log) == 3 and len({digest for _, _, _, digest, _ in log}) == 2
    assert sorted(sampled for *_, sampled in log) == [False, False, True]
    service = [end - start for start, end, *_ in log]
    assert all(s >= 0.004 for s in service)
    assert counters["slot_seconds"] == pytest.approx(sum(service), rel=0.05, abs=0.002)
    decode = {digest: tokens for _, _, tokens, digest, _ in log}
    assert counters["unique_decode_tokens"] == sum(decode.values()) > 0
