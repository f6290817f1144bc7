"""The records that cross the layers: what a running trial reports (`TrialEvent`) and what it
produced (`TrialResult`).

The trial (run/) makes them, the tracking and results (track/) read them; they live here, below
both, so that `track` never imports `run` (the layer contracts in .importlinter keep it so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialEvent:
    """One evaluation inside a running trial, with the trial's LM spend so far."""

    trial_id: str
    phase: str  # "compile" (the optimizer's, on the val split), "train", "minibatch", "val", "test"
    step: int  # LM calls the trial has requested so far, bucketed so trials report at the same steps
    score: float | None
    best: float | None  # best score the trial has reached so far
    calls: int
    tokens: int
    cost_usd: float
    failed_calls: int
    elapsed_s: float


# What a trial's test evaluation did on a few examples, for the driver to log as MLflow traces:
# `run/recorder.py` fills them on the trial host, `track/traces.py` writes them.
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
    served: str | None = None  # how the gateway answered: "sent", "cached" or "merged"


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


@dataclass
class TrialResult:
    """What a trial produced; `program` is DSPy's JSON state of the compiled program."""

    trial_id: str
    status: str  # "ok" | "failed" | "cut" (stopped by the sweep's budget) | "pruned" (stopped by the pruner)
    error: str | None = None
    reason: str | None = None  # why it failed: "endpoint", "auth", "budget", "error"; or "pruned"
    val_score: float | None = None
    test_score: float | None = None
    lm_calls: int = 0  # calls sent to an endpoint
    calls_requested: int = 0
    cache_hits: int = 0
    merged_calls: int = 0
    failed_calls: int = 0
    failed_examples: int = 0  # examples not scored because their LM calls failed
    format_failures: int = 0  # answers no adapter could parse: the model's failures, scored as wrong
    adapter_fallbacks: int = 0  # extra LM calls DSPy's JSON fallback made after a chat-format answer failed
    teacher_retries: int = 0  # teacher calls resampled after a malformed answer (run/formats.py)
    teacher_as_text: int = 0  # teacher answers taken as plain text once every resample was malformed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    attempts: int = 1  # more than 1: the trial was retried after its host died, or resumed
    retries: int = 0  # LM calls resent after a 429, 5xx, timeout or lost connection
    gave_up: int = 0  # LM calls whose retries on one model ran out
    fell_back: int = 0  # LM calls passed on to a fallback model
    calls_by_model: dict[str, int] = field(default_factory=dict)  # answered LM calls per model
    program: str | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    # Per-example scores in split order (None: not scored), for the bootstrap intervals of track/gate.py.
    val_scores: list[float | None] = field(default_factory=list)
    test_scores: list[float | None] = field(default_factory=list)
    test_traces: list[ExampleTrace] = field(default_factory=list)  # the first test examples, LM calls and all
