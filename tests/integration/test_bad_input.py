"""`sweep run` on bad input: exit 2, one line on stderr naming the file or field, nothing started.

Run: ``.venv/bin/python -m pytest tests/integration/test_bad_input.py -q``. Each case is a real
sweep file under ``tests/assets/bad/`` (read them: each says what is wrong with it), run by the
installed ``sweep`` command as a subprocess from the repo root. ``${DATA}`` points the files at a
30-row corpus, ``${TRUNCATED_DATA}`` at a copy cut in half. A sound sweep validated in the same
setup is the control. The cases run a few at a time, since most import DSPy before they can fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

BAD = Path("tests/assets/bad")
# Not a time limit (speed is `make bench`'s): a case that hangs is interrupted, and fails its test.
GIVE_UP_S = 300.0

# case (file stem) -> fragments the one-line message must contain
CASES: dict[str, tuple[str, ...]] = {
    "yaml_syntax": ("tests/assets/bad/yaml_syntax.yaml:13: YAML syntax error",),
    "unknown_key": ("unknown_key.yaml: optimisers: unknown key 'optimisers' (did you mean 'optimizers'?)",),
    "unknown_optimizer_kind": (
        "unknown_optimizer_kind.yaml: optimizers.1.kind: unknown optimizer kind 'coppro' (did you mean 'copro'?",
        "or a teleprompter class by import path",
    ),
    "weight_training_optimizer": (
        "optimizers.0.w.kind: bootstrap_finetune trains the student's weights, which needs a student that can be "
        "fine-tuned",
    ),
    "avatar_without_agent": ("optimizers.0.kind: avatar optimizes a dspy.Avatar agent",),
    "knn_without_embedder": ("optimizers.0.kind: knn_fewshot finds neighbours with an embedding model",),
    "unknown_optimizer_setting": (
        "optimizers.0.minibatch_sise: MIPROv2 takes no setting 'minibatch_sise' (did you mean 'minibatch_size'?)",
    ),
    "platform_setting": ("optimizers.0.seed: set by the platform",),
    "program_not_found": ("program: cannot import module 'pipelines.arithmetic'",),
    "program_not_a_module": ("program: 'pipelines.arith:SolveWordProblem' cannot be called without arguments",),
    "metric_not_found": ("metric: module 'pipelines.arith' has no attribute 'exact_matches'",),
    "sql_error": ("data.query: Parser Error",),
    "missing_input_column": ("data.inputs: column 'prompt' is not in the query result (columns: question, answer)",),
    "split_larger_than_data": ("data.split: train+val+test = 250 rows but the query returned only 30",),
    "empty_split": ("data.split.val: 0.01 of 30 rows is an empty split",),
    "truncated_parquet": ("data.source: cannot read", "truncated.parquet as Parquet"),
    "unreachable_endpoint": ("students.0 (local): endpoint http://127.0.0.1:9/v1 is unreachable",),
    "unreachable_mlflow": ("tracking.mlflow: no MLflow server answers at http://127.0.0.1:9",),
    "cloud_teacher_without_key": ("teachers.0 (openai/gpt-4o-mini): API key variable OPENAI_API_KEY is not set",),
    "api_key_env_unset": ("teachers.0 (openai/gpt-4o-mini): API key variable MISSING_KEY_VAR is not set",),
    "api_key_in_file": ("api_key_in_file.yaml: teachers.0.api_key: keys never go in sweep files", "api_key_env"),
    "unset_variable": ("unset_variable.yaml: students.0.api_base: environment variable STUDENT_URL is not set",),
    "over_budget": ("budget.max_lm_calls: the plan needs about", "over the budget of 10"),
    "seeds_wrong_type": ("seeds_wrong_type.yaml: seeds: Input should be a valid list (got 'zero')",),
    "negative_split": ("negative_split.yaml: data.split: train, val and test must each be greater than 0",),
    "zero_parallelism": ("zero_parallelism.yaml: parallelism: Input should be greater than 0 (got 0)",),
    "unusable_storage": ("storage: cannot use s4://bucket/sweeps",),
    "no_optimizers": ("no_optimizers.yaml: optimizers: List should have at least 1 item",),
    "duplicate_student_names": ("students: the name 'small' is used twice",),
    "api_base_not_a_url": ("students.0.api_base: 'localhost:8000' is not an http:// or https:// URL",),
    "metric_wrong_shape": ("metric: 'pipelines.arith:SolveWordProblem' is a class, not a function of (example",),
    "missing_source": ("data.source: no such file 'tests/assets/bad/data/no_such_file.parquet'",),
    "non_parquet_source": ("data.source: cannot read tests/assets/bad/data/not_parquet.parquet as Parquet",),
    "empty_table": ("data: the query returned no rows",),
    "null_input": ("data: input 'question' is NULL in the row with answer='8'",),
    "sql_writes_a_file": ("data.query: only a SELECT query may run over the corpus, not COPY",),
    "sql_reads_etc_passwd": ('data.query: Permission Error: Cannot access file "/etc/passwd"',),
    # The simulator is a local endpoint plugin: its name and its settings are checked like any field.
    "unknown_endpoint_plugin": ("endpoints.simulator: no endpoint plugin named 'simulator' (installed: sim)",),
    "bad_endpoint_settings": ("endpoints.sim.time_scale: Input should be greater than 0 (got 0)",),
    "unknown_model_provider": (
        "students.0 (simm/student): 'simm' is neither a LiteLLM provider nor an installed endpoint plugin",
    ),
}


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    state: Path


def run_cli(repo: Path, args: list[str], state: Path, env: dict[str, str]) -> Run:
    """`sweep ARGS` from the repo root; STATE is where it may write."""
    command = [str(Path(sys.executable).with_name("sweep")), *args]
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Its own process group, so a case that wrongly gets as far as Ray can be interrupted
        # (SIGINT lets it stop Ray and the simulator) instead of leaving them behind.
        process = subprocess.Popen(command, cwd=repo, env=env, stdout=out, stderr=err, start_new_session=True)
        status = _wait(process.pid, started + GIVE_UP_S)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    return Run(process.returncode, stdout, stderr, state)


def _wait(pid: int, deadline: float) -> int:
    """Reap `pid`; SIGINT its group at the deadline, SIGKILL 20 s later."""
    for sig, until in ((signal.SIGINT, deadline), (signal.SIGKILL, deadline + 20)):
        while time.monotonic() < until:
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped:
                return status
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
    return os.waitpid(pid, 0)[1]


def good_sweep(path: Path) -> Path:
    """The cases' common shape with nothing wrong, and a cloud teacher so LiteLLM is loaded too."""
    path.write_text(
        "name: good\n"
        "program: pipelines.arith:Solve\n"
        "metric: pipelines.arith:exact_match\n"
        "data: {source: '${DATA}', inputs: [question], split: {train: 10, val: 10, test: 10}}\n"
        "students: [{name: small, model: sim/student}]\n"
        "teachers: [{name: cloud, model: openai/gpt-4o-mini}]\n"
        "optimizers: [{kind: bootstrap_fewshot}, {kind: mipro_v2, auto: light}, {kind: gepa, auto: light}]\n"
    )
    return path


