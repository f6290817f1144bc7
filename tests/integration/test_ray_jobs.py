"""`sweep submit --follow` against a real Ray head and a real `mlflow server`, both on loopback:
the remote path end to end, from the job's trials to `sweep pull` over HTTP.

The demo sweep (trimmed to a baseline and one BootstrapFewShot trial) runs as a Ray job whose
driver is `sweep run`; the job ships the project as its working_dir and the package as
py_modules. A canary secret travels with it and must appear nowhere a user or another
tenant of the cluster could read it: not in the job's entrypoint, runtime_env or metadata,
not in its log, not in the CLI's output. Afterwards the head is stopped and nothing of it
may be left running.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ray_head import RayHead, start_head

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
OFFLINE = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # or LiteLLM hangs offline fetching a price map
# A grid of one trial, and names of its own in the MLflow server the session's tests share.
OVERRIDES = [
    "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]",
    "promote.model=demo-ray-job",
    "tracking.mlflow.experiment=demo-ray-job",
    "tracking.wandb=null",  # MLflow's server is the job's tracking subject here
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A real Ray head on 127.0.0.1: dashboard on, token auth on, every port picked free, started as a
    user meets it: `.venv/bin/ray start` with no activated venv, so `sweep` is not on the head's PATH."""
    head = start_head(dashboard=True, num_cpus=2, env={**os.environ, **OFFLINE}, venv_on_path=False)
    try:
        yield head
    finally:
        head.stop()


