"""Prices for plan estimates: a typical call's dollars from LiteLLM's price map."""

from __future__ import annotations

import os

from dspy_sweeps.spec.schema import ModelSpec

TYPICAL_CALL_TOKENS = (800, 200)  # prompt, completion: a chain-of-thought call, for plan estimates only


def typical_call_usd(spec: ModelSpec) -> float | None:
    """Price of a typical call from LiteLLM's price map: 0 for self-hosted models and those of a local
    endpoint (their cost is busy time, known only after the run), None for a model the map lacks."""
    from dspy_sweeps.lm.endpoints import plugin_name

    if plugin_name(spec) is not None or spec.api_bases or spec.serve is not None:
        return 0.0
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    try:
        prompt, completion = litellm.cost_per_token(
            model=spec.model, prompt_tokens=TYPICAL_CALL_TOKENS[0], completion_tokens=TYPICAL_CALL_TOKENS[1]
        )
    except Exception:
        return None
    return prompt + completion
