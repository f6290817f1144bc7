"""What a sweep leaves in MLflow 3 and W&B, read back with their own clients, not the project's:
one sweep (the demo's baseline and one BootstrapFewShot trial over the 30-row corpus) tracking to
a real `mlflow server` on loopback, W&B offline.

- the trial runs' dataset inputs (train/val/test, digest = the data fingerprint, context = split);
- one LoggedModel per finished trial with its val and test scores as metrics;
- the registered `@champion` version created from one of them (`model_id`, `models:/m-...`);
- traces of the champion's test evaluation, with its LM calls as spans;
- `mlflow.genai.load_prompt("prompts:/MODEL.solve.predict@champion")` is the champion's instruction;
- the W&B offline runs: each trial's program as a `dspy-program` artifact, the data artifact used
  by the trial runs, the champion's version aliased `champion`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from sweep_helpers import sweep_cli
from wandb_reader import read_runs

REPO = Path(__file__).resolve().parents[2]
MODEL = "m3demo"
EXPERIMENT = "m3"
TRACES = 2  # test examples traced per trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, corpus: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mlflow3")
    raw = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    raw["data"].update(source=str(corpus), split={"train": 10, "val": 10, "test": 10})
    raw["optimizers"] = [{"kind": "bootstrap_fewshot", "max_bootstrapped_demos": 2}]
    raw["promote"]["model"] = MODEL
    # This module reads back what a promotion registers, not the gate (tests/unit/test_gate.py): on
    # ten test rows a gain over the baseline is within noise, so the first version would be a challenger.
    raw["promote"]["min_gain"] = -1.0
    raw["tracking"]["mlflow"] = {"experiment": EXPERIMENT, "tracking_uri": mlflow_server, "traces": TRACES}
    sweep = root / "m3.yaml"
    sweep.write_text(yaml.safe_dump(raw, sort_keys=False))
    state = root / "state"
    done = sweep_cli("run", str(sweep), state=state)
    assert done.returncode == 0, done.stderr[-3000:]
    records = pq.read_table(state / "results" / "demo.parquet").to_pylist()
    yield {"uri": mlflow_server, "state": state, "records": records, "corpus": corpus}


@pytest.fixture(scope="module")
def client(swept: dict):
    from mlflow import MlflowClient

    return MlflowClient(swept["uri"])


@pytest.fixture(scope="module")
def experiment_id(client) -> str:
    return client.get_experiment_by_name(EXPERIMENT).experiment_id


@pytest.fixture(scope="module")
def champion(client):
    return client.get_model_version_by_alias(MODEL, "champion")


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """The calls a user makes (`mlflow.genai.load_prompt`, `mlflow.dspy.load_model`) read MLflow's
    process-wide URI; it is set for them only, and $MLFLOW_TRACKING_URI restored after."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets $MLFLOW_TRACKING_URI again


def finished(swept: dict) -> list[dict]:
    return [r for r in swept["records"] if r["status"] == "ok"]


