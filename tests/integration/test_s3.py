"""`s3://` paths against a local S3-compatible server (moto's server mode on loopback): a corpus
read by DuckDB's httpfs, and an MLflow server whose artifact store is a bucket, where a promotion
logs the program and `sweep pull` reads it back. The AWS variables are the standard ones; the keys
are dummies moto accepts."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sweep_helpers import REPO, sweep_cli

from tests.integration.conftest import BIN, MlflowServer, free_port

pytestmark = pytest.mark.slow
BUCKET = "sweeps-data"
DEMO = REPO / "datasets" / "demo" / "arith.parquet"


@dataclass(frozen=True)
class S3:
    url: str
    env: dict[str, str]  # what a client of this S3 needs: endpoint, region, keys

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """`moto_server` in its own process group, with one bucket holding the demo corpus."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.3)
        env = {
            "AWS_ENDPOINT_URL": url,
            "MLFLOW_S3_ENDPOINT_URL": url,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "moto-key-id",
            "AWS_SECRET_ACCESS_KEY": "moto-secret-" + uuid.uuid4().hex,
        }
        server = S3(url, env)
        server.client().create_bucket(Bucket=BUCKET)
        server.client().upload_file(str(DEMO), BUCKET, "demo/arith.parquet")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_an_s3_corpus_reads_the_same_rows_as_the_local_file(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    from dspy_sweeps.data import load_dataset
    from dspy_sweeps.spec.schema import DataSpec

    split = {"train": 20, "val": 10, "test": 10}
    local = load_dataset(DataSpec(source=str(DEMO), inputs=["question"], split=split))
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    remote = load_dataset(DataSpec(source=f"s3://{BUCKET}/demo/arith.parquet", inputs=["question"], split=split))
    assert (remote.train, remote.val, remote.test) == (local.train, local.val, local.test)
    assert len(remote.train) == 20 and remote.labels == local.labels


def validate(source: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "sweep"), "validate", "sweeps/demo.yaml", "--set", f"data.source={source}"]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_sweep_validate_reads_an_s3_corpus_and_names_a_missing_one(s3: S3) -> None:
    ok = validate(f"s3://{BUCKET}/demo/arith.parquet", s3.env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "sweeps/demo.yaml: ok" in ok.stdout

    bad = validate(f"s3://{BUCKET}/demo/nope.parquet", s3.env)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert lines[0].startswith(f"error: data.source: cannot read s3://{BUCKET}/demo/nope.parquet")
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in bad.stdout + bad.stderr


def test_a_promotion_logs_to_an_s3_artifact_store_and_pull_reads_it_back(s3: S3, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from test_promotion import candidate, never_rescored

    from dspy_sweeps.spec.schema import Promote
    from dspy_sweeps.track.registry import promote

    server = MlflowServer(tmp_path / "mlflow", artifacts=f"s3://{BUCKET}/mlartifacts", env=s3.env)
    (tmp_path / "mlflow").mkdir()
    server.start()
    try:
        model = f"s3-{uuid.uuid4().hex[:8]}"
        record, run_id, program = candidate(tmp_path, server.url, "s3-trial", 0.7)
        assert promote(Promote(model=model), record, run_id, program, server.url, never_rescored).promoted
        stored = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/")["Contents"]]
        assert any(key.endswith("program/program.json") for key in stored), stored

        out = tmp_path / "pulled"
        pulled = sweep_cli(
            "pull", f"{model}@champion", "-o", str(out), state=tmp_path, env={"MLFLOW_TRACKING_URI": server.url}
        )
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        assert (out / "program.json").read_text() == Path(record.program_path).read_text()
        assert MlflowClient(server.url).get_model_version_by_alias(model, "champion").tags["trial"] == "s3-trial"
    finally:
        server.stop()


def test_trial_storage_on_s3_survives_a_node(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run/storage.py through pyarrow.fs on s3://: pushed from one node's working folder, restored
    into another's, cleared by a fresh run."""
    from tests.unit.test_storage import roundtrip

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    roundtrip(f"s3://{BUCKET}/storage", tmp_path)
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="storage/trials/sw/gepa-1/")
    keys = [o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/")]  # "/": folder markers
    assert keys == ["storage/trials/sw/gepa-1/attempts"]
