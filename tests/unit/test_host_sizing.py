"""Unit tests for trial hosts' sizing and the sweep file's `hosts:` block, and for a pruned trial
being recorded as pruned, not failed.

Run: ``.venv/bin/python -m pytest tests/unit/test_host_sizing.py -q``. No Ray is started.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dspy_sweeps.errors import SweepError
from dspy_sweeps.run.events import Pruned
from dspy_sweeps.run.hosts import HostPlan, size_hosts
from dspy_sweeps.spec.schema import load_sweep


@pytest.mark.parametrize(
    ("running", "trials_per_host", "free_cpus", "expected"),
    [
        (4, None, 2.0, HostPlan(1, 4, 0.25)),  # the demo: one warm host does it all
        (16, None, 4.0, HostPlan(2, 8, 0.25)),  # 8 trials of 8 threads keep a 64-request endpoint busy
        (64, None, 2.0, HostPlan(2, 32, 0.25)),  # one host per CPU at most: a host is one GIL
        (16, 1, 2.0, HostPlan(8, 1, 0.25)),  # a process per trial, as many as Ray can place
        (3, None, 0.0, HostPlan(1, 3, 0.25)),  # nothing free yet: one host, placed when a CPU frees up
    ],
)
def test_hosts_are_sized_from_cpus_and_endpoint_concurrency(
    running: int, trials_per_host: int | None, free_cpus: float, expected: HostPlan
) -> None:
    assert size_hosts(running, trials_per_host, 0.25, free_cpus, fill=64 // 8) == expected


def test_the_hosts_block_is_validated_with_one_line_errors(repo: Path) -> None:
    sweep = load_sweep(repo / "sweeps" / "demo.yaml", ["hosts={trials_per_host: 1, cpus: 0.5}"])
    assert (sweep.hosts.trials_per_host, sweep.hosts.cpus) == (1, 0.5)
    assert load_sweep(repo / "sweeps" / "demo.yaml").hosts.trials_per_host is None
    for override, expected in [
        ("hosts={trials_per_host: 0}", "hosts.trials_per_host: Input should be greater than 0"),
        ("hosts={cpu: 1}", "hosts.cpu: unknown key 'cpu' (did you mean 'cpus'?)"),
    ]:
        with pytest.raises(SweepError) as info:
            load_sweep(repo / "sweeps" / "demo.yaml", [override])
        assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_trial_stopped_by_the_sweep_is_pruned_not_failed() -> None:
    from dspy_sweeps.run.worker import failed

    result = failed("t", Pruned("stopped"), budget_spent=True)
    assert (result.status, result.reason, result.val_score) == ("pruned", "pruned", None)
