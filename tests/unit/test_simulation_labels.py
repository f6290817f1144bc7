"""What makes a model count as simulated: its endpoint plugin's word, or its endpoint's.

Run: ``.venv/bin/python -m pytest tests/unit/test_simulation_labels.py -q``. The endpoint checks
speak HTTP to a small OpenAI-style `/models` server on loopback.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dspy_sweeps.lm import endpoints
from dspy_sweeps.lm.checks import SIMULATOR_OWNER, answers_simulated, is_simulated
from dspy_sweeps.spec.schema import ModelSpec


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


def test_a_plugins_models_are_simulated_when_the_plugin_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sim/` models are simulated because the simulator's plugin declares it, not by their prefix: a
    plugin that serves real answers (here `local`, declaring simulated = False) is not labelled."""
    assert is_simulated(ModelSpec(name="s", model="sim/student"), ModelSpec(name="s", model="openai/student"))

    class Real:
        simulated = False

    class Point:
        name = "local"

        def load(self) -> Real:
            return Real()

    found = endpoints.installed()
    monkeypatch.setattr(endpoints, "installed", lambda: {**found, "local": Point()})
    endpoints.plugin.cache_clear()
    try:
        local = ModelSpec(name="s", model="local/llama")
        assert endpoints.plugin_name(local) == "local" and not is_simulated(local, local)
        assert is_simulated(ModelSpec(name="s", model="sim/student"), local)
    finally:
        endpoints.plugin.cache_clear()
    vllm = ModelSpec(name="s", serve={"engine": "vllm", "model": "m"})
    assert not is_simulated(vllm, vllm)
