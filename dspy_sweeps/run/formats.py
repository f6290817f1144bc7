"""Malformed answers, the normal case with small real models: counted, and a teacher's retried.

A trial runs with `FormatAdapter` as DSPy's adapter (it is DSPy's ChatAdapter, JSON fallback
included). A student's answer that neither format parses is the model's failure, not the
endpoint's: it raises `AdapterParseError` as before, so it scores as the optimizer (or the
trial's own evaluation) scores it, and it is counted. A teacher's malformed answer (MIPROv2's
instruction proposer, COPRO's candidates) would end the whole optimizer step, so it is asked
again with a fresh sample (a new seed at a sampling temperature, so neither the gateway's cache
nor a greedy server repeats it) up to `TEACHER_RETRIES` times before the error goes on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

TEACHER_RETRIES = 4  # measured: SmolLM2-135M as MIPROv2 proposer gave 3 malformed answers in a row
FRESH_TEMPERATURE = 0.7  # at least this hot for a resample: at temperature 0 a server answers the same again


@dataclass
class FormatCounts:
    """A trial's malformed answers, beside the gateway's count of failed calls."""

    failures: int = 0  # answers no adapter could parse (each one raised AdapterParseError)
    fallback_calls: int = 0  # extra LM calls DSPy's JSON fallback made after a chat-format answer failed
    teacher_retries: int = 0  # teacher calls asked again after a malformed answer
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, failures: int = 0, fallback_calls: int = 0, teacher_retries: int = 0) -> None:
        with self._lock:
            self.failures += failures
            self.fallback_calls += fallback_calls
            self.teacher_retries += teacher_retries


def format_adapter(counts: FormatCounts, teacher: Any = None) -> Any:
    """DSPy's ChatAdapter (with its JSON fallback) that counts malformed answers into `counts` and
    resamples the `teacher` LM's (None: no teacher of its own, so nothing is resampled)."""
    from dspy.adapters.chat_adapter import ChatAdapter
    from dspy.utils.exceptions import AdapterParseError

    class FormatAdapter(ChatAdapter):
        def __call__(self, lm: Any, lm_kwargs: dict, signature: Any, demos: list, inputs: dict) -> list:
            tries = 1 + (TEACHER_RETRIES if teacher is not None and lm is teacher else 0)
            for attempt in range(tries):
                try:
                    return super().__call__(lm, _fresh(lm, lm_kwargs, attempt), signature, demos, inputs)
                except AdapterParseError:
                    counts.add(failures=1, teacher_retries=int(attempt + 1 < tries))
                    if attempt + 1 == tries:
                        raise
            raise AssertionError("unreachable: the last try returns or raises")

        def _make_json_adapter_fallback(self) -> Any:
            counts.add(fallback_calls=1)
            return super()._make_json_adapter_fallback()

    return FormatAdapter()


def _fresh(lm: Any, lm_kwargs: dict, attempt: int) -> dict:
    """The call's settings for its `attempt`-th resample (the first try is left as it is)."""
    if not attempt:
        return dict(lm_kwargs)  # the adapter pops keys from what it is given
    temperature = max(lm_kwargs.get("temperature", lm.kwargs.get("temperature")) or 0.0, FRESH_TEMPERATURE)
    return {**lm_kwargs, "temperature": temperature, "seed": 1_000 + attempt}
