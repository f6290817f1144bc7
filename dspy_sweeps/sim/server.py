"""aiohttp server of the SIMULATED OpenAI-compatible LM endpoint (a test/demo double, not a real model).

Speaks the part of vLLM's OpenAI API that DSPy and the platform use (/v1/chat/completions,
/v1/completions, /v1/models, /health, /metrics) and models a batching GPU: at most
`max_num_seqs` requests run at once per model, the rest queue, and decoding slows as the
batch grows. Replies come from `dspy_sweeps.sim.answers`. Every response carries the header
`x-simulated: true`. Run with `python -m dspy_sweeps.sim --answer-key key.jsonl` or through
`dspy_sweeps.sim.launch.SimServer`.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from dspy_sweeps.sim.answers import AnswerKey, message_text, reply


@dataclass(frozen=True)
class LatencyModel:
    """GPU timing: time to first token, then per-token decode slowed by the running batch size."""

    max_num_seqs: int = 64
    ttft_ms: float = 40.0
    per_token_ms: float = 4.5
    time_scale: float = 1.0  # multiplies every duration; tests use ~0.001

    def seconds(self, ms: float) -> float:
        return ms * self.time_scale / 1000


@dataclass
class ModelEngine:
    """One served model with its own vLLM-like scheduler and Prometheus counters."""

    name: str
    slots: asyncio.Semaphore
    running: int = 0
    waiting: int = 0
    peak_running: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    successes: int = 0

    async def generate(self, latency: LatencyModel, output_tokens: int) -> None:
        """Wait for a batch slot, then spend prefill and decode time for `output_tokens`."""
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            await asyncio.sleep(latency.seconds(latency.ttft_ms))
            per_token_ms = latency.per_token_ms * (1 + self.running / 100)
            await asyncio.sleep(latency.seconds(output_tokens * per_token_ms))
        finally:
            self.running -= 1
            self.slots.release()


@dataclass
class SimState:
    key: AnswerKey
    latency: LatencyModel
    engines: dict[str, ModelEngine] = field(default_factory=dict)


STATE = web.AppKey("sim_state", SimState)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    body = {"error": {"message": message, "type": status.__name__.removeprefix("HTTP"), "code": status.status_code}}
    return status(text=json.dumps(body), content_type="application/json")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise _error(web.HTTPBadRequest, f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "Request body must be a JSON object.")
    if body.get("stream"):
        raise _error(web.HTTPBadRequest, "stream=true is not supported by the simulated endpoint; send stream=false.")
    return body


def _engine(state: SimState, body: dict[str, Any]) -> ModelEngine:
    name = body.get("model")
    if name not in state.engines:
        raise _error(web.HTTPNotFound, f"The model `{name}` does not exist. Served models: {sorted(state.engines)}.")
    return state.engines[name]


def _choice_count(body: dict[str, Any]) -> int:
    n = body.get("n") or 1
    if not isinstance(n, int) or n < 1:
        raise _error(web.HTTPBadRequest, "n must be a positive integer.")
    return n


async def _complete(
    state: SimState, body: dict[str, Any], messages: list[dict[str, Any]]
) -> tuple[ModelEngine, list[str], dict[str, int]]:
    """Generate the n choices for one request, after waiting out the simulated GPU time."""
    engine = _engine(state, body)
    # Greedy decoding repeats itself; sampling varies each choice through the choice index.
    sampled = float(body.get("temperature") or 0) > 0
    json_requested = (body.get("response_format") or {}).get("type") in ("json_object", "json_schema")
    texts = [
        reply(state.key, engine.name, messages, json_requested, variant=i if sampled else 0)
        for i in range(_choice_count(body))
    ]
    prompt_tokens = estimate_tokens("".join(message_text(m) for m in messages))
    output_tokens = [estimate_tokens(t) for t in texts]
    await engine.generate(state.latency, max(output_tokens))
    engine.prompt_tokens += prompt_tokens
    engine.generation_tokens += sum(output_tokens)
    engine.successes += 1
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(output_tokens),
        "total_tokens": prompt_tokens + sum(output_tokens),
    }
    return engine, texts, usage


async def chat_completions(request: web.Request) -> web.Response:
    body = await _json_body(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _error(web.HTTPBadRequest, "messages must be a list of message objects.")
    engine, texts, usage = await _complete(request.app[STATE], body, messages)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": "stop"}
        for i, t in enumerate(texts)
    ]
    return web.json_response(
        {
            "id": f"chatcmpl-sim-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.name,
            "choices": choices,
            "usage": usage,
        }
    )


async def completions(request: web.Request) -> web.Response:
    body = await _json_body(request)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _error(web.HTTPBadRequest, "prompt must be a string.")
    engine, texts, usage = await _complete(request.app[STATE], body, [{"role": "user", "content": prompt}])
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": "stop"} for i, t in enumerate(texts)]
    return web.json_response(
        {
            "id": f"cmpl-sim-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.name,
            "choices": choices,
            "usage": usage,
        }
    )


async def list_models(request: web.Request) -> web.Response:
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "dspy-sweeps-simulator"}
        for name in request.app[STATE].engines
    ]
    return web.json_response({"object": "list", "data": data})


async def health(_: web.Request) -> web.Response:
    return web.Response(text="")


_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("vllm:num_requests_running", "gauge", "running", "Requests currently running (simulated)."),
    ("vllm:num_requests_waiting", "gauge", "waiting", "Requests waiting for a batch slot (simulated)."),
    ("vllm:prompt_tokens_total", "counter", "prompt_tokens", "Prompt tokens processed (simulated)."),
    ("vllm:generation_tokens_total", "counter", "generation_tokens", "Generation tokens produced (simulated)."),
    ("vllm:request_success_total", "counter", "successes", "Requests finished successfully (simulated)."),
    ("sim_peak_running", "gauge", "peak_running", "Highest number of requests ever running at once."),
)


async def metrics(request: web.Request) -> web.Response:
    engines = request.app[STATE].engines.values()
    lines = ["# HELP sim_info This endpoint is a simulation, not a real model.", "# TYPE sim_info gauge"]
    lines.append('sim_info{simulated="true"} 1')
    for name, kind, attribute, help_text in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model_name="{e.name}"}} {getattr(e, attribute)}' for e in engines]
    return web.Response(
        text="\n".join(lines) + "\n", headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def _mark_simulated(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-simulated"] = "true"


def create_app(key: AnswerKey, models: Sequence[str], latency: LatencyModel) -> web.Application:
    app = web.Application()
    app[STATE] = SimState(key, latency, {m: ModelEngine(m, asyncio.Semaphore(latency.max_num_seqs)) for m in models})
    app.on_response_prepare.append(_mark_simulated)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def _write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a reader that sees the file always sees the whole port number.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


async def _run(app: web.Application, host: str, port: int, port_file: Path | None) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server((host, port))
    await web.SockSite(runner, sock).start()
    bound = sock.getsockname()[1]
    print(
        f"SIMULATED OpenAI-compatible LM endpoint (dspy-sweeps test/demo double, not a real model) "
        f"on http://{host}:{bound}/v1",
        file=sys.stderr,
        flush=True,
    )
    if port_file is not None:
        _write_port_file(Path(port_file), bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(
    answer_key: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    port_file: Path | None = None,
    models: Sequence[str] = ("student", "teacher"),
    max_num_seqs: int = 64,
    ttft_ms: float = 40.0,
    per_token_ms: float = 4.5,
    time_scale: float = 1.0,
) -> None:
    """Serve until SIGTERM or SIGINT; port 0 picks a free port (reported in the banner and port_file)."""
    key = AnswerKey.from_jsonl(Path(answer_key))
    app = create_app(key, models, LatencyModel(max_num_seqs, ttft_ms, per_token_ms, time_scale))
    asyncio.run(_run(app, host, port, port_file))
