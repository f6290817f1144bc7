"""aiohttp server of the SIMULATED OpenAI-compatible LM endpoint (a test/demo double, not a real model).

Speaks the part of vLLM's OpenAI API that DSPy and the platform use (/v1/chat/completions,
/v1/completions, /v1/embeddings, /v1/models, /health, /metrics) and models a batching GPU: at most
`max_num_seqs` requests run at once per model, the rest queue, and decoding slows as the
batch grows. Replies come from `dspy_sweeps_sim.answers`. Every response carries the header
`x-simulated: true`. Run with `python -m dspy_sweeps_sim --answer-key key.jsonl` or through
`dspy_sweeps_sim.launch.SimServer`.

TEST FACILITY, outside /v1 (see `dspy_sweeps_sim.faults`): `POST /sim/faults` and `GET /sim/faults`
inject endpoint failures deterministically (500, 429 + Retry-After, 401, garbage, hang) and
`GET /sim/stats` returns per-model counters (including what `make bench` needs: distinct request
bodies, busy slot-seconds) and `GET /sim/requests` the log of answered requests. With `api_key` set, every /v1 request must carry
`Authorization: Bearer <key>` (vLLM's `--api-key`); /health, /metrics and /sim stay open.
No request header value is ever logged or echoed (the server keeps no access log).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from dspy_sweeps_sim.answers import AnswerKey, embed_text, garbage_reply, message_text, reply
from dspy_sweeps_sim.faults import FAULT_MODES, Fault, FaultError, FaultSchedule


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
    successes: int = 0  # 200 answers, garbage included (vLLM would count those too)
    requests: int = 0  # completion requests naming this model
    invalid: int = 0  # of which rejected with 400
    hanging: int = 0  # requests held open by the hang fault right now
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_MODES, 0))
    # Measurement for `make bench`: distinct request bodies answered, the tokens they decoded,
    # and busy slot-seconds (the integral of `running` over time).
    unique_requests: int = 0
    unique_decode_tokens: int = 0
    seen: set[str] = field(default_factory=set)
    busy_slot_s: float = 0.0
    busy_since: float = field(default_factory=time.monotonic)  # when `running` last changed
    log: list[tuple[float, float, int, str, bool]] = field(default_factory=list)  # see get_requests

    async def generate(self, latency: LatencyModel, output_tokens: int) -> tuple[float, float]:
        """Wait for a batch slot, then spend prefill and decode time for `output_tokens`.

        Returns when the request got its slot and when it let it go (Unix time)."""
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self._set_running(self.running + 1)
        start = time.time()
        self.peak_running = max(self.peak_running, self.running)
        try:
            await asyncio.sleep(latency.seconds(latency.ttft_ms))
            per_token_ms = latency.per_token_ms * (1 + self.running / 100)
            await asyncio.sleep(latency.seconds(output_tokens * per_token_ms))
        finally:
            self._set_running(self.running - 1)
            self.slots.release()
        return start, time.time()

    def _set_running(self, running: int) -> None:
        now = time.monotonic()
        self.busy_slot_s += self.running * (now - self.busy_since)
        self.running, self.busy_since = running, now

    def slot_seconds(self) -> float:
        """Busy slot-seconds so far: answered requests' service time plus the elapsed part of running ones."""
        return self.busy_slot_s + self.running * (time.monotonic() - self.busy_since)

    def answered(self, body: dict[str, Any], decode_tokens: int, start: float, end: float) -> None:
        """Count an answered request; identical bodies (any key order) count once as unique."""
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]
        if digest not in self.seen:
            self.seen.add(digest)
            self.unique_requests += 1
            self.unique_decode_tokens += decode_tokens
        self.log.append((start, end, decode_tokens, digest, float(body.get("temperature") or 0) > 0))

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.successes,
            "faults": dict(self.faults),
            "invalid": self.invalid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.generation_tokens,
            "peak_running": self.peak_running,
            "running": self.running,
            "waiting": self.waiting,
            "hanging": self.hanging,
            "unique_requests": self.unique_requests,
            "unique_decode_tokens": self.unique_decode_tokens,
            "slot_seconds": round(self.slot_seconds(), 6),
        }


@dataclass
class SimState:
    key: AnswerKey
    latency: LatencyModel
    engines: dict[str, ModelEngine] = field(default_factory=dict)
    faults: FaultSchedule = field(default_factory=FaultSchedule)
    api_key: str | None = None
    auth_rejected: int = 0  # /v1 requests refused for a missing or wrong API key
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set at shutdown: hung requests let go


