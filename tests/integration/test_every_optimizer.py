"""One trial of every supported optimizer kind, a custom teleprompter by import path, and the Ensemble trial.

Run: ``.venv/bin/python -m pytest tests/integration/test_every_optimizer.py -q -n 0``. The real
CLI runs a sweep over the demo corpus with tiny settings against a simulated endpoint this
test starts (serving the student, the teacher and an embedding model as "real"
OpenAI-compatible models), so the test can read what each model was asked. Every trial must
finish with a score and accounted calls, and its saved program must be JSON that rebuilds
into a program that answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sweep_helpers import REPO, demo_answer_key, rows, sweep_cli

from dspy_sweeps.spec.kinds import KINDS

pytestmark = pytest.mark.slow

CUSTOM = "tests.assets.teleprompters:BestLabeledDemos"
# Tiny settings: the subject is that each kind runs with its roles filled, not what it finds.
SETTINGS: dict[str, dict] = {
    "bootstrap_fewshot": {"max_bootstrapped_demos": 1, "max_labeled_demos": 1},
    "bootstrap_rs": {"num_candidate_programs": 1, "max_bootstrapped_demos": 1, "max_labeled_demos": 1},
    "bootstrap_optuna": {"max_demos": 1, "num_candidate_programs": 2, "max_labeled_demos": 1},
    "labeled_fewshot": {"k": 2},
    "knn_fewshot": {"k": 2, "max_bootstrapped_demos": 1, "max_labeled_demos": 1},
    "mipro_v2": {
        "auto": None,
        "num_candidates": 2,
        "num_trials": 2,
        "max_bootstrapped_demos": 1,
        "max_labeled_demos": 1,
        "minibatch_size": 4,
    },
    "copro": {"breadth": 2, "depth": 1},
    "simba": {"bsize": 4, "num_candidates": 2, "max_steps": 1, "max_demos": 1},
    "gepa": {"max_metric_calls": 24, "reflection_minibatch_size": 2},
    "infer_rules": {"num_candidates": 1, "num_rules": 2, "max_bootstrapped_demos": 1, "max_labeled_demos": 1},
    "better_together": {
        "strategy": "p -> q",
        "p": {"kind": "bootstrap_fewshot", "max_bootstrapped_demos": 1},
        "q": {"kind": "copro", "breadth": 2, "depth": 1},
    },
    CUSTOM: {"k": 2},
}
# Refused in preflight (tests/integration/test_bad_input.py): avatar needs a dspy.Avatar program,
# bootstrap_finetune trains weights.
NOT_RUN = {"avatar", "bootstrap_finetune"}


def test_every_runnable_kind_is_in_this_sweep() -> None:
    assert set(SETTINGS) - {CUSTOM} == set(KINDS) - NOT_RUN


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from dspy_sweeps_sim.launch import SimServer

    root = tmp_path_factory.mktemp("every")
    state = root / "state"
    key = demo_answer_key(root / "key.jsonl")
    with SimServer(key, root / "sim", models=("student", "teacher", "embedder"), time_scale=0.002) as sim:
        path = root / "every.yaml"
        path.write_text(yaml.safe_dump(_sweep(sim.base_url), sort_keys=False))
        run = sweep_cli("run", str(path), state=state, timeout=1500)
        assert run.returncode == 0, run.stderr[-4000:]
        yield {"state": state, "sim": sim, "stats": sim.stats(), "run": run}


def _sweep(base_url: str) -> dict:
    def model(name: str) -> dict:
        return {"name": name, "model": f"openai/{name}", "api_base": base_url, "timeout_s": 60}

    return {
        "name": "demo",  # rows() and the answer key read the demo's names
        "program": "pipelines.arith:Solve",
        "metric": "pipelines.arith:exact_match",
        "data": {
            "source": "datasets/demo/arith.parquet",
            "inputs": ["question"],
            "split": {"train": 12, "val": 8, "test": 8, "seed": 0},
        },
        "students": [model("student")],
        "teachers": [model("teacher")],
        "embedder": model("embedder"),
        "optimizers": [{"kind": kind, **settings} for kind, settings in SETTINGS.items()],
        "ensemble": {"top": 3, "reduce": "majority"},
        "parallelism": 4,
        "num_threads": 4,
        "budget": {"max_lm_calls": 20000},
        "tracking": {"wandb": None, "mlflow": None},
    }


def test_every_kind_finishes_with_a_score_and_its_calls_accounted(sweep: dict) -> None:
    records = {r["kind"]: r for r in rows(sweep["state"])}
    assert set(records) == {"none", "ensemble", *SETTINGS}, sorted(records)
    for kind, r in records.items():
        assert r["status"] == "ok", f"{kind}: {r['error']}"
        assert 0.0 <= r["val_score"] <= 1.0 and 0.0 <= r["test_score"] <= 1.0, kind
        # Every call a trial asked for is accounted once: sent, served from the cache, merged, or failed.
        asked = r["lm_calls"] + r["cache_hits"] + r["merged_calls"] + r["failed_calls"]
        assert r["calls_requested"] == asked > 0, kind
        assert r["calls_requested"] >= 16, f"{kind}: scoring val and test alone asks 16 calls"
    sent = sum(r["lm_calls"] for r in records.values())
    served = sum(m["ok"] for m in sweep["stats"]["models"].values())
    assert sent == served, "every call the records count as sent reached the endpoint, and no other"


def test_knn_fewshot_embeds_through_the_gateway(sweep: dict) -> None:
    knn = next(r for r in rows(sweep["state"]) if r["kind"] == "knn_fewshot")
    embedder = sweep["stats"]["models"]["embedder"]
    assert embedder["ok"] > 0, "the train split and every scored input were embedded by the embedder model"
    # Each scored example embeds its input and asks the student (and bootstraps on its neighbours).
    assert knn["calls_requested"] >= 2 * 16


def test_every_program_is_json_state_that_rebuilds_and_answers(sweep: dict) -> None:
    import dspy

    from dspy_sweeps.lm.build import build_embedder, build_lm
    from dspy_sweeps.spec.imports import restore_program
    from dspy_sweeps.spec.schema import ModelSpec

    base = sweep["sim"].base_url
    student = build_lm(ModelSpec(name="s", model="openai/student", api_base=base), cache=False)
    embedder = build_embedder(ModelSpec(name="e", model="openai/embedder", api_base=base))
    for r in rows(sweep["state"]):
        text = Path(r["program_path"]).read_text()
        assert isinstance(json.loads(text), dict), r["kind"]
        program = restore_program("pipelines.arith:Solve", text, embedder)
        with dspy.context(lm=student):
            answer = program(question="Ben has 3 apples and gets 4 more. How many apples does Ben have now?").answer
        assert answer.strip(), r["kind"]


def test_composite_programs_keep_their_parts(sweep: dict) -> None:
    from dspy_sweeps.spec.composite import MARK

    saved = {r["kind"]: json.loads(Path(r["program_path"]).read_text()) for r in rows(sweep["state"])}
    ensemble = saved["ensemble"][MARK]
    assert ensemble["kind"] == "ensemble" and len(ensemble["members"]) == 3
    knn = saved["knn_fewshot"][MARK]
    assert knn["k"] == 2 and len(knn["trainset"]) == 12 and knn["inputs"] == ["question"]
    assert "embedder" not in json.dumps(saved["knn_fewshot"]), "the embedder is never saved with the program"


def test_custom_teleprompter_gets_the_roles_its_signature_names(sweep: dict) -> None:
    record = next(r for r in rows(sweep["state"]) if r["kind"] == CUSTOM)
    assert record["trial_id"].startswith("BestLabeledDemos-student-teacher-s0-")
    state = json.loads(Path(record["program_path"]).read_text())
    demos = state["solve.predict"]["demos"]
    # Its constructor refuses to run without metric and num_threads, its compile without
    # trainset, valset and seed: it ran, and kept k=2 labelled demos from the train split.
    assert len(demos) == 2 and all(d["answer"] for d in demos)


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Four label-demo programs and the Ensemble of the best two. Majority over two breaks ties
    to the better member, so the ensemble scores the best member's val score exactly; its
    members' answers are all in the LM cache already, so it sends no new calls and wins the
    tie on LM calls: it is promoted whatever the scores (the promotion rule: best val, then
    fewest calls)."""
    root = tmp_path_factory.mktemp("ensemble")
    state = root / "state"
    sweep = {
        "name": "ens",
        "program": "pipelines.arith:Solve",
        "metric": "pipelines.arith:exact_match",
        "data": {
            "source": "datasets/demo/arith.parquet",
            "inputs": ["question"],
            "split": {"train": 20, "val": 30, "test": 20, "seed": 0},
        },
        "students": [{"name": "small", "model": "sim/student"}],
        "optimizers": [{"kind": "labeled_fewshot", "k": [1, 2, 3, 4]}],
        "ensemble": {"top": 2},
        "num_threads": 4,
        "endpoints": {"sim": {"time_scale": 0.002}},
        # min_gain -1: the Ensemble takes the alias however little it beats the baseline by on 20 test
        # rows (the first promotion's gate is tested in tests/unit/test_gate.py); this is about the Ensemble.
        "promote": {"model": "ens", "alias": "champion", "min_gain": -1.0},
        "tracking": {"wandb": None, "mlflow": {"experiment": "ens"}},
    }
    path = root / "ens.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    run = sweep_cli("run", str(path), state=state, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    yield {"state": state, "run": run}


