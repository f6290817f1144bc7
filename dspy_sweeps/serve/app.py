"""The HTTP service: a FastAPI app generated from the served program's signature.

    POST /predict   input fields -> output fields, the served version, the replica that answered, the LM calls it took
    GET  /health    the process is up
    GET  /ready     a program is loaded and its student endpoint answers
    GET  /metrics   Prometheus text (prometheus_client)
    GET  /docs      OpenAPI

A prediction runs in a worker thread (at most `concurrency` at once) with its own DSPy context and
its own copy of the student LM, whose history is what that request spent. A failed LM call is an
error status by kind, never an answer: 503 rate limited, 504 timed out, 502 endpoint down or broken.

No `from __future__ import annotations` here: FastAPI reads the generated request model from the
handler's annotation, which must be the class itself.
"""

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from dspy_sweeps.errors import SweepError, first_line
from dspy_sweeps.serve.follow import Service
from dspy_sweeps.serve.metrics import ServiceMetrics, Usage
from dspy_sweeps.serve.program import LoadedProgram

log = logging.getLogger("dspy_sweeps.serve")


@dataclass(frozen=True)
class Failure:
    status: int
    kind: str
    detail: str
    retry_after: float | None = None


def failure(exc: BaseException) -> Failure:
    """The HTTP status and error kind for a prediction that raised."""
    from dspy.utils.exceptions import AdapterParseError, LMError, LMRateLimitError, LMTimeoutError

    detail = first_line(exc)
    if isinstance(exc, LMRateLimitError):
        return Failure(503, "rate_limited", detail, exc.retry_after)
    if isinstance(exc, LMTimeoutError) or _timed_out(exc):
        return Failure(504, "timed_out", detail)
    if isinstance(exc, LMError):
        return Failure(502, "endpoint_down" if exc.code in ("transport", "server") else "endpoint_error", detail)
    if isinstance(exc, AdapterParseError):  # the endpoint answered, but not in the signature's format
        return Failure(502, "unparseable_answer", detail)
    return Failure(500, "program_error", f"{type(exc).__name__}: {detail}")


def _timed_out(exc: BaseException | None) -> bool:
    """A read or connect timeout reaches DSPy as a transport error; its cause says it was a timeout."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, TimeoutError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@dataclass(frozen=True)
class Answer:
    outputs: dict[str, Any]
    usage: Usage


def predict_once(served: LoadedProgram, inputs: dict[str, Any]) -> Answer:
    """One prediction in this thread, with its own DSPy context and its own copy of the LM: the
    copy's history holds exactly the calls this request sent, and the request's trace is its own
    (DSPy's process-wide one would keep the last 10,000 requests' inputs and answers)."""
    import dspy

    lm = served.lm.copy()
    with dspy.context(lm=lm, trace=[]):
        prediction = served.program(**inputs)
    return Answer({name: prediction.get(name) for name in served.outputs}, usage_of(lm.history))


def usage_of(history: list[dict[str, Any]]) -> Usage:
    usages = [entry.get("usage") or {} for entry in history]
    return Usage(
        lm_calls=len(history),
        prompt_tokens=sum(u.get("prompt_tokens") or 0 for u in usages),
        completion_tokens=sum(u.get("completion_tokens") or 0 for u in usages),
        cost_usd=sum(entry.get("cost") or 0.0 for entry in history),
    )


def endpoint_problem(served: LoadedProgram) -> str | None:
    """Why the student endpoint is not answering, or None (cloud models are not probed: that costs a call)."""
    from dspy_sweeps.lm.checks import served_models

    for base in served.student.api_bases:
        try:
            served_models(base, served.student.name, timeout=2.0)
        except SweepError as exc:
            return str(exc)
    return None


class MetricsMiddleware:
    """Pure ASGI: counts every response by route and status and times it, 422s included."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The matched route's template, not the raw path: unknown paths must not grow the label set.
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.request(route, status[0], time.perf_counter() - start)


def create_app(service: Service, replica: str | None = None) -> Any:
    """The service's FastAPI app; `replica` names the process that answers (each answer and /ready
    say it): Ray Serve's replica id under `--ray`, else host:pid."""
    import os
    import socket

    import anyio
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from pydantic import ConfigDict, create_model

    first = service.current
    request_model = create_model(
        "PredictRequest", __config__=ConfigDict(extra="forbid"), **{n: (t, ...) for n, t in first.inputs.items()}
    )
    outputs_model = create_model("PredictOutputs", **{n: (t | None, None) for n, t in first.outputs.items()})
    response_model = create_model(
        "PredictResponse",
        outputs=(outputs_model, ...),
        version=(str, ...),
        replica=(str, ...),
        lm_calls=(int, ...),
        prompt_tokens=(int, ...),
        completion_tokens=(int, ...),
        cost_usd=(float, ...),
    )
    replica = replica or f"{socket.gethostname()}:{os.getpid()}"
    limiter = anyio.CapacityLimiter(service.config.concurrency)
    metrics = service.metrics
    app = FastAPI(
        title=f"{service.config.ref} (dspy-sweeps)",
        description=f"The registered DSPy program {service.config.ref}, served by `sweep serve`.",
        on_shutdown=[service.stop],
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.post("/predict", response_model=response_model)
    async def predict(body: request_model) -> Any:  # type: ignore[valid-type]
        served = service.current  # taken once: a switch mid-request does not touch this request
        metrics.in_flight.inc()
        try:
            answer = await anyio.to_thread.run_sync(
                functools.partial(predict_once, served, body.model_dump()), limiter=limiter
            )
        except Exception as exc:
            failed = failure(exc)
            metrics.errors.labels(failed.kind).inc()
            log.warning(
                "v%s: prediction failed with %s %s: %s", served.version, failed.status, failed.kind, failed.detail
            )
            headers = {"Retry-After": f"{failed.retry_after:g}"} if failed.retry_after is not None else None
            content = {"detail": failed.detail, "kind": failed.kind, "version": served.version}
            return JSONResponse(content, status_code=failed.status, headers=headers)
        finally:
            metrics.in_flight.dec()
        metrics.answered(served.version, answer.usage)
        return {"outputs": answer.outputs, "version": served.version, "replica": replica, **answer.usage.__dict__}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        served = service.current
        problem = await anyio.to_thread.run_sync(endpoint_problem, served)
        body = {"ready": problem is None, "model": served.name, "version": served.version, "replica": replica}
        return JSONResponse({**body, "reason": problem}, status_code=503) if problem else body

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    return app


def run_http(app: Any, sock: Any) -> None:
    """Serve `app` with uvicorn on an already bound socket until SIGINT/SIGTERM (then drain)."""
    import uvicorn

    config = uvicorn.Config(app, access_log=False, log_level="warning", timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])
