"""A small teacher's malformed answers (run/formats.py): what is taken as text, and what never is."""

from __future__ import annotations


def test_a_teachers_answer_without_field_markers_is_taken_as_its_one_text() -> None:
    import dspy

    from dspy_sweeps.run.formats import as_text

    class Propose(dspy.Signature):
        """Propose an instruction."""

        task: str = dspy.InputField()
        proposed_instruction: str = dspy.OutputField()

    class Two(dspy.Signature):
        """Two outputs."""

        task: str = dspy.InputField()
        reasoning: str = dspy.OutputField()
        answer: str = dspy.OutputField()

    marked = "[[ ## proposed_instruction ## ]]\nName the customer's banking intent.\n\n[[ ## completed ## ]]"
    assert as_text(Propose, marked) == {"proposed_instruction": "Name the customer's banking intent."}
    assert as_text(Propose, "Name the intent.") == {"proposed_instruction": "Name the intent."}
    assert as_text(Propose, "[[ ## completed ## ]]") is None  # no text at all: the error goes on
    assert as_text(Two, "Name the intent.") is None  # more than one output: never guessed
