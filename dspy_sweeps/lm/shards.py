"""The handle trials hold to the sweep's gateway shards (`lm/gateway.py`): picklable, blocking,
for a trial's threads; each call goes to the shard its request's digest (or endpoint) picks.

Apart from `lm/gateway.py` because it is the gateway's only Ray-side part: code that needs the
gateway's records (endpoints, errors) imports no Ray through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dspy_sweeps.lm.gateway import CHAT, Body, CallStats, GatewayError, GatewayLost, make_request, route_of


@dataclass(frozen=True)
class Gateway:
    """The handle trials hold (picklable): the sweep's gateway shards, each call routed to the shard
    its request's digest picks. Blocking calls, for a trial's threads."""

    shards: tuple[Any, ...]  # Ray actor handles of GatewayCore shards, by index
    owners: dict[str, int] | None = None  # endpoint -> owner shard, when calls are routed by endpoint

    def complete(self, trial_id: str, chain: tuple[str, ...], body: Body, route: str = CHAT) -> Body:
        request = make_request(trial_id, chain, body, route)
        return self._get(self.shards[route_of(request, len(self.shards), self.owners)].call.remote(request))

    def exhausted(self) -> bool:
        return self._get(self.shards[0].exhausted.remote())

    def spent(self) -> tuple[int, float]:
        return self._get(self.shards[0].spent.remote())

    def trial_stats(self, trial_id: str, done: bool = False) -> CallStats:
        """The trial's figures summed over the shards, self-hosted cost shared by slot time."""
        parts = self._get([shard.raw_stats.remote(trial_id, done) for shard in self.shards])
        stats = CallStats()
        for part, _, _ in parts:
            stats.add(part)
        hosted, slot = sum(p[1] for p in parts), sum(p[2] for p in parts)
        stats.cost_usd += hosted * stats.slot_s / (slot or 1.0)
        return stats

    def totals(self) -> CallStats:
        total = CallStats()
        for part in self._get([shard.totals.remote() for shard in self.shards]):
            total.add(part)
        return total

    def dead_shard(self) -> int | None:
        """The index of a shard that died, if one did."""
        import ray

        for i, shard in enumerate(self.shards):
            try:
                ray.get(shard.ping.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return i
        return None

    def kill(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard)

    @staticmethod
    def _get(refs: Any) -> Any:
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise GatewayLost(f"an LM gateway shard died ({type(exc).__name__}); its counts are gone") from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, GatewayError):
                raise exc.cause from None
            raise
