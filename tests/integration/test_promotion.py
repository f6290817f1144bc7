"""Promotion against a real `mlflow server`: concurrent promotions settle on the better program,
a retried promotion registers nothing twice, and pulled artifacts cannot choose the endpoint."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from dspy_sweeps.spec.schema import Promote
from dspy_sweeps.track.registry import _register, load_pulled, promote, pull
from dspy_sweeps.track.results import TrialRecord

pytestmark = pytest.mark.slow


def candidate(tmp_path: Path, uri: str, name: str, test_score: float) -> tuple[TrialRecord, str, object]:
    """A trial's record, its MLflow run (with the program artifacts) and the program itself."""
    import dspy
    from mlflow.tracking import MlflowClient

    from pipelines.arith import Solve

    program = Solve()
    program.solve.predict.demos = [dspy.Example(question=f"{name}?", reasoning="r", answer=str(test_score))]
    program_json = json.dumps(program.dump_state(), sort_keys=True, default=str)
    path = tmp_path / f"{name}.json"
    path.write_text(program_json)
    client = MlflowClient(uri)
    local = None if uri.startswith("http") else (tmp_path / "mlartifacts").as_uri()  # not ./mlruns in the repo
    experiment = client.get_experiment_by_name("promotion") or client.get_experiment(
        client.create_experiment("promotion", local)
    )
    run_id = client.create_run(experiment.experiment_id, run_name=name).info.run_id
    client.log_text(run_id, program_json, "program/program.json")
    meta = {
        "program": "pipelines.arith:Solve",
        "student": {"name": "small", "model": "sim/student"},
        "sweep": name,
        "inputs": ["question"],
    }
    client.log_dict(run_id, meta, "program/metadata.json")
    record = TrialRecord(
        sweep=name,
        trial_id=name,
        kind="bootstrap_fewshot",
        settings="{}",
        student="sim/student",
        teacher=None,
        seed=0,
        status="ok",
        error=None,
        reason=None,
        val_score=test_score,
        test_score=test_score,
        lm_calls=1,
        calls_requested=1,
        cache_hits=0,
        merged_calls=0,
        failed_calls=0,
        failed_examples=0,
        estimated_calls=1,
        prompt_tokens=1,
        completion_tokens=1,
        latency_s=0.0,
        cost_usd=0.0,
        duration_s=0.0,
        program_path=str(path),
        data_fingerprint="fp",
    )
    return record, run_id, program


def never_rescored(program_json: str) -> float:
    raise AssertionError("same data fingerprint: the champion's recorded score is used")


@pytest.mark.reliability
@pytest.mark.parametrize("better_first", [True, False])
def test_concurrent_promotions_end_with_the_better_program(
    mlflow_server: str, tmp_path: Path, better_first: bool, reliability
) -> None:
    from mlflow.tracking import MlflowClient

    model = f"race-{uuid.uuid4().hex[:8]}"
    gate = Promote(model=model)
    first = candidate(tmp_path, mlflow_server, "base", 0.5)
    assert promote(gate, *first, mlflow_server, never_rescored).promoted
    better, worse = candidate(tmp_path, mlflow_server, "better", 0.8), candidate(tmp_path, mlflow_server, "worse", 0.6)
    order = [(better, 0.0), (worse, 0.3)] if better_first else [(worse, 0.0), (better, 0.3)]
    decisions, errors = {}, []

    def promote_after(entry, delay: float) -> None:
        time.sleep(delay)
        try:
            decisions[entry[0].trial_id] = promote(gate, *entry, mlflow_server, never_rescored)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote_after, args=pair) for pair in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias(model, "champion")
    versions = len(client.search_model_versions(f"name = '{model}'"))
    reliability(
        "two sweeps promoting at once (mlflow server)",
        runs=1,
        faults_injected=1,
        faults_survived=int(not errors and champion.tags["trial"] == "better"),
        duplicate_versions=versions - 3,
        promotions=3,
        versions_created=versions,
    )
    assert errors == []
    assert champion.tags["trial"] == "better"
    assert versions == 3  # one version per promotion
    assert decisions["better"].promoted


