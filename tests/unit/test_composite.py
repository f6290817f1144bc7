"""Unit tests for composite programs (an Ensemble of trials, a KNNFewShot program): saved as JSON, rebuilt without pickle.

Run: ``.venv/bin/python -m pytest tests/unit/test_composite.py -q``. DummyLM answers; the
embedder is a local function, so nothing leaves the process.
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import numpy as np
import pytest
from dspy.utils import DummyLM

from dspy_sweeps.errors import SweepError
from dspy_sweeps.run.optimize import Supplies, compile_with
from dspy_sweeps.spec.composite import MARK, EnsembleProgram, KNNProgram, map_states, needs_embedder
from dspy_sweeps.spec.imports import restore_program
from dspy_sweeps.track.registry import without_lms
from pipelines.arith import Solve, exact_match

PROGRAM = "pipelines.arith:Solve"


def examples(n: int) -> list[dspy.Example]:
    return [dspy.Example(question=f"What is {i} plus 1?", answer=str(i + 1)).with_inputs("question") for i in range(n)]


def words(texts: list[str]) -> np.ndarray:
    """A local embedder: one dimension per number in the text."""
    return np.array([[float(str(i) in t.split()) for i in range(10)] for t in texts], dtype=np.float32)


def member(demo: dspy.Example) -> Solve:
    program = Solve()
    program.solve.predict.demos = [demo]
    return program


def test_ensemble_saves_its_members_states_and_rebuilds_them(tmp_path: Path) -> None:
    members = [member(e) for e in examples(3)]
    ensemble = EnsembleProgram(members, "majority")
    saved = json.dumps(ensemble.dump_state())
    rebuilt = restore_program(PROGRAM, saved)
    assert isinstance(rebuilt, EnsembleProgram) and len(rebuilt.ensemble.programs) == 3
    assert [p.solve.predict.demos[0]["question"] for p in rebuilt.ensemble.programs] == [
        "What is 0 plus 1?",
        "What is 1 plus 1?",
        "What is 2 plus 1?",
    ]
    answers = [{"reasoning": "r", "answer": a} for a in ("5", "7", "5")]
    with dspy.context(lm=DummyLM(answers)):
        assert rebuilt(question="What is 4 plus 1?").answer == "5", "the majority answer"


def test_knn_program_holds_k_and_train_rows_and_needs_an_embedder_to_run() -> None:
    lm = DummyLM([{"reasoning": "r", "answer": "3"}] * 20)
    supplies = Supplies(
        exact_match,
        "pipelines.arith:exact_match",
        lm,
        lm,
        examples(6),
        examples(2),
        0,
        1,
        Path("/nowhere"),
        dspy.Embedder(words, caching=False),
    )
    with dspy.context(lm=lm):
        compiled = compile_with("knn_fewshot", {"k": 2, "max_bootstrapped_demos": 1}, Solve(), supplies)
        assert compiled(question="What is 2 plus 1?").answer == "3"
    saved = compiled.dump_state()
    assert saved[MARK]["k"] == 2 and len(saved[MARK]["trainset"]) == 6 and needs_embedder(saved)
    without = restore_program(PROGRAM, json.dumps(saved))
    assert isinstance(without, KNNProgram)
    with pytest.raises(SweepError, match="needs an embedder"):
        without(question="What is 2 plus 1?")
    rebuilt = restore_program(PROGRAM, json.dumps(saved), dspy.Embedder(words, caching=False))
    with dspy.context(lm=DummyLM([{"reasoning": "r", "answer": "3"}] * 20)):
        assert rebuilt(question="What is 2 plus 1?").answer == "3"


def test_saved_lms_are_cleared_inside_every_member() -> None:
    program = member(examples(1)[0])
    program.set_lm(dspy.LM("openai/somewhere", api_base="http://attacker.example/v1"))
    state = {MARK: {"kind": "ensemble", "reduce": "majority", "members": [program.dump_state()] * 2}}
    cleared = map_states(state, without_lms)
    assert "attacker" in json.dumps(state) and "attacker" not in json.dumps(cleared)
