"""Trial hosts on a local Ray: trials as threads in warm actors. Progress events reach the driver
and a stopped trial is pruned; `trials_per_host: 1` gives each trial its own process; a trial whose
host keeps dying fails after bounded retries; BootstrapFewShot, MIPROv2 and GEPA side by side in
one host score as each does alone, and a host imports no tracking library."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sweep_helpers import REPO, pointed_at

from dspy_sweeps.run.events import Pruned, TrialEvent
from dspy_sweeps.run.hosts import HOST_RETRIES, HostPlan, HostPool, size_hosts
from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    from dspy_sweeps.run import runner

    runner.start_ray(None, REPO)
    # The stand-in trials below live in this test module, which hosts cannot import: send them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        ray.shutdown()


def _event(trial_id: str, step: int) -> TrialEvent:
    return TrialEvent(trial_id, "compile", step, 0.5, 0.5, step, 10 * step, 0.0, 0, 0.0)


def reporting_trial(trial_id: str, steps: dict[str, int | None], channel) -> str:
    """A stand-in trial: reports `steps[trial_id]` events, or with None, reports until stopped."""
    count, step, deadline = steps[trial_id], 0, time.monotonic() + 120
    try:
        while count is None or step < count:
            channel.emit(_event(trial_id, step))
            step += 1
            if count is None:
                if time.monotonic() > deadline:
                    return "never stopped"
                time.sleep(0.01)  # pacing: a real trial reports once per evaluation
    except Pruned:
        return f"pruned at step {step}"
    return "done"


def test_events_reach_the_driver_before_the_outcome_and_a_stopped_trial_is_pruned(local_ray) -> None:
    pool = HostPool(reporting_trial, None, HostPlan(hosts=1, trials_per_host=3, cpus=0.25))
    log: list[tuple[str, str, object]] = []

    def on_event(event: TrialEvent) -> None:
        log.append(("event", event.trial_id, event.step))
        if event.trial_id == "runs-on":  # the driver prunes it on its first event
            pool.stop("runs-on")

    pool.stop("stopped-early")  # before it has started
    try:
        outcomes = pool.run(
            ["runs-on", "counts", "stopped-early"],
            {"runs-on": None, "counts": 3, "stopped-early": 5},
            parallelism=None,
            on_outcome=lambda o: log.append(("outcome", o.trial_id, o.result)),
            on_event=on_event,
        )
    finally:
        pool.close()
    results = {o.trial_id: o.result for o in outcomes}
    assert all(o.error is None for o in outcomes), outcomes
    assert results["counts"] == "done"
    assert results["runs-on"].startswith("pruned at step"), results
    assert results["stopped-early"] == "pruned at step 0"
    counts = [entry for entry in log if entry[1] == "counts"]
    assert counts == [
        ("event", "counts", 0),
        ("event", "counts", 1),
        ("event", "counts", 2),
        ("outcome", "counts", "done"),
    ]
    assert ("event", "runs-on", 0) in log, "the pruned trial's events reached the driver"
    assert not [e for e in log if e[1] == "stopped-early" and e[0] == "event"]


def pid_trial(trial_id: str, shared: None, channel) -> int:
    return os.getpid()


def test_one_trial_per_host_runs_each_trial_in_its_own_process(local_ray) -> None:
    from dspy_sweeps.spec.schema import load_sweep

    sweep = load_sweep(REPO / "sweeps/demo.yaml", ["hosts={trials_per_host: 1}"])
    plan = size_hosts(3, sweep.hosts.trials_per_host, sweep.hosts.cpus, free_cpus=2.0, fill=8)
    assert (plan.hosts, plan.trials_per_host) == (3, 1)
    pool = HostPool(pid_trial, None, plan)
    try:
        outcomes = pool.run(["a", "b", "c"], None, parallelism=None, on_outcome=lambda o: None)
        host_pids = set(pool.pids())
    finally:
        pool.close()
    pids = {o.result for o in outcomes}
    assert len(pids) == 3 and pids == host_pids, (pids, host_pids)


def dying_trial(trial_id: str, shared: None, channel) -> int:
    if trial_id == "dies":
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def test_a_trial_whose_host_keeps_dying_fails_after_bounded_retries(local_ray) -> None:
    pool = HostPool(dying_trial, None, HostPlan(hosts=2, trials_per_host=1, cpus=0.25))
    try:
        first_pids = set(pool.pids())
        outcomes = {
            o.trial_id: o for o in pool.run(["dies", "lives"], None, parallelism=None, on_outcome=lambda o: None)
        }
    finally:
        pool.close()
    assert outcomes["dies"].result is None
    assert f"its host died {HOST_RETRIES + 1} times" in outcomes["dies"].error
    assert outcomes["lives"].error is None and outcomes["lives"].result in first_pids, "the other host was not replaced"


def counted_trial(trial_id: str, folder: str, channel) -> int:
    """A stand-in trial that counts its runs in `folder` (every host of this test is on this machine)."""
    runs = Path(folder) / trial_id
    with runs.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def flaky_get(monkeypatch: pytest.MonkeyPatch, trial_id: str, error: Callable[[], Exception]) -> list[int]:
    """`ray.get` in this driver raises `error()` once, for the run of `trial_id`, after the trial ran
    (the host's answer lost on the way back, as a network blip or a partition loses it)."""
    import ray

    from dspy_sweeps.run.hosts import Outcome

    real_get, hit = ray.get, []

    def get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        if isinstance(value, Outcome) and value.trial_id == trial_id and not hit:
            hit.append(value.result)
            raise error()
        return value

    monkeypatch.setattr(ray, "get", get)
    return hit


def test_an_unavailable_host_is_asked_again_and_its_trial_never_runs_twice(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    pool = HostPool(counted_trial, None, HostPlan(hosts=1, trials_per_host=2, cpus=0.25))
    hit = flaky_get(monkeypatch, "blip", lambda: ray.exceptions.ActorUnavailableError("connection reset", None))
    reported: list[str] = []
    try:
        first_pids = pool.pids()
        outcomes = pool.run(
            ["blip", "calm"], str(tmp_path), parallelism=None, on_outcome=lambda o: reported.append(o.trial_id)
        )
        later_pids = pool.pids()
    finally:
        pool.close()
    assert hit, "the injected ActorUnavailableError was raised"
    assert sorted(reported) == ["blip", "calm"] and len(outcomes) == 2, "one record per trial"
    assert (tmp_path / "blip").read_text().splitlines() == [str(hit[0])], "the trial ran once"
    assert {o.trial_id: o.result for o in outcomes}["blip"] == hit[0], "its outcome came from the same host"
    assert later_pids == first_pids, "an unavailable host is not a dead one: it was not replaced"


def test_a_host_ray_declares_dead_is_killed_before_its_trial_runs_again(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray says the actor died while its process still runs (a partitioned node): the driver kills
    it, and only then runs the trial again, on a fresh host."""
    import psutil
    import ray

    pool = HostPool(counted_trial, None, HostPlan(hosts=1, trials_per_host=1, cpus=0.25))
    hit = flaky_get(monkeypatch, "split", lambda: ray.exceptions.ActorDiedError())
    reported: list[str] = []
    held = pool.hosts[0].handle  # a live handle: without ray.kill, Ray would keep this actor running
    try:
        outcomes = pool.run(
            ["split"], str(tmp_path), parallelism=None, on_outcome=lambda o: reported.append(o.trial_id)
        )
    finally:
        pool.close()
    assert hit, "the injected ActorDiedError was raised"
    first, second = (int(pid) for pid in (tmp_path / "split").read_text().splitlines())
    assert first == hit[0] and second != first and outcomes[0].result == second and reported == ["split"]
    old = psutil.Process(first) if psutil.pid_exists(first) else None
    deadline = time.monotonic() + 60  # ray.kill is asynchronous: the raylet kills the process
    while old is not None and old.is_running() and old.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the host Ray declared dead was never killed"
        time.sleep(0.2)
    del held


SIDE_BY_SIDE = (
    "optimizers=[{kind: bootstrap_fewshot, max_bootstrapped_demos: 2},"
    " {kind: mipro_v2, auto: null, num_candidates: 2, num_trials: 2, max_bootstrapped_demos: 1, max_labeled_demos: 1},"
    " {kind: gepa, max_metric_calls: 80}]"
)
TRACKING_LIBRARIES = ["mlflow", "wandb", "polars", "litellm"]


def run_in_one_host(prepared, trial_ids: list[str], cache: Path, root: Path) -> tuple[dict, list[str]]:
    """Run `trial_ids` at once in a single host, with a fresh gateway on `cache`; their results,
    and which tracking libraries the host imported."""
    import ray

    from dspy_sweeps.lm.build import endpoint_for
    from dspy_sweeps.lm.gateway import Budget
    from dspy_sweeps.run import runner
    from dspy_sweeps.run.worker import TrialContext, execute_trial, warm

    sweep = prepared.sweep
    endpoints = {s.model_dump_json(): endpoint_for(s, s) for s in sweep.models}
    gateway = runner.start_gateway(list({e.id: e for e in endpoints.values()}.values()), cache, Budget())
    ids = {key: e.id for key, e in endpoints.items()}
    ctx = TrialContext(sweep.name, prepared.data, gateway, ids, str(root))
    kinds = tuple(sorted({t.kind for t in prepared.trials}))
    pool = HostPool(execute_trial, functools.partial(warm, sweep.program, sweep.metric, kinds), HostPlan(1, 3, 0.25))
    try:
        chosen = [t for t in prepared.trials if t.id in trial_ids]
        outcomes = pool.run(chosen, ctx, parallelism=None, on_outcome=lambda o: None, id_of=lambda t: t.id)
        imported = ray.get(pool.hosts[0].handle.imported.remote(["dspy", *TRACKING_LIBRARIES]))
    finally:
        pool.close()
        gateway.kill()
    assert all(o.error is None for o in outcomes), outcomes
    return {o.result.trial_id: o.result for o in outcomes}, imported


def test_optimizers_side_by_side_in_one_host_score_as_each_does_alone(
    local_ray, sim: SimServer, tmp_path: Path
) -> None:
    from dspy_sweeps.spec.preflight import prepare
    from dspy_sweeps.spec.schema import load_sweep

    overrides = [*pointed_at(sim)[1::2], SIDE_BY_SIDE, "seeds=[3]"]
    prepared = prepare(load_sweep(REPO / "sweeps/demo.yaml", overrides))
    trials = {t.kind: t.id for t in prepared.trials if t.kind != "none"}
    assert sorted(trials) == ["bootstrap_fewshot", "gepa", "mipro_v2"]
    together, imported = run_in_one_host(prepared, list(trials.values()), tmp_path / "cache", tmp_path / "together")
    alone = {}
    for kind, trial_id in trials.items():
        alone.update(run_in_one_host(prepared, [trial_id], tmp_path / "cache", tmp_path / kind)[0])
    for kind, trial_id in trials.items():
        both, single = together[trial_id], alone[trial_id]
        assert both.status == single.status == "ok", (kind, both.error, single.error)
        assert (both.val_score, both.test_score) == (single.val_score, single.test_score), kind
        assert both.program == single.program, f"{kind}: the compiled program differs when run side by side"
        # Alone, on the side-by-side run's cache, it sent nothing: it asked the very same requests.
        assert single.lm_calls == 0 and single.cache_hits > 0, (kind, single.lm_calls)
    assert imported == ["dspy"], f"a host imported tracking libraries: {imported}"
