"""The LM gateway: every LM call of every trial goes through the sweep's asyncio gateway shards.

Trials talk to it through `GatewayEngine`, a DSPy engine (DSPy 3.4's `complete(Request) ->
Response` contract), so DSPy keeps its adapters, retries, callbacks and history while the
gateway owns the connection. The gateway, shared by all trials of the sweep:

- merges identical requests that are in flight at the same time, from any trial or process;
- serves repeats from a disk cache under the state dir (a re-run pays nothing), keyed by
  the endpoint's identity (model and served checkpoint), so two models never share entries;
- keeps at most `max_concurrency` requests in flight per endpoint, spread over its replicas;
- honours `rpm`/`tpm` limits and a 429's `Retry-After` for the whole endpoint at once;
- is the one retry layer (DSPy's own is off): a logical call is sent at most `retries + 1`
  times, retries end within `max_retry_s` of its first failure, and a call that fails past
  them with a rate limit, 5xx, timeout or dropped connection goes to the next model of its
  fallback chain; a refused key (401/403) is never retried nor passed on;
- counts per trial: calls requested, sent, served from cache, merged, failed, retried,
  given up, passed to a fallback, answered per model, tokens, latency and cost (LiteLLM's price map for cloud models, `cost_per_hour` × busy time for
  self-hosted ones); and enforces the sweep's budget.

Cost per call is O(1) in the number of trials: the budget reads running totals, a trial's
sampled-draw counters are dropped when its figures are collected, and the disk cache is written
on a thread, in batches (an answer not yet on disk is kept in memory until it is, so a repeat
never misses it); reads stay on the loop (see `_read`). The trial side serialises a request's body once (sorted-key JSON bytes,
`Request`); its digest is the cache key's body part and picks the shard.

Shards: at scale one event loop is the ceiling, so the gateway is N actors (`lm/shards.py`
`Gateway`, the picklable handle trials hold, routes each call). Limits belong to endpoints, so each endpoint has
**one owner shard** that holds its slots, rpm/tpm windows, Retry-After pause, replicas and busy
time, and does its sends. When every shard owns an endpoint (endpoints ≥ shards), a call goes
to its endpoint's owner, which also merges, caches and counts it: identical requests meet
there, and no call takes a second hop (a fallback continues on the fallback's owner). With
fewer endpoints than shards, a call goes to the shard its body's digest picks (identical
requests still meet), which forwards a miss to the endpoint's owner to send: one more actor
hop, paid only by calls actually sent.
Why an owner rather than splitting each endpoint's limits N ways: a split strands capacity
whenever the load per shard is uneven, cannot express `max_concurrency` below N, and a 429's
pause would have to be broadcast; a shared store (Redis) would be one more server to run.
The budget has one owner too (shard 0, the ledger): with a budget set, every logical call
reserves its send there first, so a budget spent across shards stops at the same count as on
one. Shards run on the driver's node and are never restarted (a restarted shard would have
silently lost its counts and the budget's): the sweep stops with one line if one dies.

Why async actors rather than a LiteLLM proxy in front of the endpoints: a proxy would
still leave identical in-flight requests from different trials unmerged, and it adds a
second HTTP hop and a server process to operate; an actor is one Python object that Ray
places and supervises, and its per-call overhead is measured in `make bench`.

`GatewayCore` is plain asyncio (tested without Ray, and importable where Ray must not be);
`run/runner.py` `start_gateway` wraps N of them in Ray actors behind the `Gateway` handle of
`lm/shards.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

Body = dict[str, Any]
CHAT, EMBEDDINGS = "chat/completions", "embeddings"  # the OpenAI routes the gateway speaks
SERVED = "x_gateway"  # in each answer: how the gateway answered it, "sent", "cached" or "merged" (cache holds none)
REPLICA_COOLDOWN_S = 5.0  # a replica that refused or dropped a connection gets no requests for this long
BACKOFF_S = 0.5  # the first retry's wait when the endpoint names none (Retry-After); it doubles per retry
# Failures worth another send, and worth the next model of the chain once the retries are spent;
# a refused key, a bad request or the spent budget would fail the same way anywhere.
PASSING = frozenset({"rate_limit", "server", "timeout", "transport"})


@dataclass(frozen=True)
class Endpoint:
    """Where one model is served. `api_bases` empty means a cloud model reached through LiteLLM."""

    id: str  # identity in cache keys: the sweep's model string plus the served checkpoint
    model: str  # the name sent in requests (served name, or a LiteLLM model string)
    api_bases: tuple[str, ...] = ()
    api_key_env: str | None = None
    max_concurrency: int = 64
    rpm: int | None = None
    tpm: int | None = None
    cost_per_hour: float | None = None
    timeout_s: float = 600.0
    retries: int = 4  # resends of a failed call
    max_retry_s: float = 60.0  # retries end within this long after a call's first failure
    label: str = ""  # the sweep's model string, as records name it (default: `model`)


@dataclass
class CallStats:
    requested: int = 0
    sent: int = 0
    cache_hits: int = 0
    merged: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0  # summed over calls sent
    slot_s: float = 0.0  # endpoint slot-seconds the trial's calls occupied
    cost_usd: float = 0.0
    retries: int = 0  # sends beyond a call's first, on the same model
    gave_up: int = 0  # calls whose retries on one model were spent (or ran out of time)
    fell_back: int = 0  # calls passed to the next model of their chain
    by_model: dict[str, int] = field(default_factory=dict)  # answers (sent, cached or merged) per model

    def add(self, other: CallStats) -> None:
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for model, count in other.by_model.items():
            self.by_model[model] = self.by_model.get(model, 0) + count


_COUNTS = tuple(f.name for f in fields(CallStats) if f.name != "by_model")


@dataclass(frozen=True)
class Request:
    """One logical call as the trial side made it: the body serialised once (sorted-key JSON),
    its digest (the body's part of the cache key, and what picks the shard), whether it samples."""

    trial_id: str
    chain: tuple[str, ...]  # the endpoint, then its fallbacks
    body: bytes
    digest: str
    sampled: bool
    route: str = CHAT


def make_request(trial_id: str, chain: tuple[str, ...], body: Body, route: str = CHAT) -> Request:
    data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS, default=str)
    digest = hashlib.blake2b(route.encode() + b"\0" + data, digest_size=16).hexdigest()
    return Request(trial_id, tuple(chain), data, digest, bool(body.get("temperature")), route)


