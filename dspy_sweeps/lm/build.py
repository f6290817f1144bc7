"""Student and teacher LMs as DSPy builds them: a `dspy.LM` (or `dspy.Embedder`) for a resolved spec.

A model a local endpoint plugin serves (`sim/student`) is resolved to its endpoint's URL first
(`dspy_sweeps.lm.endpoints.resolve`), so the production path (LiteLLM/DSPy speaking HTTP to an
OpenAI-compatible endpoint) is the one exercised.
"""

from __future__ import annotations

import os
from typing import Any

from dspy_sweeps.errors import SweepError
from dspy_sweeps.lm.endpoints import plugin_name
from dspy_sweeps.spec.schema import ModelSpec

NO_KEY = "EMPTY"  # what vLLM and SGLang accept when they run without --api-key


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


def build_embedder(spec: ModelSpec) -> Any:
    """A dspy.Embedder for a resolved embedder spec (LiteLLM's embedding call); the key is read at the last moment."""
    import dspy

    kwargs: dict[str, Any] = {}
    if spec.api_key_env:
        kwargs["api_key"] = _key(spec)
    if spec.api_bases:
        kwargs["api_base"] = spec.api_bases[0]
        kwargs.setdefault("api_key", NO_KEY)
    return dspy.Embedder(spec.model, **kwargs)


def _key(spec: ModelSpec) -> str:
    key = os.environ.get(spec.api_key_env or "")
    if not key:
        raise SweepError(f"{spec.name} ({spec.model}): API key variable {spec.api_key_env} is not set")
    return key


def endpoint_for(original: ModelSpec, resolved: ModelSpec) -> Any:
    """The gateway's view of a model. Its id names the spec (two students with one model string are
    two endpoints), the model and the served checkpoint (vLLM's `root`), not the URL, so a restarted
    server or simulator keeps its cache entries."""
    from dspy_sweeps.lm.checks import key_of, served_models
    from dspy_sweeps.lm.gateway import Endpoint

    served = served_name(resolved)
    root = ""
    if resolved.api_bases:
        listed = served_models(resolved.api_bases[0], original.name, key=key_of(resolved))
        root = listed.get(served, {}).get("root") or ""
    return Endpoint(
        id=f"{original.name}|{original.model}|{root}",
        model=served,
        api_bases=resolved.api_bases,
        api_key_env=resolved.api_key_env,
        max_concurrency=resolved.max_concurrency,
        rpm=resolved.rpm,
        tpm=resolved.tpm,
        cost_per_hour=resolved.cost_per_hour,
        timeout_s=resolved.timeout_s,
        retries=resolved.retries,
        max_retry_s=resolved.max_retry_s,
        label=original.model,
    )


def served_name(spec: ModelSpec) -> str:
    """The model name an OpenAI-compatible server knows (`openai/llama-8b` → `llama-8b`)."""
    return spec.model.split("/", 1)[1] if spec.api_bases and "/" in spec.model else spec.model


def portable_lm(spec: ModelSpec) -> Any:
    """The student as a registered model carries it for MLflow's own serving path: the model and its
    self-hosted endpoint, never a key (a cloud model takes its provider's standard variable where it is
    served). None for a student on a local endpoint or hosted by the sweep, whose endpoint ends with its sweep."""
    if plugin_name(spec) is not None or spec.serve is not None:
        return None
    import dspy

    endpoint = {"api_base": spec.api_bases[0], "api_key": NO_KEY} if spec.api_bases else {}
    options = {
        k: v for k, v in {"temperature": spec.temperature, "max_tokens": spec.max_tokens}.items() if v is not None
    }
    return dspy.LM(spec.model, **endpoint, **options)
