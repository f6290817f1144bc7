"""W&B online but unreachable: the logger falls back to offline runs, and stops trying online."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import ModelSpec, WandbSpec
from dspy_sweeps.state import State
from dspy_sweeps.track.results import TrialRecord
from dspy_sweeps.track.wandb_runs import WandbLogger

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def test_unreachable_online_wandb_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(WandbLogger, "ONLINE_TIMEOUT_S", 5)
    logger = WandbLogger(WandbSpec(mode="online"), "demo", State(tmp_path))
    student = ModelSpec(name="small", model="sim/student")
    trial = Trial("none-small-s0-x", "pipelines.arith:Solve", "pipelines.arith:exact_match", "none", student, None, 0)
    result = TrialResult(trial.id, "ok", val_score=0.5, test_score=0.5)
    record = TrialRecord.of("demo", trial, result, None, "fp")
    logger.log_trial(trial, record, result)
    logger.log_trial(trial, record, result)  # the second run goes straight to offline
    offline_runs = len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*")))
    assert logger.mode == "offline"
    assert offline_runs == 2
