"""The scenarios `bench/reliability.py` drives: each injects its fault from outside the CLI, then
measures what happened from what the run left behind, never from a test's asserts.

Each scenario runs the real `sweep` command against endpoints this module owns and reads:
- the simulated endpoint's own counters (`/sim/stats`: requests answered, faults it served, keys it refused),
- the results Parquet (through DuckDB, not the project's reader), the state directory's files,
- the tracking store (MLflow's client against the store or server), the process table (psutil),
- the bytes of every file the run wrote, scanned for a canary key.

A scenario returns an `Outcome`; an exception in the harness itself is reported as "not measured".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from measure import psutil_module

from dspy_sweeps_sim.launch import SimServer

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
DEMO = "sweeps/demo.yaml"
CANARY = "sk-canary-rel-4b1d9e"
BOOTSTRAP_ONLY = "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]"
UNTRACKED = ("--set", "tracking={wandb: null, mlflow: null}", "--set", "promote=null")
SWEEP_TIMEOUT_S = 900  # a hung sweep is a failed case, not a hung harness


@dataclass
class Outcome:
    """What one run of a scenario measured. `figures` hold the counts in the table's columns."""

    case: str
    injected: int  # faults the harness injected
    hit: int  # of those, the ones the artefacts show were met (endpoint counters, a killed pid, ...)
    survived: int  # of those, the ones the run recovered from as promised (see each scenario)
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why a fault counts as not survived


@dataclass
class Harness:
    """Where scenarios write (`root`) and the Ray head sweeps join unless their subject is Ray's processes."""

    root: Path
    ray_env: dict[str, str]  # RAY_ADDRESS and its token ({}: each sweep starts its own Ray, in its state dir)
    ray_temp: Path | None  # the head's session files (logs, job metadata), scanned for secrets

    def folder(self, name: str) -> Path:
        path = self.root / f"{name}-{time.monotonic_ns()}"
        path.mkdir(parents=True)
        return path


# --- instruments -------------------------------------------------------------------------------


def answer_key(path: Path) -> Path:
    """The demo corpus's answers, for the simulated endpoint (written here, from the Parquet file)."""
    import duckdb

    rows = duckdb.sql(f"SELECT question, answer FROM '{REPO / 'datasets/demo/arith.parquet'}'").fetchall()
    with path.open("w") as f:
        for question, answer in rows:
            f.write(json.dumps({"inputs": {"question": str(question)}, "labels": {"answer": str(answer)}}) + "\n")
    return path


@contextmanager
def endpoint(work: Path, **kwargs: Any) -> Iterator[SimServer]:
    models = kwargs.pop("models", ("student", "student2", "teacher"))
    key = answer_key(work / "key.jsonl")
    with SimServer(key, work / "sim", models=models, time_scale=0.02, **kwargs) as sim:
        yield sim


def served(sim: SimServer, model: str) -> dict[str, Any]:
    """The endpoint's own counters for `model`: requests, ok, faults {mode: n}."""
    return sim.stats()["models"][model]


def pointed_at(sim: SimServer, students: tuple[str, ...] = ("student",)) -> list[str]:
    entries = ", ".join(
        f"{{name: {m}, model: openai/{m}, api_base: '{sim.base_url}', timeout_s: 10}}" for m in students
    )
    return [
        "--set",
        f"students=[{entries}]",
        "--set",
        "teachers.0.model=openai/teacher",
        "--set",
        f"teachers.0.api_base={sim.base_url}",
    ]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(extra or {})}


def sweep(*args: str, state: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "sweep"), *args, "--state-dir", str(state)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)