@pytest.fixture(scope="module")
def cli_env(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    truncated = tmp_path_factory.mktemp("broken") / "truncated.parquet"
    content = corpus.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    unset = ("OPENAI_API_KEY", "MISSING_KEY_VAR", "STUDENT_URL", "DSPY_SWEEPS_STATE", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(DATA=str(corpus), TRUNCATED_DATA=str(truncated), LITELLM_LOCAL_MODEL_COST_MAP="True")
    # Bytecode is cached in a temporary folder rather than the venv: without a cache every case
    # would recompile DSPy and LiteLLM, seconds each, which a user's second run never pays.
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    return env


@pytest.fixture(scope="module")
def control(repo: Path, cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """`sweep validate` of a sound sweep in the same setup; it also fills the bytecode cache."""
    folder = tmp_path_factory.mktemp("good")
    env = {**cli_env, "OPENAI_API_KEY": "sk-placeholder-never-sent"}
    return run_cli(repo, ["validate", str(good_sweep(folder / "good.yaml"))], folder, env)


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest,
    repo: Path,
    cli_env: dict[str, str],
    control: Run,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Future[Run]]]:
    """Start every selected case, a few at a time (after the control); each test waits for its own."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})
    ]

    states = {case: tmp_path_factory.mktemp(case) / "state" for case in selected}
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        yield {
            case: pool.submit(run_cli, repo, ["run", str(BAD / f"{case}.yaml"), "--state-dir", str(s)], s, cli_env)
            for case, s in states.items()
        }


def test_the_same_setup_accepts_a_sound_sweep(control: Run) -> None:
    assert control.returncode == 0, control.stderr
    assert "ok (4 trials" in control.stdout


def test_every_bad_file_is_a_case(repo: Path) -> None:
    assert sorted(p.stem for p in (repo / BAD).glob("*.yaml")) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.reliability
def test_bad_input_exits_2_with_one_line(case: str, runs: dict[str, Future[Run]]) -> None:
    run = runs[case].result()
    assert run.returncode == 2, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0] != "error: ", run.stderr
    for fragment in CASES[case]:
        assert fragment in lines[0]
    assert "sk-" not in run.stderr + run.stdout, "a key written in a sweep file is never echoed"
    assert "hunter2" not in run.stderr + run.stdout, "nor a password in a tracking URI"
    # Nothing started: Ray and the simulated endpoint (a local endpoint plugin) would each have made their folder.
    assert not (run.state / "ray").exists()
    assert not (run.state / "endpoints").exists()


def test_each_bad_file_says_how_to_run_it_and_what_is_wrong(repo: Path) -> None:
    for path in sorted((repo / BAD).glob("*.yaml")):
        first, second = path.read_text().splitlines()[:2]
        assert first == f"# sweep run {BAD / path.name}"
        assert second.startswith("# Bad")


@pytest.mark.reliability
def test_a_ray_address_nothing_answers_at_is_one_line(repo: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    """Ray's own join waits minutes on a dead address and says nothing; the run says which it was."""
    args = ["run", "sweeps/demo.yaml", "--address", "127.0.0.1:9", "--state-dir", str(tmp_path)]
    untracked = ["--set", "tracking={wandb: null, mlflow: null}", "--set", "promote=null"]
    run = run_cli(repo, [*args, *untracked], tmp_path, cli_env)
    assert run.returncode == 2, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.stderr.splitlines() == [
        "error: --address 127.0.0.1:9: no Ray head answers at 127.0.0.1:9 (Connection refused); "
        "start it (`ray start --head`) or give the address it printed"
    ]
    assert not (tmp_path / "results").exists(), "no trial ran"
