"""MLflow's own serving path: `mlflow models serve -m models:/NAME@champion --env-manager local`
answers predictions from the registered model, run from another folder (the project's `pipelines/`
travels with the model), calling the student endpoint the version was compiled for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, free_port
from serving_helpers import call, new_model, register
from sweep_helpers import demo_answer_key

from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


def test_mlflow_models_serve_answers_from_the_registered_model(mlflow_server: str, tmp_path: Path) -> None:
    key = demo_answer_key(tmp_path / "key.jsonl")
    question = json.loads(key.read_text().splitlines()[0])["inputs"]["question"]
    model, port = new_model(), free_port()
    with SimServer(key, tmp_path / "sim", models=("student",), time_scale=0.01) as sim:
        # A student that is a real endpoint for MLflow's purposes: an OpenAI-compatible server at a URL.
        student = {"name": "small", "model": "openai/student", "api_base": sim.base_url}
        register(tmp_path, mlflow_server, model, 0.5, student=student)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": mlflow_server,
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",  # MLflow's flavor unpickles; `sweep serve` never does
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # MLflow runs `uvicorn` from PATH, as in an activated venv
        }
        cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{model}@champion", "--env-manager", "local"]
        log = (tmp_path / "mlflow-serve.log").open("w")
        process = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(port)],
            cwd=elsewhere,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for_ping(url, process, tmp_path / "mlflow-serve.log")
            before = sim.stats()["models"]["student"]["requests"]
            status, _, body = call(url, "/invocations", {"dataframe_records": [{"question": question}]}, timeout=120)
            asked = sim.stats()["models"]["student"]["requests"] - before
        finally:
            _stop(process)
            log.close()
    assert status == 200, (body, (tmp_path / "mlflow-serve.log").read_text()[-3000:])
    prediction = body["predictions"]
    assert prediction["answer"] and prediction["reasoning"]
    assert asked == 1, "the prediction came from the student endpoint"


def _wait_for_ping(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5):
                return
        except OSError:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not start"
            time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's whole process group (MLflow's CLI and the uvicorn it execs)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
