"""`sweep serve --ray`: the same app as a Ray Serve deployment with two replicas on a local Ray:
two distinct replicas (by Ray Serve's replica id, which each answer carries) answer predictions
over HTTP, each follows the alias to a new version on its own, and the deployment is removed again
when the command is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import free_port
from serving_helpers import REPO, SWEEP, call, new_model, register, wait_for
from sweep_helpers import demo_answer_key

from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


def test_ray_serve_replicas_answer_predictions_and_each_follows_the_alias(mlflow_server: str, tmp_path: Path) -> None:
    model, port = new_model(), free_port()
    register(tmp_path, mlflow_server, model, 0.5)
    key = demo_answer_key(tmp_path / "key.jsonl")
    question = json.loads(key.read_text().splitlines()[0])["inputs"]["question"]
    cmd = [str(SWEEP), "serve", f"{model}@champion", "--ray", "--replicas", "2", "--port", str(port)]
    cmd += ["--tracking-uri", mlflow_server, "--state-dir", str(tmp_path / "state"), "--lm-retries", "0"]
    cmd += ["--poll-seconds", "0.2"]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    with SimServer(key, tmp_path / "sim", models=("student",), time_scale=0.01) as sim:
        stderr = (tmp_path / "serve.stderr").open("w")
        process = subprocess.Popen(
            [*cmd, "--api-base", sim.base_url],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        try:
            line = process.stdout.readline()
            assert "on Ray Serve (replicas: 2)" in line, (
                f"exit {process.poll()}: {line}\n{(tmp_path / 'serve.stderr').read_text()[-3000:]}"
            )
            url = f"http://127.0.0.1:{port}"
            answers: list[tuple[int, dict]] = []  # (status, body) of every prediction, in order

            def answered_by(version: str) -> set[str]:
                status, _, body = call(url, "/predict", {"question": question})
                answers.append((status, body))
                return {b["replica"] for s, b in answers if s == 200 and b["version"] == version}

            # Ray Serve spreads requests over its replicas: both answer, each under its own id.
            wait_for(lambda: len(answered_by("1")) == 2, "both replicas answering v1")
            moved = register(tmp_path, mlflow_server, model, 0.6)  # the alias moves to v2
            wait_for(lambda: len(answered_by(moved)) == 2, f"both replicas answering v{moved}")
            ready = call(url, "/ready")
            asked = sim.stats()["models"]["student"]["requests"]
        finally:
            process.send_signal(signal.SIGTERM)  # the command first: it takes its app down
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                code = None
            try:
                os.killpg(process.pid, signal.SIGKILL)  # then whatever of its local Ray is left
            except ProcessLookupError:
                pass
            process.wait()
            stderr.close()
    assert [status for status, _ in answers] == [200] * len(answers), answers
    replicas = {body["replica"] for _, body in answers}
    assert len(replicas) == 2, replicas  # two replicas, and only two, answered
    for replica in replicas:  # each answered v1, then (having followed the alias itself) v2
        versions = [body["version"] for _, body in answers if body["replica"] == replica]
        assert versions[0] == "1" and versions[-1] == moved == "2", (replica, versions)
        assert versions == sorted(versions), "a replica never goes back to the old version"
    assert all(body["outputs"]["answer"] and body["lm_calls"] == 1 for _, body in answers)
    assert asked >= len(answers)  # the replicas called the student, not a cache
    assert ready[0] == 200 and ready[2]["ready"] is True and ready[2]["replica"] in replicas
    assert code == 0, (tmp_path / "serve.stderr").read_text()[-3000:]
