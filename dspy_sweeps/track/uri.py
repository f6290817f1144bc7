"""Where MLflow tracks: the sweep's URI, checked before trials spend anything (a server that does
not answer, a machine-local store on a multi-node cluster)."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from dspy_sweeps.errors import SweepError
from dspy_sweeps.spec.schema import MlflowSpec
from dspy_sweeps.state import State


def tracking_uri(spec: MlflowSpec | None, state: State) -> str:
    """The sweep's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the state dir."""
    return (spec and spec.tracking_uri) or os.environ.get("MLFLOW_TRACKING_URI") or state.mlflow_uri


def check_mlflow_server(uri: str, timeout_s: float = 10) -> None:
    """An http(s) tracking URI must answer before trials spend LM calls that it could not record.

    Any HTTP answer counts (a 401 from an auth proxy is MLflow's to explain); only a server
    that cannot be reached is refused. The URI is shown without its credentials.
    """
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    shown = (
        parts._replace(netloc=f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname).geturl().rstrip("/")
    )
    try:
        with urllib.request.urlopen(f"{shown}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise SweepError(
            f"tracking.mlflow: no MLflow server answers at {shown} ({reason}); start it, "
            "or unset MLFLOW_TRACKING_URI to track in the state dir"
        ) from None


def is_local_tracking_uri(uri: str) -> bool:
    """True for a URI only one machine can use: sqlite:, file:, or a plain path."""
    if uri.strip().lower() in ("databricks", "databricks-uc"):  # MLflow's names for a Databricks workspace
        return False
    scheme = urlparse(uri).scheme.lower()
    return scheme in ("sqlite", "file") or len(scheme) <= 1  # "" is a plain path, "c" a Windows drive


def check_tracking_for_cluster(tracking_uri: str, alive_nodes: int) -> None:
    """Refuse a machine-local MLflow store when the cluster has more than one alive node.

    The engine calls it once Ray is up, with Ray's count of alive nodes (tracking knows no Ray):
    the trials run on other nodes, and the job's driver (which logs to MLflow) runs on a node
    whose disk the user never sees.
    """
    if not is_local_tracking_uri(tracking_uri):
        return
    if alive_nodes > 1:
        raise SweepError(
            f"MLflow tracking URI {tracking_uri}: a sqlite:/// or file MLflow URI cannot be shared by a "
            f"multi-node cluster ({alive_nodes} nodes); run an MLflow server (cluster/mlflow) and set MLFLOW_TRACKING_URI"
        )
