"""Shared fixtures: the repo root, a 30-row arithmetic corpus, sweep files built from the demo,
and one Ray head for the whole test run.

Run: ``.venv/bin/python -m pytest -q``. Nothing here imports DSPy, Ray or DuckDB, so tests
that do not need them stay fast.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS_ROWS = 30
RAY_HEAD_CPUS = 32  # logical CPUs: sweeps from both test workers place their trial hosts at once


def pytest_configure(config: pytest.Config) -> None:
    """One Ray head for the run: every `sweep run` a test starts joins it through RAY_ADDRESS (the
    test workers inherit this process's environment), instead of starting a Ray of its own. Tests
    whose subject is Ray's own start-up or clean-up drop RAY_ADDRESS (`ray_head.own_ray`). Not for a run of
    unit tests alone, which start no sweep."""
    if hasattr(config, "workerinput") or "RAY_ADDRESS" in os.environ or _unit_tests_only(config):
        return
    from ray_head import start_head

    try:  # five tries: on a loaded machine each can miss Ray's 30 s registration window, and without the
        # head every sweep starts a Ray of its own, which misses that window as easily
        head = start_head(dashboard=False, num_cpus=RAY_HEAD_CPUS, tries=5)
    except AssertionError as exc:  # a speed-up, not a subject: without it every sweep starts its own Ray
        first = str(exc).splitlines()[0]
        config.issue_config_time_warning(
            pytest.PytestWarning(f"no shared Ray head ({first}); sweeps start their own"), 2
        )
        return
    config.stash[_HEAD] = head
    os.environ.update({"RAY_ADDRESS": head.address, **head.env})


def pytest_unconfigure(config: pytest.Config) -> None:
    head = config.stash.get(_HEAD, None)
    if head is not None:
        for name in ("RAY_ADDRESS", *head.env):
            os.environ.pop(name, None)
        head.stop()


_HEAD = pytest.StashKey[Any]()

# The files that take minutes, longest first (from a --durations run of `make test`). `make test` hands
# whole files to its workers in collection order (--dist loadfile --no-loadscope-reorder): starting the
# longest first keeps one of them from starting last and running on alone after the others are done.
LONGEST_FIRST = (
    "integration/test_real_model.py",  # ~250 s on 3 workers, 2 cores (--durations, 2026-12-07)
    "integration/test_multinode.py",
    "integration/test_demo_sweep.py",
    "integration/test_crashes.py",
    "integration/test_promotion.py",
    "integration/test_serve.py",
    "integration/test_sweep_budget.py",
    "integration/test_bad_input.py",
    "integration/test_ray_jobs.py",
    "integration/test_simulated_scores.py",
    "integration/test_every_optimizer.py",
    "integration/test_faults.py",
    "integration/test_search_sweeps.py",
    "integration/test_served_students.py",
    "integration/test_hosts.py",  # ~38 s; the files after it take under 35 s each
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {REPO / "tests" / name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: the rest keep their order


def _unit_tests_only(config: pytest.Config) -> bool:
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args] or [REPO / "tests"]
    return all((REPO / "tests" / "unit") in (p, *p.parents) for p in paths)


def _reset_dspy() -> None:
    # Importing DSPy costs seconds; a test that never imported it cannot have configured it.
    if "dspy" not in sys.modules:
        return
    from dspy.dsp.utils.settings import DEFAULT_CONFIG

    sys.modules["dspy"].settings.configure(**copy.deepcopy(DEFAULT_CONFIG))


@pytest.fixture(autouse=True)
def reset_dspy_settings() -> Iterator[None]:
    """Every test starts and ends with DSPy's default settings (no LM, no adapter, no callbacks)."""
    _reset_dspy()
    yield
    _reset_dspy()


@pytest.fixture(autouse=True)
def tracking_uri_left_alone() -> Iterator[None]:
    """No test (and no library call it makes) may leave $MLFLOW_TRACKING_URI changed: every later
    `sweep` subprocess would inherit it and track to a server that may be gone."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    assert after == before, f"MLFLOW_TRACKING_URI was left at {after!r} (was {before!r})"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def corpus_rows(n: int = CORPUS_ROWS) -> dict[str, list[str]]:
    """`n` arithmetic questions with their answers, as Parquet columns."""
    return {
        "question": [f"What is {i} plus {i + 7}?" for i in range(n)],
        "answer": [str(2 * i + 7) for i in range(n)],
    }


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    import polars as pl

    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(columns).write_parquet(path)
    return path


@pytest.fixture
def parquet_file(tmp_path: Path) -> Callable[..., Path]:
    """`parquet_file({"question": [...], "answer": [...]}, "name.parquet")` writes a file in tmp_path."""

    def write(columns: dict[str, list[Any]], name: str = "data.parquet") -> Path:
        return write_parquet(tmp_path / name, columns)

    return write


@pytest.fixture
def corpus_columns() -> dict[str, list[str]]:
    """The corpus's columns, to write variants of it with `parquet_file`."""
    return corpus_rows()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-row Parquet file with columns question, answer (shared: do not modify it)."""
    return write_parquet(tmp_path_factory.mktemp("corpus") / "arith.parquet", corpus_rows())


@pytest.fixture
def sweep_dict(repo: Path, corpus: Path) -> dict[str, Any]:
    """The demo sweep as a dict, over the 30-row corpus split 10/10/10."""
    raw = yaml.safe_load((repo / "sweeps" / "demo.yaml").read_text())
    raw["data"]["source"] = str(corpus)
    raw["data"]["split"] = {"train": 10, "val": 10, "test": 10}
    return raw


@pytest.fixture
def sweep_file(tmp_path: Path, sweep_dict: dict[str, Any]) -> Callable[..., Path]:
    """Write a sweep file and return its path.

    `sweep_file()` writes the demo over the corpus; `sweep_file({"data": {"query": "..."}})`
    merges changes into it (mappings merge, anything else replaces); `remove=["data.query"]`
    deletes dotted keys first. `sweep_dict` is the starting point, for edits beyond these.
    """
    counter = itertools.count()

    def write(changes: dict[str, Any] | None = None, *, remove: Iterable[str] = ()) -> Path:
        content = copy.deepcopy(sweep_dict)
        for dotted in remove:
            *parents, last = dotted.split(".")
            node = content
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            del node[last]
        _merge(content, changes or {})
        path = tmp_path / f"sweep{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(content, sort_keys=False))
        return path

    return write


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
