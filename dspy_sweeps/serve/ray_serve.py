"""The service as a Ray Serve deployment: the same FastAPI app (`create_app`) in every replica,
each replica loading the program and following the alias on its own, so a moved alias reaches
every replica within one poll without a redeploy.

    sweep serve demo@champion --ray --replicas 2                 # local Ray, or --address of a cluster
    serve deploy cluster/serve/config.yaml                        # the builder `app` below, on a cluster

Under Ray Serve, `/metrics` is the answering replica's own; Ray exports the deployment's request
metrics for the whole cluster.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from dspy_sweeps.serve.follow import ServiceConfig
from dspy_sweeps.serve.program import StudentConfig

APP_NAME = "sweep-serve"
DEPLOYMENT = "program"


class Replicas(BaseModel):
    """A fixed number of replicas, or autoscaling bounds (min, max)."""

    num: int | None = None
    min: int | None = None
    max: int | None = None

    def options(self) -> dict[str, Any]:
        if self.min is None and self.max is None:
            return {"num_replicas": self.num or 1}
        low = self.min if self.min is not None else 1
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": max(self.max or low, low, 1)}}


def application(config: ServiceConfig, replicas: Replicas | None = None) -> Any:
    """The bound Ray Serve application for `config`."""
    from ray import serve

    @serve.ingress()
    class ProgramService:
        """One replica: loads the registered program at start, serves it with the shared app."""

        def __init__(self, config: dict[str, Any]) -> None:
            from dspy_sweeps.serve.follow import Service

            self.service = Service.start(ServiceConfig(**config))

        def __serve_build_asgi_app__(self) -> Any:
            from dspy_sweeps.serve.app import create_app

            return create_app(self.service, serve.get_replica_context().replica_id.unique_id)

    options = {"name": DEPLOYMENT, "max_ongoing_requests": config.concurrency, **(replicas or Replicas()).options()}
    return serve.deployment(ProgramService).options(**options).bind(config.model_dump())


class BuilderArgs(BaseModel):
    """What a Serve config file gives the builder (`args:`); replicas go under `deployments:`."""

    model_config = ConfigDict(extra="forbid")

    ref: str = "demo@champion"
    tracking_uri: str
    api_base: str | None = None
    api_key_env: str | None = None
    concurrency: int = 32
    poll_s: float = 10.0


def app(args: BuilderArgs) -> Any:
    """Application builder for `serve run` / `serve deploy` (import path `dspy_sweeps.serve.ray_serve:app`)."""
    from dspy_sweeps.track.registry import parse_ref

    name, alias, version = parse_ref(args.ref)
    student = StudentConfig(api_base=args.api_base, api_key_env=args.api_key_env)
    config = ServiceConfig(
        name=name,
        alias=alias,
        version=version,
        tracking_uri=args.tracking_uri,
        student=student,
        concurrency=args.concurrency,
        poll_s=args.poll_s,
    )
    return application(config)


def run_on_ray(config: ServiceConfig, *, host: str, port: int, address: str | None, replicas: Replicas) -> None:
    """Deploy on Ray Serve (a local Ray unless `address`), print where, and remove it on SIGINT/SIGTERM."""
    import ray
    from ray import serve

    from dspy_sweeps.run.runner import start_ray

    joined = address is not None or "RAY_ADDRESS" in os.environ
    start_ray(address, Path.cwd())
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config, replicas), name=APP_NAME, route_prefix="/")
    count = replicas.options().get("num_replicas") or replicas.options()["autoscaling_config"]
    print(f"serving {config.ref} at http://{host}:{port} on Ray Serve (replicas: {count}) (docs: /docs)", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    if joined:  # a cluster outlives this command: take the app off it
        serve.delete(APP_NAME)
    else:  # a local Ray started here: the app goes down with it
        ray.shutdown()