STATE = web.AppKey("sim_state", SimState)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    body = {"error": {"message": message, "type": status.__name__.removeprefix("HTTP"), "code": status.status_code}}
    return status(text=json.dumps(body), content_type="application/json")


def _openai_error(
    status: type[web.HTTPException],
    message: str,
    error_type: str,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> web.HTTPException:
    """An error in OpenAI's own shape, so clients (LiteLLM, openai) classify it as they would OpenAI's."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return status(text=json.dumps(body), content_type="application/json", headers=headers)


def _invalid_api_key(detail: str) -> web.HTTPException:
    # Never echo the key that was sent.
    message = f"{detail} (simulated endpoint)"
    return _openai_error(web.HTTPUnauthorized, message, "invalid_request_error", "invalid_api_key")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise _error(web.HTTPBadRequest, f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "Request body must be a JSON object.")
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


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _error(web.HTTPBadRequest, "messages must be a list of message objects.")
    return messages


def _prompt_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _error(web.HTTPBadRequest, "prompt must be a string.")
    return [{"role": "user", "content": prompt}]


async def _accept(
    request: web.Request, read_messages: Callable[[dict[str, Any]], list[dict[str, Any]]]
) -> tuple[ModelEngine, dict[str, Any], list[dict[str, Any]], int]:
    """Parse and validate one completion request, counting it against its model."""
    state = request.app[STATE]
    body = await _json_body(request)
    engine = _engine(state, body)
    engine.requests += 1
    try:
        if body.get("stream"):
            raise _error(
                web.HTTPBadRequest, "stream=true is not supported by the simulated endpoint; send stream=false."
            )
        return engine, body, read_messages(body), _choice_count(body)
    except web.HTTPException:
        engine.invalid += 1
        raise


def _seconds_header(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


async def _hang(request: web.Request, state: SimState, engine: ModelEngine, seconds: float) -> web.HTTPException:
    """Hold the request without answering until the client leaves, `seconds` pass, or the server stops."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    engine.hanging += 1
    try:
        while request.transport is not None and not request.transport.is_closing():
            remaining = deadline - loop.time()
            if remaining <= 0 or state.closing.is_set():
                break
            try:
                await asyncio.wait_for(state.closing.wait(), min(0.05, remaining))
            except TimeoutError:
                pass
    finally:
        engine.hanging -= 1
    if request.transport is not None:
        request.transport.close()  # drop the connection: the client never gets an answer
    return _error(web.HTTPServiceUnavailable, "hung request released (simulated fault)")  # nobody reads this


def _fault_response(fault: Fault, engine: ModelEngine) -> web.HTTPException:
    note = f"(simulated fault injected for model `{engine.name}`)"
    if fault.mode == "error500":
        return _openai_error(
            web.HTTPInternalServerError,
            f"The server had an error while processing your request {note}.",
            "server_error",
            None,
        )
    if fault.mode == "error503":
        return _openai_error(
            web.HTTPServiceUnavailable,
            f"The engine is currently overloaded or down, please try again later {note}.",
            "server_error",
            None,
        )
    if fault.mode == "rate_limit":
        assert fault.retry_after is not None
        headers = {
            "Retry-After": _seconds_header(fault.retry_after),
            "retry-after-ms": str(round(fault.retry_after * 1000)),
        }
        return _openai_error(
            web.HTTPTooManyRequests,
            f"Rate limit reached for requests {note}. Please try again in {_seconds_header(fault.retry_after)}s.",
            "requests",
            "rate_limit_exceeded",
            headers,
        )
    assert fault.mode == "unauthorized", fault.mode
    return _invalid_api_key(f"Incorrect API key provided {note}")


async def _complete(
    request: web.Request, engine: ModelEngine, body: dict[str, Any], messages: list[dict[str, Any]], n: int
) -> tuple[list[str], dict[str, int]]:
    """Generate the n choices for one request, after waiting out the simulated GPU time.

    Raises the injected fault instead, if the fault schedule has one for this request.
    """
    state = request.app[STATE]
    fault = state.faults.take(engine.name)
    if fault is not None:
        engine.faults[fault.mode] += 1
        if fault.mode == "hang":
            assert fault.hang_seconds is not None
            raise await _hang(request, state, engine, fault.hang_seconds)
        if fault.mode != "garbage":
            raise _fault_response(fault, engine)
    # Greedy decoding repeats itself; sampling varies each choice through the choice index.
    sampled = float(body.get("temperature") or 0) > 0
    if fault is not None:  # garbage: a 200 answer in no adapter format
        texts = [garbage_reply(engine.name, messages, variant=i if sampled else 0) for i in range(n)]
    else:
        json_requested = (body.get("response_format") or {}).get("type") in ("json_object", "json_schema")
        texts = [reply(state.key, engine.name, messages, json_requested, variant=i if sampled else 0) for i in range(n)]
    prompt_tokens = estimate_tokens("".join(message_text(m) for m in messages))
    output_tokens = [estimate_tokens(t) for t in texts]
    start, end = await engine.generate(state.latency, max(output_tokens))
    engine.answered(body, max(output_tokens), start, end)
    engine.prompt_tokens += prompt_tokens
    engine.generation_tokens += sum(output_tokens)
    engine.successes += 1
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(output_tokens),
        "total_tokens": prompt_tokens + sum(output_tokens),
    }
    return texts, usage