def sweep_in_parallel(commands: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """`sweep ARGS` for each command, all at once (each pays the CLI's start-up)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(
            pool.map(
                lambda args: subprocess.run(
                    [str(BIN / "sweep"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
                ),
                commands,
            )
        )


def test_bad_address_and_unknown_job_are_one_line_errors(ray_head: RayHead) -> None:
    env = {**os.environ, **ray_head.env}
    env.pop("RAY_ADDRESS", None)
    cases = [
        (["submit", "sweeps/demo.yaml", "--address", "http://127.0.0.1:9"], "--address http://127.0.0.1:9"),
        (["submit", "sweeps/nope.yaml", "--address", ray_head.dashboard], "sweeps/nope.yaml: no such sweep file"),
        (["submit", "sweeps/demo.yaml"], "--address: give the Ray dashboard's address"),
        (["status", "sweep-demo-00000000", "--address", ray_head.dashboard], "job sweep-demo-00000000: no such job"),
    ]
    for (args, expected), run in zip(cases, sweep_in_parallel([args for args, _ in cases], env)):
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, run.stderr)


def test_a_client_without_the_token_gets_one_line_naming_it(ray_head: RayHead, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    commands = [["status", "sweep-demo-00000000", "--address", ray_head.dashboard]]
    commands.append(["submit", "sweeps/demo.yaml", "--address", ray_head.dashboard])
    for args, run in zip(commands, sweep_in_parallel(commands, env)):
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0], run.stderr
        assert "Traceback" not in run.stderr and ray_head.env["RAY_AUTH_TOKEN"] not in run.stderr


@pytest.mark.reliability
def test_submit_follow_runs_the_sweep_as_a_ray_job(
    ray_head: RayHead, mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # Ray's client below would take it over its address
    canary = "sk-canary-" + os.urandom(8).hex()
    env = {**os.environ, **OFFLINE, **ray_head.env, "MLFLOW_TRACKING_URI": mlflow_server, "SWEEP_CANARY": canary}
    env.pop("RAY_ADDRESS", None)
    submitted = subprocess.run(
        [
            str(BIN / "sweep"),
            "submit",
            "sweeps/demo.yaml",
            "--address",
            ray_head.dashboard,
            *(arg for o in OVERRIDES for arg in ("--set", o)),
            "--secret",
            "SWEEP_CANARY",
            "--state-dir",
            str(tmp_path / "job-state"),
            "--storage",
            str(tmp_path / "storage"),
            "--follow",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    job_id = submitted.stdout.splitlines()[0].strip()
    assert job_id.startswith("sweep-demo-")
    assert "promoted v1 as @champion" in submitted.stdout  # the job's log, streamed

    from ray.job_submission import JobSubmissionClient

    token = {"Authorization": f"Bearer {ray_head.env['RAY_AUTH_TOKEN']}"}  # Ray may be imported here already
    client = JobSubmissionClient(ray_head.dashboard, headers=token)
    info = client.get_job_info(job_id)
    assert info.status.value == "SUCCEEDED"
    assert info.driver_info is not None  # `sweep run` joined this cluster (it did not start a Ray of its own)
    run_args = shlex.join(
        [
            "run",
            "sweeps/demo.yaml",
            *(a for o in OVERRIDES for a in ("--set", o)),
            "--storage",
            str(tmp_path / "storage"),
        ]
    )
    run_args += f" --state-dir {shlex.quote(str(tmp_path / 'job-state'))}"  # outside Ray's unpacked working_dir
    assert info.entrypoint.endswith(f"-P -m dspy_sweeps.cli.main {run_args}")  # not `sweep`: not on the head's PATH
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == mlflow_server
    assert info.runtime_env["working_dir"].startswith("gcs://") and len(info.runtime_env["py_modules"]) == 1
    assert info.metadata["dspy_sweeps.secrets"] == "SWEEP_CANARY"  # the name, for the record; never the value

    # The canary is nowhere a user of the cluster can read it.
    every_job = json.dumps([j.dict() for j in client.list_jobs()], default=str)
    ray_logs = "".join(
        p.read_text(errors="replace")
        for pattern in ("*.log", "*.out", "*.err")
        for p in ray_head.temp_dir.rglob(pattern)
        if p.is_file()
    )
    places = {"job list": every_job, "job log": client.get_job_logs(job_id), "CLI output": output, "Ray logs": ray_logs}
    found = [place for place, text in places.items() if canary in text]
    assert found == [], f"the job's secret is readable in: {found}"
    shipped = [p for p in ray_head.temp_dir.rglob("job-secrets-*") if p.is_file()]
    assert not shipped, f"the job's secrets file was not deleted: {shipped}"

    from mlflow.tracking import MlflowClient

    tracking = MlflowClient(mlflow_server)
    runs = tracking.search_runs([tracking.get_experiment_by_name("demo-ray-job").experiment_id])
    assert len(runs) == 3  # the sweep's parent run and two trials
    champion = tracking.get_model_version_by_alias("demo-ray-job", "champion")
    assert champion.tags["optimizer"] == "bootstrap_fewshot"
    with tempfile.TemporaryDirectory() as pulled:  # and `sweep pull` reads it back from the server over HTTP
        pull = subprocess.run(
            [str(BIN / "sweep"), "pull", "demo-ray-job@champion", "-o", pulled],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pull.returncode == 0, pull.stderr[-2000:]
        meta = json.loads((Path(pulled) / "metadata.json").read_text())
    assert meta["trial_id"] == champion.tags["trial"] and meta["registry"]["tracking_uri"] == mlflow_server

    # After the job: its results from storage, on the laptop; then a resubmission resumes it (the state dir
    # stays put across submissions, so its finished trials are kept and nothing runs again).
    results = subprocess.run(
        [str(BIN / "sweep"), "results", "demo", "--storage", str(tmp_path / "storage")],
        cwd=REPO,
        env={**env, "COLUMNS": "250"},  # a table as wide as a terminal would show it: trial ids unabridged
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert results.returncode == 0, results.stderr[-2000:]
    assert champion.tags["trial"] in results.stdout and "promoted" in results.stdout, results.stdout
    resumed = subprocess.run(
        [
            str(BIN / "sweep"),
            "submit",
            "sweeps/demo.yaml",
            "--address",
            ray_head.dashboard,
            *(arg for o in OVERRIDES for arg in ("--set", o)),
            "--state-dir",
            str(tmp_path / "job-state"),
            "--storage",
            str(tmp_path / "storage"),
            "--resume",
            "--follow",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "resuming: 2 finished trials kept, 0 to run" in resumed.stdout, resumed.stdout[-3000:]

    commands = [["status", job_id], ["logs", job_id], ["stop", job_id]]  # --address from $RAY_ADDRESS
    status, logs, stop = sweep_in_parallel(commands, {**env, "RAY_ADDRESS": ray_head.dashboard})
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stderr
    assert "trials: 2/2 done" in status.stdout  # read back from the progress line the job's driver printed
    assert logs.returncode == 0 and "promoted v1 as @champion" in logs.stdout and canary not in logs.stdout, logs.stderr
    assert stop.returncode == 0 and f"{job_id}: already finished" in stop.stdout, stop.stderr

    leftovers = ray_head.stop()
    assert not leftovers, "processes of the Ray head still running:\n" + "\n".join(leftovers)
