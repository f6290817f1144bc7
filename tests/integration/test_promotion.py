"""Promotion against a real `mlflow server`: concurrent promotions settle on the better program,
a gain within its interval promotes nothing, simulated and real programs are never compared, a
retried promotion registers nothing twice, and pulled artifacts cannot choose the endpoint."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path

import pytest

from dspy_sweeps.spec.schema import Promote
from dspy_sweeps.track.registry import Registration, _register, load_pulled, promote, pull
from dspy_sweeps.track.results import TrialRecord

pytestmark = pytest.mark.slow


def nested_scores(test_score: float, n: int = 100) -> list[float | None]:
    """Per-example test scores: the first `test_score * n` examples right, so a higher-scoring
    candidate is right wherever a lower one is (its paired gain is all wins)."""
    right = round(test_score * n)
    return [1.0] * right + [0.0] * (n - right)


def candidate(
    tmp_path: Path,
    uri: str,
    name: str,
    test_score: float,
    *,
    simulated: bool = True,
    test_scores: list[float | None] | None = None,
) -> tuple[TrialRecord, str, object]:
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
        "student": {"name": "small", "model": "sim/student" if simulated else "openai/student"},
        "sweep": name,
        "inputs": ["question"],
    }
    client.log_dict(run_id, meta, "program/metadata.json")
    record = TrialRecord(
        sweep=name,
        trial_id=name,
        kind="bootstrap_fewshot",
        settings="{}",
        student="small",
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
        student_model="sim/student" if simulated else "openai/student",
        student_simulated=simulated,
        test_scores=test_scores if test_scores is not None else nested_scores(test_score),
    )
    return record, run_id, program


def never_rescored(program_json: str) -> list[float | None]:
    raise AssertionError("same data fingerprint: the champion's recorded per-example scores are used")


@pytest.mark.reliability
@pytest.mark.parametrize("better_settles_first", [True, False])
def test_concurrent_promotions_end_with_the_better_program(
    mlflow_server: str, tmp_path: Path, better_settles_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from dspy_sweeps.track import registry

    model = f"race-{uuid.uuid4().hex[:8]}"
    gate = Promote(model=model)
    first = candidate(tmp_path, mlflow_server, "base", 0.5)
    assert promote(gate, *first, mlflow_server, never_rescored).promoted
    better, worse = candidate(tmp_path, mlflow_server, "better", 0.8), candidate(tmp_path, mlflow_server, "worse", 0.6)
    # Both promotions read the old champion before either registers (the barrier), and one of them
    # settles only after the other has: the compare-and-set, not luck, must pick the better program.
    both_read_the_champion = threading.Barrier(2, timeout=120)
    settled: dict[str, threading.Event] = {"better": threading.Event(), "worse": threading.Event()}
    last = "worse" if better_settles_first else "better"
    real_register, real_settle = registry._register, registry._settle

    def register_after_both_read(*args, **kwargs) -> str:
        both_read_the_champion.wait()
        return real_register(*args, **kwargs)

    def settle_in_order(*args, **kwargs) -> str:
        me = threading.current_thread().name
        if me == last:
            assert settled["worse" if me == "better" else "better"].wait(120)
        try:
            return real_settle(*args, **kwargs)
        finally:
            settled[me].set()

    monkeypatch.setattr(registry, "_register", register_after_both_read)
    monkeypatch.setattr(registry, "_settle", settle_in_order)
    decisions, errors = {}, []

    def promote_one(entry) -> None:
        try:
            decisions[entry[0].trial_id] = promote(gate, *entry, mlflow_server, never_rescored)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote_one, args=(e,), name=e[0].trial_id) for e in (better, worse)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias(model, "champion")
    versions = len(client.search_model_versions(f"name = '{model}'"))
    assert errors == []
    assert all("over champion v1" in d.reason for d in decisions.values()), "both compared with the old champion"
    assert champion.tags["trial"] == "better"
    assert versions == 3  # one version per promotion
    assert decisions["better"].promoted
    if better_settles_first:  # the worse one settles last, and finds the better one holding the alias
        assert not decisions["worse"].promoted and "promoted meanwhile, scores higher" in decisions["worse"].reason


def test_a_gain_within_its_interval_promotes_nothing(mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    model = f"noise-{uuid.uuid4().hex[:8]}"
    base = nested_scores(0.5)
    base_entry = candidate(tmp_path, mlflow_server, "base", 0.5)
    assert promote(Promote(model=model), *base_entry, mlflow_server, never_rescored).promoted
    # +0.04 on 100 examples: right on 7 the champion missed, wrong on 3 it got.
    noisy = [1.0 - s if i in (60, 61, 62, 63, 64, 65, 66, 0, 1, 2) else s for i, s in enumerate(base)]
    challenger = candidate(tmp_path, mlflow_server, "lucky", 0.54, test_scores=noisy)
    decision = promote(Promote(model=model), *challenger, mlflow_server, never_rescored)
    assert not decision.promoted, decision.reason
    assert decision.gain.value == pytest.approx(0.04) and decision.gain.low < 0 < decision.gain.high
    assert f"gain {decision.gain.signed()} over champion v1 on 100 test examples" in decision.reason
    assert "the gain is within noise" in decision.reason
    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(model, "champion").version == "1"
    registered = client.get_model_version_by_alias(model, "challenger")
    assert registered.tags["gain"] == decision.gain.signed() and registered.tags["gate"] == "challenger"


def test_simulated_and_real_programs_are_never_compared(mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    for champion_simulated in (False, True):
        model = f"mixed-{uuid.uuid4().hex[:8]}"
        held = candidate(tmp_path, mlflow_server, f"held-{champion_simulated}", 0.5, simulated=champion_simulated)
        assert promote(Promote(model=model), *held, mlflow_server, never_rescored).promoted
        challenger = candidate(tmp_path, mlflow_server, "far-better", 0.95, simulated=not champion_simulated)
        decision = promote(Promote(model=model), *challenger, mlflow_server, never_rescored)
        assert not decision.promoted and decision.simulated is not champion_simulated
        assert len(decision.reason.splitlines()) == 1
        kinds = ("SIMULATED", "real") if champion_simulated else ("real", "SIMULATED")
        assert f"{model}@champion v1 is a {kinds[0]} model's program and this sweep's scores are {kinds[1]}" in (
            decision.reason
        )
        assert "promote to another registered model (promote.model: " in decision.reason
        assert len(client.search_model_versions(f"name = '{model}'")) == 1, "nothing registered beside it"


def test_a_retried_promotion_registers_one_version(mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    model = f"retry-{uuid.uuid4().hex[:8]}"
    record, run_id, program = candidate(tmp_path, mlflow_server, "retried", 0.7)
    registration = Registration(record, run_id, "sha", record.test_scores, None)
    versions = {_register(model, registration, program, mlflow_server, gate="passed") for _ in range(2)}
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
def test_pull_and_load_never_unpickle_a_tampered_artifact(mlflow_server: str, tmp_path: Path) -> None:
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
    assert not marker.exists(), "pull/load unpickled an artifact"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "program.json"]
    assert loaded.solve.predict.demos[0]["answer"] == "0.9"  # the program itself came back


class _Retries(logging.Handler):
    """Sets `hit` when urllib3 retries a request whose connection failed: a request met the outage."""

    def __init__(self) -> None:
        super().__init__()
        self.hit = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Retrying"):
            self.hit.set()


@pytest.mark.reliability
def test_promotion_survives_a_tracking_server_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from dspy_sweeps.track import registry

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
    real_register, killed = registry._register, threading.Event()

    def register_into_an_outage(*args, **kwargs) -> str:
        server.stop(signal.SIGKILL)  # the server dies mid-promotion, before the program is registered ...
        killed.set()
        return real_register(*args, **kwargs)

    monkeypatch.setattr(registry, "_register", register_into_an_outage)
    retries = _Retries()
    logging.getLogger("urllib3.connectionpool").addHandler(retries)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_promote_or_error(model, entry, server.url)))
    try:
        thread.start()
        assert killed.wait(120), "the promotion never reached the register step"
        hit = retries.hit.wait(120)  # ... a request meets the dead server ...
        server.start()  # ... and the server comes back on the same port and store
        thread.join(timeout=300)
        versions = MlflowClient(server.url).search_model_versions(f"name = '{model}'")
        assert hit, "no request met the outage: the test proved nothing"
        assert outcome and not isinstance(outcome[0], Exception), outcome
        assert len(versions) == 1, "never two versions for one promotion"
        pull(f"{model}@champion", tmp_path / "pulled", server.url)  # its artifacts are there
        assert (tmp_path / "pulled" / "program.json").is_file(), "never a version without its artifacts"
    finally:
        logging.getLogger("urllib3.connectionpool").removeHandler(retries)
        server.stop()


@pytest.mark.reliability
def test_an_unwritable_artifact_store_fails_cleanly_and_registers_nothing(tmp_path: Path) -> None:
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
    assert clean, str(error.value)
    assert versions == [], "never a registered version without its artifacts"


def _promote_or_error(model: str, entry: tuple, uri: str) -> object:
    try:
        return promote(Promote(model=model), *entry, uri, never_rescored)
    except Exception as exc:
        return exc
