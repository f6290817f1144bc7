"""Secrets inside a submitted job: read once from the file the submitter shipped, then handed to the
LM gateway actor through Ray's object store (see `dspy_sweeps.jobs.client` for how they travel)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from dspy_sweeps.errors import SweepError
from dspy_sweeps.jobs.client import _SECRETS_FILE, PACKAGE_DIR, SECRETS_ENV, TRACKING_SECRETS

_worker_values: dict[str, str] = {}


_worker_refs: dict[tuple[str, tuple[str, ...]], Any] = {}  # (Ray job id, names) -> values in its object store


class Secrets:
    """Values for an actor; pickled into Ray's object store, never shown by repr or str."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = dict(values)

    def __repr__(self) -> str:
        return f"Secrets({', '.join(sorted(self._values))})"

    __str__ = __repr__

    def export(self) -> None:
        os.environ.update(self._values)


def load_job_secrets() -> list[str]:
    """In a submitted job's driver: read and delete the secrets file the submitter shipped.

    Returns the variable names loaded (none outside a submitted job). Called by `sweep run`
    before anything else, so `${VAR}` interpolation and key checks see the values.
    """
    name = os.environ.pop(SECRETS_ENV, None)
    if not name:
        return []
    if not _SECRETS_FILE.match(name):
        raise SweepError(f"{SECRETS_ENV}={name!r}: not a secrets file name written by `sweep submit`")
    path = PACKAGE_DIR / name
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(
            f"{SECRETS_ENV}: the job's secrets file {name} is gone (it is read once, by the job's first "
            "`sweep run`); submit the sweep again"
        ) from None
    finally:
        path.unlink(missing_ok=True)
    os.environ.update(values)
    _worker_values.update({k: v for k, v in values.items() if k not in TRACKING_SECRETS})
    return sorted(values)


def gateway_secrets(names: Iterable[str] = ()) -> Secrets | None:
    """What the sweep's LM gateway needs, or None: the loaded job secrets (not the tracking ones) and
    the values of `names`, the key variables the sweep's endpoints name (`api_key_env`), as this
    process has them. A local Ray's workers inherit this process's environment, a cluster's do not:
    without these, `sweep run --address` from a shell holding the key would be refused (HTTP 401)."""
    values = {**_worker_values, **{name: os.environ[name] for name in names if os.environ.get(name)}}
    return Secrets(values) if values else None


def worker_secrets(names: Iterable[str] = ()) -> Any:
    """`gateway_secrets(names)` as an object reference in the running Ray (None if there are none),
    made once per Ray job and set of names and held by the driver while the sweep runs."""
    secrets = gateway_secrets(names)
    if secrets is None:
        return None
    import ray

    held = (ray.get_runtime_context().get_job_id(), tuple(sorted(secrets._values)))
    if held not in _worker_refs:
        _worker_refs[held] = ray.put(secrets)
    return _worker_refs[held]


def holding_secrets(cls: type) -> type:
    """`cls` as an actor class whose constructor takes `worker_secrets()` first and exports them.

    By reference, the values stay in Ray's object store, while an actor's creation arguments
    and runtime_env are kept in GCS and shown by the state API; a restarted actor gets them
    again. (Ray logs that a restartable actor has arguments in the object store: that is this.)
    """

    class HoldingSecrets(cls):  # type: ignore[valid-type, misc]
        def __init__(self, secrets: Secrets | None, *args: Any, **kwargs: Any) -> None:
            if secrets is not None:
                secrets.export()
            super().__init__(*args, **kwargs)

    HoldingSecrets.__name__ = HoldingSecrets.__qualname__ = cls.__name__  # the dashboard shows the real name
    return HoldingSecrets
