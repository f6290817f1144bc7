"""Progress events: what a running trial tells the driver, and how the driver stops it early.

A trial knows DSPy, not Ray: it is handed a `TrialEvents` and calls `report(phase, score)`
after every evaluation its optimizer makes. The trial host forwards each event to the driver
while the trial runs; the driver alone talks to W&B, MLflow and Optuna. When the driver
prunes a trial, the trial's next `report` raises `Pruned`, so it stops within one evaluation.
"""

from __future__ import annotations

from typing import Protocol

from dspy_sweeps.records import TrialEvent

__all__ = ["VAL_PHASES", "NoEvents", "Pruned", "TrialEvent", "TrialEvents"]


# The phases whose score is a score on the val split: only these move a trial's best so far.
VAL_PHASES = ("compile", "val")


class Pruned(Exception):
    """The driver stopped this trial early: a loser at its step. Not a failure, and never a score of 0."""


class TrialEvents(Protocol):
    def report(self, phase: str, score: float | None) -> None:
        """Record an evaluation; raises `Pruned` when the driver has asked the trial to stop."""


class NoEvents:
    """For a trial run outside a sweep (tests, benchmarks): events go nowhere, nothing prunes."""

    def report(self, phase: str, score: float | None) -> None:
        pass
