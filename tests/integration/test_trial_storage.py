"""Trial identity and trial storage through `sweep run` (issue 16): a fresh run starts every
trial's folder clean and counts its own attempts, `--resume` keeps everything, and a changed
corpus gives new trials that compile again, with nothing of GEPA's old state."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sweep_helpers import REPO, UNTRACKED, pointed_at, rows, sweep_cli

from dspy_sweeps_sim.launch import SimServer

pytestmark = pytest.mark.slow
GEPA = "optimizers=[{kind: gepa, max_metric_calls: 60}]"
SPLIT = "data.split={train: 20, val: 20, test: 20, seed: 0}"


def gepa_state(storage: Path, trial_id: str) -> dict:
    return pickle.loads((storage / "trials" / "demo" / trial_id / "gepa" / "gepa_state.bin").read_bytes())


def test_fresh_runs_start_clean_resume_keeps_and_a_changed_corpus_recompiles(sim: SimServer, tmp_path: Path) -> None:
    corpus = tmp_path / "arith.parquet"
    shutil.copy(REPO / "datasets" / "demo" / "arith.parquet", corpus)
    state, storage = tmp_path / "state", tmp_path / "storage"
    args = ["run", "sweeps/demo.yaml", *pointed_at(sim), "--set", GEPA, "--set", SPLIT, *UNTRACKED]
    args += ["--set", f"data.source={corpus}", "--storage", str(storage)]

    def run(*extra: str) -> dict[str, dict]:
        result = sweep_cli(*args, *extra, state=state)
        assert result.returncode == 0, result.stderr[-3000:]
        return {r["kind"]: r for r in rows(state)}

    first = run()
    gepa_id = first["gepa"]["trial_id"]
    folder = storage / "trials" / "demo" / gepa_id
    assert first["gepa"]["status"] == "ok" and first["gepa"]["attempts"] == 1
    assert (folder / "attempts").read_text() == "1" and (folder / "program.json").is_file()
    assert (folder / "scores.json").is_file(), "the per-example scores are kept in storage"
    evals = gepa_state(storage, gepa_id)["total_num_evals"]
    assert evals > 0

    # The same sweep again, fresh: the same trial id, but GEPA compiles from nothing (an inherited
    # gepa_state.bin would stop at once, requesting only the val and test calls) and attempts is 1.
    again = run()
    assert again["gepa"]["trial_id"] == gepa_id and again["gepa"]["attempts"] == 1
    assert again["gepa"]["calls_requested"] >= 0.9 * first["gepa"]["calls_requested"], (again, first)
    assert gepa_state(storage, gepa_id)["total_num_evals"] == evals

    # --resume of a finished sweep keeps every record and every trial folder as it was.
    kept = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    resumed = run("--resume")
    assert {k: r["duration_s"] for k, r in resumed.items()} == {k: r["duration_s"] for k, r in again.items()}
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == kept

    # A changed corpus: new trial ids, compiled again; the old trial's folder is gone.
    table = pq.read_table(corpus)
    pq.write_table(table.slice(5), corpus)
    changed = run()
    assert changed["gepa"]["trial_id"] != gepa_id and changed["none"]["trial_id"] != first["none"]["trial_id"]
    assert changed["gepa"]["status"] == "ok" and changed["gepa"]["attempts"] == 1
    assert gepa_state(storage, changed["gepa"]["trial_id"])["total_num_evals"] > 0
    assert not folder.exists(), "a fresh run inherits no earlier run's trial folder"
