"""GatewayCore's accounting, exact at a thousand trials and across shards (plain asyncio, no Ray):
an endpoint that answers at once stands in for HTTP, so what is counted is the gateway's own logic."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dspy_sweeps.lm.gateway import (
    CHAT,
    SERVED,
    Budget,
    Endpoint,
    GatewayCore,
    GatewayError,
    _with_model,
    make_request,
    owners_of,
    route_of,
)

ANSWER = {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


class Instant(GatewayCore):
    """A shard whose endpoints answer at once; `posted` lists the bytes it would post."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.posted: list[bytes] = []

    async def _http_call(self, endpoint: Endpoint, base: str, body: bytes, timeout_s: float, route: str = CHAT):
        self.posted.append(_with_model(body, endpoint.model))
        await asyncio.sleep(0.001)  # answers overlap, as real ones do
        return ANSWER


class Local:
    """Stands in for a shard's Ray actor handle: `peer.method.remote(...)` awaits the method."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.core, name)

        class Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                async def run() -> Any:
                    result = method(*args)
                    return await result if asyncio.iscoroutine(result) else result

                return asyncio.ensure_future(run())

        return Remote


def endpoints(n: int = 1) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", model=f"m{i}", api_bases=(f"http://e{i}",)) for i in range(n)]


def body(text: str, **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


def sharded(n: int, budget: Budget | None = None, cache: str | None = None, ends: int = 4) -> list[Instant]:
    shards = [Instant(endpoints(ends), cache, budget, shard=i, shards=n) for i in range(n)]
    for shard in shards:
        shard.connect([Local(s) for s in shards])
    return shards


async def ask(shards: list[GatewayCore], trial: str, endpoint: str, payload: dict) -> Any:
    request = make_request(trial, (endpoint,), payload)
    ids = list(shards[0].endpoints)
    owners = owners_of(ids, len(shards)) if len(ids) >= len(shards) > 1 else None  # as start_gateway routes
    try:
        return await shards[route_of(request, len(shards), owners)].call(request)
    except GatewayError as exc:
        return exc


def summed(shards: list[GatewayCore], trials: list[str]) -> tuple[int, ...]:
    stats = [s.trial_stats(t) for s in shards for t in trials]
    return tuple(sum(getattr(x, name) for x in stats) for name in ("requested", "sent", "merged", "cache_hits"))


@pytest.mark.parametrize("shards", [1, 4])
def test_a_budget_spent_by_a_thousand_trials_stops_at_its_count(shards: int) -> None:
    async def scenario() -> tuple[list[Instant], list[Any]]:
        gateway = sharded(shards, Budget(max_lm_calls=300))
        answers = await asyncio.gather(*(ask(gateway, f"t{i}", f"e{i % 4}", body(f"q{i}")) for i in range(1000)))
        return gateway, answers

    gateway, answers = asyncio.run(scenario())
    refused = [a for a in answers if isinstance(a, GatewayError)]
    assert len(refused) == 700 and {e.kind for e in refused} == {"budget"}
    assert sum(len(s.posted) for s in gateway) == 300, "no call past the budget reached an endpoint"
    assert summed(gateway, [f"t{i}" for i in range(1000)]) == (1000, 300, 0, 0)
    assert gateway[0].spent()[0] == 300 and gateway[0].sending == 0  # the ledger the spend log checkpoints
    assert gateway[0].exhausted()
    if shards > 1:
        assert all(s.posted for s in gateway), "every shard sent for the endpoint it owns"


@pytest.mark.parametrize("shards", [1, 4])
def test_a_thousand_trials_asking_the_same_ten_requests_send_ten(shards: int, tmp_path: Path) -> None:
    async def scenario() -> list[Instant]:
        gateway = sharded(shards, cache=str(tmp_path / "cache"))
        await asyncio.gather(*(ask(gateway, f"t{i}", "e1", body(f"q{i % 10}")) for i in range(1000)))
        # and again once every answer is on disk: all from the cache
        await asyncio.gather(*(ask(gateway, f"t{i}", "e1", body(f"q{i % 10}")) for i in range(100)))
        for shard in gateway:
            await shard.close()
        return gateway

    gateway = asyncio.run(scenario())
    requested, sent, merged, hits = summed(gateway, [f"t{i}" for i in range(1000)])
    assert (requested, sent) == (1100, 10)
    assert merged + hits == 1090 and hits >= 100
    assert sum(len(s.posted) for s in gateway) == 10
    owner = [s for s in gateway if s.owners["e1"] == s.shard][0]
    assert len(owner.posted) == 10, "the endpoint's owner shard made every send"


def test_sampled_draws_are_dropped_when_the_trial_is_done_and_replay_from_the_cache(tmp_path: Path) -> None:
    sampled = body("q", temperature=1.0)

    async def scenario() -> Instant:
        gateway = Instant(endpoints(), str(tmp_path / "cache"))
        await asyncio.gather(*(gateway.complete("t", "e0", sampled) for _ in range(3)))
        assert gateway.trial_stats("t", done=True).sent == 3
        assert gateway.draws == {}, "a finished trial's draw counters are gone"
        await asyncio.gather(*(gateway.complete("t", "e0", sampled) for _ in range(3)))
        await gateway.close()
        return gateway

    gateway = asyncio.run(scenario())
    stats = gateway.trial_stats("t")
    assert (stats.requested, stats.sent, stats.cache_hits) == (6, 3, 3), "the rerun replayed its three draws"


def test_the_body_is_posted_as_sent_with_the_served_model_name() -> None:
    import json

    async def scenario() -> Instant:
        gateway = Instant(endpoints(), None)
        await gateway.complete("t", "e0", body("hello", max_tokens=5))
        await gateway.complete("t", "e0", {})
        return gateway

    posted = [json.loads(b) for b in asyncio.run(scenario()).posted]
    assert posted == [{"model": "m0", **body("hello", max_tokens=5)}, {"model": "m0"}]


def test_a_fallback_continues_on_its_endpoints_owner_shard() -> None:
    from dspy_sweeps.lm.gateway import Request

    class Down(Instant):  # e0 answers 503, the others at once
        async def _http_call(self, endpoint: Endpoint, base: str, body: bytes, timeout_s: float, route: str = CHAT):
            if endpoint.id == "e0":
                raise GatewayError("server", "e0: HTTP 503", 503)
            return await super()._http_call(endpoint, base, body, timeout_s, route)

    async def scenario() -> tuple[list[Instant], list[Any]]:
        ends = [Endpoint(id=f"e{i}", model=f"m{i}", api_bases=(f"http://e{i}",), retries=0) for i in range(4)]
        shards = [Down(ends, None, None, shard=i, shards=4) for i in range(4)]
        for shard in shards:
            shard.connect([Local(s) for s in shards])
        requests: list[Request] = [make_request(f"t{i}", ("e0", "e1"), body("same")) for i in range(3)]
        answers = await asyncio.gather(*(shards[0].call(r) for r in requests))  # e0's owner is shard 0
        return shards, answers

    shards, answers = asyncio.run(scenario())
    assert sorted(a.pop(SERVED) for a in answers) == ["merged", "merged", "sent"]
    assert answers == [ANSWER] * 3
    assert [len(s.posted) for s in shards] == [0, 1, 0, 0], "e1's owner sent the fallback once for all three"
    stats = [s.trial_stats(f"t{i}") for s in shards for i in range(3)]
    assert sum(x.requested for x in stats) == 3 and sum(x.fell_back for x in stats) == 3
    assert sum(x.by_model.get("m1", 0) for x in stats) == 3 and sum(x.failed for x in stats) == 0
