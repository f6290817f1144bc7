"""The demo sweep end to end through the real CLI: local Ray, simulated endpoints, W&B offline,
MLflow on SQLite, promotion, a second run (`--rerun`: every call from the cache) that promotes nothing,
a third that reuses every trial and runs none, pull and load in fresh processes.

A canary key is put where a user's key would be: the teacher is a "real" OpenAI-compatible
endpoint (a simulator this test starts) whose key comes from `api_key_env`, and OPENAI_API_KEY
and WANDB_API_KEY are set too. It must appear nowhere in the state directory or the CLI's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sweep_helpers import library_noise

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / ".venv" / "bin" / "sweep"
CANARY = "sk-canary-7f3c9e1d5b"
# Where a key can enter a sweep: the teacher's api_key_env variable, provider and tracker
# variables LiteLLM and W&B read on their own, and the AWS credentials boto3 reads.
CANARY_VARIABLES = (
    "SWEEP_TEACHER_KEY",
    "OPENAI_API_KEY",
    "WANDB_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)

pytestmark = pytest.mark.slow


def sweep_cli(
    *args: str, state: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DSPY_SWEEPS_STATE": str(state), **(env or {})}
    return subprocess.run([str(SWEEP), *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Run the demo three times (the second with --rerun, the third as it is: neither may promote) with
    canaries in the environment; the
    teacher's endpoint requires the canary as its key, so the key reaches the one place it should
    (through the test run's shared Ray head: a joined cluster, whose workers lack this environment)."""
    from dspy_sweeps.data import load_dataset
    from dspy_sweeps.spec.schema import load_sweep
    from dspy_sweeps_sim import write_answer_key
    from dspy_sweeps_sim.launch import SimServer

    state = tmp_path_factory.mktemp("state")
    key = write_answer_key(load_dataset(load_sweep(REPO / "sweeps/demo.yaml").data), state / "teacher-key.jsonl")
    with SimServer(key, state / "teacher-sim", models=("teacher",), time_scale=0.02, api_key=CANARY) as teacher:
        env = dict.fromkeys(CANARY_VARIABLES, CANARY)
        overrides = [
            "--set",
            "teachers.0.model=openai/teacher",
            "--set",
            f"teachers.0.api_base={teacher.base_url}",
            "--set",
            "teachers.0.api_key_env=SWEEP_TEACHER_KEY",
        ]
        first = sweep_cli("run", "sweeps/demo.yaml", *overrides, state=state, env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        rows_first = duckdb_rows(state)
        second = sweep_cli("run", "sweeps/demo.yaml", *overrides, "--rerun", state=state, env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        rows_second = duckdb_rows(state)
        # Nothing answers at this Ray address, where Ray waits to connect for minutes: the third run
        # succeeds only if it never reaches for Ray (the timeout only bounds that wait).
        dead_ray = {**env, "RAY_ADDRESS": "127.0.0.1:9"}
        third = sweep_cli("run", "sweeps/demo.yaml", *overrides, state=state, env=dead_ray, timeout=300)
        assert third.returncode == 0, third.stderr[-3000:]
        yield {
            "state": state,
            "first": first,
            "second": second,
            "third": third,
            "rows": (rows_first, rows_second, duckdb_rows(state)),
            "teacher": teacher.stats(),
        }


def duckdb_rows(state: Path) -> dict[str, dict]:
    """The results file's rows by trial id."""
    import duckdb

    relation = duckdb.sql(f"SELECT * FROM '{state}/results/demo.parquet'")
    return {row[relation.columns.index("trial_id")]: dict(zip(relation.columns, row)) for row in relation.fetchall()}


def test_every_trial_finishes_and_the_simulators_profiles_let_an_optimizer_beat_the_baseline(demo: dict) -> None:
    """A test of the simulator, not of any optimizer: the simulated student's accuracy rises with
    demos and instructions by the constants of its profiles (sim/answers.py `p_correct`), and this
    checks that the demo still shows that difference. What an optimizer gains on a real model is
    for a real-model sweep to say."""
    import duckdb

    rows = duckdb.sql(
        f"SELECT kind, status, val_score, test_score, lm_calls FROM '{demo['state']}/results/demo.parquet'"
    ).fetchall()
    assert sorted(r[0] for r in rows) == ["bootstrap_fewshot", "bootstrap_fewshot", "gepa", "mipro_v2", "none"]
    assert all(r[1] == "ok" for r in rows)
    baseline = next(r for r in rows if r[0] == "none")
    best = max(rows, key=lambda r: r[2])
    assert best[2] > baseline[2], "an optimizer should beat the uncompiled program on the simulator"
    out = demo["first"].stdout
    assert "leaderboard" in out and "baseline" in out and "promoted v1 as @champion" in out


def test_a_rerun_sends_no_calls_and_promotes_nothing(demo: dict) -> None:
    out = demo["second"].stdout
    assert "not promoted" in out and "same program as champion v1" in out
    _, rerun, _ = demo["rows"]
    assert sum(r["lm_calls"] for r in rerun.values()) == 0, "a re-run must be served from the LM cache in the state dir"
    assert all(r["cache_hits"] > 0 for r in rerun.values()), "every trial ran again, on cached answers"


def test_a_run_of_an_unchanged_sweep_reuses_every_trial_and_starts_no_ray(demo: dict) -> None:
    """The third run: every trial is the one the second run finished (its row as it was: same
    duration, same MLflow run), none ran, and it never started or joined a Ray (its RAY_ADDRESS is dead)."""
    _, rerun, reused = demo["rows"]
    out = demo["third"].stdout
    assert "reused: 5 finished trials of an earlier run" in out and "0 to run" in out, out[-3000:]
    assert reused == rerun
    assert "not promoted" in out and "same program as champion v1" in out
    assert not [t for t in reused if f"  {t}  val " in out], "no trial reported an end: none ran"


def test_mlflow_has_a_parent_and_child_runs_and_a_champion(demo: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{demo['state']}/mlflow.db")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 3 and len(children) == 10  # two runs of five trials, and a run that reused them
    assert all("val_score" in r.data.metrics and "optimizer" in r.data.params for r in children)
    champion = client.get_model_version_by_alias("demo", "champion")
    assert str(champion.version) == "1"
    assert {"test_score", "data_fingerprint", "optimizer", "student", "versions"} <= set(champion.tags)
    assert len(client.search_model_versions("name = 'demo'")) == 1


def test_mipro_and_gepa_trials_have_a_metric_history_from_their_evaluations(demo: dict) -> None:
    """Events streamed while the trials ran: a point per evaluation, at the LM calls spent then,
    in MLflow and in the trials' W&B offline runs (which held one row each before events)."""
    from mlflow.tracking import MlflowClient
    from wandb_reader import read_runs

    client = MlflowClient(f"sqlite:///{demo['state']}/mlflow.db")
    experiment = client.get_experiment_by_name("demo")
    first_parent = min(
        (r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags),
        key=lambda r: r.info.start_time,
    )
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{first_parent.info.run_id}'"
    )
    for kind in ("mipro_v2", "gepa"):
        (run,) = [r for r in children if r.data.params["optimizer"] == kind]
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "lm_calls")}
        assert len(steps) >= 5, (kind, sorted(steps))
    wandb_runs = [r for r in read_runs(demo["state"] / "wandb" / "wandb") if r.job_type in ("mipro_v2", "gepa")]
    assert wandb_runs and all(len(r.history) >= 5 for r in wandb_runs), [len(r.history) for r in wandb_runs]


