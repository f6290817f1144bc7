"""Fault injection in the SIMULATED LM endpoint (a test facility), seen through plain HTTP and DSPy.

Run: ``python -m pytest tests/integration/test_sim_faults.py -q`` (a few seconds). Each mode of
`POST /sim/faults` is observed on the wire; counts run down and the server answers normally
again; hang really holds while the server keeps serving; `--api-key` refuses bad keys; and
`/sim/stats` and `/metrics` count what was served.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import RemoteDisconnected
from pathlib import Path
from typing import Any

import pytest

from dspy_sweeps_sim import SimServer
from dspy_sweeps_sim.faults import Fault, FaultError, FaultSchedule

QUESTION = "What is 6 times 7?"
CHAT = {"model": "student", "messages": [{"role": "user", "content": "Hello"}]}
CANARY_KEY = "sk-sim-canary-3f9a1c"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim-faults") / "key.jsonl"
    path.write_text(json.dumps({"inputs": {"question": QUESTION}, "labels": {"answer": "42"}}) + "\n")
    return path


@pytest.fixture(scope="module")
def server(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    with SimServer(key_file, tmp_path_factory.mktemp("sim-faults-work"), time_scale=0.001) as sim:
        yield sim


@pytest.fixture
def sim(server: SimServer) -> Iterator[SimServer]:
    """The shared server with no faults before and after the test."""
    server.set_faults("ok")
    yield server
    server.set_faults("ok")


def http(
    url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def chat(sim: SimServer, model: str = "student", **headers: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, response_headers, body = http(f"{sim.base_url}/chat/completions", {**CHAT, "model": model}, headers)
    return status, response_headers, json.loads(body)


def counters(sim: SimServer, model: str = "student") -> dict[str, Any]:
    return sim.stats()["models"][model]


def metric(sim: SimServer, line_prefix: str) -> float:
    text = http(f"{sim.root_url}/metrics")[2].decode()
    return float(next(line for line in text.splitlines() if line.startswith(line_prefix + " ")).split()[-1])


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --- the fault rules themselves (no server) ---


def test_fault_specs_parse_and_round_trip() -> None:
    fault = Fault.parse("rate_limit:3:retry_after=1")
    assert (fault.mode, fault.count, fault.retry_after, fault.model) == ("rate_limit", 3, 1.0, None)
    assert Fault.parse(fault.to_cli()) == fault
    assert Fault.parse("error500::model=teacher") == Fault("error500", None, model="teacher")
    assert Fault.parse("hang:1:hang_seconds=0.5").hang_seconds == 0.5
    assert Fault.parse("hang").hang_seconds == 3600.0 and Fault.parse("rate_limit:*").retry_after == 1.0
    for bad in ("explode", "error500:0", "error500:x", "error500:2:retry_after=1", "rate_limit:1:colour=red"):
        with pytest.raises(FaultError):
            Fault.parse(bad)


def test_schedule_takes_the_first_matching_rule_and_uses_it_up() -> None:
    schedule = FaultSchedule(["ok:1", "error500:1:model=student", "rate_limit:2"])
    taken = [getattr(schedule.take(m), "mode", "ok") for m in ("student", "teacher", "student", "student", "student")]
    assert taken == ["ok", "rate_limit", "error500", "rate_limit", "ok"]  # teacher skips the student-only rule
    assert schedule.rules == []
    schedule.replace(["garbage"])
    assert [schedule.take("x").mode for _ in range(3)] == ["garbage"] * 3  # until changed
    schedule.replace(["ok"])
    assert schedule.rules == []


# --- each mode on the wire ---


def test_error500_counts_down_then_answers_normally(sim: SimServer) -> None:
    before = counters(sim)
    success_before = metric(sim, 'vllm:request_success_total{model_name="student"}')
    assert sim.set_faults("error500", count=2) == [
        {"mode": "error500", "count": 2, "retry_after": None, "model": None, "hang_seconds": None}
    ]
    first, second = chat(sim), chat(sim)
    assert first[0] == second[0] == 500 and first[1]["x-simulated"] == "true"
    assert first[2]["error"]["type"] == "server_error" and "simulated fault" in first[2]["error"]["message"]
    assert sim.get_faults() == []  # used up
    status, _, body = chat(sim)
    assert status == 200 and body["choices"][0]["message"]["content"]

    after = counters(sim)
    assert after["requests"] - before["requests"] == 3
    assert after["ok"] - before["ok"] == 1
    assert after["faults"]["error500"] - before["faults"]["error500"] == 2
    assert after["prompt_tokens"] - before["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert after["completion_tokens"] - before["completion_tokens"] == body["usage"]["completion_tokens"]
    assert metric(sim, 'vllm:request_success_total{model_name="student"}') - success_before == 1
    assert metric(sim, 'sim_faults_total{model_name="student",mode="error500"}') == after["faults"]["error500"]


def test_error503_answers_service_unavailable_and_is_counted(sim: SimServer) -> None:
    before = counters(sim)["faults"]["error503"]
    sim.set_faults("error503", count=1)
    status, _, body = chat(sim)
    assert status == 503 and "overloaded or down" in body["error"]["message"]
    assert counters(sim)["faults"]["error503"] - before == 1
    assert chat(sim)[0] == 200


def test_rate_limit_sends_retry_after_and_an_openai_error(sim: SimServer) -> None:
    status, _, state = http(f"{sim.root_url}/sim/faults", {"mode": "rate_limit", "count": 1, "retry_after": 2})
    assert status == 200 and json.loads(state)["faults"][0]["retry_after"] == 2.0
    assert json.loads(http(f"{sim.root_url}/sim/faults")[2])["faults"][0]["mode"] == "rate_limit"
    status, headers, body = chat(sim)
    assert status == 429 and headers["Retry-After"] == "2" and headers["retry-after-ms"] == "2000"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert chat(sim)[0] == 200


def test_unauthorized_fault_answers_401_invalid_api_key(sim: SimServer) -> None:
    sim.set_faults("unauthorized", count=1)
    status, _, body = chat(sim)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert chat(sim)[0] == 200


def test_garbage_is_a_200_answer_no_adapter_can_parse(sim: SimServer) -> None:
    import dspy
    from dspy.utils.exceptions import AdapterParseError

    before = counters(sim)
    sim.set_faults("garbage", count=2)
    messages = dspy.ChatAdapter().format(dspy.Signature("question -> answer"), [], {"question": QUESTION})
    request = {"model": "student", "messages": messages}
    garbage = [json.loads(http(f"{sim.base_url}/chat/completions", request)[2]) for _ in range(2)]
    normal = json.loads(http(f"{sim.base_url}/chat/completions", request)[2])

    text = garbage[0]["choices"][0]["message"]["content"]
    assert text == garbage[1]["choices"][0]["message"]["content"]  # deterministic
    assert "[[ ##" not in text and "{" not in text and "answer" not in text.lower()
    with pytest.raises(AdapterParseError):
        dspy.ChatAdapter().parse(dspy.Signature("question -> answer"), text)
    assert "[[ ## answer ## ]]" in normal["choices"][0]["message"]["content"]
    after = counters(sim)
    assert after["ok"] - before["ok"] == 3  # garbage counts as answered
    assert after["faults"]["garbage"] - before["faults"]["garbage"] == 2


def test_faults_can_target_one_model_and_queue_in_order(sim: SimServer) -> None:
    sim.set_faults("error500", model="teacher")  # until changed
    assert [chat(sim, "student")[0], chat(sim, "teacher")[0], chat(sim, "teacher")[0]] == [200, 500, 500]
    status, _, _ = http(f"{sim.root_url}/sim/faults", [{"mode": "ok", "count": 1}, {"mode": "error500", "count": 1}])
    assert status == 200
    sim.set_faults("rate_limit", count=1, retry_after=0, append=True)
    assert [chat(sim)[0] for _ in range(4)] == [200, 500, 429, 200]


def test_bad_fault_requests_are_refused(sim: SimServer) -> None:
    for body in (
        {"mode": "explode"},
        {"mode": "error500", "count": 0},
        {"mode": "error500", "retry_after": 1},
        {"mode": "error500", "model": "gpt-4o"},
        {"mode": "error500", "colour": "red"},
        {"count": 1},
        "error500",
    ):
        status, _, error = http(f"{sim.root_url}/sim/faults", body)
        assert status == 400, body
        assert json.loads(error)["error"]["message"]
    assert sim.get_faults() == []


def test_hang_holds_the_request_while_the_server_keeps_answering(sim: SimServer) -> None:
    sim.set_faults("hang", count=1)
    outcome: list[BaseException | None] = []

    def hung_call() -> None:
        try:
            http(f"{sim.base_url}/chat/completions", CHAT, timeout=1.0)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    caller = threading.Thread(target=hung_call)
    caller.start()
    wait_for(lambda: counters(sim)["hanging"] == 1)
    assert chat(sim)[0] == 200  # other requests are answered meanwhile
    assert http(f"{sim.root_url}/health")[0] == 200
    caller.join(timeout=5)
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    assert time.monotonic() - started >= 1.0
    wait_for(lambda: counters(sim)["hanging"] == 0)  # the server noticed the client leave


def test_hang_seconds_drops_the_connection_unanswered(sim: SimServer) -> None:
    sim.set_faults("hang", count=1, hang_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(RemoteDisconnected):
        http(f"{sim.base_url}/chat/completions", CHAT, timeout=5)
    assert time.monotonic() - started >= 0.3  # it held the request before dropping it
    assert chat(sim)[0] == 200


# --- through DSPy's own client ---


def test_dspy_lm_raises_on_500_and_401_without_hidden_retries(sim: SimServer) -> None:
    import dspy
    from dspy.utils.exceptions import LMAuthError, LMServerError

    lm = dspy.LM("openai/student", api_base=sim.base_url, api_key="x", cache=False, num_retries=0)
    before = counters(sim)["requests"]
    sim.set_faults("error500", count=1)
    with pytest.raises(LMServerError):
        lm("Hello")
    sim.set_faults("unauthorized", count=1)
    with pytest.raises(LMAuthError):
        lm("Hello")
    assert lm("Hello")[0]
    assert counters(sim)["requests"] - before == 3  # one HTTP request per call: no retry hid a fault


# --- startup faults and --api-key (a server of their own) ---


def test_startup_faults_and_api_key(key_file: Path, tmp_path: Path) -> None:
    import dspy
    from dspy.utils.exceptions import LMAuthError

    faults = ["rate_limit:1:retry_after=0.25", Fault("error500", 1, model="teacher")]
    sim = SimServer(key_file, tmp_path, time_scale=0.001, faults=faults, api_key=CANARY_KEY).start()
    try:
        assert CANARY_KEY not in " ".join(sim.command())
        assert [f["mode"] for f in sim.get_faults()] == ["rate_limit", "error500"]
        good = {"Authorization": f"Bearer {CANARY_KEY}"}
        assert chat(sim)[0] == 401  # no key
        status, _, body = chat(sim, Authorization="Bearer wrong")
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and "wrong" not in json.dumps(body)
        assert http(f"{sim.base_url}/models")[0] == 401
        assert http(f"{sim.base_url}/models", headers=good)[0] == 200
        assert http(f"{sim.root_url}/health")[0] == 200 and http(f"{sim.root_url}/metrics")[0] == 200

        status, headers, _ = chat(sim, **good)
        assert status == 429 and headers["Retry-After"] == "0.25"
        assert chat(sim, "teacher", **good)[0] == 500
        assert chat(sim, **good)[0] == 200 and chat(sim, "teacher", **good)[0] == 200

        with pytest.raises(LMAuthError):
            dspy.LM("openai/student", api_base=sim.base_url, api_key="wrong", cache=False, num_retries=0)("Hi")
        lm = dspy.LM("openai/student", api_base=sim.base_url, api_key=CANARY_KEY, cache=False, num_retries=0)
        assert lm("Hi")[0]

        stats = sim.stats()
        assert stats["auth_rejected"] == 4
        student, teacher = stats["models"]["student"], stats["models"]["teacher"]
        assert (student["requests"], student["ok"], student["faults"]["rate_limit"]) == (3, 2, 1)
        assert (teacher["requests"], teacher["ok"], teacher["faults"]["error500"]) == (2, 1, 1)
        assert metric(sim, "sim_auth_rejected_total") == 4

        # A hung request does not hold up shutdown.
        sim.set_faults("hang")
        url, dropped = f"{sim.base_url}/chat/completions", []

        def hung_call() -> None:
            try:
                http(url, CHAT, good, timeout=10)
            except OSError as exc:  # the server closes the connection unanswered as it stops
                dropped.append(exc)

        caller = threading.Thread(target=hung_call)
        caller.start()
        wait_for(lambda: sim.stats()["models"]["student"]["hanging"] == 1)
    finally:
        sim.stop()
    caller.join(timeout=30)
    # Dropped as the server stopped, not left to the client's own 10 s timeout.
    assert not caller.is_alive() and len(dropped) == 1 and not isinstance(dropped[0], TimeoutError), dropped
    log = (tmp_path / "sim.log").read_text()
    assert "FAULT INJECTION" in log and CANARY_KEY not in log


def test_bad_fault_flag_is_a_usage_error(key_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dspy_sweeps_sim", "--answer-key", str(key_file), "--fault", "explode:2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "explode" in result.stderr
