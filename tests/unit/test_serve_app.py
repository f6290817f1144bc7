"""Pure parts of `sweep serve`: which HTTP status each kind of failed prediction gets, the fields
generated from a program's signature, what a request spent, and Ray Serve replica options."""

from __future__ import annotations

import pytest


def _raised_from(error: Exception, cause: BaseException) -> Exception:
    try:
        raise error from cause
    except Exception as exc:
        return exc


def failures() -> list[tuple[Exception, int, str]]:
    import dspy
    from dspy.utils.exceptions import (
        AdapterParseError,
        LMAuthError,
        LMRateLimitError,
        LMServerError,
        LMTimeoutError,
        LMTransportError,
    )

    read_timeout = _raised_from(LMTransportError("read timed out"), TimeoutError("timed out"))
    return [
        (LMRateLimitError("slow down", retry_after=2.0), 503, "rate_limited"),
        (LMTimeoutError("provider timed out"), 504, "timed_out"),
        (read_timeout, 504, "timed_out"),
        (LMTransportError("connection refused"), 502, "endpoint_down"),
        (LMServerError("500"), 502, "endpoint_down"),
        (LMAuthError("bad key"), 502, "endpoint_error"),
        (
            AdapterParseError(adapter_name="ChatAdapter", signature=dspy.Signature("q -> a"), lm_response="noise"),
            502,
            "unparseable_answer",
        ),
        (ValueError("a bug in the program"), 500, "program_error"),
    ]


@pytest.mark.parametrize("index", range(8))
def test_each_kind_of_failure_gets_its_status(index: int) -> None:
    from dspy_sweeps.serve.app import failure

    error, status, kind = failures()[index]
    got = failure(error)
    assert (got.status, got.kind) == (status, kind)
    assert got.retry_after == (2.0 if kind == "rate_limited" else None)


def test_the_request_and_response_fields_come_from_the_signature() -> None:
    from dspy_sweeps.serve.program import signature_fields
    from pipelines.arith import Solve

    inputs, outputs = signature_fields(Solve(), ["question"])
    assert inputs == {"question": str}
    assert list(outputs) == ["reasoning", "answer"]


def test_usage_adds_up_the_requests_own_history() -> None:
    from dspy_sweeps.serve.app import usage_of

    history = [
        {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "cost": None},
        {"usage": {"prompt_tokens": 7, "completion_tokens": 3}, "cost": 0.25},
    ]
    usage = usage_of(history)
    assert (usage.lm_calls, usage.prompt_tokens, usage.completion_tokens, usage.cost_usd) == (2, 17, 8, 0.25)


def test_replicas_are_fixed_or_autoscaled() -> None:
    from dspy_sweeps.serve.ray_serve import Replicas

    assert Replicas().options() == {"num_replicas": 1}
    assert Replicas(num=3).options() == {"num_replicas": 3}
    assert Replicas(min=0, max=4).options() == {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}}
    assert Replicas(max=2).options()["autoscaling_config"]["min_replicas"] == 1


def test_a_served_request_leaves_no_trace_of_its_inputs_in_the_process() -> None:
    """DSPy's process-wide trace would keep the last 10,000 requests' inputs and answers in the
    service's memory; each request's trace is its own and goes with it."""
    import dspy
    from dspy.utils.dummies import DummyLM

    from dspy_sweeps.serve.app import predict_once
    from dspy_sweeps.serve.program import LoadedProgram
    from dspy_sweeps.spec.schema import ModelSpec

    served = LoadedProgram(
        name="demo",
        version="1",
        program=dspy.Predict("question -> answer"),
        lm=DummyLM([{"answer": "60"}] * 3),
        student=ModelSpec(name="small", model="openai/small", api_base="http://127.0.0.1:9/v1"),
        inputs={"question": str},
        outputs={"answer": str},
    )
    traced = len(dspy.settings.trace)
    answers = [predict_once(served, {"question": f"a private question {i}"}) for i in range(3)]
    assert [a.outputs for a in answers] == [{"answer": "60"}] * 3
    assert len(dspy.settings.trace) == traced
