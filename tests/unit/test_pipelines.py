"""Unit tests for the DSPy programs and metrics in ``pipelines/``.

Run: ``python -m pytest tests/unit/test_pipelines.py -q``. Programs run end to
end against ``dspy.utils.DummyLM``, so no model or network is needed.
"""

import dspy
import pytest
from dspy.utils import DummyLM

from pipelines import arith, banking77, gsm8k


@pytest.mark.parametrize(
    ("expected", "predicted"),
    [("1000", "1,000"), ("5", "$5"), ("5", "5.0"), ("2.5", "2.50"), (" 42 ", "42"), ("1234567", "$1,234,567.0")],
)
def test_numeric_metrics_accept_equivalent_numbers(expected: str, predicted: str) -> None:
    example, prediction = dspy.Example(answer=expected), dspy.Prediction(answer=predicted)
    assert arith.exact_match(example, prediction)
    assert gsm8k.exact_match(example, prediction)


@pytest.mark.parametrize(
    ("expected", "predicted"),
    [("1000", "100"), ("5", "6"), ("5", "50"), ("5", "five"), ("12", "12 apples"), ("7", "")],
)
def test_numeric_metrics_reject_wrong_answers(expected: str, predicted: str) -> None:
    example, prediction = dspy.Example(answer=expected), dspy.Prediction(answer=predicted)
    assert not arith.exact_match(example, prediction)
    assert not gsm8k.exact_match(example, prediction)


def test_non_numeric_answers_compare_as_normalised_text() -> None:
    assert arith.same_number("N/A", " N/A ")
    assert not arith.same_number("N/A", "n/a?")


def test_intent_match_ignores_case_and_whitespace() -> None:
    example = dspy.Example(intent="Refund_not_showing_up")
    assert banking77.intent_match(example, dspy.Prediction(intent="  refund_not_showing_up\n"))
    assert not banking77.intent_match(example, dspy.Prediction(intent="request_refund"))


def test_intents_are_the_77_distinct_banking77_labels() -> None:
    assert len(banking77.INTENTS) == len(set(banking77.INTENTS)) == 77
    assert {"card_arrival", "reverted_card_payment?", "country_support"} <= set(banking77.INTENTS)


@pytest.mark.parametrize("program", [arith.Solve, gsm8k.CoT])
def test_chain_of_thought_programs_return_answer(program: type[dspy.Module]) -> None:
    lm = DummyLM([{"reasoning": "3 packs of 4 is 12.", "answer": "12"}])
    with dspy.context(lm=lm):
        prediction = program()(question="Sam buys 3 packs of 4 pens. How many pens?")
    assert prediction.answer == "12"
    assert prediction.reasoning == "3 packs of 4 is 12."
    assert "Give the final answer as a number." in lm.history[-1]["messages"][0]["content"]
    assert arith.exact_match(dspy.Example(answer="12.0"), prediction)


def test_classifier_returns_intent_and_offers_every_label() -> None:
    lm = DummyLM([{"intent": "reverted_card_payment?"}])
    with dspy.context(lm=lm):
        prediction = banking77.Classify()(text="Why was my card payment reversed?")
    assert prediction.intent == "reverted_card_payment?"
    prompt = lm.history[-1]["messages"][0]["content"]
    assert all(label in prompt for label in banking77.INTENTS)


def test_classifier_rejects_labels_outside_banking77() -> None:
    # ChatAdapter falls back to JSONAdapter on a parse failure, so script two bad replies.
    lm = DummyLM([{"intent": "not_an_intent"}, {"intent": "not_an_intent"}])
    with dspy.context(lm=lm), pytest.raises(dspy.utils.exceptions.AdapterParseError):
        banking77.Classify()(text="Hello")
