"""Ray Jobs logic without a cluster: what `sweep submit` sends, how secrets travel, the multi-node guard."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from dspy_sweeps.errors import SweepError
from dspy_sweeps.jobs import client as jobs
from dspy_sweeps.jobs import secrets as job_secrets
from dspy_sweeps.track.uri import check_tracking_for_cluster, is_local_tracking_uri

REPO = Path(__file__).resolve().parents[2]
CLOUD_TEACHER = "teachers.0.model=openai/gpt-4o-mini"


def request(*overrides: str, secrets: tuple[str, ...] = (), env: dict[str, str] | None = None) -> jobs.JobRequest:
    return jobs.job_request(REPO / "sweeps" / "demo.yaml", overrides, secrets, project_dir=REPO, environ=env or {})


def test_entrypoint_is_a_shell_quoted_sweep_run_relative_to_the_project() -> None:
    req = request("optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]", "seeds=[0, 1]")
    assert req.entrypoint == (
        f"{jobs.WORKER_PYTHON} run sweeps/demo.yaml "
        "--set 'optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]' --set 'seeds=[0, 1]' "
        f"--state-dir {jobs.JOB_STATE_DIR}"
    )
    assert req.sweep == "demo" and req.project_dir == REPO


def test_a_job_keeps_its_state_outside_rays_working_dir_and_can_resume_with_storage(tmp_path: Path) -> None:
    """The job's state dir is a stable folder on the head ($DSPY_SWEEPS_STATE or ~/.dspy-sweeps, expanded
    by the job's shell), not `.sweeps` in the working_dir Ray unpacks anew for every submission."""
    import shlex
    import subprocess

    default = request().entrypoint.split(jobs.WORKER_PYTHON + " ")[1]
    echoed = subprocess.run(
        f"printf '%s\\n' {default}", shell=True, env={"HOME": str(tmp_path)}, capture_output=True, text=True
    ).stdout.split()
    assert echoed[-2:] == ["--state-dir", f"{tmp_path}/.dspy-sweeps"]
    chosen = jobs.job_request(
        REPO / "sweeps" / "demo.yaml",
        (),
        (),
        project_dir=REPO,
        environ={},
        state_dir="/data/sweeps",
        storage="s3://bucket/sweeps",
        resume=True,
    )
    argv = shlex.split(chosen.entrypoint.split(jobs.WORKER_PYTHON + " ")[1])
    assert argv == [
        "run",
        "sweeps/demo.yaml",
        "--storage",
        "s3://bucket/sweeps",
        "--resume",
        "--state-dir",
        "/data/sweeps",
    ]


