"""Records the LM calls of one evaluated example, for its trace (`records.py`).

Trial side only (DSPy, no MLflow: hosts never import a tracking library). `evaluate` runs the
first `Trial.trace_examples` test examples each under an `ExampleRecorder` installed in that
example's own DSPy context (ParallelExecutor runs an example on one thread), so it sees that
example's LM calls and no other's: the messages sent, the answer, the tokens (DSPy's usage-tracker
hook) and the cloud price.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from dspy.utils.callback import BaseCallback

from dspy_sweeps.records import LMCallRecord


class ExampleRecorder(BaseCallback):
    """DSPy callback and usage tracker for one example: records its LM calls in order.

    As the usage tracker it also passes usage on to the trial's own (`TrialProgress`), so the
    trial's spend is counted as before."""

    def __init__(self, usage_tracker: Any, priced: frozenset[str]) -> None:
        self.usage_tracker, self.priced = usage_tracker, priced
        self.calls: list[LMCallRecord] = []
        self._open: dict[str, LMCallRecord] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> ExampleRecorder:  # DSPy copies the usage tracker per thread
        return self

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        messages = inputs.get("messages") or [{"role": "user", "content": inputs.get("prompt")}]
        record = LMCallRecord(str(getattr(instance, "model", "")), list(messages), start_ns=time.time_ns())
        with self._lock:
            self._open[call_id] = record
            self.calls.append(record)

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            record = self._open.pop(call_id, None)
        if record is None:
            return
        record.end_ns = time.time_ns()
        record.outputs = (
            [str(o) for o in outputs] if isinstance(outputs, list) else ([] if outputs is None else [str(outputs)])
        )
        record.error = f"{type(exception).__name__}: {exception}" if exception is not None else None

    def add_usage(self, lm: str, usage: dict[str, Any]) -> None:
        if self.usage_tracker is not None:
            self.usage_tracker.add_usage(lm, usage)
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        with self._lock:  # usage is reported as the call returns, before its end callback
            record = next((r for r in reversed(self.calls) if not r.end_ns), None)
        if record is not None:
            record.prompt_tokens, record.completion_tokens = prompt, completion
            record.cost_usd = _price(lm, prompt, completion) if lm in self.priced else 0.0

    def add_served(self, served: str) -> None:
        """How the gateway answered the call in flight (lm/engine.py reports it before DSPy's usage)."""
        with self._lock:
            record = next((r for r in reversed(self.calls) if not r.end_ns), None)
        if record is not None:
            record.served = served


def _price(model: str, prompt: int, completion: int) -> float:
    from dspy_sweeps.run.progress import _cloud_cost  # the trial's own pricing, so both agree

    return _cloud_cost(model, prompt, completion)


def recorded(run: Any, recorder: ExampleRecorder) -> Any:
    """`run()` with `recorder` added to the current DSPy context (this thread only)."""
    import dspy

    with dspy.context(callbacks=[*dspy.settings.callbacks, recorder], usage_tracker=recorder):
        return run()
