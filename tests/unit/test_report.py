"""`sweep plan`'s estimates: calls and dollars per trial, priced from LiteLLM's price map."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from dspy_sweeps.cli.tables import plan_table
from dspy_sweeps.spec.preflight import prepare
from dspy_sweeps.spec.schema import load_sweep


def rendered(path: Path) -> str:
    out = io.StringIO()
    Console(file=out, width=250).print(plan_table(prepare(load_sweep(path))))
    return out.getvalue()


def test_a_cloud_teacher_is_priced_and_the_simulator_is_free(
    sweep_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    free = rendered(sweep_file())
    assert "$0.00 in all" in free
    priced = rendered(sweep_file({"teachers": [{"name": "mini", "model": "openai/gpt-4o-mini"}]}))
    total = float(priced.split(" LM calls and $")[1].split(" in all")[0].replace(",", ""))
    assert total > 0


def test_a_model_missing_from_the_price_map_is_unknown_not_free(
    sweep_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_KEY", "x")
    text = rendered(
        sweep_file({"teachers": [{"name": "odd", "model": "openai/no-such-model-xyz", "api_key_env": "MY_KEY"}]})
    )
    assert "? in all" in text
