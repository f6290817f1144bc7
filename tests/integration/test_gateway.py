"""The LM gateway against the simulated endpoint on loopback (plain asyncio, no Ray):
merging, the persistent cache, the in-flight cap, per-trial accounting."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspy_sweeps.lm.gateway import Budget, Endpoint, GatewayCore, GatewayError
from dspy_sweeps.sim.launch import SimServer


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    root = tmp_path_factory.mktemp("sim")
    key = root / "key.jsonl"
    key.write_text(
        "".join(json.dumps({"inputs": {"question": f"q{i}"}, "labels": {"answer": str(i)}}) + "\n" for i in range(50))
    )
    # time_scale 0.2: a call takes ~10-100 ms, long enough for requests to overlap
    with SimServer(key, root, models=("student",), max_num_seqs=4, time_scale=0.2) as server:
        yield server


def metric(sim: SimServer, name: str) -> float:
    text = urllib.request.urlopen(sim.base_url.removesuffix("/v1") + "/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def body(question: str) -> dict:
    return {"messages": [{"role": "user", "content": f"[[ ## question ## ]]\n{question}"}]}


def endpoint(sim: SimServer, **kwargs) -> Endpoint:
    return Endpoint(id="sim/student|", model="student", api_bases=(sim.base_url,), **kwargs)


def run(coro):
    return asyncio.run(coro)


def test_identical_requests_in_flight_together_make_one_call(sim: SimServer, tmp_path: Path) -> None:
    async def scenario() -> GatewayCore:
        gateway = GatewayCore([endpoint(sim)], str(tmp_path / "cache"))
        first, second = await asyncio.gather(
            gateway.complete("trial-a", "sim/student|", body("q1")),
            gateway.complete("trial-b", "sim/student|", body("q1")),
        )
        assert first == second
        await gateway.close()
        return gateway

    before = metric(sim, "vllm:request_success_total")
    gateway = run(scenario())
    assert metric(sim, "vllm:request_success_total") - before == 1
    a, b = gateway.trial_stats("trial-a"), gateway.trial_stats("trial-b")
    assert (a.sent + b.sent, a.merged + b.merged, a.requested + b.requested) == (1, 1, 2)


def test_a_new_gateway_on_the_same_cache_sends_nothing(sim: SimServer, tmp_path: Path) -> None:
    async def ask(questions: list[str]) -> GatewayCore:
        gateway = GatewayCore([endpoint(sim)], str(tmp_path / "cache"))
        await asyncio.gather(*(gateway.complete("t", "sim/student|", body(q)) for q in questions))
        await gateway.close()
        return gateway

    questions = [f"q{i}" for i in range(10)]
    assert run(ask(questions)).trial_stats("t").sent == 10
    before = metric(sim, "vllm:request_success_total")
    again = run(ask(questions)).trial_stats("t")
    assert (again.sent, again.cache_hits) == (0, 10)
    assert metric(sim, "vllm:request_success_total") == before


def test_sampled_requests_stay_distinct_and_replay_on_a_rerun(sim: SimServer, tmp_path: Path) -> None:
    sampled = {**body("q2"), "temperature": 1.0}

    async def draw_three(trial: str) -> GatewayCore:
        gateway = GatewayCore([endpoint(sim)], str(tmp_path / "cache"))
        await asyncio.gather(*(gateway.complete(trial, "sim/student|", sampled) for _ in range(3)))
        await gateway.close()
        return gateway

    first = run(draw_three("t")).trial_stats("t")
    assert (first.sent, first.merged) == (3, 0), "three draws are three calls, never merged"
    rerun = run(draw_three("t")).trial_stats("t")
    assert (rerun.sent, rerun.cache_hits) == (0, 3), "a re-run of the trial replays its draws"
    other = run(draw_three("u")).trial_stats("u")
    assert other.sent == 3, "another trial draws its own samples"


def test_in_flight_requests_fill_but_never_exceed_the_endpoint_cap(sim: SimServer, tmp_path: Path) -> None:
    with SimServer(sim.answer_key, tmp_path, models=("student",), max_num_seqs=16, time_scale=0.2) as fresh:

        async def scenario() -> None:
            gateway = GatewayCore([endpoint(fresh, max_concurrency=3)], None)
            await asyncio.gather(*(gateway.complete("t", "sim/student|", body(f"cap{i}")) for i in range(20)))
            await gateway.close()

        run(scenario())
        assert metric(fresh, "sim_peak_running") == 3


def test_token_counts_match_the_endpoint_and_budget_stops_sending(sim: SimServer, tmp_path: Path) -> None:
    async def scenario() -> GatewayCore:
        gateway = GatewayCore([endpoint(sim)], None, Budget(max_lm_calls=5))
        results = await asyncio.gather(
            *(gateway.complete("t", "sim/student|", body(f"budget{i}")) for i in range(8)), return_exceptions=True
        )
        await gateway.close()
        errors = [r for r in results if isinstance(r, GatewayError)]
        assert len(errors) == 3 and all(e.kind == "budget" for e in errors)
        return gateway

    before = (metric(sim, "vllm:prompt_tokens_total"), metric(sim, "vllm:generation_tokens_total"))
    stats = run(scenario()).trial_stats("t")
    assert (stats.requested, stats.sent, stats.failed) == (8, 5, 0)  # refused calls were never sent
    assert stats.prompt_tokens == metric(sim, "vllm:prompt_tokens_total") - before[0]
    assert stats.completion_tokens == metric(sim, "vllm:generation_tokens_total") - before[1]


def test_unreachable_endpoint_is_a_transport_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        gateway = GatewayCore([Endpoint(id="x", model="x", api_bases=("http://127.0.0.1:9/v1",), timeout_s=5)], None)
        with pytest.raises(GatewayError) as caught:
            await gateway.complete("t", "x", body("q"))
        assert caught.value.kind == "transport"
        await gateway.close()

    run(scenario())


def test_a_429_pauses_the_endpoint_for_retry_after_then_succeeds(sim: SimServer, tmp_path: Path) -> None:
    import time

    sim.set_faults("rate_limit", count=1, retry_after=1.0)

    async def scenario() -> tuple[float, float]:
        gateway = GatewayCore([endpoint(sim)], None)
        start = time.monotonic()

        async def timed(question: str, delay: float) -> float:
            await asyncio.sleep(delay)
            assert (await gateway.complete("t", "sim/student|", body(question)))["choices"]
            return time.monotonic() - start

        # the second call starts during the pause and is not rate limited itself, yet it waits:
        # the whole endpoint backs off, so concurrent trials do not storm it
        first, second = await asyncio.gather(timed("rl1", 0.0), timed("rl2", 0.3))
        await gateway.close()
        return first, second

    try:
        first, second = run(scenario())
        assert first >= 1.0 and second >= 1.0
    finally:
        sim.set_faults("ok")
    assert sim.stats()["models"]["student"]["faults"].get("rate_limit") == 1


def test_a_refused_key_is_an_auth_error_without_retries(sim: SimServer, tmp_path: Path) -> None:
    sim.set_faults("unauthorized", count=1)

    async def scenario() -> None:
        gateway = GatewayCore([endpoint(sim)], None)
        with pytest.raises(GatewayError) as caught:
            await gateway.complete("t", "sim/student|", body("auth1"))
        assert caught.value.kind == "auth" and caught.value.status == 401
        await gateway.close()

    try:
        run(scenario())
    finally:
        sim.set_faults("ok")


def test_embeddings_go_through_the_gateway_cached_and_counted(sim: SimServer, tmp_path: Path) -> None:
    from dspy_sweeps.lm.gateway import EMBEDDINGS

    texts = {"input": ["What is 2 plus 2?", "What is 2 plus 3?", "Name a colour."]}

    async def scenario(cache: str) -> tuple[dict, GatewayCore]:
        gateway = GatewayCore([endpoint(sim)], cache)
        response = await gateway.complete("knn", "sim/student|", texts, EMBEDDINGS)
        again = await gateway.complete("knn", "sim/student|", texts, EMBEDDINGS)
        assert again == response
        await gateway.close()
        return response, gateway

    before = metric(sim, "vllm:request_success_total")
    response, gateway = run(scenario(str(tmp_path / "cache")))
    assert metric(sim, "vllm:request_success_total") - before == 1, "the repeat came from the cache"
    stats = gateway.trial_stats("knn")
    assert (stats.requested, stats.sent, stats.cache_hits) == (2, 1, 1)
    assert stats.prompt_tokens > 0
    vectors = [item["embedding"] for item in sorted(response["data"], key=lambda item: item["index"])]
    assert len(vectors) == 3 and len(vectors[0]) == 64

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]), "texts sharing words lie closer"
