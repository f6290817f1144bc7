"""The sweep's spend log: what a budget carried across `--resume` counts, a killed run included."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dspy_sweeps.run.engine import SweepGateway
from dspy_sweeps.run.spend import CHECKPOINT, SpendLog, remaining
from dspy_sweeps.spec.schema import Budget


def test_a_killed_run_counts_its_last_checkpoint_and_a_finished_one_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "spend" / "demo.jsonl"
    killed = SpendLog(path)
    killed.start(resume=False)
    killed.add("baseline", 60, 0.06)
    killed.checkpoint(90, 0.09)  # the baseline's 60 and 30 of a trial still running
    killed.checkpoint(130, 0.13)  # ... the driver is SIGKILLed here: the trial never logs its own
    resumed = SpendLog(path)
    assert resumed.start(resume=True).calls == 130  # not 60: the running trial's 70 calls count
    resumed.add("trial-2", 70, 0.07)  # the rerun's own spend (its earlier answers came from the cache)
    resumed.checkpoint(50, 0.05)  # a checkpoint below its entries' sum does not lower it
    resumed.add("unfinished", 5, 0.005)
    total = SpendLog(path).total()
    assert total.calls == 130 + 75 and round(total.usd, 6) == 0.205
    assert remaining(Budget(max_lm_calls=212, max_usd=1.0), total).max_lm_calls == 7

    fresh = SpendLog(path)
    assert fresh.start(resume=False).calls == 0  # a run without --resume starts the log again


class Ledger:
    """A stand-in for the gateway handle: its ledger's running total, advanced by the test."""

    def __init__(self) -> None:
        self.calls, self.asked = 0, threading.Event()

    def spent(self) -> tuple[int, float]:
        self.asked.set()
        return self.calls, self.calls / 1000


def test_the_driver_checkpoints_the_ledger_only_with_a_budget(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    ledger = Ledger()
    gateway = SweepGateway(ledger, {}, SpendLog(path))
    with gateway.checkpoints(Budget()):  # no budget, no ledger: nothing to checkpoint
        pass
    assert not ledger.asked.is_set()

    ledger.calls = 42
    with gateway.checkpoints(Budget(max_lm_calls=100)):
        assert ledger.asked.wait(timeout=60)
        while not path.exists() or CHECKPOINT not in path.read_text():  # written just after the ask
            time.sleep(0.05)
    marks = [e for e in SpendLog(path).entries() if e.id == CHECKPOINT]
    assert marks and marks[-1].calls == 42 and marks[-1].usd == 0.042
