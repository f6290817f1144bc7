"""The few private APIs of DSPy and Ray the platform relies on where no public one exists, each
pinned to the behaviour relied on, so an upgrade that changes them fails here, not in a sweep.

- `AUTO_RUN_SETTINGS` of MIPROv2 and GEPA (spec/optimizers.py estimates what `auto` will spend);
- `dspy.utils.parallelizer.ParallelExecutor` (run/trial.py scores examples with it: `dspy.Parallel`
  takes (module, inputs) pairs and cannot tell a failed LM call from a program's bug);
- `ray._private.worker._global_node.head` (run/runner.py starts the reaper only for a Ray it started).
"""

from __future__ import annotations

import inspect
import threading

import dspy


def test_mipro_auto_run_settings_hold_the_fields_the_estimate_reads() -> None:
    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS

    assert set(AUTO_RUN_SETTINGS) == {"light", "medium", "heavy"}
    assert all({"n", "val_size"} <= set(v) for v in AUTO_RUN_SETTINGS.values())
    # MIPROv2 reads them by its `auto` setting, as the estimate does
    assert "AUTO_RUN_SETTINGS[self.auto]" in inspect.getsource(dspy.MIPROv2)


def test_gepa_derives_its_budget_from_auto_run_settings_through_auto_budget() -> None:
    from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS

    assert set(AUTO_RUN_SETTINGS) == {"light", "medium", "heavy"} and all("n" in v for v in AUTO_RUN_SETTINGS.values())
    compile_source = inspect.getsource(dspy.GEPA.compile)
    assert "self.auto_budget(" in compile_source and 'AUTO_RUN_SETTINGS[self.auto]["n"]' in compile_source
    assert list(inspect.signature(dspy.GEPA.auto_budget).parameters)[1:4] == [
        "num_preds",
        "num_candidates",
        "valset_size",
    ]


def test_parallel_executor_keeps_order_and_carries_the_dspy_context_into_its_threads() -> None:
    from dspy.utils.parallelizer import ParallelExecutor

    marker = object()
    seen: set[int] = set()

    def work(item: int) -> tuple[int, bool]:
        seen.add(threading.get_ident())
        return item * 2, marker in (dspy.settings.callbacks or [])

    with dspy.context(callbacks=[marker]):  # how run/progress.py's TrialProgress reaches every worker
        results = ParallelExecutor(num_threads=4, max_errors=100, disable_progress_bar=True).execute(work, range(40))
    assert [r[0] for r in results] == [i * 2 for i in range(40)]
    assert all(in_context for _, in_context in results)
    assert threading.get_ident() not in seen or len(seen) > 1  # the work ran on the executor's threads


def test_ray_keeps_the_node_this_driver_started_where_the_reaper_looks() -> None:
    import ray._private.node
    import ray._private.worker

    assert hasattr(ray._private.worker, "_global_node")
    # a Node is built with head=True by the process that starts the head, and keeps it as `.head`
    assert "head" in inspect.signature(ray._private.node.Node).parameters
    assert "self.head = head" in inspect.getsource(ray._private.node.Node.__init__)