def test_ensemble_is_promoted_and_loads_in_a_fresh_process(promoted: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    from dspy_sweeps.spec.composite import MARK

    # The line names the gate's measure, not the trial: the pulled program below shows it is the Ensemble.
    assert "promoted v1 as @champion (SIMULATED scores): no champion yet" in promoted["run"].stdout
    pulled = sweep_cli("pull", "ens@champion", "-o", str(tmp_path / "pulled"), state=promoted["state"])
    assert pulled.returncode == 0, pulled.stderr
    state = json.loads((tmp_path / "pulled" / "program.json").read_text())
    assert len(state[MARK]["members"]) == 2
    asked = sweep_cli(
        "ask", "ens@champion", "question=Ben has 3 apples and gets 4 more. How many?", state=promoted["state"]
    )
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert "answer:" in asked.stdout

    from dspy_sweeps_sim.launch import SimServer

    key = promoted["state"] / "endpoints" / "sim" / "ens" / "answer_key.jsonl"
    with SimServer(key, tmp_path / "sim", models=("student",), time_scale=0.001) as sim:
        code = (
            "import dspy_sweeps\n"
            f"p = dspy_sweeps.load('ens@champion', api_base='{sim.base_url}', "
            f"tracking_uri='sqlite:///{promoted['state']}/mlflow.db')\n"
            "print('KIND', type(p).__name__, len(p.ensemble.programs))\n"
            "print('ANSWER', p(question='Ben has 3 apples and gets 4 more. How many apples does Ben have now?').answer)\n"
        )
        fresh = {**os.environ, "DSPY_CACHEDIR": str(tmp_path / "dspy-cache")}  # an empty DSPy cache: calls are sent
        loaded = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=fresh, capture_output=True, text=True, timeout=300
        )
        requests = sim.stats()["models"]["student"]["ok"]
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "KIND EnsembleProgram 2" in loaded.stdout and "ANSWER " in loaded.stdout
    assert requests >= 2, "each member answered through the caller's endpoint"
