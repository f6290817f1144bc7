"""Trials share a host's threads, and every DSPy evaluation makes a tqdm bar."""

from __future__ import annotations

import weakref

import pytest


def test_a_disabled_progress_bar_already_gone_from_tqdms_registry_does_not_end_the_trial() -> None:
    """What concurrent DSPy evaluations in one host meet now and then: a disabled bar whose entry in
    tqdm's registry is gone by the time its `__init__` removes it (KeyError, which ended a trial)."""
    import tqdm

    from dspy_sweeps.run.trial import tolerate_concurrent_progress_bars

    def bar_already_gone() -> None:
        bar = tqdm.tqdm.__new__(tqdm.tqdm)
        tqdm.tqdm._instances.discard(bar)
        bar.__init__(total=3, disable=True)

    registry = tqdm.tqdm._instances
    tqdm.tqdm._instances = weakref.WeakSet(registry)  # tqdm as it comes (a trial in this process changed it)
    try:
        with pytest.raises(KeyError):
            bar_already_gone()  # tqdm as it comes
        tolerate_concurrent_progress_bars()
        bar_already_gone()
        with tqdm.tqdm(total=1, disable=True):
            assert len(tqdm.tqdm._instances) == 0  # a disabled bar still leaves the registry
    finally:
        tqdm.tqdm._instances = registry
