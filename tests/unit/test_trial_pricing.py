"""A trial's live spend: its cloud models priced from LiteLLM's map as calls land, and nothing asked of
LiteLLM per call about a model it cannot price (it printed its provider list to the host's log on every
call of the simulated demo, and that lookup took half a trial host's CPU in a cached re-run)."""

from __future__ import annotations

import litellm
import pytest

from dspy_sweeps.run.progress import Splits, TrialProgress, TrialStream
from dspy_sweeps.run.worker import priced
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import ModelSpec

SIM = ModelSpec(name="small", model="sim/student")
SERVED = ModelSpec(name="vllm", model="openai/llama", api_base="http://127.0.0.1:9/v1")


def trial(student: ModelSpec, teacher: ModelSpec | None) -> Trial:
    return Trial("t", "pipelines.arith:Solve", "pipelines.arith:exact_match", "gepa", student, teacher, 0)


def progress(models: frozenset[str]) -> TrialProgress:
    stream = TrialStream("t", lambda event: None)
    return TrialProgress(stream, stream.spend, Splits.of([], []), models)


def test_a_cloud_teacher_is_priced_from_litellms_map_as_its_calls_land() -> None:
    models = priced(trial(SIM, ModelSpec(name="mini", model="openai/gpt-4o-mini")))
    assert models == {"openai/gpt-4o-mini"}
    meter = progress(models)
    meter.add_usage("openai/gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 100})
    meter.add_usage("sim/student", {"prompt_tokens": 1000, "completion_tokens": 100})
    expected = sum(litellm.cost_per_token(model="openai/gpt-4o-mini", prompt_tokens=1000, completion_tokens=100))
    assert meter.spend.cost_usd == pytest.approx(expected) and expected > 0
    assert (meter.spend.calls, meter.spend.tokens) == (2, 2200)


@pytest.mark.parametrize(
    "teacher",
    [
        ModelSpec(name="sim", model="sim/teacher"),  # the simulator's plugin: a local endpoint
        SERVED,  # self-hosted: its cost is busy time, known at the end
        ModelSpec(name="odd", model="acme-unknown/some-model"),  # a provider LiteLLM does not know
    ],
    ids=["plugin", "self-hosted", "unknown-provider"],
)
def test_a_model_litellm_cannot_price_is_free_per_call_and_never_asked_about_per_call(
    teacher: ModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    models = priced(trial(SIM, teacher))
    capsys.readouterr()  # the one lookup per trial may print; the calls after it must not
    meter = progress(models)
    for _ in range(3):
        meter.add_usage(teacher.model, {"prompt_tokens": 500, "completion_tokens": 50})
    assert models == frozenset() and meter.spend.cost_usd == 0.0 and meter.spend.calls == 3
    assert capsys.readouterr().out == ""