def test_a_retried_promotion_registers_one_version(mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    model = f"retry-{uuid.uuid4().hex[:8]}"
    record, run_id, program = candidate(tmp_path, mlflow_server, "retried", 0.7)
    versions = {_register(model, record, run_id, program, "sha", mlflow_server, gate="passed") for _ in range(2)}
    assert len(versions) == 1
    assert len(MlflowClient(mlflow_server).search_model_versions(f"name = '{model}'")) == 1


def test_a_pulled_program_never_takes_its_endpoint_from_the_artifact(mlflow_server: str, tmp_path: Path) -> None:
    import dspy
    from mlflow.tracking import MlflowClient

    model = f"untrusted-{uuid.uuid4().hex[:8]}"
    record, run_id, program = candidate(tmp_path, mlflow_server, "planted", 0.9)
    program.solve.predict.lm = dspy.LM("openai/evil", api_base="http://203.0.113.9:1/v1", api_key="x")
    MlflowClient(mlflow_server).log_text(run_id, json.dumps(program.dump_state(), default=str), "program/program.json")
    assert promote(Promote(model=model), record, run_id, program, mlflow_server, never_rescored).promoted
    folder = pull(f"{model}@champion", tmp_path / "pulled", mlflow_server)
    assert "203.0.113.9" in (folder / "program.json").read_text()  # the planted endpoint is in the artifact
    loaded = load_pulled(folder, api_base="http://127.0.0.1:8000/v1")
    lm = loaded.solve.predict.lm
    assert lm.model == "openai/student" and "203.0.113.9" not in json.dumps(lm.dump_state(), default=str)


class _Payload:
    """Unpickling this runs a shell command: what a tampered registry artifact could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.reliability
def test_pull_and_load_never_unpickle_a_tampered_artifact(mlflow_server: str, tmp_path: Path, reliability) -> None:
    import pickle

    from mlflow.tracking import MlflowClient

    client, model, marker = MlflowClient(mlflow_server), f"tampered-{uuid.uuid4().hex[:8]}", tmp_path / "payload-ran"
    record, run_id, program = candidate(tmp_path, mlflow_server, "tampered", 0.9)
    assert promote(Promote(model=model), record, run_id, program, mlflow_server, never_rescored).promoted
    payloads = tmp_path / "payloads"
    (payloads / "data").mkdir(parents=True)
    for path in (payloads / "program.pkl", payloads / "data" / "model.pkl", payloads / "data" / "dspy_config.pkl"):
        path.write_bytes(pickle.dumps(_Payload(marker)))
    client.log_artifact(run_id, str(payloads / "program.pkl"), "program")  # beside program.json
    client.log_artifacts(run_id, str(payloads), "model")  # over mlflow.dspy's own pickles
    folder = pull(f"{model}@champion", tmp_path / "pulled", mlflow_server)
    loaded = load_pulled(folder, api_base="http://127.0.0.1:8000/v1")
    executed = int(marker.exists())
    reliability(
        "untrusted registry: pickled payloads in the artifacts",
        runs=1,
        faults_injected=3,
        faults_survived=3 * (1 - executed),
        payloads_executed=executed,
    )
    assert not marker.exists(), "pull/load unpickled an artifact"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "program.json"]
    assert loaded.solve.predict.demos[0]["answer"] == "0.9"  # the program itself came back


@pytest.mark.reliability
def test_promotion_survives_a_tracking_server_restart(
    tmp_path: Path, reliability, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    # MLflow's client retries with exponential back-off (up to minutes by default); shorter steps
    # and more of them keep this test quick while covering the same restart.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "10")
    from conftest import MlflowServer
    from mlflow.tracking import MlflowClient

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    model = f"restart-{uuid.uuid4().hex[:8]}"
    entry = candidate(tmp_path, server.url, "restarted", 0.7)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_promote_or_error(model, entry, server.url)))
    try:
        thread.start()
        time.sleep(1.0)
        server.stop(signal.SIGKILL)  # the server dies mid-promotion ...
        time.sleep(3.0)
        server.start()  # ... and comes back on the same port and store
        back = time.monotonic()
        thread.join(timeout=300)
        recovery_s = time.monotonic() - back  # from the server's return to the promotion's end
        versions = MlflowClient(server.url).search_model_versions(f"name = '{model}'")
        survived = bool(outcome) and not isinstance(outcome[0], Exception) and len(versions) == 1
        if survived:
            pull(f"{model}@champion", tmp_path / "pulled", server.url)  # its artifacts are there
        reliability(
            "MLflow server killed and restarted during promotion",
            runs=1,
            faults_injected=1,
            faults_survived=int(survived),
            duplicate_versions=max(len(versions) - 1, 0),
            promotions=1,
            versions_created=len(versions),
            recovery_s=recovery_s,
        )
        assert outcome and not isinstance(outcome[0], Exception), outcome
        assert len(versions) == 1, "never two versions for one promotion"
        assert (tmp_path / "pulled" / "program.json").is_file(), "never a version without its artifacts"
    finally:
        server.stop()


@pytest.mark.reliability
def test_an_unwritable_artifact_store_fails_cleanly_and_registers_nothing(tmp_path: Path, reliability) -> None:
    from mlflow.tracking import MlflowClient

    from dspy_sweeps.errors import SweepError

    uri, model = f"sqlite:///{tmp_path}/mlflow.db", f"unwritable-{uuid.uuid4().hex[:8]}"
    (tmp_path / "store").write_text("a file where the artifact folder should be")  # root ignores file modes
    client = MlflowClient(uri)
    experiment = client.create_experiment("unwritable", artifact_location=(tmp_path / "store" / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="unwritable").info.run_id
    record, _, program = candidate(tmp_path, uri, "unwritable", 0.7)
    with pytest.raises(SweepError) as error:
        promote(Promote(model=model), record, run_id, program, uri, never_rescored)
    versions = client.search_model_versions(f"name = '{model}'")
    clean = len(str(error.value).splitlines()) == 1 and "nothing was registered" in str(error.value)
    reliability(
        "artifact store unwritable during promotion",
        runs=1,
        faults_injected=1,
        faults_survived=int(clean and not versions),
        duplicate_versions=len(versions),
        promotions=1,
        versions_created=len(versions),
    )
    assert clean, str(error.value)
    assert versions == [], "never a registered version without its artifacts"


def _promote_or_error(model: str, entry: tuple, uri: str) -> object:
    try:
        return promote(Promote(model=model), *entry, uri, never_rescored)
    except Exception as exc:
        return exc
