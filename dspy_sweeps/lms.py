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
    if spec.api_base:
        kwargs["api_base"] = spec.api_base
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
            elif not spec.api_base:
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
        if not spec.api_base or spec.api_base in seen:
            continue
        seen.add(spec.api_base)
        url = spec.api_base.rstrip("/") + "/models"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):  # an endpoint that asks for a key is there
                raise SweepError(f"{where} ({spec.name}): endpoint {url} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SweepError(f"{where} ({spec.name}): endpoint {spec.api_base} is unreachable ({reason})") from None
