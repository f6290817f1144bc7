"""A sweep's start-up asks each endpoint for its models once: reachable, which checkpoint it
serves, whether it is the simulator all read the same GET /models (a counting server on loopback)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dspy_sweeps.lm.build import endpoint_for
from dspy_sweeps.lm.checks import answers_simulated, check_endpoints, one_listing_per_endpoint, served_models
from dspy_sweeps.spec.schema import ModelSpec


def test_start_up_lists_each_endpoint_once_and_a_later_check_asks_again() -> None:
    gets: list[str] = []

    class Models(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            gets.append(self.path)
            body = json.dumps({"data": [{"id": "student", "root": "/ckpt/7", "owned_by": "vllm"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        spec = ModelSpec(name="small", model="openai/student", api_base=base)
        with one_listing_per_endpoint():
            check_endpoints([("students.0", spec)])
            assert "/ckpt/7" in endpoint_for(spec, spec).id, "the checkpoint came from the one listing"
            assert not answers_simulated(base)
        assert gets == ["/v1/models"]
        assert served_models(base, "students.0") == {
            "student": {"id": "student", "root": "/ckpt/7", "owned_by": "vllm"}
        }
        assert len(gets) == 2, "outside a start-up (e.g. `sweep serve`'s health checks) every check asks"
    finally:
        server.shutdown()
        server.server_close()
