"""Progress inside a running trial: its LM spend, an event after every evaluation, the stop when pruned.

Trial side only (DSPy, no Ray). A trial host makes one `TrialStream(trial_id, send)` per trial and
hands it to `run_trial(..., events=stream)`; `send` receives each `TrialEvent` (the host's
`Channel` buffers them for the driver) and raises `Pruned` once the driver has stopped the trial
(run/hosts.py): that is the one stop path.

`run_trial` installs a `TrialProgress` in the trial's DSPy context, as DSPy's usage tracker and
under `TRIAL_KEY`, so it sees every LM call and every `dspy.Evaluate` of the trial, in every
thread DSPy starts for it (ParallelExecutor carries the context into its workers), whatever the
LM's engine is (the gateway's in a sweep, LiteLLM's in a benchmark). No DSPy callback is
installed: DSPy's callback wrapper then costs nothing on the ~six nested calls of a prediction.

- spend: `add_usage` (DSPy's usage-tracker hook, called once per answered call) counts the
  call, its tokens and its cloud price; the gateway's engine reports a failed call with
  `add_failure` (lm/engine.py). Counting here rather than in the gateway keeps it per trial and
  in-process, so events need no round trip.
- evaluations: `hook_evaluate` wraps `dspy.Evaluate.__call__` once per process; inside a trial's
  context it hands the evaluation to that trial's `TrialProgress`. MIPROv2's minibatch and full
  evaluations, BootstrapFewShotWithRandomSearch's candidates and GEPA's (dspy's GEPA adapter scores every candidate and minibatch through
  `dspy.Evaluate`; gepa 0.1.4's own callbacks swallow exceptions, so they could not stop it and
  add nothing the Evaluate hook lacks) each become an event. Only an evaluation of the validation
  split moves the best score, and the split is known by its examples (`split_id`), not by its size:
  COPRO scores its candidates on the train split, which is often larger than val, and a train score
  must never reach the pruner or a pruned trial's record as a val score. An evaluation of the train
  split is reported as phase "train", any other set (a minibatch) as "minibatch".
- stopping: an optimizer that calls Evaluate may catch what the hook raises, so `Pruned` does
  not leave the hook (nor did it leave DSPy's callbacks, which swallow exceptions). The trial's metric (the platform supplies it to every optimizer) raises `Stopped` at its next
  call instead: a BaseException, so it passes the `except Exception` with which Evaluate,
  ParallelExecutor, GEPA and MIPROv2's inner Optuna study keep going after a bad example.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dspy_sweeps.run.events import VAL_PHASES, Pruned, TrialEvent, TrialEvents

TRIAL_KEY = "dspy_sweeps_trial"  # the trial's TrialProgress in its DSPy context
_hook_lock = threading.Lock()
_evaluations = itertools.count()


def step_of(calls: int) -> int:
    """LM calls bucketed down to a power of two (0, 1, 2, 4, ..., 1024, ...).

    Pruners compare trials at the same step, so steps must coincide across trials. Spend spans
    orders of magnitude between optimizers (a BootstrapFewShot trial spends tens of calls, a
    GEPA trial thousands): fixed buckets would give one a single comparison point and the
    other hundreds, while geometric buckets give every trial a handful, which is also the
    shape of successive halving's and Hyperband's rungs.
    """
    return 0 if calls <= 0 else 1 << (calls.bit_length() - 1)


class Stopped(BaseException):
    """Unwinds a pruned trial through the optimizer; `run_trial` turns it into a "pruned" result."""


@dataclass
class Spend:
    """A trial's LM spend so far, as the trial itself sees it (the gateway's figures are final)."""

    calls: int = 0  # requested, cache hits included
    failed_calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0  # cloud calls priced from LiteLLM's map; self-hosted busy time is known at the end


class TrialStream:
    """The `TrialEvents` a trial host gives a trial: events to `send`, which raises `Pruned` to stop it."""

    def __init__(self, trial_id: str, send: Callable[[TrialEvent], None]) -> None:
        self.trial_id, self.send = trial_id, send
        self.spend = Spend()
        self.best: float | None = None
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def report(self, phase: str, score: float | None) -> None:
        with self._lock:
            if score is not None and phase in VAL_PHASES:
                self.best = score if self.best is None else max(self.best, score)
            spend = Spend(**vars(self.spend))
            event = TrialEvent(
                trial_id=self.trial_id,
                phase=phase,
                step=step_of(spend.calls),
                score=score,
                best=self.best,
                calls=spend.calls,
                tokens=spend.tokens,
                cost_usd=round(spend.cost_usd, 6),
                failed_calls=spend.failed_calls,
                elapsed_s=round(time.monotonic() - self.started, 3),
            )
        self.send(event)  # raises Pruned once the driver has stopped the trial


@dataclass
class Candidate:
    """The best program an optimizer has scored on the validation split so far."""

    score: float
    program: str  # DSPy's JSON state, taken when it was scored


class TrialProgress:
    """Installed in a trial's DSPy context: counts its spend, reports its evaluations, stops it."""

    def __init__(self, events: TrialEvents, spend: Spend, splits: Splits, priced: frozenset[str]) -> None:
        self.events, self.spend, self.splits, self.priced = events, spend, splits, priced
        self.best: Candidate | None = None
        self.pruned: Pruned | None = None
        self._programs: dict[str, tuple[Any, str]] = {}
        self._lock = threading.Lock()

    # ParallelExecutor deep-copies the usage tracker into each worker so per-call usage stays
    # apart; a trial's spend is one total, so every copy is this object.
    def __deepcopy__(self, memo: dict) -> TrialProgress:
        return self

    def add_usage(self, lm: str, usage: dict[str, Any]) -> None:
        """DSPy's usage-tracker hook: once per answered call, with the provider's token counts."""
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        cost = _cloud_cost(lm, prompt, completion) if lm in self.priced else 0.0
        with self._lock:
            self.spend.calls += 1
            self.spend.tokens += prompt + completion
            self.spend.cost_usd += cost

    def add_failure(self) -> None:
        """A call that got no answer (the gateway's engine reports it)."""
        with self._lock:
            self.spend.calls += 1
            self.spend.failed_calls += 1

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        devset = inputs.get("devset") or instance.devset
        with self._lock:
            self._programs[call_id] = (inputs.get("program"), self.splits.phase_of(devset))

    def on_evaluate_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            program, phase = self._programs.pop(call_id, (None, "minibatch"))
        if exception is not None or outputs is None:
            return
        score = float(outputs.score) / 100  # Evaluate reports a percentage; the platform's scores are 0-1
        if phase == "compile" and program is not None and (self.best is None or score > self.best.score):
            self.best = Candidate(score, state_of(program))
        self.report(phase, score)

    def report(self, phase: str, score: float | None) -> None:
        """Report to the trial's events; a prune is kept for the metric to act on (see the module doc)."""
        try:
            self.events.report(phase, score)
        except Pruned as exc:
            self.pruned = exc

    def guard(self, metric: Callable) -> Callable:
        """The trial's metric, raising `Stopped` once the trial is pruned."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.pruned is not None:
                raise Stopped(str(self.pruned))
            return metric(*args, **kwargs)

        return guarded


def hook_evaluate() -> None:
    """Wrap `dspy.Evaluate.__call__`, once per process, so an evaluation inside a trial's context
    reports to that trial's `TrialProgress` (`on_evaluate_start`/`on_evaluate_end`, as DSPy's
    callbacks would call them); outside a trial it is DSPy's own call, untouched."""
    import dspy

    with _hook_lock:
        original = dspy.Evaluate.__call__
        if getattr(original, "_trial_hook", False):
            return
        signature = inspect.signature(original)

        @functools.wraps(original)
        def evaluate(self: Any, *args: Any, **kwargs: Any) -> Any:
            progress = getattr(dspy.settings, TRIAL_KEY, None)
            if progress is None:
                return original(self, *args, **kwargs)
            inputs = dict(signature.bind(self, *args, **kwargs).arguments)
            inputs.pop("self", None)
            call_id = str(next(_evaluations))
            progress.on_evaluate_start(call_id, self, inputs)
            try:
                outputs = original(self, *args, **kwargs)
            except BaseException as exc:
                progress.on_evaluate_end(call_id, None, exc)
                raise
            progress.on_evaluate_end(call_id, outputs, None)
            return outputs

        evaluate._trial_hook = True  # type: ignore[attr-defined]
        dspy.Evaluate.__call__ = evaluate


