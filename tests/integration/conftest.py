"""Servers that integration tests share: a real `mlflow server` on loopback, and the simulated
endpoint (student, a second student and a teacher) that the fault and crash tests inject into."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dspy_sweeps_sim.launch import SimServer

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on loopback in its own process group, restartable on the same port and store."""

    def __init__(
        self, root: Path, port: int | None = None, artifacts: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.artifacts = artifacts or str(root / "artifacts")  # e.g. s3://bucket/mlartifacts
        self.env = env or {}

    def start(self) -> MlflowServer:
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root}/server.db",
            "--artifacts-destination",
            self.artifacts,
        ]
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # or it hangs offline fetching a price map
            # MLflow's GenAI job runner: eight busy processes of ~270 MB each that sweeps never use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **self.env,
        }
        with (self.root / "server.log").open("a") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                assert self.process.poll() is None, (self.root / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the whole process group (the server's gunicorn/uvicorn workers too)."""
        if self.process is None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimServer]:
    from sweep_helpers import demo_answer_key

    from dspy_sweeps_sim.launch import SimServer

    key = demo_answer_key(tmp_path / "key.jsonl")
    with SimServer(key, tmp_path / "sim", models=("student", "student2", "teacher"), time_scale=0.02) as server:
        yield server
