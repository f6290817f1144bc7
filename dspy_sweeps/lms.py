"""Student and teacher LMs: building `dspy.LM`s, checking keys and endpoints before any call.

Simulated models (`sim/student`) are rewritten to the OpenAI-compatible simulator's URL,
so the production path (LiteLLM/DSPy speaking HTTP to an endpoint) is the one exercised.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from dspy_sweeps.config import SIM_PREFIX, ModelSpec, Sweep
from dspy_sweeps.errors import SweepError

NO_KEY = "EMPTY"  # what vLLM and SGLang accept when they run without --api-key


def resolve(spec: ModelSpec, sim_url: str | None) -> ModelSpec:
    """A simulated model becomes an OpenAI-compatible model at the simulator's URL."""
    if not spec.simulated:
        return spec
    if sim_url is None:
        raise SweepError(f"{spec.name}: model {spec.model} needs the simulated endpoint, which is not running")
    served = "openai/" + spec.model.removeprefix(SIM_PREFIX)
    return spec.model_copy(update={"model": served, "api_base": sim_url, "api_key_env": None})  # the simulator takes no key


def build_lm(spec: ModelSpec, cache: bool = True) -> Any:
    """A dspy.LM for a resolved spec. The key is read from the environment at the last moment."""
    import dspy

    kwargs: dict[str, Any] = {}
    if spec.temperature is not None:
        kwargs["temperature"] = spec.temperature
    if spec.max_tokens is not None:
        kwargs["max_tokens"] = spec.max_tokens
    if spec.api_key_env:
        kwargs["api_key"] = _key(spec)
    if spec.api_bases:
        kwargs["api_base"] = spec.api_bases[0]
        # A self-hosted endpoint gets a placeholder, never a cloud key LiteLLM would find in the environment.
        kwargs.setdefault("api_key", NO_KEY)
    return dspy.LM(spec.model, cache=cache, **kwargs)


def _key(spec: ModelSpec) -> str:
    key = os.environ.get(spec.api_key_env or "")
    if not key:
        raise SweepError(f"{spec.name} ({spec.model}): API key variable {spec.api_key_env} is not set")
    return key


def check_keys(sweep: Sweep) -> None:
    """Every cloud model has its key variable set; the error names the variable, never a value."""
    for role, specs in (("students", sweep.students), ("teachers", sweep.teachers)):
        for i, spec in enumerate(specs):
            if spec.simulated:
                continue
            if spec.api_key_env:
                if not os.environ.get(spec.api_key_env):
                    raise SweepError(f"{role}.{i} ({spec.model}): API key variable {spec.api_key_env} is not set")
            elif not spec.api_base and spec.serve is None:  # self-hosted endpoints take no cloud key
                _check_litellm_env(f"{role}.{i}", spec.model)