def shard_of(digest: str, shards: int) -> int:
    return int(digest[:8], 16) % shards


def owners_of(endpoint_ids: list[str], shards: int) -> dict[str, int]:
    """Each endpoint's owner shard: the one that holds its limits and sends its calls."""
    return {eid: i % shards for i, eid in enumerate(endpoint_ids)}


def route_of(request: Request, shards: int, owners: dict[str, int] | None) -> int:
    """The shard a call goes to: its endpoint's owner when every shard owns an endpoint (`owners`
    given), so no call needs a second hop; else the one its body's digest picks."""
    return owners[request.chain[0]] if owners else shard_of(request.digest, shards)


@dataclass(frozen=True)
class Sent:
    """What an endpoint's owner shard sends back for one logical call: the answer or the error,
    and the call's figures (sends, retries, tokens...), which the routing shard adds to the trial's."""

    response: Body | None
    error: GatewayError | None
    stats: CallStats
    hosted_usd: float  # the owner's self-hosted cost so far, for the ledger's dollar budget


@dataclass
class Budget:
    max_lm_calls: int | None = None
    max_usd: float | None = None


class GatewayError(Exception):
    """A call the gateway could not complete; `kind` maps to a DSPy (lm15) error in the engine."""

    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.status, self.retry_after = kind, status, retry_after

    def __reduce__(self) -> tuple:
        # Ray pickles it back to the trial; the default would call GatewayError(message) and fail,
        # and the trial would see an unretryable "failed to deserialize" instead of, say, a transport error.
        return (type(self), (self.kind, str(self), self.status, self.retry_after))


@dataclass
class _EndpointState:
    endpoint: Endpoint
    slots: asyncio.Semaphore
    in_flight: dict[str, int] = field(default_factory=dict)  # per replica base URL
    down_until: dict[str, float] = field(default_factory=dict)  # replica -> when to try it again
    paused_until: float = 0.0
    requests: deque = field(default_factory=deque)  # start times of requests in the last minute
    tokens: deque = field(default_factory=deque)  # (time, total tokens) of answers in the last minute
    running: int = 0
    busy_since: float | None = None
    refused: GatewayError | None = None  # a refused key: no further call is sent to this endpoint
    busy_s: float = 0.0
    slot_s: float = 0.0


