"""A real Ray head on loopback, started with `ray start --head --block` in its own process group.

The test run shares one (see `tests/conftest.py`): sweeps whose subject is not Ray's own start-up
join it through `RAY_ADDRESS` instead of paying a Ray start each. `tests/integration/test_ray_jobs.py`
starts one of its own, with the dashboard, to submit jobs to.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: Path
    address: str  # the GCS address a driver joins
    dashboard: str | None  # the dashboard's URL, when it was started with one
    env: dict[str, str]  # what a client needs for this cluster: auth mode and token
    stopped: bool = False

    def processes(self) -> list[str]:
        """Processes still running with this cluster's temp dir on their command line."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # not a process, or it just exited
                continue
            if str(self.temp_dir) in cmdline and entry.name != str(os.getpid()):
                found.append(f"{entry.name} {cmdline[:160]}")
        return found

    def stop(self) -> list[str]:
        """SIGTERM to `ray start --block` stops all it started; return leftovers (then killed, by pid).

        Never `ray stop`: it stops every Ray on the machine, other tests' too."""
        if not self.stopped:
            self.stopped = True
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 15  # workers notice their raylet is gone within seconds
        while (leftovers := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for line in leftovers:
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return leftovers


def own_ray(env: dict[str, str]) -> dict[str, str]:
    """`env` without the shared head's address: the sweep starts (and must clean up) its own Ray."""
    return {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}


def start_head(
    *, dashboard: bool, num_cpus: int, env: dict[str, str] | None = None, venv_on_path: bool = True, tries: int = 3
) -> RayHead:
    """`_start_head`, again if it fails: on a loaded machine the raylet can miss Ray's fixed
    30-second window to register with the GCS ("The current node timed out during startup")."""
    for _ in range(tries - 1):
        try:
            return _start_head(dashboard, num_cpus, env, venv_on_path)
        except AssertionError:
            pass
    return _start_head(dashboard, num_cpus, env, venv_on_path)


def _start_head(dashboard: bool, num_cpus: int, env: dict[str, str] | None, venv_on_path: bool) -> RayHead:
    """A Ray head on 127.0.0.1 with token auth and every port picked free (Ray's worker ports,
    10002-19999, and its agent's 52365 are not among them: the kernel hands out higher ones).
    Without `venv_on_path`, the head runs as `.venv/bin/ray start` does from a shell with no venv
    activated: the venv's `bin` is not on its PATH (a job's entrypoint inherits that PATH).

    The temp dir is short because Unix socket paths are limited to about 107 bytes."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    ports = {
        "--port": gcs_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    if dashboard:
        ports["--dashboard-port"] = dashboard_port
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    outer = env or os.environ
    path = [p for p in outer.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    full_env = {
        **outer,
        **auth,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.pathsep.join([str(BIN), *path] if venv_on_path else path),
    }
    for name in ("RAY_ADDRESS", *([] if venv_on_path else ["VIRTUAL_ENV"])):
        full_env.pop(name, None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--include-dashboard={'true' if dashboard else 'false'}",
        *(["--dashboard-host=127.0.0.1"] if dashboard else []),
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log_path = temp_dir / "ray-start.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            cmd, env=full_env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(
        process,
        temp_dir,
        f"127.0.0.1:{gcs_port}",
        f"http://127.0.0.1:{dashboard_port}" if dashboard else None,
        auth,
    )
    try:
        _wait_until_up(head, log_path)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_until_up(head: RayHead, log: Path, timeout: float = 180) -> None:
    """`ray start` has printed that the head is running and, with a dashboard, the dashboard answers
    (any HTTP answer: 401 without a token means it is up). The dashboard alone is not enough: it
    answers while the head's raylet may still miss Ray's 30 s window to register, and then `ray start`
    stops the GCS and exits (CI saw a node wait on that GCS for minutes)."""
    deadline = time.monotonic() + timeout
    while True:
        assert head.process.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the Ray head did not come up in {timeout}s:\n{log.read_text()[-3000:]}"
        if "Ray runtime started" in log.read_text() and (head.dashboard is None or _answers(head.dashboard)):
            return
        time.sleep(0.5)


def _answers(dashboard: str) -> bool:
    try:
        with urllib.request.urlopen(f"{dashboard}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@dataclass
class RayNode:
    """A worker node of a `RayHead`, in a mount namespace of its own (see `start_node`)."""

    process: subprocess.Popen
    ip: str
    log: Path
    lost: bool = False

    def lose(self) -> None:
        """The node is lost: SIGKILL to its process group (`ray start --block`, the raylet) and to every
        process under it (Ray puts each worker in a process group of its own): nothing of it runs on.

        Once only: afterwards its pid may be another process's (the suite spawns enough processes to
        wrap this machine's pid_max of 32,768 in minutes), as a teardown losing every node would find."""
        import psutil

        if self.lost:
            return
        self.lost = True
        try:
            under = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            under = []
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in under:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(under, timeout=30)
        self.process.wait(timeout=60)


# A node is up in 5-15 s on 2 cores, 20-40 s under the suite's load, and `ray start` gives up by itself
# after Ray's own windows (about 20 s to reach the GCS, 30 s for the raylet to register). One still
# starting after this long is stuck: it is stopped with its stack and the logs, within a test's timeout.
NODE_START_S = 90


def start_node(head: RayHead, ip: str, num_cpus: int, hidden: list[Path], tries: int = 3) -> RayNode:
    """A Ray node at `ip` (127.0.0.2, ...) that shares the network but not the disk with the driver: it
    runs in its own mount namespace (`unshare -m`) with a tmpfs over each of `hidden` (the project's
    `pipelines/`, the state dir) and over the head's temp folder, so it keeps its own session files and
    sees none of the driver's. Every port picked free, none in Ray's worker range or its agent's 52365."""
    failures = []
    for _ in range(tries):
        try:
            return _start_node(head, ip, num_cpus, hidden)
        except AssertionError as exc:
            failures.append(str(exc))
    raise AssertionError(f"{tries} tries:\n" + "\n\n".join(failures))


def _start_node(head: RayHead, ip: str, num_cpus: int, hidden: list[Path]) -> RayNode:
    import shlex

    log = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp")) / "ray-node.log"
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    ray_start = [
        str(BIN / "ray"),
        "start",
        f"--address={head.address}",
        f"--node-ip-address={ip}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--disable-usage-stats",
        "--block",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    masks = [*hidden, head.temp_dir]
    script = "set -e; " + "".join(f"mount -t tmpfs tmpfs {shlex.quote(str(p))}; " for p in masks)
    script += "exec " + shlex.join(ray_start)
    env = {**os.environ, **head.env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT prints where a stuck `ray start` waits (`_stuck`)
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            env=env,
            cwd="/",
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = RayNode(process, ip, log)
    started = time.monotonic()
    while "Ray runtime started" not in log.read_text():
        waited = time.monotonic() - started
        if head.process.poll() is not None:  # the node can only wait for a GCS that is gone
            node.lose()
            (log.parent / "logs.txt").write_text(logs := _head_logs(head))
            raise AssertionError(f"the Ray head exited while a node joined it ({waited:.0f} s):{logs}")
        if process.poll() is not None or waited > NODE_START_S:
            logs = _stuck(node, head) if process.poll() is None else ""
            node.lose()
            raise AssertionError(
                f"the Ray node at {ip} did not start ({waited:.0f} s):\n{log.read_text()[-8000:]}{logs}"
            )
        time.sleep(0.5)
    return node


def _stuck(node: RayNode, head: RayHead) -> str:
    """What a node that is still starting left: the tails of its session logs (read through its own
    mount namespace, `/proc/<pid>/root`) and of the head's GCS log, and its `ray start` stack (SIGABRT
    to a process with Python's faulthandler on prints every thread's stack into the node's log). Also
    written beside the node's log, which outlives the test run."""
    seen = Path(f"/proc/{node.process.pid}/root") / str(head.temp_dir).lstrip("/")
    paths = []
    with contextlib.suppress(OSError):  # session_latest is an absolute link: followed here, it is the head's
        paths = sorted((seen / Path(os.readlink(seen / "session_latest")).name / "logs").glob("*.*"))
    logs = _tails(paths) + _head_logs(head)
    (node.log.parent / "logs.txt").write_text(logs)
    node.process.send_signal(signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.process.wait(timeout=10)
    return logs


def _head_logs(head: RayHead) -> str:
    """The head's `ray start` output (which of its processes exited, if one did) and its GCS and
    raylet logs: the head's temp dir is removed when it stops."""
    logs = head.temp_dir / "session_latest" / "logs"
    names = ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err")
    return _tails([head.temp_dir / "ray-start.log", *(logs / name for name in names)])


def _tails(paths: list[Path], lines: int = 25) -> str:
    tails = []
    for path in paths:
        with contextlib.suppress(OSError):
            if path.suffix in (".out", ".err", ".log") and path.stat().st_size:
                tails.append(f"\n--- {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "".join(tails)
