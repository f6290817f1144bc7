"""`sweep serve NAME@ALIAS`: the registered program over HTTP, following its alias; `--ray` runs
the same app as a Ray Serve deployment with replicas.

Bad input (an unknown model or alias, a port in use, a registry that does not answer) is one line
and exit status 2, before the program is loaded.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from dspy_sweeps.errors import SweepError
from dspy_sweeps.serve.follow import ServiceConfig
from dspy_sweeps.serve.program import StudentConfig


def serve_program(
    ref: str,
    *,
    host: str,
    port: int,
    student: StudentConfig,
    concurrency: int,
    poll_s: float,
    state_dir: Path | None,
    tracking_uri: str | None,
    ray: bool = False,
    address: str | None = None,
    replicas: Any = None,
) -> None:
    """Serve `ref` until stopped; `replicas` (a `ray_serve.Replicas`) only with `ray`."""
    from dspy_sweeps.cli.ask import student_endpoint
    from dspy_sweeps.state import State
    from dspy_sweeps.track.registry import parse_ref
    from dspy_sweeps.track.uri import tracking_uri as default_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a service's log is lines, not bars
    state = State.at(state_dir)
    uri = tracking_uri or default_uri(None, state)
    _check_registry(ref, uri)
    name, alias, version = parse_ref(ref)
    sock = _bind(host, port)
    meta = _metadata(ref, uri)
    _log_to_stderr()
    with student_endpoint(meta, state, student.api_base) as base:
        config = ServiceConfig(
            name=name,
            alias=alias,
            version=version,
            tracking_uri=uri,
            student=student.model_copy(update={"api_base": base}),
            concurrency=concurrency,
            poll_s=poll_s,
        )
        if ray:
            from dspy_sweeps.serve.ray_serve import run_on_ray

            sock.close()  # Ray Serve's proxy binds it; the check above was the point
            run_on_ray(config, host=host, port=port, address=address, replicas=replicas)
            return
        _serve_here(config, sock)


def _serve_here(config: ServiceConfig, sock: socket.socket) -> None:
    from dspy_sweeps.serve.app import create_app, run_http
    from dspy_sweeps.serve.follow import Service

    service = Service.start(config)
    app = create_app(service)
    host, port = sock.getsockname()[:2]
    following = f", following {config.ref}" if config.alias else ""
    print(
        f"serving {config.name} v{service.current.version} at http://{host}:{port}{following} (docs: /docs)", flush=True
    )
    run_http(app, sock)


def _check_registry(ref: str, uri: str) -> None:
    from dspy_sweeps.track.uri import check_mlflow_server

    try:
        check_mlflow_server(uri, timeout_s=5)
    except SweepError:
        raise SweepError(f"{ref}: the registry at {uri} does not answer; start it, or pass --tracking-uri") from None


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise SweepError(f"--port {port}: {host}:{port} {why}; pick another with --port") from None
    sock.listen(2048)  # clients that connect while the program loads wait in the backlog
    return sock


def _metadata(ref: str, uri: str) -> dict:
    """The registered version's metadata (SweepError naming the reference if there is none)."""
    from dspy_sweeps.track.registry import pull

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads((pull(ref, Path(tmp), uri) / "metadata.json").read_text())


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("dspy_sweeps.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
