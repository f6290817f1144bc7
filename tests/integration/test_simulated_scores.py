"""A simulated score never passes as a real one, through the real CLI, a real `mlflow server` and
the simulated endpoint: a simulated sweep cannot promote over a real champion, a "real" endpoint
(one that does not mark its answers) cannot promote over a simulated one, and an `openai/...`
model whose endpoint marks its answers is recorded as simulated, beside a student with the same
model string that has its own endpoint and baseline.

The "real" endpoint is a proxy in front of the simulator that strips its markers: a stand-in for
a real model's server, which the sweep can only judge by what it answers.
"""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sweep_helpers import BOOTSTRAP_ONLY, UNTRACKED, rows, sim_total, sweep_cli
from test_promotion import candidate

from dspy_sweeps.spec.schema import Promote
from dspy_sweeps.track.registry import promote
from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


class Unmarked:
    """An OpenAI-compatible proxy to `upstream` that drops the simulator's markers (the
    `x-simulated` header, its models' owner) and counts the completions it forwards."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.completions = upstream.rstrip("/"), 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.loads(proxy.forward(self.path))
                for model in body.get("data", []):
                    model["owned_by"] = "vllm"
                self.answer(json.dumps(body).encode())

            def do_POST(self) -> None:
                proxy.completions += 1
                self.answer(proxy.forward(self.path, self.rfile.read(int(self.headers["content-length"]))))

            def answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def forward(self, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(
            self.upstream + path.removeprefix("/v1"), data=data, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()


@pytest.fixture
def unmarked(sim: SimServer) -> Iterator[Unmarked]:
    proxy = Unmarked(sim.base_url)
    threading.Thread(target=proxy.server.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()


def promoted_over(tmp_path: Path, server: str, *, simulated: bool) -> str:
    """A registered model whose champion the test registers itself, simulated or real."""
    model = f"held-{uuid.uuid4().hex[:8]}"
    held = candidate(tmp_path, server, "held", 0.3, simulated=simulated)
    assert promote(Promote(model=model), *held, server, lambda _: []).promoted
    return model


def tracked_at(server: str, model: str) -> list[str]:
    return [
        "--set",
        f"promote.model={model}",
        "--set",
        "tracking.wandb=null",
        "--set",
        f"tracking.mlflow.tracking_uri={server}",
        "--set",
        f"tracking.mlflow.experiment={model}",  # the session's MLflow server is shared: an experiment of its own
    ]


def versions(server: str, model: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(server).search_model_versions(f"name = '{model}'")


def refusal(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("not promoted")]


def test_a_simulated_sweep_cannot_take_a_real_champions_place(mlflow_server: str, tmp_path: Path) -> None:
    model = promoted_over(tmp_path, mlflow_server, simulated=False)
    state = tmp_path / "state"
    result = sweep_cli(
        "run", "sweeps/demo.yaml", "--set", BOOTSTRAP_ONLY, *tracked_at(mlflow_server, model), state=state
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = refusal(result.stdout)
    assert len(lines) == 1, result.stdout[-3000:]
    assert (
        lines[0].startswith("not promoted (SIMULATED scores): ")
        and f"{model}@champion v1 is a real model's program" in lines[0]
    )
    assert f"promote to another registered model (promote.model: {model}-sim)" in lines[0]
    assert len(versions(mlflow_server, model)) == 1, "nothing registered beside the real champion"
    records = rows(state)
    assert len(records) == 2 and all(r["student_simulated"] for r in records)
    assert all(r["teacher_simulated"] for r in records if r["kind"] != "none"), "the baseline has no teacher"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(model).experiment_id], "tags.simulated = 'true'")
    assert len(runs) == len(records), "every trial's MLflow run says it was simulated"
    shown = sweep_cli("results", "demo", state=state)
    assert shown.returncode == 0, shown.stderr[-3000:]
    marked = [line for line in shown.stdout.splitlines() if line.startswith("│ ") and "SIMULATED" in line]
    assert len(marked) == len(records), shown.stdout  # each trial's row
    assert refusal(shown.stdout) == lines, "sweep results repeats the promotion line"


def test_a_real_endpoint_cannot_take_a_simulated_champions_place(
    mlflow_server: str, unmarked: Unmarked, tmp_path: Path
) -> None:
    model = promoted_over(tmp_path, mlflow_server, simulated=True)
    state = tmp_path / "state"
    real = [
        "--set",
        f"students=[{{name: small, model: openai/student, api_base: '{unmarked.base_url}'}}]",
        "--set",
        f"teachers=[{{name: big, model: openai/teacher, api_base: '{unmarked.base_url}'}}]",
    ]
    result = sweep_cli(
        "run", "sweeps/demo.yaml", *real, "--set", BOOTSTRAP_ONLY, *tracked_at(mlflow_server, model), state=state
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert unmarked.completions > 0, "the sweep's calls went through the unmarked endpoint"
    lines = refusal(result.stdout)
    assert len(lines) == 1, result.stdout[-3000:]
    assert lines[0].startswith("not promoted: ") and f"{model}@champion v1 is a SIMULATED model's program" in lines[0]
    assert "and this sweep's scores are real; they are never compared: promote to another registered model" in lines[0]
    assert len(versions(mlflow_server, model)) == 1
    assert not any(r["student_simulated"] or r["teacher_simulated"] for r in rows(state))


def test_an_endpoint_that_marks_its_answers_is_recorded_as_simulated_beside_its_namesake(
    sim: SimServer, unmarked: Unmarked, tmp_path: Path
) -> None:
    """Two students with one model string: `plain` behind the unmarked proxy, `marked` at the
    simulator itself. Each has its own endpoint, baseline and simulation flag."""
    students = (
        f"students=[{{name: plain, model: openai/student, api_base: '{unmarked.base_url}'}}, "
        f"{{name: marked, model: openai/student, api_base: '{sim.base_url}'}}]"
    )
    teacher = f"teachers=[{{name: big, model: openai/teacher, api_base: '{unmarked.base_url}'}}]"
    state = tmp_path / "state"
    result = sweep_cli(
        "run", "sweeps/demo.yaml", "--set", students, "--set", teacher, "--set", BOOTSTRAP_ONLY, *UNTRACKED, state=state
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = {(r["kind"], r["student"]): r for r in rows(state)}
    assert sorted(records) == [
        ("bootstrap_fewshot", "marked"),
        ("bootstrap_fewshot", "plain"),
        ("none", "marked"),
        ("none", "plain"),
    ], "each student has its own baseline"
    assert all(r["student_model"] == "openai/student" for r in records.values())
    assert [r["student_simulated"] for r in records.values() if r["student"] == "marked"] == [True, True]
    assert [r["student_simulated"] for r in records.values() if r["student"] == "plain"] == [False, False]
    direct = sim_total(sim, "sim_requests_total") - unmarked.completions
    assert unmarked.completions > 0 and direct > 0, "each student's calls went to its own endpoint"
    assert records[("none", "plain")]["val_scores"] and records[("none", "marked")]["val_scores"]