def test_entrypoint_runs_with_the_python_of_rays_workers_without_sweep_on_path(tmp_path: Path) -> None:
    """Ray's process tree in small: a "raylet" whose command line names the workers' Python (this
    venv's), a "job supervisor" child that runs the entrypoint in a shell, with a PATH lacking the venv."""
    import subprocess

    entrypoint = request("data.source=datasets/none.parquet").entrypoint  # `sweep run` refuses it before any LM call
    supervisor = f"import subprocess, sys; sys.exit(subprocess.run({entrypoint!r}, shell=True).returncode)"
    raylet = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
    worker_command = f"--python_worker_command={sys.executable} setup_worker.py default_worker.py"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DSPY_SWEEPS_STATE": str(tmp_path / "state")}
    run = subprocess.run(
        [sys.executable, "-c", raylet, supervisor, worker_command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == "error: data.source: no such file 'datasets/none.parquet'", run.stderr


def test_a_token_authenticated_head_refusing_the_client_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import AuthenticationError

    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-secret-123")
    with pytest.raises(SweepError) as caught, jobs._talking_to("http://head:8265"):
        raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token")
    message = str(caught.value)
    assert message.startswith("--address http://head:8265: the Ray cluster refused this client")
    assert "RAY_AUTH_MODE=token" in message and "RAY_AUTH_TOKEN" in message and "\n" not in message
    assert "tok-secret-123" not in message


def test_named_secrets_and_the_sweeps_key_variables_go_as_secrets_never_as_env_vars() -> None:
    env = {
        "SWEEP_CANARY": "sk-canary",
        "TEACHER_KEY": "sk-teacher",
        "WANDB_API_KEY": "wb-key",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "UNRELATED": "x",
    }
    req = request(CLOUD_TEACHER, "teachers.0.api_key_env=TEACHER_KEY", secrets=("SWEEP_CANARY",), env=env)
    assert req.secrets == {"SWEEP_CANARY": "sk-canary", "TEACHER_KEY": "sk-teacher", "WANDB_API_KEY": "wb-key"}
    assert req.env_vars == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert "sk-" not in repr(req) and "wb-key" not in repr(req)
    assert "sk-" not in req.entrypoint


def test_an_unset_key_variable_is_reported_missing_and_an_unset_secret_is_an_error() -> None:
    req = request(CLOUD_TEACHER, "teachers.0.api_key_env=TEACHER_KEY")
    assert req.missing == ["TEACHER_KEY"] and req.secrets == {}
    with pytest.raises(SweepError, match="--secret NOPE: the variable is not set"):
        request(secrets=("NOPE",))
    with pytest.raises(SweepError, match="--secret not-a-name: expected an environment variable name"):
        request(secrets=("not-a-name",), env={"not-a-name": "x"})


def test_a_tracking_uri_with_a_password_is_a_secret() -> None:
    req = request(env={"MLFLOW_TRACKING_URI": "https://user:hunter2@mlflow.example.com"})
    assert "MLFLOW_TRACKING_URI" not in req.env_vars and req.secret_names == ["MLFLOW_TRACKING_URI"]


def test_a_sweep_file_outside_the_project_cannot_be_submitted(tmp_path: Path) -> None:
    outside = tmp_path / "demo.yaml"
    outside.write_text((REPO / "sweeps" / "demo.yaml").read_text())
    with pytest.raises(SweepError, match="must be inside the project folder"):
        jobs.job_request(outside, project_dir=REPO, environ={})
    with pytest.raises(SweepError, match="no such sweep file"):
        jobs.job_request(REPO / "sweeps" / "nope.yaml", project_dir=REPO, environ={})


def test_the_staged_package_holds_a_private_secrets_file_and_is_removed_afterwards() -> None:
    with jobs._staged_package({"K": "v"}) as (package, name):
        assert package.name == "dspy_sweeps" and (package / "jobs" / "client.py").is_file()
        assert not list(package.rglob("__pycache__"))
        path = package / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text()) == {"K": "v"}
        assert stat.S_IMODE(package.parent.stat().st_mode) == 0o700
    assert not package.parent.exists()
    with jobs._staged_package({}) as (package, name):
        assert name is None and not list(package.glob("job-secrets-*"))


def test_a_job_driver_loads_its_secrets_once_and_deletes_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(job_secrets, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(job_secrets, "_worker_values", {})
    name = "job-secrets-0123456789abcdef.json"
    (tmp_path / name).write_text(json.dumps({"OPENAI_API_KEY": "sk-1", "WANDB_API_KEY": "wb-1"}))
    monkeypatch.setenv(jobs.SECRETS_ENV, name)
    for variable in ("OPENAI_API_KEY", "WANDB_API_KEY"):  # set, then unset: monkeypatch restores them afterwards
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)

    assert job_secrets.load_job_secrets() == ["OPENAI_API_KEY", "WANDB_API_KEY"]
    assert os.environ["OPENAI_API_KEY"] == "sk-1" and jobs.SECRETS_ENV not in os.environ
    assert not (tmp_path / name).exists()
    secrets = job_secrets.gateway_secrets()
    assert secrets is not None and "sk-1" not in repr(secrets) and "sk-1" not in str(secrets)
    assert secrets._values == {"OPENAI_API_KEY": "sk-1"}  # the tracking key stays with the driver

    monkeypatch.setenv(jobs.SECRETS_ENV, name)
    with pytest.raises(SweepError, match="is gone"):
        job_secrets.load_job_secrets()
    monkeypatch.setenv(jobs.SECRETS_ENV, "../../etc/passwd")
    with pytest.raises(SweepError, match="not a secrets file name"):
        job_secrets.load_job_secrets()


def test_outside_a_job_nothing_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(jobs.SECRETS_ENV, raising=False)
    monkeypatch.setattr(job_secrets, "_worker_values", {})
    assert (
        job_secrets.load_job_secrets() == []
        and job_secrets.worker_secrets() is None
        and job_secrets.gateway_secrets() is None
    )


def test_the_gateway_gets_the_key_variables_the_sweep_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a job too: a cluster's workers do not inherit the driver's environment."""
    monkeypatch.setattr(job_secrets, "_worker_values", {})
    monkeypatch.setenv("SWEEP_TEACHER_KEY", "sk-2")
    monkeypatch.delenv("UNSET_TEACHER_KEY", raising=False)
    secrets = job_secrets.gateway_secrets(["SWEEP_TEACHER_KEY", "UNSET_TEACHER_KEY"])
    assert secrets is not None and secrets._values == {"SWEEP_TEACHER_KEY": "sk-2"}
    assert "sk-2" not in repr(secrets) and job_secrets.gateway_secrets(["UNSET_TEACHER_KEY"]) is None


def test_the_address_comes_from_the_flag_or_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.resolve_address(None) == "http://head:8265"
    assert jobs.resolve_address("http://other:8265") == "http://other:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SweepError, match=r"--address: give the Ray dashboard's address, e.g. http://HEAD:8265"):
        jobs.resolve_address(None)


@pytest.mark.parametrize(
    "uri, local",
    [
        ("sqlite:///.sweeps/mlflow.db", True),
        ("sqlite:////abs/mlflow.db", True),
        ("file:///tmp/mlruns", True),
        ("./mlruns", True),
        ("/var/mlruns", True),
        ("mlruns", True),
        ("C:\\mlruns", True),
        ("http://mlflow:5000", False),
        ("https://mlflow.example.com", False),
        ("databricks", False),  # MLflow's name for a Databricks workspace, not a folder
        ("databricks://profile", False),
        ("postgresql://user@db/mlflow", False),
    ],
)
def test_which_tracking_uris_only_one_machine_can_use(uri: str, local: bool) -> None:
    assert is_local_tracking_uri(uri) is local


def test_a_local_store_is_refused_on_more_than_one_alive_node() -> None:
    with pytest.raises(SweepError, match=r"cannot be shared by a multi-node cluster \(2 nodes\); run an MLflow server"):
        check_tracking_for_cluster("sqlite:///.sweeps/mlflow.db", alive_nodes=2)
    check_tracking_for_cluster("http://mlflow:5000", alive_nodes=2)


def test_a_local_store_is_fine_on_one_node() -> None:
    check_tracking_for_cluster("sqlite:///.sweeps/mlflow.db", alive_nodes=1)


def test_only_alive_nodes_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from dspy_sweeps.run import runner

    nodes = [{"Alive": True}] + [{"Alive": False}] * 3
    monkeypatch.setattr(runner.ray, "nodes", lambda: nodes)
    assert runner.alive_nodes() == 1


def test_keys_in_the_projects_dotenv_travel_as_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "x.yaml").write_text((REPO / "sweeps" / "demo.yaml").read_text())
    (tmp_path / ".env").write_text("TEACHER_KEY=sk-from-dotenv\n")
    monkeypatch.delenv("TEACHER_KEY", raising=False)
    monkeypatch.chdir(REPO)  # the sweep's own paths are checked only by `sweep run`, not here
    req = jobs.job_request(
        tmp_path / "sweeps" / "x.yaml", [CLOUD_TEACHER, "teachers.0.api_key_env=TEACHER_KEY"], project_dir=tmp_path
    )
    assert req.secrets["TEACHER_KEY"] == "sk-from-dotenv" and req.entrypoint.startswith(
        f"{jobs.WORKER_PYTHON} run sweeps/x.yaml "
    )


def test_an_actor_holding_secrets_exports_them_before_its_own_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    class Gateway:
        def __init__(self, endpoints: list[str]) -> None:
            self.seen = os.environ.get("GATEWAY_KEY"), endpoints

    monkeypatch.setenv("GATEWAY_KEY", "")  # so monkeypatch removes what the export sets
    monkeypatch.delenv("GATEWAY_KEY")
    cls = job_secrets.holding_secrets(Gateway)
    assert cls.__name__ == "Gateway"
    assert cls(job_secrets.Secrets({"GATEWAY_KEY": "sk-g"}), ["e"]).seen == ("sk-g", ["e"])
    assert cls(None, []).seen == ("sk-g", [])  # None (no job secrets) changes nothing
