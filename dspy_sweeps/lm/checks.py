"""Checks before any LM call: every key variable is set, every self-hosted endpoint answers."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.schema import ModelSpec, Sweep


def check_keys(sweep: Sweep) -> None:
    """Every cloud model has its key variable set; the error names the variable, never a value."""
    from dspy_sweeps.lm.endpoints import plugin_name

    for where, spec in sweep.roles():
        if plugin_name(spec) is not None:  # a local endpoint the sweep starts takes no key
            continue
        if spec.api_key_env:
            if not os.environ.get(spec.api_key_env):
                raise SweepError(f"{where} ({spec.model}): API key variable {spec.api_key_env} is not set")
        elif not spec.api_base and spec.serve is None:  # self-hosted endpoints take no cloud key
            _check_litellm_env(where, spec.model)


def _check_litellm_env(where: str, model: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    from dspy_sweeps.lm.endpoints import installed

    provider, sep, _ = model.partition("/")
    known = {str(getattr(p, "value", p)) for p in litellm.provider_list}
    if sep and provider not in known and model not in litellm.model_cost:  # a typo, or a plugin not installed
        plugins = ", ".join(sorted(installed())) or "none"
        raise SweepError(
            f"{where} ({model}): '{provider}' is neither a LiteLLM provider nor an installed endpoint plugin "
            f"(plugins: {plugins})"
        )

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
                served_models(base, f"{where} ({spec.name})", timeout, key=key_of(spec))


@dataclass(frozen=True)
class Listing:
    """One GET {base}/models: the status, whether it said it is the simulator, the models by id."""

    status: int | None  # None: unreachable
    simulated: bool = False
    models: dict[str, Any] | None = None  # None: not a JSON listing
    reason: str = ""


_listings: dict[str, Listing] | None = None  # within `one_listing_per_endpoint`: listings by URL


@contextlib.contextmanager
def one_listing_per_endpoint() -> Iterator[None]:
    """Within the block, each endpoint's GET /models is made once and its answer reused (a sweep's
    start-up asks it of every endpoint three times: reachable, which checkpoint, simulated?)."""
    global _listings
    outer, _listings = _listings, {} if _listings is None else _listings
    try:
        yield
    finally:
        _listings = outer


def key_of(spec: ModelSpec) -> str | None:
    """The key `spec` is called with (its `api_key_env`'s value), sent on GET /models too: a server
    started with a key (vLLM's --api-key) refuses to list its models without it."""
    return os.environ.get(spec.api_key_env) if spec.api_key_env else None


def listing(base: str, timeout: float = 5.0, key: str | None = None) -> Listing:
    url = base.rstrip("/") + "/models"
    if _listings is not None and url in _listings:
        return _listings[url]
    result = _list(url, timeout, key)
    if _listings is not None and result.status is not None:
        _listings[url] = result
    return result


def _list(url: str, timeout: float, key: str | None) -> Listing:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            simulated = response.headers.get("x-simulated", "").lower() == "true"
            try:
                data = json.load(response).get("data", [])
                models = {m.get("id"): m for m in data}
            except (ValueError, AttributeError):
                return Listing(response.status, simulated, None, "not a JSON model listing")
            simulated = simulated or any(m.get("owned_by") == SIMULATOR_OWNER for m in data)
            return Listing(response.status, simulated, models)
    except urllib.error.HTTPError as exc:
        return Listing(exc.code, exc.headers.get("x-simulated", "").lower() == "true")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return Listing(None, reason=str(getattr(exc, "reason", exc)))


def served_models(base: str, where: str, timeout: float = 5.0, key: str | None = None) -> dict[str, Any]:
    """GET {base}/models (with `key` if given): the served models by id, or {} when the endpoint
    wants a key to list them."""
    url = base.rstrip("/") + "/models"
    found = listing(base, timeout, key)
    if found.status is None:
        raise SweepError(f"{where}: endpoint {base} is unreachable ({found.reason})")
    if found.status in (401, 403):  # an endpoint that asks for a key is there
        return {}
    if found.status != 200:
        raise SweepError(f"{where}: endpoint {url} answered HTTP {found.status}")
    if found.models is None:
        raise SweepError(f"{where}: endpoint {base} is unreachable ({found.reason})")
    return found.models


SIMULATOR_OWNER = "dspy-sweeps-simulator"  # the models' owner an endpoint that declares itself simulated lists


def answers_simulated(base: str, timeout: float = 5.0, key: str | None = None) -> bool:
    """Whether the endpoint at `base` says its answers are simulated: the `x-simulated: true` header it
    puts on every response, or its models' owner. An unreachable endpoint is `check_endpoints`' to report."""
    return listing(base, timeout, key).simulated


def is_simulated(spec: ModelSpec, resolved: ModelSpec) -> bool:
    """A score from this model is not a real model's: its local endpoint plugin declares it simulated,
    or an endpoint it is called at (a served student's replica, any api_base) marks its answers so,
    whatever its model string."""
    from dspy_sweeps.lm.endpoints import simulated

    return simulated(spec) or any(answers_simulated(base, key=key_of(resolved)) for base in resolved.api_bases)