def test_wandb_offline_runs_one_per_trial_and_one_per_sweep(demo: dict) -> None:
    from wandb_reader import read_runs

    runs = read_runs(demo["state"] / "wandb" / "wandb")
    trials = [r for r in runs if r.job_type != "sweep"]
    sweeps = [r for r in runs if r.job_type == "sweep"]
    assert len(trials) == 10 and len(sweeps) == 3  # two runs of five trials, and a run that reused them
    assert all(r.history and r.summary["status"] == "ok" and r.exit_code == 0 for r in trials)
    # Each sweep run logs its leaderboard again as each trial ends; the last one holds all five.
    assert all([row["trials_done"] for row in r.history][-1] == 5 for r in sweeps)
    assert all(r.history[-1]["leaderboard/nrows"] == 5 and r.summary["pareto_front"] for r in sweeps)


def test_mlflow_parent_holds_the_leaderboard_and_pareto_plot(demo: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{demo['state']}/mlflow.db")
    experiment = client.get_experiment_by_name("demo")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    for parent in parents:
        assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {"leaderboard.json", "pareto.png"}


def test_piped_output_ends_with_a_progress_line(demo: dict) -> None:
    from dspy_sweeps.track.live import last_snapshot

    snapshot = last_snapshot(demo["first"].stdout)  # what `sweep status` reads from a job's log
    assert snapshot is not None and (snapshot.done, snapshot.total, snapshot.running) == (5, 5, [])


def test_pull_writes_json_state_and_metadata(demo: dict, tmp_path: Path) -> None:
    result = sweep_cli("pull", "demo@champion", "-o", str(tmp_path / "pulled"), state=demo["state"])
    assert result.returncode == 0, result.stderr
    state = json.loads((tmp_path / "pulled" / "program.json").read_text())
    meta = json.loads((tmp_path / "pulled" / "metadata.json").read_text())
    assert str(meta["registry"]["version"]) == "1" and meta["program"] == "pipelines.arith:Solve"
    assert any(
        predictor.get("demos") or predictor.get("signature")
        for predictor in state.values()
        if isinstance(predictor, dict)
    )


def makefile_value(name: str) -> str:
    """A variable of the Makefile (`NAME := value`): the question `make demo` asks, and its answer."""
    import re

    return re.search(rf"^{name} := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)


def test_ask_and_load_in_fresh_processes(demo: dict) -> None:
    question, right = makefile_value("DEMO_QUESTION"), makefile_value("DEMO_ANSWER")
    asked = sweep_cli("ask", "demo@champion", f"question={question}", state=demo["state"])
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert f"answer: {right}\n" in asked.stdout, "make demo's question gets the answer the user can check"
    assert "SIMULATED student" in asked.stderr

    from dspy_sweeps_sim.launch import SimServer

    key = demo["state"] / "endpoints" / "sim" / "demo" / "answer_key.jsonl"
    with SimServer(key, demo["state"] / "sim-load", models=("student",), time_scale=0.001) as sim:
        code = (
            "import dspy_sweeps, mlflow.dspy\n"
            f"p = dspy_sweeps.load('demo@champion', api_base='{sim.base_url}', tracking_uri='sqlite:///{demo['state']}/mlflow.db')\n"
            f"print('ANSWER', p(question={question!r}).answer)\n"
            f"mlflow.set_tracking_uri('sqlite:///{demo['state']}/mlflow.db')\n"
            "m = mlflow.dspy.load_model('models:/demo@champion')\n"
            "print('MLFLOW', type(m).__name__)\n"
        )
        loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert f"ANSWER {right}\n" in loaded.stdout and "MLFLOW Solve" in loaded.stdout


@pytest.mark.parametrize(
    "line",
    [
        "2026-12-03 10:14:02,114\tWARNING authentication_token_setup.py:86 -- Token authentication is enabled "
        "for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
        "2026/12/03 10:14:09 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        "INFO  [alembic.runtime.migration] Context impl SQLiteImpl.",
        "Downloading artifacts: 100%|##########| 3/3 [00:00<00:00, 812.34it/s]",
        "Bootstrapped 4 full traces after 6 examples for up to 1 rounds, amounting to 6 attempts.: 75%|███ | 6/8",
        "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, ...",
        "(TrialHost pid=24157) 2026/12/03 10:46:40 WARNING dspy.clients.lm: LM response was truncated",
    ],
)
def test_the_noise_patterns_catch_what_the_libraries_print(line: str) -> None:
    """The check below can fail: each pattern matches a line of the kind issue 15 saw."""
    assert library_noise(line)


def test_run_pull_and_ask_print_no_library_noise(demo: dict, tmp_path: Path) -> None:
    """Their own lines only; the libraries' logs go to the state directory (`logs/`)."""
    pulled = sweep_cli("pull", "demo@champion", "-o", str(tmp_path / "pulled"), state=demo["state"])
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    asked = sweep_cli("ask", "demo@champion", "question=What is 2 plus 2?", state=demo["state"])
    assert asked.returncode == 0, asked.stderr[-2000:]
    outputs = {"run": demo["first"], "pull": pulled, "ask": asked}
    noise = {cmd: library_noise(out.stdout, out.stderr) for cmd, out in outputs.items()}
    assert noise == {"run": [], "pull": [], "ask": []}
    assert (demo["state"] / "logs" / "libraries.log").read_text().strip()  # the lines went somewhere


@pytest.mark.reliability
def test_no_secret_reaches_state_outputs_or_artifacts(demo: dict) -> None:
    outputs = [run.stdout + run.stderr for run in (demo["first"], demo["second"], demo["third"])]
    files = [p for p in demo["state"].rglob("*") if p.is_file()]
    leaks = [p for p in files if CANARY.encode() in p.read_bytes()] + [o for o in outputs if CANARY in o]
    assert len(files) > 50, "the state dir should hold results, programs, cache, MLflow and W&B files"
    assert leaks == []
    # ... and it reached the one place it should, on every request (GET /models included).
    assert demo["teacher"]["models"]["teacher"]["ok"] > 0 and demo["teacher"]["auth_rejected"] == 0


def test_a_failing_trial_is_recorded_as_failed_and_others_finish(tmp_path: Path) -> None:
    result = sweep_cli(
        "run",
        "sweeps/demo.yaml",
        "--set",
        "program=tests.assets.fragile:Solve",
        "--set",
        "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]",
        "--set",
        "promote=null",
        state=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import duckdb

    rows = dict(duckdb.sql(f"SELECT kind, status FROM '{tmp_path}/results/demo.parquet'").fetchall())
    assert rows == {"none": "ok", "bootstrap_fewshot": "failed"}
    error, score = duckdb.sql(
        f"SELECT error, val_score FROM '{tmp_path}/results/demo.parquet' WHERE status = 'failed'"
    ).fetchone()
    assert "breaks when it is given demos" in error and score is None
