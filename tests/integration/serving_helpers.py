"""Helpers for the serving tests: register versions of the demo program in a real `mlflow server`,
and run `sweep serve` as a user would, in its own process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from dspy_sweeps.spec.schema import Promote
from dspy_sweeps.track.registry import promote

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / ".venv" / "bin" / "sweep"


def register(
    tmp_path: Path, uri: str, model: str, score: float, *, student: dict | None = None, program: str | None = None
) -> str:
    """Register one more version of the demo program (a distinct demo each time) and move
    `champion` to it through the promotion gate; returns the version."""
    from mlflow.tracking import MlflowClient
    from test_promotion import candidate

    record, run_id, prog = candidate(tmp_path, uri, f"v{uuid.uuid4().hex[:6]}", score)
    if student or program:
        client = MlflowClient(uri)
        meta = json.loads(Path(client.download_artifacts(run_id, "program/metadata.json", str(tmp_path))).read_text())
        meta.update({k: v for k, v in {"student": student, "program": program}.items() if v})
        client.log_dict(run_id, meta, "program/metadata.json")
    decision = promote(Promote(model=model), record, run_id, prog, uri, lambda _: 0.0)
    assert decision.promoted, decision.reason
    return str(decision.version)


def new_model() -> str:
    return f"served-{uuid.uuid4().hex[:8]}"


class Served:
    """`sweep serve REF --port 0 ...` in its own process group; `url` once it has printed where it listens."""

    def __init__(self, ref: str, uri: str, workdir: Path, *args: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / "serve.stderr"
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        cmd = [
            str(SWEEP),
            "serve",
            ref,
            "--port",
            "0",
            "--tracking-uri",
            uri,
            "--state-dir",
            str(workdir / "state"),
            *args,
        ]
        with self.stderr_path.open("w") as err:
            self.process = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
            )
        line = self.process.stdout.readline()  # blocks until it prints its URL, or exits
        assert line.startswith("serving "), f"exit {self.process.poll()}: {line}\n{self.stderr()}"
        self.url = line.split(" at ", 1)[1].split()[0].rstrip(",")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def call(url: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed body) of one HTTP request; JSON bodies are parsed, text is returned as is."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, dict(error.headers), error.read()
    text = raw.decode()
    return status, headers, json.loads(text) if headers.get("content-type", "").startswith("application/json") else text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the Prometheus samples `name` whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_for(check, what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
