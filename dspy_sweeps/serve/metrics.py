"""The service's Prometheus metrics (prometheus_client), in a registry of its own per service so
two services in one process (tests, Ray replicas) never share counters."""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class Usage:
    """What one request spent: LM calls sent, tokens, dollars (0 where no price is known)."""

    lm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class ServiceMetrics:
    def __init__(self, name: str, alias: str | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.name, self.alias = name, alias or ""
        r = self.registry
        self.requests = Counter(
            "sweep_serve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "sweep_serve_request_seconds", "Request latency by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("sweep_serve_in_flight", "Predictions running now", registry=r)
        self.predictions = Counter(
            "sweep_serve_predictions", "Answered predictions by served version", ["version"], registry=r
        )
        self.lm_calls = Counter("sweep_serve_lm_calls", "LM calls sent by predictions", registry=r)
        self.tokens = Counter("sweep_serve_lm_tokens", "LM tokens by kind (prompt, completion)", ["kind"], registry=r)
        self.cost = Counter("sweep_serve_lm_cost_usd", "LM cost in dollars (0 where no price is known)", registry=r)
        self.errors = Counter("sweep_serve_errors", "Failed predictions by kind", ["kind"], registry=r)
        self.version = Gauge(
            "sweep_serve_version", "1 for the version new requests go to", ["model", "alias", "version"], registry=r
        )
        self.switches = Counter("sweep_serve_switches", "Times the alias moved and the service followed", registry=r)
        self.load_failures = Counter(
            "sweep_serve_load_failures", "Versions the alias moved to that could not be loaded", registry=r
        )

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def answered(self, version: str, usage: Usage) -> None:
        self.predictions.labels(version).inc()
        self.lm_calls.inc(usage.lm_calls)
        self.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.tokens.labels("completion").inc(usage.completion_tokens)
        self.cost.inc(usage.cost_usd)

    def serving(self, version: str, previous: str | None = None) -> None:
        if previous is not None:
            self.version.remove(self.name, self.alias, previous)
            self.switches.inc()
        self.version.labels(self.name, self.alias, version).set(1)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