class GatewayCore:
    """One shard of the gateway (all of it when `shards` is 1): plain asyncio, no Ray."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        cache_dir: str | None,
        budget: Budget | None = None,
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        import diskcache

        self.shard, self.peers = shard, [self]  # every shard by index, this one included (see `connect`)
        self.owners = owners_of([e.id for e in endpoints], shards)  # endpoint -> the shard that sends
        self.by_endpoint = len(endpoints) >= shards > 1  # calls arrive at their endpoint's owner (`route`)
        self.endpoints = {e.id: _EndpointState(e, asyncio.Semaphore(e.max_concurrency)) for e in endpoints}
        for state in self.endpoints.values():
            state.in_flight = {base: 0 for base in state.endpoint.api_bases}
        self.costly = [s for s in self.endpoints.values() if s.endpoint.cost_per_hour]
        self.cache = diskcache.Cache(cache_dir) if cache_dir else None
        # SQLite writes run on a thread of their own; an answer stays in `unwritten` until it is
        # on disk, so a repeat asked meanwhile is still a hit.
        self.to_write: queue.SimpleQueue = queue.SimpleQueue()
        self.writer: threading.Thread | None = None
        self.unwritten: dict[str, Body] = {}
        self.budget = budget or Budget()
        self.budgeted = self.budget.max_lm_calls is not None or self.budget.max_usd is not None
        self.pending: dict[str, asyncio.Future] = {}  # key -> the answer of the call in flight
        self.stats: dict[str, CallStats] = {}
        self.session: Any = None
        self.draws: dict[str, dict[str, int]] = {}  # trial -> request key -> sampled draws so far
        self.started = time.monotonic()
        # The ledger (shard 0's is the sweep's): running totals, so a budget check is O(1) in trials.
        self.sending = 0  # calls on their way to an endpoint: they count against the budget already
        self.sent_total = 0
        self.cloud_usd = 0.0
        self.hosted_usd: dict[int, float] = {}  # owner shard -> its self-hosted cost at its last answer

    def connect(self, peers: list[Any]) -> None:
        """Every shard's actor handle, by index (`start_gateway` calls it once on each shard)."""
        self.peers = list(peers)

    # -- the call path -------------------------------------------------------------------

    async def complete(
        self, trial_id: str, endpoint_id: str, body: Body, fallbacks: tuple[str, ...] = (), route: str = CHAT
    ) -> Body:
        """An OpenAI chat-completions (or, with `route=EMBEDDINGS`, embeddings) response for `body`,
        from cache, a merged call or the endpoint; when `endpoint_id` fails past its retries, from
        the first of `fallbacks` that answers."""
        return await self.call(make_request(trial_id, (endpoint_id, *fallbacks), body, route))

    async def call(self, request: Request) -> Body:
        """`complete` for a request the trial side serialised (what `Gateway` sends)."""
        stats = self.stats.setdefault(request.trial_id, CallStats())
        stats.requested += 1
        return await self._chain(request, 0, stats)

    async def follow(self, request: Request, position: int) -> tuple[Body | None, GatewayError | None]:
        """The rest of a call's chain from `position`, on the owner of that endpoint (another shard
        fell back to it); the error is returned, not raised, so it reaches that shard unwrapped."""
        try:
            return await self._chain(request, position, self.stats.setdefault(request.trial_id, CallStats())), None
        except GatewayError as exc:
            return None, exc

    async def _chain(self, request: Request, first: int, stats: CallStats) -> Body:
        for position in range(first, len(request.chain)):
            current = request.chain[position]
            if self.by_endpoint and self.owners[current] != self.shard:  # its owner merges and sends it
                response, error = await self.peers[self.owners[current]].follow.remote(request, position)
                if error is not None:
                    raise error  # counted where it failed
                return response
            try:
                response = await self._complete_on(request, current, stats)
            except GatewayError as exc:
                if exc.kind not in PASSING or position == len(request.chain) - 1:
                    stats.failed += exc.kind != "budget"  # a call the budget refused was never made
                    raise
                stats.fell_back += 1
                continue
            label = self.endpoints[current].endpoint.label or self.endpoints[current].endpoint.model
            stats.by_model[label] = stats.by_model.get(label, 0) + 1
            return response
        raise AssertionError("unreachable: the chain has at least one endpoint")

    async def _complete_on(self, request: Request, endpoint_id: str, stats: CallStats) -> Body:
        if (refused := self.endpoints[endpoint_id].refused) is not None:
            raise refused
        key = self._request_key(request, endpoint_id)
        if key in self.pending:
            stats.merged += 1
            return {**await asyncio.shield(self.pending[key]), SERVED: "merged"}
        if (hit := self._read(key)) is not None:
            stats.cache_hits += 1
            return {**hit, SERVED: "cached"}
        future = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        try:
            response = await self._reserved_send(request, endpoint_id, stats)
            self._write(key, response)
            future.set_result(response)
            return {**response, SERVED: "sent"}
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: merged callers re-raise it, nobody else must
            raise
        finally:
            if not future.done():  # cancelled: the callers merged into it must not wait forever
                future.cancel()
            self.pending.pop(key, None)

    def _request_key(self, request: Request, endpoint_id: str) -> str:
        """Identical requests share a key. A sampled request (temperature > 0) is the trial's n-th
        draw of that request instead: draws stay distinct (never merged), and a re-run of the
        trial replays its own draws from the cache. DSPy's rollout ids do not reach an engine
        in DSPy 3.4, so the draw count stands in for them."""
        key = f"{endpoint_id}\0{request.digest}"
        if not request.sampled:
            return key
        draws = self.draws.setdefault(request.trial_id, {})
        draw = draws.get(key, 0)
        draws[key] = draw + 1
        return f"{key}\0{request.trial_id}\0{draw}"

    def _read(self, key: str) -> Body | None:
        """An answer not yet on disk, or SQLite's: a read takes ~10 µs and, in SQLite's WAL mode,
        never waits for a writer, so it stays on the loop (a thread hop would cost more CPU)."""
        if self.cache is None:
            return None
        hit = self.unwritten.get(key)
        return hit if hit is not None else self.cache.get(key)

    def _write(self, key: str, response: Body) -> None:
        """Queued for the writer thread: a write takes ~100 µs and SQLite's write lock, which
        another shard may hold; the thread writes whatever is queued in one transaction."""
        if self.cache is None:
            return
        self.unwritten[key] = response
        if self.writer is None:
            loop = asyncio.get_running_loop()
            self.writer = threading.Thread(target=self._writes, args=(loop,), name="gateway-cache", daemon=True)
            self.writer.start()
        self.to_write.put((key, response))

    def _writes(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            items = [self.to_write.get()]
            while not self.to_write.empty():
                items.append(self.to_write.get_nowait())
            entries = [item for item in items if item is not None]
            with self.cache.transact():
                for key, response in entries:
                    self.cache.set(key, response)
            if entries and not loop.is_closed():
                loop.call_soon_threadsafe(self._written, [key for key, _ in entries])
            if len(entries) < len(items):  # close() asked the thread to stop, after these
                return

    def _written(self, keys: list[str]) -> None:
        for key in keys:
            self.unwritten.pop(key, None)

    async def _reserved_send(self, request: Request, endpoint_id: str, stats: CallStats) -> Body:
        """The call sent by its endpoint's owner shard, within the sweep's budget (the ledger's)."""
        if self.budgeted:
            refused = self.reserve() if self.shard == 0 else await self.peers[0].reserve.remote()
            if refused is not None:
                raise refused
        owner = self.owners[endpoint_id]
        sent: Sent | None = None
        try:
            if owner == self.shard:
                sent = await self.send(endpoint_id, request)
            else:
                sent = await self.peers[owner].send.remote(endpoint_id, request)
        finally:
            if self.budgeted:
                figures = (
                    (sent.stats.sent, sent.stats.cost_usd, owner, sent.hosted_usd) if sent else (0, 0.0, owner, 0.0)
                )
                if self.shard == 0:
                    self.settle(*figures)
                else:
                    self.peers[0].settle.remote(*figures)
        stats.add(sent.stats)
        if sent.error is not None:
            if sent.error.kind == "auth":  # remembered here too: no further call is routed to it
                self.endpoints[endpoint_id].refused = sent.error
            raise sent.error
        return sent.response

    async def send(self, endpoint_id: str, request: Request) -> Sent:
        """On the endpoint's owner shard: send (with retries) under the endpoint's limits."""
        state, stats = self.endpoints[endpoint_id], CallStats()
        try:
            if state.refused is not None:
                raise state.refused
            response = await self._send(state, request, stats)
            return Sent(response, None, stats, self._hosted_cost())
        except GatewayError as exc:
            return Sent(None, exc, stats, self._hosted_cost())

    async def _send(self, state: _EndpointState, request: Request, stats: CallStats) -> Body:
        """At most `retries + 1` sends; after the first failure, each retry must start and end
        within `max_retry_s`, so a logical call never outlives its first send by more."""
        endpoint = state.endpoint
        deadline = None
        for attempt in range(endpoint.retries + 1):
            if attempt:
                stats.retries += 1
            left = endpoint.timeout_s if deadline is None else max(deadline - time.monotonic(), 0.1)
            try:
                return await self._send_once(state, request, stats, min(endpoint.timeout_s, left))
            except GatewayError as exc:
                if exc.kind == "auth":
                    state.refused = exc
                if exc.kind not in PASSING:
                    raise
                now = time.monotonic()
                deadline = deadline or now + endpoint.max_retry_s
                wait = exc.retry_after if exc.retry_after is not None else BACKOFF_S * 2.0**attempt
                if exc.kind == "rate_limit":  # the whole endpoint pauses, so concurrent trials do not storm it
                    state.paused_until = max(state.paused_until, now + wait)
                if attempt == endpoint.retries or max(now + wait, state.paused_until) >= deadline:
                    stats.gave_up += 1
                    sends = f"{attempt + 1} send{'s' if attempt else ''}"
                    raise GatewayError(
                        exc.kind, f"{exc} (gave up after {sends})", exc.status, exc.retry_after
                    ) from None
                if exc.kind != "rate_limit":
                    await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send_once(self, state: _EndpointState, request: Request, stats: CallStats, timeout_s: float) -> Body:
        await self._admit(state)
        async with state.slots:
            start = self._occupy(state)
            try:
                response, cost = await self._post(state, request, timeout_s)
            finally:
                elapsed = self._release(state, start)
        usage = response.get("usage") or {}
        stats.sent += 1
        stats.prompt_tokens += usage.get("prompt_tokens") or 0
        stats.completion_tokens += usage.get("completion_tokens") or 0
        stats.latency_s += elapsed
        stats.slot_s += elapsed
        stats.cost_usd += cost
        if state.endpoint.tpm is not None:
            state.tokens.append((time.monotonic(), usage.get("total_tokens") or 0))
        return response

    async def _admit(self, state: _EndpointState) -> None:
        """Wait out a Retry-After pause and the endpoint's requests/tokens-per-minute limits."""
        endpoint = state.endpoint
        while True:
            now = time.monotonic()
            if state.paused_until > now:
                await asyncio.sleep(state.paused_until - now)
                continue
            if endpoint.rpm is None and endpoint.tpm is None:
                return
            while state.requests and now - state.requests[0] > 60:
                state.requests.popleft()
            while state.tokens and now - state.tokens[0][0] > 60:
                state.tokens.popleft()
            if endpoint.rpm is not None and len(state.requests) >= endpoint.rpm:
                await asyncio.sleep(60 - (now - state.requests[0]) + 0.01)
            elif endpoint.tpm is not None and sum(t for _, t in state.tokens) >= endpoint.tpm:
                await asyncio.sleep(60 - (now - state.tokens[0][0]) + 0.01)
            else:
                state.requests.append(now)
                return

    def _occupy(self, state: _EndpointState) -> float:
        now = time.monotonic()
        if state.running == 0:
            state.busy_since = now
        state.running += 1
        return now

    def _release(self, state: _EndpointState, start: float) -> float:
        """Seconds the call held its slot; the endpoint's busy time ends when its last call does."""
        now = time.monotonic()
        state.running -= 1
        state.slot_s += now - start
        if state.running == 0:
            state.busy_s += now - (state.busy_since or now)
        return now - start

    async def _post(self, state: _EndpointState, request: Request, timeout_s: float) -> tuple[Body, float]:
        if not state.endpoint.api_bases:
            return await _litellm_call(state.endpoint, orjson.loads(request.body), timeout_s, request.route)
        base = _pick_replica(state)
        state.in_flight[base] += 1
        try:
            return await self._http_call(state.endpoint, base, request.body, timeout_s, request.route), 0.0
        except GatewayError as exc:
            if exc.kind == "transport":
                # A dead replica fails fast, so least-loaded would pick it again and again; skip it
                # for a while so the retry reaches a live one (a restarted one is back after this).
                state.down_until[base] = time.monotonic() + REPLICA_COOLDOWN_S
            raise
        finally:
            state.in_flight[base] -= 1

    async def _http_call(self, endpoint: Endpoint, base: str, body: bytes, timeout_s: float, route: str = CHAT) -> Body:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        key = os.environ.get(endpoint.api_key_env or "") or "EMPTY"
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.post(
                f"{base.rstrip('/')}/{route}", data=_with_model(body, endpoint.model), headers=headers, timeout=timeout
            ) as response:
                raw = await response.read()
                if response.status == 200:
                    return _parse_completion(raw, endpoint, route)
                if _kind(response.status) == "auth":
                    variable = endpoint.api_key_env or "no key variable (api_key_env is not set)"
                    raise GatewayError(
                        "auth",
                        f"{endpoint.model} refused the key from {variable} (HTTP {response.status})",
                        response.status,
                    )
                retry_after = _seconds(response.headers.get("Retry-After"))
                text = raw[:300].decode(errors="replace")
                raise GatewayError(
                    _kind(response.status),
                    f"{endpoint.model}: HTTP {response.status}: {text}",
                    response.status,
                    retry_after,
                )
        except TimeoutError:
            raise GatewayError("timeout", f"{endpoint.model}: no answer within {timeout_s:.0f} s") from None
        except aiohttp.ClientError as exc:
            raise GatewayError("transport", f"{endpoint.model}: {type(exc).__name__}: {exc}") from None

    # -- the ledger (shard 0): the sweep's budget -----------------------------------------

    def reserve(self) -> GatewayError | None:
        """A send's place in the budget, or the error saying it is spent (returned, not raised:
        a raised error would reach another shard wrapped in Ray's)."""
        if (spent := self._spent()) is not None:
            return spent
        self.sending += 1
        return None

    def settle(self, sent: int, cloud_usd: float, owner: int, hosted_usd: float) -> None:
        """A reserved call is done: what it sent and cost, and its owner's self-hosted cost so far."""
        self.sending -= 1
        self.sent_total += sent
        self.cloud_usd += cloud_usd
        self.hosted_usd[owner] = max(self.hosted_usd.get(owner, 0.0), hosted_usd)

    def _spent(self) -> GatewayError | None:
        budget = self.budget
        if budget.max_lm_calls is not None and self.sent_total + self.sending >= budget.max_lm_calls:
            return GatewayError("budget", f"the sweep's budget of {budget.max_lm_calls:,} LM calls is spent")
        if budget.max_usd is not None:
            hosted = {**self.hosted_usd, self.shard: self._hosted_cost()}
            if self.cloud_usd + sum(hosted.values()) >= budget.max_usd:
                return GatewayError("budget", f"the sweep's budget of ${budget.max_usd:.2f} is spent")
        return None

    # -- accounting ----------------------------------------------------------------------

    def exhausted(self) -> bool:
        """Whether the budget is spent (the ledger's answer: ask shard 0)."""
        return self._spent() is not None

    def spent(self) -> tuple[int, float]:
        """Calls sent and dollars spent so far, as the budget counts them (the ledger's: ask shard 0;
        zeros when the sweep has no budget, which keeps no ledger)."""
        return self.sent_total, self.cloud_usd + sum({**self.hosted_usd, self.shard: self._hosted_cost()}.values())

    def trial_stats(self, trial_id: str, done: bool = False) -> CallStats:
        """A trial's figures, with self-hosted busy time turned into dollars by its share of slot time;
        `done`: the trial has ended, so its sampled-draw counters go (a rerun replays from draw 0)."""
        stats, hosted, slot = self.raw_stats(trial_id, done)
        stats.cost_usd += hosted * stats.slot_s / (slot or 1.0)
        return stats

    def raw_stats(self, trial_id: str, done: bool = False) -> tuple[CallStats, float, float]:
        """The trial's figures on this shard, with this shard's self-hosted cost and slot-seconds."""
        if done:
            self.draws.pop(trial_id, None)
        stats = CallStats()
        stats.add(self.stats.get(trial_id) or CallStats())
        return stats, self._hosted_cost(), sum(s.slot_s for s in self.endpoints.values())

    def _hosted_cost(self) -> float:
        """Self-hosted endpoints cost `cost_per_hour` for every second they had a request in flight."""
        now = time.monotonic()
        return sum(
            (s.busy_s + (now - s.busy_since if s.running else 0.0)) * (s.endpoint.cost_per_hour or 0) / 3600
            for s in self.costly
        )

    def totals(self) -> CallStats:
        """Every trial's figures summed (O(trials): for reports, never on the call path)."""
        total = CallStats()
        for stats in self.stats.values():
            total.add(stats)
        return total

    def utilisation(self) -> dict[str, float]:
        """Busy slot-seconds over slots × wall time, per endpoint this shard owns, since it started."""
        wall = time.monotonic() - self.started
        return {
            eid: s.slot_s / (s.endpoint.max_concurrency * wall)
            for eid, s in self.endpoints.items()
            if self.owners[eid] == self.shard
        }

    def ping(self) -> int:
        return self.shard

    async def close(self) -> None:
        if self.writer is not None:
            self.to_write.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self.writer.join)
        if self.session is not None:
            await self.session.close()
        if self.cache is not None:
            self.cache.close()


