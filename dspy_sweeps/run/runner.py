"""The Ray layer: run opaque trial functions concurrently with Ray Tune, one actor per trial.

Imported only by the commands that run trials, so Ray stays out of `sweep --help`.

It knows trials only by id and a function that returns a JSON-able dict; a trial that
raises is reported as failed with its reason and never stops the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

CPUS_PER_TRIAL = 0.1  # trials mostly wait on LM endpoints: 2 cores hold 20 of them
# Tune restarts a trial whose actor died (a killed worker, a lost node). A trial's own exception
# is caught inside the trainable and reported as its result, so it is never retried.
TRIAL_RETRIES = 2


@dataclass(frozen=True)
class Outcome:
    trial_id: str
    result: dict[str, Any] | None
    error: str | None


def start_ray(address: str | None, project_dir: Path) -> None:
    """Join `address` or start a local Ray whose workers can import the project's `pipelines/`."""
    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(p for p in (str(project_dir), os.environ.get("PYTHONPATH")) if p)
    env_vars = {"PYTHONPATH": pythonpath, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    joining = address is not None or "RAY_ADDRESS" in os.environ
    if not joining:
        # A local Ray's workers inherit this process's environment; a runtime_env would route every
        # worker's start through Ray's setup process and import Ray twice (measured: ~4 s a trial).
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


def run_trials(
    trial_ids: list[str],
    fn: Callable[[str, Any], dict[str, Any]],
    shared: Any,
    *,
    name: str,
    storage: Path,
    parallelism: int | None,
    on_outcome: Callable[[Outcome], None],
) -> list[Outcome]:
    """Run `fn(trial_id, shared)` for every id as a Tune trial; `on_outcome` sees each as it ends."""

    def trainable(config: dict[str, Any], shared: Any = None) -> None:
        # A trial's own exception is its result (failed, with the reason); Tune's errors are
        # left for what kills the actor itself. JSON keeps Tune from flattening the record.
        try:
            outcome = {"result": fn(config["trial_id"], shared), "error": None}
        except Exception as exc:
            outcome = {"result": None, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        tune.report({"outcome": json.dumps(outcome, default=str)})

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no experiment banner; our progress bar reports

    callback = _OutcomeCallback(on_outcome)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, shared=shared), {"cpu": CPUS_PER_TRIAL}),
        param_space={"trial_id": tune.grid_search(trial_ids)},
        tune_config=tune.TuneConfig(max_concurrent_trials=parallelism or len(trial_ids), reuse_actors=False),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES, fail_fast=False),
        ),
    )
    try:
        tuner.fit()
    except Exception:
        if callback.error is not None:  # `on_outcome` stopped the sweep: that is the error to report
            raise callback.error from None
        raise
    return callback.outcomes


class _OutcomeCallback(tune.Callback):
    def __init__(self, on_outcome: Callable[[Outcome], None]) -> None:
        self.on_outcome = on_outcome
        self.outcomes: list[Outcome] = []
        self.error: Exception | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        outcome = json.loads(result["outcome"])
        self._emit(Outcome(trial.config["trial_id"], outcome["result"], outcome["error"]))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = trial.get_pickled_error() or trial.get_error()
        self._emit(Outcome(trial.config["trial_id"], None, _reason(error)))

    def _emit(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        try:
            self.on_outcome(outcome)
        except Exception as exc:
            self.error = exc  # Tune wraps it in a TuneError; run_trials raises the original
            raise

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config for restoring; the driver-side handler cannot (and need not) go with it.
        return {"on_outcome": None, "outcomes": [], "error": None}


def _reason(error: BaseException | None) -> str:
    """The root cause in one line: Ray wraps a trial's exception in its own error types."""
    while error is not None and getattr(error, "cause", None) is not None:
        error = error.cause
    if error is None:
        return "unknown error"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:500]


def stop_ray() -> None:
    ray.shutdown()