@dataclass(frozen=True)
class Splits:
    """The trial's train and val splits, known by their examples (`split_id`)."""

    train: tuple[int, str]  # (size, split_id)
    val: tuple[int, str]

    @classmethod
    def of(cls, trainset: list, valset: list) -> Splits:
        return cls((len(trainset), split_id(trainset)), (len(valset), split_id(valset)))

    def phase_of(self, devset: Any) -> str:
        """ "compile" for the val split, "train" for the train split, "minibatch" for any other set."""
        examples = list(devset)
        for phase, (size, digest) in (("compile", self.val), ("train", self.train)):
            if len(examples) == size and split_id(examples) == digest:  # the size first: digests cost a pass
                return phase
        return "minibatch"


def split_id(examples: list) -> str:
    """Which examples a set holds, in any order (an optimizer may shuffle it): a digest of each
    example's fields, so two splits of one size, or a subset, never pass for each other."""
    import hashlib
    import json

    rows = sorted(json.dumps(example.toDict(), sort_keys=True, default=str) for example in examples)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def state_of(program: Any) -> str:
    """DSPy's JSON state of a program, as results store it."""
    import json

    return json.dumps(program.dump_state(), sort_keys=True, default=str)


def _cloud_cost(model: str, prompt: int, completion: int) -> float:
    import litellm

    try:
        prompt_usd, completion_usd = litellm.cost_per_token(
            model=model, prompt_tokens=prompt, completion_tokens=completion
        )
    except Exception:  # a model LiteLLM's map lacks: its cost is the gateway's to find out
        return 0.0
    return prompt_usd + completion_usd