class GatewayLost(GatewayError):
    """A gateway shard died: its counts (and the budget's, on shard 0) are gone, so the sweep stops."""

    def __init__(self, message: str) -> None:
        super().__init__("transport", message)

    def __reduce__(self) -> tuple:
        return (type(self), (str(self),))


def _pick_replica(state: _EndpointState) -> str:
    """The least-loaded replica among those not cooling down after a transport failure (all, if none is)."""
    now = time.monotonic()
    up = [base for base in state.in_flight if state.down_until.get(base, 0.0) <= now] or list(state.in_flight)
    return min(up, key=state.in_flight.__getitem__)


def _with_model(body: bytes, model: str) -> bytes:
    """The request's JSON with the served model name first, without serialising the body again."""
    rest = body[1:] if body == b"{}" else b"," + body[1:]
    return b'{"model":' + orjson.dumps(model) + rest


def _kind(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limit"
    if status >= 500:
        return "server"
    return "invalid"


def _seconds(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


def _parse_completion(raw: bytes, endpoint: Endpoint, route: str = CHAT) -> Body:
    try:
        body = orjson.loads(raw)
        if route == CHAT:
            body["choices"][0]["message"]
        else:
            [float(x) for item in body["data"] for x in item["embedding"]]
    except (ValueError, KeyError, IndexError, TypeError):
        raise GatewayError("server", f"{endpoint.model}: the endpoint answered with a malformed completion") from None
    return body


async def _litellm_call(endpoint: Endpoint, body: Body, timeout_s: float, route: str = CHAT) -> tuple[Body, float]:
    """A cloud model: LiteLLM speaks the provider's protocol and prices the call from its cost map."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    kwargs = {"api_key": os.environ[endpoint.api_key_env]} if endpoint.api_key_env else {}
    try:
        call = litellm.acompletion if route == CHAT else litellm.aembedding
        response = await call(model=endpoint.model, num_retries=0, timeout=timeout_s, **kwargs, **body)
    except litellm.RateLimitError as exc:
        raise GatewayError("rate_limit", f"{endpoint.model}: rate limited", 429, _retry_after(exc)) from None
    except litellm.AuthenticationError:
        variable = endpoint.api_key_env or "the provider's key variable"
        raise GatewayError("auth", f"{endpoint.model} refused the key from {variable} (HTTP 401)", 401) from None
    except litellm.Timeout:
        raise GatewayError("timeout", f"{endpoint.model}: no answer within {timeout_s:.0f} s") from None
    except litellm.APIConnectionError as exc:
        raise GatewayError("transport", f"{endpoint.model}: {type(exc).__name__}") from None
    except Exception as exc:
        # LiteLLM's HTTP errors (ServiceUnavailableError, InternalServerError, BadRequestError...) share
        # no base class of its own; their status code says which kind of failure they are.
        status = getattr(exc, "status_code", None)
        if not isinstance(status, int):
            raise
        raise GatewayError(_kind(status), f"{endpoint.model}: HTTP {status} ({type(exc).__name__})", status) from None
    try:
        cost = float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:
        cost = 0.0
    return response.model_dump(), cost


def _retry_after(exc: Exception) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    return _seconds(headers.get("retry-after") or headers.get("Retry-After"))
