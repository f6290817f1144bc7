"""The Ray layer's set-up: start or join Ray (with the reaper), and the sweep's LM gateway actor.

Imported only by the commands that run trials, so Ray stays out of `sweep --help`. Trials run
on trial hosts (hosts.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray


def start_ray(address: str | None, project_dir: Path) -> None:
    """Join `address` or start a local Ray whose workers can import the project's `pipelines/`."""
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
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": env_vars} if joining else None,
    )
    _start_reaper()


def _start_reaper() -> None:
    """If this process started the Ray instance, make sure none of it outlives us (see reaper.py)."""
    import subprocess
    import sys

    node = ray._private.worker._global_node  # Ray's own record of the node this driver runs
    if node is None or not node.head:  # joined a cluster someone else runs: not ours to clean up
        return
    subprocess.Popen(
        [sys.executable, "-m", "dspy_sweeps.run.reaper", str(os.getpid())],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_gateway(endpoints: list[Any], cache_dir: Path, budget: Any) -> Any:
    """The sweep's LM gateway as an async actor: one event loop serving every trial's calls."""
    from dspy_sweeps.jobs.secrets import holding_secrets, worker_secrets
    from dspy_sweeps.lm.gateway import GatewayCore

    # Restarted if its process dies; calls in flight then fail as transport errors and DSPy retries them.
    actor = ray.remote(num_cpus=0, max_concurrency=100_000, max_restarts=-1)(holding_secrets(GatewayCore))
    # worker_secrets(): a submitted job's LM keys, by object reference (see jobs.py)
    return actor.remote(worker_secrets(), endpoints, str(cache_dir), budget)


def alive_nodes() -> int:
    """How many nodes of the cluster this driver joined are alive."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def stop_ray() -> None:
    ray.shutdown()
