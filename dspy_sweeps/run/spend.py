"""A sweep's LM spend across its runs, so one budget covers the whole sweep, `--resume` included.

Every LM call of a sweep goes through its gateway, which counts it under a trial id: the trials,
the Ensemble, promotion's re-scoring (`PROMOTION`). As each of them ends, the driver appends what
the gateway counted for it to `spend/<sweep>.jsonl` in the state directory; a resumed run starts
its gateway with the sweep's budget minus that sum, and a fresh run (no `--resume`) starts the log
again. A run that ends early (an error, Ctrl-C) logs what the gateway spent for trials that never
finished as "unfinished". With a budget set, the driver also appends the ledger's running total
every `CHECKPOINT_S` (a "checkpoint" line): a driver killed outright counts as having spent the
larger of its entries and its last checkpoint, so it loses at most the last few seconds of spend,
not its running trials' (their answered calls are in the LM cache: running them again is free).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROMOTION = "promotion"  # the gateway's trial id for promotion's re-scoring
CHECKPOINT = "checkpoint"  # a line holding a run's running total, not one trial's spend
CHECKPOINT_S = 2.0


@dataclass(frozen=True)
class Spent:
    """LM calls sent to an endpoint (cache hits and merged calls cost nothing) and their dollars."""

    calls: int = 0
    usd: float = 0.0


@dataclass(frozen=True)
class Entry:
    """One line of the log: what one trial (or the promotion) spent."""

    id: str
    calls: int
    usd: float
    run: str = ""  # which run of the sweep wrote it (a --resume is another run)


class SpendLog:
    def __init__(self, path: Path) -> None:
        import uuid

        self.path, self.run = path, uuid.uuid4().hex[:12]

    def start(self, resume: bool) -> Spent:
        """What earlier runs of the sweep spent (nothing, and a new log, unless resuming)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.path.unlink(missing_ok=True)
        return self.total()

    def add(self, entry_id: str, calls: int, usd: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(Entry(entry_id, calls, usd, self.run))) + "\n")

    def checkpoint(self, calls: int, usd: float) -> None:
        """This run's running total so far (the gateway ledger's)."""
        self.add(CHECKPOINT, calls, usd)

    def total(self) -> Spent:
        """Every run's spend: its entries' sum, or its last checkpoint where that is more (a run
        killed before its running trials logged theirs)."""
        logged: dict[str, Spent] = {}
        marks: dict[str, Spent] = {}
        for e in self.entries():
            if e.id == CHECKPOINT:
                marks[e.run] = Spent(e.calls, e.usd)
            else:
                so_far = logged.get(e.run, Spent())
                logged[e.run] = Spent(so_far.calls + e.calls, so_far.usd + e.usd)
        runs = logged.keys() | marks.keys()
        spent = [(logged.get(r, Spent()), marks.get(r, Spent())) for r in runs]
        return Spent(sum(max(a.calls, b.calls) for a, b in spent), sum(max(a.usd, b.usd) for a, b in spent))

    def entries(self) -> list[Entry]:
        if not self.path.is_file():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(Entry(**json.loads(line)))
            except (ValueError, TypeError):  # a line cut short by a killed driver
                continue
        return entries


def remaining(budget: Any, spent: Spent) -> Any:
    """The gateway's `Budget` for this run: the sweep's budget (spec/schema.py) less what it spent."""
    from dspy_sweeps.lm.gateway import Budget

    calls = None if budget.max_lm_calls is None else max(budget.max_lm_calls - spent.calls, 0)
    usd = None if budget.max_usd is None else max(budget.max_usd - spent.usd, 0.0)
    return Budget(calls, usd)