def sweep_under(
    fault: Callable[[subprocess.Popen], None], args: list[str], state: Path, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """The CLI with `fault(process)` acting on it from a thread."""
    cmd = [str(BIN / "sweep"), *args, "--state-dir", str(state)]
    cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread = threading.Thread(target=fault, args=(cli,), daemon=True)
    thread.start()
    try:
        stdout, stderr = cli.communicate(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        cli.kill()
        stdout, stderr = cli.communicate()
    except BaseException:  # the harness is being stopped: so is the sweep
        cli.kill()
        raise
    thread.join(timeout=30)
    return subprocess.CompletedProcess(cmd, cli.returncode, stdout, stderr)


def records(state: Path) -> list[dict[str, Any]]:
    """The results file's rows, read with DuckDB (not the project's reader); [] if there is none."""
    import duckdb

    path = state / "results" / "demo.parquet"
    if not path.exists():
        return []
    relation = duckdb.sql(f"SELECT * FROM '{path}'")
    return [dict(zip(relation.columns, row, strict=True)) for row in relation.fetchall()]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def canary_hits(texts: dict[str, str], folders: list[Path]) -> list[str]:
    """Where the canary appears: named texts (CLI output) and every file under `folders`."""
    found = [name for name, text in texts.items() if CANARY in text]
    for folder in folders:
        for path in folder.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and CANARY.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


# --- scenarios ---------------------------------------------------------------------------------


def endpoint_faults(h: Harness) -> Outcome:
    """student: 4 x 500, 3 x garbage, 2 x hang past its 10 s timeout; teacher: 2 x 429 Retry-After
    (short: each is survived when its trials still finish ok); student2: 500 for good (survived
    when its trials, and only its, fail as `endpoint` with no score)."""
    work = h.folder("endpoint-faults")
    with endpoint(work) as sim:
        sim.set_faults("error500", count=4, model="student")
        sim.set_faults("garbage", count=3, model="student", append=True)
        sim.set_faults("hang", count=2, model="student", hang_seconds=60, append=True)
        sim.set_faults("rate_limit", count=2, retry_after=1, model="teacher", append=True)
        sim.set_faults("error500", model="student2", append=True)
        args = ["run", DEMO, *pointed_at(sim, ("student", "student2")), "--set", BOOTSTRAP_ONLY, *UNTRACKED]
        result = sweep(*args, state=work / "state", env=cli_env(h.ray_env))
        student, teacher, student2 = (served(sim, m) for m in ("student", "teacher", "student2"))
    rows = records(work / "state")
    healthy = [r for r in rows if "student2" not in r["student"]]
    broken = [r for r in rows if "student2" in r["student"]]
    short = [("error500", student), ("garbage", student), ("hang", student), ("rate_limit", teacher)]
    hit = sum(bool(counters["faults"].get(mode)) for mode, counters in short) + bool(student2["faults"].get("error500"))
    healthy_ok = len(healthy) == 2 and all(r["status"] == "ok" and r["failed_examples"] == 0 for r in healthy)
    broken_failed = len(broken) == 2 and all(
        r["status"] == "failed" and r["reason"] == "endpoint" and r["val_score"] is None for r in broken
    )
    notes = [] if result.returncode == 0 else [f"exit {result.returncode}: {result.stderr[-300:]}"]
    survived = (4 * healthy_ok + broken_failed) if result.returncode == 0 else 0
    return Outcome(
        "endpoint: 500s, garbage, hangs, 429 Retry-After (short) and a student down for good",
        5,
        hit,
        survived,
        {
            "trials_lost": sum(r["status"] != "ok" for r in healthy) + (2 - len(healthy)),
            "records_lost": 4 - len(rows),
            "failed_calls_scored": sum(r["failed_examples"] for r in healthy)
            + sum(r["val_score"] is not None for r in broken),
            "faulty_answers_served": sum(sum(c["faults"].values()) for c in (student, teacher, student2)),
        },
        notes,
    )


def teacher_fallback(h: Harness) -> Outcome:
    """The teacher answers 503 to everything; its fallback (student2 on the endpoint) answers.
    Survived: exit 0, the compiled trial ok, and the fallback model answered its calls."""
    work = h.folder("teacher-fallback")
    with endpoint(work) as sim:
        sim.set_faults("error503", model="teacher")
        backup = f"{{name: backup, model: openai/student2, api_base: '{sim.base_url}'}}"
        args = ["run", DEMO, *pointed_at(sim), "--set", "teachers.0.retries=2"]
        args += ["--set", f"teachers.0.fallbacks=[{backup}]", "--set", BOOTSTRAP_ONLY, *UNTRACKED]
        result = sweep(*args, state=work / "state", env=cli_env(h.ray_env))
        teacher, backup_model = served(sim, "teacher"), served(sim, "student2")
    rows = records(work / "state")
    ok = result.returncode == 0 and len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    answered_by_fallback = backup_model["ok"]
    return Outcome(
        "teacher: 503 for good, with a fallback model",
        1,
        int(teacher["faults"].get("error503", 0) > 0),
        int(ok and answered_by_fallback > 0 and teacher["ok"] == 0),
        {
            "trials_lost": 2 - sum(r["status"] == "ok" for r in rows),
            "records_lost": 2 - len(rows),
            "faulty_answers_served": teacher["faults"].get("error503", 0),
            "calls_fell_back": answered_by_fallback,
        },
        [] if ok else [f"exit {result.returncode}: {result.stderr[-300:]}"],
    )


def refused_key(h: Harness) -> Outcome:
    """The teacher refuses the key (401). Survived: exit 2 with one `error:` line naming the key's
    variable, the key itself nowhere in the output, and no request after the refusal is retried."""
    work = h.folder("refused-key")
    with endpoint(work) as sim:
        sim.set_faults("unauthorized", model="teacher")
        args = ["run", DEMO, *pointed_at(sim), "--set", "teachers.0.api_key_env=SWEEP_TEACHER_KEY"]
        args += ["--set", BOOTSTRAP_ONLY, *UNTRACKED]
        result = sweep(*args, state=work / "state", env=cli_env({**h.ray_env, "SWEEP_TEACHER_KEY": CANARY}))
        teacher = served(sim, "teacher")
    lines = error_lines(result.stderr)
    refused = teacher["faults"].get("unauthorized", 0)
    leaks = canary_hits({"stdout": result.stdout, "stderr": result.stderr}, [work / "state"])
    stopped = result.returncode == 2 and len(lines) == 1 and "SWEEP_TEACHER_KEY" in lines[0]
    return Outcome(
        "401 from a teacher",
        1,
        int(refused > 0),
        int(stopped and not leaks),
        {"secrets_found": len(leaks), "requests_after_refusal": max(teacher["requests"] - 1, 0)},
        [] if stopped else [f"exit {result.returncode}, error lines {lines}: {result.stderr[-300:]}"],
    )


def bad_inputs(h: Harness) -> Outcome:
    """Malformed sweeps (each a --set on the demo, or a truncated Parquet file). Survived: exit 2,
    one `error:` line naming the field, no LM request reached the endpoint, and no key echoed."""
    work = h.folder("bad-input")
    truncated = work / "truncated.parquet"
    whole = (REPO / "datasets/demo/arith.parquet").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    cases = {
        "optimizers.0.kind": "optimizers=[{kind: coppro}]",
        "minibatch_sise": "optimizers=[{kind: mipro_v2, minibatch_sise: 5}]",
        "data.query": "data.query=SELEC question FROM corpus",
        "data.inputs": "data.inputs=[prompt]",
        "data.split": "data.split={train: 100000, val: 10, test: 10}",
        "data.source": f"data.source={truncated}",
        "metric": "metric=pipelines.arith:exact_matches",
        "api_key": f"teachers.0.api_key={CANARY}",
    }
    clean, hit, requests, leaks, notes = 0, 0, 0, 0, []
    with endpoint(work) as sim:
        for name, change in cases.items():
            before = sum(served(sim, m)["requests"] for m in ("student", "teacher"))
            state = work / name.replace(".", "-")
            result = sweep("run", DEMO, *pointed_at(sim), "--set", change, state=state, env=cli_env(h.ray_env))
            made = sum(served(sim, m)["requests"] for m in ("student", "teacher")) - before
            lines, output = result.stderr.splitlines(), result.stdout + result.stderr
            hit += result.returncode != 0
            requests += made
            leaks += CANARY in output
            named = len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0]
            if result.returncode == 2 and named and made == 0 and CANARY not in output:
                clean += 1
            else:
                notes.append(f"{name}: exit {result.returncode}, {made} LM requests, stderr {result.stderr[-200:]!r}")
    return Outcome(
        "bad input: malformed sweep settings and a truncated Parquet file (CLI)",
        len(cases),
        hit,
        clean,
        {"lm_requests_before_error": requests, "secrets_found": leaks},
        notes,
    )


CANARY_VARIABLES = (
    "SWEEP_TEACHER_KEY",
    "OPENAI_API_KEY",
    "WANDB_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def secrets(h: Harness) -> Outcome:
    """A canary key in every variable a key can enter by, the teacher's endpoint requiring it;
    a tracked sweep (W&B offline, MLflow) that promotes. Survived per variable: the canary is in
    no file of the state directory or of the Ray head's session, and not in the CLI's output."""
    work = h.folder("secrets")
    state = work / "state"
    with endpoint(work, api_key=CANARY) as sim:
        args = ["run", DEMO, *pointed_at(sim), "--set", "teachers.0.api_key_env=SWEEP_TEACHER_KEY"]
        args += ["--set", "students.0.api_key_env=SWEEP_TEACHER_KEY", "--set", BOOTSTRAP_ONLY]
        args += ["--set", "promote.min_gain=-1"]
        env = cli_env({**h.ray_env, **dict.fromkeys(CANARY_VARIABLES, CANARY)})
        result = sweep(*args, state=state, env=env)
        stats = sim.stats()
    answered = sum(m["ok"] for m in stats["models"].values())  # the key reached the one place it should
    leaks = canary_hits(
        {"stdout": result.stdout, "stderr": result.stderr}, [state, *([h.ray_temp] if h.ray_temp else [])]
    )
    files = sum(1 for p in state.rglob("*") if p.is_file())
    ok = result.returncode == 0 and answered > 0 and stats["auth_rejected"] == 0
    notes = [] if ok else [f"exit {result.returncode}, {answered} answered: {result.stderr[-300:]}"]
    notes += [f"canary in {where}" for where in leaks[:5]]
    return Outcome(
        "secrets: canary keys in api_key_env, provider, W&B and AWS variables (tracked, promoted)",
        len(CANARY_VARIABLES),
        len(CANARY_VARIABLES) if ok else 0,
        len(CANARY_VARIABLES) if ok and not leaks else 0,
        {"secrets_found": len(leaks), "files_scanned": files},
        notes,
    )


def killed_host(h: Harness) -> Outcome:
    """One trial per host, its own Ray: GEPA's host is SIGKILLed once GEPA has saved its state.
    Survived: exit 0, both trials recorded once and ok, GEPA's run on a fresh host (its pid marker)."""
    work = h.folder("killed-host")
    psutil = psutil_module()
    killed: list[int] = []
    killed_at: list[float] = []

    def kill_the_gepa_host(cli: subprocess.Popen) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and cli.poll() is None and not killed:
            saved = list((work / "trials").glob("demo/gepa-*/gepa/gepa_state.bin"))
            markers = list((work / "trials").glob("demo/gepa-*/host"))
            pid = int(markers[0].read_text().split()[1]) if markers else None
            try:
                hosts = [p.pid for p in psutil.Process(cli.pid).children(recursive=True) if "TrialHost" in _title(p)]
            except psutil.Error:
                hosts = []
            if saved and pid in hosts:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                killed_at.append(time.monotonic())
            time.sleep(0.1)

    with endpoint(work) as sim:
        args = ["run", DEMO, *pointed_at(sim), "--set", "optimizers=[{kind: gepa, max_metric_calls: 150}]"]
        args += ["--set", "hosts={trials_per_host: 1}", *UNTRACKED]
        result = sweep_under(kill_the_gepa_host, args, work, cli_env())
        ended = time.monotonic()
    rows = records(work)
    gepa = [r for r in rows if r["kind"] == "gepa"]
    markers = list((work / "trials").glob("demo/gepa-*/host"))
    rerun_on = int(markers[0].read_text().split()[1]) if markers else None
    fresh_host = bool(killed) and rerun_on is not None and rerun_on != killed[0]
    ok = result.returncode == 0 and len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    notes = [] if ok else [f"exit {result.returncode}: {result.stderr[-300:]}"]
    return Outcome(
        "SIGKILL of a running trial's host (GEPA, mid-run), its own Ray",
        1,
        len(killed),
        int(ok and fresh_host),
        {
            "trials_lost": 2 - sum(r["status"] == "ok" for r in rows),
            "records_lost": 2 - len({r["trial_id"] for r in rows}),
            "trials_retried": sum(r["attempts"] - 1 for r in gepa),
            **({"recovery_s": ended - killed_at[0]} if killed_at and ok else {}),
        },
        notes,
    )


def killed_driver(h: Harness) -> Outcome:
    """Three tracked trials one at a time, its own Ray; the driver is SIGKILLed once one trial is on
    disk and tracked, then `--resume`. Survived: no process of the driver's alive 20 s later, the
    resumed sweep exits 0 with every trial ok, no finished and tracked trial run again, one finished
    MLflow run each."""
    work = h.folder("killed-driver")
    state = work / "state"
    psutil = psutil_module()
    children: list[Any] = []

    def kill_after_first_trial(cli: subprocess.Popen) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and cli.poll() is None:
            if any(r["tracked"] for r in _quietly(records, state)):
                children.extend(psutil.Process(cli.pid).children(recursive=True))
                cli.send_signal(signal.SIGKILL)
                return
            time.sleep(0.2)

    with endpoint(work) as sim:
        args = ["run", DEMO, *pointed_at(sim)]
        args += ["--set", "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: [1, 2]}]"]
        args += ["--set", "parallelism=1", "--set", "promote=null", "--set", "tracking.wandb=null"]
        killed = sweep_under(kill_after_first_trial, args, state, cli_env())
        before = {r["trial_id"]: r for r in records(state)}
        left = _alive_after(children, psutil, seconds=20)
        resuming = time.monotonic()
        resumed = sweep(*args, "--resume", state=state, env=cli_env())
        recovery_s = time.monotonic() - resuming
    after = {r["trial_id"]: r for r in records(state)}
    # --resume keeps what finished and was tracked; a trial on disk whose tracking the kill cut short
    # (ends are saved in batches, then tracked one by one) runs again, so its tracking is not lost.
    rerun = [
        t
        for t, r in before.items()
        if r["status"] == "ok" and r["tracked"] and after.get(t, r)["duration_s"] != r["duration_s"]
    ]
    finished = _finished_child_runs(f"sqlite:///{state}/mlflow.db", "demo")
    hit = killed.returncode == -signal.SIGKILL
    ok = resumed.returncode == 0 and len(after) == 3 and all(r["status"] == "ok" for r in after.values())
    notes = [] if hit else [f"not killed mid-sweep: exit {killed.returncode}: {killed.stderr[-300:]}"]
    notes += [] if ok else [f"resume exit {resumed.returncode}: {resumed.stderr[-300:]}"]
    notes += [f"left running: {p}" for p in left[:3]] + [f"run again: {t}" for t in rerun]
    return Outcome(
        "SIGKILL of the driver, then --resume, its own Ray",
        1,
        int(hit),
        int(hit and ok and not left and not rerun and finished == 3),
        {
            "trials_lost": 3 - sum(r["status"] == "ok" for r in after.values()),
            "records_lost": 3 - len(after),
            "processes_left": len(left),
            "trials_run_again": len(rerun),
            "duplicate_runs": max(finished - len(after), 0),
            **({"recovery_s": recovery_s} if ok else {}),
        },
        notes,
    )


def mlflow_restart(h: Harness) -> Outcome:
    """A tracked sweep promotes to a real `mlflow server` behind a proxy the harness runs; when the
    first `registered-models/create` request arrives (mid-promotion: the program's artifacts are up,
    no version exists yet) the server is SIGKILLed and restarted 5 s later on the same store; the
    proxy answers 502 while it is down. Survived: exit 0, exactly one version, `champion` on it, and
    `sweep pull` gets its program."""
    work = h.folder("mlflow-restart")
    server = _MlflowServer(work / "server")
    server.start()
    proxy = _KillingProxy(server, trigger="/registered-models/create", down_s=5.0)
    model = f"restart-{time.monotonic_ns()}"
    try:
        with endpoint(work) as sim:
            args = ["run", DEMO, *pointed_at(sim), "--set", BOOTSTRAP_ONLY, "--set", "tracking.wandb=null"]
            args += ["--set", f"tracking.mlflow={{experiment: demo, tracking_uri: '{proxy.url}'}}"]
            args += ["--set", f"promote={{model: {model}, alias: champion, min_gain: -1}}"]
            env = cli_env({**h.ray_env, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})
            result = sweep(*args, state=work / "state", env=env)
            ended = time.monotonic()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.url)
        versions = client.search_model_versions(f"name = '{model}'")
        champion = None
        try:
            champion = client.get_model_version_by_alias(model, "champion").version
        except Exception as exc:  # no alias is what is measured
            champion = f"none ({type(exc).__name__})"
        pull = ["pull", f"{model}@champion", "-o", str(work / "pulled"), "--tracking-uri", server.url]
        pulled = sweep(*pull, state=work / "state", env=env)
    finally:
        proxy.close()
        server.stop()
    has_program = pulled.returncode == 0 and (work / "pulled" / "program.json").is_file()
    hit = proxy.refused > 0
    ok = result.returncode == 0 and len(versions) == 1 and has_program
    notes = (
        []
        if ok
        else [f"exit {result.returncode}, {len(versions)} versions, champion {champion}: {result.stderr[-300:]}"]
    )
    return Outcome(
        "MLflow server killed and restarted during promotion (behind a proxy)",
        1,
        int(hit),
        int(hit and ok),
        {
            "duplicate_versions": max(len(versions) - 1, 0),
            "versions_per_promotion": len(versions),
            "requests_met_outage": proxy.refused,
            **({"recovery_s": ended - proxy.back_at} if ok and proxy.back_at else {}),
        },
        notes,
    )


CASES: dict[str, Callable[[Harness], Outcome]] = {
    "endpoint-faults": endpoint_faults,
    "teacher-fallback": teacher_fallback,
    "refused-key": refused_key,
    "bad-input": bad_inputs,
    "secrets": secrets,
    "killed-host": killed_host,
    "killed-driver": killed_driver,
    "mlflow-restart": mlflow_restart,
}


# --- helpers -----------------------------------------------------------------------------------


def _quietly(read: Callable[[Path], list[dict[str, Any]]], state: Path) -> list[dict[str, Any]]:
    """`read(state)`, or [] while the sweep is replacing the file."""
    try:
        return read(state)
    except Exception:  # a half-written file is read again on the next poll
        return []


def _title(proc: Any) -> str:
    try:
        return f"{proc.name()} {' '.join(proc.cmdline())}"
    except Exception:  # the process just exited
        return ""


def _alive_after(processes: list[Any], psutil: Any, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    alive = processes
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.5)
    for p in alive:  # the harness cleans up what the driver left (by pid)
        try:
            p.kill()
        except psutil.Error:
            pass
    return [_title(p)[:120] for p in alive]


def _finished_child_runs(uri: str, experiment: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    runs = client.search_runs([found.experiment_id])
    return sum("mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED" for r in runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MlflowServer:
    """`mlflow server` on loopback, in its own process group, restartable on its port and store."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True)
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root}/server.db"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        env = {**cli_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with (self.root / "server.log").open("a") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-500:]}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


class _KillingProxy:
    """An HTTP proxy in front of `server`: on the first request whose path contains `trigger` it
    SIGKILLs the server, answers 502 to every request while it is down (counted in `refused`),
    and restarts it `down_s` later."""

    def __init__(self, server: _MlflowServer, trigger: str, down_s: float) -> None:
        self.server, self.trigger, self.down_s = server, trigger, down_s
        self.refused, self.back_at = 0, 0.0
        self._lock, self._fired, self._up = threading.Lock(), False, threading.Event()
        self._up.set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._maybe_fire(self.path)
                status, headers, payload = proxy._send(self.command, self.path, self.headers, body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._http = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def _maybe_fire(self, path: str) -> None:
        with self._lock:
            if self._fired or self.trigger not in path:
                return
            self._fired = True
            self._up.clear()
        self.server.stop(signal.SIGKILL)
        threading.Thread(target=self._restart, daemon=True).start()

    def _restart(self) -> None:
        time.sleep(self.down_s)
        self.server.start()
        self.back_at = time.monotonic()
        self._up.set()

    def _send(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, list, bytes]:
        if not self._up.is_set():
            with self._lock:
                self.refused += 1
            return 502, [], b"bad gateway: tracking server down"
        request = urllib.request.Request(self.server.url + path, data=body or None, method=method)
        for name, value in headers.items():
            if name.lower() not in ("host", "content-length", "connection"):
                request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, list(response.getheaders()), response.read()
        except urllib.error.HTTPError as error:
            return error.code, list(error.headers.items()), error.read()
        except OSError:
            with self._lock:
                self.refused += 1
            return 502, [], b"bad gateway: tracking server unreachable"

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
