"""The state directory: everything a sweep writes lives under one folder (default `./.sweeps`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT = ".sweeps"


@dataclass(frozen=True)
class State:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None = None) -> State:
        """The given folder, else $DSPY_SWEEPS_STATE, else ./.sweeps; always absolute (Ray needs it)."""
        return cls(Path(root or os.environ.get("DSPY_SWEEPS_STATE") or DEFAULT).resolve())

    def results(self, sweep: str) -> Path:
        return self.root / "results" / f"{sweep}.parquet"

    def program(self, sweep: str, trial_id: str) -> Path:
        return self.root / "programs" / sweep / f"{trial_id}.json"

    def trial_dir(self, sweep: str, trial_id: str) -> Path:
        return self.root / "trials" / sweep / trial_id

    def spend(self, sweep: str) -> Path:
        """The sweep's LM spend across its runs (run/spend.py)."""
        return self.root / "spend" / f"{sweep}.jsonl"

    @property
    def dspy_cache(self) -> Path:
        """DSPy's own disk cache (`DSPY_CACHEDIR`): kept here, never in the home directory."""
        return self.root / "dspy_cache"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"
