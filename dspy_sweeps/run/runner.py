"""The Ray layer's set-up: start or join Ray (with the reaper), and the sweep's LM gateway shards.

Imported only by the commands that run trials, so Ray stays out of `sweep --help`. Trials run
on trial hosts (hosts.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from dspy_sweeps.errors import SweepError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # dspy_sweeps itself, shipped as `sweep submit` ships it


def start_ray(address: str | None, project_dir: Path, packages: Sequence[str] = ()) -> None:
    """Join `address` or start a local Ray whose workers can import the project's `pipelines/`.

    Joining a cluster, the project's `packages` (the sweep's program, metric and custom optimizers:
    `pipelines`, ...) and this package travel as the driver's `py_modules`, so a host on a node that
    has none of the driver's files imports them as `sweep submit`'s job would."""
    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(p for p in (str(project_dir), os.environ.get("PYTHONPATH")) if p)
    env_vars = {"PYTHONPATH": pythonpath}
    if "DSPY_CACHEDIR" in os.environ:  # set by `sweep run`: DSPy's own cache stays in the state directory
        env_vars["DSPY_CACHEDIR"] = os.environ["DSPY_CACHEDIR"]
    joining = address is not None or "RAY_ADDRESS" in os.environ
    if not joining:
        # A local Ray's workers inherit this process's environment; a runtime_env would route every
        # worker's start through Ray's setup process and import Ray twice (measured: ~4 s a process).
        os.environ.update(env_vars)
    options = {
        "address": address,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
        "runtime_env": _cluster_env(env_vars, project_dir, packages) if joining else None,
    }
    if joining:
        check_ray_address(address)
        ray.init(**options)
    else:
        _init_local(options)
    _start_reaper()


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A head at `address` (else $RAY_ADDRESS) must accept a connection: `ray.init` waits minutes on
    one that does not, saying nothing. `auto` and `local` are Ray's to resolve."""
    import socket
    from urllib.parse import urlsplit

    given = address or os.environ.get("RAY_ADDRESS", "")
    name = "--address" if address else "RAY_ADDRESS"
    if given in ("", "auto", "local"):
        return
    parts = urlsplit(given if "://" in given else f"gcs://{given}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise SweepError(f"{name} {given}: expected host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SweepError(
            f"{name} {given}: no Ray head answers at {host}:{port} ({reason}); start it (`ray start --head`) "
            "or give the address it printed"
        ) from None


def _init_local(options: dict[str, Any], tries: int = 3) -> None:
    """`ray.init` of a local Ray, again if its raylet missed Ray's fixed 30-second window to register
    with the GCS ("The current node timed out during startup": a loaded machine, such as 2 cores
    serving a CPU model). The processes a failed start left behind are this process's children."""
    import psutil

    for attempt in range(1, tries + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(**options)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == tries:
                raise
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for process in left:
            process.kill()
        psutil.wait_procs(left, timeout=10)


def _cluster_env(env_vars: dict[str, str], project_dir: Path, packages: Sequence[str]) -> dict[str, Any]:
    """The driver's runtime_env on a cluster. Inside a `sweep submit` job, the job's own runtime_env
    already ships the project (Ray refuses the same field twice)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        return {"env_vars": env_vars}
    folders = [project_dir / p for p in dict.fromkeys(packages) if (project_dir / p / "__init__.py").is_file()]
    return {
        "env_vars": env_vars,
        "py_modules": [str(f) for f in [*folders, PACKAGE_DIR]],
        "excludes": ["__pycache__", "*.pyc", "job-secrets-*"],
    }


_reaper: Any = None  # the reaper of the Ray this process started, until stop_ray


def _start_reaper() -> None:
    """If this process started the Ray instance, make sure none of it outlives us (see reaper.py)."""
    import subprocess
    import sys

    global _reaper
    node = ray._private.worker._global_node  # Ray's own record of the node this driver runs
    if node is None or not node.head:  # joined a cluster someone else runs: not ours to clean up
        return
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "dspy_sweeps.run.reaper", str(os.getpid())],
        start_new_session=True,
        stdin=subprocess.PIPE,  # closed by stop_ray; by the kernel if this process dies
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_gateway(endpoints: list[Any], cache_dir: Path, budget: Any, shards: int = 1, core: type | None = None) -> Any:
    """The sweep's LM gateway: `shards` async actors (`core`, GatewayCore by default) on this
    driver's node, behind one `Gateway` handle.

    On the driver's node, since the cache and the accounting are the driver's; never restarted
    (max_restarts=0): a restarted shard would come back with zero counts and a fresh budget,
    so a dead one fails its calls and the driver stops the sweep (run/engine.py)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dspy_sweeps.jobs.secrets import holding_secrets, worker_secrets
    from dspy_sweeps.lm.gateway import GatewayCore, owners_of
    from dspy_sweeps.lm.shards import Gateway

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # The LM keys (a submitted job's, and the endpoints' key variables), by object reference: see jobs/secrets.py
    keys = worker_secrets([e.api_key_env for e in endpoints if e.api_key_env])
    actor = ray.remote(num_cpus=0, max_concurrency=100_000, max_restarts=0)(holding_secrets(core or GatewayCore))
    handles = [
        actor.options(scheduling_strategy=here).remote(keys, endpoints, str(cache_dir), budget, shard=i, shards=shards)
        for i in range(shards)
    ]
    ray.get([h.connect.remote(handles) for h in handles])
    by_endpoint = len(endpoints) >= shards > 1  # as GatewayCore decides it
    return Gateway(tuple(handles), owners_of([e.id for e in endpoints], shards) if by_endpoint else None)


def gateway_shards(setting: int | None, running: int, endpoints: int) -> int:
    """Shards for a sweep: the sweep file's `gateway.shards`, or one per 250 trials running at once
    or per 16 endpoints, whichever needs more, at most one per CPU of this node (a shard is one
    event loop, about 2,000 calls/s on a core; see BENCHMARKS.md)."""
    if setting is not None:
        return setting
    need = max(1, -(-running // 250), -(-endpoints // 16))
    return min(need, os.cpu_count() or 1)


def alive_nodes() -> int:
    """How many nodes of the cluster this driver joined are alive."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def stop_ray() -> None:
    """Stop (or leave) Ray; the reaper of a Ray this process started then clears what is left of it and exits."""
    global _reaper
    ray.shutdown()
    if _reaper is not None:
        from dspy_sweeps.run.reaper import STOP

        with contextlib.suppress(OSError):  # a reaper that is gone already has nothing to hear
            _reaper.stdin.write(STOP)
            _reaper.stdin.close()
        _reaper = None
