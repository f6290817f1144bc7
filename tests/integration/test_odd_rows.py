"""Valid but odd rows (100,000 characters, right-to-left, emoji, control characters) survive the
way through DuckDB, a DSPy prompt, the W&B predictions table and the MLflow program artifact."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from dspy_sweeps.data import load_dataset
from dspy_sweeps.run.trial import TrialResult
from dspy_sweeps.spec.plan import Trial
from dspy_sweeps.spec.schema import DataSpec, MlflowSpec, ModelSpec, Sweep, WandbSpec
from dspy_sweeps.state import State
from dspy_sweeps.track.mlflow_runs import MlflowLogger
from dspy_sweeps.track.results import TrialRecord
from dspy_sweeps.track.wandb_runs import WandbLogger

pytestmark = pytest.mark.reliability

ODD = [
    "x" * 100_000,
    "כמה זה שלוש ועוד ארבע? ‏(שאלה)",  # right to left, with a right-to-left mark
    "🧮 2 + 2 = ? 👩🏽‍💻 ½ ∑ 𝔸",
    "tab\tnew\nline \\ \"quotes\" 'single' <b>html</b> ${NOT_A_VAR} {braces}",
]


@pytest.fixture
def odd_data(tmp_path: Path) -> Path:
    path = tmp_path / "odd.parquet"
    pl.DataFrame({"question": ODD * 3, "answer": [str(i) for i in range(12)]}).write_parquet(path)
    return path


def test_odd_rows_round_trip_through_data_prompts_and_tracking(odd_data: Path, tmp_path: Path) -> None:
    import dspy

    data = load_dataset(DataSpec(source=str(odd_data), inputs=["question"], split={"train": 4, "val": 4, "test": 4}))
    questions = {row["question"] for row in data.rows}
    assert questions == set(ODD), "DuckDB returns the rows byte for byte"

    messages = dspy.ChatAdapter().format(dspy.Signature("question -> answer"), demos=[], inputs={"question": ODD[1]})
    assert ODD[1] in messages[-1]["content"]

    predictions = [
        {"inputs": {"question": q}, "prediction": {"answer": q[:50]}, "gold": {"answer": "1"}, "score": 0.0}
        for q in ODD
    ]
    program = json.dumps({"solve.predict": {"demos": [{"question": q, "answer": "1"} for q in ODD], "lm": None}})
    student = ModelSpec(name="small", model="sim/student")
    trial = Trial(
        "gepa-odd",
        "pipelines.arith:Solve",
        "pipelines.arith:exact_match",
        "gepa",
        student,
        None,
        0,
        settings={"note": ODD[2], "long": ODD[0][:10_000]},
    )
    result = TrialResult(trial.id, "ok", val_score=0.0, test_score=0.0, program=program, predictions=predictions)
    record = TrialRecord.of("odd", trial, result, None, "fp")
    state = State(tmp_path / "state")

    WandbLogger(WandbSpec(mode="offline"), "odd", state).log_trial(trial, record, result)
    tables = list((state.wandb / "wandb").glob("offline-run-*/files/media/table/*.json"))
    assert len(tables) == 1
    rows = json.loads(tables[0].read_text())["data"]
    assert [json.loads(row[0])["question"] for row in rows] == ODD

    sweep = Sweep.model_validate(
        {
            "name": "odd",
            "program": "pipelines.arith:Solve",
            "metric": "pipelines.arith:exact_match",
            "data": {"source": str(odd_data), "inputs": ["question"], "split": {"train": 4, "val": 4, "test": 4}},
            "students": [student.model_dump()],
            "optimizers": [{"kind": "gepa"}],
        }
    )
    mlflow = MlflowLogger(MlflowSpec(), sweep, state, "fp")
    run_id = mlflow.log_trial(trial, record, result)
    params = mlflow.client.get_run(run_id).data.params
    assert params["settings.note"] == ODD[2], "short odd values are kept exactly"
    assert len(params["settings.long"]) <= 6000, "long values are cut to MLflow's parameter limit"
    downloaded = Path(mlflow.client.download_artifacts(run_id, "program/program.json", str(tmp_path / "dl")))
    assert downloaded.read_text() == program
