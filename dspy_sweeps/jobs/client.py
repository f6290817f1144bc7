"""Ray Jobs: submit a sweep to a Ray cluster, follow it, ask its status, stop it.

`sweep submit sweeps/x.yaml --address http://HEAD:8265` runs `job_request` then `submit`;
`sweep status|logs|stop JOB_ID` call the functions of the same names. Only the standard
library loads at import; Ray is imported inside the functions that talk to a cluster.

How secrets travel. Ray 2.60 has no secret store, and a runtime_env's `env_vars` come back
raw from `ray job list` and the SDK (the dashboard redacts them only for browsers), so
they must not carry keys. Instead the submitter copies this package to a private temporary
folder, writes the secrets there as a mode-0600 JSON file, and ships that copy as the job's
`py_modules` (which also makes the job run the submitter's version of the package). The
job's env_vars name the file, never a value. `sweep run` calls `load_job_secrets` first:
it reads the file, deletes it, and puts the values in its own environment; the LM gateway
actor (which makes every LM call of the sweep) receives the LM keys through the object
store (`worker_secrets`, `holding_secrets`): never in a runtime_env, never by value in an actor's arguments.
The temporary copy is removed as soon as Ray has uploaded it, and Ray deletes the uploaded
package when the job ends.

`check_tracking_for_cluster` is the multi-node guard the engine calls after Ray starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets as token
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

from dspy_sweeps.errors import SweepError

if TYPE_CHECKING:
    from dspy_sweeps.track.live import Snapshot

DASHBOARD_PORT = 8265  # Ray's default; cluster/ files and the CLI help say the same
ADDRESS_ENV = "RAY_ADDRESS"
SECRETS_ENV = "DSPY_SWEEPS_JOB_SECRETS"  # names the secrets file inside the shipped package; never a value
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole dspy_sweeps package travels with a job

# Read by the driver only: tracking happens on the driver, so no actor gets them.
TRACKING_SECRETS = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
# Settings, not secrets: sent as plain env_vars when set (a URI with a password is a secret).
PASSTHROUGH = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "WANDB_BASE_URL", "LITELLM_LOCAL_MODEL_COST_MAP")
# Never shipped: environments, state, VCS, built corpora (the cluster reads them from s3/https or builds them),
# caches, and `.env` (it usually holds keys, which travel only as named secrets).
EXCLUDES = [
    ".venv",
    "venv",
    ".sweeps",
    ".git",
    "datasets/*/data",
    "mlruns",
    "mlartifacts",
    "wandb",
    ".env",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_STATE_DIR = '"${DSPY_SWEEPS_STATE:-$HOME/.dspy-sweeps}"'  # expanded by the job's shell, on the head
# The entrypoint runs in a shell with the head's PATH, which need not hold `sweep` (a head started as
# `.venv/bin/ray start` has no venv on it). So the job runs `python -m` with the Python Ray starts its
# workers with: the shell's parent is the job supervisor, a worker, whose parent is the raylet, and the
# raylet's `--python_worker_command` names that Python. `python3` if it cannot be read (not Linux).
# `-P` keeps the job's cwd (the project, which may hold its own copy of the package) off sys.path, so
# the package shipped as py_modules, with the secrets file in it, is the one imported.
WORKER_PYTHON = (
    "py=$(tr '\\0' '\\n' </proc/$(awk '/^PPid:/{print $2}' /proc/$PPID/status)/cmdline "
    "| sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p'); "
    'exec "${py:-python3}" -P -m dspy_sweeps.cli.main'
)
AUTH_HINT = (
    "the Ray cluster refused this client: it uses token authentication, so set RAY_AUTH_MODE=token and "
    "its token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head prints it)"
)
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRETS_FILE = re.compile(r"^job-secrets-[0-9a-f]{16}\.json$")


@dataclass(frozen=True)
class JobRequest:
    """Everything `submit` sends, worked out without Ray; `secrets` never appears in a repr."""

    sweep: str
    entrypoint: str
    project_dir: Path
    env_vars: dict[str, str]
    secrets: dict[str, str] = field(repr=False)
    missing: list[str] = field(default_factory=list)  # key variables the sweep names but this shell lacks

    @property
    def secret_names(self) -> list[str]:
        return sorted(self.secrets)


@dataclass(frozen=True)
class JobReport:
    job_id: str
    status: str
    message: str


def job_request(
    sweep_file: str | Path,
    overrides: Sequence[str] = (),
    secret_vars: Sequence[str] = (),
    project_dir: str | Path | None = None,
    environ: dict[str, str] | None = None,
    *,
    state_dir: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    rerun: bool = False,
) -> JobRequest:
    """Check the sweep file and work out the job: entrypoint, plain settings, secrets by name.

    The job's state dir is `state_dir` on the head, by default `$DSPY_SWEEPS_STATE` or `~/.dspy-sweeps`
    there: never inside the job's working_dir, which Ray unpacks to a new folder for each submission,
    so the LM cache, the Optuna study and `--resume` carry over from one submission to the next."""
    from dspy_sweeps.lm.endpoints import plugin_name
    from dspy_sweeps.spec.schema import load_sweep

    project = Path(project_dir or Path.cwd()).resolve()
    env = _environment(project) if environ is None else dict(environ)
    sweep = load_sweep(sweep_file, list(overrides))  # bad input stops here, before anything is uploaded
    relative = _inside(Path(sweep_file), project)
    args = ["run", relative, *(arg for o in overrides for arg in ("--set", o))]
    args += [
        *(["--storage", storage] if storage else []),
        *(["--resume"] if resume else []),
        *(["--rerun"] if rerun else []),
    ]
    where = shlex.quote(state_dir) if state_dir else JOB_STATE_DIR
    entrypoint = f"{WORKER_PYTHON} {shlex.join(args)} --state-dir {where}"

    for name in secret_vars:
        if not _VAR_NAME.match(name):
            raise SweepError(f"--secret {name}: expected an environment variable name, e.g. --secret OPENAI_API_KEY")
        if not env.get(name):
            raise SweepError(f"--secret {name}: the variable is not set in this environment")
    named = [m.api_key_env for m in sweep.models if m.api_key_env and plugin_name(m) is None]
    wanted = dict.fromkeys([*secret_vars, *named, *TRACKING_SECRETS])
    secrets = {name: env[name] for name in wanted if env.get(name)}
    missing = [name for name in dict.fromkeys(named) if not env.get(name)]

    env_vars = {name: env[name] for name in PASSTHROUGH if env.get(name) and name not in secrets}
    if _has_password(env_vars.get("MLFLOW_TRACKING_URI", "")):
        secrets["MLFLOW_TRACKING_URI"] = env_vars.pop("MLFLOW_TRACKING_URI")
    return JobRequest(sweep.name, entrypoint, project, env_vars, secrets, missing)


def _environment(project: Path) -> dict[str, str]:
    """The process environment over the project's `.env` (which is not shipped: its keys go as secrets)."""
    from dotenv import dotenv_values

    dotenv = project / ".env"
    values = {k: v for k, v in dotenv_values(dotenv).items() if v is not None} if dotenv.is_file() else {}
    return {**values, **os.environ}


