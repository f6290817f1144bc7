"""Malformed answers, the normal case with small real models: counted, and a teacher's retried.

A trial runs with `FormatAdapter` as DSPy's adapter (it is DSPy's ChatAdapter, JSON fallback
included). A student's answer that neither format parses is the model's failure, not the
endpoint's: it raises `AdapterParseError` as before, so it scores as the optimizer (or the
trial's own evaluation) scores it, and it is counted. A teacher's malformed answer (MIPROv2's
instruction proposer, COPRO's candidates) would end the whole optimizer step, so it is asked
again with a fresh sample (a new seed at a sampling temperature, so neither the gateway's cache
nor a greedy server repeats it) up to `TEACHER_RETRIES` times. When every sample is malformed and
the step asks for one text (MIPROv2's program and module descriptions and its proposed
instruction, COPRO's instruction), the last answer's text is taken as that text: a small teacher
that ignores the field markers still wrote an instruction, and the optimizer scores it like any
other candidate. Only then, or for a step with other outputs, does the error go on.

The trial runs with a high `max_errors` so malformed answers do not cancel evaluations; a refused
key or the spent budget must still end it, so the adapter raises those as `SweepStop`, a
BaseException that DSPy's per-example `except Exception` handlers let through (as `Stopped` is).
"""

from __future__ import annotations

import re
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
    teacher_as_text: int = 0  # teacher answers taken as plain text after every resample was malformed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(
        self, failures: int = 0, fallback_calls: int = 0, teacher_retries: int = 0, teacher_as_text: int = 0
    ) -> None:
        with self._lock:
            self.failures += failures
            self.fallback_calls += fallback_calls
            self.teacher_retries += teacher_retries
            self.teacher_as_text += teacher_as_text


class SweepStop(BaseException):
    """A refused key or the sweep's spent budget, on its way through an optimizer to the trial."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def stops() -> tuple[type[Exception], ...]:
    """The LM errors that end a trial whatever the optimizer does: a refused key, the spent budget."""
    from dspy import lm15
    from dspy.utils.exceptions import LMAuthError

    from dspy_sweeps.errors import BudgetSpent

    return (LMAuthError, lm15.AuthError, BudgetSpent)


def ending(exc: BaseException) -> Exception | None:
    """The refused key or spent budget behind `exc`, if that is what it is: DSPy wraps an engine's
    error it does not know (BudgetSpent) in LMUnexpectedError, so its causes are looked at too."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, stops()):
            return seen  # type: ignore[return-value]
        seen = seen.__cause__ or seen.__context__
    return None


def format_adapter(counts: FormatCounts, program_outputs: frozenset[str] | None = None) -> Any:
    """DSPy's ChatAdapter (with its JSON fallback) that counts malformed answers into `counts` and
    resamples those of the optimizer's own steps: a signature whose outputs are none of the
    program's (`program_outputs`; None: the trial has no teacher, so nothing is resampled). Known by
    the step, not by the LM object: optimizers call copies of the teacher LM (a new temperature)."""
    from dspy.adapters.chat_adapter import ChatAdapter
    from dspy.utils.exceptions import AdapterParseError

    class FormatAdapter(ChatAdapter):
        def __call__(self, lm: Any, lm_kwargs: dict, signature: Any, demos: list, inputs: dict) -> list:
            teaching = program_outputs is not None and not program_outputs & set(signature.output_fields)
            tries = 1 + (TEACHER_RETRIES if teaching else 0)
            for attempt in range(tries):
                try:
                    return super().__call__(lm, _fresh(lm, lm_kwargs, attempt), signature, demos, inputs)
                except AdapterParseError as exc:
                    counts.add(failures=1, teacher_retries=int(attempt + 1 < tries))
                    if attempt + 1 < tries:
                        continue
                    if teaching and (text := as_text(signature, exc.lm_response)) is not None:
                        counts.add(teacher_as_text=1)
                        return [text]
                    raise
                except Exception as exc:
                    if (stop := ending(exc)) is not None:
                        raise SweepStop(stop) from exc
                    raise
            raise AssertionError("unreachable: the last try returns or raises")

        def _make_json_adapter_fallback(self) -> Any:
            counts.add(fallback_calls=1)
            return super()._make_json_adapter_fallback()

    return FormatAdapter()


MARKER = re.compile(r"^\s*\[\[ ## [^#]+ ## \]\]\s*$", re.MULTILINE)  # ChatAdapter's field headers


def as_text(signature: Any, response: Any) -> dict[str, str] | None:
    """A malformed answer as the value of a signature's one text output, its field markers dropped;
    None when the signature asks for more (or other) than one text, or the answer holds none."""
    outputs = list(signature.output_fields.items())
    if len(outputs) != 1 or outputs[0][1].annotation is not str or not isinstance(response, str):
        return None
    text = MARKER.sub("", response).strip()
    return {outputs[0][0]: text} if text else None


def _fresh(lm: Any, lm_kwargs: dict, attempt: int) -> dict:
    """The call's settings for its `attempt`-th resample (the first try is left as it is)."""
    if not attempt:
        return dict(lm_kwargs)  # the adapter pops keys from what it is given
    temperature = max(lm_kwargs.get("temperature", lm.kwargs.get("temperature")) or 0.0, FRESH_TEMPERATURE)
    return {**lm_kwargs, "temperature": temperature, "seed": 1_000 + attempt}
