"""A program's predictors as Prompt Registry prompts: found in its JSON state (an Ensemble's members
too), named within MLflow's allowed characters, instructions first and demos after."""

from __future__ import annotations

import json

from dspy_sweeps.track.prompts import DEMOS_HEADING, predictor_prompts, prompt_name


def predictor(instructions: str, demos: list[dict]) -> dict:
    return {"demos": demos, "signature": {"instructions": instructions, "fields": []}, "lm": None, "traces": []}


def test_each_predictor_is_a_prompt_with_its_instructions_then_its_demos() -> None:
    state = {
        "solve.predict": predictor("Solve it.", [{"question": "1+1?", "answer": "2", "augmented": True}]),
        "check": predictor("Check it.", []),
        "metadata": {"dependency_versions": {}},
    }
    prompts = {p.predictor: p for p in predictor_prompts(json.dumps(state))}
    assert sorted(prompts) == ["check", "solve.predict"]
    assert prompts["check"].template == "Check it."
    assert prompts["solve.predict"].template == f"Solve it.\n\n{DEMOS_HEADING}\n\nquestion: 1+1?\nanswer: 2"


def test_an_ensembles_members_are_found_and_names_keep_to_mlflows_characters() -> None:
    state = {"dspy_sweeps:composite": {"kind": "ensemble", "members": [{"solve.predict": predictor("A", [])}]}}
    (prompt,) = predictor_prompts(json.dumps(state))
    assert prompt.predictor == "dspy_sweeps:composite.members.0.solve.predict"
    assert prompt_name("demo", prompt.predictor) == "demo.dspy_sweeps_composite.members.0.solve.predict"
