"""The gateway as shards on a real Ray against the simulated endpoint: identical requests from two
trials meet in one shard and are sent once, even when another shard owns the endpoint and sends
it; a dead shard is a one-line stop, never a silent restart with fresh counts."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sweep_helpers import REPO, sim_total

from dspy_sweeps.lm.gateway import SERVED, Budget, Endpoint, GatewayError, GatewayLost, make_request, shard_of
from dspy_sweeps_sim.launch import SimServer

SHARDS = 3


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    root = tmp_path_factory.mktemp("sim")
    key = root / "key.jsonl"
    key.write_text(
        "".join(json.dumps({"inputs": {"question": f"q{i}"}, "labels": {"answer": str(i)}}) + "\n" for i in range(9))
    )
    # time_scale 0.5: a call takes long enough for the two trials' requests to be in flight together
    with SimServer(key, root, models=("student", "teacher"), time_scale=0.5) as server:
        yield server


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    from dspy_sweeps.run import runner

    runner.start_ray(None, REPO)
    try:
        yield
    finally:
        ray.shutdown()


def endpoints(sim: SimServer) -> list[Endpoint]:
    return [
        Endpoint(id=f"sim/{m}|", model=m, api_bases=(sim.base_url,), label=f"sim/{m}") for m in ("student", "teacher")
    ]


def body(question: str) -> dict:
    return {"messages": [{"role": "user", "content": f"[[ ## question ## ]]\n{question}"}]}


def routed_away_from(owner: int) -> dict:
    """A request whose shard is not `owner`: its shard forwards the send to the owner."""
    for i in range(100):
        if shard_of(make_request("t", ("sim/teacher|",), body(f"q{i % 9} ({i})")).digest, SHARDS) != owner:
            return body(f"q{i % 9} ({i})")
    raise AssertionError("no body routed away from the owner")


def test_two_trials_asking_the_same_request_through_shards_are_answered_by_one_send(
    ray_session, sim: SimServer, tmp_path: Path
) -> None:
    from dspy_sweeps.run import runner

    gateway = runner.start_gateway(endpoints(sim), tmp_path / "cache", Budget(), shards=SHARDS)
    try:
        same = routed_away_from(owner=1)  # the teacher is the second endpoint: shard 1 owns it
        before = sim_total(sim, "vllm:request_success_total")
        barrier, answers = threading.Barrier(2), {}

        def trial(name: str) -> None:
            barrier.wait()  # both ask at once, from two threads as two trials would
            answers[name] = gateway.complete(name, ("sim/teacher|",), same)

        threads = [threading.Thread(target=trial, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answers[name].pop(SERVED) for name in "ab") in (["merged", "sent"], ["cached", "sent"])
        assert answers["a"] == answers["b"] and answers["a"]["choices"]
        assert sim_total(sim, "vllm:request_success_total") - before == 1, "one send answered both trials"
        a, b = gateway.trial_stats("a"), gateway.trial_stats("b")
        assert (a.requested + b.requested, a.sent + b.sent, a.merged + b.merged + a.cache_hits + b.cache_hits) == (
            2,
            1,
            1,
        )
        assert a.by_model == b.by_model == {"sim/teacher": 1}
        # distinct requests spread over every shard, each counted once in the sum over shards
        for i in range(12):
            gateway.complete("c", ("sim/student|",), body(f"q{i % 9} spread {i}"))
        assert gateway.trial_stats("c").sent == 12 == gateway.totals().sent - 1
    finally:
        gateway.kill()


def test_a_dead_shard_fails_calls_and_is_named_instead_of_restarting(
    ray_session, sim: SimServer, tmp_path: Path
) -> None:
    import ray

    from dspy_sweeps.run import runner

    gateway = runner.start_gateway(endpoints(sim), tmp_path / "cache", Budget(max_lm_calls=100), shards=SHARDS)
    try:
        assert gateway.dead_shard() is None
        ray.kill(gateway.shards[2], no_restart=False)  # no_restart=False: Ray would restart it if allowed
        with contextlib.suppress(ray.exceptions.RayActorError):  # the kill is asynchronous: wait for it to land
            while True:
                ray.get(gateway.shards[2].ping.remote(), timeout=120)
        with pytest.raises(GatewayLost):
            gateway.trial_stats("t")
        assert gateway.dead_shard() == 2
        victim = next(
            body(f"q{i}")
            for i in range(100)
            if shard_of(make_request("t", ("sim/student|",), body(f"q{i}")).digest, SHARDS) == 2
        )
        with pytest.raises(GatewayError) as caught:
            gateway.complete("t", ("sim/student|",), victim)
        assert caught.value.kind == "transport"
    finally:
        gateway.kill()


@pytest.mark.parametrize("shards", [1, SHARDS])
def test_a_budget_spent_across_shards_stops_at_the_same_count_as_on_one(
    ray_session, sim: SimServer, tmp_path: Path, shards: int
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from dspy_sweeps.run import runner

    gateway = runner.start_gateway(endpoints(sim), tmp_path / "cache", Budget(max_lm_calls=25), shards=shards)
    try:
        before = sim_total(sim, "vllm:request_success_total")

        def ask(i: int) -> str:
            try:
                gateway.complete(f"t{i % 4}", (f"sim/{('student', 'teacher')[i % 2]}|",), body(f"q{i % 9} budget {i}"))
                return "answered"
            except GatewayError as exc:
                return exc.kind

        with ThreadPoolExecutor(8) as pool:  # four trials' calls at once, spread over every shard
            outcomes = list(pool.map(ask, range(40)))
        assert outcomes.count("answered") == 25 and outcomes.count("budget") == 15
        assert sim_total(sim, "vllm:request_success_total") - before == 25
        assert sum(gateway.trial_stats(f"t{i}").sent for i in range(4)) == 25
        assert gateway.exhausted()
    finally:
        gateway.kill()
