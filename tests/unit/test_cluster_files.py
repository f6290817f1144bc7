"""Every file in cluster/ parses, opens with the command that uses it, and agrees with the code:
the dashboard port `sweep submit` defaults to, one image name everywhere, the Ray and MLflow
versions the project runs, a RayJob entrypoint that is a valid `sweep run`, the MLflow and
student ports the docs give."""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from dspy_sweeps.jobs import client as jobs

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_VERSION = version("ray")
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
MLFLOW_PORT = 5000
STUDENT_PORT = 8000
CLIENT_PORT = 10001

# The command each file opens with (its first line is "# <command> ...").
OPENING_COMMANDS = {
    "Dockerfile": "docker build -f cluster/Dockerfile ",
    "Dockerfile.dockerignore": "Read by `docker build -f cluster/Dockerfile .`",
    "ray-cluster.yaml": "ray up cluster/ray-cluster.yaml",
    "kuberay/raycluster.yaml": "kubectl apply -f cluster/kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml": "kubectl apply -f cluster/kuberay/rayjob.yaml",
    "mlflow/docker-compose.yaml": "docker compose -f cluster/mlflow/docker-compose.yaml up",
    "serve/config.yaml": "serve deploy cluster/serve/config.yaml",
    "serve_llm.py": "ray job submit --address http://localhost:8265 --working-dir cluster -- python serve_llm.py",
}
DOCKERFILE_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "WORKDIR",
    "COPY",
    "ADD",
    "RUN",
    "USER",
    "EXPOSE",
    "LABEL",
    "CMD",
    "ENTRYPOINT",
    "SHELL",
    "VOLUME",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ONBUILD",
}


