"""DSPy's side of the gateway: a DSPy 3.4 engine that hands every request of a trial's LM to the
sweep's gateway (its `Gateway` handle routes it to a shard), and turns the gateway's failures
back into DSPy's (lm15) errors.

The gateway is the one retry layer (retries, fallbacks); DSPy's own is turned off
(`num_retries=0`), so a logical call is never resent by both."""

from __future__ import annotations

from typing import Any

from dspy_sweeps.errors import BudgetSpent
from dspy_sweeps.spec.schema import ModelSpec


def build_gateway_lm(spec: ModelSpec, gateway: Any, chain: tuple[str, ...], trial_id: str) -> Any:
    """A dspy.LM whose calls go through the sweep's gateway (which caches and retries, so DSPy does
    neither); `chain` is the gateway endpoint of the model, then those of its fallbacks."""
    import dspy

    kwargs = {
        k: v for k, v in {"temperature": spec.temperature, "max_tokens": spec.max_tokens}.items() if v is not None
    }
    engine = GatewayEngine(gateway, chain, trial_id)
    return dspy.LM(spec.model, engine=engine, cache=False, num_retries=0, **kwargs)


def build_gateway_embedder(spec: ModelSpec, gateway: Any, endpoint_id: str, trial_id: str) -> Any:
    """A dspy.Embedder whose requests go to the model's /embeddings through the gateway (cached, counted)."""
    import dspy

    return dspy.Embedder(GatewayEmbeddings(gateway, endpoint_id, trial_id), caching=False)


class GatewayEmbeddings:
    """The callable behind a dspy.Embedder: a batch of texts in, one vector per text out."""

    def __init__(self, gateway: Any, endpoint_id: str, trial_id: str) -> None:
        self.gateway, self.endpoint_id, self.trial_id = gateway, endpoint_id, trial_id

    def __call__(self, texts: list[str]) -> list[list[float]]:
        from dspy_sweeps.lm.gateway import EMBEDDINGS, GatewayError

        try:
            body = self.gateway.complete(self.trial_id, (self.endpoint_id,), {"input": texts}, route=EMBEDDINGS)
        except GatewayError as exc:
            raise lm_error(exc) from None
        return [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]


class GatewayEngine:
    """DSPy 3.4 engine (`complete(Request) -> Response`) that hands each request to the gateway."""

    def __init__(self, gateway: Any, chain: tuple[str, ...], trial_id: str) -> None:
        self.gateway, self.chain, self.trial_id = gateway, chain, trial_id

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import response_from_openai_chat

        from dspy_sweeps.lm.gateway import SERVED, GatewayError

        try:
            body = self.gateway.complete(self.trial_id, self.chain, openai_body(request))
        except GatewayError as exc:  # a dead shard too (GatewayLost): a transport error the driver notices
            _report_failure()
            raise lm_error(exc) from None
        _report_served(body.pop(SERVED, None))
        return response_from_openai_chat(body, model=request.model)

    def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def _report_failure() -> None:
    """Tell the trial's usage tracker (run/progress.py TrialProgress) of a call that got no answer:
    DSPy tells it of answered calls only."""
    import dspy

    tracker = getattr(dspy.settings, "usage_tracker", None)
    if hasattr(tracker, "add_failure"):
        tracker.add_failure()


def _report_served(served: str | None) -> None:
    """Tell a usage tracker that records calls (run/recorder.py, for traces) how the gateway
    answered this one: sent to the endpoint, from the cache, or merged with an identical call."""
    import dspy

    tracker = getattr(dspy.settings, "usage_tracker", None)
    if served is not None and hasattr(tracker, "add_served"):
        tracker.add_served(served)


def lm_error(cause: BaseException | None) -> Exception:
    """The DSPy (lm15) error for a gateway failure, which DSPy's adapters and callers understand."""
    from dspy import lm15

    from dspy_sweeps.lm.gateway import GatewayError

    if not isinstance(cause, GatewayError):
        return RuntimeError(f"LM gateway failed: {cause!r}")
    if cause.kind == "budget":
        return BudgetSpent(str(cause))
    if cause.kind == "invalid" and "context" in str(cause).lower():  # llama.cpp: a prompt over its slot's -c
        return lm15.ContextLengthError(str(cause), status=cause.status)
    classes = {
        "rate_limit": lm15.RateLimitError,
        "server": lm15.ServerError,
        "transport": lm15.TransportError,
        "timeout": lm15.TimeoutError,
        "auth": lm15.AuthError,
        "invalid": lm15.InvalidRequestError,
    }
    return classes[cause.kind](str(cause), status=cause.status, retry_after=cause.retry_after)


def openai_body(request: Any) -> dict[str, Any]:
    """An OpenAI chat-completions body (without `model`) for a text-only lm15 Request."""
    from dspy.lm15 import UnsupportedFeatureError

    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        if message.text is None:
            raise UnsupportedFeatureError("the sweep gateway sends text messages only")
        messages.append({"role": message.role, "content": message.text})
    config = request.config
    body: dict[str, Any] = {"messages": messages}
    for name in ("max_tokens", "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty"):
        if getattr(config, name) is not None:
            body[name] = getattr(config, name)
    if config.stop:
        body["stop"] = list(config.stop)
    if config.response_format is not None:
        body["response_format"] = config.response_format
    return {**body, **(config.extensions or {})}