def _inside(sweep_file: Path, project: Path) -> str:
    try:
        return sweep_file.resolve().relative_to(project).as_posix()
    except ValueError:
        raise SweepError(
            f"{sweep_file}: a submitted sweep file must be inside the project folder {project} "
            "(the folder travels to the cluster as the job's working_dir)"
        ) from None


def _has_password(uri: str) -> bool:
    return bool(uri) and urlparse(uri).password is not None


def submit(request: JobRequest, address: str | None) -> str:
    """Submit the sweep as a Ray job and return its id; the secrets go only in the staged package."""
    client = _client(address)
    with _staged_package(request.secrets) as (package, secrets_file):
        env_vars = dict(request.env_vars)
        if secrets_file:
            env_vars[SECRETS_ENV] = secrets_file
        runtime_env: dict[str, Any] = {
            "working_dir": str(request.project_dir),
            "py_modules": [str(package)],
            "excludes": EXCLUDES,
            "env_vars": env_vars,
        }
        metadata = {"dspy_sweeps.sweep": request.sweep, "dspy_sweeps.secrets": ",".join(request.secret_names)}
        submission_id = f"sweep-{request.sweep}-{token.token_hex(4)}"
        with _talking_to(address), _quiet_ray():
            return client.submit_job(
                entrypoint=request.entrypoint, runtime_env=runtime_env, metadata=metadata, submission_id=submission_id
            )


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Ray's INFO lines about uploads and websockets are not the user's business, nor its warning that
    `.git`/`.venv` are newly excluded (EXCLUDES excludes them anyway); its other warnings are."""
    import logging

    quieter = {
        "ray": logging.WARNING,
        "ray.dashboard.modules.dashboard_sdk": logging.WARNING,  # these two set INFO on themselves
        "ray.dashboard.modules.job.sdk": logging.WARNING,
        "ray._private.runtime_env.working_dir": logging.ERROR,
    }
    before = {name: logging.getLogger(name).level for name in quieter}
    for name, level in quieter.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _staged_package(secrets: dict[str, str]) -> Iterator[tuple[Path, str | None]]:
    """A private copy of this package, with the secrets file in it when there are secrets."""
    folder = Path(tempfile.mkdtemp(prefix="dspy-sweeps-job-"))  # mkdtemp makes it mode 0700
    try:
        package = folder / PACKAGE_DIR.name
        shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "job-secrets-*"))
        name = None
        if secrets:
            name = f"job-secrets-{token.token_hex(8)}.json"
            fd = os.open(package / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(secrets, f)
        yield package, name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- inside the job ---------------------------------------------------------------------


# --- following a job -------------------------------------------------------------------


def follow(job_id: str, address: str | None, out: IO[str] | None = None) -> str:
    """Stream the job's log until it ends; return its final status (SUCCEEDED, FAILED, STOPPED)."""
    out = out or sys.stdout
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    with _talking_to(address, job_id), _quiet_ray():
        try:
            asyncio.run(tail())
        except RuntimeError as exc:  # the log stream broke; the job itself may be fine
            if "does not exist" in str(exc):
                raise
            print(f"(log stream ended early: {exc}; waiting for the job)", file=sys.stderr)
        return _wait_until_done(client, job_id)


