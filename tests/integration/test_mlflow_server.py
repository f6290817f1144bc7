"""The remote tracking path: a real `mlflow server` on loopback receives the runs, the
registered champion and its artifacts, and `sweep pull` reads them back over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"

pytestmark = pytest.mark.slow


def test_sweep_tracks_registers_and_pulls_through_a_server(mlflow_server: str, tmp_path: Path) -> None:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "MLFLOW_TRACKING_URI": mlflow_server}
    run = subprocess.run(
        [str(BIN / "sweep"), "run", "sweeps/demo.yaml", "--state-dir", str(tmp_path / "state"),
         "--set", "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "promoted v1 as @champion" in run.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 3  # the sweep's parent run and two trials
    champion = client.get_model_version_by_alias("demo", "champion")
    assert champion.tags["optimizer"] == "bootstrap_fewshot"
    assert not (tmp_path / "state" / "mlflow.db").exists(), "with a server, nothing goes to the local store"

    pulled = subprocess.run(
        [str(BIN / "sweep"), "pull", "demo@champion", "-o", str(tmp_path / "pulled")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    meta = json.loads((tmp_path / "pulled" / "metadata.json").read_text())
    assert meta["trial_id"] == champion.tags["trial"] and meta["registry"]["tracking_uri"] == mlflow_server
