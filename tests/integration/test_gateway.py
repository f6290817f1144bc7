"""The LM gateway against the simulated endpoint on loopback (plain asyncio, no Ray):
merging, the persistent cache, the in-flight cap, per-trial accounting, the one retry layer
and fallback chains."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspy_sweeps.lm.gateway import SERVED, Budget, Endpoint, GatewayCore, GatewayError
from dspy_sweeps_sim.launch import SimServer


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    root = tmp_path_factory.mktemp("sim")
    key = root / "key.jsonl"
    key.write_text(
        "".join(json.dumps({"inputs": {"question": f"q{i}"}, "labels": {"answer": str(i)}}) + "\n" for i in range(50))
    )
    # time_scale 0.2: a call takes ~10-100 ms, long enough for requests to overlap
    with SimServer(key, root, models=("student", "teacher", "gpt-4o-mini"), max_num_seqs=4, time_scale=0.2) as server:
        yield server


def metric(sim: SimServer, name: str) -> float:
    text = urllib.request.urlopen(sim.base_url.removesuffix("/v1") + "/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def body(question: str) -> dict:
    return {"messages": [{"role": "user", "content": f"[[ ## question ## ]]\n{question}"}]}


def endpoint(sim: SimServer, **kwargs) -> Endpoint:
    return Endpoint(id="sim/student|", model="student", api_bases=(sim.base_url,), **kwargs)


def teacher(sim: SimServer, **kwargs) -> Endpoint:
    return Endpoint(id="sim/teacher|", model="teacher", api_bases=(sim.base_url,), label="sim/teacher", **kwargs)


def faults(sim: SimServer, model: str, mode: str) -> int:
    return sim.stats()["models"][model]["faults"].get(mode, 0)


def answered(sim: SimServer, model: str) -> int:
    return sim.stats()["models"][model]["ok"]


def run(coro):
    return asyncio.run(coro)


def test_identical_requests_in_flight_together_make_one_call(sim: SimServer, tmp_path: Path) -> None:
    async def scenario() -> GatewayCore:
        gateway = GatewayCore([endpoint(sim)], str(tmp_path / "cache"))
        first, second = await asyncio.gather(
            gateway.complete("trial-a", "sim/student|", body("q1")),
            gateway.complete("trial-b", "sim/student|", body("q1")),
        )
        assert {first.pop(SERVED), second.pop(SERVED)} == {"sent", "merged"}  # each answer says how it came
        assert first == second
        await gateway.close()
        return gateway

    before = metric(sim, "vllm:request_success_total")
    gateway = run(scenario())
    assert metric(sim, "vllm:request_success_total") - before == 1
    a, b = gateway.trial_stats("trial-a"), gateway.trial_stats("trial-b")
    assert (a.sent + b.sent, a.merged + b.merged, a.requested + b.requested) == (1, 1, 2)


def test_a_new_gateway_on_the_same_cache_sends_nothing(sim: SimServer, tmp_path: Path) -> None:
    served: list[str] = []

    async def ask(questions: list[str]) -> GatewayCore:
        gateway = GatewayCore([endpoint(sim)], str(tmp_path / "cache"))
        answers = await asyncio.gather(*(gateway.complete("t", "sim/student|", body(q)) for q in questions))
        served.extend(a[SERVED] for a in answers)
        await gateway.close()
        return gateway

    questions = [f"q{i}" for i in range(10)]
    assert run(ask(questions)).trial_stats("t").sent == 10
    before = metric(sim, "vllm:request_success_total")
    again = run(ask(questions)).trial_stats("t")
    assert (again.sent, again.cache_hits) == (0, 10)
    assert served == ["sent"] * 10 + ["cached"] * 10
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


def test_a_failing_call_is_sent_at_most_retries_plus_one_times(sim: SimServer, tmp_path: Path) -> None:
    sim.set_faults("error503", model="teacher")  # down for good

    async def scenario() -> GatewayCore:
        gateway = GatewayCore([teacher(sim, retries=2)], None)
        with pytest.raises(GatewayError) as caught:
            await gateway.complete("t", "sim/teacher|", body("retry1"))
        assert caught.value.kind == "server" and caught.value.status == 503
        assert "gave up after 3 sends" in str(caught.value)
        await gateway.close()
        return gateway

    before = faults(sim, "teacher", "error503")
    try:
        stats = run(scenario()).trial_stats("t")
    finally:
        sim.set_faults("ok")
    assert faults(sim, "teacher", "error503") - before == 3, "one send and two retries, no hidden layer"
    assert (stats.requested, stats.sent, stats.retries, stats.gave_up, stats.failed) == (1, 0, 2, 1, 1)


def test_retries_end_within_max_retry_s_of_the_first_failure(sim: SimServer, tmp_path: Path) -> None:
    """Back-off waits 0.5 s then 1 s: with 1 s to retry in, the second wait would end past it."""
    sim.set_faults("error500", model="teacher")

    async def scenario() -> GatewayCore:
        gateway = GatewayCore([teacher(sim, retries=10, max_retry_s=1.0)], None)
        with pytest.raises(GatewayError, match="gave up after 2 sends"):
            await gateway.complete("t", "sim/teacher|", body("retry2"))
        await gateway.close()
        return gateway

    before = faults(sim, "teacher", "error500")
    try:
        stats = run(scenario()).trial_stats("t")
    finally:
        sim.set_faults("ok")
    assert faults(sim, "teacher", "error500") - before == 2
    assert (stats.retries, stats.gave_up) == (1, 1)


def test_a_short_outage_is_retried_and_counted(sim: SimServer, tmp_path: Path) -> None:
    sim.set_faults("error503", count=2, model="teacher")

    async def scenario() -> GatewayCore:
        gateway = GatewayCore([teacher(sim)], None)
        assert (await gateway.complete("t", "sim/teacher|", body("retry3")))["choices"]
        await gateway.close()
        return gateway

    before = faults(sim, "teacher", "error503")
    stats = run(scenario()).trial_stats("t")
    assert faults(sim, "teacher", "error503") - before == 2 and sim.get_faults() == []
    assert (stats.sent, stats.retries, stats.gave_up, stats.failed) == (1, 2, 0, 0)
    assert stats.by_model == {"sim/teacher": 1}


def test_a_call_past_its_retries_goes_to_the_next_model_of_the_chain(sim: SimServer, tmp_path: Path) -> None:
    sim.set_faults("error503", model="teacher")
    backup = Endpoint(id="sim/student|", model="student", api_bases=(sim.base_url,), label="sim/student")

    async def scenario() -> GatewayCore:
        gateway = GatewayCore([teacher(sim, retries=1), backup], str(tmp_path / "cache"))
        for question in ("fb1", "fb2"):
            response = await gateway.complete("t", "sim/teacher|", body(question), fallbacks=("sim/student|",))
            assert response["choices"][0]["message"]["content"]
        await gateway.close()
        return gateway

    before = (faults(sim, "teacher", "error503"), answered(sim, "student"), answered(sim, "teacher"))
    try:
        stats = run(scenario()).trial_stats("t")
    finally:
        sim.set_faults("ok")
    assert faults(sim, "teacher", "error503") - before[0] == 4, "the teacher was tried (and retried) first"
    assert answered(sim, "student") - before[1] == 2 and answered(sim, "teacher") == before[2]
    assert (stats.requested, stats.sent, stats.fell_back, stats.gave_up, stats.failed) == (2, 2, 2, 2, 0)
    assert stats.by_model == {"sim/student": 2}


def test_a_refused_key_is_never_passed_to_a_fallback(sim: SimServer, tmp_path: Path) -> None:
    sim.set_faults("unauthorized", model="teacher")
    backup = Endpoint(id="sim/student|", model="student", api_bases=(sim.base_url,))

    async def scenario() -> None:
        gateway = GatewayCore([teacher(sim), backup], None)
        for _ in range(2):  # the second call is refused without a send
            with pytest.raises(GatewayError) as caught:
                await gateway.complete("t", "sim/teacher|", body("auth2"), fallbacks=("sim/student|",))
            assert caught.value.kind == "auth"
        stats = gateway.trial_stats("t")
        assert (stats.retries, stats.fell_back, stats.failed) == (0, 0, 2)
        await gateway.close()

    before = (faults(sim, "teacher", "unauthorized"), answered(sim, "student"))
    try:
        run(scenario())
    finally:
        sim.set_faults("ok")
    assert faults(sim, "teacher", "unauthorized") - before[0] == 1
    assert answered(sim, "student") == before[1]


# -- the LiteLLM route of cloud models (no api_base), with LiteLLM's OpenAI provider pointed at the simulator


@pytest.fixture
def cloud(sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> Endpoint:
    """`openai/gpt-4o-mini` as a cloud teacher: LiteLLM speaks to it over HTTP at $OPENAI_API_BASE."""
    monkeypatch.setenv("OPENAI_API_BASE", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return Endpoint(id="openai/gpt-4o-mini|", model="openai/gpt-4o-mini", label="openai/gpt-4o-mini", retries=1)


def test_a_cloud_model_goes_through_litellm_and_is_priced_by_its_cost_map(sim: SimServer, cloud: Endpoint) -> None:
    import litellm

    async def scenario() -> GatewayCore:
        gateway = GatewayCore([cloud], None)
        response = await gateway.complete("t", cloud.id, body("cloud1"))
        assert response["choices"][0]["message"]["content"]
        await gateway.close()
        return gateway

    before = answered(sim, "gpt-4o-mini")
    stats = run(scenario()).trial_stats("t")
    assert answered(sim, "gpt-4o-mini") - before == 1, "the call reached the endpoint over HTTP"
    prompt, completion = litellm.cost_per_token(
        model="gpt-4o-mini", prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens
    )
    assert stats.prompt_tokens > 0 and prompt + completion > 0
    assert stats.cost_usd == pytest.approx(prompt + completion)
    assert stats.by_model == {"openai/gpt-4o-mini": 1}


def test_litellm_errors_are_retried_once_each_and_fall_back(sim: SimServer, cloud: Endpoint) -> None:
    """503 and 429 through LiteLLM: no retry hidden inside LiteLLM or the OpenAI client (two sends for
    retries=1), then the call goes to the fallback; LiteLLM's 429 still pauses the endpoint."""
    sim.set_faults("error503", count=2, model="gpt-4o-mini")
    sim.set_faults("rate_limit", count=2, model="gpt-4o-mini", retry_after=0.2, append=True)
    backup = Endpoint(id="sim/student|", model="student", api_bases=(sim.base_url,), label="sim/student")

    async def scenario() -> GatewayCore:
        gateway = GatewayCore([cloud, backup], None)
        for question in ("cloud2", "cloud3"):
            await gateway.complete("t", cloud.id, body(question), fallbacks=(backup.id,))
        await gateway.close()
        return gateway

    before = (faults(sim, "gpt-4o-mini", "error503"), faults(sim, "gpt-4o-mini", "rate_limit"))
    try:
        stats = run(scenario()).trial_stats("t")
    finally:
        sim.set_faults("ok")
    assert faults(sim, "gpt-4o-mini", "error503") - before[0] == 2
    assert faults(sim, "gpt-4o-mini", "rate_limit") - before[1] == 2
    assert (stats.retries, stats.gave_up, stats.fell_back, stats.failed) == (2, 2, 2, 0)
    assert stats.by_model == {"sim/student": 2}


def test_embeddings_go_through_the_gateway_cached_and_counted(sim: SimServer, tmp_path: Path) -> None:
    from dspy_sweeps.lm.gateway import EMBEDDINGS

    texts = {"input": ["What is 2 plus 2?", "What is 2 plus 3?", "Name a colour."]}

    async def scenario(cache: str) -> tuple[dict, GatewayCore]:
        gateway = GatewayCore([endpoint(sim)], cache)
        response = await gateway.complete("knn", "sim/student|", texts, route=EMBEDDINGS)
        again = await gateway.complete("knn", "sim/student|", texts, route=EMBEDDINGS)
        assert (response.pop(SERVED), again.pop(SERVED)) == ("sent", "cached")
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