def _check_litellm_env(where: str, model: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    missing = litellm.validate_environment(model=model).get("missing_keys") or []
    if missing:
        raise SweepError(f"{where} ({model}): API key variable {', '.join(missing)} is not set")


def check_endpoints(specs: list[tuple[str, ModelSpec]], timeout: float = 5.0) -> None:
    """One short GET /models per self-hosted endpoint, so a typo in api_base costs seconds, not a sweep."""
    seen: set[str] = set()
    for where, spec in specs:
        for base in spec.api_bases:
            if base not in seen:
                seen.add(base)
                served_models(base, f"{where} ({spec.name})", timeout)


def served_models(base: str, where: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET {base}/models: the served models by id, or {} when the endpoint wants a key to list them."""
    url = base.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return {m.get("id"): m for m in json.load(response).get("data", [])}
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # an endpoint that asks for a key is there
            return {}
        raise SweepError(f"{where}: endpoint {url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SweepError(f"{where}: endpoint {base} is unreachable ({reason})") from None


def endpoint_for(original: ModelSpec, resolved: ModelSpec) -> Any:
    """The gateway's view of a model. Its id names the model and the served checkpoint (vLLM's
    `root`), not the URL, so a restarted server or simulator keeps its cache entries."""
    from dspy_sweeps.gateway import Endpoint

    served = served_name(resolved)
    root = ""
    if resolved.api_bases:
        root = served_models(resolved.api_bases[0], original.name).get(served, {}).get("root") or ""
    return Endpoint(
        id=f"{original.model}|{root}", model=served, api_bases=resolved.api_bases, api_key_env=resolved.api_key_env,
        max_concurrency=resolved.max_concurrency, rpm=resolved.rpm, tpm=resolved.tpm,
        cost_per_hour=resolved.cost_per_hour, timeout_s=resolved.timeout_s,
    )  # fmt: skip


def served_name(spec: ModelSpec) -> str:
    """The model name an OpenAI-compatible server knows (`openai/llama-8b` → `llama-8b`)."""
    return spec.model.split("/", 1)[1] if spec.api_bases and "/" in spec.model else spec.model


def build_gateway_lm(spec: ModelSpec, gateway: Any, endpoint_id: str, trial_id: str) -> Any:
    """A dspy.LM whose calls go through the sweep's gateway (which caches, so DSPy does not)."""
    import dspy

    kwargs = {k: v for k, v in {"temperature": spec.temperature, "max_tokens": spec.max_tokens}.items() if v is not None}
    return dspy.LM(spec.model, engine=GatewayEngine(gateway, endpoint_id, trial_id), cache=False, **kwargs)


class GatewayEngine:
    """DSPy 3.4 engine (`complete(Request) -> Response`) that hands each request to the gateway actor."""

    def __init__(self, gateway: Any, endpoint_id: str, trial_id: str) -> None:
        self.gateway, self.endpoint_id, self.trial_id = gateway, endpoint_id, trial_id

    def complete(self, request: Any) -> Any:
        import ray
        from dspy.lm15 import response_from_openai_chat

        try:
            body = ray.get(self.gateway.complete.remote(self.trial_id, self.endpoint_id, openai_body(request)))
        except ray.exceptions.RayTaskError as exc:
            raise lm_error(exc.cause) from None
        except ray.exceptions.RayActorError as exc:  # the gateway is restarting: retryable like a dropped connection
            from dspy import lm15

            raise lm15.TransportError(f"LM gateway unavailable: {exc}") from None
        return response_from_openai_chat(body, model=request.model)

    def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


class BudgetSpent(Exception):
    """The sweep's budget is spent: not retried, and the trial is marked as cut short."""


def lm_error(cause: BaseException | None) -> Exception:
    """The DSPy (lm15) error for a gateway failure, so DSPy's own retry policy applies."""
    from dspy import lm15

    from dspy_sweeps.gateway import GatewayError

    if not isinstance(cause, GatewayError):
        return RuntimeError(f"LM gateway failed: {cause!r}")
    if cause.kind == "budget":
        return BudgetSpent(str(cause))
    classes = {
        "rate_limit": lm15.RateLimitError, "server": lm15.ServerError, "transport": lm15.TransportError,
        "timeout": lm15.TimeoutError, "auth": lm15.AuthError, "invalid": lm15.InvalidRequestError,
    }  # fmt: skip
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


TYPICAL_CALL_TOKENS = (800, 200)  # prompt, completion: a chain-of-thought call, for plan estimates only


def typical_call_usd(spec: ModelSpec) -> float | None:
    """Price of a typical call from LiteLLM's price map: 0 for self-hosted and simulated models
    (their cost is busy time, known only after the run), None for a model the map lacks."""
    if spec.simulated or spec.api_bases or spec.serve is not None:
        return 0.0
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    try:
        prompt, completion = litellm.cost_per_token(
            model=spec.model, prompt_tokens=TYPICAL_CALL_TOKENS[0], completion_tokens=TYPICAL_CALL_TOKENS[1]
        )
    except Exception:  # noqa: BLE001 - litellm raises for models it does not price
        return None
    return prompt + completion