def test_trial_runs_have_the_splits_as_dataset_inputs(swept: dict, client, experiment_id: str) -> None:
    runs = client.search_runs([experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.info.run_name for r in trials} == {r["trial_id"] for r in swept["records"]}
    fingerprint = swept["records"][0]["data_fingerprint"]
    for run in runs:  # the parent run and every trial run
        inputs = {
            (d.dataset.name, d.dataset.digest) + tuple(t.value for t in d.tags) for d in run.inputs.dataset_inputs
        }
        assert inputs == {(f"demo-{s}", fingerprint, s) for s in ("train", "val", "test")}, run.info.run_name
        source = json.loads(run.inputs.dataset_inputs[0].dataset.source)
        assert source == {"uris": [swept["corpus"].as_uri()], "query": "SELECT question, answer FROM corpus"}


def test_one_logged_model_per_finished_trial_with_its_scores(swept: dict, client, experiment_id: str) -> None:
    models = {m.name: m for m in client.search_logged_models([experiment_id])}
    assert sorted(models) == sorted(r["trial_id"] for r in finished(swept)) and len(models) == 2
    for record in finished(swept):
        metrics = {m.key: m for m in models[record["trial_id"]].metrics}
        assert metrics["val_score"].value == pytest.approx(record["val_score"])
        assert metrics["test_score"].value == pytest.approx(record["test_score"])
        assert metrics["test_score"].dataset_name == "demo-test" and metrics["val_score"].dataset_name == "demo-val"
        assert models[record["trial_id"]].source_run_id == record["mlflow_run_id"]


def champion_model_id(champion) -> str:
    """The version's LoggedModel: its source is `models:/m-...` (OSS MLflow 3.17's registry returns
    no `model_id` field on a version; the source and the LoggedModel's tag carry the link)."""
    assert champion.source.startswith("models:/m-")
    return champion.source.removeprefix("models:/")


def test_the_champion_version_is_registered_from_its_logged_model(
    swept: dict, client, experiment_id: str, champion
) -> None:
    import mlflow.dspy

    model_id = champion_model_id(champion)
    assert champion.model_id in (None, model_id) and champion.tags["model_id"] == model_id
    assert model_id in {m.model_id for m in client.search_logged_models([experiment_id])}
    model = client.get_logged_model(model_id)
    assert model.name == champion.tags["trial"] and model.source_run_id == champion.run_id
    listed = [(v["name"], str(v["version"])) for v in json.loads(model.tags["mlflow.modelVersions"])]
    assert listed == [(MODEL, str(champion.version))]
    # MLflow's own loader follows the alias to the LoggedModel's artifacts (it unpickles: MLflow's path, not pull's).
    with global_tracking_uri(swept["uri"]):
        assert hasattr(mlflow.dspy.load_model(f"models:/{MODEL}@champion"), "solve")


def test_traces_of_the_champions_test_evaluation(client, experiment_id: str, champion) -> None:
    traces = client.search_traces(locations=[experiment_id], model_id=champion_model_id(champion))
    assert len(traces) == TRACES
    for trace in traces:
        assert trace.info.trace_metadata["mlflow.sourceRun"] == champion.run_id
        root, *calls = trace.data.spans
        assert set(root.outputs) == {"prediction", "gold", "score"} and "question" in root.inputs
        assert calls and all(c.span_type == "CHAT_MODEL" for c in calls)
        assert {c.attributes["gateway.served"] for c in calls} <= {"sent", "cached", "merged"}  # never "unknown"
        usage = calls[0].attributes["mlflow.chat.tokenUsage"]
        assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
        assert calls[0].inputs["messages"][-1]["content"].count(root.inputs["question"]) == 1


def test_the_prompt_registry_holds_the_champions_instruction(swept: dict, client, champion) -> None:
    import mlflow.genai

    from dspy_sweeps.track.registry import pull

    program = json.loads(
        (pull(f"{MODEL}@champion", swept["state"] / "pulled", swept["uri"]) / "program.json").read_text()
    )
    instruction = program["solve.predict"]["signature"]["instructions"]
    uri = f"prompts:/{MODEL}.solve.predict@champion"
    assert client.load_prompt(uri).template.startswith(instruction)
    with global_tracking_uri(swept["uri"]):
        prompt = mlflow.genai.load_prompt(uri, link_to_model=False)
    assert prompt.template.startswith(instruction) and prompt.tags["trial"] == champion.tags["trial"]


def test_wandb_offline_runs_hold_the_program_artifacts_and_their_data(swept: dict, champion) -> None:
    runs = {r.name: r for r in read_runs(swept["state"] / "wandb" / "wandb")}
    for record in finished(swept):
        run = runs[record["trial_id"]]
        (program,) = [a for a in run.artifacts if a.type == "dspy-program"]
        assert program.name == "demo-program" and record["trial_id"] in program.aliases
        assert program.files["program.json"].read_text() == Path(record["program_path"]).read_text()
        (data,) = [a for a in run.artifacts if a.type == "dataset"]
        assert (
            data.used
            and json.loads(data.files["data.json"].read_text())["data_fingerprint"] == (record["data_fingerprint"])
        )
    promoted = [a for a in runs["demo-sweep"].artifacts if a.type == "dspy-program"]
    assert [sorted(a.aliases) for a in promoted] == [sorted(["champion", champion.tags["trial"], "latest"])]
    by_trial = {a.digest for a in runs[champion.tags["trial"]].artifacts if a.type == "dspy-program"}
    assert {promoted[0].digest} == by_trial  # the same W&B version, now aliased champion