def _wait_until_done(client: Any, job_id: str, timeout: float = 60.0) -> str:
    # The log stream closes when the driver exits; the status may take a moment to follow.
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def status(job_id: str, address: str | None) -> JobReport:
    client = _client(address)
    with _talking_to(address, job_id):
        info = client.get_job_info(job_id)
    return JobReport(job_id, str(info.status.value), info.message or "")


def progress(job_id: str, address: str | None) -> Snapshot | None:
    """The job's running trials, from the last progress line its driver printed to its log
    (the log is what the dashboard gives any submitter; the job's state dir stays on the cluster)."""
    from dspy_sweeps.track.live import last_snapshot

    return last_snapshot(logs(job_id, address))


def logs(job_id: str, address: str | None) -> str:
    client = _client(address)
    with _talking_to(address, job_id):
        return client.get_job_logs(job_id)


def stop(job_id: str, address: str | None) -> bool:
    """Ask Ray to stop the job; False if it had already ended."""
    client = _client(address)
    with _talking_to(address, job_id):
        return bool(client.stop_job(job_id))


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise SweepError(
            f"--address: give the Ray dashboard's address, e.g. http://HEAD:{DASHBOARD_PORT}, or set {ADDRESS_ENV}"
        )
    return address


def _client(address: str | None) -> Any:
    address = resolve_address(address)
    from ray.job_submission import JobSubmissionClient

    # Ray's client takes RAY_ADDRESS (or RAY_API_SERVER_ADDRESS) over the address it is given; the
    # address resolved here (--address, else RAY_ADDRESS) is the one the user chose.
    hidden = {name: os.environ.pop(name) for name in (ADDRESS_ENV, "RAY_API_SERVER_ADDRESS") if name in os.environ}
    try:
        with _talking_to(address):
            return JobSubmissionClient(address)
    finally:
        os.environ.update(hidden)


@contextlib.contextmanager
def _talking_to(address: str | None, job_id: str | None = None) -> Iterator[None]:
    """Ray's connection and HTTP errors become one-line SweepErrors naming the flag or the job."""
    where = f"job {job_id}" if job_id else f"--address {address}"
    try:
        yield
    except SweepError:
        raise
    except Exception as exc:
        from ray.exceptions import AuthenticationError  # imported by the client already

        if isinstance(exc, AuthenticationError):
            raise SweepError(f"{where}: {AUTH_HINT}") from None
        if not isinstance(exc, (OSError, RuntimeError, ValueError)):
            raise
        text = " ".join(str(exc).split())[:300]
        if job_id and ("does not exist" in text or "404" in text):
            raise SweepError(f"job {job_id}: no such job on the cluster at {address}") from None
        if "401" in text or "403" in text or "uthentication" in text:
            raise SweepError(f"{where}: {AUTH_HINT}") from None
        raise SweepError(f"{where}: the Ray dashboard did not answer as expected: {text}") from None


# --- multi-node guard ------------------------------------------------------------------
