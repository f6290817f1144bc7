"""What a trial's test evaluation did on a few examples (records only, no DSPy), for the driver to
log as MLflow traces: `run/recorder.py` fills them on the trial host, `track/traces.py` writes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LMCallRecord:
    model: str
    messages: list[dict[str, Any]]
    outputs: list[Any] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    start_ns: int = 0
    end_ns: int = 0


@dataclass
class ExampleTrace:
    """One evaluated example: its inputs, the prediction, the gold labels, its score and LM calls."""

    index: int  # position in the test split
    inputs: dict[str, Any]
    prediction: dict[str, Any] | None
    gold: dict[str, Any]
    score: float | None
    error: str | None
    start_ns: int
    end_ns: int
    calls: list[LMCallRecord] = field(default_factory=list)
