"""What makes a model count as simulated, and where the answer key may go.

Run: ``.venv/bin/python -m pytest tests/unit/test_simulation_labels.py -q``. The endpoint checks
speak HTTP to a small OpenAI-style `/models` server on loopback.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dspy_sweeps.lm.checks import SIMULATOR_OWNER, answers_simulated, is_simulated
from dspy_sweeps.spec.schema import ModelSpec, ServeSpec


def models_server(headers: dict[str, str], owner: str) -> ThreadingHTTPServer:
    class Models(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"data": [{"id": "student", "object": "model", "owned_by": owner}]}).encode()
            self.send_response(200)
            for name, value in {"content-type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Models)


@pytest.fixture
def endpoint() -> Iterator:
    servers: list[ThreadingHTTPServer] = []

    def start(headers: dict[str, str], owner: str = "vllm") -> str:
        server = models_server(headers, owner)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_an_endpoint_that_marks_its_answers_is_simulated_whatever_its_model_string(endpoint) -> None:
    marked, owned, plain = endpoint({"x-simulated": "true"}), endpoint({}, SIMULATOR_OWNER), endpoint({})
    assert answers_simulated(marked) and answers_simulated(owned)
    assert not answers_simulated(plain)
    spec = ModelSpec(name="small", model="openai/student", api_base=[plain, marked])
    assert is_simulated(spec, spec), "one replica that marks its answers is enough"
    real = ModelSpec(name="small", model="openai/student", api_base=plain)
    assert not is_simulated(real, real)


def test_sim_models_and_students_served_on_the_sim_engine_are_simulated() -> None:
    assert is_simulated(ModelSpec(name="s", model="sim/student"), ModelSpec(name="s", model="openai/student"))
    served = ModelSpec(name="s", serve={"engine": "sim", "model": "student", "gpus": 0})
    assert served.model == "openai/student" and is_simulated(served, served)
    vllm = ModelSpec(name="s", serve={"engine": "vllm", "model": "m"})
    assert not is_simulated(vllm, vllm)


def test_the_answer_key_goes_to_the_simulator_only() -> None:
    ServeSpec(
        engine="sim", model="student", command=["{python}", "-m", "dspy_sweeps.sim", "--answer-key", "{answer_key}"]
    )
    with pytest.raises(ValueError, match=r"\{answer_key\} is for engine sim only, not vllm"):
        ServeSpec(engine="vllm", model="m", command=["vllm", "serve", "{model}", "--labels", "{answer_key}"])