def load_yaml(relative: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / relative).read_text()) if doc is not None]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            instructions.append((word, rest.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def image_from_dockerfile() -> str:
    first = (CLUSTER / "Dockerfile").read_text().splitlines()[0]
    return shlex.split(first.removeprefix("#"))[shlex.split(first.removeprefix("#")).index("-t") + 1]


def test_every_cluster_file_is_known_and_opens_with_its_command() -> None:
    files = {
        p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert files - {"README.md"} == set(OPENING_COMMANDS), "a new file in cluster/ needs a check here"
    for relative, command in OPENING_COMMANDS.items():
        first = (CLUSTER / relative).read_text().splitlines()[0]
        assert first.startswith("# ") and command in first, f"cluster/{relative} opens with: {first}"


@pytest.mark.parametrize("relative", [k for k in OPENING_COMMANDS if k.endswith(".yaml")])
def test_yaml_files_parse(relative: str) -> None:
    assert load_yaml(relative), f"cluster/{relative} holds no document"


def test_python_files_parse() -> None:
    for path in CLUSTER.rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path))


def test_dockerfile_lines_are_instructions_and_its_sources_exist() -> None:
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    assert set(words) <= DOCKERFILE_INSTRUCTIONS, set(words) - DOCKERFILE_INSTRUCTIONS
    assert words.index("FROM") == min(i for i, w in enumerate(words) if w != "ARG"), "only ARGs may precede FROM"
    for word, args in instructions:
        if word == "COPY":
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            assert sources and all((REPO / s).exists() for s in sources), f"COPY {args}: a source is missing"
    assert any(w == "RUN" and "pip install ." in a for w, a in instructions), "the image must install the project"


def test_the_image_runs_the_ray_and_python_this_project_runs() -> None:
    args = dict(a.partition("=")[::2] for w, a in dockerfile_instructions() if w == "ARG")
    assert args["RAY_IMAGE"].startswith(f"rayproject/ray:{RAY_VERSION}-{PY_TAG}")
    assert f'"ray[serve,llm]=={RAY_VERSION}"' in (CLUSTER / "Dockerfile").read_text()


def test_the_dockerignore_keeps_out_what_sweep_submit_keeps_out() -> None:
    ignored = {line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".venv", ".sweeps", ".git", ".env", "datasets/*/data", "mlruns"} <= ignored & set(jobs.EXCLUDES)


def test_one_image_everywhere() -> None:
    image = image_from_dockerfile()
    assert image.startswith("ghcr.io/") and ":" in image
    assert load_yaml("ray-cluster.yaml")[0]["docker"]["image"] == image
    for relative in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        text = (CLUSTER / relative).read_text()
        images = re.findall(r"^\s*image:\s*(\S+)", text, flags=re.M)
        assert images and set(images) == {image}, f"cluster/{relative}: {images}"


def test_the_launcher_config_is_valid_for_ray_and_has_a_cpu_head_and_gpu_workers() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    config = load_yaml("ray-cluster.yaml")[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers), "no GPU worker type"
    start = " ".join(config["head_start_ray_commands"])
    assert f"--dashboard-port={jobs.DASHBOARD_PORT}" in start and f"--ray-client-server-port={CLIENT_PORT}" in start


def test_kuberay_cluster_and_job_agree_with_each_other_and_the_code() -> None:
    (cluster,) = load_yaml("kuberay/raycluster.yaml")
    (job,) = load_yaml("kuberay/rayjob.yaml")
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert cluster["spec"]["rayVersion"] == RAY_VERSION
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-port"] == str(jobs.DASHBOARD_PORT)
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == jobs.DASHBOARD_PORT and ports["client"] == CLIENT_PORT
    gpu = [g for g in cluster["spec"]["workerGroupSpecs"] if "nvidia.com/gpu" in str(g)]
    assert gpu, "no GPU worker group"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    workdir = next(a for w, a in dockerfile_instructions() if w == "WORKDIR")
    containers = [head["template"]["spec"]["containers"][0], *(g["template"]["spec"]["containers"][0] for g in gpu)]
    assert all(c["workingDir"] == workdir for c in containers), "the RayJob runs in the image's project folder"
    assert all(
        c["env"][0] == {"name": "MLFLOW_TRACKING_URI", "value": f"http://mlflow:{MLFLOW_PORT}"} for c in containers
    )


def test_the_rayjob_entrypoint_is_a_valid_sweep_run_of_a_shipped_sweep_file() -> None:
    from typer.main import get_command

    from dspy_sweeps.cli.main import app
    from dspy_sweeps.spec.schema import load_sweep

    (job,) = load_yaml("kuberay/rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["sweep", "run"]
    command = get_command(app)
    with command.make_context("sweep", argv[1:], resilient_parsing=False) as ctx:
        sub = command.get_command(ctx, "run")
        sub_ctx = sub.make_context("run", argv[2:], parent=ctx)
    sweep_file = sub_ctx.params["sweep_file"]
    assert (REPO / sweep_file).is_file() and Path(sweep_file).parts[0] == "sweeps"
    load_sweep(REPO / sweep_file, sub_ctx.params.get("set_") or [])


def test_the_mlflow_server_listens_where_the_docs_say() -> None:
    (compose,) = load_yaml("mlflow/docker-compose.yaml")
    mlflow = compose["services"]["mlflow"]
    assert f"{MLFLOW_PORT}:{MLFLOW_PORT}" in mlflow["ports"] and f"--port {MLFLOW_PORT}" in mlflow["command"]
    served, installed = mlflow["image"].rpartition(":v")[2].split("."), version("mlflow").split(".")
    assert served[:2] == installed[:2], "the server runs the MLflow minor the project pins and installs"
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://") and env[
        "MLFLOW_ARTIFACTS_DESTINATION"
    ].startswith("s3://")
    assert "postgres" in compose["services"] and "minio" in compose["services"]
    for doc in (CLUSTER / "README.md", REPO / "README.md"):
        assert f"MLFLOW_HOST:{MLFLOW_PORT}" in doc.read_text(), f"{doc.name} gives another MLflow port"


def test_the_serve_llm_app_uses_ray_serve_llm_and_the_student_port() -> None:
    tree = ast.parse((CLUSTER / "serve_llm.py").read_text())
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {("ray.serve.llm", "LLMConfig"), ("ray.serve.llm", "build_openai_app")} <= imported
    import ray

    # ray[serve]'s extras are not installed here, so check the names in Ray's source without importing it.
    llm_api = ast.parse((Path(ray.__file__).parent / "serve" / "llm" / "__init__.py").read_text())
    defined = {n.name for n in llm_api.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert {"LLMConfig", "build_openai_app"} <= defined
    port = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "PORT")
    assert port == STUDENT_PORT
    assert f"**{STUDENT_PORT}** students" in (CLUSTER / "README.md").read_text()


def test_the_cli_help_and_docs_give_the_dashboard_port_jobs_py_uses() -> None:
    from typer.testing import CliRunner

    from dspy_sweeps.cli.main import app

    out = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).output
    assert f"http://HEAD:{jobs.DASHBOARD_PORT}" in out
    assert f"**{jobs.DASHBOARD_PORT}** dashboard" in (CLUSTER / "README.md").read_text()
    assert f"--address http://localhost:{jobs.DASHBOARD_PORT}" in (REPO / "README.md").read_text()


def test_the_serve_config_is_valid_for_ray_serve_and_builds_the_programs_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from dspy_sweeps.serve.ray_serve import DEPLOYMENT, BuilderArgs

    config = ServeDeploySchema(**yaml.safe_load((CLUSTER / "serve" / "config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "dspy_sweeps.serve.ray_serve:app"
    BuilderArgs(**application.args)  # the builder takes exactly these
    assert [d.name for d in application.deployments] == [DEPLOYMENT]
    assert config.http_options.port == STUDENT_PORT and application.route_prefix != "/"  # beside serve_llm.py