async def chat_completions(request: web.Request) -> web.Response:
    engine, body, messages, n = await _accept(request, _chat_messages)
    texts, usage = await _complete(request, engine, body, messages, n)
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
    engine, body, messages, n = await _accept(request, _prompt_messages)
    texts, usage = await _complete(request, engine, body, messages, n)
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


async def embeddings(request: web.Request) -> web.Response:
    """OpenAI's /v1/embeddings: one deterministic vector per input (texts sharing words lie close)."""
    state = request.app[STATE]
    body = await _json_body(request)
    engine = _engine(state, body)
    engine.requests += 1
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        engine.invalid += 1
        raise _error(web.HTTPBadRequest, "input must be a string or a non-empty list of strings.")
    tokens = sum(estimate_tokens(t) for t in texts)
    start, end = await engine.generate(state.latency, 1)
    engine.answered(body, 1, start, end)
    engine.prompt_tokens += tokens
    engine.successes += 1
    data = [{"object": "embedding", "index": i, "embedding": embed_text(t)} for i, t in enumerate(texts)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.json_response({"object": "list", "data": data, "model": engine.name, "usage": usage})


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
    ("sim_requests_total", "counter", "requests", "Completion requests received (simulated)."),
    ("sim_hanging_requests", "gauge", "hanging", "Requests held open by the hang fault (test facility)."),
)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engines = state.engines.values()
    lines = ["# HELP sim_info This endpoint is a simulation, not a real model.", "# TYPE sim_info gauge"]
    lines.append('sim_info{simulated="true"} 1')
    for name, kind, attribute, help_text in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model_name="{e.name}"}} {getattr(e, attribute)}' for e in engines]
    lines += ["# HELP sim_faults_total Injected faults served (test facility).", "# TYPE sim_faults_total counter"]
    lines += [
        f'sim_faults_total{{model_name="{e.name}",mode="{mode}"}} {e.faults[mode]}'
        for e in engines
        for mode in FAULT_MODES
    ]
    lines += [
        "# HELP sim_auth_rejected_total Requests refused for a missing or wrong API key.",
        "# TYPE sim_auth_rejected_total counter",
        f"sim_auth_rejected_total {state.auth_rejected}",
    ]
    return web.Response(
        text="\n".join(lines) + "\n", headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def _faults_state(state: SimState) -> dict[str, Any]:
    return {"simulated": True, "faults": state.faults.to_json()}


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(_faults_state(request.app[STATE]))


async def post_faults(request: web.Request) -> web.Response:
    """Replace the fault schedule (or append to it with "append": true); answers the new schedule."""
    state = request.app[STATE]
    try:
        data = await request.json()
    except json.JSONDecodeError as exc:
        raise _error(web.HTTPBadRequest, f"Request body is not valid JSON: {exc}") from exc
    append = False
    if isinstance(data, dict):
        data = dict(data)
        append = data.pop("append", False)
        if not isinstance(append, bool):
            raise _error(web.HTTPBadRequest, f"append must be true or false, not {append!r}")
        data = [data]
    if not isinstance(data, list):
        raise _error(web.HTTPBadRequest, 'Send a fault object like {"mode": "error500", "count": 2} or a list.')
    try:
        faults = [Fault.coerce(item) for item in data]
        _check_models(faults, state.engines)
    except FaultError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from exc
    (state.faults.append if append else state.faults.replace)(faults)
    return web.json_response(_faults_state(state))


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    latency = state.latency
    return web.json_response(
        {
            "simulated": True,
            "auth_rejected": state.auth_rejected,
            "latency": {
                "max_num_seqs": latency.max_num_seqs,
                "ttft_ms": latency.ttft_ms,
                "per_token_ms": latency.per_token_ms,
                "time_scale": latency.time_scale,
            },
            "models": {name: engine.stats() for name, engine in state.engines.items()},
        }
    )


async def get_requests(request: web.Request) -> web.Response:
    """Answered requests per model, oldest first: [slot start, slot end (Unix s), decode tokens,
    body digest, sampled (temperature > 0)].

    `?since=N` skips each model's first N entries, so a poller fetches only what is new."""
    since = request.query.get("since", "0")
    if not since.isdigit():
        raise _error(web.HTTPBadRequest, f"since must be a whole number of entries, not {since!r}")
    since = int(since)
    engines = request.app[STATE].engines
    return web.json_response({"simulated": True, "models": {n: e.log[since:] for n, e in engines.items()}})


def _check_models(faults: Sequence[Fault], served: Sequence[str] | dict[str, Any]) -> None:
    for fault in faults:
        if fault.model is not None and fault.model not in served:
            raise FaultError(f"fault targets model {fault.model!r}, which is not served: {sorted(served)}")


@web.middleware
async def _require_api_key(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """vLLM's --api-key: every /v1 request needs `Authorization: Bearer <key>`."""
    state = request.app[STATE]
    if state.api_key is not None and request.path.startswith("/v1"):
        supplied = request.headers.get("Authorization", "")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {state.api_key}".encode()):
            state.auth_rejected += 1
            raise _invalid_api_key("Missing or incorrect API key" if supplied else "Missing API key")
    return await handler(request)


async def _mark_simulated(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-simulated"] = "true"


def create_app(
    key: AnswerKey,
    models: Sequence[str],
    latency: LatencyModel,
    faults: Sequence[Fault | str | dict[str, Any]] = (),
    api_key: str | None = None,
) -> web.Application:
    """The server; `faults` is the starting fault schedule (test facility), `api_key` guards /v1."""
    schedule = FaultSchedule(faults)
    _check_models(schedule.rules, models)
    app = web.Application(middlewares=[_require_api_key])
    engines = {m: ModelEngine(m, asyncio.Semaphore(latency.max_num_seqs)) for m in models}
    app[STATE] = SimState(key, latency, engines, schedule, api_key or None)
    app.on_response_prepare.append(_mark_simulated)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/sim/faults", get_faults)
    app.router.add_post("/sim/faults", post_faults)
    app.router.add_get("/sim/stats", get_stats)
    app.router.add_get("/sim/requests", get_requests)
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
    state = app[STATE]
    if state.faults.rules:
        rules = ", ".join(rule.to_cli() for rule in state.faults.rules)
        print(f"FAULT INJECTION (test facility) active from startup: {rules}", file=sys.stderr, flush=True)
    if state.api_key is not None:
        print("API key required on /v1 (Authorization: Bearer ...)", file=sys.stderr, flush=True)
    if port_file is not None:
        _write_port_file(Path(port_file), bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if os.environ.get(FOLLOW_PARENT_ENV):
        watchdog = loop.create_task(_stop_when_orphaned(os.getppid(), stop))  # noqa: F841 - kept alive by the loop
    try:
        await stop.wait()
    finally:
        app[STATE].closing.set()  # let hung requests go, or cleanup would wait for them
        await runner.cleanup()


FOLLOW_PARENT_ENV = "DSPY_SWEEPS_SIM_FOLLOW_PARENT"


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    """Started by a sweep, the simulator has its own process group, so a SIGKILLed sweep would
    leave it running: it stops itself once it has been re-parented."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    stop.set()


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
    faults: Sequence[Fault | str | dict[str, Any]] = (),
    api_key: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; port 0 picks a free port (reported in the banner and port_file).

    `faults` (test facility) is the starting fault schedule, e.g. `["rate_limit:3:retry_after=1"]`;
    `api_key` makes every /v1 request need `Authorization: Bearer <api_key>`.
    """
    key = AnswerKey.from_jsonl(Path(answer_key))
    latency = LatencyModel(max_num_seqs, ttft_ms, per_token_ms, time_scale)
    app = create_app(key, models, latency, faults=faults, api_key=api_key)
    asyncio.run(_run(app, host, port, port_file))
