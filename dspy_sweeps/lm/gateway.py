"""The LM gateway: every LM call of every trial goes through one asyncio service per sweep.

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

Why one async actor rather than a LiteLLM proxy in front of the endpoints: a proxy would
still leave identical in-flight requests from different trials unmerged, and it adds a
second HTTP hop and a server process to operate; the actor is one Python object that Ray
places and supervises, and its per-call overhead is measured in `make bench`.

`GatewayCore` is plain asyncio (tested without Ray); `start_gateway` wraps it in a Ray actor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

Body = dict[str, Any]
CHAT, EMBEDDINGS = "chat/completions", "embeddings"  # the OpenAI routes the gateway speaks
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
        for name, value in asdict(other).items():
            if name == "by_model":
                for model, count in value.items():
                    self.by_model[model] = self.by_model.get(model, 0) + count
            else:
                setattr(self, name, getattr(self, name) + value)


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
    def __init__(self, endpoints: list[Endpoint], cache_dir: str | None, budget: Budget | None = None) -> None:
        import diskcache

        self.endpoints = {e.id: _EndpointState(e, asyncio.Semaphore(e.max_concurrency)) for e in endpoints}
        for state in self.endpoints.values():
            state.in_flight = {base: 0 for base in state.endpoint.api_bases}
        self.cache = diskcache.Cache(cache_dir) if cache_dir else None
        self.budget = budget or Budget()
        self.pending: dict[str, asyncio.Future] = {}
        self.stats: dict[str, CallStats] = {}
        self.session: Any = None
        self.sending = 0  # calls on their way to an endpoint: they count against the budget already
        self.draws: dict[tuple[str, str], int] = {}  # (trial, request) -> sampled draws so far
        self.started = time.monotonic()

    # -- the call path -------------------------------------------------------------------

    async def complete(
        self, trial_id: str, endpoint_id: str, body: Body, fallbacks: tuple[str, ...] = (), route: str = CHAT
    ) -> Body:
        """An OpenAI chat-completions (or, with `route=EMBEDDINGS`, embeddings) response for `body`,
        from cache, a merged call or the endpoint; when `endpoint_id` fails past its retries, from
        the first of `fallbacks` that answers."""
        stats = self.stats.setdefault(trial_id, CallStats())
        stats.requested += 1
        chain = (endpoint_id, *fallbacks)
        for position, current in enumerate(chain):
            try:
                response = await self._complete_on(trial_id, self.endpoints[current], body, stats, route)
            except GatewayError as exc:
                if exc.kind not in PASSING or position == len(chain) - 1:
                    stats.failed += exc.kind != "budget"  # a call the budget refused was never made
                    raise
                stats.fell_back += 1
                continue
            label = self.endpoints[current].endpoint.label or self.endpoints[current].endpoint.model
            stats.by_model[label] = stats.by_model.get(label, 0) + 1
            return response
        raise AssertionError("unreachable: the chain has at least one endpoint")

    async def _complete_on(
        self, trial_id: str, state: _EndpointState, body: Body, stats: CallStats, route: str = CHAT
    ) -> Body:
        if state.refused is not None:
            raise state.refused
        key = self._request_key(trial_id, state.endpoint.id, body if route == CHAT else {"route": route, "body": body})
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            stats.cache_hits += 1
            return hit
        if key in self.pending:
            stats.merged += 1
            return await asyncio.shield(self.pending[key])
        self._check_budget()
        future = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        self.sending += 1
        try:
            response = await self._send(state, body, stats, route)
            if self.cache is not None:
                self.cache.set(key, response)
            future.set_result(response)
            return response
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: merged callers re-raise it, nobody else must
            raise
        finally:
            self.sending -= 1
            self.pending.pop(key, None)

    def _request_key(self, trial_id: str, endpoint_id: str, body: Body) -> str:
        """Identical requests share a key. A sampled request (temperature > 0) is the trial's n-th
        draw of that request instead: draws stay distinct (never merged), and a re-run of the
        trial replays its own draws from the cache. DSPy's rollout ids do not reach an engine
        in DSPy 3.4, so the draw count stands in for them."""
        key = _key(endpoint_id, body)
        if not body.get("temperature"):
            return key
        draw = self.draws.get((trial_id, key), 0)
        self.draws[(trial_id, key)] = draw + 1
        return _key(endpoint_id, {"body": body, "trial": trial_id, "draw": draw})

    async def _send(self, state: _EndpointState, body: Body, stats: CallStats, route: str = CHAT) -> Body:
        """At most `retries + 1` sends; after the first failure, each retry must start and end
        within `max_retry_s`, so a logical call never outlives its first send by more."""
        endpoint = state.endpoint
        deadline = None
        for attempt in range(endpoint.retries + 1):
            if attempt:
                stats.retries += 1
            left = endpoint.timeout_s if deadline is None else max(deadline - time.monotonic(), 0.1)
            try:
                return await self._send_once(state, body, stats, min(endpoint.timeout_s, left), route)
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

    async def _send_once(
        self, state: _EndpointState, body: Body, stats: CallStats, timeout_s: float, route: str = CHAT
    ) -> Body:
        await self._admit(state, body)
        async with state.slots:
            start = self._occupy(state)
            try:
                response, cost = await self._post(state, body, timeout_s, route)
            finally:
                elapsed = self._release(state, start)
        usage = response.get("usage") or {}
        stats.sent += 1
        stats.prompt_tokens += usage.get("prompt_tokens") or 0
        stats.completion_tokens += usage.get("completion_tokens") or 0
        stats.latency_s += elapsed
        stats.slot_s += elapsed
        stats.cost_usd += cost
        state.tokens.append((time.monotonic(), usage.get("total_tokens") or 0))
        return response

    async def _admit(self, state: _EndpointState, body: Body) -> None:
        """Wait out a Retry-After pause and the endpoint's requests/tokens-per-minute limits."""
        endpoint = state.endpoint
        while True:
            now = time.monotonic()
            if state.paused_until > now:
                await asyncio.sleep(state.paused_until - now)
                continue
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

    async def _post(self, state: _EndpointState, body: Body, timeout_s: float, route: str = CHAT) -> tuple[Body, float]:
        if not state.endpoint.api_bases:
            return await _litellm_call(state.endpoint, body, timeout_s, route)
        base = _pick_replica(state)
        state.in_flight[base] += 1
        try:
            return await self._http_call(state.endpoint, base, body, timeout_s, route), 0.0
        except GatewayError as exc:
            if exc.kind == "transport":
                # A dead replica fails fast, so least-loaded would pick it again and again; skip it
                # for a while so the retry reaches a live one (a restarted one is back after this).
                state.down_until[base] = time.monotonic() + REPLICA_COOLDOWN_S
            raise
        finally:
            state.in_flight[base] -= 1

    async def _http_call(self, endpoint: Endpoint, base: str, body: Body, timeout_s: float, route: str = CHAT) -> Body:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        key = os.environ.get(endpoint.api_key_env or "") or "EMPTY"
        headers = {"Authorization": f"Bearer {key}"}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.post(
                f"{base.rstrip('/')}/{route}",
                json={**body, "model": endpoint.model},
                headers=headers,
                timeout=timeout,
            ) as response:
                text = await response.text()
                if response.status == 200:
                    return _parse_completion(text, endpoint, route)
                if _kind(response.status) == "auth":
                    variable = endpoint.api_key_env or "no key variable (api_key_env is not set)"
                    raise GatewayError(
                        "auth",
                        f"{endpoint.model} refused the key from {variable} (HTTP {response.status})",
                        response.status,
                    )
                retry_after = _seconds(response.headers.get("Retry-After"))
                raise GatewayError(
                    _kind(response.status),
                    f"{endpoint.model}: HTTP {response.status}: {text[:300]}",
                    response.status,
                    retry_after,
                )
        except TimeoutError:
            raise GatewayError("timeout", f"{endpoint.model}: no answer within {timeout_s:.0f} s") from None
        except aiohttp.ClientError as exc:
            raise GatewayError("transport", f"{endpoint.model}: {type(exc).__name__}: {exc}") from None

    def _check_budget(self) -> None:
        totals = self.totals()
        if self.budget.max_lm_calls is not None and totals.sent + self.sending >= self.budget.max_lm_calls:
            raise GatewayError("budget", f"the sweep's budget of {self.budget.max_lm_calls:,} LM calls is spent")
        if self.budget.max_usd is not None and totals.cost_usd + self._hosted_cost() >= self.budget.max_usd:
            raise GatewayError("budget", f"the sweep's budget of ${self.budget.max_usd:.2f} is spent")

    # -- accounting ----------------------------------------------------------------------

    def exhausted(self) -> bool:
        try:
            self._check_budget()
        except GatewayError:
            return True
        return False

    def trial_stats(self, trial_id: str) -> CallStats:
        """A trial's figures, with self-hosted busy time turned into dollars by its share of slot time."""
        stats = CallStats(**asdict(self.stats.get(trial_id, CallStats())))
        stats.cost_usd += self._hosted_cost_share(stats)
        return stats

    def _hosted_cost_share(self, stats: CallStats) -> float:
        total_slot = sum(s.slot_s for s in self.endpoints.values()) or 1.0
        return self._hosted_cost() * stats.slot_s / total_slot

    def _hosted_cost(self) -> float:
        """Self-hosted endpoints cost `cost_per_hour` for every second they had a request in flight."""
        now = time.monotonic()
        return sum(
            (s.busy_s + (now - s.busy_since if s.running else 0.0)) * (s.endpoint.cost_per_hour or 0) / 3600
            for s in self.endpoints.values()
        )

    def totals(self) -> CallStats:
        total = CallStats()
        for stats in self.stats.values():
            total.add(stats)
        return total

    def utilisation(self) -> dict[str, float]:
        """Busy slot-seconds over slots × wall time, per endpoint, since the gateway started."""
        wall = time.monotonic() - self.started
        return {eid: s.slot_s / (s.endpoint.max_concurrency * wall) for eid, s in self.endpoints.items()}

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.cache is not None:
            self.cache.close()


def _pick_replica(state: _EndpointState) -> str:
    """The least-loaded replica among those not cooling down after a transport failure (all, if none is)."""
    now = time.monotonic()
    up = [base for base in state.in_flight if state.down_until.get(base, 0.0) <= now] or list(state.in_flight)
    return min(up, key=state.in_flight.__getitem__)


def _key(endpoint_id: str, body: Body) -> str:
    return hashlib.sha256(json.dumps([endpoint_id, body], sort_keys=True, default=str).encode()).hexdigest()


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


def _parse_completion(text: str, endpoint: Endpoint, route: str = CHAT) -> Body:
    try:
        body = json.loads(text)
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
